r"""AdaMerging: learn task-wise or layer-wise merging coefficients by entropy minimisation on unlabelled inputs.

Yang, Wang, Shen, Liu, Guo, Wang, Tao, *AdaMerging: Adaptive Model Merging for Multi-Task Learning*, ICLR
2024, arXiv:2310.02575. Reference code: https://github.com/EnnengYang/AdaMerging
(``src/main_{task,layer}_wise_adamerging{,pp}.py``).

.. math::
    \text{task-wise: } \theta = \theta_0 + \sum_k \lambda_k \tau_k, \qquad
    \text{layer-wise: } \theta^l = \theta_0^l + \sum_k \lambda_k^l \tau_k^l, \qquad
    \min_\lambda \sum_k \mathbb{E}_{x \in B_k} H\big(\mathrm{softmax}(h_k(f_\theta(x)))\big)

As in the reference code: all coefficients start at the prior 0.3; the forward pass uses
``clamp(lambda, 0, 1)`` (a coefficient pushed past a bound gets no gradient there and stays); the
coefficient of :math:`\theta_0` is fixed at 1; the loss is the sum over tasks of the mean softmax entropy of
a batch of unlabelled test inputs of that task, through that task's own frozen head :math:`h_k`; Adam, lr
1e-3, betas (0.9, 0.999), no weight decay, 500 steps. The official loop sums two batches of 16 per task per
step, which for Adam is one batch of 32 (the loss scale does not matter). AdaMerging++ (``ties_density``) learns the
coefficients over TIES-processed task vectors (trimmed to the top share ``ties_density``, the TIES paper's :math:`k`,
and restricted to the elected
sign).

**"Layer"** is each parameter tensor, as in the reference code (which merges ``named_parameters``). Floating
buffers are merged too (absent in the paper's ViTs): BatchNorm running statistics use the coefficients of
their module's ``weight``, detached (BatchNorm is not differentiable in its running statistics, so the
gradient reaches the coefficients through the parameters only); other floating buffers get a row of their own
that never receives a gradient (it stays at the prior). The merged network always runs in eval mode (no
dropout, BatchNorm uses the merged running statistics).

**Memory.** AdaMerging must hold the N task vectors (the merged weights are rebuilt from them at every step,
and the gradient of :math:`\lambda_k^l` is :math:`\langle \partial L/\partial\theta^l, \tau_k^l\rangle`), so it
costs about N + 2 model copies: the base (the network itself), the N stacked task vectors and the merged
weights of the current step (plus activations). :meth:`AdaMergingModel.from_finetuned` fills the stacks one
checkpoint at a time, so loading never needs N more.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union, get_args

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_ext.core.checkpoints import match_prefixes
from lightning_ext.core.inputs import batch_inputs
from lightning_ext.core.validation import check_choice, check_number, check_positive_int
from lightning_ext.merging.ada_diagnostics import AdaMergingHistory
from lightning_ext.merging.task_vectors import (
    DEFAULT_MAX_TASK_VECTOR_RATIO,
    OnForeignBase,
    Source,
    StateDict,
    check_same_architecture,
    is_head_key,
    iter_finetuned,
    mergeable_keys,
    read_state_dict,
)

__all__ = [
    "AdaMergingModel",
    "GRANULARITIES",
    "Granularity",
    "ada_merging_loss",
    "apply_coefficients",
    "entropy_loss",
    "finetuned_agreement",
    "fit_ada_merging",
    "layer_rows",
    "load_shared_weights",
]

#: One coefficient per task (``"task"``) or per tensor and task (``"layer"``).
Granularity = Literal["task", "layer"]
GRANULARITIES = get_args(Granularity)
_STAT_SUFFIXES = (".running_mean", ".running_var")


def entropy_loss(logits: Tensor) -> Tensor:
    r"""Mean Shannon entropy of ``softmax(logits)`` over the batch (in float32), the AdaMerging objective.

    Example:
        >>> torch.isclose(entropy_loss(torch.zeros(4, 10)), torch.log(torch.tensor(10.0)))  # uniform: log C
        tensor(True)
    """
    logits = logits.float()
    return -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()


def layer_rows(keys: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """Rows of the layer-wise coefficient matrix: one per key, except BatchNorm running statistics, which share
    the row of their module's ``weight`` when it is merged. Returns ``(row names, key -> row)``."""
    names: list[str] = []
    row_of: dict[str, int] = {}
    key_set = set(keys)
    for key in keys:
        if key.endswith(_STAT_SUFFIXES) and key.rsplit(".", 1)[0] + ".weight" in key_set:
            continue
        row_of[key] = len(names)
        names.append(key)
    for key in keys:
        if key not in row_of:
            row_of[key] = row_of[key.rsplit(".", 1)[0] + ".weight"]
    return names, row_of


def _assign(module: nn.Module, key: str, value: Tensor) -> None:
    """Replace the parameter or buffer ``key`` of ``module`` by ``value`` (its shape may differ)."""
    owner_name, _, attr = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value.detach().clone(), requires_grad=owner._parameters[attr].requires_grad)
    elif attr in owner._buffers:
        owner._buffers[attr] = value.detach().clone()
    else:
        raise KeyError(f"The network has no parameter or buffer {key!r}.")


class AdaMergingModel(nn.Module):
    r"""A merged network whose only trainable parameters are the merging coefficients (the functional core).

    ``forward(x, task)`` rebuilds the merged weights :math:`\theta_0 + \sum_k \mathrm{clamp}(\lambda_k^{(l)},
    0, 1)\,\tau_k` and runs ``network`` on them with :func:`torch.func.functional_call`, with the head tensors
    of ``task`` substituted, so gradients reach only :attr:`raw_coefficients`. The network's own weights are
    :math:`\theta_0` (frozen, eval mode).

    Args:
        network: the architecture, holding the pretrained weights :math:`\theta_0`.
        task_vectors: one ``{key: tensor}`` per task (the mergeable keys of ``network``: floating, not heads),
            or ``{key: tensor of shape (N, *shape)}`` already stacked.
        heads: one ``{head key: tensor}`` per task (keys of ``network``; shapes may differ from its own head),
            or ``None`` when all tasks share the network's head.
        granularity: ``"layer"`` (one coefficient per tensor and task) or ``"task"`` (one per task).
        prior: initial value of every coefficient (0.3 in the paper's code).
        clamp_range: the coefficients used are clamped to this range (``(0, 1)`` in the paper's code).
        task_names: names for logs and plots (default ``task0..``).

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> tvs = [{k: 0.1 * torch.randn_like(v) for k, v in net.state_dict().items() if not k.startswith("2.")}
        ...        for _ in range(2)]
        >>> heads = [{k: torch.randn_like(v) for k, v in net.state_dict().items() if k.startswith("2.")} for _ in range(2)]
        >>> model = AdaMergingModel(net, tvs, heads, granularity="layer")
        >>> model.coefficients().shape, model(torch.randn(5, 4), task=1).shape
        (torch.Size([2, 2]), torch.Size([5, 3]))
        >>> [n for n, p in model.named_parameters() if p.requires_grad]
        ['raw_coefficients']
    """

    def __init__(
        self,
        network: nn.Module,
        task_vectors: Union[Sequence[Mapping[str, Tensor]], Mapping[str, Tensor]],
        heads: Optional[Sequence[Mapping[str, Tensor]]] = None,
        granularity: Granularity = "layer",
        prior: float = 0.3,
        clamp_range: tuple[float, float] = (0.0, 1.0),
        task_names: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__()
        check_choice("granularity", granularity, GRANULARITIES)
        lo, hi = (float(check_number("clamp_range", c)) for c in clamp_range)
        if not lo < hi:
            raise ValueError(f"`clamp_range` must be (low, high) with low < high, got {clamp_range}.")
        check_number("prior", prior, low=lo, high=hi)
        self.network = network.eval().requires_grad_(False)
        own = self.network.state_dict()
        if isinstance(task_vectors, Mapping):
            stacks = {k: v for k, v in task_vectors.items()}
            if not stacks:
                raise ValueError("`task_vectors` is empty.")
            num_tasks = next(iter(stacks.values())).shape[0]
        else:
            if len(task_vectors) == 0:
                raise ValueError("AdaMerging needs at least one task vector.")
            num_tasks = len(task_vectors)
            first_keys = list(task_vectors[0])
            for i, tv in enumerate(task_vectors[1:], start=1):
                if list(tv) != first_keys:
                    raise ValueError(f"Task vector {i} has other keys than task vector 0.")
            stacks = {k: torch.stack([tv[k] for tv in task_vectors]) for k in first_keys}
        keys = [k for k in own if k in stacks]
        unknown = [k for k in stacks if k not in own]
        if unknown:
            raise ValueError(f"Task-vector keys not in the network: {unknown[:3]} (check the key prefixes).")
        for k in keys:
            if tuple(stacks[k].shape) != (num_tasks, *own[k].shape):
                raise ValueError(
                    f"Task vectors of {k!r} have shape {tuple(stacks[k].shape[1:])}, the network's is {tuple(own[k].shape)}."
                )
        self.keys = keys
        # buffers (BatchNorm running statistics) are merged with detached coefficients: BatchNorm is not
        # differentiable in its running statistics, so only parameters carry the entropy gradient
        self._buffer_keys = {name for name, _ in self.network.named_buffers()} & set(keys)
        self.num_tasks = int(num_tasks)
        self._stacks: dict[str, Tensor] = {k: stacks[k] for k in keys}
        if heads is not None:
            if len(heads) != num_tasks:
                raise ValueError(f"Got {len(heads)} heads for {num_tasks} task vectors; give one head per task.")
            for i, head in enumerate(heads):
                missing = [k for k in head if k not in own]
                if missing:
                    raise ValueError(f"Head {i} has keys that are not in the network: {missing[:3]}.")
        self._heads: list[dict[str, Tensor]] = [dict(h) for h in heads] if heads is not None else []
        self.granularity = granularity
        self.prior = float(prior)
        self.clamp_range = (lo, hi)
        if granularity == "layer":
            self.layer_names, self._row_of = layer_rows(keys)
        else:
            self.layer_names, self._row_of = ["all"], {k: 0 for k in keys}
        self.task_names = list(task_names) if task_names is not None else [f"task{i}" for i in range(num_tasks)]
        if len(self.task_names) != num_tasks:
            raise ValueError(f"Got {len(self.task_names)} task names for {num_tasks} task vectors.")
        self.raw_coefficients = nn.Parameter(torch.full((len(self.layer_names), num_tasks), float(prior)))

    # -- construction from checkpoints -------------------------------------------------------------------------
    @classmethod
    def from_finetuned(
        cls,
        network: nn.Module,
        finetuned: Iterable[Source],
        ignored_layers: Sequence[str] = (),
        base: Optional[Source] = None,
        ties_density: Optional[float] = None,
        granularity: Granularity = "layer",
        prior: float = 0.3,
        clamp_range: tuple[float, float] = (0.0, 1.0),
        task_names: Optional[Sequence[str]] = None,
        max_task_vector_ratio: float = DEFAULT_MAX_TASK_VECTOR_RATIO,
        on_foreign_base: OnForeignBase = "error",
    ) -> "AdaMergingModel":
        """Build from fine-tuned state dicts or checkpoint paths, filling the task-vector stacks one model at a
        time (each checked against the base: architecture outside ``ignored_layers``, base distance). ``base`` (a
        state dict or path; default: the network's current weights) is loaded into ``network``; each model's
        ``ignored_layers`` tensors become its task's head. ``ties_density`` gives AdaMerging++."""
        if base is not None:
            load_shared_weights(network, base, ignored_layers, name="the base checkpoint")
        device = next((t.device for t in network.state_dict().values()), torch.device("cpu"))
        own = {k: v.detach().to("cpu") for k, v in network.state_dict().items()}
        keys = mergeable_keys(own, ignored_layers)
        if not keys:
            raise ValueError("Nothing to merge: every floating tensor of the network is under `ignored_layers`.")
        sources = list(finetuned)
        if not sources:
            raise ValueError("AdaMerging needs at least one fine-tuned model.")
        names = None
        if task_names is not None:
            if len(task_names) != len(sources):
                raise ValueError(f"Got {len(task_names)} task names for {len(sources)} fine-tuned models.")
            names = [f"{n} ({s})" if isinstance(s, (str, Path)) else str(n) for n, s in zip(task_names, sources)]
        stacks = {k: torch.empty((len(sources), *own[k].shape), dtype=own[k].dtype) for k in keys}
        heads: list[dict[str, Tensor]] = []
        if ties_density is not None:
            from lightning_ext.merging.ties_merging import ties_selected_task_vectors

            stream: Iterator[tuple[str, dict[str, Tensor], dict[str, Tensor]]] = ties_selected_task_vectors(
                own, sources, ties_density, ignored_layers, max_task_vector_ratio, on_foreign_base, names
            )
        else:
            def _plain() -> Iterator[tuple[str, dict[str, Tensor], dict[str, Tensor]]]:
                for label, state in iter_finetuned(own, sources, ignored_layers, max_task_vector_ratio, on_foreign_base, names):
                    head = {k: v.clone() for k, v in state.items() if is_head_key(k, ignored_layers)}
                    tv = {k: state[k].to(own[k].dtype) - own[k] for k in keys}
                    del state
                    yield label, tv, head
            stream = _plain()
        for i, (label, tv, head) in enumerate(stream):
            for k in keys:
                stacks[k][i].copy_(tv[k])
            del tv
            if ignored_layers and not head:
                raise ValueError(f"{label} has no tensors under ignored_layers={list(ignored_layers)}; check the prefixes.")
            heads.append(head)
        model = cls(network, stacks, heads if ignored_layers else None, granularity, prior, clamp_range, task_names)
        return model.to(device)

    # -- device moves: the stacks and heads are plain tensors (not buffers: DDP must not broadcast them) ---------
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "AdaMergingModel":
        super()._apply(fn, recurse)
        self._stacks = {k: fn(v) for k, v in self._stacks.items()}
        self._heads = [{k: fn(v) for k, v in h.items()} for h in self._heads]
        return self

    def train(self, mode: bool = True) -> "AdaMergingModel":
        super().train(mode)
        self.network.eval()  # the merged network always runs in eval mode
        return self

    # -- the merge ------------------------------------------------------------------------------------------------
    def coefficients(self) -> Tensor:
        """The coefficients used, ``clamp(raw, *clamp_range)``, of shape ``(layers, tasks)`` (``(1, tasks)`` task-wise)."""
        return self.raw_coefficients.clamp(*self.clamp_range)

    def coefficients_of(self, key: str) -> Tensor:
        """The ``(tasks,)`` coefficients applied to tensor ``key``."""
        return self.coefficients()[self._row_of[key]]

    def merged_tensors(self) -> dict[str, Tensor]:
        """``{key: theta_0 + sum_k lambda_k tau_k}`` for every merged key (differentiable in the coefficients)."""
        lam = self.coefficients()
        base = self.network.state_dict(keep_vars=True)
        out = {}
        for k in self.keys:
            stack = self._stacks[k]
            row = lam[self._row_of[k]]
            if k in self._buffer_keys:
                row = row.detach()
            out[k] = base[k] + torch.tensordot(row.to(stack.dtype), stack, dims=1)
        return out

    def head(self, task: int) -> dict[str, Tensor]:
        """The head tensors of ``task`` (empty when the tasks share the network's head)."""
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} is out of range for {self.num_tasks} tasks.")
        return self._heads[task] if self._heads else {}

    def forward(self, x: Any, task: int) -> Tensor:
        task = int(task)
        tensors = {**self.merged_tensors(), **self.head(task)}
        if self.network.training:
            self.network.eval()
        return functional_call(self.network, tensors, (x,), strict=False)

    def finetuned_forward(self, x: Any, task: int) -> Tensor:
        """Logits of task ``task``'s own model, :math:`\\theta_0 + \\tau_k` with its head (the fine-tuned model itself;
        its TIES-selected part under AdaMerging++), for the label-free agreement check."""
        task = int(task)
        self.head(task)  # range check
        base = self.network.state_dict()
        tensors = {**{k: base[k] + self._stacks[k][task].to(base[k].dtype) for k in self.keys}, **self.head(task)}
        return functional_call(self.network, tensors, (x,), strict=False)

    @torch.no_grad()
    def merged_state_dict(self, task: Optional[int] = None) -> dict[str, Tensor]:
        """The merged network's state dict (detached), with the head of ``task`` when given."""
        state = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        state.update({k: v.detach().clone() for k, v in self.merged_tensors().items()})
        if task is not None:
            state.update({k: v.detach().clone() for k, v in self.head(task).items()})
        return state

    @torch.no_grad()
    def export(self, task: Optional[int] = None) -> nn.Module:
        """A standalone copy of the network with the merged weights (and ``task``'s head), in eval mode.

        Head tensors whose shapes differ from the network's are swapped in as new parameters; attributes such as
        ``nn.Linear.out_features`` keep the network's values."""
        net = copy.deepcopy(self.network)
        for k, v in self.merged_state_dict(task).items():
            _assign(net, k, v)
        return net.eval()

    def coefficient_table(self) -> list[dict[str, float]]:
        """One row per layer: ``{"layer": name, <task name>: coefficient, ...}``."""
        lam = self.coefficients().detach().cpu()
        return [{"layer": name, **{t: float(lam[i, j]) for j, t in enumerate(self.task_names)}}
                for i, name in enumerate(self.layer_names)]


def load_shared_weights(network: nn.Module, source: Source, ignored_layers: Sequence[str] = (), name: str = "the checkpoint") -> None:
    """Load the non-head tensors of ``source`` (``weights_only=True``) into ``network``, refusing a checkpoint
    of another architecture (first differing key and shape)."""
    own = network.state_dict()
    state = read_state_dict(source, reference_keys=own.keys(), name=name)
    check_same_architecture(own, state, ignored_layers, reference_name="the network", other_name=name)
    network.load_state_dict({k: state[k] for k in own if not is_head_key(k, ignored_layers)}, strict=False)


# -- the objective and a plain optimisation loop ----------------------------------------------------------------------


def ada_merging_loss(model: AdaMergingModel, batches: Sequence[tuple[Tensor, int]]) -> tuple[Tensor, list[float], list[float], list[int]]:
    """Sum over the given ``(inputs, task)`` batches of the mean prediction entropy through each task's head.

    Returns ``(loss, entropies, dominant-class shares, tasks)``; the last three per batch, for diagnostics."""
    if not batches:
        raise ValueError("AdaMerging needs at least one (inputs, task) batch per step.")
    total: Optional[Tensor] = None
    entropies, shares, tasks = [], [], []
    for x, task in batches:
        task = int(task)
        logits = model(x, task)
        h = entropy_loss(logits)
        total = h if total is None else total + h
        with torch.no_grad():
            counts = torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1])
            shares.append(float(counts.max()) / max(1, logits.shape[0]))
        entropies.append(float(h.detach()))
        tasks.append(task)
    assert total is not None
    return total, entropies, shares, tasks


def _cycle(loader: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("An unlabelled loader of AdaMerging yielded no batch.")


def fit_ada_merging(
    model: AdaMergingModel,
    loaders: Sequence[Iterable],
    steps: int = 500,
    lr: float = 1e-3,
    record_every: int = 10,
    progress: bool = True,
    history: Optional[AdaMergingHistory] = None,
    on_step: Optional[Callable[[int, AdaMergingModel, AdaMergingHistory], None]] = None,
) -> AdaMergingHistory:
    """Optimise the coefficients without a Trainer: ``steps`` Adam steps (betas 0.9/0.999, no weight decay), each
    on one batch of every task (``loaders[k]`` yields task ``k``'s inputs or ``(inputs, labels)``; labels are
    ignored and loaders are cycled). Shows a progress bar; returns the :class:`AdaMergingHistory`.
    ``on_step(step, model, history)`` is called after each step (e.g. to evaluate)."""
    if len(loaders) != model.num_tasks:
        raise ValueError(f"Got {len(loaders)} loaders for {model.num_tasks} tasks; give one per task, in task order.")
    check_positive_int("steps", steps)
    check_number("lr", lr, low=0, low_open=True)
    from tqdm.auto import tqdm

    device = model.raw_coefficients.device
    optimizer = torch.optim.Adam([model.raw_coefficients], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    history = history if history is not None else AdaMergingHistory(list(model.task_names))
    streams = [_cycle(loader) for loader in loaders]
    bar = tqdm(range(steps), desc=f"AdaMerging ({model.granularity}-wise)", disable=not progress, leave=False)
    for step in bar:
        batches = [(batch_inputs(next(s)).to(device), k) for k, s in enumerate(streams)]
        loss, entropies, shares, _ = ada_merging_loss(model, batches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last = step == steps - 1
        history.record(step, entropies, shares, model.coefficients(), model.clamp_range,
                       snapshot=last or step % max(1, record_every) == 0)
        if progress:
            bar.set_postfix(entropy=f"{float(loss):.3f}")
        if on_step is not None:
            on_step(step, model, history)
    return history


@torch.no_grad()
def finetuned_agreement(model: AdaMergingModel, loaders: Sequence[Iterable], max_batches: int = 4) -> tuple[list[float], list[float]]:
    """Label-free check at merge time: per task, the share of up to ``max_batches`` unlabelled batches on which the
    merged model predicts what the task's own fine-tuned model predicts
    (:func:`~lightning_ext.merging.ada_diagnostics.prediction_agreement`), and the merged model's mean entropy
    there. Returns ``(agreements, entropies)`` in task order; feed them to
    :func:`~lightning_ext.merging.ada_diagnostics.diagnose_agreement`."""
    from lightning_ext.merging.ada_diagnostics import prediction_agreement

    if len(loaders) != model.num_tasks:
        raise ValueError(f"Got {len(loaders)} loaders for {model.num_tasks} tasks; give one per task, in task order.")
    check_positive_int("max_batches", max_batches)
    device = model.raw_coefficients.device
    agreements, entropies = [], []
    for k, loader in enumerate(loaders):
        merged, own = [], []
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            x = batch_inputs(batch).to(device)
            merged.append(model(x, k).float())
            own.append(model.finetuned_forward(x, k).float())
        if not merged:
            raise ValueError(f"The unlabelled loader of task {k} yielded no batch.")
        logits = torch.cat(merged)
        agreements.append(prediction_agreement(logits, torch.cat(own)))
        entropies.append(float(entropy_loss(logits)))
    return agreements, entropies


# -- merging with given coefficients ----------------------------------------------------------------------------------


def _align_names(given: list[str], rows: list[str]) -> list[str]:
    """``given`` with one wrapper prefix (``net.``, ...) added or stripped if that makes it match ``rows`` better
    (:func:`lightning_ext.core.checkpoints.match_prefixes`)."""
    return list(match_prefixes(dict.fromkeys(given), rows))


def apply_coefficients(
    base: StateDict,
    finetuned: Iterable[Source],
    coefficients: Tensor,
    layer_names: Optional[Sequence[str]] = None,
    ignored_layers: Sequence[str] = (),
    max_task_vector_ratio: float = DEFAULT_MAX_TASK_VECTOR_RATIO,
    on_foreign_base: OnForeignBase = "error",
    names: Optional[Sequence[str]] = None,
) -> dict[str, Tensor]:
    """Merge with given (learned) coefficients, streaming one model at a time like task arithmetic.

    ``coefficients`` has shape ``(1, N)`` (task-wise) or ``(layers, N)`` with ``layer_names`` naming the rows
    (as saved by :func:`~lightning_ext.merging.ada_diagnostics.save_coefficients`); they are used as given (no clamping). Returns the merged shared
    state dict (heads left out)."""
    sources = list(finetuned)
    stream = iter_finetuned(base, sources, ignored_layers, max_task_vector_ratio, on_foreign_base, names)
    lam = torch.as_tensor(coefficients).float().cpu()
    if lam.dim() != 2 or lam.shape[1] != len(sources):
        raise ValueError(f"`coefficients` must have shape (layers, {len(sources)}) for {len(sources)} models, got {tuple(lam.shape)}.")
    keys = mergeable_keys(base, ignored_layers)
    if lam.shape[0] == 1:
        row_of = {k: 0 for k in keys}
    else:
        names_rows, row_of = layer_rows(keys)
        given = _align_names(list(layer_names), names_rows) if layer_names is not None else None
        if given is None or given != names_rows:
            first = next((f"{a!r} != {b!r}" for a, b in zip(given or [], names_rows) if a != b), "different counts")
            raise ValueError(
                f"The layer-wise coefficients were learned for other layers than this model's ({len(given or [])} vs "
                f"{len(names_rows)} rows; first difference: {first}). Learn them on the same architecture and ignored_layers."
            )
    acc = {k: torch.zeros_like(base[k]) for k in keys}
    for i, (_, state) in enumerate(stream):
        for k in keys:
            coef = float(lam[row_of[k], i])
            acc[k].add_(state[k].to(base[k].dtype), alpha=coef).sub_(base[k], alpha=coef)
        del state
    return {k: (acc.pop(k).add_(v) if k in acc else v.clone()) for k, v in base.items() if not is_head_key(k, ignored_layers)}
