"""LightningModules: models and research methods that train with any Lightning Trainer."""

from lightning_ext._lazy import lazy_exports

_EXPORTS = {
    "Classifier": "classifier",
    "ImageClassifier": "image_classifier",
    "MLPClassifier": "mlp_classifier",
    "GCNNodeClassifier": "gcn_node_classifier",
    "DistillationModule": "distillation_module",
    "AdaMerging": "ada_merging",
    "FroSSL": "frossl",
    "VICReg": "vicreg",
    "BarlowTwins": "barlow_twins",
    "SimCLR": "simclr",
    "MFBPR": "mf_bpr",
    "LightGCN": "lightgcn",
    "UltraGCN": "ultragcn",
    "LightGCL": "lightgcl",
    "DCCF": "dccf",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
