"""``ModelMerging``: merge fine-tuned checkpoints of your own LightningModule into it (fine-tune, then merge).

The functional core is :mod:`lightning_ext.merging` (state-dict functions and
:class:`~lightning_ext.merging.ada_merging.AdaMergingModel`); this callback only decides when to merge, which
weights are the base and which models take part, and loads the result into the module.
"""

from __future__ import annotations

import glob
import math
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_ext.core.io import atomic_torch_save
from lightning_ext.core.paths import output_path
from lightning_ext.core.strategy import refuse_sharded_strategy
from lightning_ext.core.validation import (
    ClosedUnitInterval,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_fraction,
    check_number,
    check_positive,
    check_positive_int,
)
from lightning_ext.merging.ada_diagnostics import (
    AdaMergingHistory,
    check_output_paths,
    diagnose_agreement,
    diagnose_collapse,
    load_coefficients,
    plot_coefficients,
)
from lightning_ext.merging.ada_merging import (
    GRANULARITIES,
    AdaMergingModel,
    Granularity,
    apply_coefficients,
    finetuned_agreement,
    fit_ada_merging,
)
from lightning_ext.merging.task_arithmetic import task_arithmetic_merge
from lightning_ext.merging.task_vectors import (
    DEFAULT_MAX_TASK_VECTOR_RATIO,
    FOREIGN_BASE_ACTIONS,
    OnForeignBase,
    check_same_architecture,
    is_head_key,
    read_state_dict,
    resolve_ignored_layers,
    simple_average,
)
from lightning_ext.merging.ties_merging import MERGE_MODES, Density, MergeMode, check_density, ties_merging_merge

__all__ = ["ModelMerging"]

#: How ``ModelMerging`` merges (see its docstring).
MergeMethod = Literal["average", "task_arithmetic", "ties", "coefficients", "ada_merging"]
METHODS = get_args(MergeMethod)
_GLOB_CHARS = set("*?[")


def _fingerprint(state: dict[str, Tensor], keys: list[str]) -> list[float]:
    out = []
    for k in keys:
        v = state[k].detach().double()
        out += [float(v.sum()), float(v.pow(2).sum())]
    return out


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
    one at a time with ``weights_only=True``, NaN/inf refused; glob patterns allowed, ``**`` included; relative
    paths are under the trainer's ``default_root_dir``, the root every run of a project shares), and loads the
    merged weights into the module. Task-specific heads (``ignored_layers``: module names or globs; default: the
    module's last ``nn.Linear``) are never merged: the module keeps its own head, so evaluating it afterwards
    measures the merged body on this run's task. ``finetuned_path`` keeps this run's fine-tuned weights (taken
    before merging) for later runs, which find them with e.g. ``checkpoints: ["**/tasks/*.pt"]``; ``merged_path``
    writes the merged state dict. Output paths are relative to this run's ``trainer.log_dir``, ``None`` disables
    them, and files are written atomically. ``ModelCheckpoint`` files keep the fine-tuned (unmerged) weights. In ``validate``/``test``/``predict`` runs (no ``fit``), the merge
    happens when the loop starts (on the weights restored from ``ckpt_path``, if any), and needs
    ``base_checkpoint``. A module that already holds this callback's merged weights is not merged twice; after
    ``fit`` with ``ada_merging``, a later ``test(ckpt_path="best")`` (which restores unmerged weights) merges them
    with the coefficients learned at the end of ``fit`` instead of learning them again. ``setup`` reads every
    named checkpoint (and the coefficients file) once, so a truncated, non-finite or other-architecture file fails
    before training starts, in one line naming it.

    Methods (``method``): ``"average"`` (uniform weight average), ``"task_arithmetic"``
    (:math:`\theta_0 + \lambda\sum_k\tau_k`, ``scaling`` default 0.3), ``"ties"`` (TIES-Merging, keep the top
    share ``ties_density`` of each task vector, the paper's :math:`k`; ``scaling`` default 1.0), ``"coefficients"`` (task- or layer-wise
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
            trainer's ``default_root_dir``, so ``["**/tasks/*.pt"]`` finds what earlier runs saved to ``finetuned_path``
            in their log directories; this run's own file is skipped).
        method: ``"average"``, ``"task_arithmetic"``, ``"ties"``, ``"coefficients"`` or ``"ada_merging"``.
        scaling: :math:`\lambda` for task arithmetic (default 0.3) and TIES (default 1.0).
        ties_density: share of each task vector kept by TIES (the paper's :math:`k`), in (0, 1].
        ties_merge: ``"mean"`` (TIES) or ``"sum"`` of the agreeing entries.
        base_checkpoint: pretrained weights; default: the module's weights when ``fit`` starts.
        include_current: merge the module's own (fine-tuned) weights as the first model.
        ignored_layers: task-specific layers kept per task: module names or globs of the LightningModule
            (``None``: the last ``nn.Linear``; ``[]``: merge all).
        coefficients: coefficients file for ``method: coefficients``.
        ada_data: unlabelled data of every task for ``method: ada_merging``.
        ada_steps: optimisation steps of ``ada_merging`` (the paper: 500).
        ada_lr: Adam learning rate of ``ada_merging``.
        ada_granularity: ``"layer"`` or ``"task"``.
        ada_prior: initial coefficient.
        finetuned_path: file for this run's fine-tuned weights before merging (relative to ``trainer.log_dir``;
            ``None``: not saved).
        merged_path: file for the merged state dict (relative to ``trainer.log_dir``; ``None``: not saved).
        plot_path: PNG of learned coefficients for ``ada_merging`` (relative to ``trainer.log_dir``; ``None``: none).
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
        >>> merging.merged, merging.ignored_layers, merging.num_models
        (True, ['net.3'], 2)
    """

    def __init__(
        self,
        checkpoints: Optional[list[str]] = None,
        method: MergeMethod = "task_arithmetic",
        scaling: Optional[float] = None,
        ties_density: Density = 0.2,
        ties_merge: MergeMode = "mean",
        base_checkpoint: Optional[str] = None,
        include_current: bool = True,
        ignored_layers: Optional[list[str]] = None,
        coefficients: Optional[str] = None,
        ada_data: Optional[LightningDataModule] = None,
        ada_steps: PositiveInt = 500,
        ada_lr: PositiveFloat = 1e-3,
        ada_granularity: Granularity = "layer",
        ada_prior: ClosedUnitInterval = 0.3,
        finetuned_path: Optional[str] = None,
        merged_path: Optional[str] = None,
        plot_path: Optional[str] = "model_merging_coefficients.png",
        max_task_vector_ratio: PositiveFloat = DEFAULT_MAX_TASK_VECTOR_RATIO,
        on_foreign_base: OnForeignBase = "error",
        progress: bool = True,
    ) -> None:
        super().__init__()
        check_choice("method", method, METHODS)
        if isinstance(checkpoints, str):
            raise TypeError("`checkpoints` must be a list of paths (or glob patterns), not a single string.")
        checkpoints = [str(c) for c in (checkpoints or [])]
        if not checkpoints and not include_current:
            raise ValueError("Nothing to merge: give `checkpoints` or set `include_current: true`.")
        if scaling is not None:
            check_number("scaling", scaling)
        check_density(ties_density, "ties_density")
        check_choice("ties_merge", ties_merge, MERGE_MODES)
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
        check_positive_int("ada_steps", ada_steps)
        check_positive("ada_lr", ada_lr)
        check_choice("ada_granularity", ada_granularity, GRANULARITIES)
        check_fraction("ada_prior", ada_prior)
        check_positive("max_task_vector_ratio", max_task_vector_ratio)
        check_choice("on_foreign_base", on_foreign_base, FOREIGN_BASE_ACTIONS)
        check_output_paths(finetuned_path=finetuned_path, merged_path=merged_path, plot_path=plot_path)
        self.checkpoints = checkpoints
        self.method = method
        self.scaling = scaling
        self.ties_density, self.ties_merge = float(ties_density), ties_merge
        self.base_checkpoint = base_checkpoint
        self.include_current = include_current
        self._ignored_layers_arg = list(ignored_layers) if ignored_layers is not None else None
        self.ignored_layers: list[str] = []
        self.coefficients_file = coefficients
        self.ada_data = ada_data
        self.ada_steps, self.ada_lr = ada_steps, ada_lr
        self.ada_granularity, self.ada_prior = ada_granularity, ada_prior
        self.finetuned_path, self.merged_path = finetuned_path, merged_path
        self.plot_path = plot_path
        self._files: dict[str, Optional[Path]] = {}
        self.max_task_vector_ratio, self.on_foreign_base = max_task_vector_ratio, on_foreign_base
        self.progress = progress
        self.merged = False
        self.num_models = 0
        self.learned_coefficients: Optional[Tensor] = None
        self._layer_names: Optional[list[str]] = None  # the rows of learned_coefficients (ada_merging)
        self.history: Optional[AdaMergingHistory] = None
        self.agreement: Optional[dict[str, float]] = None
        self._base: Optional[dict[str, Tensor]] = None
        self._base_fingerprint: Optional[list[float]] = None
        self._saved_base_fingerprint: Optional[list[float]] = None
        self._merged_fingerprint: Optional[list[float]] = None

    @property
    @override
    def state_key(self) -> str:
        """Distinct per method and checkpoint list."""
        return self._generate_state_key(method=self.method, checkpoints=self.checkpoints)

    @property
    def default_scaling(self) -> float:
        """The default :math:`\\lambda` of the method (0.3 for task arithmetic, 1.0 otherwise)."""
        return {"task_arithmetic": 0.3, "ties": 1.0}.get(self.method, 1.0)

    # -- setup: strategy, heads, base ------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse sharded strategies, resolve ``ignored_layers`` and the output paths, read the base."""
        refuse_sharded_strategy(trainer, "ModelMerging", "merges whole state dicts on one process",
                                error=RuntimeError)
        self.ignored_layers = resolve_ignored_layers(pl_module, self._ignored_layers_arg)
        own = pl_module.state_dict()
        # on every rank: trainer.log_dir is a collective under DDP, and rank 0 alone writes the files
        self._files = {name: output_path(trainer, getattr(self, name))
                       for name in ("finetuned_path", "merged_path", "plot_path")}
        self._check_inputs(trainer, pl_module, own)  # fail in seconds on a bad file, not after training
        if self.base_checkpoint:
            self._base = self._read_base(pl_module)
        elif stage == "fit":
            # before a resumed run restores its checkpoint: these are the weights fine-tuning started from
            self._base = {k: v.detach().to("cpu", copy=True) for k, v in own.items() if not is_head_key(k, self.ignored_layers)}
        if self._base is not None:
            self._base_fingerprint = _fingerprint(self._base, self._float_keys(self._base))
            if self._saved_base_fingerprint is not None:
                self._check_saved_base()

    def _check_inputs(self, trainer: Trainer, pl_module: LightningModule, own: dict[str, Tensor]) -> None:
        """Read every named checkpoint once, one at a time: it exists, loads with ``weights_only=True``, holds no
        NaN/inf and has the module's architecture outside the heads; the coefficients file loads too."""
        for path in self._expand_checkpoints(trainer):
            name = f"ModelMerging: checkpoint {path}"
            state = read_state_dict(path, reference_keys=own.keys(), name=name)
            check_same_architecture(own, state, self.ignored_layers, reference_name=type(pl_module).__name__,
                                    other_name=f"checkpoint {path}")
            del state
        if self.coefficients_file:
            load_coefficients(self.coefficients_file)

    def _read_base(self, pl_module: LightningModule) -> dict[str, Tensor]:
        own = pl_module.state_dict()
        state = read_state_dict(self.base_checkpoint, reference_keys=own.keys(), name=f"base_checkpoint {self.base_checkpoint}")
        check_same_architecture(own, state, self.ignored_layers, reference_name=type(pl_module).__name__,
                                other_name=f"base_checkpoint {self.base_checkpoint}")
        return {k: state[k] for k in own if not is_head_key(k, self.ignored_layers)}

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
        own = self._files.get("finetuned_path")
        own_file = str(own.resolve()) if own is not None else None
        for entry in self.checkpoints:
            file = Path(entry).expanduser()
            entry = str(file if file.is_absolute() else Path(trainer.default_root_dir) / file)  # the runs' shared root
            if _GLOB_CHARS & set(entry):
                found = sorted(glob.glob(entry, recursive=True))
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
    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Merge this run's fine-tuned weights with the other tasks' models."""
        self._merge(trainer, pl_module)

    def _merge_outside_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            return  # during fit the merge happens at the end
        self._merge(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Outside ``fit``: merge before the validation loop runs."""
        self._merge_outside_fit(trainer, pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Outside ``fit``: merge before the test loop runs."""
        self._merge_outside_fit(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Outside ``fit``: merge before the predict loop runs."""
        self._merge_outside_fit(trainer, pl_module)

    # -- the merge ------------------------------------------------------------------------------------------------------
    def _merge(self, trainer: Trainer, pl_module: LightningModule) -> None:
        own = pl_module.state_dict()
        shared_float = [k for k, v in own.items() if v.is_floating_point() and not is_head_key(k, self.ignored_layers)]
        if self._merged_fingerprint is not None and _same(_fingerprint(own, shared_float), self._merged_fingerprint):
            return  # the module already holds this callback's merged weights
        if self._base is None:
            raise ValueError(
                "ModelMerging has no base model: outside `fit` set `base_checkpoint` to the pretrained weights the "
                "checkpoints were fine-tuned from."
            )
        merged: Optional[dict[str, Tensor]] = None
        if trainer.is_global_zero:
            # outside fit the hooks run in Lightning's inference mode; learning coefficients needs autograd
            with torch.inference_mode(False), torch.enable_grad():
                merged = self._compute(trainer, pl_module)
        if trainer.world_size > 1:
            merged = trainer.strategy.broadcast(merged, src=0)
            self.num_models = trainer.strategy.broadcast(self.num_models, src=0)
        assert merged is not None
        device = next((v.device for v in own.values()), torch.device("cpu"))
        result = pl_module.load_state_dict({k: v.to(device) for k, v in merged.items()}, strict=False)
        unexpected = list(result.unexpected_keys)
        left = [k for k in result.missing_keys if not is_head_key(k, self.ignored_layers)]
        if unexpected or left:
            raise RuntimeError(f"ModelMerging: the merged weights do not fit the module (missing {left[:3]}, unexpected {unexpected[:3]}).")
        self._merged_fingerprint = _fingerprint(pl_module.state_dict(), shared_float)
        self.merged = True
        merged_file = self._files.get("merged_path")
        if trainer.is_global_zero and merged_file is not None:
            atomic_torch_save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, merged_file)
        rank_zero_info(
            f"ModelMerging: merged {self.num_models} model(s) with {self.method} into {type(pl_module).__name__} "
            f"(heads kept per task: {self.ignored_layers})."
        )

    def _compute(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        assert self._base is not None
        current = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        finetuned_file = self._files.get("finetuned_path")
        if finetuned_file is not None and trainer.state.fn == TrainerFn.FITTING:
            atomic_torch_save(current, finetuned_file)
        paths = self._expand_checkpoints(trainer)
        sources: list[Any] = ([current] if self.include_current else []) + paths
        names = (["this run's model"] if self.include_current else []) + [f"checkpoint {p}" for p in paths]
        if not sources:
            raise ValueError("ModelMerging: no model to merge (no checkpoint found and `include_current` is false).")
        if len(sources) == 1:
            rank_zero_warn("ModelMerging: merging a single model (no other checkpoint found); the result only rescales its task vector.")
        self.num_models = len(sources)
        base = {**self._base, **{k: v for k, v in current.items() if is_head_key(k, self.ignored_layers)}}
        common = dict(ignored_layers=self.ignored_layers, max_task_vector_ratio=self.max_task_vector_ratio,
                      on_foreign_base=self.on_foreign_base, names=names)
        if self.method == "average":
            return simple_average(sources, base=base, **common)
        if self.method == "task_arithmetic":
            return task_arithmetic_merge(base, sources, self.scaling if self.scaling is not None else 0.3, **common)
        if self.method == "ties":
            return ties_merging_merge(base, sources, self.ties_density, self.scaling if self.scaling is not None else 1.0,
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
        lam, layer_names = self.learned_coefficients, self._layer_names
        if (trainer.state.fn != TrainerFn.FITTING and lam is not None and layer_names is not None
                and lam.shape[1] == len(sources)):
            # e.g. test after fit on the best checkpoint: re-apply what fit learned, do not learn again
            rank_zero_info("ModelMerging: re-applying the coefficients learned at the end of fit.")
            return apply_coefficients(base, sources, lam, layer_names, **common)
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
                pl_module, sources, self.ignored_layers, granularity=self.ada_granularity, prior=self.ada_prior,
                task_names=task_names, max_task_vector_ratio=self.max_task_vector_ratio,
                on_foreign_base=self.on_foreign_base,
            )
            self.history = fit_ada_merging(merger, loaders, self.ada_steps, self.ada_lr, progress=self.progress)
            agreement, entropy = finetuned_agreement(merger, [data.unlabelled_dataloader(k) for k in range(len(sources))])
            lam = merger.coefficients().detach().cpu()
            merged = {k: v.cpu() for k, v in merger.merged_state_dict().items() if not is_head_key(k, self.ignored_layers)}
            layer_names = list(merger.layer_names)
            del merger
            done = True
        finally:
            with torch.no_grad():  # the module's own head always, and everything if the merge failed
                for k, v in pl_module.state_dict().items():
                    if not done or is_head_key(k, self.ignored_layers):
                        v.copy_(current[k].to(v.device))
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.training = mode
        self.learned_coefficients, self._layer_names = lam, layer_names
        for message in diagnose_collapse(self.history):
            rank_zero_warn(f"ModelMerging (ada_merging): possible collapse: {message}")
        self.agreement = dict(zip(task_names, agreement))  # label-free: merged vs each task's own fine-tuned model
        for message in diagnose_agreement(self.agreement, dict(zip(task_names, entropy))):
            rank_zero_warn(f"ModelMerging (ada_merging): {message}")
        plot_file = self._files.get("plot_path")
        if plot_file is not None:
            plot_coefficients(plot_file, lam, layer_names, task_names, self.history,
                              title=f"ModelMerging: AdaMerging ({self.ada_granularity}-wise)")
        rank_zero_info(f"ModelMerging: learned coefficients (mean per task): "
                       f"{dict(zip(task_names, [round(float(x), 3) for x in lam.mean(0)]))}.")
        return merged

    # -- state --------------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """Fingerprints of the base and of the merged weights, the learned coefficients and the history."""
        return {
            "method": self.method,
            "base_fingerprint": self._base_fingerprint,
            "merged_fingerprint": self._merged_fingerprint,
            "merged": self.merged,
            "num_models": self.num_models,
            "learned_coefficients": self.learned_coefficients,
            "layer_names": self._layer_names,
            "history": self.history.to_dict() if self.history is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state; a resumed run must start from the same base (checked)."""
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
        self._layer_names = state_dict.get("layer_names")
        history = state_dict.get("history")
        self.history = AdaMergingHistory.from_dict(history) if history is not None else None
        if self._base_fingerprint is not None and self._saved_base_fingerprint is not None and not self.base_checkpoint:
            self._check_saved_base()
