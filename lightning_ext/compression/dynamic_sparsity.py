"""DSL's pure core (Dynamic Sparse Learning, Wang et al., WSDM 2024): masks, the cosine update ratio and prune-and-grow.

:func:`update_ratio_schedule`, :func:`random_masks`, :func:`prune_and_grow`, :func:`sparse_parameters` and
:class:`DynamicSparsity` work on any set of parameters and any optimizer without a Trainer (FedTiny's clients use
them too); the Lightning callback :class:`~lightning_ext.compression.dynamic_sparse_training.DynamicSparseTraining`
drives them from the training hooks.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Literal, Optional, Sequence, get_args

import torch
from torch import Tensor, nn

from lightning_ext.core.layers import match_names
from lightning_ext.core.validation import check_choice, check_number

__all__ = ["DynamicSparsity", "FIRST_MOMENTS", "SECOND_MOMENTS", "TARGET_TYPES", "Targets", "prune_and_grow",
           "random_masks", "sparse_parameters", "update_ratio_schedule"]

#: which module types DSL makes sparse
Targets = Literal["all", "embedding", "linear"]
TARGET_TYPES = {"all": (nn.Embedding, nn.Linear), "embedding": (nn.Embedding,), "linear": (nn.Linear,)}
#: optimizer state that follows the gradient's sign (masked every step when gradients are not masked)
FIRST_MOMENTS = ("momentum_buffer", "exp_avg")
#: optimizer state read through a square root (Adam, AdamW, NAdam, RAdam; AMSGrad's maximum)
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


# -- the pure core --------------------------------------------------------------------------------------------
def update_ratio_schedule(step: int, total_steps: int, update_ratio: float = 0.5,
                          min_update_ratio: float = 0.005) -> float:
    r"""The cosine-annealed update ratio after ``step`` optimizer steps (DSL's eq. for :math:`p_t`):

    .. math:: p_t = \eta_{min} + (p_0 - \eta_{min}) \, \tfrac{1}{2}\left(1 + \cos\tfrac{\pi t}{T}\right),

    with :math:`p_0` = ``update_ratio``, :math:`\eta_{min}` = ``min_update_ratio`` and :math:`T` = ``total_steps``;
    it stays at :math:`\eta_{min}` after :math:`T` (the official code steps a ``CosineAnnealingLR`` once per
    optimizer step, which is this closed form up to rounding for :math:`t \le T`).

    Example:
        >>> update_ratio_schedule(0, 100), update_ratio_schedule(100, 100), round(update_ratio_schedule(50, 100), 4)
        (0.5, 0.005, 0.2525)
    """
    t = min(max(int(step), 0), int(total_steps))
    return min_update_ratio + (update_ratio - min_update_ratio) * 0.5 * (1.0 + math.cos(math.pi * t / total_steps))


def random_masks(shapes: dict[str, Sequence[int]], density: float, seed: int = 0) -> dict[str, Tensor]:
    """One random boolean mask per tensor with exactly ``max(1, round(density * numel))`` kept entries.

    Drawn on the CPU from a generator seeded with ``seed`` (tensors in ``shapes`` order), so every process of a
    distributed run draws the same masks. The official code draws each entry independently with probability
    ``density``; an exact count keeps the parameter budget exact.

    Example:
        >>> m = random_masks({"w": (4, 5)}, 0.5)
        >>> int(m["w"].sum()), m["w"].dtype
        (10, torch.bool)
    """
    generator = torch.Generator().manual_seed(int(seed))
    masks = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        keep = min(numel, max(1, round(density * numel)))
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[torch.randperm(numel, generator=generator)[:keep]] = True
        masks[name] = mask.view(*shape)
    return masks


def _smallest(values: Tensor, n: int) -> Tensor:
    """Indices of the ``n`` smallest of a 1-D tensor, ties to the lower index: the first ``n`` of a stable sort,
    found with one ``kthvalue`` (linear time; a full sort is about 6x slower on 50k entries)."""
    if n >= values.numel():
        return torch.arange(values.numel(), device=values.device)
    threshold = torch.kthvalue(values, n).values
    below = (values < threshold).nonzero().squeeze(1)
    tied = (values == threshold).nonzero().squeeze(1)
    return torch.cat([below, tied[: n - below.numel()]])


def prune_and_grow(weight: Tensor, mask: Tensor, grad: Tensor, update_ratio: float) -> tuple[Tensor, int]:
    r"""One DSL update of one tensor: drop ``n = ceil(update_ratio * nnz)`` active weights of smallest magnitude,
    then activate the ``n`` inactive positions (the just-dropped included) with the largest gradient magnitude.

    .. math:: \mathcal{D} = \operatorname{argtopk}^{\min}_{n} \{|w_i| : m_i = 1\}, \quad
              \mathcal{G} = \operatorname{argtopk}^{\max}_{n} \{|g_i| : m_i = 1 \Rightarrow i \in \mathcal{D}\}

    The number of active weights is unchanged. Ties go to the lower flat index (stable sorts); the official code
    drops everything at or below the n-th magnitude instead, which drops more than ``n`` on ties. Grown weights
    keep their current value: 0 for positions inactive before this update (weights are masked), the old value
    for a weight dropped and regrown in the same update, as in the official code.

    Args:
        weight: the (masked) weights.
        mask: boolean mask of the active entries, same shape.
        grad: the dense gradient of the current batch (inactive entries included), same shape.
        update_ratio: :math:`p_t`, the share of active weights replaced.

    Returns:
        ``(new_mask, n)``.

    Example:
        >>> w = torch.tensor([0.0, 0.5, -0.1, 0.0, 2.0])
        >>> m = torch.tensor([False, True, True, False, True])
        >>> g = torch.tensor([0.3, 0.0, 0.0, -0.9, 0.0])
        >>> prune_and_grow(w, m, g, 0.3)  # drops index 2 (|w| 0.1), grows index 3 (|g| 0.9)
        (tensor([False,  True, False,  True,  True]), 1)
    """
    flat_mask = mask.reshape(-1)
    nnz = int(flat_mask.sum())
    n = min(math.ceil(update_ratio * nnz), nnz)
    if n == 0:
        return mask.clone(), 0
    active = flat_mask.nonzero().squeeze(1)
    drop = active[_smallest(weight.detach().reshape(-1)[active].abs(), n)]
    new_mask = flat_mask.clone()
    new_mask[drop] = False
    inactive = (~new_mask).nonzero().squeeze(1)
    grow = inactive[_smallest(-grad.detach().reshape(-1)[inactive].abs(), n)]
    new_mask[grow] = True
    return new_mask.view_as(mask), n


def sparse_parameters(model: nn.Module, targets: Targets = "all", layers: Optional[Sequence[str]] = None,
                      ignored_layers: Optional[Sequence[str]] = None, include_bias: bool = True,
                      owner: str = "DynamicSparseTraining") -> dict[str, nn.Parameter]:
    """The parameters DSL makes sparse: ``weight`` (and ``bias``) of the ``nn.Embedding``/``nn.Linear`` modules
    selected by ``targets``, ``layers`` and ``ignored_layers``, keyed by parameter name (``model.named_parameters``).

    Raises ``ValueError`` naming the eligible modules when nothing matches.

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
        >>> list(sparse_parameters(net)), list(sparse_parameters(net, "embedding"))
        (['0.weight', '1.weight', '1.bias'], ['0.weight'])
    """
    check_choice("targets", targets, get_args(Targets))
    eligible = [n for n, m in model.named_modules() if n and isinstance(m, TARGET_TYPES[targets])]
    kinds = " / ".join(f"nn.{t.__name__}" for t in TARGET_TYPES[targets])
    listing = ", ".join(eligible[:20]) + (" ..." if len(eligible) > 20 else "")
    what = f"the {kinds} modules of {type(model).__name__} ({listing or 'none'})"
    names = match_names(eligible, layers, "layers", what) if layers is not None else eligible
    ignored = set(match_names(eligible, ignored_layers, "ignored_layers", what))
    names = [n for n in names if n not in ignored]
    if not names:
        every = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n]
        raise ValueError(
            f"{owner} found no {kinds} layer to make sparse (targets={targets!r}, layers={layers!r}, "
            f"ignored_layers={ignored_layers!r}); the model's modules are: {', '.join(every[:30]) or 'none'}"
            + (" ..." if len(every) > 30 else "") + ". Change `targets`/`layers`/`ignored_layers`."
        )
    params: dict[str, nn.Parameter] = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding) and module.sparse:
            raise ValueError(f"{owner}: `{name}` is an nn.Embedding with sparse=True; DSL grows weights by their "
                             "dense gradients. Build it with sparse=False.")
        for pname in ("weight", "bias") if include_bias else ("weight",):
            p = getattr(module, pname, None)
            if isinstance(p, nn.Parameter) and p.requires_grad:
                params[f"{name}.{pname}"] = p
    return params


class DynamicSparsity:
    """Masks over a set of parameters and the DSL updates, for a plain training loop (no Trainer needed).

    Per optimizer step: :meth:`before_step` after ``backward`` (masks the gradients; on an update step it first
    keeps the dense gradients for growth), then ``optimizer.step()``, then :meth:`after_step` (re-masks the
    weights, counts the step and every ``delta_t`` steps runs :func:`prune_and_grow` on every tensor with the
    ratio :func:`update_ratio_schedule` gives, then masks the weights and the optimizer state of the new
    inactive entries).

    Optimizer state: it is masked at every mask change (momentum, Adam's moments: every state tensor of the
    parameter's shape). Between changes the masked gradients keep it zero for the inactive entries (SGD with
    momentum or weight decay, Adam, AdamW, RMSprop, Adagrad), so the per-step cost is two elementwise products.

    Adam's second moment on CPU: masked gradients leave ``exp_avg_sq`` exactly zero on the inactive entries, and
    PyTorch's CPU ``sqrt`` is about 10x slower on zeros than on positive numbers (measured: 1.2 vs 0.12 ms per 200k
    floats), which made Adam's step on MF-BPR's ML-100K tables 2.1 instead of 1.1 ms at density 0.5. So when
    :meth:`before_step` is given the optimizers, it writes 1 into the inactive entries of ``exp_avg_sq`` (and
    ``max_exp_avg_sq``) for the coming step only, and a one-shot step post-hook (and, at the latest,
    :meth:`after_step`) multiplies them back to exactly 0. Nothing else changes: an inactive entry's first moment and
    gradient are exactly 0, so its update is 0 whatever its second moment, and the active entries' state gets
    ``+ 0`` and ``* 1`` (exact). Parameters and optimizer state after every step are bit-for-bit those of the
    plain path (a test checks); fused optimizers, which have no slow path, are left alone.

    ``mask_gradients=False`` is the official code's order instead: the step sees the dense gradients, then the
    weights and the first moments (``momentum_buffer``, ``exp_avg``) are masked after every step; second moments
    (``exp_avg_sq``) keep the inactive entries' gradient history, as in the official code.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Linear(8, 1)
        >>> opt = torch.optim.Adam(net.parameters(), lr=0.1)
        >>> dsl = DynamicSparsity({"weight": net.weight}, density=0.5, delta_t=2, total_steps=10)
        >>> dsl.apply([opt])
        >>> for _ in range(4):
        ...     opt.zero_grad(); net(torch.randn(16, 8)).pow(2).mean().backward()
        ...     grads = dsl.before_step([opt]); opt.step(); _ = dsl.after_step([opt], grads)
        >>> int((net.weight != 0).sum()), dsl.steps, len(dsl.history)
        (4, 4, 2)
    """

    def __init__(self, params: dict[str, nn.Parameter], density: float = 0.5, delta_t: int = 100,
                 total_steps: int = 1000, update_ratio: float = 0.5, min_update_ratio: float = 0.005, seed: int = 0,
                 masks: Optional[dict[str, Tensor]] = None, mask_gradients: bool = True) -> None:
        check_number("density", density, low=0, high=1, low_open=True, high_open=True)
        check_number("delta_t", delta_t, low=1, integer=True)
        check_number("total_steps", total_steps, low=1, integer=True)
        check_number("update_ratio", update_ratio, low=0, high=1, low_open=True)
        check_number("min_update_ratio", min_update_ratio, low=0, high=update_ratio)
        if not params:
            raise ValueError("DynamicSparsity needs at least one parameter to make sparse.")
        self.params = dict(params)
        self.density, self.delta_t, self.total_steps = float(density), int(delta_t), int(total_steps)
        self.update_ratio, self.min_update_ratio, self.seed = float(update_ratio), float(min_update_ratio), int(seed)
        self.mask_gradients = bool(mask_gradients)
        self.steps = 0
        self.history: list[dict[str, float]] = []
        self._pending: list[_RestoreSecondMoments] = []
        if masks is None:
            masks = random_masks({n: tuple(p.shape) for n, p in self.params.items()}, density, seed)
        self.set_masks(masks)

    def set_masks(self, masks: dict[str, Tensor]) -> None:
        """Install ``masks`` (boolean, one per parameter, same shapes) on the parameters' devices."""
        if set(masks) != set(self.params):
            raise ValueError(f"the masks are for {sorted(masks)} but the sparse parameters are {sorted(self.params)}.")
        for n, p in self.params.items():
            if tuple(masks[n].shape) != tuple(p.shape):
                raise ValueError(f"the mask of {n} has shape {tuple(masks[n].shape)}, the parameter {tuple(p.shape)}.")
        self.masks = {n: masks[n].to(device=p.device, dtype=torch.bool) for n, p in self.params.items()}
        self._float = {n: m.to(self.params[n].dtype) for n, m in self.masks.items()}
        self._fill = {n: 1 - f for n, f in self._float.items()}  # 1 on the inactive entries

    def ratio(self) -> float:
        """The update ratio :math:`p_t` at the current step."""
        return update_ratio_schedule(self.steps, self.total_steps, self.update_ratio, self.min_update_ratio)

    def update_due(self) -> bool:
        """Whether the coming optimizer step is followed by a prune-and-grow update."""
        return (self.steps + 1) % self.delta_t == 0

    @torch.no_grad()
    def apply(self, optimizers: Iterable[torch.optim.Optimizer] = (), first_moments_only: Optional[bool] = None) -> None:
        """Zero the inactive weights and their optimizer state (only the first moments with ``mask_gradients=False``,
        or when ``first_moments_only`` says so)."""
        names = list(self.params)
        torch._foreach_mul_([self.params[n].data for n in names], [self._float[n] for n in names])
        first_only = (not self.mask_gradients) if first_moments_only is None else first_moments_only
        states, masks = [], []
        for opt in optimizers:
            for n in names:
                for key, value in opt.state.get(self.params[n], {}).items():
                    if (isinstance(value, Tensor) and value.shape == self.params[n].shape
                            and (not first_only or key in FIRST_MOMENTS)):
                        states.append(value)
                        masks.append(self._float[n].to(value.dtype))
        if states:
            torch._foreach_mul_(states, masks)

    @torch.no_grad()
    def before_step(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> Optional[dict[str, Tensor]]:
        """Mask the gradients; on an update step return copies of the dense gradients first (else ``None``).

        Given the ``optimizers`` about to step, it also fills the inactive entries of their second moments for that
        step only (the same result, faster on CPU: see the class docstring)."""
        grads = [(n, p.grad) for n, p in self.params.items() if p.grad is not None]
        if any(g.is_sparse for _, g in grads):
            raise RuntimeError("DynamicSparsity needs dense gradients; use nn.Embedding(sparse=False).")
        if not self.mask_gradients:
            return {n: g for n, g in grads} if self.update_due() else None  # the step does not change them
        dense = {n: g.clone() for n, g in grads} if self.update_due() else None
        if grads:
            torch._foreach_mul_([g for _, g in grads], [self._float[n] for n, _ in grads])
        for opt in optimizers:
            self._fill_second_moments(opt)
        return dense

    def _fill_second_moments(self, opt: torch.optim.Optimizer) -> None:
        """Add 1 to the inactive entries of ``opt``'s second moments; a step post-hook zeroes them again."""
        if any(group.get("fused") for group in opt.param_groups):
            return  # the fused CPU kernel has no slow path on zeros
        states, fills, masks = [], [], []
        for n, p in self.params.items():
            state = opt.state.get(p)
            if not state:
                continue  # no state yet: the optimizer creates it (zeros) in this step
            for key in SECOND_MOMENTS:
                value = state.get(key)
                if isinstance(value, Tensor) and value.shape == p.shape and value.is_floating_point():
                    same = value.dtype == p.dtype  # the usual case: no conversion
                    states.append(value)
                    fills.append(self._fill[n] if same else self._fill[n].to(value.dtype))
                    masks.append(self._float[n] if same else self._float[n].to(value.dtype))
        if states:
            torch._foreach_add_(states, fills)
            restore = _RestoreSecondMoments(states, masks)
            restore.handle = opt.register_step_post_hook(restore)
            self._pending.append(restore)

    def _restore_second_moments(self) -> None:
        """Zero the filled entries now if a step post-hook has not (a step that never ran), and drop the hooks."""
        for restore in self._pending:
            restore()
            restore.handle.remove()
        self._pending = []

    @torch.no_grad()
    def after_step(self, optimizers: Iterable[torch.optim.Optimizer] = (),
                   grads: Optional[dict[str, Tensor]] = None) -> Optional[dict[str, float]]:
        """Re-mask the weights (and, with ``mask_gradients=False``, the first moments), count the step, and on an
        update step prune and grow (returns its record)."""
        self._restore_second_moments()
        if self.mask_gradients:
            names = list(self.params)
            torch._foreach_mul_([self.params[n].data for n in names], [self._float[n] for n in names])
        else:
            self.apply(optimizers)
        self.steps += 1
        if self.steps % self.delta_t:
            return None
        if grads is None:
            raise RuntimeError("a prune-and-grow step needs the dense gradients that before_step() returned.")
        return self.update(grads, optimizers)

    @torch.no_grad()
    def update(self, grads: dict[str, Tensor], optimizers: Iterable[torch.optim.Optimizer] = ()) -> dict[str, float]:
        """Prune and grow every tensor now, at the ratio of the current step; masks weights and state."""
        ratio = self.ratio()
        changed = total = active = 0
        new_masks = {}
        for n, p in self.params.items():
            g = grads.get(n)
            if g is None:  # no gradient reached this tensor: nothing to grow by, keep its mask
                new_masks[n] = self.masks[n]
                continue
            new_masks[n], _ = prune_and_grow(p, self.masks[n], g, ratio)
            changed += int((new_masks[n] & ~self.masks[n]).sum())
        for n, m in new_masks.items():
            total += m.numel()
            active += int(m.sum())
        self.set_masks(new_masks)
        self.apply(optimizers)
        record = {"step": float(self.steps), "update_ratio": ratio, "grown": float(changed),
                  "density": active / max(1, total)}
        self.history.append(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        """Masks (boolean, CPU), step count, total steps and the update history."""
        return {"masks": {n: m.detach().cpu().clone() for n, m in self.masks.items()}, "steps": self.steps,
                "total_steps": self.total_steps, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.set_masks(state["masks"])
        self.steps, self.total_steps = int(state["steps"]), int(state["total_steps"])
        self.history = [dict(h) for h in state["history"]]


class _RestoreSecondMoments:
    """A one-shot optimizer step post-hook: multiply the filled second moments by their masks (exactly 0 again)."""

    def __init__(self, states: list[Tensor], masks: list[Tensor]) -> None:
        self.states, self.masks, self.done, self.handle = states, masks, False, None

    @torch.no_grad()
    def __call__(self, *args: Any) -> None:
        if not self.done:
            torch._foreach_mul_(self.states, self.masks)
            self.done = True


# -- the Lightning callback -----------------------------------------------------------------------------------
