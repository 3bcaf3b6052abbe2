"""Multiple-instance learning: TransMIL's parts against the official conventions, ABMIL's gated attention, the
pooling baselines, padding invariance, the bag-labelling rules, resume, DDP and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext.mil.abmil import ABMIL
from lightning_ext.mil.bag_datamodule import BagDataModule, grid_adjacent
from lightning_ext.mil.bags import Bags, as_bags
from lightning_ext.mil.module import MILClassifier
from lightning_ext.mil.nystrom import NystromAttention, iterative_pinv
from lightning_ext.mil.pooling import PoolingMIL
from lightning_ext.mil.transmil import PPEG, TransMIL, square_tokens
from lightning_ext.testing import assert_same_parameters, crash_and_resume, fit_ddp_vs_single


# -- independent implementations, written from the papers and the official code's conventions ------------------
def _reference_nystrom(x, w_qkv, w_out, b_out, heads, m, iters):
    """lucidrains' NystromAttention as TransMIL calls it, for n divisible by m and no residual: segment-sum
    landmarks divided by the segment length, Moore-Penrose iteration from A^T / (max col sum * max row sum)."""
    b, n, _ = x.shape
    qkv = x @ w_qkv.T
    q, k, v = qkv.chunk(3, dim=-1)
    d = q.shape[-1] // heads
    q, k, v = (t.reshape(b, n, heads, d).transpose(1, 2) for t in (q, k, v))
    q = q * d ** -0.5
    seg = n // m
    ql = q.reshape(b, heads, m, seg, d).sum(3) / seg
    kl = k.reshape(b, heads, m, seg, d).sum(3) / seg
    a1 = (q @ kl.transpose(-1, -2)).softmax(-1)
    a2 = (ql @ kl.transpose(-1, -2)).softmax(-1)
    a3 = (ql @ k.transpose(-1, -2)).softmax(-1)
    z = a2.transpose(-1, -2) / (a2.abs().sum(-1).max() * a2.abs().sum(-2).max())
    eye = torch.eye(m)
    for _ in range(iters):
        xz = a2 @ z
        z = 0.25 * z @ (13 * eye - (xz @ (15 * eye - (xz @ (7 * eye - xz)))))
    out = (a1 @ z) @ (a3 @ v)
    return out.transpose(1, 2).reshape(b, n, heads * d) @ w_out.T + b_out


def test_nystrom_attention_matches_the_reference_conventions_on_one_batch():
    torch.manual_seed(0)
    attn = NystromAttention(16, heads=1, dim_head=16, num_landmarks=4, pinv_iterations=6, residual=False)
    x = torch.randn(1, 12, 16)
    ref = _reference_nystrom(x, attn.to_qkv.weight, attn.to_out[0].weight, attn.to_out[0].bias, 1, 4, 6)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-4)


def test_nystrom_with_every_token_a_landmark_is_exact_attention():
    torch.manual_seed(1)
    approx = NystromAttention(24, heads=3, dim_head=8, num_landmarks=64, pinv_iterations=40)
    exact = NystromAttention(24, heads=3, dim_head=8, attention="exact")
    exact.load_state_dict(approx.state_dict())
    approx, exact = approx.double(), exact.double()  # the pseudo-inverse of a softmax matrix is ill-conditioned
    x = torch.randn(2, 18, 24, dtype=torch.float64)  # 18 tokens < 64 landmarks: each token its own landmark
    torch.testing.assert_close(approx(x), exact(x), atol=1e-6, rtol=1e-5)
    manual = torch.softmax(torch.randn(3, 5, 5), -1)
    torch.testing.assert_close(iterative_pinv(manual, 40), torch.linalg.pinv(manual), atol=1e-4, rtol=1e-3)


def test_pinv_of_one_bag_does_not_depend_on_the_rest_of_its_batch():
    torch.manual_seed(2)
    a = torch.softmax(torch.randn(1, 6, 6), -1)
    big = torch.softmax(torch.randn(1, 6, 6) * 10, -1)
    torch.testing.assert_close(iterative_pinv(torch.cat([a, big]), 6)[:1], iterative_pinv(a, 6))


def test_square_tokens_repeats_the_first_tokens_as_the_official_code():
    h = torch.randn(2, 11, 3)
    side = int(np.ceil(np.sqrt(11)))
    official = torch.cat([h, h[:, :side * side - 11, :]], dim=1)
    out, got_side = square_tokens(h)
    assert got_side == side == 4
    torch.testing.assert_close(out, official)
    out2, side2 = square_tokens(torch.arange(2.0).view(1, 2, 1))  # padding longer than the bag
    assert side2 == 2 and out2.flatten().tolist() == [0.0, 1.0, 0.0, 1.0]


def test_ppeg_is_identity_plus_three_depthwise_convolutions_on_the_row_major_grid():
    torch.manual_seed(3)
    ppeg, dim, side = PPEG(4), 4, 3
    x = torch.randn(2, 1 + side * side, dim)
    grid = x[:, 1:].transpose(1, 2).reshape(2, dim, side, side)
    expect = grid.clone()
    for conv in ppeg.convs:
        k = conv.kernel_size[0]
        expect = expect + F.conv2d(grid, conv.weight, conv.bias, padding=k // 2, groups=dim)
    out = ppeg(x, side)
    torch.testing.assert_close(out[:, 0], x[:, 0])
    torch.testing.assert_close(out[:, 1:], expect.flatten(2).transpose(1, 2))


def test_abmil_gated_attention_matches_the_paper_equation():
    torch.manual_seed(4)
    net = ABMIL(in_features=5, num_classes=2, dim=6, attention_dim=3)
    bags = Bags(torch.randn(2, 7, 5), torch.tensor([7, 4]))
    logits = net(bags)
    for b, n in enumerate([7, 4]):
        h = torch.relu(bags.features[b, :n] @ net.fc1[0].weight.T + net.fc1[0].bias)
        gate = torch.tanh(h @ net.attention_v.weight.T + net.attention_v.bias) * torch.sigmoid(
            h @ net.attention_u.weight.T + net.attention_u.bias)
        a = torch.softmax((gate @ net.attention_w.weight.T).squeeze(-1), 0)
        torch.testing.assert_close(net.last_attention[b, :n], a)
        assert float(net.last_attention[b, n:].abs().sum()) == 0.0
        torch.testing.assert_close(logits[b], net.classifier(a @ h))


@pytest.mark.parametrize("make", [
    lambda: TransMIL(6, 2, dim=8, heads=2, num_landmarks=4, dropout=0.0),
    lambda: TransMIL(6, 2, dim=8, heads=2, attention="exact", ppeg=False, dropout=0.0),
    lambda: TransMIL(6, 2, dim=8, heads=2, attention="exact", dropout=0.0),
    lambda: ABMIL(6, 2, dim=8), lambda: PoolingMIL(6, 2, dim=8, pooling="mean"),
    lambda: PoolingMIL(6, 2, dim=8, pooling="max")], ids=["transmil", "transmil-exact-noppeg", "transmil-exact-ragged", "abmil", "mean", "max"])
def test_a_bag_scores_the_same_alone_and_padded_in_a_batch(make):
    torch.manual_seed(5)
    net = make().eval()
    sizes = [5, 2, 17, 9]  # grids of side 3, 2, 5 and 3; the 2-bag repeats its tokens twice
    bags = [torch.randn(1, n, 6) for n in sizes]
    padded = torch.full((len(sizes), max(sizes), 6), 100.0)  # garbage in the padding must not matter
    for i, bag in enumerate(bags):
        padded[i, :sizes[i]] = bag[0]
    batch = net(Bags(padded, torch.tensor(sizes)))
    for i, bag in enumerate(bags):
        torch.testing.assert_close(batch[i], net(bag)[0], atol=1e-5, rtol=1e-4)


def test_pooling_baselines_ignore_instance_order_and_transmil_with_ppeg_does_not():
    torch.manual_seed(6)
    x = torch.randn(1, 16, 6)
    perm = x[:, torch.randperm(16)]
    for net in (ABMIL(6, 2, dim=8), PoolingMIL(6, 2, dim=8, pooling="max")):
        torch.testing.assert_close(net(x), net(perm), atol=1e-5, rtol=1e-4)
    tm = TransMIL(6, 2, dim=8, heads=2, attention="exact", dropout=0.0).eval()
    assert not torch.allclose(tm(x), tm(perm), atol=1e-4)


def test_max_pooling_reduces_over_real_instances_only():
    net = PoolingMIL(2, 2, dim=2, pooling="max")
    with torch.no_grad():
        net.fc1[0].weight.copy_(torch.eye(2))
        net.fc1[0].bias.zero_()
    feats = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])
    out = net(Bags(feats, torch.tensor([2])))
    expect = net.classifier(torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(out, expect)


# -- the bags ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bag_modules():
    out = {}
    for task in ("contains", "both", "adjacent"):
        dm = BagDataModule(task=task, train_bags=120, val_bags=20, test_bags=60, batch_size=8)
        dm.setup()
        out[task] = dm
    return out


@pytest.mark.parametrize("task", ["contains", "both", "adjacent"])
def test_bag_labels_follow_the_rule_on_the_real_instance_classes(bag_modules, task):
    dm = bag_modules[task]
    for split in ("train", "test"):
        classes, data = dm.instance_labels(split), dm.datasets[split]
        labels = data.labels.numpy()
        assert 0.3 < labels.mean() < 0.7
        for inst, n, y in zip(classes, data.lengths.tolist(), labels):
            bag = inst[:n]
            assert (inst[n:] == -1).all() and (bag >= 0).all()
            if task == "contains":
                assert y == int((bag == 9).any())
            elif task == "both":
                assert y == int((bag == 3).any() and (bag == 7).any())
                assert (bag == 3).any() or (bag == 7).any()  # negatives are hard: they hold one of the two
            else:
                side = math.isqrt(n)
                assert side * side == n and 2 <= (bag == 7).sum() <= 4
                assert y == int(grid_adjacent(np.flatnonzero(bag == 7), side))


def test_bag_features_are_the_standardised_pixels_of_the_named_instances(bag_modules):
    dm = bag_modules["contains"]
    from lightning_ext.data.digits import DigitsDataModule

    src = DigitsDataModule()
    src.setup()
    bags, _ = dm.datasets["test"][3]
    n = int(bags.lengths)
    table = src.test_set.tensors[0].flatten(1)
    idx = dm.datasets["test"].index[3, :n]
    torch.testing.assert_close(bags.features[:n], table[idx])
    assert float(bags.features[n:].abs().sum()) == 0.0


def test_a_frozen_feature_extractor_describes_the_instances():
    ext = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    before = ext[1].weight.clone()
    dm = BagDataModule(train_bags=10, val_bags=4, test_bags=4, feature_extractor=ext)
    dm.setup()
    assert dm.in_features == 5 and dm.datasets["train"][0][0].features.shape == (64, 5)
    assert not ext[1].weight.requires_grad and torch.equal(ext[1].weight, before)


def test_bags_are_the_same_for_the_same_seed_and_differ_for_another():
    a, b, c = (BagDataModule(train_bags=30, val_bags=4, test_bags=4, bag_seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.datasets["train"].index, b.datasets["train"].index)
    assert not torch.equal(a.datasets["train"].index, c.datasets["train"].index)


# -- training, resume, DDP ---------------------------------------------------------------------------------------
def _small_dm(batch_size=8):
    return BagDataModule(task="contains", train_bags=48, val_bags=16, test_bags=16, min_instances=8,
                         max_instances=16, batch_size=batch_size)


def test_abmil_learns_the_contains_task_quickly():
    from lightning.pytorch import Trainer, seed_everything

    seed_everything(0)
    dm = BagDataModule(task="contains", train_bags=200, val_bags=60, test_bags=10, min_instances=8,
                       max_instances=16, batch_size=16)
    model = MILClassifier(64, aggregator="abmil", dim=32, lr=3e-3)
    trainer = Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(model, dm)
    metrics = trainer.validate(model, dm, verbose=False)[0]
    assert metrics["val_auroc"] > 0.85, metrics


def test_resume_mid_epoch_ends_with_the_same_parameters(tmp_path):
    def make_model():
        torch.manual_seed(0)
        return MILClassifier(64, aggregator="transmil", dim=16, heads=2, num_landmarks=4, dropout=0.0, lr=1e-3)

    full, resumed, info = crash_and_resume(make_model, _small_dm, lambda: [], max_epochs=2, crash_step=8,
                                           tmp_path=tmp_path, checkpoint_every_n_steps=3, weights_only=True,
                                           limit_val_batches=0, num_sanity_val_steps=0)
    assert info["resumed_from_step"] == 6
    assert_same_parameters(full, resumed)


@pytest.mark.ddp
def test_two_processes_match_one_process(tmp_path):
    def make_model():
        torch.manual_seed(0)
        return MILClassifier(64, aggregator="abmil", dim=16, lr=1e-2)

    single, ddp = fit_ddp_vs_single(make_model, _small_dm, 8, tmp_path, max_epochs=2, num_sanity_val_steps=0,
                                    limit_val_batches=0)
    for key, value in single.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[key], value, atol=1e-5, rtol=1e-4, msg=key)
    assert single.test_metrics["test_auroc"] == pytest.approx(ddp.test_metrics["test_auroc"], abs=1e-6)


# -- bad input ---------------------------------------------------------------------------------------------------
def test_an_empty_bag_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"Bag\(s\) \[1\] of this batch are empty"):
        as_bags(Bags(torch.zeros(2, 4, 3), torch.tensor([4, 0])))
    with pytest.raises(ValueError, match="shape \\(bags, instances, features\\)"):
        ABMIL(3, 2, dim=4)(torch.zeros(4, 3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="both", targets=[3]), "exactly 2 target"),
    (dict(targets=[9, 9]), "distinct"),
    (dict(min_instances=30, max_instances=20), "swap them"),
    (dict(task="adjacent", min_instances=17, max_instances=24), "raise max_instances to at least 25"),
    (dict(positive_fraction=1.0), "positive_fraction"),
    (dict(task="sum"), "task"),
])
def test_bad_bag_settings_get_one_clear_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BagDataModule(**kwargs)


def test_a_target_class_the_source_lacks_is_named():
    dm = BagDataModule(targets=[12], train_bags=4, val_bags=2, test_bags=2)
    with pytest.raises(ValueError, match=r"no instance of class\(es\) \[12\]"):
        dm.setup()


def test_in_features_disagreeing_with_the_data_is_refused_at_setup(tmp_path):
    from lightning.pytorch import Trainer

    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="in_features: 64"):
        trainer.fit(MILClassifier(32, aggregator="mean", dim=8), _small_dm())


def test_bad_aggregator_settings():
    with pytest.raises(ValueError, match="divisible by heads"):
        TransMIL(8, 2, dim=30, heads=4)
    with pytest.raises(ValueError, match="aggregator"):
        MILClassifier(8, aggregator="attention")
    with pytest.raises(ValueError, match="in_features: 6"):
        TransMIL(8, 2, dim=8, heads=2)(torch.zeros(1, 4, 6))


def test_sample_images_show_each_validation_bag_with_its_prediction_and_target_instances(tmp_path, monkeypatch):
    """The saved sample: one row per validation bag (classes in turn), a first cell green/red by the bag's prediction, then its
    instance images with the target class's instances first and framed in gold."""
    from lightning.pytorch import Trainer

    import lightning_ext.mil.module as module
    from lightning_ext.core.samples import GREEN, RED

    saved = {}
    real = module.tile_rows
    monkeypatch.setattr(module, "tile_rows", lambda rows, borders: saved.update(rows=rows, borders=borders) or real(
        rows, borders))
    torch.manual_seed(0)
    model = MILClassifier(64, aggregator="abmil", dim=16, lr=3e-3, sample_images_every_n_epochs=1, num_sample_bags=3)
    dm = _small_dm()
    Trainer(max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path).fit(model, dm)
    assert [p.name for p in (tmp_path / "samples").glob("*.png")] == ["epoch_001.png"]
    rows, borders = saved["rows"], saved["borders"]
    assert len(rows) == 3
    classes = dm.instance_labels("val")
    model.eval()
    labels = dm.datasets["val"].labels.tolist()
    negatives = [i for i, y in enumerate(labels) if y == 0]
    positives = [i for i, y in enumerate(labels) if y == 1]
    chosen = [negatives[0], positives[0], negatives[1]]  # the first bag of each class in turn
    for b, row, border in zip(chosen, rows, borders):
        features, label = dm.datasets["val"][b]
        n = int(features.lengths)
        with torch.no_grad():
            pred = int(model(features.features[:n].unsqueeze(0)).argmax())
        assert border[0] == (GREEN if pred == int(label) else RED)
        k = int((classes[b, :n] == 9).sum())
        assert border[1:] == [module.GOLD] * min(k, 12) + [None] * (len(row) - 1 - min(k, 12))
        assert int(label) == int(k > 0)
        # the cells are the bag's own instance images (digits 8x8), the gold ones first
        images = dm.bag_images("val", b)
        assert len(images) == n and tuple(row[1].shape) == (1, 8, 8)
        gold = images[torch.as_tensor(classes[b, :n] == 9)]
        for cell, expect in zip(row[1:1 + len(gold)], gold):
            assert torch.equal(cell, expect)


def test_no_sample_images_when_disabled(tmp_path):
    from lightning.pytorch import Trainer

    model = MILClassifier(64, aggregator="mean", dim=16, sample_images_every_n_epochs=0)
    Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path).fit(model, _small_dm())
    assert not (tmp_path / "samples").exists()
