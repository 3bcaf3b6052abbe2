"""torchmetrics-compatible metrics (full-ranking Recall@K / NDCG@K for recommenders)."""

from lightning_ext.metrics.ranking import RankingMetrics, topk_ranking

__all__ = ["RankingMetrics", "topk_ranking"]
