"""FedIns (Feng et al., ICCV 2023): instance-adaptive inference for federated learning with SSF pools, the pure core.

Paper: "Towards Instance-adaptive Inference for Federated Learning", Chun-Mei Feng et al., ICCV 2023, arXiv
2308.06051. Reference code: https://github.com/chunmeifeng/FedIns (``models/vision_transformer.py``:
``init_ssf_scale_shift``, ``ssf_ada``, ``get_top_ssf``; ``train_cifar_tiny.py``: ``pool_train``, ``communication``).

A frozen pretrained backbone is tuned only by SSF (scale-and-shift) parameters, one *pool* of ``P`` scale/shift
vectors per site (after chosen layers), with one learnable key per pool entry and a pool of classifier heads.
For an input ``x`` the frozen query model gives ``q(x)``; the ``k`` entries whose keys are most cosine-similar are
selected and averaged into that instance's SSF and head::

    sim = normalize(K) normalize(q)^T        I(x) = top-k(sim)        s(x) = mean_{i in I(x)} S_i, b(x) alike
    h -> h * s(x) + b(x) at every site       logits = W(x) f(x) + c(x),  W(x) = mean_{i in I(x)} W_i
    L = (1 - lambda) CE(logits, y) + lambda (1 - sum_{x in batch} sum_{i in I(x)} sim_i(x) / B)

Only pools, keys and heads are trained and sent; the server averages them with uniform weights ``1/N``.

**Where this differs from the official code:** ``get_top_ssf`` averages the selected rows over the *batch* as well
(``.mean(dim=1).mean(dim=0)``), so one SSF serves the whole batch; the reference therefore trains and tests one
instance at a time. Here the selection is gathered per instance, ``(B, k, d) -> (B, d)``, and broadcast over the
spatial or token positions: identical to the reference at batch size 1, instance-adaptive for any batch size.
``batch_mean=True`` reproduces the reference's batched behaviour.

Example:
    >>> import torch
    >>> from torch import nn
    >>> backbone = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8))
    >>> net = FedInsNet(backbone, feature_dim=8, num_classes=3, sites=["0", "3"], pool_size=5, top_k=2)
    >>> logits, reduced_sim, idx = net(torch.randn(6, 1, 8, 8))
    >>> logits.shape, idx.shape
    (torch.Size([6, 3]), torch.Size([6, 2]))
    >>> sorted(n for n, p in net.named_parameters() if p.requires_grad)
    ['head_bias', 'head_weight', 'keys', 'ssf_scale.0', 'ssf_scale.1', 'ssf_shift.0', 'ssf_shift.1']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext.core.validation import check_number, check_positive_int


def select_topk(query: torch.Tensor, keys: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices (B, k), reduced_sim)``: the ``k`` keys most cosine-similar to each query and
    ``sum of the matched cosines / B`` (the reference ``reduced_sim``)."""
    if query.ndim != 2 or keys.ndim != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(f"query (B, d) and keys (P, d) must share d; got {tuple(query.shape)} and {tuple(keys.shape)}.")
    if not 1 <= top_k <= keys.shape[0]:
        raise ValueError(f"top_k={top_k} must lie in [1, pool_size={keys.shape[0]}].")
    sim = F.normalize(query, dim=1) @ F.normalize(keys, dim=1).T
    matched, idx = sim.topk(top_k, dim=1)
    return idx, matched.sum() / query.shape[0]


def gather_pool(pool: torch.Tensor, idx: torch.Tensor, batch_mean: bool = False) -> torch.Tensor:
    """Mean of the selected pool rows per instance: ``pool (P, *shape)``, ``idx (B, k)`` -> ``(B, *shape)``.

    ``batch_mean=True`` also averages over the batch (the reference ``get_top_ssf``) and repeats it ``B`` times."""
    out = pool[idx].mean(dim=1)
    if batch_mean:
        out = out.mean(dim=0, keepdim=True).expand_as(out)
    return out


def apply_ssf(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``h * scale + shift`` per instance with ``scale, shift (B, d)``: ``h`` is ``(B, d)``, ``(B, d, H, W)``
    (channels second) or ``(B, T, d)`` (tokens, channels last)."""
    b, d = scale.shape
    if h.ndim == 2 or (h.ndim == 3 and h.shape[-1] == d):
        view = (b, d) if h.ndim == 2 else (b, 1, d)
    elif h.ndim >= 3 and h.shape[1] == d:
        view = (b, d) + (1,) * (h.ndim - 2)
    else:
        raise ValueError(f"an SSF site's output {tuple(h.shape)} has no channel axis of size {d}.")
    return h * scale.view(view) + shift.view(view)


def fedins_loss(logits: torch.Tensor, y: torch.Tensor, reduced_sim: torch.Tensor,
                key_loss_weight: float = 0.1) -> torch.Tensor:
    """``(1 - lambda) CE(logits, y) + lambda (1 - reduced_sim)`` (reference ``training_loss_weight`` = 0.1)."""
    check_number("key_loss_weight", key_loss_weight, low=0, high=1)
    return (1 - key_loss_weight) * F.cross_entropy(logits, y) + key_loss_weight * (1 - reduced_sim)


def _channels(module: nn.Module) -> Optional[int]:
    for attr in ("out_channels", "out_features", "normalized_shape", "num_features"):
        value = getattr(module, attr, None)
        if value is not None:
            return int(value[0] if isinstance(value, (tuple, list)) else value)
    return None


class FedInsNet(nn.Module):
    """A frozen backbone with SSF pools at named sites, learnable keys and a pool of heads (FedIns).

    ``backbone(x)`` must return features ``(B, feature_dim)``. Each name in ``sites`` is a submodule whose output
    gets the instance's scale and shift (its channel count is read from ``out_channels``/``out_features``/...).
    The query is ``query_model(x)`` if given, else the backbone's own features with every SSF off (the frozen,
    pretrained backbone; the reference uses a second frozen ViT's CLS token), computed without gradient. A
    precomputed ``query`` may be passed to :meth:`forward` (it is fixed, so it can be cached).

    Args:
        backbone: the feature extractor (frozen here).
        feature_dim: width of its features (the head's input and, without ``query_model``, the query's).
        num_classes: classes.
        sites: names of the submodules whose outputs are scaled and shifted.
        pool_size: ``P`` (1 is plain SSF).
        top_k: ``k`` entries selected per instance.
        query_model: a frozen model ``x -> (B, query_dim)``; ``None`` uses the backbone without SSF.
        query_dim: width of the query (default ``feature_dim``).
        batch_mean: average the selection over the batch too (the reference's batched behaviour).
        init_std: std of the pools' normal init around 1 (scale) and 0 (shift), and of the keys (reference 0.02).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, sites: Sequence[str],
                 pool_size: int = 10, top_k: int = 2, query_model: Optional[nn.Module] = None,
                 query_dim: Optional[int] = None, batch_mean: bool = False, init_std: float = 0.02) -> None:
        super().__init__()
        for name, value in (("feature_dim", feature_dim), ("num_classes", num_classes), ("pool_size", pool_size),
                            ("top_k", top_k)):
            check_positive_int(name, value)
        if top_k > pool_size:
            raise ValueError(f"top_k={top_k} exceeds pool_size={pool_size}; choose top_k <= pool_size.")
        check_number("init_std", init_std, low=0)
        if isinstance(sites, str) or not list(sites):
            raise ValueError("sites must be a non-empty list of submodule names, e.g. ['features.0', 'fc'].")
        self.backbone, self.query_model = backbone, query_model
        for p in backbone.parameters():
            p.requires_grad_(False)
        if query_model is not None:
            for p in query_model.parameters():
                p.requires_grad_(False)
        self.top_k, self.batch_mean, self.sites = top_k, batch_mean, list(sites)
        modules = dict(backbone.named_modules())
        self.ssf_scale, self.ssf_shift = nn.ParameterList(), nn.ParameterList()
        self._hooks = []
        for i, name in enumerate(self.sites):
            if name not in modules:
                raise ValueError(f"site {name!r} is not a submodule of the backbone; names look like "
                                 f"{[n for n in modules if n][:6]}.")
            d = _channels(modules[name])
            if d is None:
                raise ValueError(f"site {name!r} ({type(modules[name]).__name__}) has no channel count; choose a "
                                 "Conv/Linear/Norm layer.")
            self.ssf_scale.append(nn.Parameter(1 + init_std * torch.randn(pool_size, d)))
            self.ssf_shift.append(nn.Parameter(init_std * torch.randn(pool_size, d)))
            self._hooks.append(modules[name].register_forward_hook(self._make_hook(i)))
        qd = query_dim if query_dim is not None else feature_dim
        self.keys = nn.Parameter(nn.init.trunc_normal_(torch.empty(pool_size, qd), std=init_std))
        bound = 1 / math.sqrt(feature_dim)
        self.head_weight = nn.Parameter(torch.empty(pool_size, num_classes, feature_dim).uniform_(-bound, bound))
        self.head_bias = nn.Parameter(torch.empty(pool_size, num_classes).uniform_(-bound, bound))
        self._selection: Optional[torch.Tensor] = None

    def _make_hook(self, i: int):
        def hook(module: nn.Module, args, out: torch.Tensor) -> Optional[torch.Tensor]:
            if self._selection is None:
                return None
            scale = gather_pool(self.ssf_scale[i], self._selection, self.batch_mean)
            shift = gather_pool(self.ssf_shift[i], self._selection, self.batch_mean)
            return apply_ssf(out, scale, shift)

        return hook

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen query ``q(x)`` (no SSF, eval mode, no gradient)."""
        model = self.query_model if self.query_model is not None else self.backbone
        was = model.training
        model.eval()
        self._selection = None
        try:
            return model(x)
        finally:
            model.train(was)

    def forward(self, x: torch.Tensor, query: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, reduced_sim, selected indices (B, k))`` of a batch."""
        q = self.query(x) if query is None else query
        idx, reduced_sim = select_topk(q, self.keys, self.top_k)
        self._selection = idx
        try:
            features = self.backbone(x)
        finally:
            self._selection = None
        weight = gather_pool(self.head_weight, idx, self.batch_mean)
        bias = gather_pool(self.head_bias, idx, self.batch_mean)
        logits = torch.einsum("bd,bcd->bc", features, weight) + bias
        return logits, reduced_sim, idx

    def trainable_names(self) -> list[str]:
        """The names FedIns trains and sends: pools, keys and heads."""
        return [n for n, p in self.named_parameters() if p.requires_grad]


def uniform_mean(states: Sequence[dict]) -> dict:
    """FedIns' server: the uniform mean ``1/N sum_i theta_i`` of the clients' pools, keys and heads."""
    if not states:
        raise ValueError("uniform_mean needs at least one client state.")
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ValueError("client states have different keys; every client must send the same pools.")
    return {k: sum(s[k].double() for s in states).div(len(states)).to(states[0][k].dtype) for k in states[0]}


def mutual_information(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mutual information (nats) between two integer label vectors, from their empirical joint distribution."""
    a, b = torch.as_tensor(a).long().flatten(), torch.as_tensor(b).long().flatten()
    if len(a) != len(b) or len(a) == 0:
        raise ValueError("mutual_information needs two non-empty vectors of the same length.")
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / (pa @ pb)[nz]).log()).sum())
