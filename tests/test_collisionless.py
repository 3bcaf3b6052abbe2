"""Monolith's collisionless embedding table, its expiry callback, the hashed baseline and CollisionlessMF.

Semantics checked against github.com/bytedance/monolith (read, not copied): ``hash_filter.h`` (the counting
filter's ``add`` returns the count *before* adding; ``ShouldBeFiltered = add(fid, count) < threshold``; a full
filter fails open), ``probabilistic_filter.cc`` ("equal": ``p = 1 - 0.05^{1/T}`` per occurrence), the cuckoo
table's ``Lookup`` (absent ids fill zeros) and ``Evict(max_update_time)`` (``max - last_update >= expire``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

from lightning_ext.recsys.collisionless import CollisionlessEmbedding, HashedEmbedding, reset_optimizer_rows
from lightning_ext.recsys.collisionless_mf import CollisionlessMF
from lightning_ext.recsys.embedding_expiry import EmbeddingExpiry
from lightning_ext.recsys.lightgcn import LightGCN
from lightning_ext.testing import crash_and_resume
from test_graph_recommenders import SyntheticInteractions

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_admitted_id_owns_a_row_and_gradients_stay_on_it():
    ids = torch.randint(0, 2**62, (500,), generator=torch.Generator().manual_seed(0)).unique()
    emb = CollisionlessEmbedding(dim=3, capacity=600)
    out = emb(ids)
    rows = emb.rows(ids)
    assert emb.num_rows == len(ids) and len(rows.unique()) == len(ids)  # no collision
    torch.testing.assert_close(out, emb.weight[rows])
    out[:2].sum().backward()
    touched = torch.nonzero(emb.weight.grad.abs().sum(1)).squeeze(1)
    assert sorted(touched.tolist()) == sorted(rows[:2].tolist())


def test_hashed_baseline_shares_rows_when_buckets_are_fewer_than_ids():
    emb = HashedEmbedding(dim=2, num_buckets=50, seed=3)
    ids = torch.arange(200)
    buckets = emb.bucket(ids)
    assert buckets.min() >= 0 and buckets.max() < 50 and len(buckets.unique()) <= 50
    torch.testing.assert_close(emb(ids), emb.weight[buckets])
    # the universal hash spreads consecutive ids (plain `id mod n` would be collisionless on 0..n-1)
    assert len(HashedEmbedding(2, 200, seed=3).bucket(ids).unique()) < 190


@pytest.mark.parametrize("compat, first_admitted", [(False, 3), (True, 4)])
def test_counting_admission_at_the_threshold_and_monolith_off_by_one(compat, first_admitted):
    emb = CollisionlessEmbedding(dim=2, capacity=4, admission="counting", occurrence_threshold=3,
                                 monolith_compat=compat)
    for occurrence in range(1, 6):
        emb(torch.tensor([42]))
        assert (emb.num_rows == 1) == (occurrence >= first_admitted), occurrence
    # occurrences within one batch count together; the admitted id leaves the filter
    emb(torch.tensor([9, 9, 9, 9]))
    if compat:  # Monolith tests the count before this call's occurrences are added
        assert emb.rows(torch.tensor([9])).item() == -1
        emb(torch.tensor([9]))
    assert emb.rows(torch.tensor([9])).item() >= 0
    assert 9 not in emb.filter_keys.tolist() and 42 not in emb.filter_keys.tolist()


def test_full_counting_filter_fails_open_and_counts_it():
    emb = CollisionlessEmbedding(dim=2, capacity=10, admission="counting", occurrence_threshold=5, filter_capacity=2)
    emb(torch.tensor([1, 2, 3]))
    assert emb.num_rows == 1 and int(emb.admission_failures) == 1  # 3 found no filter slot: admitted


def test_probabilistic_admission_reaches_95_percent_after_threshold_occurrences():
    emb = CollisionlessEmbedding(dim=2, capacity=4000, admission="probabilistic", occurrence_threshold=5, seed=1)
    ids = torch.arange(3000)
    emb(ids.repeat(5))  # every id occurs 5 times in one batch: admitted with 1 - (1 - p)^5 = 0.95
    assert 0.93 < emb.num_rows / 3000 < 0.97
    single = CollisionlessEmbedding(dim=2, capacity=4000, admission="probabilistic", occurrence_threshold=5, seed=1)
    single(ids)  # one occurrence each: p = 1 - 0.05^(1/5) = 0.451
    assert abs(single.num_rows / 3000 - (1 - 0.05 ** 0.2)) < 0.03


def test_missing_ids_read_as_zeros_or_the_shared_vector_and_eval_never_inserts():
    zeros = CollisionlessEmbedding(dim=3, capacity=4)
    zeros.eval()
    assert zeros(torch.tensor([5])).abs().sum() == 0 and zeros.num_rows == 0
    zeros.train()
    with torch.no_grad():
        zeros(torch.tensor([5]))
    assert zeros.num_rows == 0
    shared = CollisionlessEmbedding(dim=3, capacity=4, missing="shared", admission="counting", occurrence_threshold=2)
    with torch.no_grad():
        shared.shared.fill_(0.5)
    out = shared(torch.tensor([5]))  # counted, not admitted
    torch.testing.assert_close(out, torch.full((1, 3), 0.5))


def test_expiry_frees_stale_rows_in_event_time_and_reuses_them_fresh():
    emb = CollisionlessEmbedding(dim=2, capacity=3, expire_after=10.0)
    emb(torch.tensor([1, 2]), time=torch.tensor([100.0, 100.0]))
    emb(torch.tensor([2, 3]), time=torch.tensor([105.0, 108.0]))
    assert emb.evict().tolist() == []  # now 108: id 1 is 8 old
    emb(torch.tensor([3]), time=torch.tensor([111.0]))
    old_row = emb.rows(torch.tensor([1])).item()
    before = emb.weight[old_row].detach().clone()
    assert emb.evict().tolist() == [old_row]  # 111 - 100 >= 10
    assert emb.rows(torch.tensor([1])).item() == -1 and emb.num_rows == 2
    assert not torch.equal(emb.weight[old_row], before)  # re-initialised
    emb(torch.tensor([7]), time=torch.tensor([112.0]))
    assert emb.rows(torch.tensor([7])).item() == old_row
    with pytest.raises(RuntimeError, match="full"):
        emb(torch.tensor([8, 9]), time=torch.tensor([113.0, 113.0]))


def test_reset_optimizer_rows_zeroes_adam_moments_of_those_rows_only():
    emb = CollisionlessEmbedding(dim=2, capacity=3)
    opt = torch.optim.Adam(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    assert reset_optimizer_rows(opt, emb.weight, torch.tensor([1])) == 2
    state = opt.state[emb.weight]
    assert state["exp_avg"][1].abs().sum() == 0 and state["exp_avg"][0].abs().sum() > 0


def test_state_dict_round_trips_the_table_and_the_next_draws():
    kwargs = dict(dim=3, capacity=200, admission="probabilistic", occurrence_threshold=2, expire_after=3.0, seed=4)
    a = CollisionlessEmbedding(**kwargs)
    for step in range(4):
        a(torch.arange(step * 5, step * 5 + 20))
    a.evict()
    b = CollisionlessEmbedding(**kwargs)
    b.load_state_dict(a.state_dict())
    ids = torch.arange(60)
    torch.testing.assert_close(b.read(ids), a.read(ids))
    assert torch.equal(a.keys, b.keys) and torch.equal(a.last_update, b.last_update)
    a(torch.arange(30, 70)), b(torch.arange(30, 70))  # same admissions afterwards
    assert torch.equal(a.keys, b.keys)
    torch.testing.assert_close(b.read(ids), a.read(ids))


def test_collisionless_mf_loss_matches_bpr_written_from_the_paper():
    model = CollisionlessMF(num_users=6, num_items=8, embedding_dim=4, reg_weight=0.3)
    users, pos, neg = torch.tensor([0, 1, 1]), torch.tensor([2, 3, 3]), torch.tensor([5, 6, 7])
    parts = model.training_loss(users, pos, neg)
    u = model.user_embedding.weight[model.user_embedding.rows(users)]
    i = model.item_embedding.weight[model.item_embedding.rows(pos)]
    j = model.item_embedding.weight[model.item_embedding.rows(neg)]
    ref = -torch.log(torch.sigmoid((u * i).sum(1) - (u * j).sum(1))).mean() \
        + 0.3 * 0.5 * (u.pow(2).sum() + i.pow(2).sum() + j.pow(2).sum()) / 3
    torch.testing.assert_close(parts["loss"], ref)
    # users never seen in training score from zeros
    users_emb, _ = model.propagate()
    assert users_emb[5].abs().sum() == 0 and users_emb[0].abs().sum() > 0


def _mf(expire=None):
    return CollisionlessMF(embedding_dim=8, lr=0.02, admission="counting", occurrence_threshold=2,
                           expire_after=expire, eval_ks=(20,))


def test_collisionless_mf_learns_and_expiry_callback_evicts():
    seed_everything(0)
    dm = SyntheticInteractions(batch_size=256, val_fraction=0.1)
    model = _mf(expire=2.0)
    trainer = Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=[EmbeddingExpiry(1)])
    trainer.fit(model, datamodule=dm)
    assert model.item_embedding.num_rows < model.num_items  # rare items expired or never admitted
    seed_everything(0)
    full = _mf()
    Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0).fit(full, datamodule=dm)
    assert float(Trainer(logger=False, enable_progress_bar=False).validate(full, datamodule=dm, verbose=False)[0][
        "val_recall@20"]) > 2.5 * 20 / 150
    with pytest.raises(ValueError, match="no CollisionlessEmbedding"):
        Trainer(max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[EmbeddingExpiry()]).fit(
            LightGCN(embedding_dim=4), datamodule=dm)


def test_crash_and_resume_mid_epoch_restores_the_table(tmp_path):
    full, resumed, info = crash_and_resume(
        lambda: _mf(expire=3.0), lambda: SyntheticInteractions(batch_size=64, val_fraction=0.1),
        lambda: [EmbeddingExpiry(2)], max_epochs=2, crash_step=13, checkpoint_every_n_steps=4, tmp_path=tmp_path,
        weights_only=True, limit_val_batches=0, num_sanity_val_steps=0)
    assert info["resumed_from_step"] == 12
    for name in ("user_embedding", "item_embedding"):
        a, b = getattr(full, name), getattr(resumed, name)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.last_update, b.last_update)
        assert torch.equal(a.filter_keys, b.filter_keys) and torch.equal(a.filter_counts, b.filter_counts)
        torch.testing.assert_close(a.weight, b.weight, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kwargs, name", [
    ({"capacity": 0}, "capacity"), ({"expire_after": 0.0}, "expire_after"), ({"admission": "bloom"}, "admission"),
    ({"admission": "probabilistic"}, "occurrence_threshold"), ({"occurrence_threshold": -1}, "occurrence_threshold"),
    ({"missing": "random"}, "missing"), ({"init_std": float("nan")}, "init_std"),
])
def test_bad_arguments_are_refused_with_one_line(kwargs, name):
    with pytest.raises(ValueError, match=name) as err:
        CollisionlessEmbedding(**{"dim": 2, "capacity": 4, **kwargs})
    assert "\n" not in str(err.value)


def test_bad_ids_and_times_are_refused():
    emb = CollisionlessEmbedding(dim=2, capacity=4)
    with pytest.raises(ValueError, match=">= 0"):
        emb(torch.tensor([-3]))
    with pytest.raises(ValueError, match="integer"):
        emb(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="NaN"):
        emb(torch.tensor([1]), time=torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="expire_after"):
        CollisionlessMF(expire_after=0.0)
    with pytest.raises(ValueError, match="every_n_steps"):
        EmbeddingExpiry(0)
    with pytest.raises(ValueError, match="integer"):
        HashedEmbedding(2, 3)(torch.tensor([0.5]))


def test_collisionless_mf_refuses_more_than_one_process(monkeypatch):
    trainer = Trainer(accelerator="cpu", devices=1, logger=False)
    monkeypatch.setattr(Trainer, "world_size", property(lambda self: 2))
    model = CollisionlessMF(num_users=3, num_items=4)
    model.trainer = trainer
    with pytest.raises(ValueError, match="one process"):
        model.setup("fit")
