"""A pure-PyTorch neighbour sampler for PyG's `NodeLoader`/`LinkLoader`, temporal or not, with no compiled extension.

PyG 2.8's `NeighborSampler` needs `pyg-lib` or `torch-sparse`; :class:`PortableNeighborSampler` implements the same
`torch_geometric.sampler.BaseSampler` interface (`sample_from_nodes`, `sample_from_edges`, returning
`SamplerOutput`/`HeteroSamplerOutput`) in plain tensor operations, so PyG's loaders build their batches unchanged.
Paper: Hamilton, Ying and Leskovec, "Inductive Representation Learning on Large Graphs" (GraphSAGE, NeurIPS 2017,
arXiv 1706.02216), the layer-wise fan-out sampler; temporal semantics follow pyg-lib's (Fey et al., "Relational
Deep Learning", arXiv 2312.04615). Reference code: https://github.com/pyg-team/pyg-lib
(`pyg_lib/csrc/sampler/cpu/neighbor_kernel.cpp`) and `torch_geometric/sampler/neighbor_sampler.py`.

Sampling walks backwards along ``src -> dst`` edges: for a frontier node ``v`` at hop ``h`` and each edge type ending
in ``v``'s type, it draws ``k_h`` of ``v``'s in-neighbours ``N(v)`` (all of them when ``k_h = -1``),
uniformly without replacement (``min(k_h, |N(v)|)`` distinct ones), uniformly with replacement, or the ``k_h``
most recent ones (``"last"``). With a time attribute a candidate is valid iff ``t(u) <= t(seed)`` (node time) or
``t(u, v) <= t(seed)`` (edge time), and sampling is disjoint: a node's identity is ``(seed, node)``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

from lightning_ext.core.optional import require
from lightning_ext.core.validation import check_choice, check_number

_HOMO_NODE = "_node"
_HOMO_EDGE = (_HOMO_NODE, "_to", _HOMO_NODE)


def _check_fanout(name: str, value: Any) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty list of ints (one fan-out per hop, -1 = all neighbours), "
                         f"got {value!r}")
    for k in value:
        if isinstance(k, bool) or not isinstance(k, int) or k < -1:
            raise ValueError(f"{name} must hold ints >= 0 or -1 (all neighbours) per hop, got {k!r} in {value!r}")
    return [int(k) for k in value]


def _expand(lengths: Tensor) -> tuple[Tensor, Tensor]:
    """``(segment, offset)`` for every element of segments of the given lengths."""
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    return seg, torch.arange(seg.numel()) - first[seg]


def sample_segments(start: Tensor, count: Tensor, k: int, *, replace: bool = False, strategy: str = "uniform",
                    generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Draw up to ``k`` positions from each segment ``[start_i, start_i + count_i)``; returns ``(positions, segment)``.

    ``k = -1`` takes every position; ``"uniform"`` without replacement takes ``min(k, count_i)`` distinct ones with
    equal probability (random keys ranked per segment); with ``replace`` it takes ``k`` independent uniform draws
    from non-empty segments; ``"last"`` takes the final ``min(k, count_i)`` positions (the most recent ones).

    Example:
        >>> pos, seg = sample_segments(torch.tensor([0, 5]), torch.tensor([3, 2]), -1)
        >>> pos.tolist(), seg.tolist()
        ([0, 1, 2, 5, 6], [0, 0, 0, 1, 1])
    """
    if k == 0 or count.numel() == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty
    if k < 0:
        seg, off = _expand(count)
        return start[seg] + off, seg
    if strategy == "last":
        take = count.clamp(max=k)
        seg, off = _expand(take)
        return start[seg] + count[seg] - take[seg] + off, seg
    if replace:
        seg, _ = _expand(torch.where(count > 0, k, 0))
        draw = torch.rand(seg.numel(), generator=generator, dtype=torch.float64)
        return start[seg] + (draw * count[seg]).long().clamp(max=count[seg] - 1), seg
    small = count <= k  # take the whole segment
    seg_a, off_a = _expand(torch.where(small, count, 0))
    seg_b, off_b = _expand(torch.where(small, 0, count))
    if seg_b.numel():
        keys = seg_b.to(torch.float64) + torch.rand(seg_b.numel(), generator=generator, dtype=torch.float64)
        order = torch.argsort(keys)  # grouped by segment, random order inside each
        seg_sorted = seg_b[order]
        first = torch.cumsum(count * ~small, 0) - count * ~small
        rank = torch.arange(order.numel()) - first[seg_sorted]
        keep = order[rank < k]
        seg_b, off_b = seg_b[keep], off_b[keep]
    seg = torch.cat([seg_a, seg_b])
    return start[seg] + torch.cat([off_a, off_b]), seg


class _Index:
    """One edge type's CSC: edges sorted by ``(dst, candidate time)``, with a searchable composite key."""

    def __init__(self, edge_index: Tensor, num_dst: int, cand_time: Optional[Tensor]) -> None:
        src, dst = edge_index[0].long(), edge_index[1].long()
        self.times = None
        if cand_time is None:
            order = torch.argsort(dst, stable=True)
        else:
            self.times = torch.unique(cand_time)  # sorted distinct candidate times
            rank = torch.searchsorted(self.times, cand_time)
            comp = dst * (self.times.numel() + 1) + rank
            order = torch.argsort(comp, stable=True)
            self.comp = comp[order]
        self.ptr = torch.zeros(num_dst + 1, dtype=torch.long)
        self.ptr[1:] = torch.cumsum(torch.bincount(dst, minlength=num_dst), 0)
        self.src, self.eid = src[order], order
        self.cand_time = None if cand_time is None else cand_time[order]

    def valid_end(self, v: Tensor, seed_time: Optional[Tensor]) -> Tensor:
        """End of the valid prefix of each segment: candidates with time <= the seed's time."""
        if self.times is None or seed_time is None:
            return self.ptr[v + 1]
        q = torch.searchsorted(self.times.to(torch.float64), seed_time.to(torch.float64), right=True)  # <= seed
        return torch.searchsorted(self.comp, v * (self.times.numel() + 1) + q)


class PortableNeighborSampler:
    """Pure-PyTorch neighbour sampler behind PyG's `BaseSampler` interface: fan-out per hop, temporal, hetero.

    A drop-in for `torch_geometric.sampler.NeighborSampler` where neither `pyg-lib` nor `torch-sparse` is installed:
    pass it to `NodeLoader(data, node_sampler=...)`, `LinkLoader(data, link_sampler=...)` or
    `NeighborLoader(..., neighbor_sampler=...)` (or use :func:`neighbor_loader`, which picks it automatically).
    Edges are sorted by destination once (per edge type); each hop slices every frontier node's in-edges, keeps the
    prefix no later than its seed's time, and draws from it (see :func:`sample_segments`). The output carries
    global edge ids (``edge_permutation`` is ``None``), ``num_sampled_nodes``/``num_sampled_edges`` per hop, and
    ``batch`` when disjoint. Each call draws from a generator seeded by ``seed``, the epoch (:meth:`set_epoch`) and
    the batch's input ids, so a batch is reproducible with any number of workers.

    Args:
        data: a PyG ``Data`` or ``HeteroData`` with ``edge_index`` per edge type.
        num_neighbors: fan-out per hop, ``-1`` = all neighbours; a list for every edge type or a dict
            ``{edge_type: list}`` (edge types left out sample nothing; every list has the same length).
        replace: draw with replacement (uniform strategy only).
        disjoint: give every seed its own subgraph (forced on when ``time_attr`` is set, as in PyG).
        time_attr: name of a node or edge time attribute; candidates later than their seed's time are never drawn.
        temporal_strategy: ``"uniform"`` among valid candidates, or ``"last"``: the most recent ones.
        seed: seed of the sampling generator.

    Example:
        >>> from torch_geometric.data import Data
        >>> from torch_geometric.loader import NodeLoader
        >>> data = Data(x=torch.randn(4, 2), edge_index=torch.tensor([[1, 2, 3, 0], [0, 0, 0, 1]]))
        >>> sampler = PortableNeighborSampler(data, num_neighbors=[2, 1])
        >>> batch = next(iter(NodeLoader(data, node_sampler=sampler, input_nodes=torch.tensor([0]), batch_size=1)))
        >>> batch.num_sampled_nodes[:2], batch.batch_size
        ([1, 2], 1)
    """

    def __init__(self, data: Any = None, num_neighbors: Union[list[int], dict, None] = None, replace: bool = False,
                 disjoint: bool = False, time_attr: Optional[str] = None,
                 temporal_strategy: Literal["uniform", "last"] = "uniform", seed: int = 0) -> None:
        require("torch_geometric", "PortableNeighborSampler")
        from torch_geometric.data import Data, HeteroData
        from torch_geometric.sampler import BaseSampler

        BaseSampler.register(PortableNeighborSampler)  # a virtual subclass: isinstance(self, BaseSampler) holds
        check_choice("temporal_strategy", temporal_strategy, ("uniform", "last"))
        check_number("seed", seed, integer=True)
        for name, flag in (("replace", replace), ("disjoint", disjoint)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        if time_attr is not None and (not isinstance(time_attr, str) or not time_attr):
            raise ValueError(f"time_attr must be the name of a node or edge time attribute or None, got {time_attr!r}")
        if isinstance(data, HeteroData):
            self.is_hetero = True
            node_types, edge_types = list(data.node_types), list(data.edge_types)
            node_store = {t: data[t] for t in node_types}
            edge_store = {et: data[et] for et in edge_types}
        elif isinstance(data, Data):
            self.is_hetero = False
            node_types, edge_types = [_HOMO_NODE], [_HOMO_EDGE]
            node_store, edge_store = {_HOMO_NODE: data}, {_HOMO_EDGE: data}
        else:
            raise ValueError(f"data must be a torch_geometric Data or HeteroData, got {type(data).__name__}")
        self.node_types, self.edge_types = node_types, edge_types
        self.num_nodes = {t: int(node_store[t].num_nodes or 0) for t in node_types}
        self.num_neighbors = self._fanouts(num_neighbors)
        self.num_hops = len(next(iter(self.num_neighbors.values())))

        self.node_time: Optional[dict[str, Tensor]] = None
        edge_time: dict = {}
        if time_attr is not None:
            node_time = {t: node_store[t][time_attr] for t in node_types if time_attr in node_store[t]
                         and (self.is_hetero or not data.is_edge_attr(time_attr))}
            if node_time:
                self.node_time = node_time
            else:
                edge_time = {et: edge_store[et][time_attr] for et in edge_types if time_attr in edge_store[et]}
                if not edge_time:
                    raise ValueError(f"time_attr={time_attr!r} is on no node or edge type of data: add it "
                                     f"(data[...].{time_attr} = times) or pass time_attr=None")
        self.time_attr, self.temporal_strategy, self.replace, self.seed = time_attr, temporal_strategy, replace, seed
        self.disjoint = disjoint or time_attr is not None
        self.epoch = 0
        self._generator: Optional[torch.Generator] = None
        self._index = {}
        for et in edge_types:
            if "edge_index" not in edge_store[et]:
                raise ValueError(f"data has no edge_index for edge type {et}: neighbour sampling needs one")
            if self.node_time is not None:
                cand = self.node_time.get(et[0])
                cand = None if cand is None else cand[edge_store[et]["edge_index"][0]]
            else:
                cand = edge_time.get(et)
            self._index[et] = _Index(edge_store[et]["edge_index"], self.num_nodes[et[-1]], cand)

    def _fanouts(self, num_neighbors: Any) -> dict:
        if isinstance(num_neighbors, dict):
            if not self.is_hetero:
                raise ValueError("num_neighbors must be a list for a homogeneous graph (a dict is per edge type)")
            unknown = [et for et in num_neighbors if tuple(et) not in self.edge_types]
            if unknown:
                raise ValueError(f"num_neighbors names edge types {unknown} that data does not have; "
                                 f"choose among {self.edge_types}")
            out = {tuple(et): _check_fanout(f"num_neighbors[{et}]", v) for et, v in num_neighbors.items()}
            if len({len(v) for v in out.values()}) != 1:
                raise ValueError("num_neighbors must give every edge type the same number of hops")
            hops = len(next(iter(out.values())))
            return {et: out.get(et, [0] * hops) for et in self.edge_types}
        fan = _check_fanout("num_neighbors", num_neighbors)
        return {et: list(fan) for et in self.edge_types}

    def set_epoch(self, epoch: int) -> None:
        """Vary the draws per epoch (like `DistributedSampler.set_epoch`); batches stay reproducible."""
        self.epoch = int(check_number("epoch", epoch, integer=True))

    @property
    def edge_permutation(self) -> None:
        """The output's ``edge`` holds global edge ids already: no permutation."""
        return None

    @property
    def is_temporal(self) -> bool:
        """Whether a time attribute constrains the candidates."""
        return self.time_attr is not None

    # ------------------------------------------------------------------ BaseSampler interface
    def _seed_generator(self, input_id: Optional[Tensor], fallback: Any) -> None:
        ids = input_id if input_id is not None else fallback
        ids = torch.cat([v.flatten() for v in ids.values()]) if isinstance(ids, dict) else ids.flatten()
        h = int(((ids.long() % 1_000_003 + 1) * (torch.arange(ids.numel()) % 7919 + 1)).sum()) if ids.numel() else 0
        self._generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, h, ids.numel())) % (2**62))

    def sample_from_nodes(self, inputs: Any, **kwargs: Any) -> Any:
        """Sample the fan-out neighbourhood of a batch of seed nodes (a `NodeSamplerInput`)."""
        from torch_geometric.sampler.neighbor_sampler import node_sample

        self._seed_generator(inputs.input_id, inputs.node)
        return node_sample(inputs, self._sample)

    def sample_from_edges(self, inputs: Any, neg_sampling: Any = None) -> Any:
        """Sample the neighbourhoods of both endpoints of a batch of edges (an `EdgeSamplerInput`), negatives too."""
        from torch_geometric.sampler.neighbor_sampler import edge_sample

        self._seed_generator(inputs.input_id, inputs.row)
        num_nodes = self.num_nodes if self.is_hetero else self.num_nodes[_HOMO_NODE]
        node_time = self.node_time
        if node_time is not None and not self.is_hetero:
            node_time = node_time[_HOMO_NODE]
        return edge_sample(inputs, self._sample, num_nodes, self.disjoint, node_time, neg_sampling)

    # ------------------------------------------------------------------ the sampler
    def _sample(self, seed: Union[Tensor, dict], seed_time: Optional[Union[Tensor, dict]] = None) -> Any:
        from torch_geometric.sampler import HeteroSamplerOutput, SamplerOutput

        if not self.is_hetero:
            seed = {_HOMO_NODE: seed}
            seed_time = None if seed_time is None else {_HOMO_NODE: seed_time}
        seed = {t: s.long().cpu() for t, s in seed.items()}
        gen = self._generator
        batch_time = None
        if self.is_temporal:
            size = max(s.numel() for s in seed.values())
            batch_time = torch.zeros(size, dtype=torch.float64)
            for t, s in seed.items():
                if seed_time is not None and t in seed_time:
                    batch_time[: s.numel()] = seed_time[t].cpu().to(torch.float64)
                elif self.node_time is not None and t in self.node_time:
                    batch_time[: s.numel()] = self.node_time[t][s].to(torch.float64)
                else:
                    raise ValueError("time-aware sampling needs the seeds' times: pass input_time (or edge label "
                                     "times) to the loader, or give the seed node type a time attribute")

        nodes = {t: [] for t in self.node_types}
        batches = {t: [] for t in self.node_types}
        sorted_keys: dict = {}
        sizes = {t: 0 for t in self.node_types}
        n_nodes = {t: [] for t in self.node_types}
        for t in self.node_types:
            s = seed.get(t, torch.empty(0, dtype=torch.long))
            b = torch.arange(s.numel()) if self.disjoint else torch.zeros(s.numel(), dtype=torch.long)
            nodes[t].append(s)
            batches[t].append(b)
            keys = b * self.num_nodes[t] + s
            ks, order = torch.sort(keys, stable=True)
            sorted_keys[t] = (ks, order)
            sizes[t] = s.numel()
            n_nodes[t].append(s.numel())
        rows = {et: [] for et in self.edge_types}
        cols = {et: [] for et in self.edge_types}
        eids = {et: [] for et in self.edge_types}
        n_edges = {et: [] for et in self.edge_types}
        all_nodes = {t: nodes[t][0] for t in self.node_types}
        all_batch = {t: batches[t][0] for t in self.node_types}

        for hop in range(self.num_hops):
            frontier = {t: (sizes[t] - n_nodes[t][-1], sizes[t]) for t in self.node_types}
            added = {t: 0 for t in self.node_types}
            for et in self.edge_types:
                src_t, dst_t = et[0], et[-1]
                k = self.num_neighbors[et][hop]
                lo, hi = frontier[dst_t]
                index = self._index[et]
                if k == 0 or hi == lo:
                    n_edges[et].append(0)
                    continue
                local_dst = torch.arange(lo, hi)
                v = all_nodes[dst_t][lo:hi]
                b = all_batch[dst_t][lo:hi]
                start = index.ptr[v]
                end = index.valid_end(v, None if batch_time is None else batch_time[b])
                pos, seg = sample_segments(start, end - start, k, replace=self.replace,
                                           strategy=self.temporal_strategy if self.is_temporal else "uniform",
                                           generator=gen)
                u, e, bu = index.src[pos], index.eid[pos], b[seg]
                keys = bu * self.num_nodes[src_t] + u
                local_src, new_keys = self._lookup(sorted_keys[src_t], keys, sizes[src_t])
                if new_keys.numel():
                    new_local = torch.arange(sizes[src_t], sizes[src_t] + new_keys.numel())
                    ks, kp = sorted_keys[src_t]
                    merged, order = torch.sort(torch.cat([ks, new_keys]), stable=True)
                    sorted_keys[src_t] = (merged, torch.cat([kp, new_local])[order])
                    new_nodes = new_keys % max(self.num_nodes[src_t], 1)
                    new_batch = new_keys // max(self.num_nodes[src_t], 1)
                    all_nodes[src_t] = torch.cat([all_nodes[src_t], new_nodes])
                    all_batch[src_t] = torch.cat([all_batch[src_t], new_batch])
                    sizes[src_t] += new_keys.numel()
                    added[src_t] += new_keys.numel()
                rows[et].append(local_src)
                cols[et].append(local_dst[seg])
                eids[et].append(e)
                n_edges[et].append(int(pos.numel()))
            for t in self.node_types:
                n_nodes[t].append(added[t])

        def cat(parts: list) -> Tensor:
            return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

        row = {et: cat(rows[et]) for et in self.edge_types}
        col = {et: cat(cols[et]) for et in self.edge_types}
        edge = {et: cat(eids[et]) for et in self.edge_types}
        batch = {t: all_batch[t] for t in self.node_types} if self.disjoint else None
        if not self.is_hetero:
            return SamplerOutput(node=all_nodes[_HOMO_NODE], row=row[_HOMO_EDGE], col=col[_HOMO_EDGE],
                                 edge=edge[_HOMO_EDGE], batch=None if batch is None else batch[_HOMO_NODE],
                                 num_sampled_nodes=n_nodes[_HOMO_NODE], num_sampled_edges=n_edges[_HOMO_EDGE])
        return HeteroSamplerOutput(node=all_nodes, row=row, col=col, edge=edge, batch=batch,
                                   num_sampled_nodes=n_nodes, num_sampled_edges=n_edges)

    @staticmethod
    def _lookup(sorted_pair: tuple[Tensor, Tensor], keys: Tensor, size: int) -> tuple[Tensor, Tensor]:
        """Local index of every key (new keys get ``size, size + 1, ...`` in sorted order) and the new keys."""
        ks, kp = sorted_pair
        local = torch.empty(keys.numel(), dtype=torch.long)
        if ks.numel():
            idx = torch.searchsorted(ks, keys).clamp(max=ks.numel() - 1)
            found = ks[idx] == keys
            local[found] = kp[idx[found]]
        else:
            found = torch.zeros(keys.numel(), dtype=torch.bool)
        new_keys, inverse = torch.unique(keys[~found], return_inverse=True)
        local[~found] = size + inverse
        return local, new_keys


def has_native_sampler() -> bool:
    """Whether PyG's own `NeighborSampler` can run here (it needs `pyg-lib` or `torch-sparse`)."""
    require("torch_geometric", "has_native_sampler")
    import torch_geometric.typing as pyg_typing

    return bool(pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE)


def neighbor_loader(data: Any, num_neighbors: Union[list[int], dict], input_nodes: Any = None,
                    input_time: Optional[Tensor] = None, replace: bool = False, disjoint: bool = False,
                    time_attr: Optional[str] = None, temporal_strategy: Literal["uniform", "last"] = "uniform",
                    seed: int = 0, portable: Optional[bool] = None, **loader_kwargs: Any) -> Any:
    """PyG's `NeighborLoader`, over :class:`PortableNeighborSampler` when PyG's native sampler cannot run.

    ``portable=None`` picks the portable sampler only when neither `pyg-lib` nor `torch-sparse` is installed;
    ``True``/``False`` force a choice. ``loader_kwargs`` go to the loader (``batch_size``, ``shuffle``, ...).

    Example:
        >>> from torch_geometric.data import Data
        >>> data = Data(x=torch.randn(3, 2), edge_index=torch.tensor([[1, 2], [0, 0]]))
        >>> next(iter(neighbor_loader(data, [2], batch_size=1, portable=True))).n_id.tolist()
        [0, 1, 2]
    """
    require("torch_geometric", "neighbor_loader")
    from torch_geometric.loader import NeighborLoader

    if portable is None:
        portable = not has_native_sampler()
    sampler = None
    if portable:
        sampler = PortableNeighborSampler(data, num_neighbors, replace=replace, disjoint=disjoint,
                                          time_attr=time_attr, temporal_strategy=temporal_strategy, seed=seed)
    return NeighborLoader(data, num_neighbors, input_nodes=input_nodes, input_time=input_time, replace=replace,
                          disjoint=disjoint, time_attr=time_attr, temporal_strategy=temporal_strategy,
                          neighbor_sampler=sampler, **loader_kwargs)


#: The spec's name for the same sampler (``graph-and-recsys.md`` section 2.1).
TemporalNeighborSampler = PortableNeighborSampler
