"""Activate-while-Pruning (AP): spend part of each pruning cycle on negative weights that barely moved.

Functional core (no Trainer needed):

- :func:`dead_neuron_rate`: the dynamic dead-neuron rate (DNR) of a model's ReLUs on a batch;
- :func:`ap_prune_step`: the AP step on dictionaries of weights and masks;
- :func:`model_cost`: parameters, MACs (dense and non-zero) and measured latency of a model on a batch.

Lightning wrapper: :class:`ActivatingWhilePruning`, which watches the model for pruning done by any other
callback (Lightning's ``ModelPruning``, this library's filter pruners, a user's own pruner) and adds the AP
step to every pruning event it sees.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_ext.core.measure import layer_macs, measure_latency

__all__ = ["ActivatingWhilePruning", "ap_prune_step", "dead_neuron_rate", "model_cost"]

_RELU_TYPES = (nn.ReLU, nn.ReLU6)
_PRUNABLE_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


# -- functional core --------------------------------------------------------------------------------------------


def dead_neuron_rate(
    model: nn.Module,
    inputs: Tensor,
    modules: Optional[Union[dict[str, nn.Module], list[nn.Module]]] = None,
    per_layer: bool = False,
) -> Union[float, dict[str, float]]:
    r"""Dynamic dead-neuron rate: the share of (sample, ReLU unit) pairs whose ReLU output is zero.

    .. math:: \mathrm{DNR} = \frac{1}{\sum_l N U_l} \sum_l \sum_{n=1}^{N} \sum_{u=1}^{U_l}
              \mathbb{1}\left[\mathrm{ReLU}(z_{l,u}(x_n)) = 0\right]

    where ``U_l`` counts every output element of ReLU ``l`` for one sample (channel x position for conv
    features). The paper (Liu et al., arXiv 2212.06145) calls the rate *dynamic* because it depends on the
    input and changes during optimisation; it is measured here on the given batch with forward hooks on
    every ``nn.ReLU``/``nn.ReLU6`` module (a module called twice counts twice). The model runs once in
    ``eval`` mode under ``torch.no_grad()`` (BatchNorm uses running statistics, nothing is updated) and its
    training mode is restored. ``F.relu`` calls cannot be hooked: use ``nn.ReLU`` modules.

    Args:
        model: the network; called as ``model(inputs)``.
        inputs: one batch of inputs.
        modules: the ReLU modules to hook (a ``{name: module}`` dict or a list); all ReLUs by default.
        per_layer: return ``{name: rate}`` per hooked module instead of the overall rate.

    Returns:
        The overall rate in ``[0, 1]``, or the per-module rates.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.eye(2)), net[0].bias.zero_()
        >>> dead_neuron_rate(net, torch.tensor([[1.0, -1.0], [-1.0, -1.0]]))  # 3 of 4 outputs are zero
        0.75
    """
    if modules is None:
        named = {name: m for name, m in model.named_modules() if isinstance(m, _RELU_TYPES)}
    elif isinstance(modules, dict):
        named = dict(modules)
    else:
        named = {f"relu{i}": m for i, m in enumerate(modules)}
    if not named:
        raise ValueError(
            "dead_neuron_rate found no nn.ReLU/nn.ReLU6 module to hook in the model; ReLUs applied with "
            "`F.relu` cannot be hooked. Use nn.ReLU modules or pass `modules=`."
        )
    counts: dict[str, list[int]] = {name: [0, 0] for name in named}

    def make_hook(name: str):
        def hook(_module, _inp, out):
            counts[name][0] += int((out <= 0).sum())
            counts[name][1] += out.numel()

        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in named.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    ran = {name: c for name, c in counts.items() if c[1] > 0}
    if not ran:
        raise RuntimeError("None of the hooked ReLU modules ran in the forward pass; pass the ones the model uses.")
    if per_layer:
        return {name: dead / total for name, (dead, total) in ran.items()}
    return sum(c[0] for c in ran.values()) / sum(c[1] for c in ran.values())


def ap_prune_step(
    weights_start: dict[str, Tensor],
    weights_end: dict[str, Tensor],
    masks: dict[str, Tensor],
    q: Union[float, int],
) -> dict[str, Tensor]:
    r"""The AP step: remove the surviving *negative* weights that moved least during the cycle.

    Among the weights alive in ``masks`` with :math:`\theta_{end} < 0`, the ``k`` with the smallest movement
    :math:`|\theta_{end} - \theta_{start}|` are removed, globally over all tensors:

    .. math:: S = \operatorname*{arg\,min}_{|S| = k,\; S \subseteq \{i:\, m_i = 1,\; \theta_{end,i} < 0\}}
              \sum_{i \in S} |\theta_{end,i} - \theta_{start,i}|

    Selection is a stable top-k (ties go to the tensor listed first, then the lower flat index), never a
    threshold: many weights on constant-zero inputs have exactly zero movement and a ``<=`` threshold
    would remove more than ``k``.

    Args:
        weights_start: ``{name: tensor}`` at the start of the cycle (:math:`\theta_{start}`).
        weights_end: ``{name: tensor}`` at the end of the cycle, before the base pruner (:math:`\theta_{end}`).
        masks: ``{name: bool tensor}``, ``True`` where a weight is still alive (after the base pruner).
        q: a float in ``(0, 1)``: remove ``round(q * alive)`` weights, ``alive`` counted in ``masks``; or an
            ``int >= 0``: remove exactly that many. When fewer negative survivors exist, all are removed and
            a warning says so.

    Returns:
        New masks (the inputs are not modified).

    Example:
        >>> start = {"w": torch.tensor([0.0, -1.0, -1.0, -1.0, 2.0])}
        >>> end = {"w": torch.tensor([0.0, -1.5, -1.1, -3.0, 1.0])}
        >>> alive = {"w": torch.tensor([False, True, True, True, True])}
        >>> ap_prune_step(start, end, alive, q=1)["w"]  # -1.1 moved least among the negatives
        tensor([False,  True, False,  True,  True])
    """
    if set(weights_start) != set(masks) or set(weights_end) != set(masks):
        raise ValueError(
            f"weights_start, weights_end and masks must have the same keys; got {sorted(weights_start)}, "
            f"{sorted(weights_end)} and {sorted(masks)}."
        )
    for name, m in masks.items():
        if weights_start[name].shape != m.shape or weights_end[name].shape != m.shape:
            raise ValueError(
                f"{name}: shapes differ: start {tuple(weights_start[name].shape)}, end "
                f"{tuple(weights_end[name].shape)}, mask {tuple(m.shape)}. Record weights_start after any "
                "change of the layer's shape."
            )
    alive_total = sum(int(m.bool().sum()) for m in masks.values())
    if isinstance(q, bool) or not isinstance(q, (int, float)):
        raise TypeError(f"`q` must be a float in (0, 1) or an int >= 0, got {q!r}.")
    if isinstance(q, float):
        if not 0.0 < q < 1.0:
            raise ValueError(f"`q` as a fraction must be in (0, 1), got {q}; pass an int for a count.")
        k = int(round(q * alive_total))
    else:
        if q < 0:
            raise ValueError(f"`q` as a count must be >= 0, got {q}.")
        k = q
    scores, owners, positions = [], [], []
    for i, name in enumerate(masks):
        alive = masks[name].bool().flatten()
        end = weights_end[name].detach().flatten()
        start = weights_start[name].detach().flatten().to(end.device, end.dtype)
        candidates = torch.nonzero(alive.to(end.device) & (end < 0)).flatten()
        scores.append((end[candidates] - start[candidates]).abs().float().cpu())
        positions.append(candidates.cpu())
        owners.append(torch.full((candidates.numel(),), i, dtype=torch.long))
    all_scores = torch.cat(scores) if scores else torch.empty(0)
    if k > all_scores.numel():
        warnings.warn(
            f"ap_prune_step: asked to remove {k} weights but only {all_scores.numel()} surviving weights are "
            "negative; removing all of them.",
            stacklevel=2,
        )
        k = all_scores.numel()
    new_masks = {name: m.bool().clone() for name, m in masks.items()}
    if k == 0:
        return new_masks
    chosen = torch.sort(all_scores, stable=True).indices[:k]
    all_owners, all_positions = torch.cat(owners)[chosen], torch.cat(positions)[chosen]
    for i, name in enumerate(masks):
        idx = all_positions[all_owners == i]
        if idx.numel():
            flat = new_masks[name].view(-1)
            flat[idx.to(flat.device)] = False
    return new_masks


def model_cost(model: nn.Module, inputs: Tensor, latency_repeats: int = 5) -> dict[str, float]:
    """Parameters, MACs per sample (dense and counting only non-zero weights) and forward latency on ``inputs``.

    ``params`` counts stored parameters (physically removed channels disappear, masked weights do not);
    ``params_nonzero`` counts the non-zero ones (``torch.nn.utils.prune`` masks applied). ``macs`` counts the
    multiply-accumulates of every ``Conv``/``Linear`` for one sample; ``macs_nonzero`` scales each layer by the
    share of its non-zero weights (what a sparse kernel could skip). ``latency_ms`` is the median of
    ``latency_repeats`` timed forward passes of the whole batch in ``eval`` mode after one warm-up (``nan``
    when ``latency_repeats`` is 0). The model's training mode is restored.

    Example:
        >>> from torch import nn
        >>> cost = model_cost(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.zeros(8, 4))
        >>> cost["params"], cost["macs"]
        (23, 18)
    """
    params, nonzero = 0, 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            params += p.numel()
            eff = p.detach()
            if name.endswith("_orig") and isinstance(getattr(module, name[: -len("_orig")] + "_mask", None), Tensor):
                eff = eff * getattr(module, name[: -len("_orig")] + "_mask")
            nonzero += int(torch.count_nonzero(eff))

    def nonzero_share(module: nn.Module) -> float:
        weight, _ = _effective_weight(module)
        return float(torch.count_nonzero(weight)) / max(1, weight.numel())

    latency = 1000.0 * measure_latency(model, inputs, warmup=1, repeats=latency_repeats) if latency_repeats > 0 else float("nan")
    return {
        "params": params,
        "params_nonzero": nonzero,
        "macs": layer_macs(model, inputs[:1]),
        "macs_nonzero": layer_macs(model, inputs[:1], weight_share=nonzero_share),
        "latency_ms": latency,
    }


def _effective_weight(module: nn.Module) -> tuple[Tensor, Tensor]:
    """``(weight used in forward, alive mask)``, also under ``torch.nn.utils.prune`` reparametrisation."""
    mask = getattr(module, "weight_mask", None)
    orig = getattr(module, "weight_orig", None)
    if isinstance(mask, Tensor) and isinstance(orig, Tensor):
        return (orig.detach() * mask).detach(), mask.detach().bool()
    w = module.weight.detach()
    return w, w != 0


def _is_reparametrized(module: nn.Module) -> bool:
    mask, orig = getattr(module, "weight_mask", None), getattr(module, "weight_orig", None)
    return isinstance(mask, Tensor) and isinstance(orig, Tensor)


def _match_kept_indices(old: Tensor, new: Tensor) -> Optional[list[Tensor]]:
    """Indices ``I_d`` per dimension with ``old[ix_(I_0, I_1, ...)] == new``, for a tensor shrunk by slicing.

    Structured pruners (Torch-Pruning) copy the kept slices unchanged, so each non-zero value of ``new`` is
    found in ``old``; the old index along each dimension is the most common one among the matches. Returns
    ``None`` when no consistent slicing explains ``new``.
    """
    if old.dim() != new.dim() or any(b > a for a, b in zip(old.shape, new.shape)):
        return None
    old, new = old.detach(), new.detach().to(old.device, old.dtype)
    if old.shape == new.shape:
        return [torch.arange(s, device=old.device) for s in old.shape] if torch.equal(old, new) else None
    values, order = torch.sort(old.flatten())
    new_flat = new.flatten()
    nz = torch.nonzero(new_flat).flatten()
    if nz.numel() == 0:
        return None
    queries = new_flat[nz]
    pos = torch.searchsorted(values, queries).clamp_(max=values.numel() - 1)
    hit = values[pos] == queries
    if int(hit.sum()) == 0:
        return None
    old_multi = torch.unravel_index(order[pos[hit]], old.shape)
    new_multi = torch.unravel_index(nz[hit], new.shape)
    indices = []
    for d in range(old.dim()):
        a, b = old.shape[d], new.shape[d]
        # the most frequent old index for every new index j (memory linear in the matches, not a x b)
        pairs, counts = torch.unique(new_multi[d] * a + old_multi[d], return_counts=True)
        order = torch.argsort(counts, descending=True, stable=True)
        order = order[torch.argsort(pairs[order] // a, stable=True)]
        j, o = pairs[order] // a, pairs[order] % a
        first = torch.ones_like(j, dtype=torch.bool)
        first[1:] = j[1:] != j[:-1]
        if int(first.sum()) != b:  # some new index had no match (an all-zero slice)
            return None
        indices.append(o[first])
    sliced = old
    for d, idx in enumerate(indices):
        sliced = sliced.index_select(d, idx)
    keep = new != 0
    if not torch.equal(sliced[keep], new[keep]):
        return None
    return indices


def _take(t: Tensor, indices: list[Tensor]) -> Tensor:
    for d, idx in enumerate(indices):
        t = t.index_select(d, idx.to(t.device))
    return t


# -- Lightning wrapper ------------------------------------------------------------------------------------------


class ActivatingWhilePruning(Callback):
    r"""Activate-while-Pruning (AP): next to any pruner, removes the negative weights that moved least, to lower the dead-neuron rate.

    Paper: Liu, Ghosh, Tan, Motani, *"AP: Selective Activation for De-sparsifying Pruned Neural Networks"*
    (TMLR 2023 as "... Pruned Networks"), arXiv 2212.06145. Reference code:
    https://github.com/Martin1937/Activate-While-Pruning (``resnet_20.py``; read as
    ``Martin1937/AP-Activate-While-Pruning-``).

    AP is not a stand-alone pruner: put it on a Trainer next to one (Lightning's ``ModelPruning``,
    :class:`L1FilterPruning`, :class:`BetaRankPruning`, or your own) and configure that pruner to remove
    ``p - q`` per cycle. For each cycle AP records :math:`\theta_{start}` (the weights when training of the
    cycle starts, e.g. the rewound initialisation for lottery tickets) and :math:`\theta_{end}` (the weights
    at the end of each training epoch, before any pruner acts). When it sees that the base pruner has pruned
    (a weight mask lost entries, weights became exactly zero, or a layer shrank), it removes
    ``k = round(q * N)`` more weights, ``N`` being the weights alive at the start of the cycle, chosen among
    the surviving weights with :math:`\theta_{end} < 0` as those with the smallest movement
    :math:`|\theta_{end} - \theta_{start}|` (:func:`ap_prune_step`):

    .. math:: S_t = \operatorname{top}_k^{\min} \{\, |\theta_{end,i} - \theta_{start,i}| \;:\;
              m_i = 1,\ \theta_{end,i} < 0 \,\}, \qquad k = \operatorname{round}(q \cdot N_t)

    Removing a negative weight raises the pre-activation it feeds when that input is non-negative (ReLU
    outputs, pixels in [0, 1]), which lowers the dynamic dead-neuron rate (:func:`dead_neuron_rate`), the
    quantity the paper argues hurts pruned networks. For a first layer fed standardised (mean-zero) inputs it
    can raise it instead (measured in ``docs/results/activating_while_pruning.md``).

    Where this differs from the reference code: the budget is rounded rather than floored; the selection is a
    stable top-k instead of a ``<=`` threshold (which removes too many on ties, e.g. exact-zero movement); only
    Linear/Conv weights are pruned (the code used every parameter named ``weight``, BatchNorm scales
    included); and the cycle boundaries are the base pruner's events rather than a fixed epoch count.

    How it composes with pruners (no dependence on their internals):

    - ``torch.nn.utils.prune`` masks (``ModelPruning``): the AP selection is written into ``weight_mask``,
      so the base pruner's next step counts it as pruned.
    - Pruners that zero weights, and structured pruners that physically remove channels: AP keeps its own
      mask per layer. After every optimizer step it re-zeroes the pruned weights (base pruner's and its own)
      and their optimizer state (momentum, Adam moments), and it zeroes their gradients before the step, so
      momentum or weight decay cannot revive them. When a layer shrank, the kept slices are located by value
      in the last :math:`\theta_{end}` snapshot, and :math:`\theta_{start}` is sliced the same way, so the AP
      step works on the surviving weights of the shrunk model; :math:`\theta_{start}` of the next cycle is
      recorded after the change.
    - Pruning must happen at epoch boundaries (any epoch-level hook, in any order of the callbacks list):
      AP processes a pruning event at the first training batch after it (or at ``on_train_end`` for the
      last epoch), so checkpoints hold either the state before or after the whole event and a resumed run
      matches an uninterrupted one.

    Use ``exclude`` to spare layers (e.g. the output layer). Logged: ``<prefix>dnr`` after every training
    epoch on a fixed probe batch (the first ``probe_size`` training samples, ``eval`` mode, so BatchNorm uses
    running statistics and nothing is updated), and at each
    pruning event ``<prefix>{cycle, base_fraction, ap_pruned, sparsity, params, params_nonzero, macs,
    macs_nonzero, latency_ms, dnr}`` (also kept in :attr:`history`). Decisions are taken on rank 0 and
    broadcast under DDP; FSDP and DeepSpeed are refused (their parameters are sharded). The callback state
    (masks, :math:`\theta_{start}`, :math:`\theta_{end}`, history) is saved in checkpoints and loads with
    ``weights_only=True``; it holds two extra copies of the pruned layers' weights.

    Args:
        q: AP's share of each cycle, a fraction of the weights alive at the cycle's start (reference: 0.02).
        p: the cycle's total pruning rate (reference: 0.2), i.e. the base pruner removes ``p - q``. Optional:
            when given, ``q < p`` is checked and a warning says when the measured share removed by an
            unstructured base pruner is far from ``p - q``.
        layers: names of the ``Linear``/``Conv`` modules AP may prune (``pl_module.named_modules()`` names,
            e.g. ``net.0``); all of them by default.
        exclude: names of modules to leave alone (e.g. the classifier head).
        probe_size: training samples in the fixed probe batch for DNR and latency (0 disables both).
        latency_repeats: timed forward passes of the probe batch per pruning event (0 disables latency).
        log_prefix: prefix of the logged metric names.
        verbose: print one line per pruning event (rank 0).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.callbacks import ModelPruning
        >>> from lightning_ext import DigitsDataModule, ImageClassifier
        >>> model = ImageClassifier("resnet10t", num_classes=10, image_size=8)
        >>> pruner = ModelPruning("l1_unstructured", amount=0.18, parameter_names=["weight"],
        ...                       use_lottery_ticket_hypothesis=False)
        >>> ap = ActivatingWhilePruning(q=0.02, p=0.2)
        >>> Trainer(max_epochs=3, callbacks=[pruner, ap]).fit(model, datamodule=DigitsDataModule())  # doctest: +SKIP
        >>> ap.history[-1]["dnr"]  # doctest: +SKIP
    """

    def __init__(
        self,
        q: float = 0.02,
        p: Optional[float] = None,
        layers: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        probe_size: int = 128,
        latency_repeats: int = 5,
        log_prefix: str = "ap/",
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < float(q) < 1.0:
            raise ValueError(f"`q` must be a fraction in (0, 1) (the reference code uses 0.02), got {q!r}.")
        if p is not None:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) < 1.0:
                raise ValueError(f"`p` must be a fraction in (0, 1) (the reference code uses 0.2) or None, got {p!r}.")
            if q >= p:
                raise ValueError(
                    f"`q` ({q}) must be smaller than `p` ({p}): AP takes a share q of each cycle's pruning rate p, "
                    "and the base pruner removes p - q. Lower `q` or raise `p`."
                )
        for arg, value in (("layers", layers), ("exclude", exclude)):
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise TypeError(f"`{arg}` must be a list of module names, got {value!r}.")
        if layers is not None and len(layers) == 0:
            raise ValueError("`layers` is empty; leave it as None to let AP prune every Linear/Conv layer.")
        if not isinstance(probe_size, int) or probe_size < 0:
            raise ValueError(f"`probe_size` must be an int >= 0 (0 disables DNR and latency), got {probe_size!r}.")
        if not isinstance(latency_repeats, int) or latency_repeats < 0:
            raise ValueError(f"`latency_repeats` must be an int >= 0, got {latency_repeats!r}.")
        self.q = float(q)
        self.p = None if p is None else float(p)
        self.layers = list(layers) if layers is not None else None
        self.exclude = list(exclude) if exclude is not None else []
        self.probe_size = probe_size
        self.latency_repeats = latency_repeats
        self.log_prefix = log_prefix
        self.verbose = verbose
        # state (saved in checkpoints)
        self.history: list[dict[str, float]] = []
        self._alive_ref: Optional[dict[str, Tensor]] = None
        self._theta_start: Optional[dict[str, Tensor]] = None
        self._theta_end: Optional[dict[str, Tensor]] = None
        self._warned_p = False
        # runtime only
        self._names: list[str] = []
        self._probe: Optional[Tensor] = None
        self._probe_ready = False
        self._check_pending = True

    @property
    def state_key(self) -> str:
        return self._generate_state_key(q=self.q, p=self.p, layers=self.layers, exclude=self.exclude)

    # -- setup ----------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if "fsdp" in strategy.lower() or "deepspeed" in strategy.lower():
            raise RuntimeError(
                f"ActivatingWhilePruning does not support {strategy}: it masks single weights of whole, "
                "unsharded parameters. Use a single device or strategy='ddp'."
            )
        prunable = {name: m for name, m in pl_module.named_modules() if isinstance(m, _PRUNABLE_TYPES)}
        for arg, names in (("layers", self.layers or []), ("exclude", self.exclude)):
            unknown = [n for n in names if n not in prunable]
            if unknown:
                raise ValueError(
                    f"ActivatingWhilePruning: `{arg}` names {unknown} that are not Linear/Conv modules of "
                    f"{type(pl_module).__name__}. Prunable modules: {sorted(prunable)[:20]}"
                    + (" ..." if len(prunable) > 20 else "")
                )
        names = self.layers if self.layers is not None else list(prunable)
        self._names = [n for n in names if n not in set(self.exclude)]
        if not self._names:
            raise ValueError(
                "ActivatingWhilePruning has no layer to prune: the model has no Linear/Conv module outside "
                "`exclude`. Check `layers`/`exclude`."
            )
        if stage == "fit" and not any(isinstance(m, _RELU_TYPES) for m in pl_module.modules()):
            rank_zero_warn(
                "ActivatingWhilePruning: the model has no nn.ReLU module, so the dead-neuron rate cannot be "
                "measured (F.relu calls cannot be hooked); AP still prunes."
            )
        if stage == "fit":  # a new fit starts a new history; a resumed fit loads its state after setup()
            self.history, self._warned_p = [], False
            self._alive_ref = self._theta_start = self._theta_end = None
        self._probe, self._probe_ready = None, False
        self._check_pending = True

    # -- helpers --------------------------------------------------------------------------------------------
    def _modules(self, pl_module: LightningModule) -> dict[str, nn.Module]:
        return {n: pl_module.get_submodule(n) for n in self._names}

    def _snapshot(self, pl_module: LightningModule) -> dict[str, Tensor]:
        return {n: _effective_weight(m)[0].clone() for n, m in self._modules(pl_module).items()}

    def _probe_inputs(self, trainer: Trainer, pl_module: LightningModule) -> Optional[Tensor]:
        if self._probe_ready:
            return self._probe
        self._probe_ready = True
        if self.probe_size == 0 or not any(isinstance(m, _RELU_TYPES) for m in pl_module.modules()):
            return None
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        try:
            n = min(self.probe_size, len(dataset))  # type: ignore[arg-type]
            batch = torch.utils.data.default_collate([dataset[i] for i in range(n)])  # type: ignore[index]
        except (TypeError, NotImplementedError, KeyError, AttributeError):
            rank_zero_warn(
                "ActivatingWhilePruning: the training dataset is not indexable, so no fixed probe batch can be "
                "built; the dead-neuron rate and latency are not logged (pruning is unaffected)."
            )
            return None
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor):
            rank_zero_warn(
                "ActivatingWhilePruning: training samples are not tensors or (input, target) tuples; the "
                "dead-neuron rate and latency are not logged (pruning is unaffected)."
            )
            return None
        self._probe = x.to(pl_module.device)
        return self._probe

    def _dnr(self, trainer: Trainer, pl_module: LightningModule) -> Optional[float]:
        probe = self._probe_inputs(trainer, pl_module)
        if probe is None:
            return None
        try:
            return float(dead_neuron_rate(pl_module, probe))
        except Exception as err:  # noqa: BLE001 - a logging aid must not stop training
            rank_zero_warn(
                f"ActivatingWhilePruning: the model cannot be called on the probe batch ({type(err).__name__}: "
                f"{err}); the dead-neuron rate and latency are not logged (pruning is unaffected). Set "
                "`probe_size: 0` to silence this."
            )
            self._probe = None
            return None

    def _log_events(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        row = {self.log_prefix + k: float(v) for k, v in metrics.items()}
        row["epoch"] = float(trainer.current_epoch)  # as Lightning's own logging adds it
        for logger in trainer.loggers:
            logger.log_metrics(row, step=trainer.global_step)

    # -- masks through optimisation -------------------------------------------------------------------------
    def _own_masks(self, pl_module: LightningModule):
        if self._alive_ref is None:
            return
        for name, module in self._modules(pl_module).items():
            if _is_reparametrized(module):
                continue  # torch.nn.utils.prune applies weight_mask in forward; gradients are masked by it
            mask = self._alive_ref.get(name)
            weight = module.weight
            if mask is None or mask.shape != weight.shape:
                continue  # a shape change not processed yet (between a structured prune and the next batch)
            if mask.device != weight.device:
                mask = self._alive_ref[name] = mask.to(weight.device)
            yield module, weight, mask

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        for _module, weight, mask in self._own_masks(pl_module):
            if weight.grad is not None:
                weight.grad.mul_(mask)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        optimizers = trainer.optimizers
        with torch.no_grad():
            for _module, weight, mask in self._own_masks(pl_module):
                weight.mul_(mask)
                for opt in optimizers:
                    for value in opt.state.get(weight, {}).values():
                        if isinstance(value, Tensor) and value.shape == mask.shape:
                            value.mul_(mask)
        total = trainer.num_training_batches
        if math.isinf(total) or batch_idx + 1 >= total:
            self._theta_end = self._snapshot(pl_module)  # before any epoch-end pruner acts
            dnr = self._dnr(trainer, pl_module)
            if dnr is not None:
                pl_module.log(self.log_prefix + "dnr", dnr, on_step=False, on_epoch=True, sync_dist=True)

    # -- cycle bookkeeping ----------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_pending = True

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._check_pending:
            self._check_pending = False
            self._process(trainer, pl_module, final=False)
        if self._theta_start is None:
            self._theta_start = self._snapshot(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._process(trainer, pl_module, final=True)  # pruning at the last epoch's end

    def _process(self, trainer: Trainer, pl_module: LightningModule, final: bool) -> None:
        """Detect a pruning event by another callback since the last check and add the AP step to it."""
        modules = self._modules(pl_module)
        current = {n: _effective_weight(m) for n, m in modules.items()}
        if self._alive_ref is None:
            self._alive_ref = {n: alive.clone() for n, (_, alive) in current.items()}
            return
        reshaped = [n for n in modules if current[n][1].shape != self._alive_ref[n].shape]
        pruned = any(
            bool((self._alive_ref[n].to(alive.device) & ~alive).any())
            for n, (_, alive) in current.items()
            if n not in reshaped
        )
        if not reshaped and not pruned:
            revived = any(
                bool((alive & ~self._alive_ref[n].to(alive.device)).any()) for n, (_, alive) in current.items()
            )
            if revived:  # a pruner that regrows weights: follow it
                self._alive_ref = {n: alive.clone() for n, (_, alive) in current.items()}
            return
        self._ap_event(trainer, pl_module, modules, current, reshaped, final)

    def _ap_event(self, trainer, pl_module, modules, current, reshaped, final) -> None:
        n_start = sum(int(m.sum()) for m in self._alive_ref.values())
        alive_now = {n: alive for n, (_, alive) in current.items()}
        n_after_base = sum(int(m.sum()) for m in alive_now.values())
        start, end = self._theta_start, self._theta_end
        skipped: list[str] = []
        usable: list[str] = []
        if start is None or end is None:
            skipped = list(modules)
        else:
            for n in modules:
                s, e = start.get(n), end.get(n)
                if s is None or e is None or s.shape != e.shape:
                    skipped.append(n)
                elif n in reshaped:
                    idx = _match_kept_indices(e, current[n][0])
                    if idx is None:
                        skipped.append(n)
                    else:
                        start[n], end[n] = _take(s, idx), _take(e, idx)
                        usable.append(n)
                elif e.shape == alive_now[n].shape:
                    usable.append(n)
                else:
                    skipped.append(n)
        if skipped:
            rank_zero_warn(
                f"ActivatingWhilePruning: no consistent start/end weights for {skipped[:5]}"
                + (" ..." if len(skipped) > 5 else "")
                + " at this pruning event (pruned before the first training epoch ended, mid-epoch, or "
                "changed other than by slicing); AP skips them this cycle."
            )
        k = int(round(self.q * n_start))
        new_masks = dict(alive_now)
        if usable and k > 0:
            sub = None
            if trainer.is_global_zero:  # decided on rank 0, broadcast (on CPU) to every rank
                sub = ap_prune_step(
                    {n: start[n] for n in usable}, {n: end[n] for n in usable}, {n: alive_now[n] for n in usable}, k
                )
                sub = {n: m.cpu() for n, m in sub.items()}
            sub = trainer.strategy.broadcast(sub, src=0)
            new_masks.update({n: m.to(alive_now[n].device) for n, m in sub.items()})
        with torch.no_grad():
            for n, module in modules.items():
                mask = new_masks[n]
                if _is_reparametrized(module):
                    module.weight_mask.mul_(mask.to(module.weight_mask.dtype))
                else:
                    module.weight.mul_(mask.to(module.weight.dtype))
                    for opt in trainer.optimizers:
                        for value in opt.state.get(module.weight, {}).values():
                            if isinstance(value, Tensor) and value.shape == mask.shape:
                                value.mul_(mask.to(value.dtype))
        ap_pruned = n_after_base - sum(int(m.sum()) for m in new_masks.values())
        self._alive_ref = {n: m.clone() for n, m in new_masks.items()}
        self._theta_start, self._theta_end = None, None  # the next cycle starts at the next training batch
        base_fraction = (n_start - n_after_base) / max(1, n_start) if not reshaped else float("nan")
        if (self.p is not None and not reshaped and not self._warned_p
                and abs(base_fraction - (self.p - self.q)) > 0.25 * (self.p - self.q)):
            self._warned_p = True
            rank_zero_warn(
                f"ActivatingWhilePruning: the base pruner removed {base_fraction:.3f} of the surviving weights "
                f"in this cycle, but p - q = {self.p - self.q:.3f}. Set the base pruner's amount to p - q (AP adds "
                "q) or set `p` to match."
            )
        total = sum(m.numel() for m in new_masks.values())
        alive_total = sum(int(m.sum()) for m in new_masks.values())
        event: dict[str, float] = {
            "cycle": float(len(self.history) + 1),
            "epoch": float(trainer.current_epoch),
            "step": float(trainer.global_step),
            "base_fraction": base_fraction,
            "ap_requested": float(k),
            "ap_pruned": float(ap_pruned),
            "alive": float(alive_total),
            "sparsity": 1.0 - alive_total / max(1, total),
        }
        dnr = self._dnr(trainer, pl_module)
        if dnr is not None:
            event.update({k_: float(v) for k_, v in model_cost(pl_module, self._probe, self.latency_repeats).items()})
            event["dnr"] = dnr
        self.history.append(event)
        self._log_events(trainer, {k_: v for k_, v in event.items() if k_ not in ("epoch", "step")})
        if self.verbose:
            extra = f", DNR {event['dnr']:.3f}" if "dnr" in event else ""
            rank_zero_info(
                f"ActivatingWhilePruning: cycle {int(event['cycle'])} "
                f"{'at the end of training' if final else f'before epoch {trainer.current_epoch}'}: base pruner "
                f"removed {n_start - n_after_base}, AP "
                f"removed {ap_pruned} negative slow weights; sparsity {event['sparsity']:.3f}{extra}."
            )

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        def cpu(d):
            return None if d is None else {k: v.detach().cpu().clone() for k, v in d.items()}

        return {
            "alive_ref": cpu(self._alive_ref),
            "theta_start": cpu(self._theta_start),
            "theta_end": cpu(self._theta_end),
            "history": [dict(h) for h in self.history],
            "warned_p": self._warned_p,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._alive_ref = state_dict["alive_ref"]
        self._theta_start = state_dict["theta_start"]
        self._theta_end = state_dict["theta_end"]
        self.history = [dict(h) for h in state_dict["history"]]
        self._warned_p = bool(state_dict.get("warned_p", False))
        self._check_pending = True
