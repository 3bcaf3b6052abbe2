"""Compilable dynamic networks (DyCL, ISSTA 2023): rewrite data-dependent control flow so ``torch.export`` and
``torch.compile(fullgraph=True)`` capture it, check the exported program against eager, time it.

Pure core: :mod:`~lightning_ext.export.dycl` (:func:`export_dynamic`, :func:`rewritten`, :func:`make_exportable`,
the explicit :func:`cond`/:func:`while_loop` API, :class:`DyCLReport`) with the AST pass in
:mod:`~lightning_ext.export.dycl_rewrite`; small dynamic networks in :mod:`~lightning_ext.export.dynamic_nets`.
Lightning wrapper: the :class:`~lightning_ext.export.callback.DynamicExportCheck` callback.
"""
