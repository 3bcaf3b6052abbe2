r"""What an AdaMerging run leaves: its per-step history, the collapse diagnosis, the coefficients file and the plot.

Used by :func:`~lightning_ext.merging.ada_merging.fit_ada_merging` and both Lightning wrappers
(:class:`~lightning_ext.merging.module.AdaMerging`, :class:`~lightning_ext.merging.callback.ModelMerging`).
Files are written atomically (:mod:`lightning_ext.core.io`), figures through :mod:`lightning_ext.core.plotting`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lightning_ext.core.checkpoints import load_checkpoint
from lightning_ext.core.io import atomic_torch_save
from lightning_ext.core.plotting import new_figure, save_figure
from lightning_ext.core.checkpoints import load_error_summary

__all__ = ["AdaMergingHistory", "check_output_paths", "diagnose_agreement", "diagnose_collapse", "load_coefficients",
           "plot_coefficients", "prediction_agreement", "save_coefficients"]


@dataclass
class AdaMergingHistory:
    """What :func:`fit_ada_merging` records per step, to see when and why a run collapses.

    ``entropy[s][k]`` and ``dominant_share[s][k]`` are task ``k``'s mean entropy and the share of its batch
    predicted as its most frequent class at step ``s``; ``coefficients`` holds snapshots (every ``record_every``
    steps and the last) of the clamped coefficients with their ``coefficient_steps``; ``at_bounds`` is the share of
    coefficients at either clamp bound at each step.
    """

    task_names: list[str]
    steps: list[int] = field(default_factory=list)
    entropy: list[list[float]] = field(default_factory=list)
    dominant_share: list[list[float]] = field(default_factory=list)
    at_bounds: list[float] = field(default_factory=list)
    coefficient_steps: list[int] = field(default_factory=list)
    coefficients: list[list[list[float]]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("task_names", "steps", "entropy", "dominant_share", "at_bounds",
                                              "coefficient_steps", "coefficients")}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "AdaMergingHistory":
        return cls(**{k: copy.deepcopy(v) for k, v in state.items()})

    def record(self, step: int, entropies: Sequence[float], shares: Sequence[float], coefficients: Tensor,
               clamp_range: tuple[float, float], snapshot: bool) -> None:
        lam = coefficients.detach().float().cpu()
        lo, hi = clamp_range
        self.steps.append(int(step))
        self.entropy.append([float(e) for e in entropies])
        self.dominant_share.append([float(s) for s in shares])
        self.at_bounds.append(float(((lam <= lo + 1e-6) | (lam >= hi - 1e-6)).float().mean()))
        if snapshot:
            self.coefficient_steps.append(int(step))
            self.coefficients.append(lam.tolist())



def diagnose_collapse(history: AdaMergingHistory, share_threshold: float = 0.9, bounds_threshold: float = 0.5) -> list[str]:
    """Messages about signs of collapse in a run (empty when none):

    - a task whose batches end up predicted as one class (dominant-class share >= ``share_threshold`` over the
      last tenth of the steps) although they were not at the start: entropy minimisation made the merged model
      confidently predict a single class;
    - a task whose entropy fell to almost 0 (below 0.05, from above) while another's rose (by 10 % and 0.05);
    - many coefficients (share >= ``bounds_threshold``) stuck at a clamp bound, where they get no gradient.
    """
    if not history.steps:
        return []
    messages = []
    n = len(history.steps)
    tail = max(1, n // 10)
    for k, name in enumerate(history.task_names):
        start = history.dominant_share[0][k]
        end = sum(row[k] for row in history.dominant_share[-tail:]) / tail
        if end >= share_threshold and start < share_threshold:
            step = next((history.steps[i] for i in range(n) if history.dominant_share[i][k] >= share_threshold), history.steps[-1])
            messages.append(
                f"{name}: predictions collapsed to one class (dominant-class share {start:.2f} at the start, "
                f"{end:.2f} at the end, first above {share_threshold} at step {step})."
            )
    first, last = history.entropy[0], [sum(row[k] for row in history.entropy[-tail:]) / tail for k in range(len(history.task_names))]
    low = [k for k, (e, f) in enumerate(zip(last, first)) if e < 0.05 and f >= 0.05]
    rose = [k for k, (e, f) in enumerate(zip(last, first)) if k not in low and e > f + max(0.05, 0.1 * f)]
    if low and rose:
        messages.append(
            f"entropy went to ~0 on {[history.task_names[k] for k in low]} while it rose on "
            f"{[history.task_names[k] for k in rose]}: the coefficients favour some tasks over others."
        )
    if history.at_bounds[-1] >= bounds_threshold:
        step = next(history.steps[i] for i in range(n) if history.at_bounds[i] >= bounds_threshold)
        messages.append(
            f"{history.at_bounds[-1]:.0%} of the coefficients are at a clamp bound (since step {step}); clamped "
            "coefficients get no gradient."
        )
    return messages



def prediction_agreement(merged_logits: Tensor, reference_logits: Tensor) -> float:
    """Share of inputs on which the merged model predicts the same class as a reference (the task's own fine-tuned
    model), from the two models' logits on the same unlabelled inputs. Needs no label, so it is available at merge
    time; unlike the entropy it sees a merged model that is confident but wrong.

    Example:
        >>> prediction_agreement(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        0.5
    """
    if merged_logits.dim() != 2 or merged_logits.shape != reference_logits.shape:
        raise ValueError(f"Agreement needs two (batch, classes) logit tensors of one shape, got "
                         f"{tuple(merged_logits.shape)} and {tuple(reference_logits.shape)}.")
    if merged_logits.shape[0] == 0:
        raise ValueError("Agreement needs at least one input; the logits are empty.")
    return float((merged_logits.argmax(dim=1) == reference_logits.argmax(dim=1)).float().mean())


def diagnose_agreement(agreement: Mapping[str, float], entropy: Optional[Mapping[str, float]] = None,
                       threshold: float = 0.7, low_entropy: float = 0.3) -> list[str]:
    """Messages about tasks whose merged model disagrees with the task's own fine-tuned model (empty when none).

    ``agreement[task]`` is :func:`prediction_agreement` on that task's unlabelled inputs; a task below ``threshold``
    is flagged. With ``entropy[task]`` (the merged model's mean prediction entropy on the same inputs, in nats) a
    flagged task below ``low_entropy`` is called a *confident-but-wrong* collapse: entropy minimisation has made
    the merged model sure of answers its fine-tuned model does not give, which :func:`diagnose_collapse` (entropy,
    dominant class, bounds) cannot see.

    Example:
        >>> diagnose_agreement({"a": 0.95, "b": 0.4}, {"a": 0.2, "b": 0.01})  # doctest: +ELLIPSIS
        ['b: the merged model agrees with its fine-tuned model on 40% of the inputs (< 70%) at entropy 0.010: ...']
    """
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"`threshold` must be in (0, 1], got {threshold}.")
    messages = []
    for name, share in agreement.items():
        if share >= threshold:
            continue
        h = None if entropy is None else entropy.get(name)
        if h is not None and h < low_entropy:
            messages.append(f"{name}: the merged model agrees with its fine-tuned model on {share:.0%} of the inputs "
                            f"(< {threshold:.0%}) at entropy {h:.3f}: a confident-but-wrong collapse.")
        else:
            messages.append(f"{name}: the merged model agrees with its fine-tuned model on {share:.0%} of the inputs "
                            f"(< {threshold:.0%}).")
    return messages


def save_coefficients(path: Union[str, Path], coefficients: Tensor, layer_names: Sequence[str],
                      task_names: Sequence[str], granularity: str) -> Path:
    """Save learned (clamped) coefficients (atomically) so :func:`~lightning_ext.merging.ada_merging.apply_coefficients`
    or the ``ModelMerging`` callback can reuse them."""
    return atomic_torch_save({"coefficients": coefficients.detach().float().cpu(), "layer_names": list(layer_names),
                              "task_names": list(task_names), "granularity": granularity}, path)


def load_coefficients(path: Union[str, Path]) -> dict[str, Any]:
    """Read a file written by :func:`save_coefficients` (``weights_only=True``, through
    :func:`lightning_ext.core.checkpoints.load_checkpoint`); non-finite coefficients are refused."""
    try:
        data = load_checkpoint(path, "Coefficients file", "coefficients")
    except ValueError as err:
        if err.__cause__ is None:
            raise
        raise ValueError(f"Coefficients file {path} cannot be read with torch.load(weights_only=True): "
                         f"{load_error_summary(err.__cause__)}; save the coefficients again.") from err.__cause__
    if not {"coefficients", "layer_names", "task_names", "granularity"} <= data.keys():
        raise ValueError(f"{path} is not a coefficients file (expected coefficients, layer_names, task_names, granularity).")
    if not isinstance(data["coefficients"], Tensor) or not bool(torch.isfinite(data["coefficients"]).all()):
        raise ValueError(f"Coefficients file {path} holds non-finite (NaN or inf) coefficients; learn them again.")
    return data


def plot_coefficients(
    path: Union[str, Path],
    coefficients: Tensor,
    layer_names: Sequence[str],
    task_names: Sequence[str],
    history: Optional[AdaMergingHistory] = None,
    title: str = "AdaMerging coefficients",
) -> Path:
    """Save a PNG: the learned coefficients per layer and task (a heatmap, or bars when task-wise) and, with a
    ``history``, the entropy per task and the mean coefficient per task over the steps."""
    lam = coefficients.detach().float().cpu()
    panels = 3 if history is not None and history.steps else 1
    fig, axes = new_figure(1, panels, figsize=(5.5 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    if lam.shape[0] == 1:
        ax.bar(range(len(task_names)), lam[0].numpy())
        ax.set_xticks(range(len(task_names)), task_names, rotation=30, ha="right")
        ax.set_ylabel("coefficient")
        ax.set_title("task-wise coefficients")
    else:
        image = ax.imshow(lam.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(task_names)), task_names, rotation=30, ha="right")
        step = max(1, len(layer_names) // 20)
        ax.set_yticks(range(0, len(layer_names), step), [layer_names[i] for i in range(0, len(layer_names), step)], fontsize=6)
        ax.set_title("layer-wise coefficients (rows: tensors)")
        fig.colorbar(image, ax=ax)
    if panels == 3:
        assert history is not None
        ax = axes[0][1]
        for k, name in enumerate(history.task_names):
            ax.plot(history.steps, [row[k] for row in history.entropy], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("mean entropy")
        ax.set_title("entropy per task")
        ax.legend(fontsize=7)
        ax = axes[0][2]
        snaps = torch.tensor(history.coefficients)  # (snapshots, layers, tasks)
        for k, name in enumerate(history.task_names):
            mean = snaps[:, :, k].mean(1).numpy()
            ax.plot(history.coefficient_steps, mean, label=name)
            ax.fill_between(history.coefficient_steps, snaps[:, :, k].min(1).values.numpy(),
                            snaps[:, :, k].max(1).values.numpy(), alpha=0.15)
        ax.set_xlabel("step")
        ax.set_ylabel("coefficient (mean, min-max band)")
        ax.set_title("coefficients over steps")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def check_output_paths(**paths: Optional[str]) -> None:
    """Refuse ``""`` for an output path: ``None`` (YAML ``null``) disables an output."""
    for name, value in paths.items():
        if value is not None and not str(value):
            raise ValueError(f"{name} is empty; give a file name (relative to the run's log directory) or null to disable it.")
