"""Callbacks: pruning, merging, distillation and pipeline tuning dropped onto any Trainer."""

from lightning_ext._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "ActivatingWhilePruning": "activating_while_pruning",
    "BetaRankPruning": "beta_rank_pruning",
    "DataFreeCompression": "data_free_compression",
    "KnowledgeDistillation": "knowledge_distillation",
    "KNNEvaluation": "knn_evaluation",
    "L1FilterPruning": "l1_filter_pruning",
    "ModelMerging": "model_merging",
    "RandomFilterPruning": "random_filter_pruning",
    "PipelineTuner": "pipeline_tuner",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
