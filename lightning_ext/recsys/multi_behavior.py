"""Multi-behaviour implicit feedback: a target behaviour to recommend and auxiliary behaviours that help.

:class:`MultiBehaviorInteractions` is the family's :class:`~lightning_ext.recsys.interactions.Interactions` plus
auxiliary behaviours (``name -> (user, item)`` training pairs) and every known training pair of any behaviour
(masked before ranking). :class:`MultiBehaviorDataModule` derives the behaviours from MovieLens-100K's ratings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence, get_args

import numpy as np
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_ext.core.validation import OpenUnitInterval, check_choice, check_number
from lightning_ext.data.movielens100k import find_ml100k_inter, read_inter_file
from lightning_ext.recsys.interactions import InteractionDataModule, Interactions, dedupe_pairs, per_user_split

#: which pairs the BPR triples (and a single-graph model's graph) come from
TrainOn = Literal["target", "union"]


@dataclass
class MultiBehaviorInteractions(Interactions):
    """Interactions whose ``train`` pairs are one behaviour (``train_on``), with the auxiliary behaviours beside.

    ``auxiliary`` maps a behaviour name to its training ``(user, item)`` pairs; ``target_train`` holds the
    target behaviour's training pairs whatever ``train`` is (``train`` is the union of every behaviour when the
    DataModule's ``train_on="union"``); ``known`` holds every training pair of any behaviour (masked before
    ranking, for every model alike). Validation and test pairs are target pairs, absent from every behaviour.
    """

    auxiliary: dict = field(default_factory=dict)
    target_train: Optional[np.ndarray] = None
    known: Optional[np.ndarray] = None


class MultiBehaviorDataModule(InteractionDataModule):
    """MovieLens-100K as multi-behaviour feedback: any rating is the auxiliary behaviour, rating >= 4 the target.

    Protocol (also in :attr:`name`): the 100,000 ratings of 943 users on 1,682 movies (recbole's
    ``ml-100k.inter``). Each user's rated pairs are split per user at random: ``test_fraction`` to test, then
    ``val_fraction`` of the rest to validation (``split_seed``). A held-out pair leaves every behaviour. In the
    training part, the **target** behaviour is the pairs rated at least ``target_min_rating`` and auxiliary
    behaviour ``rating>=r`` the pairs rated at least ``r``, for each ``r`` in ``auxiliary_min_ratings`` (the
    default ``[1]``: "rated at all", a superset of the target, like views of bought items). The validation and
    test positives are the held-out pairs rated at least ``target_min_rating``; lower-rated held-out pairs are
    dropped. Evaluation ranks every item and masks every training pair of any behaviour (for validation) plus
    the validation positives (for test), for every model alike: a held-out pair is never a training pair, so
    the mask never hides a positive.

    ``train_on="target"`` draws BPR triples from the target pairs (DiffGraph, LightGCN on the target);
    ``train_on="union"`` from every behaviour's pairs (LightGCN on the union: the honest single-graph baseline).
    Users and items keep their original ids minus one.

    Args:
        target_min_rating: smallest rating of the target behaviour (1..5).
        auxiliary_min_ratings: one auxiliary behaviour per entry, the pairs rated at least that much.
        train_on: ``"target"`` or ``"union"`` (see above).
        test_fraction: share of each user's rated pairs held out for test.
        path: the ``.inter`` file (default: found inside the recbole package).
        **kwargs: :class:`~lightning_ext.recsys.interactions.InteractionDataModule` arguments
            (``val_fraction`` is a share of each user's remaining rated pairs).

    Example:
        >>> dm = MultiBehaviorDataModule(batch_size=4096)
        >>> dm.setup(); s = dm.interactions.stats(); s["users"], s["items"], sorted(dm.interactions.auxiliary)
        (943, 1682, ['rating>=1'])
        >>> len(dm.interactions.auxiliary["rating>=1"]) > s["train"] > s["test"] > s["val"] > 0
        True
    """

    NUM_USERS, NUM_ITEMS = 943, 1682

    def __init__(self, target_min_rating: Literal[1, 2, 3, 4, 5] = 4,
                 auxiliary_min_ratings: Sequence[Literal[1, 2, 3, 4, 5]] = (1,), train_on: TrainOn = "target",
                 test_fraction: OpenUnitInterval = 0.2, path: Optional[str] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        check_number("target_min_rating (a star rating)", target_min_rating, low=1, high=5, integer=True)
        if isinstance(auxiliary_min_ratings, (str, bytes)) or not isinstance(auxiliary_min_ratings, Sequence) \
                or not len(auxiliary_min_ratings):
            raise ValueError(f"auxiliary_min_ratings must list at least one star rating (1..5), e.g. [1], got "
                             f"{auxiliary_min_ratings!r}.")
        for r in auxiliary_min_ratings:
            check_number("every auxiliary_min_ratings entry (a star rating)", r, low=1, high=5, integer=True)
        if len(set(auxiliary_min_ratings)) != len(auxiliary_min_ratings):
            raise ValueError(f"auxiliary_min_ratings lists a rating twice: {list(auxiliary_min_ratings)}; give each "
                             "behaviour once.")
        check_choice("train_on", train_on, get_args(TrainOn))
        check_number("test_fraction", test_fraction, low=0, high=1, low_open=True, high_open=True)
        self.target_min_rating, self.auxiliary_min_ratings = int(target_min_rating), [int(r) for r in auxiliary_min_ratings]
        self.train_on, self.test_fraction = train_on, test_fraction
        self.path = Path(path) if path else find_ml100k_inter()
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist; pass the path of recbole's `ml-100k.inter` file.")
        aux = ", ".join(f"rating>={r}" for r in self.auxiliary_min_ratings)
        self.protocol = (f"ml-100k multi-behaviour (target rating>={self.target_min_rating}; auxiliary {aux}; "
                         f"per-user random {1 - test_fraction:.0%}/{test_fraction:.0%} split of rated pairs, "
                         f"split_seed={self.split_seed}; BPR on {train_on}; all known pairs masked)")

    @property
    def name(self) -> str:
        """The protocol, including the validation carve-out."""
        return f"{self.protocol}; val = {self.val_fraction:g} of each user's remaining rated pairs"

    def load_ratings(self) -> tuple[np.ndarray, np.ndarray]:
        """``(pairs (N, 2) 0-indexed, ratings (N,))`` of every rating, one row per (user, movie)."""
        raw = read_inter_file(self.path, self.NUM_USERS, self.NUM_ITEMS)  # user_id, item_id, rating, timestamp
        pairs = raw[:, :2].astype(np.int64) - 1
        keys, first = np.unique(pairs[:, 0] * self.NUM_ITEMS + pairs[:, 1], return_index=True)
        return pairs[first], raw[first, 2].astype(np.int64)

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Split the rated pairs per user, derive the behaviours and check that something is left to train on."""
        if self.interactions is not None:
            return
        pairs, ratings = self.load_ratings()
        n_items = self.NUM_ITEMS
        rating_of = dict(zip((pairs[:, 0] * n_items + pairs[:, 1]).tolist(), ratings.tolist()))

        def rated(p: np.ndarray, at_least: int) -> np.ndarray:
            r = np.fromiter((rating_of[k] for k in (p[:, 0] * n_items + p[:, 1]).tolist()), np.int64, len(p))
            return dedupe_pairs(p[r >= at_least])

        rest, test_all = per_user_split(pairs, self.test_fraction, self.split_seed)
        train_all, val_all = per_user_split(rest, self.val_fraction, self.split_seed + 1)
        target = rated(train_all, self.target_min_rating)
        if len(target) == 0:
            raise ValueError(f"MultiBehaviorDataModule: no training pair is rated >= target_min_rating="
                             f"{self.target_min_rating}; lower target_min_rating.")
        auxiliary = {f"rating>={r}": rated(train_all, r) for r in self.auxiliary_min_ratings}
        known = dedupe_pairs(np.concatenate([target, *auxiliary.values()]))
        train = target if self.train_on == "target" else known
        if (np.bincount(known[:, 0], minlength=self.NUM_USERS) >= n_items).any():
            raise ValueError("a user has interacted with every item, so no negative can be sampled for them.")
        self.interactions = MultiBehaviorInteractions(
            self.NUM_USERS, n_items, train, rated(val_all, self.target_min_rating),
            rated(test_all, self.target_min_rating), protocol=self.name, auxiliary=auxiliary, target_train=target,
            known=known)

    def _data(self) -> MultiBehaviorInteractions:
        return self._require()

    @override
    def val_dataloader(self) -> DataLoader:
        """User batches of the validation positives (every training pair of any behaviour masked)."""
        data = self._data()
        return self._eval_loader(data.val, data.known, "val")

    @override
    def test_dataloader(self) -> DataLoader:
        """User batches of the test positives (training pairs of any behaviour and validation positives masked)."""
        data = self._data()
        return self._eval_loader(data.test, np.concatenate([data.known, data.val]), "test")
