"""DSnoT (Zhang et al., ICLR 2024, arXiv:2310.08915; https://github.com/zyxxmu/DSnoT): training-free grow-and-prune
of a sparse mask, block by block on calibration data. Pure core :func:`dsnot_prune` (per-layer steps
:func:`wanda_scores`, :func:`initial_mask`, :func:`dsnot_mask`) and the :class:`DSnoT` callback."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterable, Literal, Optional, Sequence, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_ext.compression.graph import PruningError
from lightning_ext.core.inputs import batch_inputs, first_train_loader
from lightning_ext.core.io import atomic_write_json
from lightning_ext.core.layers import match_names
from lightning_ext.core.paths import output_path
from lightning_ext.core.strategy import refuse_sharded_strategy
from lightning_ext.core.validation import (NonNegativeFloat, NonNegativeInt, OpenUnitInterval, PositiveInt,
                                           check_choice, check_number)

__all__ = ["DSnoT", "DSnoTReport", "dsnot_mask", "dsnot_prune", "initial_mask", "parse_nm_pattern", "wanda_scores"]

Init = Literal["wanda", "magnitude"]
ApplyAt = Literal["fit_end", "test_start"]
Split = Literal["train", "val"]

#: The reference code's ``update_threshold``, in its units: ``mu_j`` is the SUM of ``x_j`` over a sample's tokens,
#: averaged over samples (a per-token threshold of 0.1/T for samples of T tokens: 0.1/2048 in the paper's setting).
DEFAULT_UPDATE_THRESHOLD = 0.1
_VAR_FLOOR = 1e-12
_MARKER = "_lightning_ext_dsnot"  # on a pruned module: the state keys of the DSnoT callbacks that pruned it  # a feature that never varies over the calibration tokens is divided by this, not by zero


class _Stop(Exception):
    """Raised from a forward hook once the layers of the current block have seen their inputs."""

def parse_nm_pattern(pattern: Optional[str]) -> Optional[tuple[int, int]]:
    """``"2:4"`` -> ``(2, 4)``: at most N non-zero weights in every M consecutive inputs of a row; ``None`` -> ``None``.

    Example:
        >>> parse_nm_pattern("2:4")
        (2, 4)
    """
    if pattern is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"nm_pattern must read 'N:M' with 0 < N < M (N weights kept in every M), got {pattern!r}.")
    return int(match.group(1)), int(match.group(2))


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's score ``S_ij = |W_ij| * ||X_j||_2`` (``input_sq_norm`` holds ``||X_j||_2^2`` per input feature)."""
    return weight.abs() * input_sq_norm.clamp_min(0).sqrt().to(weight.dtype).unsqueeze(0)


def initial_mask(score: torch.Tensor, pruning_ratio: Optional[float] = None,
                 nm: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Boolean mask of the PRUNED weights: per output row the ``int(pruning_ratio * C_in)`` lowest scores, or with
    ``nm=(N, M)`` the ``M - N`` lowest of every M consecutive inputs (ties: lower index pruned first)."""
    rows, cols = score.shape
    pruned = torch.zeros_like(score, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        blocks = score.reshape(rows, cols // m, m)
        order = torch.sort(blocks, dim=-1, stable=True).indices[..., : m - n]
        return pruned.reshape(rows, cols // m, m).scatter_(-1, order, True).reshape(rows, cols)
    k = int(cols * pruning_ratio)
    if k > 0:
        pruned.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
    return pruned


def _order(key: torch.Tensor, eligible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: column indices of the eligible entries by ascending ``key`` (stable), and how many are eligible."""
    filled = torch.where(eligible, key, torch.full_like(key, math.inf))
    return torch.sort(filled, dim=1, stable=True).indices, eligible.sum(1)


def dsnot_mask(weight: torch.Tensor, pruned: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
               score: torch.Tensor, max_cycles: int = 50, update_threshold: float = DEFAULT_UPDATE_THRESHOLD,
               pow_of_var: float = 1.0, nm: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DSnoT's swaps on one layer: returns the new PRUNED mask and the number of swaps per row.

    With ``v_ij = W_ij mu_j`` (``mu = mean``, in ``update_threshold``'s units) and ``e_i = sum_{j pruned} v_ij``
    (the expected dense-minus-sparse output of row i), each cycle, for every row with ``|e_i| > update_threshold``
    (a row below it, or with a swap refused, stops for good):

    - grow ``j* = argmax_{j initially pruned, still pruned, sign(v_ij) = sign(e_i)} |v_ij| / var_j^pow_of_var``;
    - prune, unstructured: ``k* = argmin_{k initially kept, still kept, sign(v_ik) = -sign(e_i)} score_ik``;
      N:M: the initially kept weight of lowest ``score`` left in ``j*``'s own M-block, and the swap is refused
      if ``e_i + v_ik* - v_ij*`` has the other sign than ``e_i`` had before the first cycle;
    - ``e_i <- e_i + v_ik* - v_ij*``. At most ``max_cycles`` cycles. Weights are never changed, only the mask.
    """
    rows, cols = weight.shape
    w = weight.double()
    v = w * mean.double().unsqueeze(0)
    ratio = v / var.double().clamp_min(_VAR_FLOOR).pow(pow_of_var).unsqueeze(0)
    pruned = pruned.clone()
    swaps = torch.zeros(rows, dtype=torch.long, device=weight.device)
    if max_cycles <= 0:
        return pruned, swaps
    kept0 = ~pruned
    error = torch.where(pruned, v, torch.zeros_like(v)).sum(1)
    sign0 = torch.sign(error)
    grow_pos, n_grow_pos = _order(-ratio, pruned & (v > 0))  # largest v/var first
    grow_neg, n_grow_neg = _order(ratio, pruned & (v < 0))   # most negative first
    score = score.double()
    if nm is None:
        prune_pos, n_prune_pos = _order(score, kept0 & (v > 0))
        prune_neg, n_prune_neg = _order(score, kept0 & (v < 0))
        p_pos = torch.zeros(rows, dtype=torch.long, device=weight.device)
        p_neg = torch.zeros_like(p_pos)
    else:
        m = nm[1]
        prune_score = torch.where(kept0, score, torch.full_like(score, math.inf))
    g_pos = torch.zeros(rows, dtype=torch.long, device=weight.device)
    g_neg = torch.zeros_like(g_pos)
    active = torch.ones(rows, dtype=torch.bool, device=weight.device)
    ar = torch.arange(rows, device=weight.device)
    last = cols - 1
    for _ in range(max_cycles):
        positive = error > 0
        active &= error.abs() > update_threshold
        grow = torch.where(positive, grow_pos[ar, g_pos.clamp(max=last)], grow_neg[ar, g_neg.clamp(max=last)])
        ok = active & torch.where(positive, g_pos < n_grow_pos, g_neg < n_grow_neg)
        if nm is None:
            cut = torch.where(positive, prune_neg[ar, p_neg.clamp(max=last)], prune_pos[ar, p_pos.clamp(max=last)])
            ok &= torch.where(positive, p_neg < n_prune_neg, p_pos < n_prune_pos)
        else:
            start = grow - grow % m
            cols_in_block = start.unsqueeze(1) + torch.arange(m, device=weight.device).unsqueeze(0)
            best, at = prune_score.gather(1, cols_in_block).min(1)
            cut = start + at
            after = error + v[ar, cut] - v[ar, grow]
            ok &= torch.isfinite(best) & (torch.sign(after) == sign0)
        active = ok
        if not active.any():
            break
        r = ar[active]
        pruned[r, grow[active]] = False
        pruned[r, cut[active]] = True
        error = torch.where(active, error + v[ar, cut] - v[ar, grow], error)
        swaps += active.long()
        g_pos += (active & positive).long()
        g_neg += (active & ~positive).long()
        if nm is None:
            p_neg += (active & positive).long()
            p_pos += (active & ~positive).long()
        else:
            prune_score[r, cut[active]] = math.inf
    return pruned, swaps


class _InputStats:
    """Per-input-feature sums of a Linear layer's inputs and their squares (float64); tokens and samples seen."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.count = self.samples = 0
        self.sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros_like(self.sum)

    def add(self, x: torch.Tensor, samples: int) -> None:
        self.samples += samples
        x = x.reshape(-1, x.shape[-1]).double()
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)

    mean = property(lambda self: self.sum / self.count)
    sample_sum = property(lambda self: self.sum / self.samples)  # the reference's mu: token sum per sample
    var = property(lambda self: (self.sumsq / self.count - self.mean ** 2).clamp_min(0))  # population variance


@dataclass
class DSnoTReport:
    """What :func:`dsnot_prune` did: per layer the achieved sparsity, the swaps and whether DSnoT ran on it."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    calibration_batches: int = 0
    calibration_tokens: int = 0

    @property
    def sparsity(self) -> float:
        """Zeros over weights, over every pruned layer."""
        total = sum(r["weights"] for r in self.layers.values())
        return sum(r["zeros"] for r in self.layers.values()) / max(total, 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"sparsity": self.sparsity, "seconds": self.seconds, "calibration_batches": self.calibration_batches,
                "calibration_tokens": self.calibration_tokens, "layers": {k: dict(v) for k, v in self.layers.items()}}

    def summary(self) -> str:
        """One line per layer."""
        return "\n".join([f"DSnoT: {len(self.layers)} layers, sparsity {self.sparsity:.4f}, {self.seconds:.2f} s"] + [
            f"  {n}: sparsity {r['sparsity']:.4f}, swaps {r['swaps']}" + ("" if r["dsnot"] else " (initial mask only)")
            for n, r in self.layers.items()])


def _check(pruning_ratio, init, nm_pattern, max_cycles, update_threshold, pow_of_var, semi_structured):
    nm = parse_nm_pattern(nm_pattern)
    if nm is None or pruning_ratio is not None:
        check_number("pruning_ratio", pruning_ratio, low=0, high=1, low_open=True, high_open=True)
    if nm is not None and pruning_ratio is not None:
        if abs(pruning_ratio - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(f"nm_pattern {nm_pattern!r} fixes the pruning ratio at {1 - nm[0] / nm[1]:g}; set "
                             f"pruning_ratio to null (or {1 - nm[0] / nm[1]:g}), got {pruning_ratio!r}.")
    check_choice("init", init, get_args(Init))
    check_number("max_cycles", max_cycles, low=0, integer=True)
    check_number("update_threshold", update_threshold, low=0)
    check_number("pow_of_var", pow_of_var, low=0)
    if semi_structured and nm != (2, 4):
        raise ValueError(f"semi_structured=True needs nm_pattern='2:4' (PyTorch's semi-structured sparse "
                         f"tensors), got nm_pattern={nm_pattern!r}.")
    return nm


def _outermost(model: nn.Module, patterns: Optional[Sequence[str]]) -> list[str]:
    names = match_names([n for n, _ in model.named_modules() if n], patterns, "blocks",
                        f"{type(model).__name__}", PruningError)
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _raise_stop(*_: Any) -> None:
    raise _Stop


def _remove(handles: list) -> None:
    [h.remove() for h in handles]
    handles.clear()


def _default_forward(model: nn.Module, batch: Any) -> Any:
    device = next(iter(model.parameters())).device
    return model(batch_inputs(batch, PruningError, "DSnoT (or pass `forward` to dsnot_prune)").to(device))


def dsnot_prune(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    pruning_ratio: Optional[float] = 0.5,
    *,
    init: str = "wanda",
    nm_pattern: Optional[str] = None,
    max_cycles: int = 50,
    update_threshold: float = DEFAULT_UPDATE_THRESHOLD,
    pow_of_var: float = 1.0,
    skip: Optional[Sequence[str]] = None,
    layers: Optional[Sequence[str]] = None,
    ignored_layers: Optional[Sequence[str]] = None,
    blocks: Optional[Sequence[str]] = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    token_mask: Optional[Callable[[Any], Optional[torch.Tensor]]] = None,
    semi_structured: bool = False,
) -> DSnoTReport:
    """Prune every ``nn.Linear`` of ``model`` in place to ``pruning_ratio`` unstructured (or N:M) sparsity with
    DSnoT: an initial Wanda or magnitude mask per output row, then DSnoT's grow-and-prune swaps (:func:`dsnot_mask`)
    that cut each row's expected reconstruction error ``e_i = sum_{j pruned} W_ij E[x_j]``. No gradients.

    Layers are processed in forward order, group by group: a group is one module matched by ``blocks`` (e.g.
    ``"encoder.layer.*"``; its Linear layers share statistics taken on the block's input) or a single Linear
    outside any block. Each group's statistics (``E[x_j]``, ``Var[x_j]``, ``||x_j||^2`` over every calibration
    token) come from a forward pass over ALL calibration batches through the already pruned earlier groups; the
    pass stops right after the group (a hook raises), as the reference code feeds blocks in sequence.

    Args:
        model: pruned in place (weights of pruned entries set to zero).
        calibration_batches: batches (re-iterated once per group; a DataLoader or a list).
        pruning_ratio: share of each row's weights pruned, in (0, 1) (the paper's sparsity); ``None`` with
            ``nm_pattern``.
        init: initial mask, ``"wanda"`` (``|W_ij| ||x_j||``) or ``"magnitude"`` (``|W_ij|``).
        nm_pattern: ``"N:M"``: at most N non-zeros in every M consecutive inputs (``"2:4"``); each layer's input
            size must be a multiple of M.
        max_cycles: most swaps per row (the reference's ``max_cycle_time = 50``); 0 = the initial mask alone.
        update_threshold: a row stops swapping once ``|e_i|`` is at most this. Units as in the reference code:
            ``mu_j`` is the sum of ``x_j`` over a sample's tokens averaged over samples (a sample: one item of the
            batch dimension), so the reference's 0.1 is 0.1/T per token for T-token samples.
        pow_of_var: growth criterion ``|W_ij mu_j| / Var[x_j]^pow_of_var`` (reference: 1).
        skip: names/globs of layers that keep the initial mask, without swaps (the reference's ``--skip_layer mlp``
            skips LLaMA's MLP layers).
        layers: names/globs of the Linear layers to prune (default: every ``nn.Linear``).
        ignored_layers: names/globs of layers left dense (e.g. a classifier head).
        blocks: names/globs of modules processed one after another (outermost matches; e.g.
            ``"encoder.layer.*"``); ``None``: every Linear layer is its own step.
        forward: ``forward(model, batch)`` runs the model on one batch (default: ``model(batch_inputs(batch))``).
        token_mask: ``token_mask(batch)`` -> a boolean ``(batch, seq)`` tensor of real tokens; inputs of that
            leading shape are filtered by it so padding does not enter the statistics.
        semi_structured: with ``nm_pattern="2:4"``, replace each pruned weight on a CUDA device by
            ``torch.sparse.to_sparse_semi_structured`` (fp16/bf16 weights on an Ampere+ GPU); on CPU the weight stays
            a dense, masked tensor and a warning says so. Untested here (no GPU).

    Returns:
        The :class:`DSnoTReport` (achieved sparsity per layer).

    Raises:
        ValueError: a bad argument. PruningError: empty calibration data, an N:M pattern that does not divide a
            layer's input size, a layer the calibration forward never reached.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> report = dsnot_prune(net, [torch.randn(32, 8) for _ in range(4)], 0.5, ignored_layers=["2"])
        >>> report.layers["0"]["sparsity"], (net[0].weight == 0).float().mean().item()
        (0.5, 0.5)
    """
    nm = _check(pruning_ratio, init, nm_pattern, max_cycles, update_threshold, pow_of_var, semi_structured)
    forward = forward or _default_forward
    start_time = time.perf_counter()
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linear:
        raise PruningError(f"{type(model).__name__} has no nn.Linear layer for DSnoT to prune.")
    targets = match_names(linear, layers, "layers", type(model).__name__, PruningError) if layers else list(linear)
    ignored = set(match_names([n for n, _ in model.named_modules() if n], ignored_layers, "ignored_layers",
                              type(model).__name__, PruningError))
    targets = [n for n in targets if n not in ignored and not any(n.startswith(i + ".") for i in ignored)]
    if not targets:
        raise PruningError("No nn.Linear layer is left to prune after `layers`/`ignored_layers`.")
    no_swap = set(match_names(targets, skip, "skip", "the layers pruned", PruningError, strict=False))
    if skip and not no_swap:
        raise PruningError(f"`skip` {list(skip)!r} matches none of the layers pruned ({', '.join(targets[:6])}, ...).")
    if nm is not None:
        for n in targets:
            if linear[n].in_features % nm[1]:
                raise PruningError(f"nm_pattern {nm_pattern!r}: layer {n!r} has {linear[n].in_features} inputs, not a "
                                   f"multiple of {nm[1]}; add it to ignored_layers or pick another pattern.")
    batches = list(calibration_batches)
    if not batches:
        raise PruningError("The calibration data is empty: DSnoT needs at least one batch of inputs.")
    block_names = _outermost(model, blocks) if blocks else []
    modules = dict(model.named_modules())
    group_of = {n: next((b for b in block_names if n.startswith(b + ".")), n) for n in targets}

    state = {"mask": None}
    was_training = model.training
    model.eval()
    handles: list = []

    def run(stop: Optional[str] = None) -> None:
        if stop is not None:
            handles.append(modules[stop].register_forward_hook(_raise_stop))
        for batch in batches:
            state["mask"] = token_mask(batch) if token_mask is not None else None
            try:
                forward(model, batch)
            except _Stop:
                pass

    try:
        with torch.no_grad():
            calls: dict[str, int] = {}  # calls per forward of each layer and block (a stop needs exactly one)
            seen: list[str] = []  # the layers in the order of their first call
            target_set = set(targets)

            def record(name: str) -> None:
                calls[name] = calls.get(name, 0) + 1
                if name in target_set and name not in seen:
                    seen.append(name)

            for n in target_set | set(group_of.values()):
                handles.append(modules[n].register_forward_pre_hook(lambda _m, _i, n=n: record(n)))
            state["mask"] = token_mask(batches[0]) if token_mask is not None else None
            forward(model, batches[0])
            _remove(handles)
            missing = [n for n in targets if n not in seen]
            if missing:
                raise PruningError(f"The calibration forward never reached layer(s) {', '.join(missing[:5])}; add "
                                   "them to ignored_layers.")
            order = list(dict.fromkeys(group_of[n] for n in seen))
            report = DSnoTReport(calibration_batches=len(batches))
            for g in order:
                members = [n for n in seen if group_of[n] == g]
                stats = {n: _InputStats(linear[n].in_features, linear[n].weight.device) for n in members}

                def collect(module, inputs, n):
                    x = inputs[0]
                    samples = x.shape[0] if x.dim() > 1 else 1
                    mask = state["mask"]
                    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                        x = x[mask.to(x.device).bool()]
                    stats[n].add(x.detach(), samples)

                for n in members:
                    handles.append(linear[n].register_forward_pre_hook(lambda m, i, n=n: collect(m, i, n)))
                run(g if calls.get(g, 0) == 1 else None)  # stop after the group only if it runs once a forward
                _remove(handles)
                for n in members:
                    report.layers[n] = _prune_layer(linear[n], stats[n], pruning_ratio, init, nm, max_cycles,
                                                    update_threshold, pow_of_var, n not in no_swap)
                    report.calibration_tokens = max(report.calibration_tokens, stats[n].count)
    finally:
        _remove(handles)
        model.train(was_training)
    if semi_structured:
        _to_semi_structured(model, list(report.layers))
    report.seconds = time.perf_counter() - start_time
    return report


def _prune_layer(layer: nn.Linear, stats: _InputStats, pruning_ratio, init, nm, max_cycles, update_threshold,
                 pow_of_var, swap: bool) -> dict[str, Any]:
    if stats.count == 0:
        raise PruningError("A layer saw no calibration tokens (every token masked out?); check `token_mask`.")
    weight = layer.weight.data
    score = wanda_scores(weight.double(), stats.sumsq) if init == "wanda" else weight.double().abs()
    pruned = initial_mask(score, pruning_ratio, nm)
    swaps = torch.zeros(weight.shape[0], dtype=torch.long)
    if swap:
        wanda = wanda_scores(weight.double(), stats.sumsq)  # the prune side always ranks by Wanda's score
        pruned, swaps = dsnot_mask(weight, pruned, stats.sample_sum, stats.var, wanda if nm is None else score,
                                   max_cycles, update_threshold, pow_of_var, nm)
    weight[pruned] = 0
    zeros = int((weight == 0).sum())
    return {"sparsity": zeros / weight.numel(), "zeros": zeros, "weights": weight.numel(),
            "shape": list(weight.shape), "swaps": int(swaps.sum()), "dsnot": bool(swap)}


def _to_semi_structured(model: nn.Module, names: list[str]) -> None:
    modules = dict(model.named_modules())
    on_cpu = [n for n in names if not modules[n].weight.is_cuda]
    if on_cpu:
        rank_zero_warn(f"DSnoT: semi_structured=True needs CUDA weights; {len(on_cpu)} layer(s) (e.g. {on_cpu[0]!r}) "
                       "are not on a GPU and keep dense, masked weights.")
    from torch.sparse import to_sparse_semi_structured

    for n in names:
        if n not in on_cpu:
            layer = modules[n]
            layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)


class DSnoT(Callback):
    """DSnoT (Zhang et al., ICLR 2024): training-free pruning of every Linear layer to a target sparsity with
    Wanda's mask refined by reconstruction-error-driven grow-and-prune swaps, on calibration batches.

    Paper: "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs", ICLR 2024, arXiv:2310.08915.
    Reference code: https://github.com/zyxxmu/DSnoT. Runs :func:`dsnot_prune` (equations, arguments) once: at the
    end of ``fit`` (``apply_at="fit_end"``: in ``on_train_end``, before the strategy's teardown) or before testing (``"test_start"``), on up to ``num_batches`` batches
    of the datamodule's ``calibration`` loader (inputs by :func:`~lightning_ext.core.inputs.batch_inputs`). Only
    the mask changes (pruned weights set to zero, shapes kept). Achieved sparsity per layer: :attr:`report`, the
    loggers (``pruning/sparsity``, ``pruning/dsnot_seconds``), ``report_path`` (JSON under ``trainer.log_dir``).
    Checkpoints saved during fit hold the dense model. Sharded strategies are refused; under DDP rank 0 prunes on
    its calibration batches and broadcasts the weights.

    Args:
        pruning_ratio, init, nm_pattern, max_cycles, update_threshold, pow_of_var, skip, layers, ignored_layers,
            blocks, semi_structured: as in :func:`dsnot_prune` (names relative to the LightningModule, e.g.
            ``net.encoder.layer.*``; ``update_threshold`` in the reference's units, per-sample token sums).
        apply_at: ``"fit_end"`` or ``"test_start"``.
        calibration: the datamodule's ``"train"`` or ``"val"`` loader.
        num_batches: calibration batches used (the first ones of that loader).
        report_path: JSON report path (relative to ``trainer.log_dir``); ``None`` writes none.

    Example:
        >>> from lightning_ext.modules import MLPClassifier
        >>> cb = DSnoT(pruning_ratio=0.5, apply_at="test_start", ignored_layers=["net.4"])
        >>> model = MLPClassifier(num_features=8, num_classes=3, hidden=[16, 16])
        >>> report = cb.prune(model, [torch.randn(16, 8) for _ in range(2)])  # what the hook does
        >>> round(report.layers["net.0"]["sparsity"], 3)
        0.5
        >>> trainer = Trainer(callbacks=[cb])  # doctest: +SKIP
    """

    def __init__(
        self,
        pruning_ratio: Optional[OpenUnitInterval] = 0.5,
        init: Init = "wanda",
        nm_pattern: Optional[str] = None,
        max_cycles: NonNegativeInt = 50,
        update_threshold: NonNegativeFloat = DEFAULT_UPDATE_THRESHOLD,
        pow_of_var: NonNegativeFloat = 1.0,
        skip: Optional[list[str]] = None,
        layers: Optional[list[str]] = None,
        ignored_layers: Optional[list[str]] = None,
        blocks: Optional[list[str]] = None,
        apply_at: ApplyAt = "fit_end",
        calibration: Split = "train",
        num_batches: PositiveInt = 128,
        semi_structured: bool = False,
        report_path: Optional[str] = None,
    ) -> None:
        super().__init__()
        _check(pruning_ratio, init, nm_pattern, max_cycles, update_threshold, pow_of_var, semi_structured)
        check_choice("apply_at", apply_at, get_args(ApplyAt))
        check_choice("calibration", calibration, get_args(Split))
        check_number("num_batches", num_batches, low=1, integer=True)
        if report_path == "":
            raise ValueError("report_path must be a file name or null (None writes no report), not ''.")
        self.pruning_ratio, self.init, self.nm_pattern = pruning_ratio, init, nm_pattern
        self.max_cycles, self.update_threshold, self.pow_of_var = max_cycles, update_threshold, pow_of_var
        self.skip, self.layers, self.ignored_layers, self.blocks = skip, layers, ignored_layers, blocks
        self.apply_at, self.calibration, self.num_batches = apply_at, calibration, num_batches
        self.semi_structured, self.report_path = semi_structured, report_path
        self.applied = False
        self.report: Optional[DSnoTReport] = None
        self.summary: dict[str, Any] = {}

    @property
    @override
    def state_key(self) -> str:
        """Identifies this callback's state in a checkpoint by its ratio and pattern."""
        return self._generate_state_key(pruning_ratio=self.pruning_ratio, nm_pattern=self.nm_pattern)

    def prune(self, module: nn.Module, batches: Iterable[Any], semi_structured: Optional[bool] = None) -> DSnoTReport:
        """Prune ``module`` now on ``batches`` (no Trainer needed) and return the report."""
        report = dsnot_prune(
            module, islice(batches, self.num_batches), self.pruning_ratio, init=self.init,
            nm_pattern=self.nm_pattern, max_cycles=self.max_cycles, update_threshold=self.update_threshold,
            pow_of_var=self.pow_of_var, skip=self.skip, layers=self.layers, ignored_layers=self.ignored_layers,
            blocks=self.blocks, forward=self.forward,
            semi_structured=self.semi_structured if semi_structured is None else semi_structured,
        )
        object.__setattr__(module, _MARKER, getattr(module, _MARKER, set()) | {self.state_key})
        return self._record(report)

    def _record(self, report: DSnoTReport) -> DSnoTReport:
        self.report, self.applied = report, True
        self.summary = {"sparsity": report.sparsity, "seconds": report.seconds,
                        "layers": {k: v["sparsity"] for k, v in report.layers.items()}}
        return report

    def forward(self, module: nn.Module, batch: Any) -> Any:
        """Run ``module`` on one calibration batch (override for models that take more than one tensor)."""
        return _default_forward(module, batch)

    def _loader(self, trainer: Trainer) -> Iterable[Any]:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            return getattr(datamodule, f"{self.calibration}_dataloader")()
        if self.calibration == "train":
            return first_train_loader(trainer, PruningError)
        loaders = trainer.val_dataloaders
        if loaders is None:
            raise PruningError("DSnoT(calibration='val') found no validation dataloader; pass a datamodule.")
        return loaders[0] if isinstance(loaders, (list, tuple)) else loaders

    def _run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.applied:
            return
        if trainer.world_size > 1:  # rank 0 prunes on its batches, every rank takes its weights
            payload = None
            if trainer.global_rank == 0:
                report = self.prune(pl_module, self._loader(trainer), semi_structured=False)
                payload = (report, {k: v.detach().cpu() for k, v in pl_module.state_dict().items()})
            report, state = trainer.strategy.broadcast(payload, src=0)
            if trainer.global_rank != 0:
                pl_module.load_state_dict(state)
                object.__setattr__(pl_module, _MARKER, getattr(pl_module, _MARKER, set()) | {self.state_key})
                self._record(report)
            if self.semi_structured:
                _to_semi_structured(pl_module, list(report.layers))
        else:
            report = self.prune(pl_module, self._loader(trainer))
        rank_zero_info(report.summary())
        for logger in trainer.loggers:
            logger.log_metrics({"pruning/sparsity": report.sparsity, "pruning/dsnot_seconds": report.seconds,
                                "epoch": trainer.current_epoch}, step=trainer.global_step)
        path = output_path(trainer, self.report_path)
        if path is not None and trainer.is_global_zero:
            atomic_write_json(report.to_dict(), path)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse strategies that shard parameters; a model this callback already pruned is not pruned again."""
        refuse_sharded_strategy(trainer, "DSnoT", "needs whole weight rows on every rank to rank them",
                                error=PruningError)
        self.applied = self.state_key in getattr(pl_module, _MARKER, set())  # this model pruned by this callback

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """With ``apply_at="fit_end"``, prune the trained model (the last hook of fit where DDP can still talk)."""
        if self.apply_at == "fit_end":
            self._run(trainer, pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """With ``apply_at="test_start"``, prune the model before testing."""
        if self.apply_at == "test_start":
            self._run(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Whether the model was pruned, and the achieved sparsity."""
        return {"applied": self.applied, "summary": dict(self.summary)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s record (the zeros themselves are in the model's weights)."""
        self.applied = bool(state_dict.get("applied", False))
        self.summary = dict(state_dict.get("summary", {}))
