"""SBP-style tensor parallelism (OneFlow's split/broadcast/partial-sum) on PyTorch DTensor, for Lightning's
``ModelParallelStrategy``.

Pure core: :mod:`~lightning_ext.parallel.sbp` (SBP <-> DTensor placements, signatures, :func:`apply_sbp_plan`) and
:mod:`~lightning_ext.parallel.sbp_check` (a two-process gloo comparison of a plan against the dense module).
Lightning wrapper: :class:`~lightning_ext.parallel.module.SBPModule`, which applies a YAML plan in
``configure_model``. OneFlow's actor runtime and automatic SBP inference have no Lightning form and are not here.
"""
