"""DP4TL, "Selectivity Drives Productivity: Efficient Dataset Pruning for Enhanced Transfer Learning" (Zhang
et al., NeurIPS 2023, arXiv 2310.08782): prune whole *source* classes for a given downstream target task."""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from torch import nn

from lightning_ext.core.checkpoints import read_state_dict
from lightning_ext.core.validation import UnitIntervalLeftOpen
from lightning_ext.core.validation import (
    NonNegativeInt, PositiveFloat, PositiveInt, check_choice, check_fraction, check_number,
)
from lightning_ext.curation.base import Scorer, Scores, ScoringData, as_dataset, check_seed, dataset_inputs
from lightning_ext.curation.clustering import spherical_kmeans
from lightning_ext.curation.embeddings import Embedder
from lightning_ext.curation.training import build_model, check_training_args, predict_logits, train_classifier

__all__ = ["DP4TLFeatureMapping", "DP4TLLabelMapping", "feature_mapping_counts", "label_mapping_counts",
           "label_mapping_votes", "top_classes"]


def label_mapping_votes(surrogate: nn.Module, target_x: torch.Tensor,
                        num_source_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """LM votes: per source class, how many target samples the surrogate assigns to it (argmax) and the sum of
    its softmax probability over the target samples (the tie-break between classes with equal counts).

    Example:
        >>> counts, probs = label_mapping_votes(nn.Linear(2, 3), torch.zeros(4, 2), 3)
        >>> int(counts.sum()), round(float(probs.sum()), 4)
        (4, 4.0)
    """
    logits = predict_logits(surrogate, target_x)
    counts = np.bincount(logits.argmax(1).numpy(), minlength=num_source_classes)
    return counts, torch.softmax(logits.double(), dim=1).sum(0).numpy()


def label_mapping_counts(surrogate: nn.Module, target_x: torch.Tensor, num_source_classes: int) -> np.ndarray:
    """LM: how many target samples the source surrogate assigns (argmax) to each source class.

    Counts of argmax predictions, not summed probabilities, as in ``lm_selection_for_imagenet.py``.
    """
    return label_mapping_votes(surrogate, target_x, num_source_classes)[0]


def feature_mapping_counts(source_feats: np.ndarray, source_ids: np.ndarray, target_feats: np.ndarray,
                           num_source_classes: Optional[int] = None) -> np.ndarray:
    """FM: how many target samples have each source class (or cluster) mean as their nearest (L2) mean.

    Implements the intended rule ``argmin_c ||f(x_t) - mu_c||``; the released ``fm_selection_for_imagenet.py``
    indexes its distance array with the target sample index inside the loop over classes, which breaks it.

    Example:
        >>> src = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]]); ids = np.array([0, 0, 1])
        >>> feature_mapping_counts(src, ids, np.array([[0.0, 0.1], [4.0, 4.0], [0.2, 0.0]])).tolist()
        [2, 1]
    """
    k = int(source_ids.max()) + 1 if num_source_classes is None else num_source_classes
    means = np.zeros((k, source_feats.shape[1]))
    sizes = np.bincount(source_ids, minlength=k)
    np.add.at(means, source_ids, source_feats)
    means = means / np.maximum(sizes, 1)[:, None]
    t = np.asarray(target_feats, dtype=np.float64)
    d = (t ** 2).sum(1)[:, None] + (means ** 2).sum(1)[None, :] - 2 * t @ means.T
    d[:, sizes == 0] = np.inf
    return np.bincount(d.argmin(1), minlength=k)


def top_classes(counts: np.ndarray, class_fraction: float, tie_break: Optional[np.ndarray] = None) -> np.ndarray:
    """The ``round(class_fraction * len(counts))`` most frequent classes, sorted. Ties (classes with equal
    counts, zero votes included) go to the larger ``tie_break`` (e.g. summed probabilities), then the lower id.

    Example:
        >>> top_classes(np.array([5, 0, 9, 1]), 0.5).tolist()
        [0, 2]
        >>> top_classes(np.array([0, 3, 0, 0]), 0.5, tie_break=np.array([0.1, 2.0, 0.2, 0.7])).tolist()
        [1, 3]
    """
    k = max(1, int(round(class_fraction * len(counts))))
    counts = np.asarray(counts, dtype=np.float64)
    second = np.zeros_like(counts) if tie_break is None else np.asarray(tie_break, dtype=np.float64)
    return np.sort(np.lexsort((np.arange(len(counts)), -second, -counts))[:k])


def _flag_unvoted(counts: np.ndarray, kept: np.ndarray, on_unvoted: str, what: str) -> int:
    """Number of kept classes that no target sample voted for; warns or raises per ``on_unvoted``."""
    n = int((np.asarray(counts)[kept] == 0).sum())
    if n and on_unvoted != "ignore":
        msg = (f"DP4TL keeps {len(kept)} source classes but only {int((np.asarray(counts) > 0).sum())} received a "
               f"target vote; {n} are filled by {what}. Lower `class_fraction` or use a surrogate that "
               "recognises the target.")
        if on_unvoted == "error":
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=3)
    return n


def _class_scores(ids: np.ndarray, counts: np.ndarray, kept: np.ndarray) -> np.ndarray:
    score = counts[ids].astype(np.float64)
    score[~np.isin(ids, kept)] = -np.inf
    return score


class _DP4TLBase(Scorer):
    supports_class_balance = False

    def _check(self, class_fraction: float, seed: int) -> None:
        check_fraction("class_fraction", class_fraction, allow_zero=False)  # the paper keeps 0.2-0.6
        check_seed(seed)

    def select(self, scores: Scores, data: ScoringData, n_keep: Optional[int], class_balanced: bool = False) -> np.ndarray:
        if class_balanced:
            raise ValueError("DP4TL keeps whole source classes; use class_balanced=False.")
        kept = np.flatnonzero(np.isfinite(scores["score"]))
        if n_keep is not None and n_keep != len(kept):
            raise ValueError(f"DP4TL keeps whole classes ({len(kept)} samples with class_fraction="
                             f"{self.class_fraction}); set `keep: null` and choose `class_fraction` instead.")
        return kept


class DP4TLLabelMapping(_DP4TLBase):
    """DP4TL label mapping (LM) for supervised pretraining (Zhang et al., NeurIPS 2023;
    github.com/OPTML-Group/DP4TL ``lm_selection_for_imagenet.py``).

    A cheap surrogate source classifier predicts a source class for every *target* training input; the
    source classes predicted most often are kept (``class_fraction`` of them) and every sample of the other
    classes is dropped. Classes with equal counts (in particular classes no target sample voted for, which fill
    the set when ``class_fraction`` asks for more classes than received votes) are ordered by the surrogate's
    summed softmax probability over the target; ``on_unvoted`` says what happens when that filling is needed
    (the official script orders such ties arbitrarily). The kept pool then pretrains the model that is fine-tuned on the target. The paper
    prunes 40-80% of ImageNet's classes without losing downstream accuracy, a 2-5x pretraining speed-up.

    Use with ``FilteredDataModule(keep=None, min_per_class=0)``: whole classes are meant to disappear.

    Args:
        target: the downstream task's training inputs (a Dataset, a tensor or a LightningDataModule), same
            input shape as the source.
        surrogate: the surrogate source classifier (``None`` = a small CNN; a timm name; an ``nn.Module``).
        surrogate_checkpoint: weights of an already trained surrogate (then ``surrogate_epochs=0``).
        surrogate_epochs: epochs to train the surrogate on the source pool first (the paper: a ResNet-18,
            16 epochs on ImageNet), through Lightning Fabric on ``accelerator``.
        class_fraction: share of the source classes kept.
        lr: surrogate Adam learning rate.
        batch_size: surrogate training batch size.
        seed: surrogate seed (the caller's random state is untouched).
        progress: show progress bars.
        accelerator: where the surrogate trains (``"auto"``, ``"cpu"``, ``"gpu"``, ...).
        on_unvoted: when more classes are kept than received a target vote: ``"warn"``, ``"error"`` or
            ``"ignore"`` (the scores always report ``unvoted_kept``).

    Example:
        >>> import torch
        >>> src = ScoringData.from_tensors(torch.randn(40, 1, 8, 8), torch.arange(40) % 4)
        >>> s = DP4TLLabelMapping(target=torch.randn(10, 1, 8, 8), surrogate_epochs=1, class_fraction=0.5,
        ...                       progress=False, on_unvoted="ignore")
        >>> len(s.score(src)["kept_classes"])
        2
    """

    def __init__(
        self,
        target: Any,
        surrogate: Union[nn.Module, str, None] = None,
        surrogate_checkpoint: Optional[str] = None,
        surrogate_epochs: NonNegativeInt = 1,
        class_fraction: UnitIntervalLeftOpen = 0.5,
        lr: PositiveFloat = 1e-3,
        batch_size: PositiveInt = 128,
        seed: NonNegativeInt = 0,
        progress: bool = True,
        accelerator: str = "auto",
        on_unvoted: Literal["error", "warn", "ignore"] = "warn",
    ) -> None:
        self._check(class_fraction, seed)
        check_choice("on_unvoted", on_unvoted, ("error", "warn", "ignore"))
        check_training_args(surrogate_epochs, lr, batch_size, seed, epochs_name="surrogate_epochs", min_epochs=0)
        if surrogate_epochs == 0 and surrogate_checkpoint is None and not isinstance(surrogate, nn.Module):
            raise ValueError("With `surrogate_epochs=0` the surrogate must already be trained: pass an "
                             "nn.Module or a `surrogate_checkpoint`.")
        self.target, self.surrogate, self.surrogate_checkpoint = target, surrogate, surrogate_checkpoint
        self.surrogate_epochs, self.class_fraction = surrogate_epochs, class_fraction
        self.lr, self.batch_size, self.seed, self.progress = lr, batch_size, seed, progress
        self.accelerator, self.on_unvoted = accelerator, on_unvoted
        self.surrogate_: Optional[nn.Module] = None

    def config(self) -> dict:
        cfg = super().config()
        cfg["target"] = {"inputs_sha1": hashlib.sha1(
            dataset_inputs(as_dataset(self.target, "target")).numpy().tobytes()).hexdigest()}
        return cfg

    def fit_surrogate(self, data: ScoringData) -> nn.Module:
        x0 = data.dataset[0][0]
        in_chans = x0.shape[0] if x0.dim() == 3 else 1
        if isinstance(self.surrogate, nn.Module) and self.surrogate_epochs == 0:
            net = self.surrogate
        else:
            net = build_model(self.surrogate, data.num_classes, in_chans, self.seed)
        if self.surrogate_checkpoint is not None:
            net.load_state_dict(read_state_dict(self.surrogate_checkpoint, net.state_dict().keys(),
                                                "Surrogate checkpoint"))
        if self.surrogate_epochs > 0:
            train_classifier(net, data.dataset, self.surrogate_epochs, lr=self.lr, batch_size=self.batch_size,
                             seed=self.seed, progress=self.progress, desc="DP4TL surrogate",
                             accelerator=self.accelerator)
        self.surrogate_ = net.eval()
        return self.surrogate_

    def score(self, data: ScoringData) -> Scores:
        net = self.fit_surrogate(data)
        counts, probs = label_mapping_votes(net, dataset_inputs(as_dataset(self.target, "target")), data.num_classes)
        kept = top_classes(counts, self.class_fraction, tie_break=probs)
        unvoted = _flag_unvoted(counts, kept, self.on_unvoted, "summed probability")
        return {"score": _class_scores(data.labels, counts, kept), "class_counts": counts, "class_prob_sums": probs,
                "kept_classes": kept, "unvoted_kept": np.array(unvoted)}


class DP4TLFeatureMapping(_DP4TLBase):
    """DP4TL feature mapping (FM) for self-supervised pretraining, where the source has no labels
    (Zhang et al., NeurIPS 2023; ``fm_selection_for_imagenet.py``, with its indexing bug fixed).

    Source "classes" are k-means clusters of surrogate features (or the labels, ``num_clusters=None``); each
    target sample votes for the source class whose mean feature is nearest (L2); the most-voted
    ``class_fraction`` of the source classes are kept.

    Args:
        target: the downstream task's training inputs (Dataset, tensor or LightningDataModule).
        embedder: the surrogate feature extractor (default: the pixels).
        num_clusters: number of k-means pseudo-classes; ``None`` uses the source labels.
        class_fraction: share of source classes (clusters) kept.
        seed: k-means seed.
    """

    def __init__(self, target: Any, embedder: Optional[Embedder] = None, num_clusters: Optional[PositiveInt] = None,
                 class_fraction: UnitIntervalLeftOpen = 0.5, seed: NonNegativeInt = 0) -> None:
        self._check(class_fraction, seed)
        if num_clusters is not None:
            check_number("num_clusters", num_clusters, low=2, integer=True)
        self.target, self.embedder = target, embedder if embedder is not None else Embedder()
        self.num_clusters, self.class_fraction, self.seed = num_clusters, class_fraction, seed

    config = DP4TLLabelMapping.config

    def score(self, data: ScoringData) -> Scores:
        src = self.embedder.embed(data)
        tgt = self.embedder.embed(as_dataset(self.target, "target"))
        if self.num_clusters is None:
            ids, k = data.labels, data.num_classes
        else:
            ids, _ = spherical_kmeans(src, self.num_clusters, seed=self.seed)
            k = self.num_clusters
        counts = feature_mapping_counts(src, ids, tgt, k)
        kept = top_classes(counts, self.class_fraction)
        return {"score": _class_scores(ids, counts, kept), "class_counts": counts, "kept_classes": kept,
                "source_class": ids}
