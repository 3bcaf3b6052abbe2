"""DiffGraph (recsys): the diffusion loss and reverse chain against an independent float64 implementation of the
paper's equations and the official code's conventions, the multi-behaviour MovieLens DataModule, bad inputs and an
exact mid-epoch resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from lightning_ext.recsys.diffgraph import (
    Denoiser, DiffGraphRec, LatentDiffusion, diffgraph_betas, diffgraph_diffusion_loss,
)
from lightning_ext.recsys.interactions import Interactions
from lightning_ext.recsys.multi_behavior import MultiBehaviorDataModule, MultiBehaviorInteractions
from lightning_ext.testing import assert_same_parameters, crash_and_resume

pytestmark = pytest.mark.usefixtures("one_thread")


# -- an independent reference, float64 numpy, written from the equations and DiffGraph-Rec/Model.py's conventions --
def ref_schedule(steps, scale=1e-4, lo=1e-4, hi=1e-3):
    """Official ``get_betas`` (1 - ᾱ linear, β_t from ratios, capped at 0.999), then ``betas[0] = 1e-4``."""
    var = [scale * lo + (scale * hi - scale * lo) * i / (steps - 1) for i in range(steps)] if steps > 1 else [scale * lo]
    betas = [var[0]]
    for i in range(1, steps):
        betas.append(min(1 - (1 - var[i]) / (1 - var[i - 1]), 0.999))
    betas[0] = 1e-4
    betas = np.array(betas)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return betas, abar, abar_prev


def ref_denoiser(den: Denoiser, x, t, mask=None):
    """normalize -> dropout mask -> concat(x, W_e [cos(tω), sin(tω)] + b_e) -> tanh MLP, linear last layer."""
    W = [(layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()) for layer in den.layers]
    We, be = den.time_layer.weight.detach().double().numpy(), den.time_layer.bias.detach().double().numpy()
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if mask is not None:
        x = x * mask
    half = den.time_dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    ang = t[:, None] * freqs[None]
    temb = np.concatenate([np.cos(ang), np.sin(ang)] + ([np.zeros((len(t), 1))] if den.time_dim % 2 else []), 1)
    h = np.concatenate([x, temb @ We.T + be], 1)
    for i, (w, b) in enumerate(W):
        h = h @ w.T + b
        if i < len(W) - 1:
            h = np.tanh(h)
    return h


def ref_loss(den, steps, target, aux, t, noise, mask):
    _, abar, _ = ref_schedule(steps)
    snr = abar / (1 - abar)
    x_t = np.sqrt(abar[t])[:, None] * aux + np.sqrt(1 - abar[t])[:, None] * noise
    out = ref_denoiser(den, x_t, t, mask)
    w = np.array([1.0 if s == 0 else snr[s - 1] - snr[s] for s in t])
    return w * ((target - out) ** 2).mean(1), out


def ref_reverse(den, steps, x):
    betas, abar, abar_prev = ref_schedule(steps)
    for s in reversed(range(steps)):
        c1 = betas[s] * np.sqrt(abar_prev[s]) / (1 - abar[s])
        c2 = (1 - abar_prev[s]) * np.sqrt(1 - betas[s]) / (1 - abar[s])
        x = c1 * ref_denoiser(den, x, np.full(len(x), s)) + c2 * x
    return x


def ref_propagate(pairs, n_users, n_items, x, layers):
    """Dense Â = D^-1/2 A D^-1/2; h_l = LeakyReLU_0.5(Â h_{l-1}); x + Σ normalize(h_l)."""
    n = n_users + n_items
    a = np.zeros((n, n))
    for u, i in pairs:
        a[u, n_users + i] = a[n_users + i, u] = 1
    d = np.maximum(a.sum(1), 1) ** -0.5
    a_hat = d[:, None] * a * d[None]
    out, h = x.copy(), x
    for _ in range(layers):
        h = a_hat @ h
        h = np.where(h > 0, h, 0.5 * h)
        out = out + h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    return out


def tiny_data():
    rng = np.random.default_rng(0)
    target = np.unique(np.stack([rng.integers(0, 7, 30), rng.integers(0, 9, 30)], 1), axis=0)
    extra = np.unique(np.stack([rng.integers(0, 7, 25), rng.integers(0, 9, 25)], 1), axis=0)
    aux = np.unique(np.concatenate([target, extra]), axis=0)
    return MultiBehaviorInteractions(7, 9, target, target[:0], target[:0], auxiliary={"view": aux, "cart": extra})


# -- equivalence -------------------------------------------------------------------------------------------------
def test_schedule_and_one_batch_diffusion_loss_match_the_reference():
    steps, d = 50, 6
    torch.manual_seed(0)
    betas, abar, _ = ref_schedule(steps)
    np.testing.assert_allclose(diffgraph_betas(steps).numpy(), betas, rtol=1e-10, atol=1e-16)
    diffusion, den = LatentDiffusion(steps), Denoiser(d, hidden=(5, 4), time_dim=7, dropout=0.5).double()
    target, aux = torch.randn(11, d, dtype=torch.float64), torch.randn(11, d, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 49, 10, 0, 3, 48, 25, 7, 1])
    noise = torch.randn(11, d, dtype=torch.float64)
    mask = (torch.rand(11, d) < 0.5).double() / 0.5
    den.train()
    loss, out = diffgraph_diffusion_loss(den, diffusion, target, aux, t, noise, mask)
    ref, ref_out = ref_loss(den, steps, target.numpy(), aux.numpy(), t.numpy(), noise.numpy(), mask.numpy())
    # (the step embedding's angles are float32, as in the official code: tolerances at float32 resolution)
    np.testing.assert_allclose(out.detach().numpy(), ref_out, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loss.detach().numpy(), ref, rtol=1e-6, atol=1e-8)
    # the weight is 1 at t = 0 and SNR(t-1) - SNR(t) elsewhere; the official near-zero schedule makes the latter ~0.045
    assert loss[0].item() == pytest.approx(((target[0] - out[0]) ** 2).mean().item())
    assert 0.01 < float(LatentDiffusion(200).loss_weight(torch.tensor([5]))) < 0.1
    # the mean-only reverse chain ends with f(x_1, 0) and matches the reference posterior-mean recursion
    den.eval()
    x = torch.randn(4, d, dtype=torch.float64)
    np.testing.assert_allclose(diffusion.reverse(den, x).detach().numpy(), ref_reverse(den, steps, x.numpy()),
                               rtol=1e-6, atol=1e-7)


def test_training_loss_and_prediction_match_the_reference_on_one_batch():
    data = tiny_data()
    model = DiffGraphRec(embedding_dim=6, steps=20, denoiser_hidden=[5], reg_weight=3e-2, seed=3).bind(data).double()
    users, pos, neg = torch.tensor([0, 1, 1, 4]), torch.tensor([2, 3, 3, 8]), torch.tensor([5, 0, 6, 1])
    model.train()
    parts = model.training_loss(users, pos, neg)
    # the same draws (a generator seeded by seed and global_step 0), then everything else from the reference
    n = data.num_users + data.num_items
    t, noise, mask = (v.numpy() for v in model._draws(n, torch.empty(n, 6, dtype=torch.float64)))
    x = torch.cat([model.user_embedding.weight, model.item_embedding.weight]).detach().numpy()
    tgt = ref_propagate(data.train, 7, 9, x, 2)
    aux = ref_propagate(data.auxiliary["view"], 7, 9, x, 2) + ref_propagate(data.auxiliary["cart"], 7, 9, x, 2)
    lu, ou = ref_loss(model.user_denoiser, 20, tgt[:7], aux[:7], t[:7], noise[:7], mask[:7])
    li, oi = ref_loss(model.item_denoiser, 20, tgt[7:], aux[7:], t[7:], noise[7:], mask[7:])
    eu, ei = tgt[:7] + ou, tgt[7:] + oi
    u, p, q = eu[users.numpy()], ei[pos.numpy()], ei[neg.numpy()]
    diff = (u * p).sum(1) - (u * q).sum(1)
    bpr = -np.log(1 / (1 + np.exp(-diff))).sum() / len(users)  # official: sum / batch
    reg = 3e-2 * ((u ** 2).sum() + (p ** 2).sum() + (q ** 2).sum()) / len(users)
    dl = lu[users.numpy()].mean() + li[pos.numpy()].mean()
    for name, value in {"bpr": bpr, "reg": reg, "diffusion": dl, "loss": bpr + reg + dl}.items():
        assert parts[name].item() == pytest.approx(value, rel=1e-6), name
    model.eval()
    with torch.no_grad():
        user_emb, item_emb = model.propagate()
    np.testing.assert_allclose(user_emb.numpy(), tgt[:7] + ref_reverse(model.user_denoiser, 20, aux[:7]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(item_emb.numpy(), tgt[7:] + ref_reverse(model.item_denoiser, 20, aux[7:]), rtol=1e-6, atol=1e-6)


def test_no_diffusion_ablation_is_a_noise_free_map_at_t0():
    data = tiny_data()
    model = DiffGraphRec(embedding_dim=6, steps=20, denoiser_hidden=[5], diffusion=False).bind(data)
    t, noise, _ = model._draws(16, torch.empty(16, 6))
    assert (t == 0).all() and (noise == 0).all()
    model.eval()
    target, aux = model.views()
    with torch.no_grad():
        users, _ = model.propagate()
        expected = target[:7] + model.user_denoiser(aux[:7], torch.zeros(7, dtype=torch.long))
    torch.testing.assert_close(users, expected)


# -- data ----------------------------------------------------------------------------------------------------------
def test_multi_behavior_datamodule_derives_behaviours_without_leaking_held_out_pairs():
    dm = MultiBehaviorDataModule(batch_size=8192)
    dm.setup()
    d = dm.interactions
    pairs, ratings = dm.load_ratings()
    rating = dict(zip(map(tuple, pairs.tolist()), ratings.tolist()))
    keys = lambda a: set(map(tuple, a.tolist()))  # noqa: E731
    aux, target, val, test = keys(d.auxiliary["rating>=1"]), keys(d.train), keys(d.val), keys(d.test)
    assert target < aux and keys(d.known) == aux
    assert all(rating[p] >= 4 for p in target | val | test)
    assert any(rating[p] < 4 for p in aux)
    assert not (aux & (val | test)) and not (val & test)
    # about 20% of each user's rated pairs are held out for test; the target split keeps ~55% of the ratings (>= 4)
    assert 0.15 < len(test) / (len(test) + len(val) + len(target)) < 0.25
    union = MultiBehaviorDataModule(train_on="union", batch_size=8192)
    union.setup()
    assert keys(union.interactions.train) == aux and keys(union.interactions.target_train) == target
    # evaluation masks every known pair (val) and also the validation positives (test), for either training set
    batch = next(iter(union.test_dataloader()))
    masked = {(int(batch["users"][r]), int(i)) for r, i in batch["exclude"].T.tolist()}
    users = set(batch["users"].tolist())
    assert masked == {p for p in aux | val if p[0] in users}
    triples = next(iter(dm.train_dataloader()))
    assert triples.shape[1] == 3 and all((u, i) in target for u, i in triples[:, :2].tolist())


# -- bad inputs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"noise_min": 1e-3, "noise_max": 1e-4}, "noise_min"),
    ({"noise_scale": float("nan")}, "noise_scale"),
    ({"noise_scale": 2.0, "noise_max": 0.9}, "noise_scale * noise_max"),
    ({"denoiser_hidden": "64"}, "denoiser_hidden"),
    ({"denoiser_hidden": [64, 0]}, "denoiser_hidden"),
    ({"denoiser_dropout": 1.0}, "denoiser_dropout"),
    ({"diffusion": "yes"}, "diffusion"),
    ({"steps": 0}, "steps"),
    ({"seed": 1.5}, "seed"),
])
def test_diffgraph_refuses_bad_values_in_one_line(kwargs, words):
    with pytest.raises((ValueError, TypeError)) as err:
        DiffGraphRec(**kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"auxiliary_min_ratings": []}, "auxiliary_min_ratings"),
    ({"auxiliary_min_ratings": [1, 1]}, "auxiliary_min_ratings"),
    ({"auxiliary_min_ratings": [0]}, "auxiliary_min_ratings"),
    ({"target_min_rating": 6}, "target_min_rating"),
    ({"train_on": "both"}, "train_on"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"path": "/no/such/ml-100k.inter"}, "ml-100k.inter"),
])
def test_multi_behavior_datamodule_refuses_bad_values_in_one_line(kwargs, words):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        MultiBehaviorDataModule(**kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_diffgraph_without_auxiliary_behaviours_says_what_to_pass():
    with pytest.raises(ValueError, match="MultiBehaviorDataModule") as err:
        DiffGraphRec(embedding_dim=4).bind(Interactions.from_pairs([[0, 0], [1, 1]]))
    assert "\n" not in str(err.value)


# -- training ------------------------------------------------------------------------------------------------------
def test_resume_mid_epoch_ends_with_the_same_parameters_and_the_model_learns(tmp_path):
    def model(seed=1):
        torch.manual_seed(0)  # the same initial weights in every run; ``seed`` drives the diffusion draws
        return DiffGraphRec(num_users=943, num_items=1682, embedding_dim=16, steps=20, denoiser_hidden=[16], lr=5e-3,
                            seed=seed, eval_ks=[20])

    def data():
        return MultiBehaviorDataModule(batch_size=16384, shuffle_seed=2)

    full, resumed, info = crash_and_resume(model, data, list, max_epochs=2, crash_step=4, tmp_path=tmp_path,
                                           checkpoint_every_n_steps=1, limit_val_batches=0)
    assert info["resumed_from_step"] == 4 and info["resumed_trainer"].global_step == info["full_trainer"].global_step
    assert_same_parameters(full, resumed, atol=1e-6, rtol=1e-5)
    # a different seed draws different steps, noise and masks: the parameters differ (the test could fail)
    other = model(seed=2)
    trainer = Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    dm = data()
    trainer.fit(other, datamodule=dm)
    assert not torch.allclose(other.user_denoiser.layers[0].weight, full.user_denoiser.layers[0].weight)
    # after a few steps it ranks held-out positives far above chance (Recall@20 of a random ranking is ~0.012)
    result = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(full, datamodule=data(),
                                                                                     verbose=False)[0]
    assert result["test_recall@20"] > 0.05
