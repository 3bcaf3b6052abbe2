"""NetInfoF (Lee et al., ICLR 2024): measure a graph's usable information before training (the Probe).

Pure core: :func:`derived_embeddings` (the five node embeddings U, R, F, P, S), :func:`compatibility_matrix`
(the symmetric H that turns node similarity into edge evidence, solved by LSQR with implicit operators),
:func:`link_netinfo_score` and :func:`node_netinfo_score` (2^{−H(Y | bin)}), :func:`netinfof_probe`; and the
:class:`NetInfoFProbe` callback. The "Act" link predictor is
:class:`~lightning_ext.graph.net_info_f_act.NetInfoFLinkPredictor`.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional, Sequence

import torch
from lightning.pytorch import Callback
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.validation import (
    AtLeastTwoInt,
    NonNegativeFloat,
    PositiveInt,
    check_choice,
    check_non_negative,
    check_number,
    check_positive_int,
)

COMPONENTS = ("U", "R", "F", "P", "S")


def scale_rows(z: torch.Tensor) -> torch.Tensor:
    """Divide every column by its standard deviation (no centring), then L2-normalise every row.

    The official ``preprocess`` (``StandardScaler(with_mean=False)`` then ``Normalizer('l2')``).
    """
    std = z.std(0, unbiased=False)
    z = z / torch.where(std > 0, std, torch.ones_like(std))
    norm = z.norm(dim=1, keepdim=True)
    return z / torch.where(norm > 0, norm, torch.ones_like(norm))


def _csr(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    from lightning_ext.graph.gae import adjacency

    return adjacency(edge_index, num_nodes)


def walk_cooccurrence(edge_index: torch.Tensor, num_nodes: int, walks: int = 200, walk_length: int = 3,
                      threshold: int = 1, seed: int = 0) -> torch.Tensor:
    """Sparse ``(n, n)`` counts of (start, visited) pairs over ``walks`` random walks of ``walk_length`` nodes
    from every node (steps after the first are non-backtracking), keeping counts above ``threshold``.

    All walks advance together (vectorised over CSR offsets) from a seeded generator (the official C++ walks are
    unseeded and race under OpenMP). A walk stuck at a node whose only neighbour is the previous one stops.
    """
    adj = _csr(edge_index, num_nodes)
    crow, col = adj.crow_indices(), adj.col_indices()
    deg = crow[1:] - crow[:-1]
    g = torch.Generator().manual_seed(int(seed))
    start = torch.arange(num_nodes).repeat(walks)
    cur, prev = start.clone(), torch.full_like(start, -1)
    alive = deg[cur] > 0
    keys = []
    for _ in range(walk_length - 1):
        d = deg[cur].clamp(min=1)
        r = (torch.rand(cur.numel(), generator=g) * d).long().clamp(max=d - 1)
        nxt = col[(crow[cur] + r).clamp(max=max(col.numel() - 1, 0))] if col.numel() else cur
        back = (nxt == prev) & alive
        # non-backtracking: redraw uniformly among the other deg - 1 neighbours; stop where there is none
        other = (r + 1 + (torch.rand(cur.numel(), generator=g) * (d - 1)).long().clamp(max=(d - 2).clamp(min=0))) % d
        nxt = torch.where(back, col[(crow[cur] + other).clamp(max=max(col.numel() - 1, 0))], nxt)
        alive = alive & ~(back & (deg[cur] <= 1))
        keys.append(start[alive] * num_nodes + nxt[alive])
        prev, cur = cur, nxt
    key, count = torch.unique(torch.cat(keys), return_counts=True) if keys else (torch.empty(0, dtype=torch.long),) * 2
    keep = count > threshold
    idx = torch.stack([key[keep] // num_nodes, key[keep] % num_nodes])
    return torch.sparse_coo_tensor(idx, count[keep].float(), (num_nodes, num_nodes)).coalesce()


def _svd_embedding(matrix: torch.Tensor, dim: int) -> torch.Tensor:
    u, s, _ = torch.svd_lowrank(matrix, q=dim, niter=4)
    return u * s.sqrt().unsqueeze(0)


def _pca(x: torch.Tensor, dim: int) -> torch.Tensor:
    x = x - x.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(x, q=dim, center=False, niter=4)
    return x @ v[:, :dim]


def _row_normalised_propagation(x: torch.Tensor, edge_index: torch.Tensor, self_loops: bool, hops: int = 2):
    n = x.size(0)
    ei = edge_index
    if self_loops:
        loops = torch.arange(n)
        ei = torch.cat([ei, torch.stack([loops, loops])], 1)
    deg = torch.bincount(ei[0], minlength=n).float()
    w = 1.0 / deg.clamp(min=1)[ei[0]]
    a = torch.sparse_coo_tensor(ei, w, (n, n)).coalesce()
    for _ in range(hops):
        x = torch.sparse.mm(a, x)
    return x


def derived_embeddings(edge_index: torch.Tensor, x: torch.Tensor, dim: int = 128, walks: int = 200,
                       walk_length: int = 3, components: Sequence[str] = COMPONENTS, seed: int = 0) -> dict:
    """NetInfoF's five node embeddings, each ``(n, min(dim, #features))``, column-scaled and row-L2-normalised.

    ``U``: U_d S_d^{1/2} of a rank-d SVD of A (structure); ``R``: the same of the random-walk co-occurrence
    matrix (:func:`walk_cooccurrence`, neighbourhood); ``F``: PCA(X) (features); ``P``: PCA((D⁻¹A)² X)
    (propagated, no self-loops); ``S``: PCA((D̃⁻¹Ã)² X) (propagated with self-loops). ``edge_index`` must be
    the training graph only (both directions). The RNG state is restored afterwards.

    Example:
        >>> ei = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 0], [1, 0, 2, 1, 3, 2, 0, 3]])
        >>> z = derived_embeddings(ei, torch.eye(4), dim=2, walks=4)
        >>> sorted(z), tuple(z["U"].shape)
        (['F', 'P', 'R', 'S', 'U'], (4, 2))
    """
    for c in components:
        check_choice("components", c, COMPONENTS)
    n = x.size(0)
    d = min(int(dim), x.size(1), n)
    x = x.float()
    out = {}
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        for c in components:
            if c == "U":
                ones = torch.ones(edge_index.size(1))
                z = _svd_embedding(torch.sparse_coo_tensor(edge_index, ones, (n, n)).coalesce(), d)
            elif c == "R":
                z = _svd_embedding(walk_cooccurrence(edge_index, n, walks, walk_length, seed=seed), d)
            elif c == "F":
                z = _pca(x, d)
            else:
                z = _pca(_row_normalised_propagation(x, edge_index, self_loops=c == "S"), d)
            out[c] = scale_rows(z)
    return out


def _upper_positive_pairs(edge_index: torch.Tensor, num_nodes: int, two_core: bool) -> torch.Tensor:
    row, col = edge_index
    if two_core:
        deg = torch.bincount(row, minlength=num_nodes)
        keep = (deg[row] >= 2) & (deg[col] >= 2)
        row, col = row[keep], col[keep]
    up = row < col
    return torch.stack([row[up], col[up]])


def pair_features(z: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The explicit design matrix of the compatibility least squares (for tests; O(pairs · d²) memory):
    column (r, c), r ≤ c, holds z_i[r] z_j[c] + z_i[c] z_j[r], halved on the diagonal."""
    d = z.size(1)
    r0, c0 = torch.triu_indices(d, d)
    zi, zj = z[pairs[0]], z[pairs[1]]
    feats = zi[:, r0] * zj[:, c0] + zi[:, c0] * zj[:, r0]
    return torch.where(r0 == c0, feats / 2, feats)


def compatibility_matrix(z: torch.Tensor, edge_index: torch.Tensor, max_edges: int = 200_000, two_core: bool = True,
                         sparsify_mass: float = 0.05, seed: int = 0) -> torch.Tensor:
    """NetInfoF's symmetric compatibility matrix H (d x d): z_iᵀ H z_j ≈ 1 on edges, 0 on random pairs.

    Least squares over the upper-triangular entries of H with pair features z_i[r] z_j[c] + z_i[c] z_j[r]
    (halved on the diagonal): training pairs are the upper-triangular edges between nodes of degree >= 2 (at most
    ``max_edges``, sampled) plus twice as many uniform random pairs; ``scipy.sparse.linalg.lsqr(damp=1,
    atol=btol=1e-2)`` warm-started from a ridge regression of z_j on z_i over the edges, whose entries holding the
    smallest ``sparsify_mass`` of total magnitude are fixed at 0. The pair-feature matrix is never built: LSQR
    gets implicit operators (X h = rowsum((Z_i H) ⊙ Z_j), Xᵀ r = the symmetrised Z_iᵀ diag(r) Z_j).

    Returns H; the "adjusted" embedding is x_c = z @ H.
    """
    require("scipy", "compatibility_matrix")
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, lsqr

    n, d = z.shape
    z64 = z.double()
    g = torch.Generator().manual_seed(int(seed))
    # ridge warm start: z_j ≈ W z_i over every (directed) edge, W = coef_ (out x in)
    zi, zj = z64[edge_index[0]], z64[edge_index[1]]
    b = torch.linalg.solve(zi.T @ zi + torch.eye(d, dtype=torch.float64), zi.T @ zj)  # (in, out)
    coef = b.T
    r0, c0 = torch.triu_indices(d, d)
    x0 = coef[r0, c0]
    v_sort = x0.abs().sort().values
    below = torch.nonzero(torch.cumsum(v_sort, 0) / v_sort.sum().clamp(min=1e-300) < sparsify_mass).flatten()
    epsilon = float(v_sort[below[-1]]) if below.numel() else 0.0
    kept = x0.abs() >= epsilon
    pos = _upper_positive_pairs(edge_index, n, two_core)
    if pos.size(1) > max_edges:
        pos = pos[:, torch.randperm(pos.size(1), generator=g)[:max_edges]]
    neg = torch.randint(0, n, (2, 2 * pos.size(1)), generator=g)
    pairs = torch.cat([pos, neg], 1)
    y = np.concatenate([np.ones(pos.size(1)), np.zeros(neg.size(1))])
    a_i, a_j = z64[pairs[0]], z64[pairs[1]]
    kr, kc = r0[kept], c0[kept]
    diag = kr == kc

    def matvec(h):
        full = torch.zeros(d, d, dtype=torch.float64)
        full[kr, kc] = torch.as_tensor(np.asarray(h).reshape(-1), dtype=torch.float64)
        sym = full + full.T - torch.diag(full.diagonal())
        return (((a_i @ sym) * a_j).sum(1)).numpy()

    def rmatvec(r):
        gm = a_i.T @ (a_j * torch.as_tensor(np.asarray(r).reshape(-1), dtype=torch.float64).unsqueeze(1))
        out = gm[kr, kc] + gm[kc, kr]
        return torch.where(diag, gm[kr, kc], out).numpy()

    op = LinearOperator((pairs.size(1), int(kept.sum())), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
    sol = lsqr(op, y, damp=1.0, atol=1e-2, btol=1e-2, x0=x0[kept].numpy())[0]
    full = torch.zeros(d, d, dtype=torch.float64)
    full[kr, kc] = torch.as_tensor(sol)
    return (full + full.T - torch.diag(full.diagonal())).to(z.dtype)


def conditional_entropy_score(bins: torch.Tensor, labels: torch.Tensor) -> float:
    """2^{−H(Y | bin)} (bits) of the contingency table of integer ``bins`` and integer ``labels``."""
    nb, nl = int(bins.max()) + 1, int(labels.max()) + 1
    table = torch.zeros(nb, nl, dtype=torch.float64)
    table.index_put_((bins.long(), labels.long()), torch.ones(bins.numel(), dtype=torch.float64), accumulate=True)
    p = table / table.sum()
    p_bin = p.sum(1, keepdim=True)
    nz = p > 0
    h = -(p[nz] * torch.log2(p[nz] / p_bin.expand_as(p)[nz])).sum()
    return float(2.0 ** (-h))


def quantile_bins(reference: torch.Tensor, values: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin ``values`` by the ``bins``-quantile edges of ``reference`` (scikit-learn's quantile KBinsDiscretizer)."""
    edges = torch.quantile(reference.double(), torch.linspace(0, 1, bins + 1, dtype=torch.float64))
    return torch.searchsorted(edges[1:-1].contiguous(), values.double().contiguous(), right=True).clamp(0, bins - 1)


def link_netinfo_score(z: torch.Tensor, xc: torch.Tensor, edge_index: torch.Tensor, pos: torch.Tensor,
                       neg: torch.Tensor, bins: int = 8, seed: int = 0) -> float:
    """NetInfoF_Score for link prediction: 2^{−H(Y | bin)} of the similarity xc_i · z_j of validation positives
    (Y = 1) and negatives (Y = 0), binned by the quantiles of the similarities of the training edges (upper
    triangle) and twice as many uniform random pairs. A lower bound on the accuracy of a classifier of the
    binned similarity (the paper's theorem)."""
    n = z.size(0)
    train = edge_index[:, edge_index[0] < edge_index[1]]
    g = torch.Generator().manual_seed(int(seed))
    rand = torch.randint(0, n, (2, 2 * train.size(1)), generator=g)
    ref_pairs = torch.cat([train, rand], 1)
    sim = lambda p: (xc[p[0]] * z[p[1]]).sum(1)  # noqa: E731
    val = torch.cat([pos, neg], 1)
    labels = torch.cat([torch.ones(pos.size(1)), torch.zeros(neg.size(1))]).long()
    return conditional_entropy_score(quantile_bins(sim(ref_pairs), sim(val), bins), labels)


def node_netinfo_score(z: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, clusters: int = 16,
                       seed: int = 0) -> float:
    """NetInfoF_Score for node classification (the paper's Probe; no official code): cluster the embedding
    (k-means, every node) and return 2^{−H(Y | cluster)} over the labelled nodes of ``mask``."""
    require("sklearn", "node_netinfo_score")
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=min(clusters, z.size(0)), n_init=4, random_state=int(seed)).fit(z.double().numpy())
    assign = torch.as_tensor(km.labels_)[mask]
    return conditional_entropy_score(assign, labels[mask])


def netinfof_probe(x: torch.Tensor, edge_index: torch.Tensor, task: Literal["link", "node"] = "link",
                   val_pos: Optional[torch.Tensor] = None, val_neg: Optional[torch.Tensor] = None,
                   labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, dim: int = 128,
                   bins: int = 8, clusters: int = 16, walks: int = 200, seed: int = 0,
                   components: Sequence[str] = COMPONENTS) -> dict[str, float]:
    """The five NetInfoF_Scores of a graph, before any training: ``{"U": ..., "R": ..., "F": ..., "P": ...,
    "S": ...}``. ``task="link"`` needs the validation positives/negatives (``edge_index`` = training edges
    only); ``task="node"`` needs ``labels`` and the ``mask`` of labelled nodes to score."""
    if task == "link" and (val_pos is None or val_neg is None or val_pos.numel() == 0 or val_neg.numel() == 0):
        raise ValueError("NetInfoF's link Probe needs validation positive and negative edges (an edge split); "
                         "use LinkPredictionDataModule or pass `val_pos` and `val_neg`.")
    if task == "node" and (labels is None or mask is None or int(mask.sum()) == 0):
        raise ValueError("NetInfoF's node Probe needs node `labels` and a non-empty `mask` of labelled nodes "
                         "(e.g. the graph's val_mask).")
    zs = derived_embeddings(edge_index, x, dim, walks, components=components, seed=seed)
    if task == "node":
        return {c: node_netinfo_score(z, labels, mask, clusters, seed) for c, z in zs.items()}
    return {c: link_netinfo_score(z, z @ compatibility_matrix(z, edge_index, seed=seed), edge_index, val_pos, val_neg,
                                  bins, seed) for c, z in zs.items()}


class NetInfoFProbe(Callback):
    """NetInfoF Probe (Lee et al., ICLR 2024): score a graph's usable information before training starts.

    Paper: https://arxiv.org/abs/2402.07999 ; reference code:
    https://github.com/amazon-science/Network-Usable-Info-Framework . At ``on_fit_start`` it takes the graph
    from ``trainer.datamodule`` and computes, for each derived embedding c ∈ {U, R, F, P, S}
    (:func:`derived_embeddings`), NetInfoF_Score = 2^{−H(Y | bin_c)}: for ``task="link"`` Y is the label of the
    validation edges (a :class:`~lightning_ext.graph.link_prediction.LinkPredictionDataModule`) and bin_c the
    quantile bin of the compatibility-adjusted similarity (xc_i · z_j, :func:`compatibility_matrix`); for
    ``task="node"`` Y is the class of the validation nodes (a Planetoid-style DataModule with ``val_mask``) and
    bin_c a k-means cluster. The scores (and their max) are logged as ``netinfof/<c>`` and kept in ``scores``;
    below ``warn_below`` it warns that the graph holds little usable information. It never trains.

    Args:
        task: ``"link"`` or ``"node"``.
        dim: embedding size d (at most the feature count).
        bins: quantile bins of the link similarity.
        clusters: k-means clusters of the node Probe.
        walks: random walks per node for R.
        seed: seed of the walks, the random pairs and k-means.
        warn_below: warn when the best score is below this (``0`` never warns).

    Example:
        >>> probe = NetInfoFProbe(task="link", dim=64)
        >>> probe.scores
        {}
    """

    def __init__(self, task: Literal["link", "node"] = "link", dim: PositiveInt = 128, bins: AtLeastTwoInt = 8,
                 clusters: AtLeastTwoInt = 16, walks: PositiveInt = 200, seed: int = 0,
                 warn_below: NonNegativeFloat = 0.0) -> None:
        require("torch_geometric", "NetInfoFProbe")
        check_choice("task", task, ("link", "node"))
        check_positive_int("dim", dim)
        check_number("bins", bins, low=2, integer=True)
        check_number("clusters", clusters, low=2, integer=True)
        check_positive_int("walks", walks)
        check_number("seed", seed, integer=True)
        check_non_negative("warn_below", warn_below)
        self.task, self.dim, self.bins, self.clusters, self.walks = task, dim, bins, clusters, walks
        self.seed, self.warn_below = seed, warn_below
        self.scores: dict[str, float] = {}

    def probe_datamodule(self, dm: Any) -> dict[str, float]:
        """The five scores of ``dm``'s graph (``setup`` is called if needed)."""
        if dm is None:
            raise ValueError("NetInfoFProbe needs a trainer.datamodule holding the graph (fit with datamodule=...).")
        if self.task == "link":
            if not hasattr(dm, "splits"):
                raise ValueError(f"NetInfoFProbe(task='link') needs an edge split; {type(dm).__name__} has none: "
                                 "use LinkPredictionDataModule (RandomLinkSplit).")
            if not dm.splits:
                dm.setup("fit")
            val = dm.splits["val"]
            return netinfof_probe(dm.graph.x, val["edge_index"], "link", val["pos"], val["neg"], dim=self.dim,
                                  bins=self.bins, walks=self.walks, seed=self.seed)
        graph = getattr(dm, "graph", None)
        if graph is None:
            dm.setup("fit")
            graph = getattr(dm, "graph", None)
        if graph is None or getattr(graph, "y", None) is None or getattr(graph, "val_mask", None) is None:
            raise ValueError(f"NetInfoFProbe(task='node') needs a graph with labels `y` and a `val_mask`; "
                             f"{type(dm).__name__} has none: use PlanetoidDataModule.")
        from torch_geometric.utils import remove_self_loops, to_undirected

        ei = to_undirected(remove_self_loops(graph.edge_index)[0], num_nodes=graph.num_nodes)
        return netinfof_probe(graph.x, ei, "node", labels=graph.y, mask=graph.val_mask, dim=self.dim,
                              clusters=self.clusters, walks=self.walks, seed=self.seed)

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        """Score the graph, log ``netinfof/<component>`` and ``netinfof/max``, warn when it is low."""
        self.scores = self.probe_datamodule(getattr(trainer, "datamodule", None))
        best = max(self.scores.values())
        metrics = {f"netinfof/{c}": v for c, v in self.scores.items()} | {"netinfof/max": best}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.warn_below and best < self.warn_below:
            warnings.warn(f"NetInfoF: the graph holds little usable information for {self.task} prediction "
                          f"(best score {best:.3f} < warn_below={self.warn_below}).", stacklevel=2)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The scores measured (restored on resume, recomputed at the next fit start)."""
        return {"scores": dict(self.scores)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the scores."""
        self.scores = dict(state_dict.get("scores", {}))


