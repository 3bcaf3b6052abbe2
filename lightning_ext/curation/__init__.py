"""Data filtering and curation scorers, usable without a Trainer; the Lightning form is
:class:`~lightning_ext.curation.datamodule.FilteredDataModule`.

One method per module:

- :mod:`~lightning_ext.curation.base`: the :class:`Scorer` protocol (``score`` once, cached; ``select`` for
  any budget), :class:`ScoringData`, :func:`top_k`, :func:`fingerprint`, and ``Which`` (``"hard"``,
  ``"easy"``, ``"random"``: the samples a scorer prefers, one name for every scorer that ranks by difficulty);
- :mod:`~lightning_ext.curation.training`: scorer training (EL2N proxies, the DFN filter, DP4TL's surrogate)
  through Lightning Fabric, on the accelerator the scorer is given, seeded without touching the global RNG;
- :mod:`~lightning_ext.curation.embeddings`: :class:`Embedder` (any ``nn.Module``, a timm backbone name or a
  checkpoint; batched, with a progress bar; optional PCA);
- :mod:`~lightning_ext.curation.random_selection`: :class:`RandomScorer`;
- :mod:`~lightning_ext.curation.el2n`: :class:`EL2NScorer`, :func:`el2n_scores` (Paul et al., 2021);
- :mod:`~lightning_ext.curation.dfn`: :class:`DFNScorer` (Data Filtering Networks, Fang et al., 2024);
- :mod:`~lightning_ext.curation.semdedup`: :class:`SemDeDup` (Abbas et al., 2023);
- :mod:`~lightning_ext.curation.prototypicality`: :class:`SelfSupervisedPrototypes` (Sorscher et al., 2022);
- :mod:`~lightning_ext.curation.density_based_pruning`: :class:`DensityBasedPruning` (Abbas et al., 2024);
- :mod:`~lightning_ext.curation.dp4tl`: :class:`DP4TLLabelMapping`, :class:`DP4TLFeatureMapping`
  (Zhang et al., 2023);
- :mod:`~lightning_ext.curation.rule_filters`: :class:`RuleFilter` (FaceID-6M-style rules);
- :mod:`~lightning_ext.curation.scaling_law`: :class:`FilteringScalingLaw`, :class:`ComputeAwareSelection`
  (Goyal et al., 2024);
- :mod:`~lightning_ext.curation.select`: :func:`compare_curations`, :func:`results_table` (SELECT-style
  harness, Feuer et al., 2024).

Example:
    >>> import torch
    >>> from lightning_ext.curation import RandomScorer, ScoringData
    >>> data = ScoringData.from_tensors(torch.zeros(10, 3), torch.arange(10) % 2)
    >>> scorer = RandomScorer(seed=1)
    >>> len(scorer.select(scorer.score(data), data, n_keep=4))
    4
"""

from lightning_ext.curation.base import Scorer, Scores, ScoringData, Which, count_to_keep, fingerprint, top_k
from lightning_ext.curation.density_based_pruning import DensityBasedPruning, cluster_complexity, cluster_quotas
from lightning_ext.curation.dfn import DFNScorer, FilterNetwork
from lightning_ext.curation.dp4tl import (
    DP4TLFeatureMapping,
    DP4TLLabelMapping,
    feature_mapping_counts,
    label_mapping_counts,
    top_classes,
)
from lightning_ext.curation.el2n import EL2NScorer, el2n_scores
from lightning_ext.curation.embeddings import Embedder
from lightning_ext.curation.prototypicality import SelfSupervisedPrototypes
from lightning_ext.curation.random_selection import RandomScorer
from lightning_ext.curation.rule_filters import RuleFilter
from lightning_ext.curation.scaling_law import ComputeAwareSelection, FilteringScalingLaw, PoolLaw
from lightning_ext.curation.select import CurationResult, compare_curations, results_table
from lightning_ext.curation.semdedup import SemDeDup, semdedup_max_similarity
from lightning_ext.curation.clustering import spherical_kmeans

__all__ = [
    "ComputeAwareSelection", "CurationResult", "DFNScorer", "DP4TLFeatureMapping", "DP4TLLabelMapping",
    "DensityBasedPruning", "EL2NScorer", "Embedder", "FilterNetwork", "FilteringScalingLaw", "PoolLaw",
    "RandomScorer", "RuleFilter", "Scorer", "Scores", "ScoringData", "SelfSupervisedPrototypes", "SemDeDup",
    "Which",
    "cluster_complexity", "cluster_quotas", "compare_curations", "count_to_keep", "el2n_scores",
    "feature_mapping_counts", "fingerprint", "label_mapping_counts", "results_table", "semdedup_max_similarity",
    "spherical_kmeans", "top_classes", "top_k",
]
