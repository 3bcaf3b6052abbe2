"""Two gloo processes against one: the recommenders, the interaction DataModules, SSL modules and KNNEvaluation.

Every cross-rank path of the recsys and ssl families is checked here against a one-process run with the same
global batch (:func:`lightning_ext.testing.fit_ddp_vs_single`) or, for evaluation sharding, against the
one-process metric on the same weights.
"""

from __future__ import annotations

import os
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_ext.core.distributed import free_port
from lightning_ext.data.digits import DigitsDataModule
from lightning_ext.recsys.dccf import DCCF
from lightning_ext.recsys.interactions import InteractionDataModule, per_user_split
from lightning_ext.recsys.lightgcl import LightGCL
from lightning_ext.recsys.lightgcn import LightGCN
from lightning_ext.recsys.metrics import RankingMetrics
from lightning_ext.recsys.mf_bpr import MFBPR
from lightning_ext.recsys.sheaf4rec import Sheaf4Rec
from lightning_ext.recsys.ultragcn import UltraGCN
from lightning_ext.ssl.barlow_twins import BarlowTwins
from lightning_ext.ssl.knn_evaluation import KNNEvaluation
from lightning_ext.ssl.simclr import SimCLR
from lightning_ext.ssl.vicreg import VICReg
from lightning_ext.testing import fit_ddp_vs_single


class TinyInteractions(InteractionDataModule):
    """40 users x 30 items, 8 noisy rank-2 positives each; per-user 75/25 train/test, 10% validation."""

    protocol = "tiny synthetic rank-2"

    def load_splits(self):
        rng = np.random.default_rng(0)
        p, q = rng.normal(size=(40, 2)), rng.normal(size=(30, 2))
        items = np.argsort(-(p @ q.T + rng.gumbel(size=(40, 30)) * 0.5), axis=1)[:, :8]
        pairs = np.stack([np.repeat(np.arange(40), 8), items.ravel()], 1)
        train, test = per_user_split(pairs, 0.25, seed=3)
        return train, test, 40, 30


def _tiny_dm(batch_size: int) -> TinyInteractions:
    return TinyInteractions(batch_size=batch_size, eval_batch_size=7, val_fraction=0.1)


RECOMMENDERS = {
    "MFBPR": lambda: MFBPR(embedding_dim=8, lr=0.01, eval_ks=(5, 10)),
    "LightGCN": lambda: LightGCN(num_layers=2, embedding_dim=8, lr=0.01, eval_ks=(5, 10)),
    "UltraGCN": lambda: UltraGCN(negative_num=4, num_neighbors=3, embedding_dim=8, lr=0.01, eval_ks=(5, 10)),
    "LightGCL": lambda: LightGCL(rank=2, embedding_dim=8, lr=0.01, eval_ks=(5, 10)),
    "DCCF": lambda: DCCF(num_intents=4, embedding_dim=8, lr=0.01, eval_ks=(5, 10)),
    "Sheaf4Rec": lambda: Sheaf4Rec(num_layers=2, embedding_dim=8, lr=0.01, eval_ks=(5, 10)),
}
RANKING_KEYS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")


def _seeded(name):
    def make():
        torch.manual_seed(0)
        return RECOMMENDERS[name]()

    return make


# -- the interaction DataModules: two ranks together see exactly the one-process batches ---------------------


def _loader_batches(dm, world, rank, epoch):
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("epoch", [0, 3])
def test_two_ranks_together_see_exactly_the_one_process_bpr_batches(epoch):
    single_dm, ddp_dm = _tiny_dm(16), _tiny_dm(8)
    single_dm.setup("fit"), ddp_dm.setup("fit")
    one = _loader_batches(single_dm, 1, 0, epoch)
    ranks = [_loader_batches(ddp_dm, 2, r, epoch) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) - (len(one) * 16 > len(single_dm.interactions.train))
    for k, (a, b) in enumerate(zip(*ranks)):  # global step k: rank 0's batch then rank 1's
        torch.testing.assert_close(torch.cat([a, b]), one[k], msg=f"step {k}")
    # evaluation shards: every user batch on exactly one rank, nothing padded or dropped
    single_dm.trainer = SimpleNamespace(world_size=1, global_rank=0)
    users = [b["users"].tolist() for b in single_dm.val_dataloader()]
    sharded = []
    for r in (0, 1):
        ddp_dm.trainer = SimpleNamespace(world_size=2, global_rank=r)
        sharded += [b["users"].tolist() for b in ddp_dm.val_dataloader()]
    assert sorted(u for b in sharded for u in b) == sorted(u for b in users for u in b)


# -- evaluation: Recall/NDCG from two ranks equal one process, for every model ---------------------------------


def _evaluate(name, dm, stage):
    """Bind a seeded model to the data, score this rank's user batches and compute the (synced) metrics."""
    model = _seeded(name)().bind(dm.interactions).eval()
    metrics = RankingMetrics(model.eval_ks)
    model._cache_embeddings()
    loader = dm.val_dataloader() if stage == "val" else dm.test_dataloader()
    with torch.no_grad():
        for batch in loader:
            metrics.update(model(batch["users"]), batch["target"], batch["exclude"])
    return {k: float(v) for k, v in metrics.compute().items()}


def _eval_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dm = _tiny_dm(16)
        dm.setup("fit")
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        results = {(name, stage): _evaluate(name, dm, stage) for name in RECOMMENDERS for stage in ("val", "test")}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ranking_metrics_from_two_ranks_equal_one_process_for_every_model(tmp_path):
    out = tmp_path / "ddp.pt"
    torch.multiprocessing.spawn(_eval_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out)
    dm = _tiny_dm(16)
    dm.setup("fit")
    for name in RECOMMENDERS:
        for stage in ("val", "test"):
            single = _evaluate(name, dm, stage)
            assert set(single) == set(RANKING_KEYS)
            for key in RANKING_KEYS:  # sums over ranks then a mean: equal up to float64 summation order
                assert ddp[(name, stage)][key] == pytest.approx(single[key], abs=1e-6), (name, stage, key)
            assert 0 < single["recall@10"] < 1, (name, single)  # a real, non-trivial ranking


# -- training: two processes fit like one ------------------------------------------------------------------------


def _assert_same_run(single, ddp, atol):
    for key in RANKING_KEYS:
        s, d = single.curve(f"val_{key}"), ddp.curve(f"val_{key}")
        assert len(s) == len(d) == 2, key
        torch.testing.assert_close(torch.tensor(d), torch.tensor(s), atol=atol, rtol=0, msg=key)
    for name, value in single.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[name], value, atol=atol, rtol=atol, msg=name)
    for key in single.test_metrics:
        assert ddp.test_metrics[key] == pytest.approx(single.test_metrics[key], abs=atol), key


@pytest.mark.ddp
def test_lightgcn_fits_in_two_processes_like_one(tmp_path):
    """Mean BPR loss and a per-batch mean L2: DDP's gradient average is the global batch's gradient.

    Sizes are given, so the seeded initial weights are drawn at construction, identically in both runs. The
    global batch (40) divides the 200 training pairs: with a smaller last batch, DDP would average the two
    ranks' unequal halves with equal weights (plain DDP behaviour), not the one-process batch mean.
    """
    def make():
        torch.manual_seed(0)
        return LightGCN(num_layers=2, num_users=40, num_items=30, embedding_dim=8, lr=0.01, eval_ks=(5, 10))

    single, ddp = fit_ddp_vs_single(make, _tiny_dm, 40, tmp_path, max_epochs=2, num_sanity_val_steps=0)
    _assert_same_run(single, ddp, atol=1e-5)


@pytest.mark.ddp
def test_lazily_sized_recommender_gets_its_trained_weights_back_from_ddp_spawn(tmp_path):
    """Sizes read from the data in ``setup``: the parent process's model must still receive the weights."""
    single, ddp = fit_ddp_vs_single(_seeded("MFBPR"), _tiny_dm, 32, tmp_path, max_epochs=2, num_sanity_val_steps=0,
                                    limit_val_batches=0)
    assert sorted(ddp.state_dict) == sorted(single.state_dict) == ["item_embedding.weight", "user_embedding.weight"]
    for run in (single, ddp):
        assert run.test_metrics["test_recall@10"] > 10 / 30 * 1.1, run.test_metrics  # trained, not a fresh init


# -- self-supervised modules and the kNN evaluation --------------------------------------------------------------

SSL = {"SimCLR": SimCLR, "VICReg": VICReg, "BarlowTwins": BarlowTwins}


def _ssl(name):
    def make():
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())  # no BatchNorm: exact comparison
        return SSL[name](backbone, image_size=8, proj_hidden_dim=32, proj_output_dim=16, proj_batch_norm=False,
                         augmentation=nn.Identity(), log_effective_rank=False, validate_ssl_loss=False, seed=0,
                         optimizer=partial(torch.optim.SGD, lr=0.05))

    return make


@pytest.mark.ddp
@pytest.mark.parametrize("name", sorted(SSL))
def test_ssl_module_and_knn_evaluation_in_two_processes_match_one(name, tmp_path):
    """Gathered loss on the global batch: parameters after 8 steps match one process (1e-4), and
    KNNEvaluation's val_knn_acc from two ranks equals the one-process value.

    SGD, not the default AdamW: Barlow Twins and VICReg are invariant to the last projector bias, whose gradient
    is 0 in exact arithmetic; AdamW divides that rounding noise by its own size and turns it into lr-sized steps
    of random sign, which differ between any two runs that sum in a different order (DDP or not).
    """
    single, ddp = fit_ddp_vs_single(
        _ssl(name), lambda b: DigitsDataModule(batch_size=b, drop_last=True), 64, tmp_path, test=False,
        max_epochs=2, limit_train_batches=4, limit_val_batches=2, num_sanity_val_steps=0,
        callbacks=[KNNEvaluation(k=5, max_bank_size=400)])
    torch.testing.assert_close(torch.tensor(ddp.curve("train_loss_epoch")),
                               torch.tensor(single.curve("train_loss_epoch")), atol=1e-4, rtol=0)
    for key, value in single.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[key], value, atol=1e-4, rtol=1e-4, msg=key)
    knn_single, knn_ddp = single.curve("val_knn_acc"), ddp.curve("val_knn_acc")
    assert len(knn_single) == len(knn_ddp) == 2 and knn_single[-1] > 0.5
    assert knn_ddp == pytest.approx(knn_single, abs=1e-6)
