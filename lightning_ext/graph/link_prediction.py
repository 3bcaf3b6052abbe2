"""Link prediction data and metrics: a seeded `RandomLinkSplit` DataModule and Hits@K / MRR as torchmetrics.

The protocol of NCN/NCNC (Wang et al., ICLR 2024) and NetInfoF (Lee et al., ICLR 2024) on Planetoid graphs:
undirected edges split into train/validation/test positives, validation and test negatives uniform non-edges
(PyG's ``RandomLinkSplit``), training negatives uniform random node pairs drawn per batch from a seeded
generator, and a message-passing graph that holds training edges only (no validation or test edge reaches a
model's input unless ``test_with_val_edges`` lets validation edges into the test graph, OGB's
``use_valedges_as_input``).
"""

from __future__ import annotations

import functools
import os
import random
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from torchmetrics import Metric
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.paths import check_path_argument
from lightning_ext.core.sampling import EpochSampler, ResumableDataLoader
from lightning_ext.core.validation import (
    PositiveFloat,
    PositiveInt,
    UnitIntervalRightOpen,
    check_choice,
    check_fraction,
    check_number,
    check_positive,
    check_positive_int,
)

#: keys of every batch the DataModule yields
BATCH_KEYS = ("x", "edge_index", "pos", "neg")


def check_link_batch(batch: Any, who: str) -> None:
    """Refuse a batch that is not a link-prediction batch (a dict with ``x``, ``edge_index``, ``pos``, ``neg``)."""
    if not isinstance(batch, dict) or any(k not in batch for k in BATCH_KEYS):
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f"{who} needs link-prediction batches (a dict with keys {list(BATCH_KEYS)}: features, the "
            f"message-passing edges, positive and negative target edges), got {got}; use "
            "`LinkPredictionDataModule` (it splits the graph's edges with RandomLinkSplit)."
        )


_M64 = 2**64


def _signed(v: int) -> int:
    return v - _M64 if v >= 2**63 else v


_C1, _C2, _C3 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def hash_uniform(keys: torch.Tensor) -> torch.Tensor:
    """SplitMix64 of int64 ``keys`` (wrapping arithmetic, logical shifts), as non-negative int64: a stateless,
    vectorised pseudo-random number per key."""
    x = keys.to(torch.int64) * _C1
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _C2
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _C3
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return x & ((1 << 62) - 1)


def epoch_negatives(edge_ids: torch.Tensor, epoch: torch.Tensor, seed: int, num_nodes: int) -> torch.Tensor:
    """``(2, B)`` uniform random node pairs, a pure function of (seed, epoch, positive edge id): the same positive
    gets the same negative in any batch composition (one process or DDP ranks, a resumed run), a new one each
    epoch."""
    base = ((int(seed) % 1_000_003) * 1_000_033 + epoch.to(torch.int64)) * (1 << 24) + edge_ids.to(torch.int64)
    return torch.stack([hash_uniform(base * 2 + k) % num_nodes for k in (0, 1)])


class _TaggedIndices:
    """The training "dataset": ``n`` positive edge ids; item ``epoch * n + i`` is handed to the collate as is."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, tagged: int) -> int:
        return tagged


class _EpochTaggedSampler(EpochSampler):
    """:class:`EpochSampler` yielding ``epoch * n + index``, so the collate function knows the epoch."""

    def __iter__(self):
        n = self.num_samples_total
        return (self.epoch * n + int(i) for i in super().__iter__())


def _train_batch(idx: list, *, x, edge_index, pos, num_nodes, seed) -> dict:
    tagged = torch.as_tensor(idx, dtype=torch.int64)
    ids, epoch = tagged % pos.size(1), tagged // pos.size(1)
    return {"x": x, "edge_index": edge_index, "pos": pos[:, ids], "neg": epoch_negatives(ids, epoch, seed, num_nodes)}


def _fixed_batch(_items: list, *, batch: dict) -> dict:
    return batch


class LinkPredictionDataModule(LightningDataModule):
    """A Planetoid graph's edges split for link prediction by PyG's `RandomLinkSplit`, with seeded negatives.

    Training batches hold ``batch_size`` positive training edges (``pos``, ``(2, B)``) and as many uniform random
    node pairs (``neg``), each a pure function of (``seed``, epoch, the positive's id) (:func:`epoch_negatives`:
    a resumed run, or two DDP ranks with half the batch, draw exactly the negatives of one process), plus the features ``x`` and the message-passing graph ``edge_index`` (both directions).
    Validation and test yield one batch with every positive of the split and ``eval_negative_ratio`` times as
    many uniform non-edges (``RandomLinkSplit``'s negatives, sampled once with ``split_seed``); under DDP each
    rank gets every world-th of them, so the gathered Hits@K/MRR equal one process's. The
    message-passing graph is the training edges only, in every stage; ``input_edge_drop`` removes a seeded share
    of them from it (targets unchanged), the sparsified setting of NCNC. Order of training edges: seeded,
    sharded, resumable (:class:`~lightning_ext.core.sampling.EpochSampler`).

    Args:
        root: folder holding ``<name>/raw`` (Planetoid raw files); default ``$PLANETOID_ROOT``.
        name: ``"Cora"``, ``"CiteSeer"`` or ``"PubMed"``.
        val_fraction: share of edges held out for validation.
        test_fraction: share of edges held out for testing.
        split_seed: seed of the edge split, the evaluation negatives and ``input_edge_drop``.
        eval_negative_ratio: validation/test negatives per positive.
        input_edge_drop: share of training edges removed from the message-passing graph, in [0, 1).
        test_with_val_edges: let validation edges into the test stage's message-passing graph.
        batch_size: positive training edges per batch.
        seed: seed of the training order and the training negatives.
        cache_dir: where PyG may write the processed Planetoid files (see `PlanetoidDataModule`).
        normalize_features: row-normalise the node features.

    Example:
        >>> dm = LinkPredictionDataModule(root="../shared/data/planetoid", name="Cora")  # doctest: +SKIP
        >>> dm.setup(); dm.split_sizes()  # doctest: +SKIP
        {'train': 4488, 'val': 263, 'test': 527, 'message_passing': 8976}
    """

    def __init__(
        self,
        root: Optional[str] = None,
        name: Literal["Cora", "CiteSeer", "PubMed"] = "Cora",
        val_fraction: UnitIntervalRightOpen = 0.05,
        test_fraction: UnitIntervalRightOpen = 0.1,
        split_seed: int = 0,
        eval_negative_ratio: PositiveFloat = 1.0,
        input_edge_drop: UnitIntervalRightOpen = 0.0,
        test_with_val_edges: bool = False,
        batch_size: PositiveInt = 1152,
        seed: int = 0,
        cache_dir: Optional[str] = None,
        normalize_features: bool = True,
    ) -> None:
        super().__init__()
        require("torch_geometric", "LinkPredictionDataModule")
        check_choice("name", name, ("Cora", "CiteSeer", "PubMed"))
        for arg, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction),
                           ("input_edge_drop", input_edge_drop)):
            check_fraction(arg, value, allow_one=False)
        if not 0 < val_fraction + test_fraction < 1:
            raise ValueError(f"`val_fraction` + `test_fraction` must lie in (0, 1), got {val_fraction + test_fraction}; "
                             "leave training edges and hold some out.")
        check_number("split_seed", split_seed, integer=True)
        check_number("seed", seed, integer=True)
        check_positive("eval_negative_ratio", eval_negative_ratio)
        check_positive_int("batch_size", batch_size)
        check_path_argument("root", root)
        check_path_argument("cache_dir", cache_dir)
        self.root, self.name, self.cache_dir = root or os.environ.get("PLANETOID_ROOT"), name, cache_dir
        self.val_fraction, self.test_fraction, self.split_seed = float(val_fraction), float(test_fraction), split_seed
        self.eval_negative_ratio, self.input_edge_drop = float(eval_negative_ratio), float(input_edge_drop)
        self.test_with_val_edges, self.batch_size, self.seed = bool(test_with_val_edges), batch_size, seed
        self.normalize_features = normalize_features
        self._planetoid = None
        if self.root is not None:
            from lightning_ext.graph.planetoid import PlanetoidDataModule

            self._planetoid = PlanetoidDataModule(root=self.root, name=name, cache_dir=cache_dir,
                                                  normalize_features=normalize_features)  # fails early on missing files
        self.graph = None  # the whole graph (x, edge_index, y)
        self.splits: dict[str, dict] = {}
        self.train_set: Optional[list] = None

    @classmethod
    def from_data(cls, data: Any, **kwargs: Any) -> "LinkPredictionDataModule":
        """A DataModule over the user's own ``torch_geometric.data.Data`` graph (``x`` and ``edge_index``)."""
        if getattr(data, "x", None) is None or getattr(data, "edge_index", None) is None:
            raise ValueError("from_data needs a graph with node features `x` and an `edge_index`.")
        kwargs.setdefault("root", None)
        dm = cls(**kwargs)
        dm.graph = data
        return dm

    @property
    def num_features(self) -> Optional[int]:
        """Node feature size (``None`` before the graph is known)."""
        if self.graph is not None:
            return int(self.graph.x.size(1))
        from lightning_ext.graph.planetoid import PLANETOID

        return PLANETOID[self.name][1]

    @override
    def prepare_data(self) -> None:
        """Copy the Planetoid raw files into the cache (no download)."""
        if self._planetoid is not None and self.graph is None:
            self._planetoid.prepare_data()

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Read the graph and split its edges (once; seeded by ``split_seed``)."""
        if self.splits:
            return
        if self.graph is None:
            if self._planetoid is None:
                raise ValueError("LinkPredictionDataModule has no graph: pass `root` (a folder with "
                                 f"{self.name}/raw, e.g. ../shared/data/planetoid) or use from_data(graph).")
            self._planetoid.setup()
            self.graph = self._planetoid.graph
        self.splits = split_edges(self.graph, self.val_fraction, self.test_fraction, self.split_seed,
                                  self.eval_negative_ratio, self.input_edge_drop, self.test_with_val_edges)
        self.train_set = list(range(self.splits["train"]["pos"].size(1)))

    def split_sizes(self) -> dict[str, int]:
        """Positive edges per split and directed message-passing edges of the training graph."""
        return {"train": int(self.splits["train"]["pos"].size(1)), "val": int(self.splits["val"]["pos"].size(1)),
                "test": int(self.splits["test"]["pos"].size(1)),
                "message_passing": int(self.splits["train"]["edge_index"].size(1))}

    def _need_setup(self) -> None:
        if not self.splits:
            raise RuntimeError("LinkPredictionDataModule: call setup() before asking for a dataloader.")

    @override
    def train_dataloader(self) -> DataLoader:
        """Seeded batches of positive training edges with as many seeded uniform random negatives."""
        self._need_setup()
        s = self.splits["train"]
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = _EpochTaggedSampler(len(self.train_set), seed=self.seed, rank=rank, world_size=world)
        collate = functools.partial(_train_batch, x=self.graph.x, edge_index=s["edge_index"], pos=s["pos"],
                                    num_nodes=int(self.graph.num_nodes), seed=self.seed)
        return ResumableDataLoader(_TaggedIndices(len(self.train_set)), batch_size=self.batch_size, sampler=sampler, collate_fn=collate)

    def _eval_loader(self, split: str) -> DataLoader:
        self._need_setup()
        s = self.splits[split]
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # under DDP each rank scores every world-th positive and negative: the metrics' cat-sync sees each once
        batch = {"x": self.graph.x, "edge_index": s["edge_index"], "pos": s["pos"][:, rank::world],
                 "neg": s["neg"][:, rank::world]}
        return DataLoader([0], batch_size=1, collate_fn=functools.partial(_fixed_batch, batch=batch))

    @override
    def val_dataloader(self) -> DataLoader:
        """One batch: every validation positive and the fixed validation negatives."""
        return self._eval_loader("val")

    @override
    def test_dataloader(self) -> DataLoader:
        """One batch: every test positive and the fixed test negatives."""
        return self._eval_loader("test")


def split_edges(graph: Any, val_fraction: float, test_fraction: float, split_seed: int,
                eval_negative_ratio: float = 1.0, input_edge_drop: float = 0.0,
                test_with_val_edges: bool = False) -> dict[str, dict]:
    """Split an undirected graph's edges with `RandomLinkSplit` (seeded, RNG states restored afterwards).

    PyG's ``negative_sampling`` (behind ``RandomLinkSplit``'s validation/test negatives) draws with Python's
    ``random`` module, so that generator is seeded too (torch's alone leaves the negatives unseeded).

    Returns ``{"train"|"val"|"test": {"edge_index", "pos", "neg"}}``: ``edge_index`` the stage's message-passing
    graph (both directions), ``pos``/``neg`` ``(2, m)`` target edges (one direction; ``neg`` empty for train).
    """
    from torch_geometric.data import Data
    from torch_geometric.transforms import RandomLinkSplit
    from torch_geometric.utils import remove_self_loops, to_undirected

    edge_index = to_undirected(remove_self_loops(graph.edge_index)[0], num_nodes=graph.num_nodes)
    if edge_index.size(1) < 10:
        raise ValueError(f"The graph has {edge_index.size(1) // 2} undirected edges; link prediction needs at least 5.")
    data = Data(edge_index=edge_index, num_nodes=graph.num_nodes)
    py_state = random.getstate()  # PyG's negative_sampling draws with Python's `random.sample`, not torch
    try:
        with torch.random.fork_rng():
            torch.manual_seed(split_seed)
            random.seed(split_seed)
            train, val, test = RandomLinkSplit(num_val=val_fraction, num_test=test_fraction, is_undirected=True,
                                               add_negative_train_samples=False, split_labels=True,
                                               neg_sampling_ratio=eval_negative_ratio)(data)
    finally:
        random.setstate(py_state)
    train_pos = train.pos_edge_label_index
    keep = torch.ones(train_pos.size(1), dtype=torch.bool)
    if input_edge_drop > 0:
        g = torch.Generator().manual_seed(int(split_seed) + 7919)
        keep = torch.rand(train_pos.size(1), generator=g) >= input_edge_drop
    mp = to_undirected(train_pos[:, keep], num_nodes=graph.num_nodes)
    test_mp = to_undirected(torch.cat([train_pos[:, keep], val.pos_edge_label_index], 1), num_nodes=graph.num_nodes) \
        if test_with_val_edges else mp
    empty = torch.empty(2, 0, dtype=torch.long)
    return {"train": {"edge_index": mp, "pos": train_pos, "neg": empty},
            "val": {"edge_index": mp, "pos": val.pos_edge_label_index, "neg": val.neg_edge_label_index},
            "test": {"edge_index": test_mp, "pos": test.pos_edge_label_index, "neg": test.neg_edge_label_index}}


class _PosNegMetric(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("pos", default=[], dist_reduce_fx="cat")
        self.add_state("neg", default=[], dist_reduce_fx="cat")

    @override
    def update(self, pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> None:
        """Add scores of positive and of negative edges (the negatives form one shared pool)."""
        self.pos.append(pos_scores.detach().flatten().float())
        self.neg.append(neg_scores.detach().flatten().float())

    def _scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        def cat(v):  # a list before sync (empty before any update), a tensor after
            return (torch.cat(v) if v else torch.empty(0)) if isinstance(v, list) else v

        pos, neg = cat(self.pos), cat(self.neg)
        if pos.numel() == 0 or neg.numel() == 0:
            raise ValueError(f"{type(self).__name__}: no positive or no negative scores were given to update().")
        return pos, neg


class HitsAtK(_PosNegMetric):
    """Hits@K (OGB): the share of positive edges scoring strictly above the K-th highest negative score.

    With fewer than K negatives every positive counts as a hit (OGB's ``ogbl`` evaluator does the same).

    Example:
        >>> m = HitsAtK(k=2); m.update(torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.8, 0.6, 0.2]))
        >>> round(float(m.compute()), 4)  # the 2nd negative is 0.6: only 0.9 beats it
        0.3333
    """

    def __init__(self, k: int = 100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k = check_positive_int("k", k)

    @override
    def compute(self) -> torch.Tensor:
        """Hits@K over every score seen."""
        pos, neg = self._scores()
        if neg.numel() < self.k:
            return torch.tensor(1.0)
        kth = torch.topk(neg, self.k).values[-1]
        return (pos > kth).float().mean()


class LinkMRR(_PosNegMetric):
    """Mean reciprocal rank of each positive edge among the shared pool of negatives (OGB's tie convention).

    rank = 1 + (#negatives scoring above + #negatives scoring at least as high) / 2, MRR = mean(1 / rank).

    Example:
        >>> m = LinkMRR(); m.update(torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.6, 0.5]))
        >>> round(float(m.compute()), 4)  # ranks 1 and 1 + (2 + 3) / 2 = 3.5
        0.6429
    """

    @override
    def compute(self) -> torch.Tensor:
        """MRR over every score seen."""
        pos, neg = self._scores()
        neg_sorted = torch.sort(neg).values
        above = neg.numel() - torch.searchsorted(neg_sorted, pos, right=True)  # neg > pos
        at_least = neg.numel() - torch.searchsorted(neg_sorted, pos, right=False)  # neg >= pos
        rank = 1 + 0.5 * (above + at_least).float()
        return (1.0 / rank).mean()
