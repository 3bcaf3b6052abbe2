"""Propagation speed: our CSR ``spmm`` against PyG's ``EdgeIndex`` sparse matmul and PyG's example loop.

Measured on the LastFM and ML-100K training graphs and on a generated graph 8x LastFM's size with the same
degree profile (user degrees resampled from LastFM's, items drawn in proportion to LastFM's item degrees), all
in one process, 1 thread, timed in process CPU seconds, alternating the contenders round by round; ratios are medians of per-round ratios.

- ``lightgcn``: forward + backward (gradient into the embeddings) of 3 LightGCN layers ``mean_k Â^k E``:
  ours (precomputed CSR and its transpose), PyG ``EdgeIndex.matmul`` (CSR/CSC cached, values precomputed) and
  PyG's ``examples/lightgcn.py`` path (``torch_geometric.nn.LightGCN.get_embedding`` on a raw ``edge_index``:
  ``gcn_norm`` and scatter message passing in every call).
- ``dccf``: one layer whose edge values also need a gradient (DCCF's adaptive augmentation):
  ours vs ``EdgeIndex.matmul(x, input_value=values)``.
- ``step``: one full training step (loss, backward, Adam) of LightGCN (batch 2048) and UltraGCN (batch 1024,
  200 negatives; the official configs use 200-1500) and the implied epoch costs, the premise of UltraGCN's
  speed claim (an UltraGCN epoch must be cheaper than a LightGCN epoch for a >10x wall-clock gain).

Used by ``benchmarks/graph_recommenders.py --part speed``; on its own: ``python benchmarks/graph_propagation_speed.py``.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")


def generated_pairs(pairs: np.ndarray, num_users: int, num_items: int, scale: int, seed: int = 0):
    """A graph ``scale`` times larger with LastFM's degree profile: (pairs, num_users, num_items)."""
    rng = np.random.default_rng(seed)
    d_u = np.bincount(pairs[:, 0], minlength=num_users)
    d_i = np.bincount(pairs[:, 1], minlength=num_items).astype(np.float64)
    n_u, n_i = num_users * scale, num_items * scale
    item_p = np.tile(d_i, scale) / (d_i.sum() * scale)
    degs = rng.choice(d_u[d_u > 0], size=n_u)
    users = np.repeat(np.arange(n_u), degs)
    items = rng.choice(n_i, size=len(users), p=item_p)
    out = np.unique(np.stack([users, items], 1), axis=0)
    return out, n_u, n_i


def _time(fn, reps):
    """CPU seconds of this process per call (1 thread): on a shared, loaded machine wall-clock mostly measures the
    other jobs, CPU time measures the work."""
    fn()  # warm-up
    t = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t) / reps


def measure_graph(pairs: np.ndarray, num_users: int, num_items: int, rounds: int = 3, reps: int = 3) -> dict:
    """Seconds and ratios for one interaction graph (see the module docstring)."""
    from torch_geometric import EdgeIndex
    from torch_geometric.nn import LightGCN as PyGLightGCN

    from lightning_ext.recsys.graph import bipartite_graph, spmm, symmetric_norm_values
    from lightning_ext.recsys.interactions import Interactions
    from lightning_ext.recsys.lightgcn import LightGCN
    from lightning_ext.recsys.ultragcn import UltraGCN

    n = num_users + num_items
    graph = bipartite_graph(pairs[:, 0], pairs[:, 1], num_users, num_items)
    values = symmetric_norm_values(graph)
    edge_index = torch.stack([graph.row, graph.col])  # row-sorted, both directions
    ei = EdgeIndex(edge_index, sparse_size=(n, n), sort_order="row", is_undirected=True)
    ei.fill_cache_()
    torch.manual_seed(0)
    x0 = torch.randn(n, 64) * 0.1
    pyg = PyGLightGCN(num_nodes=n, embedding_dim=64, num_layers=3)

    def lightgcn(prop):
        def run():
            x = x0.clone().requires_grad_(True)
            out, layer = x, x
            for _ in range(3):
                layer = prop(layer)
                out = out + layer
            (out / 4).pow(2).sum().backward()
        return run

    def pyg_example():
        pyg.zero_grad()
        pyg.get_embedding(edge_index).pow(2).sum().backward()

    def dccf(prop):
        def run():
            x = x0.clone().requires_grad_(True)
            v = values.clone().requires_grad_(True)
            prop(v, x).pow(2).sum().backward()
        return run

    contenders = {
        "lightgcn": {"ours": lightgcn(lambda h: spmm(graph, values, h)),
                     "pyg_edgeindex": lightgcn(lambda h: ei.matmul(h, input_value=values)),
                     "pyg_example": pyg_example},
        "dccf": {"ours": dccf(lambda v, h: spmm(graph, v, h)),
                 "pyg_edgeindex": dccf(lambda v, h: ei.matmul(h, input_value=v))},
    }
    data = Interactions.from_pairs(pairs, num_users, num_items)
    steps = {}
    for name, model, batch in (("lightgcn", LightGCN(num_layers=3), 2048),
                               ("ultragcn", UltraGCN(negative_num=200), 1024)):
        model.bind(data)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(len(pairs), (batch,), generator=g)
        b = torch.as_tensor(pairs)[idx]
        neg = torch.randint(num_items, (batch,), generator=g)

        def step(model=model, opt=opt, b=b, neg=neg):
            loss = model.training_loss(b[:, 0], b[:, 1], neg)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        steps[name] = (step, batch)
    contenders["step"] = {k: v[0] for k, v in steps.items()}

    seconds = {group: {k: [] for k in c} for group, c in contenders.items()}
    for _ in range(rounds):
        for group, c in contenders.items():
            for k, fn in c.items():
                seconds[group][k].append(_time(fn, reps))
    out = {"num_users": num_users, "num_items": num_items, "num_pairs": int(len(pairs)), "rounds": rounds,
           "reps": reps, "seconds": {g: {k: statistics.median(v) for k, v in s.items()} for g, s in seconds.items()},
           "ratios": {}}
    for group, s in seconds.items():
        for k in s:
            if k != "ours" and "ours" in s:
                out["ratios"][f"{group}: {k} / ours"] = statistics.median(a / b for a, b in zip(s[k], s["ours"]))
    step_l, step_u = seconds["step"]["lightgcn"], seconds["step"]["ultragcn"]
    n_l, n_u = -(-len(pairs) // steps["lightgcn"][1]), -(-len(pairs) // steps["ultragcn"][1])
    out["epoch_seconds"] = {"lightgcn": statistics.median(step_l) * n_l, "ultragcn": statistics.median(step_u) * n_u}
    out["ratios"]["epoch: ultragcn / lightgcn"] = statistics.median(u * n_u / (l * n_l) for u, l in zip(step_u, step_l))
    return out


def measure_all(rounds: int = 3, scale: int = 8) -> dict:
    from lightning_ext.recsys.lastfm import LastFMDataModule
    from lightning_ext.recsys.movielens100k import MovieLens100KDataModule

    torch.set_num_threads(1)
    results = {}
    for label, dm in (("LastFM", LastFMDataModule(val_fraction=0)), ("ML-100K", MovieLens100KDataModule(val_fraction=0))):
        dm.setup("fit")
        d = dm.interactions
        results[label] = measure_graph(d.train, d.num_users, d.num_items, rounds)
        if label == "LastFM":
            big = generated_pairs(d.train, d.num_users, d.num_items, scale)
            results[f"generated {scale}x LastFM"] = measure_graph(*big, rounds=rounds, reps=2)
        print(label, json.dumps(results[label]["ratios"]), flush=True)
    return results


if __name__ == "__main__":
    print(json.dumps(measure_all(), indent=1))
