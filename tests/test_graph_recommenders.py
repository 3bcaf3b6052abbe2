"""Graph collaborative filtering: interactions DataModules, full-ranking metrics, sparse ops and the five models."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_ext.recsys.interactions import (
    BPRBatchSampler,
    InteractionDataModule,
    InteractionFileDataModule,
    Interactions,
    per_user_split,
    read_user_items_file,
)
from lightning_ext.recsys.metrics import RankingMetrics, topk_ranking
from lightning_ext.recsys.dccf import DCCF, adaptive_edge_values
from lightning_ext.recsys.lightgcl import LightGCL
from lightning_ext.recsys.lightgcn import LightGCN
from lightning_ext.recsys.mf_bpr import MFBPR
from lightning_ext.recsys.ultragcn import UltraGCN, item_item_constraints, ultragcn_betas
from lightning_ext.recsys.graph import SparseGraph, bipartite_graph, spmm, symmetric_norm_values

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

LASTFM = SHARED / "data" / "lastfm"
needs_lastfm = pytest.mark.skipif(not LASTFM.is_dir() and not os.environ.get("CI"), reason="../shared/data/lastfm missing")


pytestmark = pytest.mark.usefixtures("one_thread")


def low_rank_pairs(num_users=120, num_items=150, per_user=12, seed=0) -> np.ndarray:
    """Implicit feedback from a rank-4 model with popularity bias: each user's top `per_user` items (noisy)."""
    rng = np.random.default_rng(seed)
    p, q = rng.normal(size=(num_users, 4)), rng.normal(size=(num_items, 4))
    bias = rng.normal(scale=0.5, size=num_items)
    logits = p @ q.T + bias + rng.gumbel(size=(num_users, num_items)) * 0.5
    items = np.argsort(-logits, axis=1)[:, :per_user]
    return np.stack([np.repeat(np.arange(num_users), per_user), items.ravel()], 1)


class SyntheticInteractions(InteractionDataModule):
    protocol = "synthetic rank-4 (per-user random 75/25)"

    def __init__(self, num_users=120, num_items=150, **kwargs):
        super().__init__(**kwargs)
        self.num_users, self.num_items = num_users, num_items

    def load_splits(self):
        train, test = per_user_split(low_rank_pairs(self.num_users, self.num_items), 0.25, seed=7)
        return train, test, self.num_users, self.num_items


# -- sparse graph ops -----------------------------------------------------------------------------------------


def test_spmm_matches_dense_and_its_gradients_are_right():
    g = SparseGraph([0, 1, 1, 2, 2, 0], [1, 0, 3, 3, 2, 1], (3, 4))  # a duplicate edge is merged
    assert g.num_edges == 5
    values = torch.rand(5, dtype=torch.float64, requires_grad=True)
    x = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    dense = torch.zeros(3, 4, dtype=torch.float64)
    dense[g.row, g.col] = values.detach()
    torch.testing.assert_close(spmm(g, values, x), dense @ x)
    assert torch.autograd.gradcheck(lambda v, x: spmm(g, v, x), (values, x))


def test_symmetric_normalisation_is_lightgcn_a_hat():
    g = bipartite_graph([0, 0, 1], [0, 1, 1], 2, 2)
    a = torch.zeros(4, 4)
    a[g.row, g.col] = 1
    d = a.sum(1).pow(-0.5)
    expected = d[:, None] * a * d[None, :]
    got = torch.zeros(4, 4)
    got[g.row, g.col] = symmetric_norm_values(g)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="outside"):
        SparseGraph([0, 5], [0, 0], (2, 2))


def test_lightgcn_propagation_is_the_mean_of_a_hat_powers():
    data = Interactions(4, 5, low_rank_pairs(4, 5, per_user=2), np.zeros((0, 2), int), np.zeros((0, 2), int))
    model = LightGCN(num_layers=3, embedding_dim=6).bind(data)
    g = model.graph
    a = torch.zeros(9, 9)
    a[g.row, g.col] = model.norm_values
    e0 = torch.cat([model.user_embedding.weight, model.item_embedding.weight]).detach()
    expected = sum(torch.linalg.matrix_power(a, k) @ e0 for k in range(4)) / 4
    users, items = model.propagate()
    torch.testing.assert_close(torch.cat([users, items]).detach(), expected, atol=1e-5, rtol=1e-5)


# -- data ---------------------------------------------------------------------------------------------------


def test_per_user_split_holds_out_a_share_of_every_user_and_keeps_one():
    pairs = low_rank_pairs(50, 80, per_user=10)
    pairs = np.concatenate([pairs, [[50, 3]]])  # a user with a single interaction keeps it
    kept, held = per_user_split(pairs, 0.2, seed=3)
    assert len(kept) + len(held) == len(pairs)
    assert not set(map(tuple, kept)) & set(map(tuple, held))
    assert (np.bincount(held[:, 0], minlength=51)[:50] == 2).all()
    assert 50 in kept[:, 0] and 50 not in held[:, 0]
    kept2, held2 = per_user_split(pairs, 0.2, seed=3)
    np.testing.assert_array_equal(held, held2)
    assert not np.array_equal(per_user_split(pairs, 0.2, seed=4)[1], held)


def test_bpr_sampler_draws_true_negatives_reproducibly_and_shards_under_ddp():
    pairs = low_rank_pairs(30, 20, per_user=15)  # dense: 75% of items are positives
    sampler = BPRBatchSampler(pairs, 20, batch_size=64, seed=1)
    sampler.set_epoch(0)
    batches = list(sampler)
    triples = torch.cat(batches).numpy()
    assert len(triples) == len(pairs) and all(b.shape[1] == 3 for b in batches)
    positives = set(map(tuple, pairs))
    assert all((u, j) not in positives for u, _, j in triples)
    assert set(map(tuple, triples[:, :2])) == positives  # every interaction once per epoch
    again = torch.cat(list(sampler)).numpy()
    np.testing.assert_array_equal(triples, again)
    sampler.set_epoch(1)
    assert not np.array_equal(torch.cat(list(sampler)).numpy(), triples)
    shards = [BPRBatchSampler(pairs, 20, 64, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    for s in shards:
        s.set_epoch(0)
    rank_batches = [list(s) for s in shards]
    assert len(rank_batches[0]) == len(rank_batches[1]) == len(shards[0])
    torch.testing.assert_close(rank_batches[0][0], batches[0])
    torch.testing.assert_close(rank_batches[1][0], batches[1])


def test_eval_batches_mask_the_right_known_items():
    dm = SyntheticInteractions(val_fraction=0.2, eval_batch_size=32)
    dm.setup()
    data = dm.interactions
    train, val, test = (set(map(tuple, p)) for p in (data.train, data.val, data.test))
    assert not train & val and not train & test and not val & test
    for loader, target, known in ((dm.val_dataloader(), val, train), (dm.test_dataloader(), test, train | val)):
        got_target, got_known = set(), set()
        for batch in loader:
            users = batch["users"].numpy()
            assert len(users) <= 32
            got_target |= {(users[r], i) for r, i in batch["target"].T.tolist()}
            got_known |= {(users[r], i) for r, i in batch["exclude"].T.tolist()}
        assert got_target == target
        assert got_known == {p for p in known if p[0] in {u for u, _ in target}}
    assert "split_seed=0" in dm.name and "synthetic" in dm.name


def test_interaction_file_datamodule_reads_the_lightgcn_format(tmp_path):
    (tmp_path / "train.txt").write_text("0 1 2 3\n1 0 2\n2 4\n")
    (tmp_path / "test.txt").write_text("0 4\n1 3\n")
    dm = InteractionFileDataModule(str(tmp_path / "train.txt"), str(tmp_path / "test.txt"), val_fraction=0,
                                   split_name="toy")
    dm.setup()
    assert dm.interactions.stats() == {"users": 3, "items": 5, "train": 6, "val": 0, "test": 2}
    assert dm.name.startswith("toy")
    with pytest.raises(RuntimeError, match="val_fraction"):
        dm.val_dataloader()
    (tmp_path / "bad.txt").write_text("0 1 x\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_user_items_file(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InteractionFileDataModule(str(tmp_path / "missing.txt"))
    (tmp_path / "overlap.txt").write_text("0 1\n")
    with pytest.raises(ValueError, match="also training"):
        InteractionFileDataModule(str(tmp_path / "train.txt"), str(tmp_path / "overlap.txt")).setup()


@needs_lastfm
def test_lastfm_is_the_lightgcn_split():
    from lightning_ext.recsys.lastfm import LastFMDataModule

    dm = LastFMDataModule(root=str(LASTFM), val_fraction=0.1)
    dm.setup()
    s = dm.interactions.stats()
    assert (s["users"], s["items"], s["test"]) == (1892, 4489, 10533)
    assert s["train"] + s["val"] == 42135
    assert "LightGCN split" in dm.name
    with pytest.raises(FileNotFoundError, match="LightGCN-PyTorch"):
        LastFMDataModule(root=str(Path("/nonexistent")))


def test_movielens100k_implicit_rule_and_per_user_split():
    from lightning_ext.recsys.movielens100k import MovieLens100KDataModule, find_ml100k_inter

    raw = np.loadtxt(find_ml100k_inter(), skiprows=1)
    dm = MovieLens100KDataModule(min_rating=4, val_fraction=0)
    dm.setup()
    data = dm.interactions
    assert (data.num_users, data.num_items) == (943, 1682)
    assert len(data.train) + len(data.test) == int((raw[:, 2] >= 4).sum())
    per_user = np.bincount(data.test[:, 0], minlength=943) / np.maximum(
        np.bincount(np.concatenate([data.train, data.test])[:, 0], minlength=943), 1)
    assert abs(np.median(per_user[per_user > 0]) - 0.2) < 0.03
    assert "rating >= 4" in dm.name and "per-user random" in dm.name
    temporal = MovieLens100KDataModule(split="temporal", val_fraction=0)
    temporal.setup()
    assert len(temporal.interactions.test) == len(data.test)
    with pytest.raises(ValueError, match="min_rating"):
        MovieLens100KDataModule(min_rating=6)


# -- metrics ------------------------------------------------------------------------------------------------


def _reference_metrics(scores, truth, known, k):
    recall, ndcg = [], []
    for s, t, m in zip(scores, truth, known):
        if not t:
            continue
        s = s.copy()
        s[list(m)] = -np.inf
        top = np.argsort(-s, kind="stable")[:k]
        hits = [int(i in t) for i in top]
        recall.append(sum(hits) / len(t))
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(t))))
        ndcg.append(dcg / idcg)
    return np.mean(recall), np.mean(ndcg)


def test_ranking_metrics_match_a_brute_force_reference_and_are_batch_invariant():
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 60
    scores = rng.normal(size=(n_users, n_items)).astype(np.float32)
    truth = [set(rng.choice(n_items, size=rng.integers(0, 6), replace=False).tolist()) for _ in range(n_users)]
    known = [set(rng.choice(n_items, size=8, replace=False).tolist()) - t for t in truth]
    # a known item with the highest score must never count
    for u in range(n_users):
        for i in known[u]:
            scores[u, i] += 10

    def pairs(sets, rows):
        return torch.tensor([[r, i] for r, u in enumerate(rows) for i in sorted(sets[u])], dtype=torch.long).reshape(-1, 2).T

    full = RankingMetrics(ks=(5, 20))
    full.update(torch.tensor(scores), pairs(truth, range(n_users)), pairs(known, range(n_users)))
    batched = RankingMetrics(ks=(5, 20))
    for start in range(0, n_users, 16):
        rows = range(start, min(start + 16, n_users))
        batched.update(torch.tensor(scores[start:start + 16]), pairs(truth, rows), pairs(known, rows))
    a, b = full.compute(), batched.compute()
    for k in (5, 20):
        rec, ndcg = _reference_metrics(scores, truth, known, k)
        assert float(a[f"recall@{k}"]) == pytest.approx(rec, abs=1e-6)
        assert float(a[f"ndcg@{k}"]) == pytest.approx(ndcg, abs=1e-6)
        assert float(b[f"recall@{k}"]) == pytest.approx(rec, abs=1e-6)
    recall, _, valid = topk_ranking(torch.zeros(2, 3), torch.tensor([[1], [0]]), None, ks=(2,))
    assert valid.tolist() == [False, True]
    # duplicate target pairs count once; copy=False masks the caller's tensor in place
    s = torch.tensor([[3.0, 2.0, 1.0]])
    dup = topk_ranking(s, torch.tensor([[0, 0], [1, 1]]), torch.tensor([[0], [0]]), ks=(1,), copy=False)
    assert dup[0].item() == 1.0 and s[0, 0] == float("-inf")


# -- models -------------------------------------------------------------------------------------------------

SMALL = dict(embedding_dim=16, eval_ks=(10, 20))
MODELS = {
    "mf": lambda: MFBPR(lr=0.02, **SMALL),
    "lightgcn": lambda: LightGCN(num_layers=2, lr=0.02, **SMALL),
    "ultragcn": lambda: UltraGCN(negative_num=20, negative_weight=20, lr=0.02, init_std=0.1, **SMALL),
    "lightgcl": lambda: LightGCL(rank=3, lr=0.02, **SMALL),
    "dccf": lambda: DCCF(num_intents=8, lr=0.02, **SMALL),
}


def _fit(model, epochs=8, **trainer_kwargs):
    dm = SyntheticInteractions(batch_size=256, val_fraction=0.1)
    trainer = Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=epochs,
                      **trainer_kwargs)
    trainer.fit(model, datamodule=dm)
    return trainer, dm


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_learns_far_better_than_chance(name):
    seed_everything(0)
    trainer, dm = _fit(MODELS[name]())
    recall = float(trainer.callback_metrics["val_recall@20"])
    chance = 20 / 150
    assert recall > 2.5 * chance, (name, recall)
    test = trainer.test(trainer.lightning_module, datamodule=dm, verbose=False)[0]
    assert set(test) == {"test_recall@10", "test_ndcg@10", "test_recall@20", "test_ndcg@20"}


def test_lightgcn_beats_mf_on_synthetic_data_and_checkpoints_restore(tmp_path):
    results = {}
    for name in ("mf", "lightgcn"):
        seed_everything(0)
        trainer, dm = _fit(MODELS[name](), epochs=10)
        results[name] = float(trainer.callback_metrics["val_recall@20"])
    assert results["lightgcn"] > results["mf"], results
    trainer.save_checkpoint(tmp_path / "lightgcn.ckpt")
    restored = LightGCN.load_from_checkpoint(tmp_path / "lightgcn.ckpt").bind(dm.interactions)
    model = trainer.lightning_module
    torch.testing.assert_close(restored.propagate()[0], model.propagate()[0])
    with pytest.raises(ValueError, match="num_users"):
        LightGCN(num_users=3, num_items=4).bind(dm.interactions)


def test_ultragcn_constraint_weights_follow_the_official_formulas():
    train = np.array([[0, 0], [0, 1], [1, 1], [1, 2], [2, 1], [2, 2], [2, 3]])
    beta_u, beta_i = ultragcn_betas(train, 3, 4)
    d_u, d_i = np.array([2, 2, 3]), np.array([1, 3, 2, 1])
    expected = (1 / d_u[:, None]) * np.sqrt((d_u[:, None] + 1) / (d_i[None, :] + 1))
    np.testing.assert_allclose((beta_u[:, None] * beta_i[None, :]).numpy(), expected, rtol=1e-6)
    neighbors, weights = item_item_constraints(train, 3, 4, num_neighbors=2)
    r = np.zeros((3, 4))
    r[train[:, 0], train[:, 1]] = 1
    g = r.T @ r
    gs = g.sum(1)
    omega = g * (np.sqrt(gs + 1) / gs)[:, None] / np.sqrt(gs + 1)[None, :]
    for i in range(4):
        np.testing.assert_allclose(weights[i].numpy(), np.sort(omega[i])[::-1][:2], rtol=1e-5)
        np.testing.assert_allclose(omega[i, neighbors[i].numpy()], weights[i].numpy(), rtol=1e-5)
    _, w0 = item_item_constraints(train, 3, 4, num_neighbors=4, zero_diagonal=True)
    assert w0[0].tolist().count(0.0) >= 2  # item 0 co-occurs only with item 1 once its diagonal is gone


def test_lightgcl_svd_view_and_contrastive_switch():
    data = Interactions(30, 25, low_rank_pairs(30, 25, per_user=6), np.zeros((0, 2), int), np.zeros((0, 2), int))
    seed_everything(0)
    model = LightGCL(rank=25, embedding_dim=8).bind(data)
    a_hat = torch.zeros(30, 25)
    g = model.graph
    block = g.row < 30
    a_hat[g.row[block], g.col[block] - 30] = model.norm_values[block]
    torch.testing.assert_close(model.u_mul_s @ model.vt, a_hat, atol=1e-4, rtol=1e-4)  # full rank: exact
    users, pos, neg = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
    assert float(model.training_loss(users, pos, neg)["cl"]) != 0
    off = LightGCL(rank=3, embedding_dim=8, cl_weight=0).bind(data)
    assert float(off.training_loss(users, pos, neg)["cl"]) == 0


def test_dccf_adaptive_weights_are_row_stochastic_and_ablations_drop_views():
    data = Interactions(20, 15, low_rank_pairs(20, 15, per_user=5), np.zeros((0, 2), int), np.zeros((0, 2), int))
    model = DCCF(num_intents=4, embedding_dim=8).bind(data)
    x = torch.randn(35, 8)
    values = adaptive_edge_values(model.graph, x)
    row_sums = torch.zeros(35).index_add_(0, model.graph.row, values)
    torch.testing.assert_close(row_sums[model.graph.degree(1) > 0], torch.ones(35)[model.graph.degree(1) > 0])
    _, views = model._layers()
    assert set(views[0]) == {"z", "r", "h_beta", "h_gamma"}
    no_aug = DCCF(num_intents=4, embedding_dim=8, adaptive_augmentation=False).bind(data)
    assert set(no_aug._layers()[1][0]) == {"z", "r"}
    one = DCCF(num_intents=1, embedding_dim=8).bind(data)
    r = one._layers()[1][0]["r"]
    torch.testing.assert_close(r[:20], r[:1].expand(20, -1))  # one intent: every user gets the same prototype
    loss = model.training_loss(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]))
    loss["loss"].backward()
    assert model.user_intent.grad is not None and model.user_intent.grad.abs().sum() > 0


def test_model_without_interaction_data_says_what_to_pass():
    from torch.utils.data import DataLoader

    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(RuntimeError, match="InteractionDataModule"):
        trainer.fit(LightGCN(), train_dataloaders=DataLoader([torch.zeros(3, dtype=torch.long)]))


# -- house rules: validation, the shared sampler ----------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
COMMON_BAD = [({"embedding_dim": 0}, "embedding_dim"), ({"lr": NAN}, "lr"), ({"lr": 0.0}, "lr"),
              ({"init": "kaiming"}, "init"), ({"init_std": INF}, "init_std"), ({"eval_ks": ()}, "eval_ks"),
              ({"eval_ks": (10, 0)}, "eval_ks"), ({"num_users": 3}, "num_items"), ({"num_items": 4}, "num_users"),
              ({"num_users": 0, "num_items": 4}, "num_users")]
MODEL_BAD = {
    LightGCN: [({"num_layers": -1}, "num_layers"), ({"num_layers": 1.5}, "num_layers"), ({"reg_weight": NAN}, "reg_weight"),
               ({"reg_weight": -1e-4}, "reg_weight")],
    MFBPR: [({"reg_weight": INF}, "reg_weight")],
    UltraGCN: [({"w1": -1e-6}, "w1"), ({"w2": NAN}, "w2"), ({"w3": INF}, "w3"), ({"w4": -1.0}, "w4"),
               ({"negative_num": 0}, "negative_num"), ({"negative_weight": NAN}, "negative_weight"),
               ({"l2_weight": -1.0}, "l2_weight"), ({"item_item_weight": INF}, "item_item_weight"),
               ({"num_neighbors": 0}, "num_neighbors")],
    LightGCL: [({"num_layers": 0}, "num_layers"), ({"rank": 0}, "rank"), ({"temperature": 0.0}, "temperature"),
               ({"temperature": NAN}, "temperature"), ({"cl_weight": NAN}, "cl_weight"), ({"l2_weight": -1.0}, "l2_weight")],
    DCCF: [({"num_layers": 0}, "num_layers"), ({"num_intents": 0}, "num_intents"), ({"temperature": -1.0}, "temperature"),
           ({"cl_weight": NAN}, "cl_weight"), ({"emb_weight": -1.0}, "emb_weight"), ({"cen_weight": INF}, "cen_weight")],
}


@pytest.mark.parametrize("cls, kwargs, name", [(cls, kw, name) for cls, rows in MODEL_BAD.items()
                                               for kw, name in rows + COMMON_BAD])
def test_models_refuse_bad_values_with_one_line_naming_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name) as err:
        cls(**kwargs)
    assert "\n" not in str(err.value)


def test_datamodules_metrics_and_sampler_refuse_bad_values(tmp_path):
    from lightning_ext.recsys.movielens100k import MovieLens100KDataModule

    (tmp_path / "train.txt").write_text("0 1 2\n1 0\n")
    train = str(tmp_path / "train.txt")
    pairs = low_rank_pairs(5, 6, per_user=2)
    table = [
        (lambda: SyntheticInteractions(batch_size=0), "batch_size"),
        (lambda: SyntheticInteractions(eval_batch_size=-1), "eval_batch_size"),
        (lambda: SyntheticInteractions(val_fraction=NAN), "val_fraction"),
        (lambda: SyntheticInteractions(val_fraction=1.0), "val_fraction"),
        (lambda: SyntheticInteractions(num_workers=-1), "num_workers"),
        (lambda: SyntheticInteractions(split_seed=0.5), "split_seed"),
        (lambda: SyntheticInteractions(shuffle_seed=NAN), "shuffle_seed"),
        (lambda: InteractionFileDataModule(train, num_users=0), "num_users"),
        (lambda: InteractionFileDataModule(train, num_items=NAN), "num_items"),
        (lambda: MovieLens100KDataModule(min_rating=6), "min_rating"),
        (lambda: MovieLens100KDataModule(test_fraction=NAN), "test_fraction"),
        (lambda: MovieLens100KDataModule(test_fraction=1.0), "test_fraction"),
        (lambda: MovieLens100KDataModule(split="leave_one_out"), "split"),
        (lambda: RankingMetrics(ks=()), "ks"),
        (lambda: RankingMetrics(ks=(10, -1)), "ks"),
        (lambda: BPRBatchSampler(pairs, 6, batch_size=0), "batch_size"),
        (lambda: BPRBatchSampler(pairs, 0, batch_size=4), "num_items"),
    ]
    for make, name in table:
        with pytest.raises(ValueError, match=name):
            make()


def test_bpr_sampler_is_the_shared_epoch_sampler_and_resumes_mid_epoch():
    from lightning_ext.core.sampling import EpochSampler

    pairs = low_rank_pairs(30, 20, per_user=10)
    sampler = BPRBatchSampler(pairs, 20, batch_size=16, seed=2, num_replicas=2, rank=1)
    assert isinstance(sampler, EpochSampler)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3)
    it = iter(sampler)
    first = [next(it) for _ in range(4)]
    state = sampler.state_dict()
    resumed = BPRBatchSampler(pairs, 20, batch_size=16, seed=2, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)
    rest = list(resumed)
    assert len(first) + len(rest) == len(full) == len(sampler)
    for a, b in zip(first + rest, full):
        torch.testing.assert_close(a, b)
    # fewer batches than ranks: every rank still gets one (the shared sampler wraps around)
    tiny = [BPRBatchSampler(pairs[:10], 20, batch_size=16, num_replicas=2, rank=r) for r in (0, 1)]
    assert [len(list(s)) for s in tiny] == [len(s) for s in tiny] == [1, 1]


def test_interactions_from_pairs_takes_sizes_from_the_largest_ids():
    data = Interactions.from_pairs([[0, 2], [3, 1]])
    assert (data.num_users, data.num_items, len(data.train), len(data.val), len(data.test)) == (4, 3, 2, 0, 0)
    assert Interactions.from_pairs([[0, 2]], num_users=5, num_items=9).stats()["items"] == 9
