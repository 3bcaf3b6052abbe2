"""PortableNeighborSampler: pure-PyTorch neighbour sampling behind PyG's loaders (no pyg-lib, no torch-sparse)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.data import Data, HeteroData  # noqa: E402
from torch_geometric.loader import LinkLoader, LinkNeighborLoader, NeighborLoader, NodeLoader  # noqa: E402
from torch_geometric.sampler import BaseSampler, NegativeSampling  # noqa: E402

from lightning_ext.graph.neighbor_sampler import (  # noqa: E402
    PortableNeighborSampler,
    has_native_sampler,
    neighbor_loader,
    sample_segments,
)

PLANETOID = Path(__file__).resolve().parents[2] / "shared" / "data" / "planetoid"


@pytest.fixture(scope="module")
def cora(tmp_path_factory):
    if not (PLANETOID / "Cora" / "raw").is_dir():
        pytest.skip(f"Cora raw files not found under {PLANETOID}")
    from lightning_ext.graph.planetoid import PlanetoidDataModule

    dm = PlanetoidDataModule(root=str(PLANETOID), name="Cora", cache_dir=str(tmp_path_factory.mktemp("planetoid")))
    dm.prepare_data()
    dm.setup("fit")
    return dm.graph


def random_graph(num_nodes=60, num_edges=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    return Data(x=torch.randn(num_nodes, 4, generator=g), edge_index=ei, num_nodes=num_nodes)


def in_degree(edge_index, num_nodes):
    return torch.bincount(edge_index[1], minlength=num_nodes)


def check_hops(data, out, fanout, replace=False):
    """Every sampled edge exists; per hop and destination node the count is min(k, deg) (k with replacement)."""
    ei = data.edge_index
    assert torch.equal(ei[0, out.edge], out.node[out.row]) and torch.equal(ei[1, out.edge], out.node[out.col])
    deg = in_degree(ei, data.num_nodes)
    start_n, start_e = 0, 0
    for hop, k in enumerate(fanout):
        n_front = out.num_sampled_nodes[hop]
        frontier = torch.arange(start_n, start_n + n_front)
        col = out.col[start_e:start_e + out.num_sampled_edges[hop]]
        assert col.numel() == 0 or ((col >= start_n) & (col < start_n + n_front)).all()
        counts = torch.bincount(col - start_n, minlength=n_front) if n_front else torch.zeros(0, dtype=torch.long)
        d = deg[out.node[frontier]]
        expected = d if k == -1 else (torch.where(d > 0, k, 0) if replace else d.clamp(max=k))
        assert torch.equal(counts, expected), (hop, counts[:10], expected[:10])
        start_n += n_front
        start_e += out.num_sampled_edges[hop]


def node_batches(data, sampler, seeds, batch_size=16, **kw):
    return NodeLoader(data, node_sampler=sampler, input_nodes=seeds, batch_size=batch_size, **kw)


@pytest.mark.parametrize("fanout", [[10, 5], [3, 2, 2], [-1, 2], [-1, -1]])
def test_cora_edges_exist_and_counts_are_min_of_fanout_and_degree(cora, fanout):
    sampler = PortableNeighborSampler(cora, fanout)
    assert isinstance(sampler, BaseSampler)
    from torch_geometric.sampler import NodeSamplerInput

    seeds = torch.arange(0, 2708, 37)
    out = sampler.sample_from_nodes(NodeSamplerInput(input_id=seeds, node=seeds))
    assert torch.equal(out.node[: seeds.numel()], seeds)
    assert out.node.unique().numel() == out.node.numel()  # non-disjoint: every node once
    check_hops(cora, out, fanout)


def test_minus_one_takes_the_exact_k_hop_neighbourhood():
    data = random_graph()
    sampler = PortableNeighborSampler(data, [-1, -1])
    from torch_geometric.sampler import NodeSamplerInput

    out = sampler.sample_from_nodes(NodeSamplerInput(input_id=None, node=torch.tensor([3])))
    ei = data.edge_index
    hop1 = ei[0, ei[1] == 3].unique()
    hop2 = ei[0, torch.isin(ei[1], hop1[hop1 != 3])].unique()
    assert set(out.node.tolist()) == {3} | set(hop1.tolist()) | set(hop2.tolist())
    front = torch.isin(ei[1], out.node[: 1 + out.num_sampled_nodes[1]])
    assert out.edge.numel() == int(front.sum())  # every in-edge of the hop-0 and hop-1 frontier, once


def test_replacement_draws_exactly_k_per_non_isolated_node():
    data = random_graph(num_nodes=30, num_edges=60, seed=3)
    from torch_geometric.sampler import NodeSamplerInput

    out = PortableNeighborSampler(data, [4, 3], replace=True).sample_from_nodes(
        NodeSamplerInput(input_id=None, node=torch.arange(5)))
    check_hops(data, out, [4, 3], replace=True)


def test_uniform_inclusion_frequency_is_k_over_d():
    d, k, draws = 20, 5, 3000
    data = Data(edge_index=torch.stack([torch.arange(1, d + 1), torch.zeros(d, dtype=torch.long)]), num_nodes=d + 1)
    pos, seg = None, None
    start, count = torch.tensor([0] * draws), torch.tensor([d] * draws)
    pos, seg = sample_segments(start, count, k, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.bincount(seg, minlength=draws), torch.full((draws,), k))
    assert all(len(set(pos[seg == i].tolist())) == k for i in range(0, draws, 97))  # distinct within a draw
    freq = torch.bincount(pos, minlength=d).double() / draws
    sd = (k / d * (1 - k / d) / draws) ** 0.5
    assert (freq - k / d).abs().max() < 5 * sd, freq
    # chi-square over the d neighbours (df = d - 1 = 19; 99.9th percentile ~ 43.8)
    expected = draws * k / d
    chi2 = float(((torch.bincount(pos, minlength=d) - expected) ** 2 / expected).sum())
    assert chi2 < 43.8
    # the same through the sampler
    sampler = PortableNeighborSampler(data, [k])
    from torch_geometric.sampler import NodeSamplerInput

    hits = torch.zeros(d + 1)
    for i in range(300):
        out = sampler.sample_from_nodes(NodeSamplerInput(input_id=torch.tensor([i]), node=torch.tensor([0])))
        hits[out.node[1:]] += 1
    assert (hits[1:] / 300 - k / d).abs().max() < 5 * (k / d * (1 - k / d) / 300) ** 0.5


def temporal_graph(num_nodes=200, num_edges=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = random_graph(num_nodes, num_edges, seed)
    data.time = torch.randint(0, 100, (num_nodes,), generator=g)
    data.edge_time = torch.randint(0, 100, (num_edges,), generator=g)
    return data


@pytest.mark.parametrize("strategy", ["uniform", "last"])
def test_node_time_zero_leaks_over_a_full_epoch(strategy):
    data = temporal_graph()
    sampler = PortableNeighborSampler(data, [5, 3], time_attr="time", temporal_strategy=strategy)
    assert sampler.disjoint
    seed_time = torch.randint(0, 100, (data.num_nodes,), generator=torch.Generator().manual_seed(1))
    loader = NodeLoader(data, node_sampler=sampler, input_nodes=torch.arange(data.num_nodes), input_time=seed_time,
                        batch_size=32, shuffle=True)
    leaks, sampled = 0, 0
    for batch in loader:
        st = batch.seed_time[batch.batch]  # each node's own seed's time
        nonseed = torch.arange(batch.num_nodes) >= batch.batch_size
        leaks += int((batch.time[nonseed] > st[nonseed]).sum())
        src = batch.edge_index[0]
        leaks += int((batch.time[src] > st[src]).sum())
        sampled += int(nonseed.sum())
    assert sampled > 1000 and leaks == 0


def test_last_takes_the_most_recent_valid_neighbours():
    # node 0 has in-neighbours 1..10 with times 1..10; seed time 6: valid 1..6, "last" k=3 -> 4, 5, 6
    n = 11
    data = Data(edge_index=torch.stack([torch.arange(1, n), torch.zeros(n - 1, dtype=torch.long)]), num_nodes=n,
                time=torch.arange(n))
    from torch_geometric.sampler import NodeSamplerInput

    out = PortableNeighborSampler(data, [3], time_attr="time", temporal_strategy="last").sample_from_nodes(
        NodeSamplerInput(input_id=None, node=torch.tensor([0]), time=torch.tensor([6])))
    assert sorted(out.node[1:].tolist()) == [4, 5, 6]
    out = PortableNeighborSampler(data, [-1], time_attr="time").sample_from_nodes(
        NodeSamplerInput(input_id=None, node=torch.tensor([0]), time=torch.tensor([6])))
    assert sorted(out.node[1:].tolist()) == [1, 2, 3, 4, 5, 6]


def test_edge_time_zero_leaks_with_link_loaders_and_negatives():
    data = temporal_graph(seed=2)
    sampler = PortableNeighborSampler(data, [4, 4], time_attr="edge_time")
    assert sampler.node_time is None and sampler.disjoint
    label_index, label_time = data.edge_index[:, :200], data.edge_time[:200]
    for loader in (
        LinkLoader(data, link_sampler=sampler, edge_label_index=label_index, edge_label_time=label_time,
                   neg_sampling=NegativeSampling("binary"), batch_size=40),
        LinkNeighborLoader(data, [4, 4], edge_label_index=label_index, edge_label_time=label_time,
                           time_attr="edge_time", neighbor_sampler=sampler, batch_size=40),
    ):
        leaks, edges = 0, 0
        for batch in loader:
            st = batch.edge_label_time[batch.batch % batch.edge_label_time.numel()]
            leaks += int((data.edge_time[batch.e_id] > st[batch.edge_index[1]]).sum())
            edges += batch.e_id.numel()
            assert torch.equal(data.edge_index[:, batch.e_id], batch.n_id[batch.edge_index])
        assert edges > 300 and leaks == 0


def hetero_graph(seed=0):
    g = torch.Generator().manual_seed(seed)
    data = HeteroData()
    data["user"].x = torch.randn(40, 3, generator=g)
    data["item"].x = torch.randn(30, 3, generator=g)
    data["user"].time = torch.randint(0, 50, (40,), generator=g)
    data["item"].time = torch.randint(0, 50, (30,), generator=g)
    rates = torch.stack([torch.randint(0, 40, (300,), generator=g), torch.randint(0, 30, (300,), generator=g)])
    data["user", "rates", "item"].edge_index = rates
    data["item", "rated_by", "user"].edge_index = rates.flip(0)
    data["user", "follows", "user"].edge_index = torch.randint(0, 40, (2, 100), generator=g)
    return data


def test_hetero_samples_per_edge_type_with_its_own_fanout():
    data = hetero_graph()
    fan = {("item", "rated_by", "user"): [3, 2], ("user", "follows", "user"): [1, 1],
           ("user", "rates", "item"): [2, 0]}
    sampler = PortableNeighborSampler(data, fan)
    from torch_geometric.sampler import NodeSamplerInput

    seeds = torch.arange(10)
    out = sampler.sample_from_nodes(NodeSamplerInput(input_id=seeds, node=seeds, input_type="user"))
    assert torch.equal(out.node["user"][:10], seeds)
    for et, ks in fan.items():
        ei = data[et].edge_index
        e = out.edge[et]
        assert torch.equal(ei[0, e], out.node[et[0]][out.row[et]]) and torch.equal(ei[1, e], out.node[et[2]][out.col[et]])
        # per hop and destination node at most k of its in-edges of this type, exactly min(k, deg)
        deg = in_degree(ei, data[et[2]].num_nodes)
        start_n, start_e = 0, 0
        for hop, k in enumerate(ks):
            n_front = out.num_sampled_nodes[et[2]][hop]
            col = out.col[et][start_e:start_e + out.num_sampled_edges[et][hop]] - start_n
            counts = torch.bincount(col, minlength=n_front)
            expected = deg[out.node[et[2]][start_n:start_n + n_front]].clamp(max=k)
            assert torch.equal(counts[:n_front], expected), (et, hop)
            start_n += n_front
            start_e += out.num_sampled_edges[et][hop]
    assert out.edge[("user", "rates", "item")].numel() == 0  # item frontier only exists from hop 1, where k = 0


def test_hetero_temporal_zero_leaks_through_neighbor_loader():
    data = hetero_graph(seed=1)
    loader = NeighborLoader(data, [4, 3], input_nodes=("user", torch.arange(40)), time_attr="time",
                            neighbor_sampler=PortableNeighborSampler(data, [4, 3], time_attr="time"), batch_size=8)
    leaks, sampled = 0, 0
    for batch in loader:
        st = batch["user"].time[: batch["user"].batch_size]  # no input_time: a seed's own time is its seed time
        for t in ("user", "item"):
            b = batch[t].batch
            mask = torch.ones(b.numel(), dtype=torch.bool)
            if t == "user":
                mask[: batch["user"].batch_size] = False
            leaks += int((batch[t].time[mask] > st[b[mask]]).sum())
            sampled += int(mask.sum())
    assert sampled > 100 and leaks == 0


def test_gcn_trains_on_portable_neighbor_loader_batches(cora):
    from torch_geometric.nn import GCNConv

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert not has_native_sampler()  # here: no pyg-lib, no torch-sparse -> PyG's own NeighborLoader would raise
    loader = neighbor_loader(cora, [10, 5], input_nodes=cora.train_mask, batch_size=70, shuffle=True)
    assert isinstance(loader.node_sampler, PortableNeighborSampler)

    class GCN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = GCNConv(cora.num_features, 16), GCNConv(16, 7)

        def forward(self, x, ei):
            return self.c2(torch.relu(self.c1(x, ei)), ei)

    model = GCN()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        total = 0.0
        for batch in loader:
            assert torch.equal(batch.n_id[: batch.batch_size], batch.input_id.new_tensor(
                cora.train_mask.nonzero().view(-1)[batch.input_id]))
            out = model(batch.x, batch.edge_index)[: batch.batch_size]
            loss = torch.nn.functional.cross_entropy(out, batch.y[: batch.batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        losses.append(total)
    torch.set_num_threads(threads)
    assert losses[-1] < 0.5 * losses[0], losses


def test_seeded_reproducibility_and_epochs():
    data = temporal_graph()
    from torch_geometric.sampler import NodeSamplerInput

    inp = NodeSamplerInput(input_id=torch.arange(20), node=torch.arange(20))

    def run(seed, epoch=0):
        s = PortableNeighborSampler(data, [3, 2], seed=seed)
        s.set_epoch(epoch)
        return s.sample_from_nodes(inp).edge

    assert torch.equal(run(0), run(0)) and torch.equal(run(5, 2), run(5, 2))
    assert not torch.equal(run(0), run(1)) and not torch.equal(run(0), run(0, 1))
    sampler = PortableNeighborSampler(data, [3, 2], seed=0)
    a = [b.e_id for b in node_batches(data, sampler, torch.arange(100), num_workers=0)]
    b = [b.e_id for b in node_batches(data, sampler, torch.arange(100), num_workers=0)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kwargs, match", [
    ({"num_neighbors": 5}, "num_neighbors must be a non-empty list of ints"),
    ({"num_neighbors": [5, 2.5]}, "ints >= 0 or -1"),
    ({"num_neighbors": [5, -2]}, "ints >= 0 or -1"),
    ({"num_neighbors": [True]}, "ints >= 0 or -1"),
    ({"num_neighbors": [5], "time_attr": "missing"}, "time_attr='missing' is on no node or edge type"),
    ({"num_neighbors": [5], "temporal_strategy": "first"}, "temporal_strategy"),
    ({"num_neighbors": [5], "replace": "yes"}, "replace must be True or False"),
    ({"num_neighbors": {("a", "b", "c"): [1]}}, "a dict is per edge type"),
])
def test_bad_input_is_one_clear_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        PortableNeighborSampler(random_graph(), **kwargs)
    assert "\n" not in str(info.value)


def test_bad_hetero_fanout_and_missing_seed_time():
    data = hetero_graph()
    with pytest.raises(ValueError, match="names edge types"):
        PortableNeighborSampler(data, {("user", "likes", "item"): [1]})
    data = temporal_graph()
    sampler = PortableNeighborSampler(data, [2], time_attr="edge_time")
    from torch_geometric.sampler import NodeSamplerInput

    with pytest.raises(ValueError, match="needs the seeds' times"):
        sampler.sample_from_nodes(NodeSamplerInput(input_id=None, node=torch.arange(3)))


def test_batches_are_the_same_with_worker_processes():
    data = random_graph(num_nodes=80, num_edges=500, seed=4)
    sampler = PortableNeighborSampler(data, [3, 2], seed=7)
    one = [b.e_id for b in node_batches(data, sampler, torch.arange(80), batch_size=20)]
    two = [b.e_id for b in node_batches(data, sampler, torch.arange(80), batch_size=20, num_workers=2)]
    assert len(one) == 4 and all(torch.equal(x, y) for x, y in zip(one, two))


def test_hetero_link_loader_with_node_time_never_leaks():
    data = hetero_graph(seed=2)
    et = ("user", "rates", "item")
    label_index = data[et].edge_index[:, :120]
    label_time = torch.maximum(data["user"].time[label_index[0]], data["item"].time[label_index[1]])
    sampler = PortableNeighborSampler(data, [3, 2], time_attr="time", seed=1)
    loader = LinkLoader(data, link_sampler=sampler, edge_label_index=(et, label_index), edge_label_time=label_time,
                        neg_sampling=NegativeSampling("binary"), batch_size=30)
    leaks, sampled = 0, 0
    for batch in loader:
        st = batch[et].edge_label_time
        for t in ("user", "item"):
            b = batch[t].batch  # the seed edge (positive or negative) each node was sampled for
            leaks += int((batch[t].time > st[b % st.numel()]).sum()) if batch[t].num_nodes else 0
            sampled += batch[t].num_nodes
        for key in batch.edge_types:
            src, dst = key[0], key[-1]
            ei = batch[key].edge_index
            assert torch.equal(data[key].edge_index[:, batch[key].e_id],
                               torch.stack([batch[src].n_id[ei[0]], batch[dst].n_id[ei[1]]]))
    assert sampled > 200 and leaks == 0
