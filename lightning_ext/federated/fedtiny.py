r"""FedTiny (Huang et al., ICDCS 2023): adaptive-BN selection of a coarse-pruned candidate, then masked FedAvg with progressive prune-and-grow.

Paper: "Distributed Pruning Towards Tiny Neural Networks in Federated Learning", Hong Huang, Lan Zhang, Chaoyue Sun,
Ruogu Fang, Xiaoyong Yuan, Dapeng Wu, ICDCS 2023, arXiv 2212.01977. Reference code: the first author's FedPruning
library, https://github.com/FedPruning/FedPruning (branch ``dev``: ``api/distributed/fedtiny/``,
``api/pruning/init_scheme.py``, ``api/pruning/model_pruning.py``; read for this module, nothing copied).

This file is the pure core (tensors and ``nn.Module`` s, no Trainer, no Flower); the Flower strategy and client
that drive it are in :mod:`lightning_ext.federated.fedtiny_flower`.

**1. Coarse-pruned candidates (server).** The sparse tensors are the weights of dimension >= 2 (convolutions,
linear layers; biases and BatchNorm stay dense, as in the reference ``SparseModel``). For a target density
:math:`d` a layer-wise allocation gives layer :math:`l` (with :math:`n_l` weights) the density
:math:`d_l = \min(1, \varepsilon\, r_l)`, :math:`\varepsilon` solved so that :math:`\sum_l d_l n_l = d \sum_l n_l`
(layers that would exceed 1 are made dense and :math:`\varepsilon` re-solved, the reference's ERK loop), with
:math:`r_l = \sum \mathrm{shape}_l / n_l` (ERK), :math:`r_l = 1` (uniform) or :math:`r_l \sim \mathrm{Dirichlet}(1)`
(random reallocations, EagleEye's random layer-wise ratios). Each candidate keeps the
:math:`\max(1, \mathrm{round}(d_l n_l))` largest-magnitude weights of every layer of the *same* initial model:
candidate 0 is ERK, 1 uniform, the rest random (:func:`candidate_masks`). The reference code varies the
*initialisation seed* of one ERK/uniform magnitude pruning instead; the spec's allocations are used here so that a
candidate is a pruning decision, not a different model.

**2. Adaptive BN selection (clients score, server picks).** For each candidate :math:`c`, every client :math:`k`
resets the BatchNorm running statistics of :math:`w \odot m_c` and recalibrates them on its own data (forward
passes in train mode, no gradients, cumulative averages), the server averages the statistics weighted by the
clients' example counts :math:`n_k`,

.. math:: \mu_c = \tfrac{\sum_k n_k \mu_{c,k}}{\sum_k n_k}, \qquad \sigma^2_c = \tfrac{\sum_k n_k \sigma^2_{c,k}}{\sum_k n_k},

each client evaluates the candidate with the averaged statistics (eval mode) and reports its mean loss
:math:`L_{c,k}`, and the server keeps

.. math:: c^\star = \arg\min_c \tfrac{\sum_k n_k L_{c,k}}{\sum_k n_k}.

Two query rounds, as in the reference (``MSG_TYPE_C2S_SEND_BN_PARAMS_TO_SERVER``, then ``..._BN_LOSS_...``).
Deviations: the reference uploads the BN layers' *affine parameters* (named ``*bn*``) after the recalibration,
which a no-grad forward does not change; the running statistics (what recalibration changes) are averaged here.
The reference averages the losses uniformly over clients; here by example count (the spec).

**3. Masked FedAvg with progressive prune-and-grow.** Every round the clients train :math:`w \odot m` with masked
gradients and optimizer state; the server averages the (masked) weights. In adjustment rounds :math:`t` (every
``adjust_every`` rounds up to ``adjust_until`` = :math:`T_{end}`) each client, after its local training, computes the
dense gradient on one batch and uploads, per layer, only the :math:`k_l` largest :math:`|g|` among the *pruned*
positions (the reference's memory-saving top-K), :math:`k_l = \lceil \rho_t\, \mathrm{nnz}(m_l) \rceil` with the
cosine-decayed ratio

.. math:: \rho_t = \tfrac{\alpha}{2}\left(1 + \cos\tfrac{\pi t}{T_{end}}\right)

(reference ``f_decay``, ``adjust_alpha`` = 0.2). The server sums the clients' sparse gradients weighted by
:math:`n_k / \sum n_k` into :math:`\bar g`, then per layer drops the :math:`k_l` active weights of smallest
:math:`|w|` and activates the :math:`k_l` inactive positions of largest :math:`|\bar g|` (the just-dropped ones
included), which is the compression family's :func:`~lightning_ext.compression.dynamic_sparse_training.prune_and_grow`;
grown weights start at 0. The count is :math:`\lceil\cdot\rceil` (that function's convention); the reference uses
:math:`\lfloor\cdot\rfloor`. ``layers_per_adjustment`` = None adjusts every layer each adjustment round (the
reference); an integer adjusts that many layers in turn (the spec's layer-by-layer reading of "progressive").

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    >>> weights = sparse_weights(dict(net.named_parameters()))
    >>> sorted(weights)
    ['0.weight', '3.weight']
    >>> cands = candidate_masks(weights, density=0.1, num_candidates=3, seed=0)
    >>> [name for name, _ in cands], sum(int(m.sum()) for m in cands[1][1].values())
    (['erk', 'uniform', 'random1'], 47)
    >>> round(adjustment_ratio(5, alpha=0.2, adjust_until=10), 3)
    0.1
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ext.compression.dynamic_sparsity import prune_and_grow
from lightning_ext.core.inputs import batch_inputs
from lightning_ext.core.layers import match_names
from lightning_ext.core.validation import check_choice, check_number, check_positive_int

__all__ = ["Allocation", "adjust_masks", "adjustment_ratio", "average_statistics", "bn_statistics",
           "candidate_loss", "candidate_masks", "is_adjustment_round", "layer_densities", "magnitude_masks",
           "recalibrate_bn", "select_candidate", "sparse_gradient_sum", "sparse_weights", "top_inactive_gradients"]

#: how a candidate spreads the density over layers
Allocation = Literal["erk", "uniform", "random"]
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def sparse_weights(tensors: Mapping[str, Tensor], ignored_layers: Optional[Sequence[str]] = None) -> dict[str, Tensor]:
    """The tensors FedTiny prunes: floating tensors of dimension >= 2 (conv/linear weights), minus ``ignored_layers``
    (exact keys or globs); raises one line when nothing is left."""
    eligible = [k for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point() and v.dim() >= 2]
    ignored = set(match_names(eligible, ignored_layers, "ignored_layers", "the model's weights"))
    out = {k: tensors[k] for k in eligible if k not in ignored}
    if not out:
        raise ValueError(f"FedTiny found no weight of dimension >= 2 to prune (ignored_layers={ignored_layers!r}); "
                         f"keys look like {list(tensors)[:4]}.")
    return out


def layer_densities(shapes: Mapping[str, Sequence[int]], density: float, allocation: Allocation = "erk",
                    seed: int = 0) -> dict[str, float]:
    r"""Per-layer densities :math:`d_l = \min(1, \varepsilon r_l)` with :math:`\sum_l d_l n_l = d \sum_l n_l`
    (module docstring); ``seed`` draws the ``random`` allocation's Dirichlet weights.

    Example:
        >>> d = layer_densities({"a": (8, 1, 3, 3), "b": (10, 288)}, 0.1, "erk")
        >>> round(d["a"], 3), round(d["b"], 3)
        (0.196, 0.098)
    """
    check_number("density", density, low=0, high=1, low_open=True)
    check_choice("allocation", allocation, ("erk", "uniform", "random"))
    numel = {k: math.prod(s) for k, s in shapes.items()}
    if allocation == "erk":
        raw = {k: sum(s) / numel[k] for k, s in shapes.items()}
    elif allocation == "uniform":
        raw = {k: 1.0 for k in shapes}
    else:
        gen = torch.Generator().manual_seed(int(seed))
        draws = torch.empty(len(shapes)).exponential_(1.0, generator=gen)  # Dirichlet(1) up to normalisation
        raw = {k: float(v) + 1e-12 for k, v in zip(shapes, draws)}
    total, dense = density * sum(numel.values()), set()
    while True:
        rhs = total - sum(numel[k] for k in dense)
        divisor = sum(raw[k] * numel[k] for k in shapes if k not in dense)
        eps = rhs / divisor if divisor > 0 else 0.0
        over = [k for k in shapes if k not in dense and eps * raw[k] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda k: raw[k]))
    return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}


def magnitude_masks(weights: Mapping[str, Tensor], densities: Mapping[str, float]) -> dict[str, Tensor]:
    """Boolean masks keeping the ``max(1, round(d_l n_l))`` largest ``|w|`` of each layer (ties to the lower index)."""
    masks = {}
    for name, w in weights.items():
        flat = w.detach().reshape(-1).abs().float()
        keep = min(flat.numel(), max(1, round(densities[name] * flat.numel())))
        order = torch.sort(flat, descending=True, stable=True).indices[:keep]
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[order] = True
        masks[name] = mask.view(w.shape)
    return masks


def candidate_masks(weights: Mapping[str, Tensor], density: float, num_candidates: int = 5,
                    seed: int = 0) -> list[tuple[str, dict[str, Tensor]]]:
    """``num_candidates`` coarse-pruned masks of the same weights: ERK, uniform, then random allocations.

    Returns ``[(allocation name, masks), ...]``; random ``i`` uses seed ``seed + i``.
    """
    check_positive_int("num_candidates", num_candidates)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    out = []
    for i in range(num_candidates):
        allocation: Allocation = ("erk", "uniform")[i] if i < 2 else "random"
        dens = layer_densities(shapes, density, allocation, seed + i)
        out.append((allocation if i < 2 else f"random{i - 1}", magnitude_masks(weights, dens)))
    return out


# -- adaptive BN selection --------------------------------------------------------------------------------------
def _bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BN) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any], max_batches: int = 20) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as cumulative averages over at most
    ``max_batches`` batches (train-mode forwards, no gradients); returns the number of examples seen.

    Raises ``ValueError`` when the model has no BatchNorm layer that tracks running statistics.
    """
    check_positive_int("max_batches", max_batches)
    bns = _bn_modules(model)
    if not bns:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics; FedTiny's adaptive "
                         "BN selection needs one (use selection=False, i.e. num_candidates=1, otherwise).")
    momenta = [m.momentum for _, m in bns]
    was_training = model.training
    seen = 0
    try:
        for _, m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch counts equally
        model.train()
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            x = batch_inputs(batch, owner="FedTiny's BN recalibration")
            model(x)
            seen += int(x.shape[0])
    finally:
        for (_, m), momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)
    return seen


def bn_statistics(model: nn.Module) -> dict[str, Tensor]:
    """``{"<bn>.running_mean": ..., "<bn>.running_var": ...}`` copies of every BatchNorm's statistics."""
    out = {}
    for name, m in _bn_modules(model):
        prefix = f"{name}." if name else ""
        out[prefix + "running_mean"] = m.running_mean.detach().clone()
        out[prefix + "running_var"] = m.running_var.detach().clone()
    return out


def average_statistics(stats: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """The ``weights``-weighted mean of each statistic over clients (weights: example counts)."""
    if not stats or len(stats) != len(weights):
        raise ValueError(f"average_statistics needs one weight per client, got {len(stats)} statistics and "
                         f"{len(weights)} weights.")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("average_statistics: the clients' example counts sum to 0; every client needs data.")
    return {k: sum(float(w) * s[k].double() for s, w in zip(stats, weights)).div(total).to(stats[0][k].dtype)
            for k in stats[0]}


def default_loss(module: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    """Cross-entropy of ``module(x)`` against ``y`` for an ``(x, y, ...)`` batch: ``(mean loss, #correct)``."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError("FedTiny scores candidates with cross-entropy on (x, y) batches; this batch is "
                         f"{type(batch).__name__}. Give a DataModule whose batches are (inputs, labels).")
    logits = module(batch[0])
    y = batch[1]
    return F.cross_entropy(logits, y), (logits.argmax(-1) == y).sum()


@torch.no_grad()
def candidate_loss(model: nn.Module, batches: Iterable[Any], max_batches: int = 20,
                   loss_fn: Callable[[nn.Module, Any], tuple[Tensor, Tensor]] = default_loss) -> tuple[float, float, int]:
    """Eval-mode ``(mean loss per example, accuracy, examples)`` of ``model`` over at most ``max_batches`` batches."""
    check_positive_int("max_batches", max_batches)
    was_training = model.training
    model.eval()
    total = correct = 0.0
    n = 0
    try:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            loss, right = loss_fn(model, batch)
            size = int(batch_inputs(batch).shape[0])
            total += float(loss) * size
            correct += float(right)
            n += size
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("FedTiny could not score a candidate: the client's data loader gave no batch.")
    return total / n, correct / n, n


def select_candidate(losses: Sequence[Sequence[float]], num_examples: Sequence[int]) -> tuple[int, list[float]]:
    """``(argmin_c sum_k n_k L_ck / sum_k n_k, the weighted means)``; ``losses[k][c]`` is client ``k``'s loss of
    candidate ``c``. Ties go to the lower index (candidate 0, ERK, first)."""
    if not losses or len(losses) != len(num_examples):
        raise ValueError(f"select_candidate needs one loss list per client, got {len(losses)} lists and "
                         f"{len(num_examples)} example counts.")
    width = {len(row) for row in losses}
    if len(width) != 1:
        raise ValueError(f"every client must score every candidate; got loss lists of lengths {sorted(width)}.")
    total = float(sum(num_examples))
    means = [sum(n * float(row[c]) for row, n in zip(losses, num_examples)) / total for c in range(width.pop())]
    if not all(math.isfinite(m) for m in means):
        raise ValueError(f"a candidate's BN-recalibrated loss is not finite ({means}); check the data and model.")
    return min(range(len(means)), key=lambda c: (means[c], c)), means


# -- progressive prune-and-grow ---------------------------------------------------------------------------------
def adjustment_ratio(server_round: int, alpha: float = 0.2, adjust_until: int = 100) -> float:
    r""":math:`\rho_t = \tfrac{\alpha}{2}(1 + \cos(\pi t / T_{end}))` (the reference's ``f_decay``)."""
    check_number("alpha", alpha, low=0, high=1)
    check_positive_int("adjust_until", adjust_until)
    return alpha / 2.0 * (1.0 + math.cos(math.pi * min(server_round, adjust_until) / adjust_until))


def is_adjustment_round(server_round: int, adjust_every: int, adjust_until: int) -> bool:
    """Whether round ``t`` (1-based) prunes and grows: ``t % adjust_every == 0 and t < adjust_until``."""
    return adjust_every > 0 and server_round % adjust_every == 0 and server_round < adjust_until


def top_inactive_gradients(grad: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The client's upload: flat indices and values of the ``k`` largest ``|grad|`` among ``mask == False``
    (ties to the lower index; fewer when fewer positions are pruned)."""
    inactive = (~mask.reshape(-1).bool()).nonzero().squeeze(1)
    values = grad.detach().reshape(-1)[inactive]
    k = min(int(k), inactive.numel())
    order = torch.sort(values.abs(), descending=True, stable=True).indices[:k]
    return inactive[order].to(torch.int64), values[order].clone()


def sparse_gradient_sum(uploads: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float],
                        shape: Sequence[int]) -> Tensor:
    """``sum_k (n_k / sum n) g_k`` of the clients' sparse uploads (zeros where nobody sent an entry)."""
    total = float(sum(weights))
    out = torch.zeros(math.prod(shape), dtype=torch.float64)
    for (idx, val), w in zip(uploads, weights):
        out.index_add_(0, idx.long(), val.double() * (float(w) / total))
    return out.view(*shape)


def adjust_masks(weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], grads: Mapping[str, Tensor],
                 ratio: float, layers: Optional[Sequence[str]] = None) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Prune-and-grow each layer in ``layers`` (default: all) with
    :func:`~lightning_ext.compression.dynamic_sparse_training.prune_and_grow`; returns the new masks and the
    number of positions replaced per layer (the other layers' masks are returned unchanged)."""
    new, changed = dict(masks), {}
    for name in (layers if layers is not None else list(masks)):
        new[name], _ = prune_and_grow(weights[name], masks[name].bool(), grads[name], ratio)
        changed[name] = int((new[name] & ~masks[name].bool()).sum())
    return new, changed
