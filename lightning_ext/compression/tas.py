r"""TAS: width search with learnable distributions over candidate channel counts, then a physically thinner copy.

Paper: Dong & Yang, "Network Pruning via Transformable Architecture Search", NeurIPS 2019, arXiv 1905.09717.
Reference code: https://github.com/D-X-Y/AutoDL-Projects (``docs/NeurIPS-2019-TAS.md``,
``xautodl/models/shape_searchs/``, ``xautodl/procedures/search_main.py``).

For every searched conv :math:`l` with :math:`C_l` filters there is a categorical distribution
:math:`p_l = \mathrm{softmax}(\alpha_l)` over candidate widths :math:`c_{l,j}` (default: ``int(C_l r)`` for
:math:`r \in \{0.3, 0.4, \dots, 1.0\}`, the reference code's choices). In each forward two widths are drawn
with Gumbel-softmax noise (:func:`gumbel_select2`), both feature maps are aligned to the larger width by
**channel-wise interpolation** (:func:`channel_wise_interpolation`, an adaptive average over channel windows) and
summed with the two Gumbel-softmax weights; channels beyond the larger width are zero, so the next layer sees
exactly the reference code's zero-filled input. The expected cost uses the expected widths
:math:`E[C_l] = \sum_j p_{l,j} c_{l,j}` (independent layers, so a layer's expected cost is the product of the
expected input and output shares, Eq. 6 of the paper):

.. math::
    E[\mathrm{MACs}] = \sum_{L} \mathrm{MACs}_L \prod_{l \in S(L)} \frac{E[C_l]}{C_l},\qquad
    L_{flop} = \begin{cases} \log E[\mathrm{MACs}] & F(\arg\max) > F_{target} \\
    -\log E[\mathrm{MACs}] & F(\arg\max) < F_{target} - \epsilon F_{dense} \\ 0 & \text{otherwise}\end{cases}

where :math:`\mathrm{MACs}_L` is leaf layer :math:`L`'s cost in the dense model (:mod:`lightning_ext.core.measure`'s
convention), :math:`S(L)` the searched layers whose channels it reads or writes (found by removing channels with
the library's pruning engine and seeing which layers' costs move), :math:`F(\arg\max)` the cost of the most likely
widths and :math:`\epsilon` the tolerance (``flops_tolerance``, 0.05 in the reference scripts). The architecture
loss is :math:`\mathrm{CE} + \lambda_{cost} L_{flop}` (:math:`\lambda_{cost}=2`); Gumbel :math:`\tau` follows a
cosine from 5 to 0.1 (:func:`tau_at`). After the search the most likely width of each layer is kept by removing
the trailing filters with :func:`~lightning_ext.compression.plan.apply_pruning_history` (one channel-removal
engine for the whole library), and the thinner network is retrained with knowledge distillation from the dense
one (:class:`~lightning_ext.distillation.KnowledgeDistillation`).

Scope (ours): width only (the paper's depth search is not implemented); one shared BatchNorm per layer instead of
one BatchNorm per candidate width (BatchNorm is per channel, so a prefix of channels is normalised the same way);
the searched layers are convs whose filters form a group of their own in the dependency graph (convs tied by a
residual sum keep their width; :attr:`WidthSearch.skipped` says why each one was left out).

Example:
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Conv2d(1, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(),
    ...                     nn.Conv2d(10, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU(),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 3))
    >>> search = WidthSearch(net, torch.zeros(1, 1, 8, 8))
    >>> search.choices
    {'0': [3, 4, 5, 6, 7, 8, 9, 10], '3': [6, 8, 10, 12, 14, 16, 18, 20]}
    >>> search.attach()
    >>> net(torch.randn(4, 1, 8, 8)).shape
    torch.Size([4, 3])
    >>> round(search.expected_macs().item() / search.dense_macs, 2)  # E[MACs] share under near-uniform logits
    0.45
    >>> with torch.no_grad():
    ...     _ = search.logits[0].copy_(torch.arange(8.0)); _ = search.logits[1].copy_(-torch.arange(8.0))
    >>> search.widths(), round(search.current_macs() / search.dense_macs, 3)
    ({'0': 10, '3': 6}, 0.345)
    >>> search.prune(net, torch.zeros(1, 1, 8, 8))  # the pruning engine removes the trailing filters
    [['3', True, [6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]]
    >>> net[3].out_channels, net[4].num_features, net[8].in_features
    (6, 6, 6)
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_ext.compression.graph import PruningError, prunable_filter_groups
from lightning_ext.compression.plan import apply_pruning_history
from lightning_ext.core.measure import count_macs_params, layer_macs, trial_copy
from lightning_ext.core.validation import check_number, check_positive

__all__ = ["DEFAULT_WIDTH_RATIOS", "WidthSearch", "channel_wise_interpolation", "gumbel_select2", "tas_flops_loss",
           "tau_at", "width_choices"]

#: The reference code's candidate shares of a layer's channels (``get_width_choices``).
DEFAULT_WIDTH_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def width_choices(channels: int, ratios: Sequence[float] = DEFAULT_WIDTH_RATIOS) -> list[int]:
    """Candidate widths of a layer with ``channels`` filters: ``int(channels * r)`` (at least 1), sorted, unique,
    always including ``channels``.

    Example:
        >>> width_choices(16)
        [4, 6, 8, 9, 11, 12, 14, 16]
    """
    return sorted({max(1, int(channels * r)) for r in ratios} | {int(channels)})


def channel_wise_interpolation(x: Tensor, channels: int) -> Tensor:
    """Resize the channel dimension of ``x`` (N, C, H, W) to ``channels`` by averaging adaptive channel windows:
    output channel ``k`` is the mean of input channels ``floor(k C / c) .. ceil((k + 1) C / c) - 1``
    (the reference code's ``ChannelWiseInter``).

    Example:
        >>> channel_wise_interpolation(torch.arange(3.0).view(1, 3, 1, 1), 2).flatten().tolist()
        [0.5, 1.5]
    """
    if x.dim() != 4:
        raise ValueError(f"channel-wise interpolation needs (N, C, H, W) feature maps, got shape {tuple(x.shape)}.")
    if x.shape[1] == channels:
        return x
    n, _, h, w = x.shape
    return F.adaptive_avg_pool3d(x.unsqueeze(1), (channels, h, w)).squeeze(1)


def gumbel_select2(logits: Tensor, tau: float, generator: Optional[torch.Generator] = None,
                   eps: float = 1e-7) -> tuple[Tensor, Tensor]:
    r"""Draw two distinct candidates of a categorical distribution with Gumbel noise, and their mixing weights.

    :math:`\tilde z = (\log\mathrm{softmax}(\alpha) + g)/\tau` with :math:`g \sim \mathrm{Gumbel}(0, 1)`; two
    indices are drawn without replacement from :math:`\mathrm{softmax}(\tilde z)`; their weights are the softmax of
    :math:`\tilde z` over the two (differentiable in :math:`\alpha`). As the reference code's ``select2withP``.

    Returns:
        ``(indices, weights)``, two of each.
    """
    if logits.numel() < 2:
        raise ValueError("gumbel_select2 needs at least two candidates.")
    if tau <= 0:
        z = logits.log_softmax(-1)
    else:
        u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device="cpu").to(logits.device)
        gumbels = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
        z = (logits.log_softmax(-1) + gumbels) / tau
    with torch.no_grad():
        probs = F.softmax(z.detach(), -1).cpu() + eps
        index = torch.multinomial(probs, 2, replacement=False, generator=generator).to(logits.device)
    return index, F.softmax(z[index], -1)


def tas_flops_loss(expected: Tensor, current: float, target: float, tolerance: float) -> Tensor:
    r"""The TAS cost loss: :math:`\log E` when the most likely architecture costs more than ``target``,
    :math:`-\log E` when it costs less than ``target - tolerance``, else 0 (same units for all three costs).

    Example:
        >>> e = torch.tensor(100.0, requires_grad=True)
        >>> [round(float(tas_flops_loss(e, c, 50.0, 5.0)), 3) for c in (60.0, 48.0, 40.0)]
        [4.605, 0.0, -4.605]
    """
    expected = expected.mean()
    if current > target:
        return torch.log(expected)
    if current < target - tolerance:
        return -torch.log(expected)
    return expected.new_zeros(())


def tau_at(progress: float, tau_max: float = 5.0, tau_min: float = 0.1) -> float:
    """Gumbel temperature at ``progress`` in [0, 1] of the search: a half cosine from ``tau_max`` to ``tau_min``.

    Example:
        >>> [round(tau_at(p), 3) for p in (0.0, 0.5, 1.0)]
        [5.0, 2.55, 0.1]
    """
    progress = min(max(float(progress), 0.0), 1.0)
    return tau_min + (tau_max - tau_min) * (1 + math.cos(math.pi * progress)) / 2


def _hook_module(model: nn.Module, root: str, example_inputs: Any) -> tuple[str, set[str]]:
    """Where a searched conv's output is mixed (its own BatchNorm if it has exactly one, else the conv) and which
    layers' weights follow its output channels, found by removing one channel with the pruning engine."""
    trial = trial_copy(model)
    apply_pruning_history(trial, [[root, True, [0]]], example_inputs)
    from lightning_ext.compression.plan import recorded_channel_changes

    lost = recorded_channel_changes(trial)[-1]
    norms = [n for n, dims in lost.items() if n != root and 0 in dims
             and isinstance(model.get_submodule(n), nn.modules.batchnorm._BatchNorm)]
    return (norms[0] if len(norms) == 1 else root), set(lost)


class WidthSearch(nn.Module):
    """The TAS width search space of a model: architecture logits, the mixing hooks and the cost model.

    Args:
        model: the network to search (plain ``nn.Module`` or a LightningModule; layer names are relative to it).
            It is not changed until :meth:`attach` (hooks) or :meth:`prune`.
        example_inputs: a batch of inputs for tracing and counting MACs.
        width_ratios: candidate shares of each layer's channels, in (0, 1] (1.0 is always added).
        ignored_layers: conv names or globs whose width is kept.
        seed: seed of the logits' initialisation and of the Gumbel draws.

    Attributes:
        choices: ``conv name -> candidate widths`` for every searched conv.
        skipped: ``conv name -> why it is not searched``.
        dense_macs: MACs of one sample of the dense model.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, width_ratios: Sequence[float] = DEFAULT_WIDTH_RATIOS,
                 ignored_layers: Optional[Sequence[str]] = None, seed: int = 0) -> None:
        super().__init__()
        if isinstance(width_ratios, (str, bytes)) or not len(width_ratios):
            raise ValueError(f"`width_ratios` must be a non-empty list of shares in (0, 1], got {width_ratios!r}.")
        for i, r in enumerate(width_ratios):
            check_number(f"width_ratios[{i}]", r, low=0, high=1, low_open=True)
        self._model = [model]  # not a submodule: the search's state_dict holds only its own tensors
        self.generator = torch.Generator().manual_seed(int(seed))
        self.tau = 5.0
        self.mode = "sample"  # "sample" (Gumbel mixing), "argmax" (the most likely widths) or "off"
        self.choices: dict[str, list[int]] = {}
        self.skipped: dict[str, str] = {}
        self._hooks: list = []
        self._selection: dict[str, tuple[Tensor, Tensor]] = {}
        groups = prunable_filter_groups(model, example_inputs, ignored_layers)
        self.hook_names: dict[str, str] = {}
        for g in groups:
            if len(set(g.member_names()) - {g.root}) or g.tied is not None or g.refusal:
                self.skipped[g.root] = "its filters are tied to other convs (residual sum or grouped conv)"
                continue
            widths = width_choices(g.channels, width_ratios)
            if len(widths) < 2:
                self.skipped[g.root] = f"one candidate width only ({g.channels} channels)"
                continue
            self.choices[g.root] = widths
            self.hook_names[g.root] = _hook_module(model, g.root, example_inputs)[0]
        if not self.choices:
            raise PruningError(
                f"{type(model).__name__} has no conv whose width TAS can search"
                + (f" ({'; '.join(f'{k}: {v}' for k, v in self.skipped.items())})" if self.skipped else "")
                + ": it needs Conv2d layers with their own filters that do not feed the output directly."
            )
        init = torch.Generator().manual_seed(int(seed))
        self.logits = nn.ParameterList([nn.Parameter(torch.randn(len(w), generator=init) * 0.01)
                                        for w in self.choices.values()])
        self._cost_model(model, example_inputs)

    # -- the cost model ---------------------------------------------------------------------------------------
    def _cost_model(self, model: nn.Module, example_inputs: Any) -> None:
        """Each leaf layer's MACs as a multilinear function of the searched convs' channel shares.

        A layer's cost is multilinear in the channel counts it reads and writes (a conv's is ``in x out`` plus a
        bias term in ``out``), so it is fixed by its MACs at the corners ``share in {h, 1}`` of the searched convs
        it depends on: the dense model and copies thinned to ``h`` (about half) through the pruning engine,
        counted by :func:`lightning_ext.core.measure.layer_macs`. Which convs a layer depends on is read from the
        single-conv copies (its MACs move when that conv is thinned)."""
        self.dense_macs, self.dense_params = count_macs_params(model, example_inputs)
        roots = list(self.choices)
        self._half = [max(1, w[-1] // 2) / w[-1] for w in self.choices.values()]
        corners: dict[frozenset, dict[str, int]] = {}

        def costs(subset: frozenset) -> dict[str, int]:
            if subset not in corners:
                trial = model if not subset else trial_copy(model)
                ops = [[roots[i], True, list(range(max(1, self.choices[roots[i]][-1] // 2),
                                                   self.choices[roots[i]][-1]))] for i in sorted(subset)]
                if ops:
                    apply_pruning_history(trial, ops, example_inputs)
                corners[subset] = layer_macs(trial, example_inputs)
            return corners[subset]

        dense = costs(frozenset())
        self.layer_factors: dict[str, list[int]] = {k: [] for k in dense}
        for i in range(len(roots)):
            after = costs(frozenset([i]))
            for name, cost in dense.items():
                if cost and after.get(name, 0) != cost:
                    self.layer_factors[name].append(i)
        # per layer: the MACs at every corner (subset of its factors thinned), for multilinear interpolation
        self.layer_corners: dict[str, list[tuple[tuple[int, ...], float]]] = {}
        for name, factors in self.layer_factors.items():
            if len(factors) > 4:
                raise PruningError(f"Layer {name!r} depends on the widths of {len(factors)} searched convs; TAS's "
                                   "cost model handles at most 4. Add some of them to `ignored_layers`.")
            table = []
            for mask in range(2 ** len(factors)):
                subset = tuple(f for b, f in enumerate(factors) if mask >> b & 1)
                table.append((subset, float(costs(frozenset(subset)).get(name, 0))))
            self.layer_corners[name] = table
        self.layer_costs = {k: float(v) for k, v in dense.items()}
        self.fixed_macs = float(self.dense_macs) - sum(self.layer_costs.values())  # anything not per layer

    def _macs(self, shares: list[Tensor]) -> Tensor:
        shares = [s.double() for s in shares]
        total = shares[0].new_tensor(self.fixed_macs)
        for name, table in self.layer_corners.items():
            factors = self.layer_factors[name]
            for thinned, cost in table:
                if not cost:
                    continue
                term = shares[0].new_tensor(cost)
                for i in factors:  # multilinear weight of this corner: share h (thinned) or 1 (dense)
                    h = self._half[i]
                    term = term * ((1 - shares[i]) if i in thinned else (shares[i] - h)) / (1 - h)
                total = total + term
        return total

    def _choice_tensors(self) -> list[Tensor]:
        return [torch.tensor(w, dtype=a.dtype, device=a.device) for w, a in zip(self.choices.values(), self.logits)]

    def expected_macs(self) -> Tensor:
        """E[MACs] of one sample under the current distributions (differentiable in the logits)."""
        shares = [(F.softmax(a, -1) * c).sum() / c[-1] for a, c in zip(self.logits, self._choice_tensors())]
        return self._macs(shares)

    def widths(self) -> dict[str, int]:
        """The most likely width of every searched conv."""
        return {root: w[int(torch.argmax(a.detach()))] for (root, w), a in zip(self.choices.items(), self.logits)}

    def set_widths(self, widths: dict[str, int]) -> None:
        """Make ``widths`` (one of each conv's candidates) the most likely ones (logits +1 there, -1 elsewhere)."""
        with torch.no_grad():
            for (root, choices), a in zip(self.choices.items(), self.logits):
                if widths[root] not in choices:
                    raise ValueError(f"width {widths[root]} of {root!r} is not one of its candidates {choices}.")
                a.fill_(-1.0)
                a[choices.index(widths[root])] = 1.0

    def macs_of(self, widths: dict[str, int]) -> float:
        """The cost model's MACs of one sample for the given widths (absent layers: full width)."""
        ref = self.logits[0].detach()
        shares = [ref.new_tensor(widths.get(root, w[-1]) / w[-1]) for root, w in self.choices.items()]
        return float(self._macs(shares))

    def current_macs(self) -> float:
        """MACs of the most likely architecture (the reference code's ``get_flop("genotype")``)."""
        return self.macs_of(self.widths())

    def project_widths(self, macs_reduction: float, tolerance: float,
                       widths: Optional[dict[str, int]] = None) -> dict[str, int]:
        """Move ``widths`` (default: the most likely ones) into the cost band of the loss, ``[target - tolerance,
        target]`` (shares of the dense MACs, ``target = 1 - macs_reduction``), one candidate step at a time, each
        step the one that gives up the least log-probability of the learned distributions per MAC moved.

        Ours (the reference code keeps the argmax even outside the band): with few architecture steps the
        distributions stay nearly uniform and their argmax lands anywhere near the target; the projection keeps
        the learned preferences and meets the target. Widths already in the band are returned unchanged; if no
        sequence of single steps reaches the band, the widths closest to it are returned.

        Example:
            >>> net = nn.Sequential(nn.Conv2d(1, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 20, 3, padding=1),
            ...                     nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 3))
            >>> search = WidthSearch(net, torch.zeros(1, 1, 8, 8))
            >>> widths = search.project_widths(0.5, 0.05)
            >>> 0.45 <= search.macs_of(widths) / search.dense_macs <= 0.5
            True
        """
        check_number("macs_reduction", macs_reduction, low=0, high=1, low_open=True, high_open=True)
        check_number("tolerance", tolerance, low=0, high=1)
        high = (1 - macs_reduction) * self.dense_macs
        low = high - tolerance * self.dense_macs
        current = dict(self.widths() if widths is None else widths)
        logp = {root: F.log_softmax(a.detach().double(), -1) for root, a in zip(self.choices, self.logits)}

        def gap(macs: float) -> float:
            return max(low - macs, macs - high, 0.0)

        best, best_gap = dict(current), gap(self.macs_of(current))
        for _ in range(sum(len(c) for c in self.choices.values())):
            macs = self.macs_of(current)
            if gap(macs) == 0:
                return current
            shrink = macs > high
            options = []
            for root, choices in self.choices.items():
                i = choices.index(current[root])
                j = i - 1 if shrink else i + 1
                if not 0 <= j < len(choices):
                    continue
                trial = {**current, root: choices[j]}
                after = self.macs_of(trial)
                moved = abs(after - macs)
                if moved <= 0 or (not shrink and after > high):  # growing must not overshoot the band
                    continue
                options.append((float(logp[root][i] - logp[root][j]) / moved, root, choices[j], after))
            if not options:
                break
            _, root, width, after = min(options)
            current[root] = width
            if gap(after) < best_gap:
                best, best_gap = dict(current), gap(after)
        return best if gap(self.macs_of(current)) > best_gap else current

    def min_macs(self) -> tuple[float, str, float]:
        """MACs with every searched conv at its smallest candidate, the leaf layer that then costs most, and its
        share of the dense MACs."""
        smallest = {root: w[0] for root, w in self.choices.items()}
        shares = [self.logits[0].new_tensor(smallest[r] / w[-1]) for r, w in self.choices.items()]
        per_layer = {}
        for name in self.layer_corners:
            saved, self.layer_corners = self.layer_corners, {name: self.layer_corners[name]}
            fixed, self.fixed_macs = self.fixed_macs, 0.0
            try:
                per_layer[name] = float(self._macs(shares))
            finally:
                self.layer_corners, self.fixed_macs = saved, fixed
        worst = max(per_layer, key=per_layer.get)
        return self.macs_of(smallest), worst, per_layer[worst] / self.dense_macs

    def check_reachable(self, macs_reduction: float, error: type[Exception] = ValueError) -> None:
        """Raise ``error`` (one line naming the limiting layer) when the smallest widths stay above the target."""
        floor, worst, share = self.min_macs()
        if floor > (1 - macs_reduction) * self.dense_macs:
            module = self._model[0].get_submodule(worst)
            searched = [r for i, r in enumerate(self.choices) if i in self.layer_factors[worst]]
            why = (f"its width is not searched" if not searched else
                   f"already at the smallest candidate widths of {searched}")
            raise error(
                f"macs_reduction={macs_reduction} cannot be reached: with every searched layer at its smallest "
                f"candidate width the model keeps {floor / self.dense_macs:.1%} of its MACs, and layer {worst!r} "
                f"({type(module).__name__}) alone keeps {share:.1%} ({why}). Lower `macs_reduction`, add smaller "
                f"`width_ratios`, or shorten `ignored_layers`."
            )

    # -- the mixing hooks -------------------------------------------------------------------------------------
    def resample(self) -> None:
        """Draw the two widths (and their differentiable weights) of every searched conv for the next forward."""
        self._selection = {root: gumbel_select2(a, self.tau, self.generator)
                           for root, a in zip(self.choices, self.logits)}

    def _mix(self, root: str, out: Tensor) -> Tensor:
        widths = self.choices[root]
        channels = out.shape[1]
        if self.mode == "argmax":
            keep = self.widths()[root]
            return torch.cat([out[:, :keep], out.new_zeros(out.shape[0], channels - keep, *out.shape[2:])], 1)
        if root not in self._selection:
            self.resample()
        index, weight = self._selection[root]
        a, b = (widths[int(i)] for i in index)
        top = max(a, b)
        mixed = (channel_wise_interpolation(out[:, :a], top) * weight[0]
                 + channel_wise_interpolation(out[:, :b], top) * weight[1])
        return torch.cat([mixed, out.new_zeros(out.shape[0], channels - top, *out.shape[2:])], 1)

    def attach(self, model: Optional[nn.Module] = None) -> None:
        """Install the mixing hooks on the model's searched layers (idempotent)."""
        self.detach()
        model = model if model is not None else self._model[0]
        self._model = [model]
        for root, name in self.hook_names.items():
            def hook(module, args, out, root=root):
                return out if self.mode == "off" else self._mix(root, out)

            self._hooks.append(model.get_submodule(name).register_forward_hook(hook))

    def detach(self) -> None:
        """Remove the mixing hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- the result -------------------------------------------------------------------------------------------
    def pruning_history(self) -> list:
        """The searched widths as pruning-engine history entries: each searched conv loses its trailing filters."""
        return [[root, True, list(range(w, self.choices[root][-1]))]
                for root, w in self.widths().items() if w < self.choices[root][-1]]

    def prune(self, model: Optional[nn.Module] = None, example_inputs: Any = None) -> list:
        """Remove the filters beyond the most likely widths from ``model`` (default: the searched model) in place,
        through :func:`~lightning_ext.compression.plan.apply_pruning_history`; returns the history applied."""
        model = model if model is not None else self._model[0]
        self.detach()
        ops = self.pruning_history()
        if ops:
            apply_pruning_history(model, ops, example_inputs)
        return ops

    def extra_state(self) -> dict:
        """The Gumbel generator's state and the temperature (the logits are in ``state_dict``)."""
        return {"generator": self.generator.get_state(), "tau": float(self.tau)}

    def load_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.tau = float(state["tau"])


def search_step(model: nn.Module, search: WidthSearch, weight_optimizer: torch.optim.Optimizer,
                arch_optimizer: torch.optim.Optimizer, base_batch: tuple[Tensor, Tensor],
                arch_batch: tuple[Tensor, Tensor], macs_reduction: float, flops_weight: float = 2.0,
                flops_tolerance: float = 0.05) -> dict[str, float]:
    """One iteration of the reference search loop: a weight step on ``base_batch`` (cross-entropy of the
    Gumbel-mixed network), then an architecture step on ``arch_batch`` (cross-entropy + ``flops_weight`` x the cost
    loss). Hooks must be attached. Returns the losses and costs for logging."""
    x, y = base_batch
    search.resample()
    weight_optimizer.zero_grad()
    base_loss = F.cross_entropy(model(x), y)
    base_loss.backward()
    weight_optimizer.step()
    return {"base_loss": base_loss.item(), **arch_step(model, search, arch_optimizer, arch_batch, macs_reduction,
                                                      flops_weight, flops_tolerance)}


def arch_step(model: nn.Module, search: WidthSearch, arch_optimizer: torch.optim.Optimizer,
              batch: tuple[Tensor, Tensor], macs_reduction: float, flops_weight: float = 2.0,
              flops_tolerance: float = 0.05) -> dict[str, float]:
    """One architecture step: cross-entropy of the mixed network on ``batch`` plus ``flops_weight`` x
    :func:`tas_flops_loss`; only the logits get gradients (the network's ``.grad`` is not touched)."""
    x, y = batch
    search.resample()
    ce = F.cross_entropy(model(x), y)
    current = search.current_macs()
    target = (1 - macs_reduction) * search.dense_macs
    flop = tas_flops_loss(search.expected_macs(), current, target, flops_tolerance * search.dense_macs)
    loss = ce + flops_weight * flop
    params = list(search.logits)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    arch_optimizer.zero_grad()
    for p, g in zip(params, grads):
        p.grad = g if g is not None else torch.zeros_like(p)
    arch_optimizer.step()
    return {"arch_ce": ce.item(), "flops_loss": flop.item(), "current_macs": current,
            "macs_share": current / search.dense_macs}


def arch_optimizer_for(search: WidthSearch, lr: float = 1e-3, weight_decay: float = 1e-3) -> torch.optim.Adam:
    """The reference code's architecture optimiser: Adam, betas (0.5, 0.999)."""
    return torch.optim.Adam(search.parameters(), lr=lr, betas=(0.5, 0.999), weight_decay=weight_decay)
