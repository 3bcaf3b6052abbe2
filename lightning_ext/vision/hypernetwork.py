"""Hypernetwork layers and a task-conditioned hypernetwork, initialised so generated weights have a normal layer's scale.

A hypernetwork ``h`` maps a conditioning vector ``z`` (a learned layer or task embedding, or features of the input)
to the weights of a target layer or network: ``W = h(z; Θ)``; only ``Θ`` and the embeddings are trained.

- Ha, Dai and Le, "HyperNetworks", ICLR 2017 (arXiv 1609.09106): a shared generator maps one embedding per layer to
  that layer's kernel (static hypernetwork); reference code https://github.com/hardmaru/supercell (the blog's).
- von Oswald, Henning, Grewe and Sacramento, "Continual learning with hypernetworks", ICLR 2020 (arXiv 1906.00695;
  code https://github.com/chrhenning/hypercl, package ``hypnettorch``): one embedding ``e_t`` per task, a chunked
  generator ``h([e_t, c_j]) -> chunk j`` of all target weights, and the output regulariser
  ``β / T · Σ_{t<T} ||h(e_t, Θ) − h(e_t, Θ*)||²`` (``Θ*``: the hypernetwork before task ``T``).
- Chang, Flokas and Lipson, "Principled Weight Initialization for Hypernetworks", ICLR 2020: with the generator's
  last layer ``H`` (input ``h`` of width ``d_k``), a generated weight ``W_ij = Σ_k H_ijk h_k`` has
  ``Var(W) = d_k · Var(H) · E[h²]``; *hyperfan-in* sets ``Var(H) = gain² / (fan_in · d_k · E[h²])`` so that
  ``Var(W) = gain² / fan_in``, the variance a fan-in initialisation gives the target layer (gain 1: LeCun;
  √2: Kaiming for ReLU; 1/√3: PyTorch's default ``nn.Linear``/``nn.Conv2d`` init). A default-initialised generator
  gives weights orders of magnitude off that scale (see the tests).

Reviewed in Chauhan et al., "A Brief Review of Hypernetworks in Deep Learning", arXiv 2306.06955 (2023).
"""

from __future__ import annotations

import copy
import math
from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ext.core.validation import check_choice, check_number, check_positive_int

__all__ = ["HyperConv2d", "HyperLinear", "TargetHyperNetwork", "hyperfan_in_", "hypernet_output_penalty"]

HyperInit = Literal["hyperfan_in", "default"]


def hyperfan_in_(layer: nn.Linear, target_fan_in: int, input_sq_mean: float = 1.0, gain: float = 1.0) -> nn.Linear:
    """Hyperfan-in initialisation of a generator's output layer (Chang et al., 2020), in place.

    ``layer.weight ~ N(0, gain² / (target_fan_in · layer.in_features · input_sq_mean))`` and zero bias, so the
    generated weights have variance ``gain² / target_fan_in`` when the layer's input has mean square
    ``input_sq_mean``.

    Example:
        >>> head = hyperfan_in_(nn.Linear(64, 100 * 50), target_fan_in=50)
        >>> round(float(head.weight.detach().var() * 64 * 50), 1)
        1.0
    """
    check_positive_int("target_fan_in", target_fan_in)
    check_number("input_sq_mean", input_sq_mean, low=0, low_open=True)
    check_number("gain", gain, low=0, low_open=True)
    std = gain / math.sqrt(target_fan_in * layer.in_features * input_sq_mean)
    with torch.no_grad():
        layer.weight.normal_(0.0, std)
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


def _mlp_body(in_dim: int, hidden: Sequence[int], init: str) -> tuple[nn.Module, int]:
    """Linear-ReLU layers; with ``init='hyperfan_in'`` Kaiming-normal and zero bias, so that the mean square of the
    input is kept in expectation over the initialisation (E[ReLU(a)²] = ½ · 2/d · |x|² = mean(x²))."""
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        linear = nn.Linear(width, h)
        if init == "hyperfan_in":
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
        width = h
    return (nn.Sequential(*layers) if layers else nn.Identity()), width


def _check_common(cond_dim: int, hidden: Union[int, Sequence[int]], init: str, gain: float, cond_scale: float):
    check_positive_int("cond_dim", cond_dim)
    for h in ([hidden] if isinstance(hidden, int) else hidden):
        check_number("hidden", h, low=0, integer=True)
    check_choice("init", init, ("hyperfan_in", "default"))
    check_number("gain", gain, low=0, low_open=True)
    check_number("cond_scale", cond_scale, low=0, low_open=True)


class _HyperLayer(nn.Module):
    """Shared generator of :class:`HyperLinear` and :class:`HyperConv2d`: ``z -> (weight, bias)``."""

    def __init__(self, weight_shape: tuple[int, ...], fan_in: int, cond_dim: int, hidden: int, bias: bool,
                 init: str, gain: float, cond_scale: float) -> None:
        super().__init__()
        _check_common(cond_dim, hidden, init, gain, cond_scale)
        self.weight_shape, self.fan_in, self.cond_dim = tuple(weight_shape), fan_in, cond_dim
        self.init, self.gain, self.cond_scale = init, gain, cond_scale
        self.body, width = _mlp_body(cond_dim, [hidden] if hidden else [], init)
        self.weight_head = nn.Linear(width, math.prod(weight_shape))
        self.bias_head = nn.Linear(width, weight_shape[0]) if bias else None
        if init == "hyperfan_in":
            hyperfan_in_(self.weight_head, fan_in, cond_scale**2, gain)
            if self.bias_head is not None:  # biases start at 0 (the weights carry the whole fan-in variance)
                nn.init.zeros_(self.bias_head.weight)
                nn.init.zeros_(self.bias_head.bias)

    def generate(self, z: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """The weight (and bias) for a conditioning vector ``(cond_dim,)`` or one per sample ``(B, cond_dim)``."""
        if z.dim() not in (1, 2) or z.shape[-1] != self.cond_dim:
            raise ValueError(f"{type(self).__name__} needs a conditioning tensor of shape ({self.cond_dim},) or "
                             f"(batch, {self.cond_dim}); got {tuple(z.shape)}")
        h = self.body(z)
        weight = self.weight_head(h).reshape(*z.shape[:-1], *self.weight_shape)
        bias = self.bias_head(h) if self.bias_head is not None else None
        return weight, bias


class HyperLinear(_HyperLayer):
    """A linear layer whose weight and bias a small generator makes from a conditioning vector ``z``.

    ``y = W(z) x + b(z)`` with ``[W(z), b(z)] = H · ReLU(A z)`` (``hidden=0``: ``H z``), the static hypernetwork of
    Ha et al. (2017) when ``z`` is a learned embedding, task-conditioned when it is a task's embedding, and
    data-conditioned (one weight matrix per sample) when ``z`` has a batch dimension. With ``init="hyperfan_in"``
    (Chang et al., 2020) the generated weights have variance ``gain² / in_features`` at initialisation when the
    entries of ``z`` have mean square ``cond_scale²``, and the generated biases start at 0.

    Args:
        in_features: input features of the generated layer.
        out_features: output features of the generated layer.
        cond_dim: length of the conditioning vector ``z``.
        hidden: width of the generator's hidden ReLU layer (0: a linear generator).
        bias: generate a bias too.
        init: ``"hyperfan_in"`` or ``"default"`` (PyTorch's init of the generator; the wrong scale, for ablations).
        gain: generated weight std times √in_features (1: LeCun; √2: Kaiming-ReLU; 1/√3: PyTorch default).
        cond_scale: expected root mean square of the entries of ``z`` (1 for N(0, 1) embeddings).

    Example:
        >>> layer = HyperLinear(16, 4, cond_dim=8)
        >>> x, z = torch.randn(5, 16), torch.randn(8)
        >>> layer(x, z).shape, layer(x, torch.randn(5, 8)).shape  # one weight matrix; one per sample
        (torch.Size([5, 4]), torch.Size([5, 4]))
    """

    def __init__(self, in_features: int, out_features: int, cond_dim: int, hidden: int = 64, bias: bool = True,
                 init: HyperInit = "hyperfan_in", gain: float = 1.0, cond_scale: float = 1.0) -> None:
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        super().__init__((out_features, in_features), in_features, cond_dim, hidden, bias, init, gain, cond_scale)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """``x`` of shape ``(B, in_features)`` with ``z`` of shape ``(cond_dim,)`` or ``(B, cond_dim)``."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"HyperLinear needs inputs of shape (batch, {self.in_features}); got {tuple(x.shape)}")
        if z.dim() == 2 and z.shape[0] != x.shape[0]:
            raise ValueError(f"HyperLinear: per-sample conditioning has {z.shape[0]} rows for a batch of "
                             f"{x.shape[0]}; give one row per sample or a single ({self.cond_dim},) vector")
        weight, bias = self.generate(z)
        if z.dim() == 1:
            return F.linear(x, weight, bias)
        out = torch.einsum("bi,boi->bo", x, weight)
        return out + bias if bias is not None else out


class HyperConv2d(_HyperLayer):
    """A 2-d convolution whose kernel (and bias) a small generator makes from a conditioning vector ``z``.

    One kernel for the batch when ``z`` is ``(cond_dim,)`` (Ha et al.'s static hypernetwork for CNNs with a learned
    layer embedding); one kernel per sample when ``z`` is ``(B, cond_dim)``, applied as a grouped convolution over
    the batch. ``init="hyperfan_in"`` gives the kernel variance ``gain² / (in_channels · k²)`` at initialisation.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size.
        cond_dim: length of ``z``.
        stride: convolution stride.
        padding: zero padding on each side.
        hidden: width of the generator's hidden ReLU layer (0: a linear generator).
        bias: generate a bias too.
        init: ``"hyperfan_in"`` or ``"default"``.
        gain: generated kernel std times √(in_channels · k²).
        cond_scale: expected root mean square of the entries of ``z``.

    Example:
        >>> conv = HyperConv2d(3, 8, 3, cond_dim=4, padding=1)
        >>> conv(torch.randn(2, 3, 10, 10), torch.randn(2, 4)).shape
        torch.Size([2, 8, 10, 10])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, cond_dim: int, stride: int = 1,
                 padding: int = 0, hidden: int = 64, bias: bool = True, init: HyperInit = "hyperfan_in",
                 gain: float = 1.0, cond_scale: float = 1.0) -> None:
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("kernel_size", kernel_size), ("stride", stride)):
            check_positive_int(name, value)
        check_number("padding", padding, low=0, integer=True)
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        super().__init__(shape, in_channels * kernel_size**2, cond_dim, hidden, bias, init, gain, cond_scale)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """``x`` of shape ``(B, in_channels, H, W)`` with ``z`` of shape ``(cond_dim,)`` or ``(B, cond_dim)``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"HyperConv2d needs inputs of shape (batch, {self.in_channels}, height, width); "
                             f"got {tuple(x.shape)}")
        if z.dim() == 2 and z.shape[0] != x.shape[0]:
            raise ValueError(f"HyperConv2d: per-sample conditioning has {z.shape[0]} rows for a batch of "
                             f"{x.shape[0]}; give one row per sample or a single ({self.cond_dim},) vector")
        weight, bias = self.generate(z)
        if z.dim() == 1:
            return F.conv2d(x, weight, bias, self.stride, self.padding)
        b = x.shape[0]
        out = F.conv2d(x.reshape(1, b * self.in_channels, *x.shape[2:]), weight.reshape(-1, *weight.shape[2:]),
                       bias.reshape(-1) if bias is not None else None, self.stride, self.padding, groups=b)
        return out.reshape(b, self.out_channels, *out.shape[2:])


def _fan_in(shape: torch.Size) -> int:
    return int(shape[1] * math.prod(shape[2:]))


class TargetHyperNetwork(nn.Module):
    """All parameters of a target network generated from a learned task embedding (von Oswald et al., 2020).

    ``θ_t = offset + scale ⊙ h([e_t, c_j]; Θ)`` chunk by chunk (``chunk_size``; ``None``: all at once from ``e_t``),
    and the target runs with ``θ_t`` through :func:`torch.func.functional_call`; the target's own parameters are
    frozen and never used for its ≥2-d weights. Hyperfan-in with a per-parameter output scale: the generator's last
    layer gets ``Var = 1 / (d_k · E[h²])`` (unit-variance raw outputs; embeddings are N(0, 1), the hidden layers
    keep the mean square) and ``scale = gain / √fan_in`` for each ≥2-d weight, so ``Var(θ) = gain² / fan_in``
    whatever parameter a chunk position serves (one chunk row makes weights of different fan-ins, so the variance
    cannot be set per row as in :func:`hyperfan_in_`). 1-d parameters: biases of a layer with a ≥2-d weight get
    PyTorch's bias scale ``1/√(3 · fan_in)``; other 1-d parameters (norm layers) start at the target's initial
    values (``offset``) with scale 0.1. ``init="default"`` leaves the generator at PyTorch's init with scale 1
    and offset 0 (the ablation).

    Args:
        target: the network whose parameters are generated (its buffers, e.g. BatchNorm statistics, are shared).
        num_tasks: number of task embeddings.
        emb_dim: task-embedding size.
        hidden: the generator's hidden ReLU widths.
        chunk_size: outputs per generator call (von Oswald's chunking); ``None`` generates everything at once.
        chunk_emb_dim: chunk-embedding size (with ``chunk_size``).
        gain: generated ≥2-d weight std times √fan_in.
        init: ``"hyperfan_in"`` or ``"default"``.

    Example:
        >>> net = TargetHyperNetwork(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), num_tasks=3,
        ...                          chunk_size=16)
        >>> net(torch.randn(5, 4), torch.tensor([0, 2, 2, 1, 0])).shape
        torch.Size([5, 2])
        >>> sum(p.numel() for p in net.export_target(1).parameters())
        58
    """

    def __init__(self, target: nn.Module, num_tasks: int, emb_dim: int = 8, hidden: Sequence[int] = (64, 64),
                 chunk_size: Optional[int] = None, chunk_emb_dim: int = 8, gain: float = 1.0,
                 init: HyperInit = "hyperfan_in") -> None:
        super().__init__()
        check_positive_int("num_tasks", num_tasks)
        check_positive_int("emb_dim", emb_dim)
        check_positive_int("chunk_emb_dim", chunk_emb_dim)  # checked even when unused: a bad YAML value is an error
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        _check_common(emb_dim, list(hidden), init, gain, 1.0)
        named = [(n, p) for n, p in target.named_parameters()]
        if not named:
            raise ValueError("TargetHyperNetwork: the target network has no parameters to generate")
        self.target = target.requires_grad_(False)
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.total = sum(self.numels)
        self.num_tasks, self.chunk_size, self.init = num_tasks, chunk_size, init
        scale, offset = self._scale_offset(target, named, gain, init)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.task_embeddings = nn.Parameter(torch.randn(num_tasks, emb_dim))
        if chunk_size is None:
            self.chunk_embeddings, in_dim, out_dim = None, emb_dim, self.total
        else:
            n_chunks = math.ceil(self.total / chunk_size)
            self.chunk_embeddings = nn.Parameter(torch.randn(n_chunks, chunk_emb_dim))
            in_dim, out_dim = emb_dim + chunk_emb_dim, chunk_size
        self.body, width = _mlp_body(in_dim, list(hidden), init)
        self.head = nn.Linear(width, out_dim)
        if init == "hyperfan_in":
            hyperfan_in_(self.head, target_fan_in=1, input_sq_mean=1.0, gain=1.0)  # raw outputs of unit variance

    @staticmethod
    def _scale_offset(target: nn.Module, named, gain: float, init: str) -> tuple[Tensor, Tensor]:
        scales, offsets = [], []
        modules = dict(target.named_modules())
        for name, p in named:
            owner = modules[name.rpartition(".")[0]]
            weight = getattr(owner, "weight", None)
            if init == "default":
                s, o = torch.ones(p.numel()), torch.zeros(p.numel())
            elif p.dim() >= 2:
                s, o = torch.full((p.numel(),), gain / math.sqrt(_fan_in(p.shape))), torch.zeros(p.numel())
            elif isinstance(weight, Tensor) and weight.dim() >= 2:
                s, o = torch.full((p.numel(),), 1 / math.sqrt(3 * _fan_in(weight.shape))), torch.zeros(p.numel())
            else:
                s, o = torch.full((p.numel(),), 0.1), p.detach().reshape(-1).clone().float()
            scales.append(s)
            offsets.append(o)
        return torch.cat(scales), torch.cat(offsets)

    def generate(self, task_ids: Union[int, Tensor, Sequence[int]]) -> Tensor:
        """The flat target parameters ``(len(task_ids), total)`` (or ``(total,)`` for an int task id)."""
        single = isinstance(task_ids, int)
        ids = torch.as_tensor([task_ids] if single else task_ids, dtype=torch.long, device=self.scale.device)
        if ids.dim() != 1 or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_tasks)):
            raise ValueError(f"task ids must lie in [0, {self.num_tasks - 1}] (num_tasks={self.num_tasks}); "
                             f"got {ids.tolist()}")
        emb = self.task_embeddings[ids]
        if self.chunk_embeddings is None:
            raw = self.head(self.body(emb))
        else:
            n_chunks, c = self.chunk_embeddings.shape
            inputs = torch.cat([emb[:, None, :].expand(-1, n_chunks, -1),
                                self.chunk_embeddings[None].expand(len(ids), -1, -1)], dim=-1)
            raw = self.head(self.body(inputs)).reshape(len(ids), -1)[:, : self.total]
        flat = self.offset + self.scale * raw
        return flat[0] if single else flat

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``{name: tensor}`` of the target from one flat parameter vector."""
        return {n: t.reshape(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes)}

    def forward(self, x: Tensor, task_id: Union[int, Tensor]) -> Tensor:
        """The target's output on ``x`` with the weights of ``task_id`` (an int, or one id per sample)."""
        if isinstance(task_id, int):
            return torch.func.functional_call(self.target, self.unflatten(self.generate(task_id)), (x,))
        task_id = torch.as_tensor(task_id, device=x.device).long().reshape(-1)
        if task_id.numel() != x.shape[0]:
            raise ValueError(f"TargetHyperNetwork: {task_id.numel()} task ids for a batch of {x.shape[0]}; give "
                             "one id per sample or an int")
        tasks = torch.unique(task_id)
        params = self.generate(tasks)
        outputs, order = [], []
        for row, t in enumerate(tasks.tolist()):
            index = (task_id == t).nonzero().reshape(-1)
            outputs.append(torch.func.functional_call(self.target, self.unflatten(params[row]), (x[index],)))
            order.append(index)
        out = torch.cat(outputs)
        return out[torch.argsort(torch.cat(order))]

    @torch.no_grad()
    def export_target(self, task_id: int) -> nn.Module:
        """A plain copy of the target holding the generated weights of ``task_id`` (trainable, detached)."""
        module = copy.deepcopy(self.target).requires_grad_(True)
        params = self.unflatten(self.generate(task_id))
        for name, p in module.named_parameters():
            p.copy_(params[name])
        return module

    def num_trainable_parameters(self) -> int:
        """Parameters of the generator plus the embeddings (what an optimiser trains)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def hypernet_output_penalty(current: Tensor, snapshot: Tensor) -> Tensor:
    """von Oswald et al.'s output regulariser without the β: ``(1/T) Σ_{t<T} ||θ_t − θ*_t||²``.

    ``current`` and ``snapshot`` are ``(T, P)``: the target parameters the hypernetwork generates now for the ``T``
    earlier tasks, and those it generated when the current task began (hypnettorch's ``calc_fix_target_reg``
    divides the sum by the number of regularised tasks; the look-ahead ``ΔΘ`` of the paper is not used).

    Example:
        >>> float(hypernet_output_penalty(torch.ones(2, 3), torch.zeros(2, 3)))
        3.0
    """
    if current.shape != snapshot.shape or current.dim() != 2:
        raise ValueError(f"hypernet_output_penalty needs two (tasks, parameters) tensors of one shape; got "
                         f"{tuple(current.shape)} and {tuple(snapshot.shape)}")
    return (current - snapshot).pow(2).sum(dim=1).mean()
