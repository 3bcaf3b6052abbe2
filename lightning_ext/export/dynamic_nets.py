"""Small dynamic networks with data-dependent control flow written the way users write it, for DyCL.

Each ``forward`` is plain Python (``if``/``for``/``while`` on tensor values), so ``torch.export`` fails on it and
``torch.compile`` breaks its graph; :func:`lightning_ext.export.dycl.export_dynamic` rewrites them. The families
follow DyCL's evaluated DyNNs (ISSTA 2023, arXiv 2307.04963): input-dependent gating, SkipNet/BlockDrop-style block
skipping, Shallow-Deep-Network early exits (here over the library's
:class:`~lightning_ext.vision.early_exit.EarlyExitNetwork`) and an adaptive number of refinement steps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ext.core.validation import check_number, check_positive_int
from lightning_ext.vision.early_exit import EarlyExitNetwork

__all__ = ["BatchEarlyExit", "IterativeRefiner", "MeanGatedNet", "SkipGateNet"]


class MeanGatedNet(nn.Module):
    """An if/else on a tensor's mean: ``h = pos(h)`` when ``mean(h) > 0``, else ``relu(neg(h))``.

    Example:
        >>> net = MeanGatedNet(4)
        >>> net(torch.ones(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        self.inp, self.pos, self.neg, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        """The gated network."""
        h = self.inp(x)
        if h.mean() > 0:
            h = self.pos(h)
        else:
            h = self.neg(h).relu()
        return self.out(h)


class SkipGateNet(nn.Module):
    """SkipNet/BlockDrop-style skipping: residual block ``k`` runs only when its gate on the batch's mean feature
    says so (``sigmoid(g_k(mean_b h)) > 0.5``), one decision per batch.

    Example:
        >>> SkipGateNet(4, blocks=2)(torch.ones(3, 4)).shape
        torch.Size([3, 4])
    """

    def __init__(self, dim: int = 16, blocks: int = 3) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("blocks", blocks)
        self.inp, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
                                    for _ in range(blocks))
        self.gates = nn.ModuleList(nn.Linear(dim, 1) for _ in range(blocks))

    def forward(self, x: Tensor) -> Tensor:
        """Blocks whose gate fires, then the output layer."""
        h = self.inp(x)
        for block, gate in zip(self.blocks, self.gates):
            if torch.sigmoid(gate(h.mean(0))).squeeze() > 0.5:
                h = h + block(h)
        return self.out(h)


class BatchEarlyExit(nn.Module):
    """Batch-level early exit over an :class:`~lightning_ext.vision.early_exit.EarlyExitNetwork`: run stage by
    stage and return the first exit at which every sample's max-softmax reaches ``threshold`` (the network's τ by
    default); the last exit always answers. At batch size 1 this is the SDN inference rule, and it skips the
    remaining stages' compute, which the network's own ``forward`` (every exit, then a per-sample mask) does not.

    Example:
        >>> stages = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
        ...           nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())]
        >>> net = BatchEarlyExit(EarlyExitNetwork(stages, [4, 8], num_classes=3))
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(self, net: EarlyExitNetwork, threshold: float | None = None) -> None:
        super().__init__()
        if not isinstance(net, EarlyExitNetwork):
            raise TypeError(f"BatchEarlyExit wraps an EarlyExitNetwork; got {type(net).__name__}")
        threshold = net.threshold if threshold is None else threshold
        check_number("threshold", threshold, low=0, high=1)
        self.threshold = float(threshold)
        bounds = [-1, *net.exit_stages]
        self.segments = nn.ModuleList(nn.Sequential(*net.stages[a + 1:b + 1]) for a, b in zip(bounds, bounds[1:]))
        self.heads = net.heads
        self.last = len(self.heads) - 1

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the first exit confident for the whole batch."""
        h = x
        for k, (segment, head) in enumerate(zip(self.segments, self.heads)):
            h = segment(h)
            z = head(h)
            if k < self.last and z.softmax(-1).max(-1).values.min() >= self.threshold:
                return z
        return z


class IterativeRefiner(nn.Module):
    """Adaptive computation: ``h ← tanh(W h + U x)`` until the update's max-norm falls below ``tol`` or
    ``max_steps`` steps ran (``W`` is scaled to spectral norm 0.9, so the iteration contracts).

    Example:
        >>> IterativeRefiner(4)(torch.ones(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(self, dim: int = 16, max_steps: int = 30, tol: float = 1e-3) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("max_steps", max_steps)
        check_number("tol", tol, low=0, low_open=True)
        self.inp, self.cell, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        with torch.no_grad():
            self.cell.weight.mul_(0.9 / torch.linalg.matrix_norm(self.cell.weight, ord=2))
        self.max_steps, self.tol = int(max_steps), float(tol)

    def forward(self, x: Tensor) -> Tensor:
        """Refine until converged, then project."""
        u = self.inp(x)
        h = torch.tanh(u)
        delta = h.abs().max()
        step = 0
        while (delta > self.tol) & (step < self.max_steps):
            new = torch.tanh(self.cell(h) + u)
            delta = (new - h).abs().max()
            h = new
            step = step + 1
        return self.out(h)
