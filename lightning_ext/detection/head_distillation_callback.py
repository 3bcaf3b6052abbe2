r"""``HeadNetworkDistillation``: head-network distillation (HND / GHND) of any LightningModule from a frozen teacher,
as a callback; a thin wrapper of :class:`~lightning_ext.detection.head_distillation.HeadDistiller`."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_ext.core.inputs import batch_inputs
from lightning_ext.core.layers import resolve_layer_names
from lightning_ext.core.step_wrapper import FitStepWrapping, loss_of, with_loss
from lightning_ext.core.strategy import refuse_sharded_strategy
from lightning_ext.core.validation import NonNegativeFloat, PositiveInt, check_choice, check_number
from lightning_ext.core.validation import check_positive_int
from lightning_ext.detection.head_distillation import HeadDistiller
from lightning_ext.detection.split_computing import BottleneckCodec
from lightning_ext.distillation.teacher import build_teacher

__all__ = ["HeadNetworkDistillation"]


class HeadNetworkDistillation(FitStepWrapping, Callback):
    r"""Head-network distillation (HND) and generalised HND (GHND) of split computing, as a callback on any
    LightningModule: the student's head network (with its bottleneck) learns to reproduce a frozen teacher's
    intermediate outputs.

    Papers: Matsubara et al., "Distilled Split Deep Neural Networks for Edge-Assisted Real-Time Systems"
    (HotEdgeVideo 2019, HND); Matsubara and Levorato, "Neural Compression and Filtering for Edge-assisted
    Real-time Object Detection in Challenged Networks" (ICPR 2020, arXiv 2007.15818, GHND). Reference code:
    https://github.com/yoshitomo-matsubara/sc2-benchmark (``ghnd-bq`` configurations). The loss
    (:func:`~lightning_ext.detection.head_distillation.head_distillation_loss`) is

    .. math::

        L = w_{task} L_{task} + w_{dist} \sum_{l} w_l \|f^S_l(x) - f^T_l(x)\|_2^2

    over the first (``method="hnd"``) or every (``"ghnd"``) pair of ``student_layers``/``teacher_layers``
    (sum-reduced, weights :math:`w_l` = ``layer_weights``, 1.0 each by default as the reference), with
    :math:`w_{task}` = ``task_loss_weight`` (default 0: the head trains on the teacher's outputs alone, as in the
    papers; the module's own loss is then ignored) and :math:`w_{dist}` = ``distillation_weight``.

    The callback wraps the module's ``training_step`` (:mod:`lightning_ext.core.step_wrapper`; removed in
    ``teardown``): forward hooks keep the student's tapped outputs while the module's own step runs, the teacher
    runs on the batch's input tensor (:func:`~lightning_ext.core.inputs.batch_inputs`) without gradient and stops
    after its last tapped layer (a detector's decoder is not computed), and the sum of squared errors is added.

    **The bottleneck.** The student is usually the teacher's architecture with its head's layer replaced by a
    narrow encoder-decoder. Bring your own module with one, or set ``bottleneck_layer``: that layer of the
    student (a stride-1 ``Conv2d`` keeping the spatial size) is replaced in ``setup`` by a
    :class:`~lightning_ext.detection.split_computing.BottleneckCodec` with ``bottleneck_channels`` channels
    (before the optimisers are built and before a resumed checkpoint is restored), and ``student_layers``
    defaults to it. ``init_from_teacher`` copies the teacher's tensors of equal name and shape into the student
    at the start of a fresh fit (a resumed fit restores its checkpoint instead). ``trainable`` (names or globs)
    freezes every other parameter of the module; by default only the inserted bottleneck trains when there is
    one, else nothing is frozen (freeze what should not train yourself: with ``task_loss_weight=0`` only the
    distillation path gets gradients, and DDP needs ``find_unused_parameters`` for parameters off that path).

    Stateless beyond the module it changes (the teacher is frozen and is not saved; the inserted bottleneck is
    part of the module's checkpoint). Under DDP the summed loss covers the global batch (each rank's sum times the
    world size), so two processes train like one. Sharded strategies are refused in ``setup``.

    Args:
        teacher: the trained teacher: an ``nn.Module`` (YAML ``class_path``/``init_args``), ``"timm:<name>"``,
            ``"torchvision:<name>"`` or a class path (see :func:`~lightning_ext.distillation.teacher.build_teacher`).
        student_layers: student module names (relative to the LightningModule), the head's output first.
            Default: ``[bottleneck_layer]``.
        teacher_layers: the matching teacher module names (default: the student's names).
        method: ``"hnd"`` (the first pair) or ``"ghnd"`` (every pair).
        layer_weights: one weight per pair (default 1.0 each).
        distillation_weight: weight of the distillation sum.
        task_loss_weight: weight of the module's own loss (0: ignored, as in the papers).
        teacher_checkpoint: local weights of the teacher (state dict or Lightning checkpoint; ``weights_only``).
        teacher_kwargs: constructor arguments when ``teacher`` is a name or class path.
        bottleneck_layer: a student ``Conv2d`` to replace by a bottleneck codec (``None``: the module has one).
        bottleneck_channels: channels of the inserted bottleneck.
        init_from_teacher: copy the teacher's matching tensors into the student when a fresh fit starts.
        trainable: student modules (names or globs) that train; every other parameter is frozen.
        seed: initialisation seed of the inserted bottleneck (the global RNG is not touched).
        log_prefix: the loss is logged as ``<log_prefix>_loss``.

    Example:
        >>> import torch, lightning.pytorch as pl
        >>> from torch import nn
        >>> class Net(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        ...                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        ...     def forward(self, x):
        ...         return self.net(x)
        ...     def training_step(self, batch, batch_idx):
        ...         return nn.functional.cross_entropy(self(batch[0]), batch[1])
        ...     def configure_optimizers(self):
        ...         return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)
        >>> teacher = Net()
        >>> hnd = HeadNetworkDistillation(teacher, teacher_layers=["net.2"], bottleneck_layer="net.2",
        ...                               bottleneck_channels=2, init_from_teacher=True)
        >>> data = torch.utils.data.TensorDataset(torch.rand(8, 1, 6, 6), torch.randint(0, 2, (8,)))
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False, callbacks=[hnd])
        >>> student = Net()
        >>> trainer.fit(student, torch.utils.data.DataLoader(data, batch_size=4))
        >>> type(student.net[2]).__name__, student.net[0].weight.requires_grad, "training_step" in vars(student)
        ('BottleneckCodec', False, False)
    """

    def __init__(self, teacher: Union[str, nn.Module], student_layers: Optional[list[str]] = None,
                 teacher_layers: Optional[list[str]] = None, method: Literal["hnd", "ghnd"] = "ghnd",
                 layer_weights: Optional[list[NonNegativeFloat]] = None, distillation_weight: NonNegativeFloat = 1.0,
                 task_loss_weight: NonNegativeFloat = 0.0, teacher_checkpoint: Optional[str] = None,
                 teacher_kwargs: Optional[dict] = None, bottleneck_layer: Optional[str] = None,
                 bottleneck_channels: PositiveInt = 3, init_from_teacher: bool = False,
                 trainable: Optional[list[str]] = None, seed: int = 0, log_prefix: str = "hnd") -> None:
        check_choice("method", method, ("hnd", "ghnd"))
        check_number("distillation_weight", distillation_weight, low=0)
        check_number("task_loss_weight", task_loss_weight, low=0)
        check_positive_int("bottleneck_channels", bottleneck_channels)
        for w in layer_weights or []:
            check_number("layer_weights", w, low=0)
        if bottleneck_layer is not None and (not isinstance(bottleneck_layer, str) or not bottleneck_layer):
            raise ValueError(f"bottleneck_layer must be a module name of the student; got {bottleneck_layer!r}.")
        student_layers = list(student_layers) if student_layers else ([bottleneck_layer] if bottleneck_layer else [])
        if not student_layers:
            raise ValueError("give student_layers (the student's head output first) or a bottleneck_layer.")
        teacher_layers = list(teacher_layers) if teacher_layers else list(student_layers)
        if len(teacher_layers) != len(student_layers):
            raise ValueError(f"give one teacher layer per student layer (got {len(teacher_layers)} teacher_layers "
                             f"and {len(student_layers)} student_layers).")
        if method == "hnd" and len(student_layers) != 1:
            raise ValueError(f"method='hnd' matches one layer (the head's output); got {len(student_layers)} "
                             "student_layers: give one, or use method='ghnd' for a sum over several.")
        if layer_weights is not None and len(layer_weights) != len(student_layers):
            raise ValueError(f"give one of layer_weights per layer pair (got {len(layer_weights)} for "
                             f"{len(student_layers)} pairs).")
        if not isinstance(log_prefix, str) or not log_prefix:
            raise ValueError(f"log_prefix must be a non-empty string; got {log_prefix!r}.")
        self.teacher = build_teacher(teacher, teacher_checkpoint, teacher_kwargs, freeze=True)
        self.student_layers, self.teacher_layers, self.method = student_layers, teacher_layers, method
        self.layer_weights = None if layer_weights is None else [float(w) for w in layer_weights]
        self.distillation_weight, self.task_loss_weight = float(distillation_weight), float(task_loss_weight)
        self.bottleneck_layer, self.bottleneck_channels = bottleneck_layer, int(bottleneck_channels)
        self.init_from_teacher, self.trainable, self.log_prefix = bool(init_from_teacher), trainable, log_prefix
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer; got {seed!r}.")
        self.seed = seed
        self._distiller: Optional[HeadDistiller] = None
        self._module: Optional[LightningModule] = None

    @property
    @override
    def state_key(self) -> str:
        """Distinct per layers and log prefix (several instances may coexist)."""
        return self._generate_state_key(student_layers=self.student_layers, teacher_layers=self.teacher_layers,
                                        log_prefix=self.log_prefix)

    # -- setup --------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the strategy and the teacher, insert the bottleneck, freeze, hook the layers, wrap the step."""
        if stage != "fit":
            return
        refuse_sharded_strategy(trainer, "HeadNetworkDistillation", "keeps a whole teacher on every process",
                                error=RuntimeError)
        if not pl_module.automatic_optimization:
            raise RuntimeError(f"{type(pl_module).__name__} uses manual optimization, so the loss its training_step "
                               "returns is not what is backpropagated; HeadNetworkDistillation needs automatic "
                               "optimization (or call lightning_ext.detection.head_distillation.HeadDistiller yourself).")
        if self.teacher is pl_module or any(id(p) in {id(q) for q in pl_module.parameters()}
                                            for p in self.teacher.parameters()):
            raise ValueError("the teacher shares parameters with the student; pass a separate (copied) teacher.")
        if self.bottleneck_layer is not None:
            self._insert_bottleneck(pl_module)
        fresh = trainer.ckpt_path is None
        if self.init_from_teacher and fresh:
            self._copy_teacher(pl_module)
        self._freeze(pl_module)
        self._distiller = HeadDistiller(pl_module, self.teacher, self.student_layers, self.teacher_layers,
                                        self.method, self.layer_weights)
        self._wrap(trainer, pl_module)

    def _insert_bottleneck(self, pl_module: LightningModule) -> None:
        modules = dict(pl_module.named_modules())
        layer = modules.get(self.bottleneck_layer)
        if isinstance(layer, BottleneckCodec):  # inserted by an earlier fit of this module
            return
        if not isinstance(layer, nn.Conv2d) or layer.stride != (1, 1) or layer.groups != 1:
            found = type(layer).__name__ if layer is not None else "no module"
            raise ValueError(f"bottleneck_layer {self.bottleneck_layer!r} must name a stride-1 Conv2d of "
                             f"{type(pl_module).__name__} (found {found}); the bottleneck keeps the spatial size.")
        with torch.random.fork_rng(devices=[]):  # its own seed: the same bottleneck whatever ran before (no global reseed)
            torch.manual_seed(self.seed)
            codec = BottleneckCodec(layer.in_channels, self.bottleneck_channels, layer.out_channels)
        parent_name, _, child = self.bottleneck_layer.rpartition(".")
        parent = modules[parent_name] if parent_name else pl_module
        setattr(parent, child, codec.to(layer.weight.device))

    @torch.no_grad()
    def _copy_teacher(self, pl_module: LightningModule) -> None:
        own, copied = pl_module.state_dict(), 0
        for name, tensor in self.teacher.state_dict().items():
            if name in own and own[name].shape == tensor.shape:
                own[name].copy_(tensor)
                copied += 1
        if not copied:
            raise ValueError(f"init_from_teacher: no tensor of the teacher ({type(self.teacher).__name__}) matches the "
                             f"student's names and shapes; build the student with the teacher's architecture.")
        rank_zero_info(f"HeadNetworkDistillation: copied {copied} of {len(own)} student tensors from the teacher.")

    def _freeze(self, pl_module: LightningModule) -> None:
        patterns = self.trainable if self.trainable is not None else (
            [self.bottleneck_layer] if self.bottleneck_layer is not None else None)
        if patterns is None:
            return
        names = resolve_layer_names(pl_module, patterns, "trainable")
        keep = {id(p) for n in names for p in pl_module.get_submodule(n).parameters()}
        for p in pl_module.parameters():
            p.requires_grad_(id(p) in keep)

    # -- the training_step wrapper ------------------------------------------------------------------------------
    def _wrap(self, trainer: Trainer, pl_module: LightningModule) -> None:
        def around(step: Any, args: tuple, kwargs: dict) -> Any:
            batch = args[0] if args else kwargs.get("batch")
            with self._distiller.capturing():
                output = step(*args, **kwargs)
            try:
                return self._add_distillation(pl_module, batch, output)
            finally:
                self._distiller.student_taps.clear()

        # the same install/remove as KnowledgeDistillation (core.step_wrapper.FitStepWrapping)
        self._wrap_step(trainer, pl_module, around, stale_kind=HeadNetworkDistillation)

    def _add_distillation(self, pl_module: LightningModule, batch: Any, output: Any) -> Any:
        task = loss_of(output, pl_module, "HeadNetworkDistillation")
        if task is None:  # the module skipped this batch
            return None
        distill = self._distiller.loss(batch_inputs(batch, owner="HeadNetworkDistillation"))
        loss = self.distillation_weight * distill
        if self.task_loss_weight:
            loss = loss + self.task_loss_weight * task
        pl_module.log(f"{self.log_prefix}_loss", distill.detach(), on_step=True, on_epoch=True,
                      batch_size=len(batch_inputs(batch)))
        return with_loss(output, loss)

    # -- device, modes, teardown ----------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Move the teacher to the student's device."""
        self.teacher.to(pl_module.device)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the teacher in eval mode."""
        self.teacher.eval()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove the ``training_step`` wrapper and the hooks (the bottleneck and the freezing stay)."""
        if stage != "fit":
            return
        self._unwrap()
        if self._distiller is not None:
            self._distiller.detach()
