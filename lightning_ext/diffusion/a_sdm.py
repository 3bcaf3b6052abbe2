r"""A-SDM: feature inheritance across denoising steps and assembly distillation of a smaller UNet.

Paper: "A-SDM: Accelerating Stable Diffusion through Model Assembly and Feature Inheritance Strategies" (Jinchao Zhu,
Yuxuan Wang, Siyuan Pan, Pengfei Wan, Di Zhang, Gao Huang; arXiv 2406.00210). Reference code: none found (a code
search for the method returned unrelated repositories such as DeepCache, https://github.com/horseee/DeepCache, whose
cache-the-deep-branch design this follows); everything beyond the abstract is written from its description.

Two tools for diffusers' ``UNet2DModel`` (DownBlock/UpBlock stacks with skip connections):

*Feature inheritance* (tuning-free). A UNet of :math:`L` levels computes, at step :math:`t`,
:math:`h_t = \mathrm{Up}_{deep}(\mathrm{Mid}(\mathrm{Down}_{deep}(\cdot)))` below its ``shallow_levels``
outermost levels, then the shallow up blocks
:math:`\epsilon_t = \mathrm{Up}_{shallow}(h_t, \mathrm{Down}_{shallow}(x_t))`. Deep features change slowly between
adjacent steps, so on a *reuse* step the wrapper inherits them from the last *full* step :math:`s`,

.. math:: \epsilon_t \approx \mathrm{Up}_{shallow}(h_s, \mathrm{Down}_{shallow}(x_t)),

recomputing only the shallow levels. With ``interval`` :math:`k`, every :math:`k`-th call of a sampling trajectory
is full (``mode="uniform"``); ``mode="early_dense"`` also makes every step with timestep
:math:`\ge` ``dense_timestep`` full (the early, noisy steps, where features move most). ``interval=1`` is the plain
UNet, exactly.

*Model assembly* (tuning). :func:`assemble_unet` builds a lighter UNet from the teacher's blocks (``drop_layers``
fewer resnets per level, the rest inherited) and :class:`AssemblyDistillationModule` recovers its quality by
distillation on the DDPM task, the teacher's output and its block features (as in BK-SDM):

.. math:: L = w_{task}\lVert \epsilon_S(x_t) - \epsilon \rVert^2 + w_{out}\lVert \epsilon_S(x_t) - \epsilon_T(x_t)
   \rVert^2 + w_{feat} \sum_l \lVert F^l_S(x_t) - F^l_T(x_t) \rVert^2

(each norm a mean over elements; :math:`F^l` the output of down block, mid block and up block :math:`l`).

Example:
    >>> from diffusers import UNet2DModel
    >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
    ...                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
    ...                    layers_per_block=2, norm_num_groups=4, num_class_embeds=11).eval()
    >>> fast = FeatureInheritance(unet, interval=2)
    >>> x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    >>> out = [fast(x, torch.tensor(t), y).sample for t in (900, 800, 700)]
    >>> fast.full_calls, fast.reuse_calls
    (2, 1)
    >>> student = assemble_unet(unet, drop_layers=1)
    >>> student.config.layers_per_block, sum(p.numel() for p in student.parameters()) < sum(
    ...     p.numel() for p in unet.parameters())
    (1, True)
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.paths import check_path_argument
from lightning_ext.core.validation import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    check_choice,
    check_number,
    check_positive_int,
)
from lightning_ext.diffusion.module import DiffusionModule

__all__ = ["FeatureInheritance", "assemble_unet", "inherit_weights", "block_features", "distillation_terms",
           "assembly_distillation_loss", "default_teacher",
           "AssemblyDistillationModule"]


def _check_unet(unet: Any, who: str) -> None:
    """Refuse what is not a diffusers ``UNet2DModel``-like stack of down/mid/up blocks (one line)."""
    needed = ("down_blocks", "up_blocks", "conv_in", "conv_out", "time_proj", "time_embedding", "config")
    if not isinstance(unet, nn.Module) or not all(hasattr(unet, a) for a in needed):
        raise ValueError(f"{who} needs a diffusers UNet2DModel (down_blocks, mid_block, up_blocks), got "
                         f"{type(unet).__name__}; wrap a UNet2DModel, not a DiT or DiffusionModule.")
    if any(hasattr(b, "skip_conv") for b in list(unet.down_blocks) + list(unet.up_blocks)):
        raise ValueError(f"{who} does not support the Skip*Block2D types (score-SDE skip path); use "
                         "DownBlock2D/AttnDownBlock2D and UpBlock2D/AttnUpBlock2D.")


class FeatureInheritance(nn.Module):
    """Wraps a diffusers ``UNet2DModel`` so that sampling reuses its deep features between full steps (A-SDM).

    Call it like the UNet (``(sample, timestep, class_labels)``; it returns the UNet's output type). A sampling
    trajectory is recognised from the timesteps: a call whose timestep is not below the previous call's, or whose
    batch shape changed, starts a new one (the cache is dropped). In training mode with gradients enabled every call
    is full and nothing is cached. The cache
    holds the hidden state entering the first shallow up block (the output of the deepest reused up block, or of
    the mid block when ``shallow_levels`` is the number of levels).

    Args:
        unet: the diffusers ``UNet2DModel`` (any DownBlock2D/AttnDownBlock2D and UpBlock2D/AttnUpBlock2D stack).
        interval: one full step every ``interval`` calls (1: no reuse, the plain UNet).
        shallow_levels: outer resolution levels recomputed on every step (1 .. number of levels).
        mode: ``"uniform"`` or ``"early_dense"`` (also full on every step with timestep >= ``dense_timestep``).
        dense_timestep: the timestep threshold of ``"early_dense"``.

    Example:
        >>> from diffusers import UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
        ...                    layers_per_block=1, norm_num_groups=4).eval()
        >>> FeatureInheritance(unet, interval=3)(torch.randn(1, 1, 8, 8), 10).sample.shape
        torch.Size([1, 1, 8, 8])
    """

    def __init__(self, unet: nn.Module, interval: PositiveInt = 2, shallow_levels: PositiveInt = 1,
                 mode: Literal["uniform", "early_dense"] = "uniform", dense_timestep: NonNegativeInt = 500) -> None:
        super().__init__()
        _check_unet(unet, "FeatureInheritance")
        check_positive_int("interval", interval)
        check_positive_int("shallow_levels", shallow_levels)
        levels = len(unet.down_blocks)
        if shallow_levels > levels:
            raise ValueError(f"shallow_levels={shallow_levels} exceeds the UNet's {levels} levels; choose 1..{levels}.")
        check_choice("mode", mode, ("uniform", "early_dense"))
        check_number("dense_timestep", dense_timestep, low=0, integer=True)
        self.unet, self.interval, self.shallow_levels, self.mode = unet, interval, shallow_levels, mode
        self.dense_timestep = dense_timestep
        self.train(unet.training)  # wrapping an eval-mode UNet gives an eval-mode (caching) wrapper
        self.reset()

    @property
    def config(self) -> Any:
        """The wrapped UNet's config (``sample_size``, ``in_channels``: what samplers read)."""
        return self.unet.config

    def reset(self) -> None:
        """Drop the cache and start counting a new trajectory."""
        self._cache: Optional[torch.Tensor] = None
        self._last_t: Optional[float] = None
        self._shape: Optional[tuple[int, ...]] = None
        self._calls = 0
        #: full and reuse calls of the current trajectory
        self.full_calls, self.reuse_calls = 0, 0

    def _embedding(self, sample: torch.Tensor, timestep: Any, class_labels: Optional[torch.Tensor]):
        """The UNet's time (+ class) embedding, as ``UNet2DModel.forward`` computes it."""
        unet = self.unet
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        elif timesteps.dim() == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
        if unet.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when doing class conditioning")
            if unet.config.class_embed_type == "timestep":
                class_labels = unet.time_proj(class_labels)
            emb = emb + unet.class_embedding(class_labels).to(dtype=unet.dtype)
        elif class_labels is not None:
            raise ValueError("class_embedding needs to be initialized in order to use class conditioning")
        return timesteps, emb

    def _is_full(self, timesteps: torch.Tensor, shape: tuple[int, ...]) -> bool:
        t = float(timesteps.float().max())
        if self._cache is None or shape != self._shape or self._last_t is None or t >= self._last_t:
            self.reset()
        self._last_t, self._shape = t, shape
        full = self._cache is None or self._calls % self.interval == 0 or (
            self.mode == "early_dense" and t >= self.dense_timestep)
        if full:
            self._calls = 0  # the interval counts from the last full step
        self._calls += 1
        return full

    @override
    def forward(self, sample: torch.Tensor, timestep: Any, class_labels: Optional[torch.Tensor] = None,
                return_dict: bool = True):
        """The UNet's prediction; the deep levels computed on full steps only."""
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps, emb = self._embedding(sample, timestep, class_labels)
        caching = not (self.training and torch.is_grad_enabled())
        full = not caching or self._is_full(timesteps, tuple(sample.shape))
        levels, shallow = len(unet.down_blocks), self.shallow_levels
        sample = unet.conv_in(sample)
        res = (sample,)
        for i, block in enumerate(unet.down_blocks):
            if not full and i >= shallow:
                break
            sample, block_res = block(hidden_states=sample, temb=emb)
            res += block_res
        first_shallow_up = levels - shallow
        if full:
            if unet.mid_block is not None:
                sample = unet.mid_block(sample, emb)
            for block in unet.up_blocks[:first_shallow_up]:
                n = len(block.resnets)
                sample, res = block(sample, res[-n:], emb), res[:-n]
            if caching:
                self._cache = sample.detach()
                self.full_calls += 1
        else:
            keep = sum(len(block.resnets) for block in unet.up_blocks[first_shallow_up:])
            sample, res = self._cache, res[:keep]  # the deepest shallow block's downsample feeds a reused level
            self.reuse_calls += 1
        for block in unet.up_blocks[first_shallow_up:]:
            n = len(block.resnets)
            sample, res = block(sample, res[-n:], emb), res[:-n]
        sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
        if unet.config.time_embedding_type == "fourier":
            sample = sample / timesteps.reshape((sample.shape[0], *([1] * len(sample.shape[1:]))))
        if not return_dict:
            return (sample,)
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=sample)


# ------------------------------------------------------------------ model assembly


_BLOCK_PART = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$")


def inherit_weights(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy the teacher's weights into an assembled student; returns the student's tensors left as initialised.

    Down blocks keep the teacher's first resnets (and attentions); up blocks keep the first ones and the last one
    (the last up resnet takes the level's downsampled skip, as in the teacher). Everything else (embeddings,
    samplers, mid block, head) is copied by name. A tensor whose shape differs is left as initialised.
    """
    t_state, s_state = teacher.state_dict(), student.state_dict()
    t_per = {(k, int(b)): len(getattr(getattr(teacher, k)[int(b)], "resnets"))
             for k in ("down_blocks", "up_blocks") for b in range(len(getattr(teacher, k)))}
    fresh = []
    for name, value in s_state.items():
        source = name
        m = _BLOCK_PART.match(name)
        if m:
            kind, b, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            n_student = len(getattr(student, kind)[b].resnets)
            if kind == "up_blocks" and j == n_student - 1:
                j = t_per[(kind, b)] - 1
            source = f"{kind}.{b}.{part}.{j}.{rest}"
        if source in t_state and t_state[source].shape == value.shape:
            s_state[name] = t_state[source].clone()
        else:
            fresh.append(name)
    student.load_state_dict(s_state)
    return fresh


def assemble_unet(teacher: nn.Module, drop_layers: PositiveInt = 1) -> nn.Module:
    """A lighter ``UNet2DModel`` assembled from the teacher's blocks: ``drop_layers`` fewer resnets per level.

    The student has the teacher's levels, widths, embeddings and mid block; its weights are inherited
    (:func:`inherit_weights`), so distillation starts from the teacher's features.
    """
    _check_unet(teacher, "assemble_unet")
    check_positive_int("drop_layers", drop_layers)
    layers = int(teacher.config.layers_per_block)
    if drop_layers >= layers:
        raise ValueError(f"drop_layers={drop_layers} would leave no resnet in the teacher's {layers} per level; "
                         f"choose 1..{layers - 1} (a teacher with layers_per_block >= 2).")
    config = dict(teacher.config)
    config["layers_per_block"] = layers - drop_layers
    student = type(teacher).from_config(config)
    inherit_weights(student, teacher)
    return student


@contextmanager
def block_features(unet: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the outputs of the UNet's down blocks, mid block and up blocks (in call order) while inside."""
    feats: list[torch.Tensor] = []
    blocks = list(unet.down_blocks) + ([unet.mid_block] if unet.mid_block is not None else []) + list(unet.up_blocks)
    hooks = [b.register_forward_hook(lambda _m, _i, out: feats.append(out[0] if isinstance(out, tuple) else out))
             for b in blocks]
    try:
        yield feats
    finally:
        for h in hooks:
            h.remove()


def distillation_terms(student_out: torch.Tensor, teacher_out: torch.Tensor, student_feats: list[torch.Tensor],
                       teacher_feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The two distillation terms: ``output``, the MSE to the teacher's prediction, and ``feature``, the sum over
    blocks of the MSE between the student's and the teacher's block outputs (teacher tensors detached)."""
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"student and teacher have {len(student_feats)} and {len(teacher_feats)} blocks; assemble "
                         "the student from the teacher (same levels) to distil block features.")
    for i, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.shape != t.shape:
            raise ValueError(f"block {i}: student feature {tuple(s.shape)} vs teacher {tuple(t.shape)}; distil "
                             "block features only between UNets of the same widths (assemble_unet).")
    output = F.mse_loss(student_out, teacher_out.detach())
    feature = sum((F.mse_loss(s, t.detach()) for s, t in zip(student_feats, teacher_feats)), student_out.new_zeros(()))
    return {"output": output, "feature": feature}


def assembly_distillation_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, target: torch.Tensor,
                               student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor],
                               task_weight: float = 1.0, output_weight: float = 1.0,
                               feature_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """A-SDM's assembly distillation loss: the DDPM task term plus output and block-feature distillation terms.

    Returns ``{"loss", "task", "output", "feature"}``: ``task`` is the MSE to ``target`` (the noise, for
    eps-prediction), ``output`` and ``feature`` come from :func:`distillation_terms`, and ``loss`` is their sum
    weighted by ``task_weight``, ``output_weight`` and ``feature_weight`` (the module docstring's equation).
    """
    terms = distillation_terms(student_out, teacher_out, student_feats, teacher_feats)
    task = F.mse_loss(student_out, target)
    loss = task_weight * task + output_weight * terms["output"] + feature_weight * terms["feature"]
    return {"loss": loss, "task": task, **terms}


def default_teacher(diffusers: Any = None) -> nn.Module:
    """The default teacher: a class-conditional (10 classes + "no class") 1x28x28 ``UNet2DModel``."""
    diffusers = diffusers or require("diffusers", "AssemblyDistillationModule")
    return diffusers.UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
                                 layers_per_block=2, down_block_types=("DownBlock2D",) * 3,
                                 up_block_types=("UpBlock2D",) * 3, norm_num_groups=8, num_class_embeds=11)


class AssemblyDistillationModule(DiffusionModule):
    """A-SDM's model assembly: DDPM training of a UNet assembled from a teacher, distilled on output and features.

    The student (default: :func:`assemble_unet` of the teacher) is the module's ``denoiser``: sampling, EMA,
    validation loss and sample grids are :class:`~lightning_ext.diffusion.module.DiffusionModule`'s. Each training
    step draws the same noisy batch for both networks and minimises :func:`assembly_distillation_loss` (logged:
    ``train_loss`` = the task term, ``train_distill_output``, ``train_distill_feature``, ``train_total_loss``). The
    teacher is frozen, in eval mode, and saved with the module's checkpoints.

    Args:
        teacher: the trained ``UNet2DModel`` (in YAML: its ``class_path``/``init_args``; weights from
            ``teacher_checkpoint``); default: a class-conditional 1x28x28 UNet with widths (16, 32, 32) and 2
            resnets per level (the benchmark's UNet with one more resnet per level).
        student: the smaller UNet (default: assembled from the teacher, ``drop_layers`` fewer resnets per level).
        teacher_checkpoint: the teacher's weights (a state dict or Lightning checkpoint of a ``DiffusionModule``;
            relative to ``trainer.default_root_dir``), loaded in ``setup``; the default student re-inherits them.
        drop_layers: resnets per level the assembled student drops.
        task_weight, output_weight, feature_weight: the loss weights :math:`w_{task}, w_{out}, w_{feat}`.
        **kwargs: :class:`~lightning_ext.diffusion.module.DiffusionModule`'s arguments (``num_classes``, ``lr``...).

    Example:
        >>> from diffusers import UNet2DModel
        >>> teacher = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
        ...                       layers_per_block=2, norm_num_groups=4, num_class_embeds=11)
        >>> model = AssemblyDistillationModule(teacher, num_train_timesteps=100)
        >>> model.training_step((torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])), 0).shape
        torch.Size([])
    """

    def __init__(self, teacher: Optional[nn.Module] = None, student: Optional[nn.Module] = None,
                 teacher_checkpoint: Optional[str] = None, drop_layers: PositiveInt = 1,
                 task_weight: NonNegativeFloat = 1.0, output_weight: NonNegativeFloat = 1.0,
                 feature_weight: NonNegativeFloat = 1.0, **kwargs: Any) -> None:
        diffusers = require("diffusers", "AssemblyDistillationModule")
        check_positive_int("drop_layers", drop_layers)
        if teacher is None:
            teacher = default_teacher(diffusers)
        _check_unet(teacher, "AssemblyDistillationModule's teacher")
        check_path_argument("teacher_checkpoint", teacher_checkpoint)
        for name, w in (("task_weight", task_weight), ("output_weight", output_weight),
                        ("feature_weight", feature_weight)):
            check_number(name, w, low=0)
        assembled = student is None
        if student is None:
            student = assemble_unet(teacher, drop_layers)
        _check_unet(student, "AssemblyDistillationModule's student")
        super().__init__(student, **kwargs)
        self.save_hyperparameters(ignore=["teacher", "student", "optimizer", "scheduler"])
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_checkpoint, self.assembled = teacher_checkpoint, assembled
        self.task_weight, self.output_weight, self.feature_weight = task_weight, output_weight, feature_weight
        self._terms: Optional[dict[str, torch.Tensor]] = None

    @override
    def setup(self, stage: str) -> None:
        """Load ``teacher_checkpoint`` (and re-inherit the assembled student's weights) before fitting."""
        super().setup(stage)
        if self.teacher_checkpoint is None or stage != "fit" or getattr(self, "_teacher_loaded", False):
            return
        from pathlib import Path

        from lightning_ext.core.checkpoints import read_state_dict

        path = Path(self.teacher_checkpoint)
        if not path.is_absolute():
            path = Path(self.trainer.default_root_dir) / path
        if not path.exists():
            raise ValueError(f"teacher_checkpoint {str(path)!r} does not exist; give the teacher's weights file "
                             "(relative to trainer.default_root_dir).")
        keys = list(self.teacher.state_dict())
        state = read_state_dict(str(path), reference_keys=keys, name="teacher_checkpoint")
        if not any(k in state for k in keys):  # a DiffusionModule checkpoint: keys under "denoiser."
            state = {k[len("denoiser."):]: v for k, v in state.items() if k.startswith("denoiser.")}
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"teacher_checkpoint lacks {len(missing)} of the teacher's tensors (e.g. {missing[0]!r}); "
                             "give weights of the same UNet configuration.")
        self.teacher.load_state_dict({k: state[k] for k in keys})
        if self.assembled:
            inherit_weights(self.denoiser, self.teacher)
        self._teacher_loaded = True

    @override
    def train(self, mode: bool = True) -> "AssemblyDistillationModule":
        """Train mode for the student only: the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    @override
    def denoise(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's prediction; in training, also the teacher's, with both networks' block features."""
        if not (self.training and torch.is_grad_enabled()):
            return super().denoise(x, t, y)
        y = y if self.num_classes else None
        with block_features(self.denoiser) as s_feats:
            pred = self.denoiser(x, t, y).sample
        with torch.no_grad(), block_features(self.teacher) as t_feats:
            t_pred = self.teacher(x, t, y).sample
        self._terms = {"student_out": pred, "teacher_out": t_pred, "student_feats": list(s_feats),
                       "teacher_feats": list(t_feats)}
        return pred, x.new_zeros(())

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """The assembly distillation loss of one batch (the same noisy images for student and teacher)."""
        from lightning_ext.core.guards import check_loss

        x, y = self._batch(batch)
        task, _ = self.diffusion_loss(x, y, self._generator(0, self.global_step, 0), True)  # calls denoise()
        terms = distillation_terms(self._terms["student_out"], self._terms["teacher_out"],
                                   self._terms["student_feats"], self._terms["teacher_feats"])
        self._terms = None
        loss = self.task_weight * task + self.output_weight * terms["output"] + self.feature_weight * terms["feature"]
        if not check_loss(self, loss, self.nonfinite_loss, batch):
            return None
        self.log("train_loss", task, prog_bar=True)
        self.log("train_distill_output", terms["output"])
        self.log("train_distill_feature", terms["feature"])
        self.log("train_total_loss", loss)
        return loss
