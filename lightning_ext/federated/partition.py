"""Seeded partitioners of a labelled dataset across federated clients: IID and Dirichlet(alpha) label skew.

Pure numpy, no Flower needed. The semantics follow flwr-datasets' ``IidPartitioner`` and
``DirichletPartitioner`` (per class, a Dirichlet(alpha) draw over clients splits that class's samples;
re-drawn until every client holds at least ``min_partition_size`` samples), without its ``datasets``/pyarrow
dependency.

Example:
    >>> import numpy as np
    >>> labels = np.repeat(np.arange(10), 50)
    >>> parts = dirichlet_partition(labels, num_partitions=5, alpha=0.3, seed=0)
    >>> sorted(np.concatenate(parts).tolist()) == list(range(500))
    True
    >>> [len(p) for p in iid_partition(labels, 3, seed=0)]
    [167, 167, 166]
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from lightning_ext.core.validation import check_number, check_positive_int

Partitioner = Literal["iid", "dirichlet"]


def _check(labels: np.ndarray, num_partitions: int, min_partition_size: int) -> np.ndarray:
    labels = np.asarray(labels)
    check_positive_int("num_partitions", num_partitions)
    check_number("min_partition_size", min_partition_size, low=0, integer=True)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}.")
    if num_partitions > len(labels):
        raise ValueError(f"num_partitions={num_partitions} is more than the {len(labels)} samples to partition; "
                         f"use at most {len(labels)} clients.")
    if min_partition_size * num_partitions > len(labels):
        raise ValueError(f"min_partition_size={min_partition_size} x {num_partitions} clients exceeds the "
                         f"{len(labels)} samples; lower min_partition_size or num_partitions.")
    return labels


def iid_partition(labels: np.ndarray, num_partitions: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle the indices with ``seed`` and cut them into ``num_partitions`` near-equal parts (sorted indices)."""
    labels = _check(labels, num_partitions, 1)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(perm, num_partitions)]


def dirichlet_partition(labels: np.ndarray, num_partitions: int, alpha: float, seed: int = 0,
                        min_partition_size: int = 1, max_tries: int = 1000) -> list[np.ndarray]:
    """Label-skewed partition: each class's samples are split across clients by a Dirichlet(``alpha``) draw.

    Smaller ``alpha`` means more skew (alpha -> infinity approaches IID). Draws repeat (same seeded generator)
    until every client holds at least ``min_partition_size`` samples; after ``max_tries`` draws it raises.
    """
    labels = _check(labels, num_partitions, min_partition_size)
    check_number("alpha (the Dirichlet concentration; e.g. 0.5)", alpha, low=0, low_open=True)
    check_positive_int("max_tries", max_tries)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_partitions, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for i, chunk in enumerate(np.split(members, cuts)):
                parts[i].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= max(min_partition_size, 1):
            return out
    raise ValueError(f"dirichlet_partition: no draw in {max_tries} gave every one of {num_partitions} clients "
                     f"{max(min_partition_size, 1)}+ samples at alpha={alpha}; raise alpha or lower num_partitions.")


def partition(labels: np.ndarray, num_partitions: int, partitioner: Partitioner = "iid", alpha: float = 0.5,
              seed: int = 0, min_partition_size: int = 1) -> list[np.ndarray]:
    """Dispatch to :func:`iid_partition` or :func:`dirichlet_partition` by name."""
    if partitioner == "iid":
        return iid_partition(labels, num_partitions, seed)
    if partitioner == "dirichlet":
        return dirichlet_partition(labels, num_partitions, alpha, seed, min_partition_size)
    raise ValueError(f"partitioner={partitioner!r} is unknown; choose 'iid' or 'dirichlet'.")
