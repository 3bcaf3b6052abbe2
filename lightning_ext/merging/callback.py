"""``ModelMerging``: merge fine-tuned checkpoints of your own LightningModule into it (fine-tune, then merge).

The functional core is :mod:`lightning_ext.merging` (state-dict functions and
:class:`~lightning_ext.merging.ada_merging.AdaMergingModel`); this callback only decides when to merge, which
weights are the base and which models take part, and loads the result into the module.
"""

from __future__ import annotations

import glob
import math
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_ext.merging.ada_merging import (
    GRANULARITIES,
    AdaMergingHistory,
    AdaMergingModel,
    apply_coefficients,
    diagnose_collapse,
    fit_ada_merging,
    load_coefficients,
    plot_coefficients,
)
from lightning_ext.merging.task_arithmetic import task_arithmetic_merge
from lightning_ext.merging.task_vectors import (
    DEFAULT_MAX_TASK_VECTOR_RATIO,
    FOREIGN_BASE_ACTIONS,
    check_same_architecture,
    is_head_key,
    read_state_dict,
    simple_average,
)
from lightning_ext.merging.ties_merging import MERGE_MODES, ties_merging_merge
from lightning_ext.merging.module import detect_head_keys, resolve_path

METHODS = ("average", "task_arithmetic", "ties", "coefficients", "ada_merging")
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")
_GLOB_CHARS = set("*?[")


def _fingerprint(state: dict[str, Tensor], keys: list[str]) -> list[float]:
    out = []
    for k in keys:
        v = state[k].detach().double()
        out += [float(v.sum()), float(v.pow(2).sum())]
    return out


def _output_path(path: str, trainer: Trainer) -> Optional[Path]:
    """``""`` -> None; a relative path is placed under the trainer's ``default_root_dir``."""
    if not path:
        return None
    file = Path(path).expanduser()
    return file if file.is_absolute() else Path(trainer.default_root_dir) / file


def _same(a: Optional[list[float]], b: Optional[list[float]]) -> bool:
    if a is None or b is None or len(a) != len(b):
        return False
    return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6) for x, y in zip(a, b))


class ModelMerging(Callback):
    r"""Merges fine-tuned checkpoints of your own LightningModule into it: Task Arithmetic, TIES or learned coefficients.

    Papers: Ilharco et al., *Editing Models with Task Arithmetic*, ICLR 2023, arXiv:2212.04089
    (https://github.com/mlfoundations/task_vectors); Yadav et al., *TIES-Merging*, NeurIPS 2023,
    arXiv:2306.01708 (https://github.com/prateeky2806/ties-merging); Yang et al., *AdaMerging*, ICLR 2024,
    arXiv:2310.02575 (https://github.com/EnnengYang/AdaMerging).

    **Fine-tune, then merge, in one run.** The module's weights when ``fit`` starts are the base
    :math:`\theta_0` (or give ``base_checkpoint``); ``fit`` fine-tunes them on this run's task; at the end of
    ``fit`` the callback merges this run's fine-tuned weights (``include_current``) with ``checkpoints``, the
    other tasks' fine-tuned models (state dicts or Lightning checkpoints of the same LightningModule, read
    one at a time with ``weights_only=True``; glob patterns allowed; relative paths are under the trainer's
    ``default_root_dir``), and loads the merged weights into the module. Task-specific heads (``head_keys``; default: the module's last ``nn.Linear``) are never merged:
    the module keeps its own head, so evaluating it afterwards measures the merged body on this run's task.
    ``save_finetuned`` keeps this run's fine-tuned weights (taken before merging) for later runs, e.g. as
    ``checkpoints: [tasks/*.pt]``; ``save_merged`` writes the merged state dict. ``ModelCheckpoint`` files
    keep the fine-tuned (unmerged) weights. In ``validate``/``test``/``predict`` runs (no ``fit``), the merge
    happens when the loop starts (on the weights restored from ``ckpt_path``, if any), and needs
    ``base_checkpoint``. A module that already holds this callback's merged weights is not merged twice.

    Methods (``method``): ``"average"`` (uniform weight average), ``"task_arithmetic"``
    (:math:`\theta_0 + \lambda\sum_k\tau_k`, ``scaling`` default 0.3), ``"ties"`` (TIES-Merging, keep the top
    ``ties_k`` of each task vector, ``scaling`` default 1.0), ``"coefficients"`` (task- or layer-wise
    coefficients from a file saved by the :class:`~lightning_ext.merging.module.AdaMerging` module, for
    the models in the order ``[current, *checkpoints]``), ``"ada_merging"`` (learn them here:
    ``ada_steps`` Adam steps of entropy minimisation on the unlabelled inputs of ``ada_data``, a
    :class:`~lightning_ext.merging.multi_task.MultiTaskDataModule` whose tasks are in the same order as the
    models; each model's own head is used for its task; coefficients, entropy and collapse signs are
    reported, and plotted to ``plot_path``).

    Checks: every model must have the module's architecture outside the heads (else the first differing key
    and its shapes are reported) and lie within ``max_task_vector_ratio`` (relative norm) of the base, so a model
    fine-tuned from another base is refused (``on_foreign_base: warn`` only warns).

    Under DDP, rank 0 merges and broadcasts the result. Refused in ``setup``: FSDP, DeepSpeed, model-parallel
    and XLA strategies (the state dict is sharded there).

    Args:
        checkpoints: fine-tuned checkpoints of the other tasks (paths or glob patterns; relative ones are under the
            trainer's ``default_root_dir``, like ``save_finetuned``, so ``[tasks/*.pt]`` finds what earlier runs saved).
        method: ``"average"``, ``"task_arithmetic"``, ``"ties"``, ``"coefficients"`` or ``"ada_merging"``.
        scaling: :math:`\lambda` for task arithmetic (default 0.3) and TIES (default 1.0).
        ties_k: share of each task vector kept by TIES.
        ties_merge: ``"mean"`` (TIES) or ``"sum"`` of the agreeing entries.
        base_checkpoint: pretrained weights; default: the module's weights when ``fit`` starts.
        include_current: merge the module's own (fine-tuned) weights as the first model.
        head_keys: prefixes of task-specific parameters (``None``: the last ``nn.Linear``; ``[]``: merge all).
        coefficients: coefficients file for ``method: coefficients``.
        ada_data: unlabelled data of every task for ``method: ada_merging``.
        ada_steps: optimisation steps of ``ada_merging`` (the paper: 500).
        ada_lr: Adam learning rate of ``ada_merging``.
        ada_granularity: ``"layer"`` or ``"task"``.
        ada_prior: initial coefficient.
        save_finetuned: file for this run's fine-tuned weights before merging (``""``: not saved; relative paths
            are under the trainer's ``default_root_dir``).
        save_merged: file for the merged state dict (``""``: not saved; relative: under ``default_root_dir``).
        plot_path: PNG of learned coefficients for ``ada_merging`` (relative: in the log directory; ``""``: none).
        max_task_vector_ratio: refuse models farther than this from the base (relative norm).
        on_foreign_base: ``"error"``, ``"warn"`` or ``"ignore"``.
        progress: progress bar for ``ada_merging``.

    Example:
        >>> import tempfile, os
        >>> from lightning.pytorch import Trainer
        >>> from torch import nn
        >>> from lightning_ext import DigitsDataModule, ImageClassifier
        >>> def make():
        ...     torch.manual_seed(0)
        ...     return ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), image_size=8)
        >>> other = os.path.join(tempfile.mkdtemp(), "other_task.pt")
        >>> torch.save({k: v + 0.01 for k, v in make().state_dict().items()}, other)
        >>> merging = ModelMerging(checkpoints=[other], method="task_arithmetic", scaling=0.5)
        >>> trainer = Trainer(max_steps=2, callbacks=[merging], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model := make(), datamodule=DigitsDataModule())
        >>> merging.merged, merging.head_keys, merging.num_models
        (True, ['net.3'], 2)
    """

    def __init__(
        self,
        checkpoints: Optional[list[str]] = None,
        method: str = "task_arithmetic",
        scaling: Optional[float] = None,
        ties_k: float = 0.2,
        ties_merge: str = "mean",
        base_checkpoint: Optional[str] = None,
        include_current: bool = True,
        head_keys: Optional[list[str]] = None,
        coefficients: Optional[str] = None,
        ada_data: Optional[LightningDataModule] = None,
        ada_steps: int = 500,
        ada_lr: float = 1e-3,
        ada_granularity: str = "layer",
        ada_prior: float = 0.3,
        save_finetuned: str = "",
        save_merged: str = "",
        plot_path: str = "model_merging_coefficients.png",
        max_task_vector_ratio: float = DEFAULT_MAX_TASK_VECTOR_RATIO,
        on_foreign_base: str = "error",
        progress: bool = True,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
        if isinstance(checkpoints, str):
            raise TypeError("`checkpoints` must be a list of paths (or glob patterns), not a single string.")
        checkpoints = [str(c) for c in (checkpoints or [])]
        if not checkpoints and not include_current:
            raise ValueError("Nothing to merge: give `checkpoints` or set `include_current: true`.")
        if scaling is not None and not math.isfinite(scaling):
            raise ValueError(f"`scaling` must be a finite number, got {scaling}.")
        if not 0 < ties_k <= 1:
            raise ValueError(f"`ties_k` must be in (0, 1] (0.2 keeps the top 20% of each task vector), got {ties_k}.")
        if ties_merge not in MERGE_MODES:
            raise ValueError(f"`ties_merge` must be one of {MERGE_MODES}, got {ties_merge!r}.")
        if method == "coefficients" and not coefficients:
            raise ValueError("`method: coefficients` needs `coefficients`: a file saved by the AdaMerging module.")
        if method != "coefficients" and coefficients:
            raise ValueError(f"`coefficients` is only used with `method: coefficients`, not {method!r}.")
        if method == "ada_merging" and ada_data is None:
            raise ValueError(
                "`method: ada_merging` needs `ada_data`: a MultiTaskDataModule with the unlabelled inputs of every task, "
                "in the order [current, *checkpoints]."
            )
        if ada_data is not None and method != "ada_merging":
            raise ValueError(f"`ada_data` is only used with `method: ada_merging`, not {method!r}.")
        if ada_steps < 1 or ada_lr <= 0:
            raise ValueError(f"`ada_steps` must be >= 1 and `ada_lr` > 0, got {ada_steps} and {ada_lr}.")
        if ada_granularity not in GRANULARITIES:
            raise ValueError(f"`ada_granularity` must be one of {GRANULARITIES}, got {ada_granularity!r}.")
        if not 0 <= ada_prior <= 1:
            raise ValueError(f"`ada_prior` must be in [0, 1], got {ada_prior}.")
        if max_task_vector_ratio <= 0:
            raise ValueError(f"`max_task_vector_ratio` must be > 0, got {max_task_vector_ratio}.")
        if on_foreign_base not in FOREIGN_BASE_ACTIONS:
            raise ValueError(f"`on_foreign_base` must be one of {FOREIGN_BASE_ACTIONS}, got {on_foreign_base!r}.")
        self.checkpoints = checkpoints
        self.method = method
        self.scaling = scaling
        self.ties_k, self.ties_merge = float(ties_k), ties_merge
        self.base_checkpoint = base_checkpoint
        self.include_current = include_current
        self._head_keys_arg = list(head_keys) if head_keys is not None else None
        self.head_keys: list[str] = []
        self.coefficients_file = coefficients
        self.ada_data = ada_data
        self.ada_steps, self.ada_lr = ada_steps, ada_lr
        self.ada_granularity, self.ada_prior = ada_granularity, ada_prior
        self.save_finetuned, self.save_merged = save_finetuned, save_merged
        self.plot_path = plot_path
        self.max_task_vector_ratio, self.on_foreign_base = max_task_vector_ratio, on_foreign_base
        self.progress = progress
        self.merged = False
        self.num_models = 0
        self.learned_coefficients: Optional[Tensor] = None
        self.history: Optional[AdaMergingHistory] = None
        self._base: Optional[dict[str, Tensor]] = None
        self._base_fingerprint: Optional[list[float]] = None
        self._saved_base_fingerprint: Optional[list[float]] = None
        self._merged_fingerprint: Optional[list[float]] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, checkpoints=self.checkpoints)

    @property
    def default_scaling(self) -> float:
        return {"task_arithmetic": 0.3, "ties": 1.0}.get(self.method, 1.0)

    # -- setup: strategy, heads, base ------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in _UNSUPPORTED_STRATEGIES):
            raise RuntimeError(
                f"ModelMerging does not support {strategy}: it needs the full state dict on one process. Use a single "
                "device or DDP."
            )
        self.head_keys = self._head_keys_arg if self._head_keys_arg is not None else detect_head_keys(pl_module)
        own = pl_module.state_dict()
        unknown = [p for p in self.head_keys if not any(is_head_key(k, [p]) for k in own)]
        if unknown:
            raise ValueError(f"`head_keys` {unknown} match no parameter of {type(pl_module).__name__}; its keys look like {list(own)[:4]}.")
        self._expand_checkpoints(trainer)  # fail early on a missing file
        if self.base_checkpoint:
            self._base = self._read_base(pl_module)
        elif stage == "fit":
            # before a resumed run restores its checkpoint: these are the weights fine-tuning started from
            self._base = {k: v.detach().to("cpu", copy=True) for k, v in own.items() if not is_head_key(k, self.head_keys)}
        if self._base is not None:
            self._base_fingerprint = _fingerprint(self._base, self._float_keys(self._base))
            if self._saved_base_fingerprint is not None:
                self._check_saved_base()

    def _read_base(self, pl_module: LightningModule) -> dict[str, Tensor]:
        own = pl_module.state_dict()
        state = read_state_dict(self.base_checkpoint, reference_keys=own.keys(), name=f"base_checkpoint {self.base_checkpoint}")
        check_same_architecture(own, state, self.head_keys, reference_name=type(pl_module).__name__,
                                other_name=f"base_checkpoint {self.base_checkpoint}")
        return {k: state[k] for k in own if not is_head_key(k, self.head_keys)}

    @staticmethod
    def _float_keys(state: dict[str, Tensor]) -> list[str]:
        return [k for k, v in state.items() if v.is_floating_point()]

    def _check_saved_base(self) -> None:
        if not _same(self._base_fingerprint, self._saved_base_fingerprint):
            raise ValueError(
                "ModelMerging: the module's weights at the start of this (resumed) fit differ from the base the "
                "interrupted run started from, so task vectors would be taken from the wrong base. Build the module "
                "exactly as before (same seed and pretrained weights), or set `base_checkpoint`."
            )

    def _expand_checkpoints(self, trainer: Trainer) -> list[str]:
        paths: list[str] = []
        own = _output_path(self.save_finetuned, trainer)
        own_file = str(own.resolve()) if own is not None else None
        for entry in self.checkpoints:
            entry = str(_output_path(entry, trainer))  # relative: under default_root_dir, like the files it saves
            if _GLOB_CHARS & set(entry):
                found = sorted(glob.glob(entry))
                found = [f for f in found if own_file is None or str(Path(f).resolve()) != own_file]
                if not found:
                    rank_zero_warn(f"ModelMerging: the pattern {entry!r} matches no checkpoint.")
                paths += found
            else:
                if not Path(entry).expanduser().is_file():
                    raise FileNotFoundError(f"ModelMerging: checkpoint {entry} does not exist (in `checkpoints`).")
                paths.append(entry)
        return paths

    # -- when to merge -----------------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._merge(trainer, pl_module)

    def _merge_outside_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            return  # during fit the merge happens at the end
        self._merge(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._merge_outside_fit(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._merge_outside_fit(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._merge_outside_fit(trainer, pl_module)

    # -- the merge ------------------------------------------------------------------------------------------------------
    def _merge(self, trainer: Trainer, pl_module: LightningModule) -> None:
        own = pl_module.state_dict()
        shared_float = [k for k, v in own.items() if v.is_floating_point() and not is_head_key(k, self.head_keys)]
        if self._merged_fingerprint is not None and _same(_fingerprint(own, shared_float), self._merged_fingerprint):
            return  # the module already holds this callback's merged weights
        if self._base is None:
            raise ValueError(
                "ModelMerging has no base model: outside `fit` set `base_checkpoint` to the pretrained weights the "
                "checkpoints were fine-tuned from."
            )
        merged: Optional[dict[str, Tensor]] = None
        if trainer.is_global_zero:
            merged = self._compute(trainer, pl_module)
        if trainer.world_size > 1:
            merged = trainer.strategy.broadcast(merged, src=0)
            self.num_models = trainer.strategy.broadcast(self.num_models, src=0)
        assert merged is not None
        device = next((v.device for v in own.values()), torch.device("cpu"))
        result = pl_module.load_state_dict({k: v.to(device) for k, v in merged.items()}, strict=False)
        unexpected = list(result.unexpected_keys)
        left = [k for k in result.missing_keys if not is_head_key(k, self.head_keys)]
        if unexpected or left:
            raise RuntimeError(f"ModelMerging: the merged weights do not fit the module (missing {left[:3]}, unexpected {unexpected[:3]}).")
        self._merged_fingerprint = _fingerprint(pl_module.state_dict(), shared_float)
        self.merged = True
        merged_file = _output_path(self.save_merged, trainer)
        if trainer.is_global_zero and merged_file is not None:
            merged_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, merged_file)
        rank_zero_info(
            f"ModelMerging: merged {self.num_models} model(s) with {self.method} into {type(pl_module).__name__} "
            f"(heads kept per task: {self.head_keys})."
        )

    def _compute(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        assert self._base is not None
        current = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        finetuned_file = _output_path(self.save_finetuned, trainer)
        if finetuned_file is not None and trainer.state.fn == TrainerFn.FITTING:
            finetuned_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(current, finetuned_file)
        paths = self._expand_checkpoints(trainer)
        sources: list[Any] = ([current] if self.include_current else []) + paths
        names = (["this run's model"] if self.include_current else []) + [f"checkpoint {p}" for p in paths]
        if not sources:
            raise ValueError("ModelMerging: no model to merge (no checkpoint found and `include_current` is false).")
        if len(sources) == 1:
            rank_zero_warn("ModelMerging: merging a single model (no other checkpoint found); the result only rescales its task vector.")
        self.num_models = len(sources)
        base = {**self._base, **{k: v for k, v in current.items() if is_head_key(k, self.head_keys)}}
        common = dict(head_keys=self.head_keys, max_task_vector_ratio=self.max_task_vector_ratio,
                      on_foreign_base=self.on_foreign_base, names=names)
        if self.method == "average":
            return simple_average(sources, base=base, **common)
        if self.method == "task_arithmetic":
            return task_arithmetic_merge(base, sources, self.scaling if self.scaling is not None else 0.3, **common)
        if self.method == "ties":
            return ties_merging_merge(base, sources, self.ties_k, self.scaling if self.scaling is not None else 1.0,
                                      self.ties_merge, **common)
        if self.method == "coefficients":
            assert self.coefficients_file is not None
            data = load_coefficients(self.coefficients_file)
            if len(data["task_names"]) != len(sources):
                raise ValueError(
                    f"{self.coefficients_file} has coefficients for {len(data['task_names'])} models "
                    f"({data['task_names']}) but {len(sources)} are merged here ([current, *checkpoints])."
                )
            self.learned_coefficients = data["coefficients"]
            return apply_coefficients(base, sources, data["coefficients"], data["layer_names"], **common)
        return self._ada_merge(trainer, pl_module, base, sources, names, current)

    def _ada_merge(self, trainer: Trainer, pl_module: LightningModule, base: dict[str, Tensor], sources: list,
                   names: list[str], current: dict[str, Tensor]) -> dict[str, Tensor]:
        data = self.ada_data
        assert data is not None
        data.setup("fit")
        if getattr(data, "num_tasks", len(sources)) != len(sources):
            raise ValueError(
                f"`ada_data` serves {data.num_tasks} tasks but {len(sources)} models are merged ([current, *checkpoints]); "
                "give one task per model, in that order."
            )
        loaders = [data.unlabelled_dataloader(k) for k in range(len(sources))]
        flags = [(p, p.requires_grad) for p in pl_module.parameters()]
        modes = [(m, m.training) for m in pl_module.modules()]
        done = False
        try:
            with torch.no_grad():  # the module holds the base while the coefficients are learned
                for k, v in pl_module.state_dict().items():
                    if k in self._base:
                        v.copy_(self._base[k].to(v.device))
            task_names = getattr(data, "task_names", None) or [f"model{i}" for i in range(len(sources))]
            merger = AdaMergingModel.from_finetuned(
                pl_module, sources, self.head_keys, granularity=self.ada_granularity, prior=self.ada_prior,
                task_names=task_names, max_task_vector_ratio=self.max_task_vector_ratio,
                on_foreign_base=self.on_foreign_base,
            )
            self.history = fit_ada_merging(merger, loaders, self.ada_steps, self.ada_lr, progress=self.progress)
            lam = merger.coefficients().detach().cpu()
            merged = {k: v.cpu() for k, v in merger.merged_state_dict().items() if not is_head_key(k, self.head_keys)}
            layer_names = list(merger.layer_names)
            del merger
            done = True
        finally:
            with torch.no_grad():  # the module's own head always, and everything if the merge failed
                for k, v in pl_module.state_dict().items():
                    if not done or is_head_key(k, self.head_keys):
                        v.copy_(current[k].to(v.device))
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.training = mode
        self.learned_coefficients = lam
        for message in diagnose_collapse(self.history):
            rank_zero_warn(f"ModelMerging (ada_merging): possible collapse: {message}")
        plot_file = resolve_path(self.plot_path, trainer)
        if plot_file is not None:
            plot_coefficients(plot_file, lam, layer_names, task_names, self.history,
                              title=f"ModelMerging: AdaMerging ({self.ada_granularity}-wise)")
        rank_zero_info(f"ModelMerging: learned coefficients (mean per task): "
                       f"{dict(zip(task_names, [round(float(x), 3) for x in lam.mean(0)]))}.")
        return merged

    # -- state --------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "base_fingerprint": self._base_fingerprint,
            "merged_fingerprint": self._merged_fingerprint,
            "merged": self.merged,
            "num_models": self.num_models,
            "learned_coefficients": self.learned_coefficients,
            "history": self.history.to_dict() if self.history is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("method", self.method) != self.method:
            raise ValueError(
                f"The checkpoint's ModelMerging state was saved with method={state_dict['method']!r}, this callback has "
                f"method={self.method!r}; resume with the same configuration."
            )
        self._saved_base_fingerprint = state_dict.get("base_fingerprint")
        self._merged_fingerprint = state_dict.get("merged_fingerprint")
        self.merged = bool(state_dict.get("merged", False))
        self.num_models = int(state_dict.get("num_models", 0))
        self.learned_coefficients = state_dict.get("learned_coefficients")
        history = state_dict.get("history")
        self.history = AdaMergingHistory.from_dict(history) if history is not None else None
        if self._base_fingerprint is not None and self._saved_base_fingerprint is not None and not self.base_checkpoint:
            self._check_saved_base()
