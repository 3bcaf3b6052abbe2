r"""FTWT (Fire Together Wire Together, Elkerdawy et al., CVPR 2022): the pure core, usable without a Trainer.

Per-input channel gating of every ``Conv2d -> BatchNorm2d`` pair of a model by small *mask predictors* trained
self-supervised on the heat-map mass target: :func:`heatmap_scores`, :func:`mass_targets`,
:func:`uniform_targets`, :func:`mask_loss`, :func:`conv_bn_pairs`, :class:`MaskPredictor`, :func:`conv_macs` and
:class:`FTWTGating` (hooks that gate a model, record the predictors' logits and targets, and count dynamic MACs).
The Lightning callback is :class:`~lightning_ext.compression.fire_together_wire_together.FireTogetherWireTogether`.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ext.core.layers import match_names
from lightning_ext.core.measure import call_model, eval_mode
from lightning_ext.core.validation import check_choice, check_number

__all__ = ["FTWTGating", "MaskPredictor", "conv_bn_pairs", "conv_macs", "heatmap_scores", "mask_accuracy",
           "mask_loss", "mass_targets", "uniform_targets"]

#: the self-supervised target: heat-map mass (``gt-type mass``, k varies per input) or a fixed share per layer
Target = Literal["mass", "uniform"]
#: what the heat-map score is taken of: the ReLU of the BN output (the official layer output) or the BN output
Activation = Literal["relu", "none"]
#: the official code's tolerance on the cumulative mass and on "zero" activations
DELTA = 1e-5


def heatmap_scores(activation: Tensor) -> Tensor:
    """Per sample and channel, the spatial maximum of ``|activation|`` (``(B, C, H, W) -> (B, C)``).

    Example:
        >>> heatmap_scores(torch.tensor([[[[1.0, -3.0]], [[0.5, 0.0]]]]))
        tensor([[3.0000, 0.5000]])
    """
    if activation.dim() != 4:
        raise ValueError(f"FTWT scores (B, C, H, W) feature maps; got a tensor of shape {tuple(activation.shape)}.")
    return activation.detach().abs().amax(dim=(2, 3))


def mass_targets(activation: Tensor, mass_ratio: float, delta: float = DELTA) -> Tensor:
    r"""The heat-map mass target: which channels of each sample are labelled "fire" (1) or "prune" (0).

    With :math:`s_c` the channel's :func:`heatmap_scores` and :math:`p_c = s_c / \sum_j s_j`, the channels are
    sorted by :math:`p` (descending) and channel :math:`c` at sorted position :math:`i` is kept iff

    .. math:: \sum_{j \le i} p_{(j)} - r \le \delta,

    i.e. the smallest set of top channels whose mass stays within :math:`r` (so :math:`k` varies per input).
    :math:`r = 1` is the official special case: only channels with :math:`p_c \le \delta` are labelled 0. As in
    the official code, a single channel holding more than :math:`r` of the mass is labelled 0 too (the cumulative
    sum exceeds :math:`r` at the first position). A sample whose activations are all zero gets all zeros (the
    official code divides by zero there and labels every channel 1). Ties are sorted stably (lower index first).

    Args:
        activation: ``(B, C, H, W)`` layer output (after BN and activation).
        mass_ratio: :math:`r` in (0, 1].
        delta: tolerance :math:`\delta`.

    Returns:
        float ``(B, C)`` tensor of 0/1.

    Example:
        >>> a = torch.tensor([0.5, 0.3, 0.2, 0.0]).view(1, 4, 1, 1)
        >>> mass_targets(a, 1.0), mass_targets(a, 0.8), mass_targets(a, 0.7)
        (tensor([[1., 1., 1., 0.]]), tensor([[1., 1., 0., 0.]]), tensor([[1., 0., 0., 0.]]))
    """
    check_number("mass_ratio", mass_ratio, low=0, high=1, low_open=True)
    scores = heatmap_scores(activation).to(torch.float64)
    total = scores.sum(dim=1, keepdim=True)
    normalized = scores / torch.where(total > 0, total, torch.ones_like(total))
    if mass_ratio == 1:
        keep = normalized > delta
    else:
        ordered, order = torch.sort(normalized, dim=1, descending=True, stable=True)
        keep_sorted = (torch.cumsum(ordered, dim=1) - mass_ratio) <= delta
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    keep = keep & (total > 0)
    return keep.to(activation.dtype if activation.is_floating_point() else torch.float32)


def uniform_targets(activation: Tensor, pruning_ratio: float, delta: float = DELTA) -> Tensor:
    """The official ``gt-type uniform`` target: per sample, the ``int(pruning_ratio * C)`` channels with the lowest
    :func:`heatmap_scores` (stable sort) and every channel whose score is at most ``delta`` are labelled 0.

    Example:
        >>> uniform_targets(torch.tensor([0.5, 0.3, 0.2, 0.1]).view(1, 4, 1, 1), 0.5)
        tensor([[1., 1., 0., 0.]])
    """
    check_number("pruning_ratio", pruning_ratio, low=0, high=1, high_open=True)
    scores = heatmap_scores(activation)
    keep = scores > delta
    n = int(pruning_ratio * scores.shape[1])
    if n:
        lowest = torch.sort(scores, dim=1, stable=True).indices[:, :n]
        keep = keep.scatter(1, lowest, False)
    return keep.to(activation.dtype if activation.is_floating_point() else torch.float32)


def mask_loss(logits: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
    r"""The predictors' loss: the mean over layers of :math:`\sum_c \operatorname{mean}_b
    \operatorname{BCEWithLogits}(z_{bc}, t_{bc})` (the official ``compute_mask_loss_per_input``, weight 1).

    Example:
        >>> round(float(mask_loss([torch.zeros(2, 3)], [torch.ones(2, 3)])), 4)  # 3 channels x log 2
        2.0794
    """
    if not logits or len(logits) != len(targets):
        raise ValueError(f"mask_loss needs one target per logit tensor (got {len(logits)} and {len(targets)}).")
    per_layer = [F.binary_cross_entropy_with_logits(z.float(), t.float(), reduction="none").mean(0).sum()
                 for z, t in zip(logits, targets)]
    return torch.stack(per_layer).mean()


def mask_accuracy(logits: Sequence[Tensor], targets: Sequence[Tensor]) -> float:
    """Share of channel decisions (``logit > 0``) that agree with the targets, averaged over layers."""
    accs = [float(((z.detach() > 0).float() == t).float().mean()) for z, t in zip(logits, targets)]
    return sum(accs) / max(1, len(accs))


def conv_macs(conv: nn.Conv2d, out_hw: int, active_out: Tensor, active_in: Tensor) -> Tensor:
    r"""Multiply-accumulates of one conv per sample when only some channels are active (the spec's accounting):

    .. math:: \text{MACs} = k_{out} \cdot H'W' \cdot \left(\frac{k_{in}}{g} \cdot k_h k_w + [\text{bias}]\right)

    with :math:`k_{out}`, :math:`k_{in}` the active output and input channels and :math:`g` the groups. With every
    channel active this is the conv's entry in :func:`~lightning_ext.core.measure.layer_macs`.

    Example:
        >>> conv = nn.Conv2d(4, 8, 3, bias=False)
        >>> conv_macs(conv, 36, torch.tensor([8.0, 4.0]), torch.tensor([4.0, 2.0]))  # dense, then half in and out
        tensor([10368.,  2592.])
    """
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return active_out * out_hw * (active_in / conv.groups * k + (1.0 if conv.bias is not None else 0.0))


def conv_bn_pairs(model: nn.Module, example_input: Any) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` for every ``nn.Conv2d`` whose output tensor goes straight into an ``nn.BatchNorm2d``,
    found by running ``example_input`` through ``model`` (eval mode, no gradient) with hooks; in execution order.

    Raises ``ValueError`` if such a conv runs more than once per forward (shared weights cannot be gated per call).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
        >>> conv_bn_pairs(net, torch.zeros(1, 1, 8, 8))
        [('0', '1')]
    """
    produced: dict[int, tuple[str, Tensor]] = {}
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []
    handles = []

    def conv_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1
            produced[id(output)] = (name, output)  # the tensor is kept so its id cannot be reused meanwhile
        return hook

    def bn_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            hit = produced.get(id(args[0])) if args else None
            if hit is not None and hit[1] is args[0]:
                pairs.append((hit[0], name))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook(name)))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(bn_hook(name)))
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
    twice = sorted({conv for conv, _ in pairs if calls.get(conv, 0) > 1})
    if twice:
        raise ValueError(f"FTWT gates each conv once per forward, but {twice} run more than once (shared weights); "
                         "list the others in `layers` or add these to `ignored_layers`.")
    seen, unique = set(), []
    for pair in pairs:
        if pair not in seen:
            seen.add(pair)
            unique.append(pair)
    return unique


class MaskPredictor(nn.Module):
    """One layer's mask predictor: global average pool of the layer input, softmax over its channels (official
    ``--softmax 1``), then a linear map with bias to one logit per output channel (the official 1x1 conv).

    Example:
        >>> MaskPredictor(4, 6)(torch.randn(2, 4, 5, 5)).shape
        torch.Size([2, 6])
    """

    def __init__(self, in_channels: int, out_channels: int, softmax: bool = True) -> None:
        super().__init__()
        self.softmax = bool(softmax)
        self.linear = nn.Linear(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, C_out)`` from a layer input ``(B, C_in, H, W)``."""
        pooled = x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)
        if self.softmax:
            pooled = torch.softmax(pooled, dim=1)
        return self.linear(pooled)


#: a gate override for controls: ``(predictor key, logits (B, C), layer output (B, C, H, W)) -> gate (B, C) of 0/1``
GateOverride = Callable[[str, Tensor, Tensor], Tensor]


class FTWTGating:
    r"""Gates every selected ``Conv2d -> BatchNorm2d`` pair of ``model`` per input with its own mask predictor.

    For a pair with input :math:`x` and BN output :math:`y`, a forward hook replaces :math:`y` with
    :math:`y \odot g` where :math:`g_c = 1[\sigma(z_c) > 0.5]`, :math:`z = P(\operatorname{sg}(x))` the
    predictor's logits on the *detached* layer input (the official ``decoupled`` mode) and the gate computed without
    gradient, so the task loss never trains the predictor. For an activation with :math:`f(0) = 0` after the BN
    (ReLU, GELU, SiLU) this equals the official gating of the activation's output. While :attr:`recording`, each
    gated layer stores its logits and the :func:`mass_targets` (or :func:`uniform_targets`) of
    :math:`\operatorname{ReLU}(y)` (``activation="relu"``, the official layer output) or of :math:`y`
    (``"none"``); :meth:`loss` turns them into :func:`mask_loss`. While :attr:`measuring`, per-sample MACs of the
    gated convs are accumulated with :func:`conv_macs`: active outputs are the gate's ones; an input channel counts
    as active unless it is exactly zero for that sample (a gated channel of the layer feeding it, or one its ReLU
    silenced), which is what a gather-conv could skip before running the conv.

    Residual networks: a BN whose output is added to a shortcut is gated before the sum, so only the branch's
    channels are zeroed (the official code gates the block output after the sum).

    Args:
        model: the network; hooks go on its modules (:meth:`attach`), the predictors live here.
        example_input: one input batch, to find the pairs (:func:`conv_bn_pairs`).
        mass_ratio: :math:`r` of :func:`mass_targets`, in (0, 1].
        target: ``"mass"`` (default) or ``"uniform"`` (:func:`uniform_targets` with ``pruning_ratio``).
        pruning_ratio: share of channels labelled 0 per sample for ``target="uniform"``, in [0, 1).
        softmax: softmax over the pooled input channels in each predictor (official default).
        activation: ``"relu"`` or ``"none"``: what the heat-map score is taken of.
        layers: conv names or globs to gate (``None``: every conv followed by a BN).
        ignored_layers: conv names or globs never gated.
        seed: seed of the predictors' initial weights (the global RNG is left alone).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        >>> gating = FTWTGating(net, torch.zeros(1, 1, 6, 6), mass_ratio=0.9).attach()
        >>> list(gating.predictors)
        ['0', '3']
        >>> opt = torch.optim.SGD(gating.predictors.parameters(), lr=0.1)
        >>> out = net(torch.randn(4, 1, 6, 6)); loss = gating.loss(); loss.backward(); opt.step()
        >>> summary = gating.summary(); 0 <= summary["macs"] <= summary["dense_macs"]
        True
        >>> gating.detach()
    """

    def __init__(self, model: nn.Module, example_input: Any, mass_ratio: float = 1.0, target: Target = "mass",
                 pruning_ratio: float = 0.0, softmax: bool = True, activation: Activation = "relu",
                 layers: Optional[Sequence[str]] = None, ignored_layers: Optional[Sequence[str]] = None,
                 seed: int = 0, owner: str = "FTWT") -> None:
        check_number("mass_ratio", mass_ratio, low=0, high=1, low_open=True)
        check_choice("target", target, get_args(Target))
        check_number("pruning_ratio", pruning_ratio, low=0, high=1, high_open=True)
        check_choice("activation", activation, get_args(Activation))
        check_number("seed", seed, integer=True)
        self.model = model
        self.mass_ratio, self.target, self.pruning_ratio = float(mass_ratio), target, float(pruning_ratio)
        self.activation, self.seed = activation, int(seed)
        pairs = conv_bn_pairs(model, example_input)
        eligible = [conv for conv, _ in pairs]
        what = f"the convs followed by a BatchNorm2d in {type(model).__name__} ({', '.join(eligible) or 'none'})"
        chosen = match_names(eligible, layers, "layers", what) if layers is not None else eligible
        ignored = set(match_names(eligible, ignored_layers, "ignored_layers", what))
        self.pairs = [(c, b) for c, b in pairs if c in chosen and c not in ignored]
        if not self.pairs:
            convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
            raise ValueError(
                f"{owner} found no Conv2d followed by a BatchNorm2d to gate in {type(model).__name__} ({convs} "
                f"Conv2d, {len(pairs)} conv+BN pairs; layers={layers!r}, ignored_layers={ignored_layers!r}). "
                "FTWT needs conv -> BatchNorm2d layers; change `layers`/`ignored_layers` or the model."
            )
        self.keys = {conv: conv.replace(".", "_") for conv, _ in self.pairs}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.predictors = nn.ModuleDict({
                self.keys[conv]: MaskPredictor(model.get_submodule(conv).in_channels,
                                               model.get_submodule(conv).out_channels, softmax)
                for conv, _ in self.pairs
            })
        param = next(model.parameters(), None)
        if param is not None:
            self.predictors.to(param.device)
        self.recording = True  #: store logits and targets for :meth:`loss` (only while grad is enabled)
        self.measuring = True  #: accumulate dynamic MACs for :meth:`summary`
        self.override: Optional[GateOverride] = None  #: replaces the predicted gate (controls, static baselines)
        self._handles: list = []
        self._inputs: dict[str, Tensor] = {}
        self._logits: list[Tensor] = []
        self._targets: list[Tensor] = []
        self.reset_stats()

    # -- hooks ------------------------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """Whether the hooks are on the model."""
        return bool(self._handles)

    def attach(self) -> "FTWTGating":
        """Put the hooks on the model (idempotent); returns ``self``."""
        if self._handles:
            return self
        for conv_name, bn_name in self.pairs:
            conv, bn = self.model.get_submodule(conv_name), self.model.get_submodule(bn_name)
            self._handles.append(conv.register_forward_pre_hook(self._conv_hook(conv_name)))
            self._handles.append(bn.register_forward_hook(self._bn_hook(conv_name, conv)))
        return self

    def detach(self) -> None:
        """Remove the hooks; the model runs dense again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._inputs.clear()
        self.clear()

    def _conv_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self._inputs[name] = args[0]
        return hook

    def _bn_hook(self, name: str, conv: nn.Conv2d) -> Callable:
        key = self.keys[name]

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            x = self._inputs.pop(name, None)
            if x is None:  # the BN ran without its conv (not the traced graph): leave it alone
                return output
            x = x.detach()
            record = self.recording and torch.is_grad_enabled()
            with torch.set_grad_enabled(record):
                logits = self.predictors[key](x)
            gate = (logits.detach() > 0).to(output.dtype)
            if self.override is not None:
                act = F.relu(output) if self.activation == "relu" else output
                gate = self.override(key, logits.detach(), act.detach()).to(device=output.device, dtype=output.dtype)
            if record:
                with torch.no_grad():
                    act = F.relu(output) if self.activation == "relu" else output
                    target = (mass_targets(act, self.mass_ratio) if self.target == "mass"
                              else uniform_targets(act, self.pruning_ratio))
                self._logits.append(logits)
                self._targets.append(target.to(logits.dtype))
            if self.measuring:
                with torch.no_grad():
                    hw = output.shape[2] * output.shape[3]
                    active_in = (x.abs().amax(dim=(2, 3)) > 0).sum(1).to(torch.float64)
                    active_out = gate.sum(1).to(torch.float64)
                    dyn = conv_macs(conv, hw, active_out, active_in)
                    full = conv_macs(conv, hw, torch.tensor(float(conv.out_channels), dtype=torch.float64),
                                     torch.tensor(float(conv.in_channels), dtype=torch.float64))
                    stats = self._stats[key]
                    stats[0] += float(dyn.sum())
                    stats[1] += float(full) * x.shape[0]
                    stats[2] += float(active_out.sum())
                    stats[3] += float(x.shape[0])
            return output * gate[:, :, None, None]
        return hook

    # -- loss -------------------------------------------------------------------------------------------------
    def loss(self) -> Tensor:
        """:func:`mask_loss` of the logits and targets recorded since the last call (then cleared)."""
        if not self._logits:
            raise RuntimeError("FTWT recorded no predictor outputs: run a forward pass with recording on and "
                               "gradients enabled first.")
        logits, targets = self._logits, self._targets
        self.clear()
        self.last_accuracy = mask_accuracy(logits, targets)
        return mask_loss(logits, targets)

    def has_records(self) -> bool:
        """Whether logits and targets are waiting for :meth:`loss`."""
        return bool(self._logits)

    def clear(self) -> None:
        """Drop the recorded logits and targets."""
        self._logits, self._targets = [], []

    # -- dynamic MACs -----------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero the MACs accumulators."""
        self._stats = {key: [0.0, 0.0, 0.0, 0.0] for key in self.keys.values()}

    def stats_tensor(self) -> Tensor:
        """The accumulators as one float64 tensor (``(layers, 4)``: dynamic MACs, dense MACs, active outputs,
        samples), e.g. to sum across processes; :meth:`load_stats_tensor` puts a summed one back."""
        return torch.tensor([self._stats[k] for k in self.keys.values()], dtype=torch.float64)

    def load_stats_tensor(self, stats: Tensor) -> None:
        """Install accumulators from :meth:`stats_tensor`'s layout."""
        for key, row in zip(self.keys.values(), stats.detach().cpu().tolist()):
            self._stats[key] = list(row)

    def summary(self) -> dict[str, Any]:
        """Mean per-sample MACs of the gated convs since :meth:`reset_stats`: ``macs`` (dynamic), ``dense_macs``,
        ``macs_reduction`` (1 - dynamic/dense) and ``keep`` (mean share of active output channels per layer)."""
        dyn = dense = 0.0
        keep = {}
        for conv, key in self.keys.items():
            d, full, active, n = self._stats[key]
            if n:
                dyn += d / n
                dense += full / n
                keep[conv] = active / n / self.model.get_submodule(conv).out_channels
        return {"macs": dyn, "dense_macs": dense, "macs_reduction": 1 - dyn / dense if dense else 0.0, "keep": keep}

    # -- state ------------------------------------------------------------------------------------------------
    def to(self, device: Any) -> "FTWTGating":
        """Move the predictors."""
        self.predictors.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The gated pairs and the predictors' weights (CPU tensors and plain values)."""
        return {"pairs": [list(p) for p in self.pairs],
                "predictors": {k: v.detach().cpu().clone() for k, v in self.predictors.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses a state saved for other layers."""
        pairs = [tuple(p) for p in state.get("pairs", [])]
        if pairs and pairs != self.pairs:
            raise ValueError(f"the saved FTWT state gates {[c for c, _ in pairs]}, this model "
                             f"{[c for c, _ in self.pairs]}; use the same model and `layers`.")
        self.predictors.load_state_dict(state["predictors"])
