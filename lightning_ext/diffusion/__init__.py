"""Diffusion models: a DDPM LightningModule for any denoiser, DiT-MoE's sparse mixture-of-experts layer and
diffusion transformer, and a callback that measures what the experts' routing depends on.

The module and the DiT use diffusers' schedulers and embeddings (the ``[diffusion]`` extra:
``pip install "lightning-ext[diffusion]"``); the MoE layer, its balance loss and the routing callback are plain
PyTorch. Nothing here is imported by ``import lightning_ext``.
"""
