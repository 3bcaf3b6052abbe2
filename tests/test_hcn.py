"""HCN: interest clustering, MIND routing, the max-over-interests score, both next-item losses and the redundancy
penalty against independent loop implementations of the equations (hcn.py's module docstring; HCN has no official
code and its equations are the project's design), the sequence DataModule's leave-one-out split, learning, resume
and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_ext.recsys.hcn import (
    HCN, interest_routing, mean_pairwise_cosine, mind_routing, multi_interest_scores, next_item_loss,
    redundancy_penalty,
)
from lightning_ext.recsys.user_sequences import UserSequenceDataModule
from lightning_ext.testing import crash_and_resume, fit_ddp_vs_single

pytestmark = pytest.mark.usefixtures("one_thread")
ITEMS, MAX_LEN = 24, 8


class TinySequences(UserSequenceDataModule):
    """40 users whose next item follows item + 1 (mod 24) from a random start: a learnable sequential pattern."""

    def __init__(self, **kwargs):
        kwargs.setdefault("max_len", MAX_LEN)
        kwargs.setdefault("batch_size", 32)
        super().__init__(**kwargs)

    def load_sequences(self):
        rng = np.random.default_rng(0)
        seqs = []
        for _ in range(40):
            start, n = int(rng.integers(ITEMS)), int(rng.integers(6, 12))
            seqs.append([(start + 2 * t) % ITEMS for t in range(n)])
        return seqs, ITEMS


# --------------------------------------------------------------------------- independent implementations
def routing_loops(x, mask, init, iterations, tau):
    B, L, d = x.shape
    out = torch.zeros(B, init.shape[0], d, dtype=x.dtype)
    for b in range(B):
        c = [v / v.norm() for v in init]
        for _ in range(iterations):
            new = []
            rows = [x[b, j] for j in range(L) if mask[b, j]]
            weights = []
            for xj in rows:
                logits = torch.stack([xj @ ck / tau for ck in c])
                weights.append(torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum())
            for k in range(len(c)):
                s = sum((w[k] * xj for w, xj in zip(weights, rows)), torch.zeros(d, dtype=x.dtype))
                new.append(s / max(float(s.norm()), 1e-12))
            c = new
        out[b] = torch.stack(c)
    return out


def mind_loops(x, mask, S, logits, iterations):
    B, L, d = x.shape
    K = logits.shape[1]
    out = torch.zeros(B, K, d, dtype=x.dtype)
    for b in range(B):
        u = [S @ x[b, j] for j in range(L)]
        blog = [[float(logits[j, k]) for k in range(K)] for j in range(L)]
        for it in range(iterations):
            caps = []
            for k in range(K):
                z = torch.zeros(d, dtype=x.dtype)
                for j in range(L):
                    if mask[b, j]:
                        w = math.exp(blog[j][k]) / sum(math.exp(v) for v in blog[j])
                        z = z + w * u[j]
                n2 = float(z @ z)
                caps.append(n2 / (1 + n2) * z / math.sqrt(n2 + 1e-9))
            if it < iterations - 1:
                blog = [[blog[j][k] + float(caps[k] @ u[j]) for k in range(K)] for j in range(L)]
        out[b] = torch.stack(caps)
    return out


def loss_loops(interests, items, target, kind):
    B = len(target)
    total = 0.0
    for b in range(B):
        def score(i):
            return max(float(u @ items[i]) for u in interests[b])
        cands = range(len(items)) if kind == "softmax" else [int(t) for t in target]
        if kind == "softmax":
            logits = [score(i) for i in cands]
            pos = score(int(target[b]))
        else:
            logits = [score(int(target[c])) for c in range(B) if c == b or target[c] != target[b]]
            pos = score(int(target[b]))
        total += -pos + math.log(sum(math.exp(v) for v in logits))
    return total / B


def test_interest_routing_matches_the_equations():
    torch.manual_seed(0)
    x, init = torch.randn(3, 6, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    torch.testing.assert_close(interest_routing(x, mask, init, 3, 0.5), routing_loops(x, mask, init, 3, 0.5))


def test_mind_routing_matches_the_equations():
    torch.manual_seed(1)
    x, S, logits = (torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64),
                    torch.randn(5, 3, dtype=torch.float64))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(mind_routing(x, mask, S, logits, 3), mind_loops(x, mask, S, logits, 3))


@pytest.mark.parametrize("kind", ["softmax", "in_batch"])
def test_scores_and_losses_match_the_equations(kind):
    torch.manual_seed(2)
    u, items = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    target = torch.tensor([1, 4, 4, 0, 8])
    scores = multi_interest_scores(u, items)
    assert scores[2, 7] == max(float(v @ items[7]) for v in u[2])
    assert float(next_item_loss(u, items, target, kind)) == pytest.approx(loss_loops(u, items, target, kind), rel=1e-10)


def test_redundancy_and_cosine_match_the_definitions():
    torch.manual_seed(3)
    u = torch.randn(4, 3, 5, dtype=torch.float64)
    cos = [[float(torch.nn.functional.cosine_similarity(u[b, k], u[b, m], dim=0)) for m in range(3)]
           for k in range(3) for b in [0]]
    pairs = [(b, k, m) for b in range(4) for k in range(3) for m in range(3) if k != m]
    c = lambda b, k, m: float(torch.nn.functional.cosine_similarity(u[b, k], u[b, m], dim=0))  # noqa: E731
    assert float(redundancy_penalty(u)) == pytest.approx(np.mean([c(*p) ** 2 for p in pairs]))
    assert mean_pairwise_cosine(u)[1] == pytest.approx(np.mean([c(1, k, m) for _, k, m in pairs[:6]]))
    assert cos  # the helper ran
    assert float(redundancy_penalty(u[:, :1])) == 0.0


def test_leave_one_out_split_and_batches():
    dm = TinySequences()
    dm.setup()
    seqs, _ = dm.load_sequences()
    assert len(dm.train_set) == sum(len(s) - 3 for s in seqs) and dm.num_users == 40
    val, test = dm.val_batches[0], dm.test_batches[0]
    s0 = seqs[0]
    assert int(val["target"][1, 0]) == s0[-2] and int(test["target"][1, 0]) == s0[-1]
    assert test["history"][0, -1] == s0[-2] + 1 and val["history"][0, -1] == s0[-3] + 1
    excluded0 = sorted(test["exclude"][1][test["exclude"][0] == 0].tolist())
    assert excluded0 == sorted(s0[:-1])
    hist, tgt = dm.train_set.tensors
    assert hist.shape[1] == MAX_LEN and int(tgt[0]) == s0[1] and hist[0, -1] == s0[0] + 1 and hist[0, -2] == 0


@pytest.mark.parametrize("extractor", ["hcn", "routing", "mean"])
def test_every_extractor_learns_the_sequential_pattern(extractor):
    seed_everything(0)
    dm = TinySequences()
    model = HCN(max_len=MAX_LEN, dim=16, extractor=extractor, k1=4, k2=2, short_len=3, lr=2e-2, eval_ks=(1, 5))
    tr = Trainer(max_epochs=25, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False, num_sanity_val_steps=0)
    tr.fit(model, datamodule=dm)
    hr = tr.test(model, datamodule=dm, verbose=False)[0]["test_hr@5"]
    assert hr > 0.5  # chance is about 5 / 18 unseen items
    interests = model.interests(dm.test_batches[0]["history"])
    assert interests.shape[1] == {"hcn": 4, "routing": 2, "mean": 1}[extractor]


def test_redundancy_weight_lowers_the_interest_cosine():
    cos = {}
    for weight in (0.0, 1.0):
        seed_everything(0)
        dm = TinySequences()
        model = HCN(max_len=MAX_LEN, dim=16, k1=4, k2=2, short_len=3, lr=2e-2, redundancy_weight=weight)
        Trainer(max_epochs=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0).fit(model, datamodule=dm)
        with torch.no_grad():
            cos[weight] = float(redundancy_penalty(model.interests(dm.test_batches[0]["history"])))
    assert cos[1.0] < cos[0.0]


def test_crash_and_resume_mid_epoch_ends_with_the_same_weights(tmp_path):
    def make():
        seed_everything(0)
        return HCN(num_items=ITEMS, max_len=MAX_LEN, dim=8, k1=4, k2=2, short_len=3, lr=1e-2)

    full, resumed, _ = crash_and_resume(make, TinySequences, lambda: [], max_epochs=2, crash_step=9,
                                        checkpoint_every_n_steps=4, tmp_path=tmp_path, weights_only=True,
                                        num_sanity_val_steps=0)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("make, match", [
    (lambda: HCN(extractor="dnn"), "extractor"),
    (lambda: HCN(loss="bpr"), "loss"),
    (lambda: HCN(short_len=50, max_len=50), "short_len"),
    (lambda: HCN(k1=2, k2=4), "k2"),
    (lambda: HCN(tau=0.0), "tau"),
    (lambda: HCN(redundancy_weight=float("nan")), "redundancy_weight"),
    (lambda: HCN(eval_ks=[]), "eval_ks"),
    (lambda: HCN(num_items=5, max_len=4, short_len=2).interests(torch.tensor([[0, 1, 2, 6]])), r"\[0, 5\]"),
    (lambda: HCN(num_items=5, max_len=4, short_len=2).interests(torch.tensor([[0, 1, 2]])), "max_len=4"),
    (lambda: UserSequenceDataModule(min_items=2), "min_items"),
    (lambda: UserSequenceDataModule(max_len=0), "max_len"),
])
def test_bad_inputs_are_refused_with_one_line(make, match):
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_out_of_range_targets_are_refused():
    model = HCN(num_items=5, max_len=4, short_len=2)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        model.training_step((torch.tensor([[0, 1, 2, 3]]), torch.tensor([5])), 0)


@pytest.mark.ddp
def test_two_processes_match_one(tmp_path):
    """Sharded training batches and evaluation users: weights, HR@K and the interest cosine match one process."""
    def make():
        torch.manual_seed(0)
        return HCN(num_items=ITEMS, max_len=MAX_LEN, dim=8, k1=4, k2=2, short_len=3, lr=1e-2, eval_ks=(5,))

    single, ddp = fit_ddp_vs_single(make, lambda b: TinySequences(batch_size=b, eval_batch_size=8), 32, tmp_path,
                                    max_epochs=1, limit_train_batches=5, num_sanity_val_steps=0)
    for k, v in single.state_dict.items():
        a = ddp.state_dict[k]
        if k.endswith("in_proj_bias"):  # the key bias: its exact gradient is 0 (softmax is shift-invariant), so Adam
            a, v = torch.cat([a[:8], a[16:]]), torch.cat([v[:8], v[16:]])  # turns rounding noise into steps there
        torch.testing.assert_close(a, v, atol=1e-5, rtol=1e-4)
    for key in ("val_hr@5", "val_ndcg@5", "val_interest_cosine"):
        assert ddp.final_metrics[key] == pytest.approx(single.final_metrics[key], abs=1e-5), key
