"""Loss functions and weight schedules: pure functions of tensors, usable without a Trainer.

Import the functions from their modules (``from lightning_ext.losses.knowledge_distillation import
kd_kl_loss``); this package's ``__init__`` imports nothing, so ``import lightning_ext`` stays light.
"""
