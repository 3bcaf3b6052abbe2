"""ABE: the losses and Recall@K against plain loops written from the equations, weight sharing between learners,
the class-disjoint split, training, resume, DDP and bad input."""

from __future__ import annotations

import itertools
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ext.metric_learning.abe import ABE, divergence_loss, learner_spread, tiny_abe
from lightning_ext.metric_learning.losses import contrastive_loss
from lightning_ext.metric_learning.module import ABEModule
from lightning_ext.metric_learning.retrieval import recall_at_k
from lightning_ext.metric_learning.unseen_classes import UnseenClassesDataModule
from lightning_ext.testing import assert_same_parameters, crash_and_resume, fit_ddp_vs_single


def test_contrastive_loss_matches_a_loop_over_pairs():
    torch.manual_seed(0)
    e, y, m = torch.randn(9, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1]), 1.5
    pos, neg = [], []
    for i, j in itertools.combinations(range(9), 2):
        d = float(torch.sqrt(((e[i] - e[j]) ** 2).sum()))
        (pos if y[i] == y[j] else neg).append(d ** 2 if y[i] == y[j] else max(0.0, m - d) ** 2)
    expect = np.mean(pos) + np.mean(neg)
    assert float(contrastive_loss(e, y, m)) == pytest.approx(expect, rel=1e-5)
    only_neg = contrastive_loss(e[:3], y[:3], m)  # three classes: no positive pair
    assert float(only_neg) == pytest.approx(np.mean([max(0.0, m - float(torch.dist(e[i], e[j]))) ** 2
                                                     for i, j in itertools.combinations(range(3), 2)]), rel=1e-5)


def test_divergence_loss_matches_the_paper_sum_over_inputs_and_learner_pairs():
    torch.manual_seed(1)
    f, margin = torch.nn.functional.normalize(torch.randn(5, 3, 4), dim=-1), 1.2
    terms = [max(0.0, margin - float(((f[x, p] - f[x, q]) ** 2).sum()))
             for x in range(5) for p in range(3) for q in range(3) if p != q]
    assert float(divergence_loss(f, margin)) == pytest.approx(np.mean(terms), rel=1e-5)
    assert learner_spread(f) == pytest.approx(np.mean([float(((f[x, p] - f[x, q]) ** 2).sum())
                                                        for x in range(5) for p in range(3) for q in range(3)
                                                        if p != q]), rel=1e-5)
    assert float(divergence_loss(f[:, :1], margin)) == 0.0


def test_recall_at_k_matches_brute_force_in_chunks():
    torch.manual_seed(2)
    e, y = torch.randn(50, 6), torch.randint(0, 4, (50,))
    got = recall_at_k(e, y, ks=(1, 3, 10), chunk=7)
    en = torch.nn.functional.normalize(e, dim=-1)
    for k in (1, 3, 10):
        hits = 0
        for q in range(50):
            sims = [(float(en[q] @ en[i]), i) for i in range(50) if i != q]
            top = [i for _, i in sorted(sims, reverse=True)[:k]]
            hits += any(int(y[i]) == int(y[q]) for i in top)
        assert got[k] == pytest.approx(hits / 50)


def test_learners_share_every_weight_but_their_attention_heads():
    torch.manual_seed(3)
    net = tiny_abe(num_learners=3, embedding_dim=12, width=4).eval()
    x = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(net(x)[:, 0], net(x)[:, 1])
    with torch.no_grad():  # identical heads -> identical learners: the rest is shared
        w = net.heads.weight.view(3, -1, *net.heads.weight.shape[1:])
        b = net.heads.bias.view(3, -1)
        w[1:] = w[0]
        b[1:] = b[0]
    f = net(x)
    torch.testing.assert_close(f[:, 0], f[:, 1])
    torch.testing.assert_close(f[:, 0], f[:, 2])
    assert torch.allclose(f.norm(dim=-1), torch.ones(2, 3))
    single = tiny_abe(num_learners=1, embedding_dim=8, width=4)
    assert single.attention is None and single.heads is None and single(x).shape == (2, 1, 8)


def test_unseen_classes_split_holds_classes_out():
    dm = UnseenClassesDataModule(train_classes=[0, 2, 4, 6])
    dm.setup()
    train, val, test = (set(s.tensors[1].tolist()) for s in (dm.train_set, dm.val_set, dm.test_set))
    assert train == {0, 2, 4, 6} and val == test == {1, 3, 5, 7, 8, 9}
    assert dm.split_sizes["train"] + dm.split_sizes["val"] + dm.split_sizes["test"] == 1797
    assert abs(dm.split_sizes["val"] - dm.split_sizes["test"]) <= 6
    xs = dm.train_set.tensors[0]
    assert abs(float(xs.mean())) < 1e-4  # standardised with the training images' statistics


def test_a_per_class_cap_subsamples_every_class():
    dm = UnseenClassesDataModule(max_images_per_class=40)
    dm.setup()
    assert dm.split_sizes == {"train": 200, "val": 100, "test": 100}
    assert np.bincount(dm.train_set.tensors[1].numpy()).tolist() == [40] * 5


@pytest.mark.parametrize("kwargs, match", [
    (dict(train_classes=[0]), "2 to 8"), (dict(max_images_per_class=0), "max_images_per_class"), (dict(train_classes=[0, 0, 1]), "distinct"),
    (dict(train_classes=[0, 11]), r"\[11\] are not classes"), (dict(val_share=1.0), "val_share"),
])
def test_bad_class_splits_get_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UnseenClassesDataModule(**kwargs)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="divisible by num_learners"):
        ABEModule(num_learners=3, embedding_dim=32)
    with pytest.raises(ValueError, match="div_weight"):
        ABEModule(div_weight=float("nan"))
    with pytest.raises(TypeError, match="must be an ABE"):
        ABEModule(net=nn.Linear(2, 2))


def _fit(model, dm, epochs, **kw):
    from lightning.pytorch import Trainer

    trainer = Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kw)
    trainer.fit(model, dm)
    return trainer


def test_training_improves_unseen_class_retrieval_and_the_divergence_loss_spreads_the_learners():
    from lightning.pytorch import Trainer, seed_everything

    dm = UnseenClassesDataModule(batch_size=128)
    seed_everything(0)
    before = Trainer(logger=False, enable_progress_bar=False).validate(ABEModule(width=8), dm, verbose=False)[0]
    seed_everything(0)
    model = ABEModule(width=8, div_weight=0.5, lr=3e-3)
    _fit(model, dm, 3, limit_val_batches=0)
    after = Trainer(logger=False, enable_progress_bar=False).validate(model, dm, verbose=False)[0]
    assert after["val_recall@1"] > before["val_recall@1"] + 0.05, (before, after)
    assert after["val_spread"] > 0.3, after


def _small_dm(batch_size=32):
    return UnseenClassesDataModule(batch_size=batch_size, drop_last=True)


def test_resume_mid_epoch_ends_with_the_same_parameters(tmp_path):
    def make():
        torch.manual_seed(0)
        return ABEModule(width=4, num_learners=2, embedding_dim=8, div_weight=0.1)

    full, resumed, info = crash_and_resume(make, _small_dm, lambda: [], max_epochs=2, crash_step=40,
                                           tmp_path=tmp_path, checkpoint_every_n_steps=15, weights_only=True,
                                           limit_val_batches=0, num_sanity_val_steps=0)
    assert info["resumed_from_step"] == 30
    assert_same_parameters(full, resumed)


def _no_bn_abe():
    torch.manual_seed(0)
    spatial = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    net = ABE(spatial, nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()), 4, 6, num_learners=2, embedding_dim=8)
    # SGD: Adam's normalisation turns rounding differences of near-zero gradients into lr-sized steps
    return ABEModule(net=net, div_weight=0.2, optimizer=partial(torch.optim.SGD, lr=0.1))


@pytest.mark.ddp
def test_two_processes_train_as_one_with_the_global_batch(tmp_path):
    """The pairs of the global batch, not of each half: without the gather the losses (and weights) differ."""
    single, ddp = fit_ddp_vs_single(_no_bn_abe, _small_dm, 32, tmp_path, max_epochs=1, limit_train_batches=6,
                                    num_sanity_val_steps=0, limit_val_batches=0)
    for key, value in single.state_dict.items():
        moved = float((value - _no_bn_abe().state_dict()[key]).abs().max())
        assert float((ddp.state_dict[key] - value).abs().max()) < 1e-3 * max(moved, 1e-2), key
    # near-tied neighbours may swap under the ~1e-5 weight differences
    assert single.test_metrics["test_recall@1"] == pytest.approx(ddp.test_metrics["test_recall@1"], abs=0.02)


def test_retrieval_samples_frame_each_neighbour_by_its_class(tmp_path, monkeypatch):
    """The saved sample: each query's 5 nearest validation images, framed green when of the query's class."""
    from lightning_ext.core.samples import GREEN, RED

    torch.manual_seed(0)
    model = ABEModule(width=8, sample_images_every_n_epochs=1, num_sample_queries=3)
    saved = {}
    import lightning_ext.metric_learning.module as module

    real = module.tile_rows
    monkeypatch.setattr(module, "tile_rows", lambda rows, borders: saved.setdefault("borders", borders) and real(
        rows, borders))
    _fit(model, _small_dm(), 1, limit_train_batches=2, default_root_dir=tmp_path)
    assert [p.name for p in (tmp_path / "samples").glob("*.png")] == ["epoch_001.png"]
    borders = saved["borders"]
    assert len(borders) == 3 and all(row[0] is None and len(row) == 6 for row in borders)
    # recompute the neighbours independently from the model's embeddings of the first 512 validation images
    dm = _small_dm()
    dm.setup("fit")
    xs, ys = zip(*[(x, y) for x, y in dm.val_dataloader()])
    x, y = torch.cat(xs)[:512], torch.cat(ys)[:512]
    with torch.no_grad():
        f = torch.nn.functional.normalize(model.eval()(x).flatten(1), dim=1)
    sim = f @ f.T - 3 * torch.eye(len(f))
    for i, row in enumerate(borders):
        nearest = sim[i].topk(5).indices
        assert row[1:] == [GREEN if y[j] == y[i] else RED for j in nearest]
