"""MovieLens-100K as a user graph for fair node classification (co-rating neighbours, gender sensitive)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import numpy as np
from lightning.pytorch import LightningDataModule
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.paths import check_path_argument
from lightning_ext.core.validation import (
    OpenUnitInterval,
    PositiveInt,
    check_choice,
    check_number,
    check_positive_int,
)
from lightning_ext.graph.planetoid import FullGraphLoaders
from lightning_ext.data.movielens100k import find_ml100k_inter, read_inter_file

#: the user-level label: a technical occupation (engineer, programmer, scientist, technician, executive; 24% of
#: users, 31% of men and 5% of women) or age at or above the median (31; independent of gender: a control)
Label = Literal["technical", "age"]
TECHNICAL = ("engineer", "programmer", "scientist", "technician", "executive")


def read_user_file(path: Path) -> dict[str, list[str]]:
    """The columns of a recbole ``.user`` file by name (``user_id``, ``age``, ``gender``, ...; types stripped)."""
    lines = Path(path).read_text().splitlines()
    if len(lines) < 2:
        raise ValueError(f"{path}: no users after the header (an empty or truncated file).")
    names = [h.split(":")[0] for h in lines[0].split("\t")]
    rows = [line.split("\t") for line in lines[1:] if line]
    bad = next((i for i, r in enumerate(rows) if len(r) != len(names)), None)
    if bad is not None:
        raise ValueError(f"{path}, row {bad + 2}: expected {len(names)} tab-separated columns {names}.")
    return {n: [r[i] for r in rows] for i, n in enumerate(names)}


class MovieLensUserGraphDataModule(FullGraphLoaders, LightningDataModule):
    """MovieLens-100K's 943 users as a graph: co-rating neighbours linked, gender sensitive, few genders visible.

    Protocol: node features are the top ``num_features`` singular directions (a seeded randomised SVD) of the
    users' L2-normalised binary rating rows (which movies each user rated, from the 100,000 ratings of recbole's
    ``ml-100k.inter``), standardised; every user is linked to its ``k`` most similar users by cosine similarity of
    those rows (symmetrised, no self-loops). The sensitive attribute is a column of ``ml-100k.user`` (``gender``: 1 = male, 0 = female); the label is
    ``"technical"`` occupation or ``"age"`` >= the median. Users are split at random (``split_seed``) into
    ``train_fraction`` / ``val_fraction`` / rest test; the sensitive attribute is visible (``sens_mask``) on
    ``sens_fraction`` of all users, drawn from the users outside validation and test, as FairGNN's scripts draw
    ``sens_number`` nodes. The one ``Data`` graph has ``x``, ``edge_index``, ``y``, ``sens`` (every user's true
    attribute, for the fairness metrics), ``sens_mask`` and the three masks.

    Args:
        label: ``"technical"`` or ``"age"``.
        sensitive: the ``.user`` column used as the binary sensitive attribute (``gender``: M = 1).
        num_features: feature size (truncated SVD components).
        k: neighbours per user.
        train_fraction: share of users with a visible label.
        val_fraction: share of users for validation.
        sens_fraction: share of all users whose sensitive attribute is visible.
        split_seed: seed of the split and of the visible sensitive attributes.
        path: the ``ml-100k.user`` file (default: inside the recbole package, beside ``ml-100k.inter``).

    Example:
        >>> dm = MovieLensUserGraphDataModule(sens_fraction=0.1)  # doctest: +SKIP
        >>> dm.setup(); dm.graph.num_nodes, int(dm.graph.sens_mask.sum())  # doctest: +SKIP
        (943, 94)
    """

    NUM_USERS, NUM_ITEMS = 943, 1682

    def __init__(self, label: Label = "technical", sensitive: str = "gender", num_features: PositiveInt = 64,
                 k: PositiveInt = 10, train_fraction: OpenUnitInterval = 0.5, val_fraction: OpenUnitInterval = 0.25,
                 sens_fraction: OpenUnitInterval = 0.1, split_seed: int = 0, path: Optional[str] = None) -> None:
        super().__init__()
        require("torch_geometric", "MovieLensUserGraphDataModule")
        check_choice("label", label, ("technical", "age"))
        check_positive_int("num_features", num_features)
        check_positive_int("k", k)
        for name, value in (("train_fraction", train_fraction), ("val_fraction", val_fraction),
                            ("sens_fraction", sens_fraction)):
            check_number(name, value, low=0, high=1, low_open=True, high_open=True)
        if train_fraction + val_fraction >= 1:
            raise ValueError(f"train_fraction + val_fraction = {train_fraction + val_fraction} leaves no test users; "
                             "make their sum below 1.")
        if sens_fraction > train_fraction:
            raise ValueError(f"sens_fraction={sens_fraction} exceeds the share of users outside validation and test "
                             f"({train_fraction}); lower it.")
        if num_features >= self.NUM_USERS:
            raise ValueError(f"num_features={num_features} must be below the {self.NUM_USERS} users.")
        check_number("split_seed", split_seed, integer=True)
        check_path_argument("path", path)
        if not isinstance(sensitive, str) or not sensitive:
            raise ValueError(f"sensitive must name a column of ml-100k.user, got {sensitive!r}.")
        self.label, self.sensitive, self.num_features, self.k = label, sensitive, num_features, k
        self.train_fraction, self.val_fraction, self.sens_fraction = train_fraction, val_fraction, sens_fraction
        self.split_seed = split_seed
        self.user_path = Path(path) if path else find_ml100k_inter().with_suffix(".user")
        self.inter_path = self.user_path.with_suffix(".inter")
        for p in (self.user_path, self.inter_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} does not exist; pass `path` to recbole's `ml-100k.user` (with "
                                        "`ml-100k.inter` beside it).")
        header = self.user_path.read_text().split("\n", 1)[0]
        columns = [h.split(":")[0] for h in header.split("\t")]
        if sensitive not in columns:
            raise ValueError(f"{self.user_path} has no column `{sensitive}` for the sensitive attribute "
                             f"(columns: {', '.join(columns)}); set `sensitive` to one of them.")
        self.graph = None

    def _columns(self) -> tuple[np.ndarray, np.ndarray]:
        users = read_user_file(self.user_path)
        if self.sensitive not in users:
            raise ValueError(f"{self.user_path} has no column `{self.sensitive}` for the sensitive attribute "
                             f"(columns: {', '.join(users)}); set `sensitive` to one of them.")
        raw = users[self.sensitive]
        values = sorted(set(raw))
        if len(values) != 2:
            raise ValueError(f"the sensitive column `{self.sensitive}` has {len(values)} values ({values[:5]}); "
                             "a binary attribute (two values, e.g. gender) is needed.")
        sens = np.array([1 if v == ("M" if "M" in values else values[1]) else 0 for v in raw])
        if self.label == "technical":
            y = np.array([o in TECHNICAL for o in users["occupation"]], dtype=np.int64)
        else:
            age = np.array(users["age"], dtype=np.float64)
            y = (age >= np.median(age)).astype(np.int64)
        order = np.array(users["user_id"], dtype=np.int64) - 1
        out_y, out_s = np.zeros(self.NUM_USERS, np.int64), np.zeros(self.NUM_USERS, np.int64)
        out_y[order], out_s[order] = y, sens
        return out_y, out_s

    def build_graph(self):
        """Features, kNN edges, labels, sensitive attribute and masks (deterministic given ``split_seed``)."""
        import torch
        from torch_geometric.data import Data

        y, sens = self._columns()
        raw = read_inter_file(self.inter_path, self.NUM_USERS, self.NUM_ITEMS)
        ratings = torch.zeros(self.NUM_USERS, self.NUM_ITEMS, dtype=torch.float64)
        ratings[torch.as_tensor(raw[:, 0] - 1).long(), torch.as_tensor(raw[:, 1] - 1).long()] = 1.0
        rows = ratings / ratings.norm(dim=1, keepdim=True).clamp_min(1e-12)
        with torch.random.fork_rng():  # a seeded randomised SVD: the same features every time, in well under a second
            torch.manual_seed(0)
            u, s, _ = torch.svd_lowrank(rows, q=self.num_features + 10, niter=6)
        x = u[:, : self.num_features] * s[: self.num_features]
        x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
        sim = rows @ rows.T
        sim.fill_diagonal_(-1.0)
        nbrs = sim.topk(self.k, dim=1).indices
        src = torch.arange(self.NUM_USERS).repeat_interleave(self.k)
        edges = torch.stack([src, nbrs.flatten()])
        edges = torch.unique(torch.cat([edges, edges.flip(0)], dim=1), dim=1)
        rng = np.random.default_rng(self.split_seed)
        perm = rng.permutation(self.NUM_USERS)
        n_train, n_val = int(round(self.train_fraction * self.NUM_USERS)), int(round(self.val_fraction * self.NUM_USERS))
        masks = {}
        for name, idx in (("train_mask", perm[:n_train]), ("val_mask", perm[n_train:n_train + n_val]),
                          ("test_mask", perm[n_train + n_val:])):
            m = torch.zeros(self.NUM_USERS, dtype=torch.bool)
            m[torch.as_tensor(idx)] = True
            masks[name] = m
        n_sens = max(1, int(round(self.sens_fraction * self.NUM_USERS)))
        sens_idx = rng.permutation(perm[:n_train])[:n_sens]  # outside validation and test
        sens_mask = torch.zeros(self.NUM_USERS, dtype=torch.bool)
        sens_mask[torch.as_tensor(sens_idx)] = True
        return Data(x=x.float(), edge_index=edges, y=torch.as_tensor(y), sens=torch.as_tensor(sens),
                    sens_mask=sens_mask, num_nodes=self.NUM_USERS, **masks)

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Build the graph once."""
        if self.graph is None:
            self.graph = self.build_graph()
