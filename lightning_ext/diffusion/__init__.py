"""Diffusion models: a DDPM LightningModule for any denoiser, DiT-MoE's sparse mixture-of-experts layer and
diffusion transformer, a callback that measures what the experts' routing depends on, and the geometry-adaptive
harmonic analysis of blind denoisers (Kadkhodaie et al.: ``BiasFreeUNet``, ``BlindDenoiserModule``,
``sample_blind``, ``jacobian_eigenbasis``, ``GeneralizationProbe``), and A-SDM's feature inheritance and assembly
distillation of UNets (``FeatureInheritance``, ``assemble_unet``, ``AssemblyDistillationModule``).

The DDPM module and the DiT use diffusers' schedulers and embeddings (the ``[diffusion]`` extra:
``pip install "lightning-ext[diffusion]"``); the MoE layer, its balance loss, the routing callback and the blind
denoiser family are plain PyTorch. Nothing here is imported by ``import lightning_ext``.
"""
