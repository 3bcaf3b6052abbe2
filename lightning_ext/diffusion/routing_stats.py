"""``ExpertRoutingStats``: what a sparse mixture of experts routes by (timestep, class, position) during validation."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_ext.core.paths import check_path_argument, output_path
from lightning_ext.core.validation import NonNegativeInt, PositiveInt, check_number, check_positive_int
from lightning_ext.diffusion.sparse_moe import SparseMoE

__all__ = ["ExpertRoutingStats", "routing_mutual_information"]


def routing_mutual_information(counts: torch.Tensor) -> float:
    r"""Mutual information (nats) between a condition and the chosen expert from a ``(conditions, experts)``
    table of assignment counts: :math:`I = \sum_{a,e} p(a,e) \log \frac{p(a,e)}{p(a)p(e)}`.

    Example:
        >>> round(routing_mutual_information(torch.tensor([[5.0, 0.0], [0.0, 5.0]])), 4)  # log 2
        0.6931
        >>> routing_mutual_information(torch.ones(3, 4))
        0.0
    """
    p = counts.double() / counts.sum().clamp_min(1)
    pa, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    return float((p[nz] * (p[nz] / (pa * pe).expand_as(p)[nz]).log()).sum().clamp_min(0))


class ExpertRoutingStats(Callback):
    r"""Measure what a sparse mixture of experts routes by: timestep, class and patch position, per MoE layer.

    DiT-MoE ("Scaling Diffusion Transformers to 16 Billion Parameters", arXiv 2407.11633; reference analysis
    https://github.com/feizc/DiT-MoE ``analysis/heatmap_{class,patch,step}.py``) reports that expert selection
    depends on the denoising timestep and spatial position, not on the class. During validation this callback
    counts, for every :class:`~lightning_ext.diffusion.sparse_moe.SparseMoE` in the module, the (token, slot)
    assignments per expert by timestep bucket (``timestep_bins`` equal buckets of ``[0, T)``), by class and by
    token position, and at the epoch's end logs per layer ``l``:

    - ``routing/mi_timestep_l{l}``, ``routing/mi_class_l{l}``, ``routing/mi_position_l{l}``: the mutual information
      (nats, :func:`routing_mutual_information`) between the expert and each condition;
    - ``routing/load_cv_l{l}``: the coefficient of variation of the experts' counts (0: perfectly balanced);
    - ``routing/min_share_l{l}``: the smallest expert's share of assignments.

    Counts are summed across ranks. Every ``plot_every_n_epochs`` epochs a PNG of the expert shares by timestep
    bucket and by class (one row per layer) is saved under ``plot_dir``. The module must expose the batch's
    timesteps and labels as ``last_timesteps``/``last_labels`` (as
    :class:`~lightning_ext.diffusion.module.DiffusionModule` does); the history of measurements (``history``) is
    saved in checkpoints.

    Args:
        timestep_bins: timestep buckets.
        plot_every_n_epochs: how often to save the plot (0: never).
        plot_dir: where (relative to ``trainer.log_dir``; ``None`` disables the files).

    Example:
        >>> cb = ExpertRoutingStats(timestep_bins=10)
        >>> cb.timestep_bins
        10
    """

    def __init__(self, timestep_bins: PositiveInt = 10, plot_every_n_epochs: NonNegativeInt = 1,
                 plot_dir: Optional[str] = "routing") -> None:
        super().__init__()
        check_positive_int("timestep_bins", timestep_bins)
        check_number("plot_every_n_epochs", plot_every_n_epochs, low=0, integer=True)
        check_path_argument("plot_dir", plot_dir)
        self.timestep_bins, self.plot_every, self.plot_dir = timestep_bins, plot_every_n_epochs, plot_dir
        self.layers: list[SparseMoE] = []
        self.counts: dict[str, list[torch.Tensor]] = {}
        self.history: list[dict[str, Any]] = []

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Find the MoE layers; refuse a module without them or without timesteps."""
        self.layers = [m for m in pl_module.modules() if isinstance(m, SparseMoE)]
        if not self.layers:
            raise ValueError("ExpertRoutingStats found no SparseMoE layer in the module; use a DiTMoE denoiser with "
                             "mlp='moe' or remove the callback.")
        if not hasattr(pl_module, "last_timesteps") or not hasattr(pl_module, "num_train_timesteps"):
            raise ValueError("ExpertRoutingStats needs a module exposing last_timesteps, last_labels and "
                             "num_train_timesteps (DiffusionModule does).")

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Reset the counts."""
        self.counts = {}

    def _add(self, key: str, layer: int, condition: torch.Tensor, expert: torch.Tensor, rows: int,
             experts: int) -> None:
        tables = self.counts.setdefault(key, [torch.zeros(rows, experts, dtype=torch.float64)
                                              for _ in self.layers])
        flat = (condition * experts + expert).reshape(-1).cpu()
        tables[layer] += torch.bincount(flat, minlength=rows * experts).view(rows, experts).double()

    @override
    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Count this batch's assignments by timestep bucket, class and position."""
        if trainer.sanity_checking:
            return
        t, y = pl_module.last_timesteps, getattr(pl_module, "last_labels", None)
        if t is None:
            return
        bucket = (t.long() * self.timestep_bins // pl_module.num_train_timesteps).clamp(0, self.timestep_bins - 1)
        for i, layer in enumerate(self.layers):
            idx = layer.last_routing  # (B, N, k)
            if idx is None or idx.dim() != 3 or idx.shape[0] != t.shape[0]:
                continue
            b, n, k = idx.shape
            e = layer.num_experts
            self._add("timestep", i, bucket.view(b, 1, 1).expand(b, n, k), idx, self.timestep_bins, e)
            self._add("position", i, torch.arange(n, device=idx.device).view(1, n, 1).expand(b, n, k), idx, n, e)
            if y is not None:
                classes = int(getattr(pl_module, "num_classes", 0)) + 1  # the "no class" label too
                self._add("class", i, y.long().view(b, 1, 1).expand(b, n, k), idx, classes, e)

    def summary(self) -> dict[str, float]:
        """The metrics of the counts so far (see the class docstring), by name."""
        out: dict[str, float] = {}
        for key, tables in self.counts.items():
            for i, table in enumerate(tables):
                out[f"routing/mi_{key}_l{i}"] = routing_mutual_information(table)
        for i, table in enumerate(self.counts.get("timestep", [])):
            load = table.sum(0)
            out[f"routing/load_cv_l{i}"] = float(load.std(unbiased=False) / load.mean().clamp_min(1e-12))
            out[f"routing/min_share_l{i}"] = float(load.min() / load.sum().clamp_min(1))
        return out

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sum counts across ranks, log the mutual information and balance, save the plot when due."""
        if trainer.sanity_checking or not self.counts:
            return
        for key, tables in self.counts.items():
            self.counts[key] = [trainer.strategy.reduce(t.to(pl_module.device), reduce_op="sum").cpu().double()
                                for t in tables]
        stats = self.summary()
        for name, value in stats.items():
            pl_module.log(name, value, sync_dist=False)
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **stats})
        if (self.plot_every and (trainer.current_epoch + 1) % self.plot_every == 0 and trainer.is_global_zero
                and self.plot_dir is not None and trainer.state.fn == "fit"):
            folder = output_path(trainer, self.plot_dir)
            if folder is not None:
                self.plot(folder / f"epoch_{trainer.current_epoch + 1:03d}.png")

    def plot(self, path: Any) -> Any:
        """Save expert shares by timestep bucket and by class, one row per MoE layer."""
        from lightning_ext.core.plotting import new_figure, save_figure

        keys = [k for k in ("timestep", "class") if k in self.counts]
        n = len(self.layers)
        fig, axes = new_figure(nrows=n, ncols=len(keys), figsize=(4.5 * len(keys), 2.6 * n), squeeze=False)
        for i in range(n):
            for j, key in enumerate(keys):
                table = self.counts[key][i]
                share = (table / table.sum(1, keepdim=True).clamp_min(1)).T.numpy()
                ax = axes[i][j]
                ax.imshow(share, aspect="auto", cmap="viridis")
                ax.set_title(f"layer {i}: expert share by {key} (MI {routing_mutual_information(table):.3f})",
                             fontsize=8)
                ax.set_xlabel(key + (" bucket (noisier ->)" if key == "timestep" else ""), fontsize=7)
                ax.set_ylabel("expert", fontsize=7)
        return save_figure(fig, path)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The measurement history."""
        return {"history": [dict(h) for h in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the measurement history."""
        self.history = [dict(h) for h in state_dict.get("history", [])]
