"""Knowledge distillation: pure losses and weight schedules (:mod:`.losses`), the teacher (:mod:`.teacher`), the
distiller core both wrappers share (:mod:`.distiller`), the
:class:`~lightning_ext.distillation.callback.KnowledgeDistillation` callback for any LightningModule and the explicit
:class:`~lightning_ext.distillation.module.DistillationModule`."""
