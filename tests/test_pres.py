"""TemporalEventDataModule and TGNLinkPredictor with PRES (issue 24, spec sections 2.3 and 4)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("torch_geometric")

from lightning_ext.graph.pres import coherence_loss, pres_correct, pres_memory_class, update_moments  # noqa: E402
from lightning_ext.graph.temporal_events import TemporalEventDataModule  # noqa: E402
from lightning_ext.graph.tgn import TGNLinkPredictor  # noqa: E402
from lightning_ext.testing import crash_and_resume  # noqa: E402


def _small_model(**kw):
    torch.manual_seed(0)
    args = dict(memory_dim=8, time_dim=8, embedding_dim=8, num_neighbors=4, dropout=0.0, lr=1e-3)
    args.update(kw)
    return TGNLinkPredictor(**args)


# ------------------------------------------------------------------------------------------------ data


def test_events_are_chronological_with_a_70_15_15_split_and_fixed_negatives():
    dm = TemporalEventDataModule(batch_size=1000)
    dm.setup("fit")
    d = dm.data
    assert d.num_events == 100_000 and dm.num_nodes == 2625
    assert bool((d.t[1:] >= d.t[:-1]).all())
    ties = d.t[1:] == d.t[:-1]
    assert bool((d.order[1:][ties] > d.order[:-1][ties]).all())  # ties keep file order
    assert d.src.max() < 943 <= d.dst.min() and d.dst.max() == 2624
    assert [dm.split_bounds(s) for s in ("train", "val", "test")] == [(0, 70_000), (70_000, 85_000),
                                                                      (85_000, 100_000)]
    batches = list(dm.val_dataloader())
    assert len(batches) == 15 and int(batches[0]["e_id"][0]) == 70_000
    e_id = torch.cat([b["e_id"] for b in batches])
    assert torch.equal(e_id, torch.arange(70_000, 85_000))  # contiguous, in time order, no shuffling
    again = TemporalEventDataModule(batch_size=7)
    again.setup("fit")
    assert torch.equal(dm.neg_dst, again.neg_dst)
    other = TemporalEventDataModule(split_seed=1)
    other.setup("fit")
    assert not torch.equal(dm.neg_dst, other.neg_dst)
    assert bool(((dm.neg_dst >= 943) & (dm.neg_dst < 2625)).all())


def test_datamodule_refuses_several_ranks_in_one_line():
    dm = TemporalEventDataModule()
    dm.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match=r"single-process.*devices=1") as err:
        dm.setup("fit")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, word", [
    (dict(val_fraction=0.5, test_fraction=0.5), "val_fraction"), (dict(batch_size=0), "batch_size"),
    (dict(path="/no/such/file.inter"), "path"), (dict(max_events=3), "max_events"),
    (dict(source="ml-1m"), "source")])
def test_datamodule_bad_input(kwargs, word):
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=word):
        TemporalEventDataModule(**kwargs)


@pytest.mark.parametrize("kwargs, word", [
    (dict(embedding_dim=7), "embedding_dim"), (dict(pres_gamma=1.0), "pres_gamma"),
    (dict(pres_variant="gmm"), "pres_variant"), (dict(coherence_weight=math.nan), "coherence_weight"),
    (dict(lr=0.0), "lr"), (dict(dropout=1.0), "dropout")])
def test_module_bad_input(kwargs, word):
    with pytest.raises((ValueError, TypeError), match=word):
        TGNLinkPredictor(**kwargs)


# ------------------------------------------------------------------------------------------- equivalence


def _reference_pres(s_prev, s_tilde, mean, gamma):
    """PRES from the spec's equations, one node and one coordinate at a time."""
    out = torch.empty_like(s_prev)
    for i in range(s_prev.shape[0]):
        for k in range(s_prev.shape[1]):
            s_hat = s_prev[i, k] + mean[i, k]
            out[i, k] = gamma * s_hat + (1 - gamma) * s_tilde[i, k]
    return out


def _reference_coherence(s, s_prev):
    total = 0.0
    for a, b in zip(s.tolist(), s_prev.tolist()):
        dot = sum(x * y for x, y in zip(a, b))
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
        total += dot / max(na * nb, 1e-8)
    return 1 - total / len(s)


def test_pres_correction_and_coherence_match_the_equations_on_one_batch():
    g = torch.Generator().manual_seed(0)
    s_prev, s_tilde = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    # moments built from three observed transitions per node
    mean, sq, count = torch.zeros(6, 5), torch.zeros(6, 5), torch.zeros(6)
    deltas = [torch.randn(6, 5, generator=g) for _ in range(3)]
    for d in deltas:
        update_moments(mean, sq, count, torch.arange(6), d)
    stacked = torch.stack(deltas)
    torch.testing.assert_close(mean, stacked.mean(0))
    torch.testing.assert_close(sq, (stacked ** 2).mean(0))
    assert count.tolist() == [3.0] * 6
    gamma = torch.sigmoid(torch.tensor(math.log(0.9 / 0.1)))
    s = pres_correct(s_prev, s_tilde, mean, gamma)
    torch.testing.assert_close(s, _reference_pres(s_prev, s_tilde, stacked.mean(0), 0.9), rtol=1e-5, atol=1e-6)
    assert abs(float(coherence_loss(s, s_prev)) - _reference_coherence(s, s_prev)) < 1e-5


def _reference_minmax(x):
    """The official code's scaling: to [-1, 1] over every entry, skipped when the maximum is 0."""
    if x.max().item() == 0:
        return x.clone()
    y = x - x.min()
    return 2 * (y / y.max()) - 1


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_pres_memory_equals_gamma_blend_of_plain_tgn_update_on_one_batch(variant):
    from torch_geometric.nn.models.tgn import IdentityMessage, LastAggregator, TGNMemory

    torch.manual_seed(0)
    n, msg_dim, d = 12, 3, 4

    def make(cls, **kw):
        torch.manual_seed(0)
        return cls(n, msg_dim, d, d, message_module=IdentityMessage(msg_dim, d, d),
                   aggregator_module=LastAggregator(), **kw)

    plain, pres = make(TGNMemory), make(pres_memory_class(), pres=variant, gamma=0.7, learn_gamma=False)
    src, dst = torch.tensor([0, 1, 2]), torch.tensor([5, 6, 5])
    for step in range(3):  # three batches of messages, the same for both memories
        t, msg = torch.tensor([step * 10 + 1, step * 10 + 2, step * 10 + 3]), torch.randn(3, msg_dim)
        n_id = torch.arange(n)
        s_prev = pres.memory[n_id].detach().clone()
        mu = pres.delta_mean.clone() if variant == "paper" else _reference_minmax(pres.delta_mean)
        plain.memory.copy_(pres.memory), plain.last_update.copy_(pres.last_update)
        plain.msg_s_store, plain.msg_d_store = dict(pres.msg_s_store), dict(pres.msg_d_store)
        s_tilde, _ = plain(n_id)
        s, _ = pres(n_id)
        expected = _reference_pres(s_prev, s_tilde.detach(), mu, 0.7)
        torch.testing.assert_close(s.detach(), expected, rtol=1e-5, atol=1e-6)
        before = pres.delta_mean.clone()
        pres.update_state(src, dst, t, msg)
        pres.detach()
        if variant == "code":  # official Filter.update: increment += 1 + minmax(s - s_prev) on the updated nodes
            assert torch.all(pres.delta_mean[3] == before[3]) and torch.all(pres.delta_mean[0] - before[0] >= 0)
    if variant == "paper":
        assert float(pres.delta_count[0]) == 3 and float(pres.delta_count[3]) == 0


def test_code_coherence_is_the_official_column_wise_cosine():
    from lightning_ext.graph.pres import code_coherence

    g = torch.Generator().manual_seed(1)
    s, s_prev = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    a = s / s.norm(dim=1, keepdim=True)
    b = s_prev / s_prev.norm(dim=1, keepdim=True)
    cols = [float((a[:, k] @ b[:, k]) / (a[:, k].norm() * b[:, k].norm())) for k in range(4)]
    assert abs(float(code_coherence(s, s_prev)) - (1 - sum(cols) / 4)) < 1e-5


def _one_step_grads(**kw):
    torch.manual_seed(0)
    dm = TemporalEventDataModule(batch_size=64, max_events=1000)
    model = _small_model(pres=True, **kw)
    model.trainer = None
    dm.setup("fit")
    model.bind(dm.num_nodes, dm.msg_dim, dm.dst_range)
    model._event_t, model._event_msg = dm.data.t, dm.data.msg
    it = iter(dm.train_dataloader())
    model._progress.zero_()
    for i in range(3):
        batch = next(it)
        model.zero_grad()
        pos, neg, s, s_prev = model._scores(batch, batch["neg_dst"])
        loss = torch.nn.functional.softplus(-pos).mean() + torch.nn.functional.softplus(neg).mean()
        coh = coherence_loss(s, s_prev)
        loss = loss + kw["coherence_weight"] * (coh.detach() if kw["coherence_detach"] else coh)
        loss.backward()
        model._advance(batch)
        model.memory.detach()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_coherence_loss_trains_unless_detached():
    base = _one_step_grads(coherence_weight=0.0, coherence_detach=False)
    detached = _one_step_grads(coherence_weight=1.0, coherence_detach=True)
    live = _one_step_grads(coherence_weight=1.0, coherence_detach=False)
    assert all(torch.allclose(base[k], detached[k]) for k in base)  # the official code's term changes nothing
    assert any(not torch.allclose(base[k], live[k]) for k in base)
    assert "_net.memory.gamma_param" in live


# ------------------------------------------------------------------------------------------ state / resume


def test_state_dict_carries_pending_messages_and_neighbours():
    dm = TemporalEventDataModule(batch_size=50, max_events=400)
    dm.setup("fit")
    a, b = _small_model(pres=True), _small_model(pres=True)
    for m in (a, b):
        m.bind(dm.num_nodes, dm.msg_dim, dm.dst_range)
        m._event_t, m._event_msg = dm.data.t, dm.data.msg
    a.train()
    for batch in list(dm.train_dataloader())[:3]:
        a._scores(batch, batch["neg_dst"])
        a._advance(batch)
        a.memory.detach()
    pending = [j for j in range(dm.num_nodes) if a.memory.msg_s_store[j][0].numel()]
    assert pending  # the last batch's messages are not in the memory tensor yet
    b.load_state_dict(a.state_dict())
    for j in pending:
        for x, y in zip(a.memory.msg_s_store[j], b.memory.msg_s_store[j]):
            assert torch.equal(x, y)
    assert torch.equal(a.neighbor_loader.e_id, b.neighbor_loader.e_id)
    assert a.neighbor_loader.cur_e_id == b.neighbor_loader.cur_e_id


@pytest.mark.parametrize("crash", [dict(crash_step=7), dict(crash_epoch=1)], ids=["mid_epoch", "epoch"])
def test_crash_and_resume_is_exact(tmp_path, crash):
    full, resumed, info = crash_and_resume(
        lambda: _small_model(pres=True), lambda: TemporalEventDataModule(batch_size=40, max_events=600),
        lambda: [], max_epochs=2, tmp_path=tmp_path, num_sanity_val_steps=0, **crash)
    assert info["resumed_from_step"] > 0
    tensors = [dict((k, v) for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)) for m in (full, resumed)]
    assert tensors[0].keys() == tensors[1].keys() and "_net.memory.memory" in tensors[0]
    for k in tensors[0]:  # parameters, memory, last updates, PRES moments
        torch.testing.assert_close(tensors[0][k], tensors[1][k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    ea, eb = full.memory.get_extra_state(), resumed.memory.get_extra_state()  # pending messages
    for store in ("msg_s_store", "msg_d_store"):
        for key in ("count", "src", "dst", "t", "msg"):
            torch.testing.assert_close(ea[store][key], eb[store][key], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_learns_future_links_above_chance_and_logs_metrics():
    from lightning.pytorch import Trainer, seed_everything

    seed_everything(0)
    dm = TemporalEventDataModule(batch_size=100, max_events=4000)
    model = _small_model(pres=True, memory_dim=16, time_dim=16, embedding_dim=16, lr=3e-3)
    trainer = Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    m = trainer.callback_metrics
    assert float(m["val_ap"]) > 0.6 and float(m["val_auroc"]) > 0.6
    assert 0 < float(m["pres/gamma"]) < 1 and float(m["train_events_per_s"]) > 0
