"""Z-GCNETs: the exact H0 zigzag against an independent GF(2) zigzag reduction, the persistence image, the model,
its loss and metrics, the token-network DataModule (split, scaler, cache, channel modes) and a fit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lightning_ext.graph.graph_time_series import GraphTimeSeriesDataModule, load_token_network
from lightning_ext.graph.zgcnets import ZGCNETs, ZGCNNet, forecast_metrics
from lightning_ext.graph.zigzag_persistence import (
    ZigzagPersistenceImage,
    feature_distance_graphs,
    persistence_image,
    zigzag_h0_barcode,
)

# ----------------------------------------------------------------------------- brute force: zigzag over GF(2)


def _components(n, edges):
    """Component label of every vertex (plain DFS; independent of the library's union-find)."""
    adj = {v: set() for v in range(n)}
    for u, v in edges:
        adj[u].add(v)
        adj[v].add(u)
    label, comps = {}, 0
    for s in range(n):
        if s in label:
            continue
        stack = [s]
        label[s] = comps
        while stack:
            u = stack.pop()
            for w in adj[u]:
                if w not in label:
                    label[w] = comps
                    stack.append(w)
        comps += 1
    return [label[v] for v in range(n)], comps


def _h0_map(n, small, big):
    """GF(2) matrix of H0(small) -> H0(big) for graphs on the same vertices (small ⊆ big)."""
    ls, cs = _components(n, small)
    lb, cb = _components(n, big)
    m = np.zeros((cb, cs), dtype=np.uint8)
    for v in range(n):
        m[lb[v], ls[v]] = 1
    return m


def _reduce_columns(cols, key_order):
    """Column reduction over GF(2) of ``cols`` (list of 0/1 vectors) processed in ``key_order``, adding only earlier
    columns into later ones. Returns (reduced columns, combination of original columns per column, pivots)."""
    k = len(cols)
    red = [c.copy() for c in cols]
    comb = [np.eye(k, dtype=np.uint8)[i] for i in range(k)]
    pivot_of = {}
    for j in key_order:
        while red[j].any():
            low = int(np.nonzero(red[j])[0].max())
            if low not in pivot_of:
                pivot_of[low] = j
                break
            i = pivot_of[low]
            red[j] ^= red[i]
            comb[j] ^= comb[i]
    return red, comb, pivot_of


def _key(birth, born_forward):
    """Order in which generators may absorb each other (see _brute_zigzag): backward-born classes by birth
    descending, then forward-born classes by birth ascending."""
    return (1, birth) if born_forward else (0, -birth)


def _brute_zigzag(mats, dims):
    """Barcode of a zigzag module over GF(2) by a left-to-right reduction.

    ``mats[k]`` is ``("f", M)`` for ``V_k -> V_{k+1}`` or ``("b", M)`` for ``V_k <- V_{k+1}`` (0-based). The state is a
    basis of ``V_k`` (columns) with births; a generator may absorb another (``v_j += v_i``) exactly when a module
    morphism between their interval summands exists, which orders them by :func:`_key`. Forward arrow: reduce the
    images in key order; zero columns end their bars; a complement of the image starts new (forward-born) bars.
    Backward arrow: reduce the image's columns with pivots at the highest key, the pivot generators are replaced by
    the image vectors (allowed: only lower keys are added), the others end; the kernel starts backward-born bars.
    Returns sorted 1-based position bars ``(a, b)``."""
    bars = []
    basis = np.eye(dims[0], dtype=np.uint8)  # columns: coordinates in the standard basis of V_k
    births = [(1, True)] * dims[0]
    for k, (kind, m) in enumerate(mats):
        pos = k + 1
        r = basis.shape[1]
        if kind == "f":
            imgs = [(m.astype(np.int64) @ basis[:, j] % 2).astype(np.uint8) for j in range(r)]
            order = sorted(range(r), key=lambda j: _key(*births[j]))
            red, _, pivot_of = _reduce_columns(imgs, order)
            keep = [j for j in range(r) if red[j].any()]
            for j in range(r):
                if not red[j].any():
                    bars.append((births[j][0], pos))
            new_cols = [red[j] for j in keep]
            new_births = [births[j] for j in keep]
            # complement of the image: standard basis vectors not in the span
            span = [c.copy() for c in new_cols]
            for e in np.eye(dims[k + 1], dtype=np.uint8):
                test = span + [e]
                red2, _, _ = _reduce_columns(test, list(range(len(test))))
                if red2[-1].any():
                    span.append(e)
                    new_cols.append(e)
                    new_births.append((pos + 1, True))
            basis = np.stack(new_cols, axis=1) if new_cols else np.zeros((dims[k + 1], 0), dtype=np.uint8)
            births = new_births
        else:
            # coordinates of the image of V_{k+1}'s standard basis in the current basis of V_k
            d_next = dims[k + 1]
            inv = _gf2_solve(basis, m)  # (r, d_next): m = basis @ inv
            cols = [inv[:, i].copy() for i in range(d_next)]
            # pivot = the highest-key row: rows reordered by key so that "max index" is the highest key
            order_rows = sorted(range(r), key=lambda j: _key(*births[j]))
            perm = np.array(order_rows)
            cols_p = [c[perm] for c in cols]
            red, comb, pivot_of = _reduce_columns(cols_p, list(range(d_next)))
            new_cols, new_births = [], []
            pivots = {perm[low]: j for low, j in pivot_of.items()}
            for row in range(r):
                if row not in pivots:
                    bars.append((births[row][0], pos))
            for row, j in pivots.items():
                new_cols.append(comb[j])  # preimage in V_{k+1} of the new generator (the image vector)
                new_births.append(births[row])
            for j in range(d_next):
                if not red[j].any():
                    new_cols.append(comb[j])  # kernel: born at k + 1 by a backward arrow
                    new_births.append((pos + 1, False))
            basis = np.stack(new_cols, axis=1) if new_cols else np.zeros((d_next, 0), dtype=np.uint8)
            births = new_births
    last = len(mats) + 1
    bars += [(b, last) for b, _ in births]
    return sorted(bars)


def _gf2_solve(a, b):
    """X with a @ X = b over GF(2) (a has independent columns, b's columns in its span)."""
    a, b = a.astype(np.uint8) % 2, b.astype(np.uint8) % 2
    rows, cols = a.shape
    aug = np.concatenate([a, b], axis=1)
    piv_cols, r = [], 0
    for c in range(cols):
        p = next((i for i in range(r, rows) if aug[i, c]), None)
        if p is None:
            continue
        aug[[r, p]] = aug[[p, r]]
        for i in range(rows):
            if i != r and aug[i, c]:
                aug[i] ^= aug[r]
        piv_cols.append(c)
        r += 1
    assert len(piv_cols) == cols, "basis columns must be independent"
    assert not aug[r:, cols:].any(), "image must lie in the span"
    return aug[:cols, cols:]


def _brute_h0_bars(graphs, n):
    """H0 zigzag bars of G_1 ⊆ G_1∪G_2 ⊇ G_2 ... through explicit H0 maps and the GF(2) reduction."""
    spaces, mats = [], []
    w = len(graphs)
    for i in range(w):
        spaces.append([tuple(e) for e in graphs[i]])
        if i < w - 1:
            spaces.append([tuple(e) for e in graphs[i]] + [tuple(e) for e in graphs[i + 1]])
    dims = [_components(n, s)[1] for s in spaces]
    for p in range(len(spaces) - 1):
        if p % 2 == 0:  # G_i -> union
            mats.append(("f", _h0_map(n, spaces[p], spaces[p + 1])))
        else:  # union <- G_{i+1}
            mats.append(("b", _h0_map(n, spaces[p + 1], spaces[p])))
    return _brute_zigzag(mats, dims)


def _random_graphs(rng, n, w, p):
    pairs = list(itertools.combinations(range(n), 2))
    return [np.array([e for e in pairs if rng.random() < p], dtype=np.int64).reshape(-1, 2) for _ in range(w)]


# ----------------------------------------------------------------------------- zigzag


def test_brute_force_reduction_on_a_hand_module():
    """The brute force itself on a module with known bars: K -> K <- 0 (a bar [1, 2]) and 0 -> K <- K ([2, 3])."""
    assert _brute_zigzag([("f", np.ones((1, 1), np.uint8)), ("b", np.zeros((1, 0), np.uint8))], [1, 1, 0]) == \
        [(1, 2)]
    assert _brute_zigzag([("f", np.zeros((1, 0), np.uint8)), ("b", np.ones((1, 1), np.uint8))], [0, 1, 1]) == \
        [(2, 3)]


@pytest.mark.parametrize("n,w,p,trials", [(6, 3, 0.3, 60), (6, 3, 0.15, 60), (5, 4, 0.25, 40), (7, 5, 0.2, 15)])
def test_h0_zigzag_matches_gf2_zigzag_reduction(n, w, p, trials):
    rng = np.random.default_rng(n * 100 + w)
    for _ in range(trials):
        graphs = _random_graphs(rng, n, w, p)
        fast = [tuple(b) for b in zigzag_h0_barcode(graphs, n, positions=True).tolist()]
        assert sorted(fast) == _brute_h0_bars(graphs, n), graphs


def test_constant_graph_gives_its_components_as_full_bars():
    g = np.array([[0, 1], [1, 2], [3, 4]])  # 6 vertices: {0,1,2}, {3,4}, {5}
    bars = zigzag_h0_barcode([g] * 4, num_nodes=6)
    assert bars.tolist() == [[0.5, 4.0]] * 3


def test_edgeless_graphs_give_one_full_bar_per_vertex():
    bars = zigzag_h0_barcode([np.zeros((0, 2), dtype=int)] * 3, num_nodes=5)
    assert bars.tolist() == [[0.5, 3.0]] * 5


def test_components_merging_only_in_a_union_end_a_bar_there():
    # G1 has edge 0-1 only, G2 edge 1-2 only: {0,1} and {2} at G1 merge in the union G1∪G2 (position 2)
    g1, g2 = np.array([[0, 1]]), np.array([[1, 2]])
    bars = zigzag_h0_barcode([g1, g2], num_nodes=3, positions=True).tolist()
    assert sorted(bars) == [[1, 1], [1, 3], [3, 3]]  # {2}'s class dies entering the union; {0}'s is born leaving it


def test_weighted_edges_above_alpha_are_dropped():
    g = np.array([[0, 1, 0.2], [1, 2, 0.9]])
    assert len(zigzag_h0_barcode([g], 3, alpha=0.5)) == 2
    assert len(zigzag_h0_barcode([g], 3, alpha=1.0)) == 1


@pytest.mark.parametrize("graphs,match", [([np.array([[0, 7]])], "outside"), ([np.array([[0.5, 1]])], "integers"),
                                          ([np.array([[0, 1, 2, 3]])], "edge list"),
                                          ([np.array([[0, np.nan]])], "NaN"), ([], "at least one")])
def test_bad_graphs_are_refused_in_one_line(graphs, match):
    with pytest.raises(ValueError, match=match) as err:
        zigzag_h0_barcode(graphs, num_nodes=3)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- persistence image


def _image_by_loops(bars, p, bandwidth, power):
    """The image formula evaluated pixel by pixel (row i: y_i over the deaths, column j: x_j over the births)."""
    xs = np.linspace(bars[:, 0].min(), bars[:, 0].max(), p)
    ys = np.linspace(bars[:, 1].min(), bars[:, 1].max(), p)
    img = np.zeros((p, p))
    for i in range(p):
        for j in range(p):
            img[i, j] = sum(abs(d - b) ** power * np.exp(-((xs[j] - b) ** 2 + (ys[i] - d) ** 2) / bandwidth)
                            for b, d in bars)
    return (img - img.min()) / (img.max() - img.min())


def test_persistence_image_equals_the_formula_pixel_by_pixel():
    bars = np.array([[0.5, 3.0], [1.0, 2.5], [2.0, 2.5], [0.5, 1.5]])
    got = persistence_image(bars, resolution=9, bandwidth=0.7, power=1.5)
    np.testing.assert_allclose(got, _image_by_loops(bars, 9, 0.7, 1.5), rtol=1e-5, atol=1e-6)


def test_persistence_image_properties():
    bars = np.array([[0.5, 4.0], [0.5, 4.0], [2.0, 2.5]])
    img = persistence_image(bars, resolution=20)
    assert img.shape == (20, 20) and img.dtype == np.float32
    assert img.min() == 0.0 and img.max() == pytest.approx(1.0)
    i, j = np.unravel_index(img.argmax(), img.shape)  # the heavy repeated bar is at x = min birth, y = max death
    assert (i, j) == (19, 0)
    assert not persistence_image(np.array([[0.5, 2.0]] * 3), 10).any()  # identical points: zeros, not NaN
    assert not persistence_image(np.zeros((0, 2)), 10).any()


def test_zpi_of_different_windows_differ_and_is_deterministic():
    rng = np.random.default_rng(0)
    zpi = ZigzagPersistenceImage(resolution=32)
    a, b = _random_graphs(rng, 8, 4, 0.2), _random_graphs(rng, 8, 4, 0.4)
    assert np.array_equal(zpi(a, 8), zpi(a, 8))
    assert not np.allclose(zpi(a, 8), zpi(b, 8))


@pytest.mark.parametrize("kw", [{"alpha": 0}, {"alpha": float("nan")}, {"resolution": 1}, {"bandwidth": -1},
                                {"power": float("inf")}, {"homology_dim": 1}])
def test_zpi_bad_arguments(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        ZigzagPersistenceImage(**kw)


def test_feature_distance_graphs_drop_far_edges():
    x = np.array([[[0.0], [0.1], [1.0]]])  # one step, three nodes
    (g,) = feature_distance_graphs(x, np.array([[0, 1], [1, 2]]))
    np.testing.assert_allclose(g[:, 2], [0.1 / 0.9, 1.0])
    assert len(zigzag_h0_barcode([g], 3, alpha=0.3)) == 2


# ----------------------------------------------------------------------------- data


def _token_folder(root, days=40, n=6, seed=0, name="Decentraland"):
    """A small folder in the reference's layout: degrees equal each day's edge-list degrees."""
    rng = np.random.default_rng(seed)
    edge_dir = root / "token_networks" / name / "EdgeList_W"
    edge_dir.mkdir(parents=True)
    (root / "token_data").mkdir()
    feats = np.zeros((days, n, 1), dtype=np.float32)
    for d in range(days):
        graph = _random_graphs(rng, n, 1, 0.3)[0]
        rows = [f"{u + 1} {v + 1} {rng.uniform(0.01, 1):.4f}" for u, v in graph]
        for u, v in graph:
            feats[d, u, 0] += 1
            feats[d, v, 0] += 1
        (edge_dir / (f"W_decentraland_{d + 1}.txt" if name == "Decentraland" else f"W_{name}{d + 1}.txt")).write_text(
            "\n".join(rows) + ("\n" if rows else ""))
    np.savez(root / "token_data" / f"{name}_node_features.npz", feats)
    return feats


def _dm(root, cache, **kw):
    args = dict(root=str(root), lag=3, horizon=2, resolution=32, batch_size=4, cache_dir=str(cache))
    args.update(kw)
    dm = GraphTimeSeriesDataModule(**args)
    dm.setup("fit")
    return dm


def test_loader_reads_degrees_and_zero_based_edges(tmp_path):
    feats = _token_folder(tmp_path)
    series, graphs = load_token_network("Decentraland", str(tmp_path))
    assert series.shape == (40, 6, 1) and len(graphs) == 40
    for d in (0, 17, 39):
        deg = np.bincount(graphs[d][:, :2].astype(int).ravel(), minlength=6)
        np.testing.assert_array_equal(deg, feats[d, :, 0])


def test_datamodule_splits_windows_scaler_and_images(tmp_path):
    feats = _token_folder(tmp_path)
    dm = _dm(tmp_path, tmp_path / "cache")
    assert dm.bounds == {"train": (0, 24), "val": (24, 32), "test": (32, 40)}
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 20, "val": 4, "test": 4}
    assert dm.scaler == pytest.approx((float(feats[:24].mean()), float(feats[:24].std())))
    b = next(iter(dm.test_dataloader()))
    assert b["x"].shape == (4, 3, 6, 1) and b["y"].shape == (4, 2, 6, 1) and b["zpi"].shape == (4, 1, 32, 32)
    # the first test window: days 32..34 in, 35..36 out; its image is the zigzag of days 32..34's graphs
    np.testing.assert_allclose(b["x"][0].numpy() * dm.scaler[1] + dm.scaler[0], feats[32:35], atol=1e-5)
    np.testing.assert_array_equal(b["y"][0].numpy(), feats[35:37])
    _, graphs = load_token_network("Decentraland", str(tmp_path))
    want = ZigzagPersistenceImage(resolution=32)(graphs[32:35], 6)
    np.testing.assert_allclose(b["zpi"][0, 0].numpy(), want)


def test_shuffled_images_are_a_permutation_within_each_split_and_none_has_no_key(tmp_path):
    _token_folder(tmp_path)
    real = _dm(tmp_path, tmp_path / "cache")
    shuf = _dm(tmp_path, tmp_path / "cache", zpi_mode="shuffled", zpi_seed=3)
    for split in ("train", "val", "test"):
        a, b = real.splits[split].zpi.flatten(1), shuf.splits[split].zpi.flatten(1)
        assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))
        assert torch.equal(real.splits[split].x, shuf.splits[split].x)
    assert not torch.equal(real.splits["train"].zpi, shuf.splits["train"].zpi)
    none = _dm(tmp_path, tmp_path / "cache", zpi_mode="none")
    assert "zpi" not in none.splits["train"][0]


def test_image_cache_is_reused_and_a_damaged_file_recomputed(tmp_path, monkeypatch):
    _token_folder(tmp_path)
    cache = tmp_path / "cache"
    first = _dm(tmp_path, cache)
    (path,) = list(cache.glob("*.npz"))
    calls = []
    monkeypatch.setattr(ZigzagPersistenceImage, "__call__", lambda self, g, n: calls.append(1) or np.zeros((32, 32)))
    again = _dm(tmp_path, cache)
    assert calls == [] and torch.equal(first.splits["train"].zpi, again.splits["train"].zpi)
    path.write_bytes(b"truncated")
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="recomputing"):
        fixed = _dm(tmp_path, cache)
    assert torch.equal(first.splits["train"].zpi, fixed.splits["train"].zpi)
    # a relative cache_dir lies under the documented cache root
    monkeypatch.setenv("LIGHTNING_EXT_CACHE", str(tmp_path / "root"))
    _dm(tmp_path, "zpi")
    assert list((tmp_path / "root" / "GraphTimeSeriesDataModule" / "zpi").glob("*.npz"))


@pytest.mark.parametrize("kw,match", [({"val_ratio": 0.5, "test_ratio": 0.5}, "val_ratio"),
                                      ({"lag": 0}, "lag"), ({"zpi_mode": "fake"}, "zpi_mode"),
                                      ({"source": "Tether"}, "source"), ({"cache_dir": ""}, "cache_dir"),
                                      ({"shuffle": "yes"}, "shuffle"), ({"alpha": float("nan")}, "alpha")])
def test_datamodule_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        GraphTimeSeriesDataModule(**kw)
    assert "\n" not in str(err.value)


def test_datamodule_bad_data_in_setup(tmp_path):
    with pytest.raises(FileNotFoundError, match="root"):
        GraphTimeSeriesDataModule(root=str(tmp_path)).setup("fit")
    _token_folder(tmp_path)
    with pytest.raises(ValueError, match="lag"):
        _dm(tmp_path, None, lag=6, horizon=3)  # 8 test days < 9


# ----------------------------------------------------------------------------- model, loss, metrics


def test_model_shapes_and_the_channel_matters():
    torch.manual_seed(0)
    net = ZGCNNet(num_nodes=6, window_len=3, horizon=2, rnn_units=8, embed_dim=4, resolution=32)
    x, z = torch.randn(5, 3, 6, 1), torch.rand(5, 1, 32, 32)
    out = net(x, z)
    assert out.shape == (5, 2, 6, 1)
    assert not torch.allclose(out, net(x, torch.rand(5, 1, 32, 32)))
    plain = ZGCNNet(num_nodes=6, window_len=3, horizon=2, rnn_units=8, embed_dim=4, use_zpi=False)
    assert plain(x).shape == (5, 2, 6, 1)
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in net.parameters())
    with pytest.raises(ValueError, match="zpi"):
        net(x, None)
    with pytest.raises(ValueError, match="x must be"):
        net(torch.randn(5, 4, 6, 1), z)


def test_window_branch_equals_the_reference_per_step_formula():
    """X_W = Σ_τ T_τ X[τ] W'_n, spatial part Σ_k S_k x W_{n,k}, both ⊙ ξ, plus E b_pool (reference TFLSGCNCNN)."""
    from lightning_ext.graph.zgcnets import TimeAwareGraphConv

    torch.manual_seed(1)
    layer = TimeAwareGraphConv(5, 8, 3, 4, 3, 6)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, xw, emb, z = torch.randn(2, 7, 5), torch.randn(2, 4, 7, 3), torch.randn(7, 6), torch.rand(2, 1, 40, 40)
    got = layer(x, layer.prepare(xw, emb, z))
    s = torch.softmax(torch.relu(emb @ emb.t()), 1)
    supports = torch.stack([torch.eye(7), s, s @ s])
    w = torch.einsum("nd,dkio->nkio", emb, layer.weights_pool)
    xi = layer.cnn(z)
    xg = torch.stack([sum(supports[k] @ x[b] @ w[:, k][n] for k in range(3))[n] for b in range(2)
                      for n in range(7)]).reshape(2, 7, 4)
    ww = torch.einsum("nd,dio->nio", emb, layer.weights_window)
    xwin = torch.stack([sum(layer.T[t] * xw[b, t, n] @ ww[n] for t in range(4)) for b in range(2)
                        for n in range(7)]).reshape(2, 7, 4)
    want = torch.cat([xg * xi[:, None], xwin * xi[:, None]], -1) + emb @ layer.bias_pool
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_metrics_and_loss_equal_an_independent_computation():
    torch.manual_seed(2)
    pred, true = torch.randn(4, 2, 6, 1), torch.randint(0, 4, (4, 2, 6, 1)).float()
    m = forecast_metrics(pred, true)
    p, t = pred.numpy().ravel(), true.numpy().ravel()
    assert float(m["mae"]) == pytest.approx(np.abs(p - t).mean(), rel=1e-6)
    assert float(m["rmse"]) == pytest.approx(np.sqrt(((p - t) ** 2).mean()), rel=1e-6)
    pos = t > 0
    assert float(m["mape"]) == pytest.approx(100 * (np.abs(p - t)[pos] / t[pos]).mean(), rel=1e-5)
    model = ZGCNETs(num_nodes=6, window_len=3, horizon=2, rnn_units=8, resolution=32)
    model.scale_mean.fill_(0.7)
    model.scale_std.fill_(2.0)
    batch = {"x": torch.randn(4, 3, 6, 1), "y": true, "zpi": torch.rand(4, 1, 32, 32)}
    loss = model.training_step(batch, 0)
    raw = model.net(batch["x"], batch["zpi"]).detach().numpy().ravel() * 2.0 + 0.7  # de-normalised (real_value)
    assert float(loss) == pytest.approx(np.abs(raw - t).mean(), rel=1e-5)


@pytest.mark.parametrize("kw,match", [({"rnn_units": 7}, "rnn_units"), ({"resolution": 20}, "resolution"),
                                      ({"link_len": 1}, "link_len"), ({"lr": float("nan")}, "lr"),
                                      ({"use_zpi": "yes"}, "use_zpi"), ({"loss": "huber"}, "loss")])
def test_model_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        ZGCNETs(**kw)
    assert "\n" not in str(err.value)


def _trainer(tmp_path, **kw):
    from lightning.pytorch import Trainer

    args = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    args.update(kw)
    return Trainer(**args)


def test_fit_takes_the_scaler_and_refuses_a_mismatched_channel(tmp_path):
    torch.manual_seed(0)
    _token_folder(tmp_path)
    dm = GraphTimeSeriesDataModule(root=str(tmp_path), lag=3, horizon=2, resolution=32, batch_size=4,
                                   cache_dir=None)
    model = ZGCNETs(num_nodes=6, window_len=3, horizon=2, rnn_units=8, resolution=32, lr=0.01)
    trainer = _trainer(tmp_path, max_epochs=4)
    trainer.fit(model, datamodule=dm)
    assert float(model.scale_mean) == pytest.approx(dm.scaler[0]) and float(model.scale_std) == pytest.approx(
        dm.scaler[1])
    res = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert {"test_mae", "test_rmse", "test_mae_h1", "test_mae_h2"} <= set(res)
    none = GraphTimeSeriesDataModule(root=str(tmp_path), lag=3, horizon=2, zpi_mode="none", cache_dir=None)
    with pytest.raises(ValueError, match="use_zpi"):
        _trainer(tmp_path).fit(ZGCNETs(num_nodes=6, window_len=3, horizon=2, rnn_units=8, resolution=32),
                               datamodule=none)
    with pytest.raises(ValueError, match="window_len"):
        _trainer(tmp_path).fit(ZGCNETs(num_nodes=6, window_len=4, horizon=2, rnn_units=8, resolution=32),
                               datamodule=dm)


def test_mid_epoch_crash_and_resume_ends_with_the_same_parameters(tmp_path):
    from lightning_ext.testing import assert_same_parameters, crash_and_resume

    _token_folder(tmp_path / "data")

    def make_model():
        torch.manual_seed(0)
        return ZGCNETs(num_nodes=6, window_len=3, horizon=2, rnn_units=8, resolution=32, lr=0.01)

    def make_dm():
        return GraphTimeSeriesDataModule(root=str(tmp_path / "data"), lag=3, horizon=2, resolution=32,
                                         batch_size=4, cache_dir=str(tmp_path / "cache"), shuffle_seed=1)

    full, resumed, info = crash_and_resume(make_model, make_dm, list, max_epochs=2, crash_step=7,
                                           tmp_path=tmp_path, weights_only=True, limit_val_batches=0)
    assert info["resumed_from_step"] == 7
    assert_same_parameters(full, resumed)
