"""A SELECT-style harness (Feuer et al., "SELECT: A Large-Scale Benchmark of Data Curation Strategies for Image
Classification", NeurIPS 2024 D&B; github.com/jimmyxu123/SELECT): train one recipe on several curated subsets of
equal size and tabulate."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

__all__ = ["CurationResult", "compare_curations", "results_table"]


@dataclass
class CurationResult:
    """One (curation, seed) run: the kept subset's size and quality, the trained model's metrics."""

    curation: str
    seed: int
    num_kept: int
    metrics: dict[str, float] = field(default_factory=dict)
    fit_seconds: float = 0.0
    score_seconds: float = 0.0
    clean_precision: Optional[float] = None
    clean_recall: Optional[float] = None
    classes_kept: int = 0
    kept: Optional[np.ndarray] = field(default=None, repr=False)


def compare_curations(
    make_datamodule: Callable[[], Any],
    make_model: Callable[[int], Any],
    curations: dict[str, Any],
    keep: Union[float, int, None],
    seeds: Sequence[int] = (0,),
    trainer_kwargs: Optional[dict] = None,
    clean_mask: Optional[np.ndarray] = None,
    min_per_class: int = 1,
    equal_size: bool = True,
    cache_dir: Optional[str] = None,
    on_result: Optional[Callable[[CurationResult], None]] = None,
) -> list[CurationResult]:
    """Train ``make_model(seed)`` on each curated subset (``FilteredDataModule(make_datamodule(), scorer,
    keep)``) for every seed, then validate and test; SELECT's protocol of identical recipes on
    training sets of equal size. A curation given as ``None`` trains on the whole split (the reference).

    Args:
        make_datamodule: builds a fresh datamodule (the pool).
        make_model: builds a fresh LightningModule for a seed.
        curations: name -> Scorer (or ``None`` for all data).
        keep: the kept fraction or count, the same for every curation.
        seeds: training seeds (``seed_everything`` before each model).
        trainer_kwargs: Trainer arguments (default: CPU, 1 epoch, no logger or checkpoints).
        clean_mask: per-sample "truly clean" flags of the pool, when known: adds the precision and recall
            of clean samples in each subset.
        min_per_class: passed to FilteredDataModule.
        equal_size: refuse subsets of different sizes (the point of the comparison).
        cache_dir: score cache (default: a temporary directory), so each curation is scored once, not per seed.
        on_result: called after each run (e.g. to write a partial report).
    """
    from lightning.pytorch import Trainer, seed_everything

    from lightning_ext.curation.datamodule import FilteredDataModule

    kwargs = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    kwargs.update(trainer_kwargs or {})
    results, sizes = [], {}
    if cache_dir is None:  # score each curation once; the other seeds read the cache
        import tempfile

        cache_dir = tempfile.mkdtemp(prefix="select_scores_")
    for name, scorer in curations.items():
        for seed in seeds:
            base = make_datamodule()
            start = time.perf_counter()
            if scorer is None:
                dm = base
                dm.setup("fit")
                kept = np.arange(len(dm.train_dataloader().dataset))
            else:
                dm = FilteredDataModule(base, scorer, keep=keep, min_per_class=min_per_class, cache_dir=cache_dir)
                dm.setup("fit")
                kept = dm.kept_indices
            score_seconds = time.perf_counter() - start
            if scorer is not None:
                sizes[name] = len(kept)
                if equal_size and len(set(sizes.values())) > 1:
                    raise ValueError(f"Curated subsets differ in size ({sizes}); SELECT compares equal sizes. "
                                     "Give `keep` as a count/fraction every scorer honours, or equal_size=False.")
            seed_everything(seed, workers=True)
            model = make_model(seed)
            trainer = Trainer(**kwargs)
            start = time.perf_counter()
            trainer.fit(model, datamodule=dm)
            fit_seconds = time.perf_counter() - start
            metrics = {}
            for out in (trainer.validate(model, datamodule=dm, verbose=False),
                        trainer.test(model, datamodule=dm, verbose=False)):
                metrics.update({k: float(v) for k, v in out[0].items()})
            res = CurationResult(name, seed, len(kept), metrics, fit_seconds, score_seconds, kept=np.asarray(kept))
            if clean_mask is not None:
                clean = np.asarray(clean_mask, dtype=bool)
                res.clean_precision = float(clean[kept].mean())
                res.clean_recall = float(clean[kept].sum() / max(1, clean.sum()))
            ds = dm.train_dataloader().dataset
            from lightning_ext.curation.base import labels_of

            res.classes_kept = int(len(np.unique(labels_of(ds))))
            results.append(res)
            if on_result is not None:
                on_result(res)
    return results


def _ms(values: list[float], digits: int, scale: float = 1.0) -> str:
    values = [v * scale for v in values]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def results_table(results: list[CurationResult], metrics: Sequence[str] = ("val_acc", "test_acc")) -> str:
    """A markdown table: one row per curation, mean ± std over seeds (accuracies in %)."""
    names = list(dict.fromkeys(r.curation for r in results))
    has_clean = any(r.clean_precision is not None for r in results)
    head = ["curation", "kept", *metrics] + (["clean precision", "clean recall"] if has_clean else []) + ["fit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        rs = [r for r in results if r.curation == n]
        row = [n, str(rs[0].num_kept)]
        for m in metrics:
            scale = 100.0 if m.endswith("acc") else 1.0
            row.append(_ms([r.metrics[m] for r in rs if m in r.metrics], 2, scale))
        if has_clean:
            row += [_ms([r.clean_precision for r in rs if r.clean_precision is not None], 3),
                    _ms([r.clean_recall for r in rs if r.clean_recall is not None], 3)]
        row.append(_ms([r.fit_seconds for r in rs], 1))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
