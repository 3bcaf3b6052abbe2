"""FED-PUB (Baek, Jeong, Jin, Yoon, Hwang, ICML 2023): personalised subgraph federated learning, the pure core.

Paper: "Personalized Subgraph Federated Learning", Jinheon Baek*, Wonyong Jeong*, Jiongdao Jin, Jaehong Yoon and
Sung Ju Hwang, ICML 2023, arXiv 2206.10206. Reference code: https://github.com/JinheonBaek/FED-PUB
(``models/nets.py``, ``models/layers.py``, ``models/fedpub/{client,server}.py``, ``data/generators/disjoint.py``).

Each client holds one subgraph (a community of a larger graph) and trains a masked GCN: every weight ``W`` of the
two GCN layers and the classifier is used as ``W * M`` with a personal, learnable mask ``M`` (initialised to ones;
at evaluation entries with ``|M| < l1`` are zeroed, the reference ``prune``). The server feeds every client model
the same random *proxy graph* and reads the node-mean of its second GCN layer's output (before ReLU), the client's
*functional embedding* ``e_i``. It then builds one model per client::

    S_ij = exp(tau cos(e_i, e_j)) / sum_j' exp(tau cos(e_i, e_j'))        theta_i = sum_j S_ij theta_j

(and a size-weighted global mean). The client objective (reference ``client.py``)::

    L_i = CE(train nodes) + l1 sum_M ||M||_1 + loc_l2 sum_theta ||theta - theta_received||_2   (not squared)

with the proximal term skipped in the first round. **Where this differs from the official code:** the reference
builds both penalties from ``model.state_dict()``, whose tensors are detached, so they change the logged loss but
no gradient: the published runs trained without effective mask sparsity or proximal terms. Here
:func:`fedpub_penalty` computes them on the parameters themselves, so they act (``official_inert=True`` reproduces
the reference: the same value, detached). ``||d||_2`` has no gradient at ``d = 0`` (each round's first step);
PyTorch's subgradient there is 0, which is what is used.

Subgraphs: the reference partitions with METIS (``metispy``), not installable offline here (PyG's METIS needs
``torch-sparse``/``pyg-lib``); :func:`louvain_partition` uses networkx's Louvain communities, merged greedily
(largest first, onto the smallest client) into ``num_clients`` parts, as FedSage+'s Louvain split does.

Example:
    >>> import torch
    >>> net = MaskedGCN(num_features=8, num_classes=3, hidden=16)
    >>> x, edge_index = torch.randn(5, 8), torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    >>> net(x, edge_index).shape
    torch.Size([5, 3])
    >>> px, pei = proxy_graph(num_features=8, num_blocks=2, block_size=10, seed=0)
    >>> functional_embedding(net, px, pei).shape
    torch.Size([16])
    >>> S = similarity_weights(torch.eye(3), tau=3.0)
    >>> [round(float(v), 3) for v in S[0]]
    [0.909, 0.045, 0.045]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext.core.optional import require
from lightning_ext.core.validation import check_number, check_positive_int


def normalized_adjacency(edge_index: torch.Tensor, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(edge_index with self-loops, weights D^-1/2 (A + I) D^-1/2)``: PyG's ``gcn_norm`` (no torch-sparse needed)."""
    require("torch_geometric", "FED-PUB's masked GCN")
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    return gcn_norm(edge_index, None, num_nodes, add_self_loops=True)


def _propagate(x: torch.Tensor, edge_index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    return out.index_add_(0, edge_index[1], x[edge_index[0]] * weight.unsqueeze(1))


class MaskedLinear(nn.Module):
    """``y = x (W * M)^T + b`` with a learnable mask ``M`` (ones at start); in eval mode ``|M| < l1`` is zeroed.

    Args:
        in_features, out_features: sizes.
        bias: learn a bias.
        l1: the pruning threshold at evaluation (the reference uses the L1 weight, 1e-3).
        glorot: Glorot-uniform weight (the GCN layers' init) instead of ``nn.Linear``'s.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, l1: float = 1e-3,
                 glorot: bool = False) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        check_number("l1", l1, low=0)
        self.l1 = l1
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.mask = nn.Parameter(torch.ones(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if glorot:
            nn.init.xavier_uniform_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(in_features)
                nn.init.uniform_(self.bias, -bound, bound)

    def masked_weight(self) -> torch.Tensor:
        """``W * M``, with ``|M| < l1`` zeroed outside training (the reference ``prune``)."""
        mask = self.mask if self.training else self.mask.masked_fill(self.mask.abs() < self.l1, 0.0)
        return self.weight * mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Masked linear map (a sparse ``x``, e.g. bag-of-words features, is multiplied sparsely)."""
        if x.is_sparse:
            out = torch.sparse.mm(x, self.masked_weight().t())
            return out + self.bias if self.bias is not None else out
        return F.linear(x, self.masked_weight(), self.bias)


class MaskedGCNConv(nn.Module):
    """A GCN layer ``D^-1/2 (A + I) D^-1/2 X (W * M)^T + b`` with a masked, bias-free linear map (Glorot init)."""

    def __init__(self, in_features: int, out_features: int, l1: float = 1e-3) -> None:
        super().__init__()
        self.lin = MaskedLinear(in_features, out_features, bias=False, l1=l1, glorot=True)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor,
                norm: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Propagate; pass ``norm`` (from :func:`normalized_adjacency`) to reuse it."""
        ei, w = norm if norm is not None else normalized_adjacency(edge_index, x.shape[0])
        return _propagate(self.lin(x), ei, w) + self.bias


class MaskedGCN(nn.Module):
    """FED-PUB's model: ``MaskedGCNConv(F -> h) -> ReLU -> dropout -> MaskedGCNConv(h -> h) -> ReLU -> dropout ->
    MaskedLinear(h -> C)``; the functional embedding is read after the second conv, before its ReLU.

    ``masked=False`` freezes the masks at one (the "no masks" ablation and the plain-GCN baselines).

    Args:
        num_features: node feature size.
        num_classes: classes.
        hidden: hidden width (reference 128).
        dropout: dropout probability (reference 0.5).
        l1: mask pruning threshold at evaluation.
        masked: learn the masks.
    """

    def __init__(self, num_features: int = 1433, num_classes: int = 7, hidden: int = 128, dropout: float = 0.5,
                 l1: float = 1e-3, masked: bool = True) -> None:
        super().__init__()
        check_positive_int("num_features", num_features)
        check_positive_int("num_classes", num_classes)
        check_positive_int("hidden", hidden)
        check_number("dropout", dropout, low=0, high=1, high_open=True)
        self.dropout = dropout
        self.conv1 = MaskedGCNConv(num_features, hidden, l1)
        self.conv2 = MaskedGCNConv(hidden, hidden, l1)
        self.clsif = MaskedLinear(hidden, num_classes, l1=l1)
        if not masked:
            for name, p in self.named_parameters():
                if name.endswith("mask"):
                    p.requires_grad_(False)

    def embed(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """The second conv's output (before its ReLU): the nodes' proxy embedding."""
        norm = normalized_adjacency(edge_index, x.shape[0])
        h = F.dropout(F.relu(self.conv1(x, edge_index, norm)), self.dropout, self.training)
        return self.conv2(h, edge_index, norm)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Logits of every node."""
        h = F.dropout(F.relu(self.embed(x, edge_index)), self.dropout, self.training)
        return self.clsif(h)


def is_mask(name: str) -> bool:
    """Whether a parameter/state_dict key is a FED-PUB mask (kept personal)."""
    return name == "mask" or name.endswith(".mask")


def fedpub_penalty(model: nn.Module, received: Optional[Mapping[str, torch.Tensor]], l1: float = 1e-3,
                   loc_l2: float = 1e-3, official_inert: bool = False, prefix: str = "") -> torch.Tensor:
    """``l1 sum ||M||_1 + loc_l2 sum ||theta - theta_received||_2`` over the model's masks and other parameters.

    ``received`` maps parameter names (with ``prefix``, e.g. ``"net."``) to the weights received this round;
    ``None`` skips the proximal term (the reference skips it in the first round). Parameters whose name is not
    in ``received`` get no proximal term. ``official_inert=True`` computes the same value on detached tensors,
    as the reference (from ``state_dict()``): it then adds nothing to any gradient.
    """
    check_number("l1", l1, low=0)
    check_number("loc_l2", loc_l2, low=0)
    total = None
    for name, p in model.named_parameters():
        t = p.detach() if official_inert else p
        if is_mask(name):
            term = l1 * torch.linalg.vector_norm(t.float(), 1)
        elif received is not None and f"{prefix}{name}" in received:
            ref = received[f"{prefix}{name}"].to(t.device, torch.float32)
            term = loc_l2 * torch.linalg.vector_norm(t.float() - ref, 2)
        else:
            continue
        total = term if total is None else total + term
    if total is None:
        return next(model.parameters()).new_zeros(())
    return total


def mask_sparsity(model: nn.Module, l1: float = 1e-3) -> float:
    """Share of mask entries with ``|M| < l1`` (zeroed at evaluation)."""
    masks = [p.detach() for n, p in model.named_parameters() if is_mask(n)]
    if not masks:
        return 0.0
    return float(sum(int((m.abs() < l1).sum()) for m in masks) / sum(m.numel() for m in masks))


def proxy_graph(num_features: int, num_blocks: int = 5, block_size: int = 100, p_in: float = 0.1,
                seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared random proxy graph: ``networkx.random_partition_graph([block_size] * num_blocks, p_in, 0)``
    (undirected, both directions) with ``x ~ N(0, 1)`` of width ``num_features``; ``(x, edge_index)``."""
    check_positive_int("num_features", num_features)
    check_positive_int("num_blocks", num_blocks)
    check_positive_int("block_size", block_size)
    check_number("p_in", p_in, low=0, high=1)
    nx = require("networkx", "FED-PUB's proxy graph")
    g = nx.random_partition_graph([block_size] * num_blocks, p_in, 0.0, seed=seed)
    edges = torch.tensor(list(g.edges()), dtype=torch.long).reshape(-1, 2).T
    edge_index = torch.cat([edges, edges.flip(0)], dim=1)
    x = torch.randn(block_size * num_blocks, num_features, generator=torch.Generator().manual_seed(seed))
    return x, edge_index


@torch.no_grad()
def functional_embedding(model: MaskedGCN, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    """Node-mean of ``model.embed`` on the proxy graph, in eval mode (the model's mode is restored)."""
    was = model.training
    model.eval()
    try:
        return model.embed(x, edge_index).mean(dim=0)
    finally:
        model.train(was)


def similarity_weights(embeddings: torch.Tensor, tau: float = 10.0) -> torch.Tensor:
    """``S_ij = exp(tau cos(e_i, e_j)) / sum_j' exp(tau cos(e_i, e_j'))`` for embeddings ``(clients, d)``."""
    check_number("tau", tau, low=0)
    e = torch.as_tensor(embeddings, dtype=torch.float64)
    if e.ndim != 2 or len(e) == 0:
        raise ValueError(f"embeddings must be a (clients x dim) matrix, got shape {tuple(e.shape)}.")
    if not bool(torch.isfinite(e).all()):
        raise ValueError("functional embeddings contain NaN or infinity; a client model diverged.")
    cos = F.cosine_similarity(e[:, None, :], e[None, :, :], dim=-1)
    return torch.softmax(tau * cos, dim=1)


def personalized_states(states: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor) -> list[dict]:
    """``theta_i = sum_j weights[i, j] theta_j`` for every client ``i`` (keys and dtypes of ``states[0]``)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (len(states), len(states)):
        raise ValueError(f"weights must be ({len(states)}, {len(states)}), got {tuple(w.shape)}.")
    keys = list(states[0])
    for s in states[1:]:
        if set(s) != set(keys):
            raise ValueError("client states have different keys; every client must run the same model.")
    stacked = {k: torch.stack([s[k].double() for s in states]) for k in keys}
    mixed = {k: torch.tensordot(w, v, dims=([1], [0])) for k, v in stacked.items()}
    return [{k: mixed[k][i].to(states[0][k].dtype) for k in keys} for i in range(len(states))]


def louvain_partition(edge_index: torch.Tensor, num_nodes: int, num_clients: int, seed: int = 1234) -> list[np.ndarray]:
    """Disjoint node sets: networkx Louvain communities, merged (largest first, each onto the currently smallest
    client) into ``num_clients`` parts; sorted node indices per client."""
    check_positive_int("num_clients", num_clients)
    nx = require("networkx", "FED-PUB's Louvain partition")
    g = nx.Graph()
    g.add_nodes_from(range(num_nodes))
    g.add_edges_from(edge_index.T.tolist())
    comms = sorted(nx.community.louvain_communities(g, seed=seed), key=lambda c: (-len(c), min(c)))
    if len(comms) < num_clients:
        raise ValueError(f"Louvain found {len(comms)} communities, fewer than num_clients={num_clients}; "
                         "use fewer clients.")
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in comms:
        parts[int(np.argmin([len(p) for p in parts]))].extend(c)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def induced_subgraph(nodes: np.ndarray, edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Edges among ``nodes``, relabelled to ``0..len(nodes)-1`` (cross-client edges are dropped)."""
    index = torch.full((num_nodes,), -1, dtype=torch.long)
    index[torch.as_tensor(nodes)] = torch.arange(len(nodes))
    src, dst = index[edge_index[0]], index[edge_index[1]]
    keep = (src >= 0) & (dst >= 0)
    return torch.stack([src[keep], dst[keep]])
