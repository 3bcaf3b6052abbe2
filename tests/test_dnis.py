"""DNIS: the soft dimension-selection embedding, its pruning, the bi-level search loss against an independent
implementation from the paper's equations, and the Lightning module's phases, resume and bad inputs.

Conventions from github.com/Viperccc/AutoSrh (read, not copied): ids ranked by descending frequency and cut into
equal feature blocks; α ∈ [0, 1]^{F×K} scales dimension blocks (``e ⊙ repeat(α[f])``); the architecture step
minimises ``loss_val + l1 · Σ|α|`` by SGD with each feature block's gradient divided by its mean absolute value,
then clamps α to [0, 1]; the backbone is frozen during the search.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import TensorDataset

from lightning_ext.core.sampling import epoch_loader
from lightning_ext.recsys.dnis import DNISEmbedding
from lightning_ext.recsys.dnis_recommender import DNISRecommender, normalized_alpha_grad
from lightning_ext.testing import crash_and_resume, fit_ddp_vs_single

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyRatings(LightningDataModule):
    """Ratings from a rank-2 model over 30 users x 40 items (ids 0..69), DNIS's combined train/search batches."""

    num_ids = 70

    def __init__(self, batch_size=64):
        super().__init__()
        rng = np.random.default_rng(0)
        u, i = rng.integers(30, size=1500), rng.integers(40, size=1500)
        p, q = rng.normal(size=(30, 2)), rng.normal(size=(40, 2))
        r = 3 + (p[u] * q[i]).sum(1) + 0.1 * rng.normal(size=1500)
        ids = torch.as_tensor(np.stack([u, 30 + i], 1))
        r = torch.as_tensor(r, dtype=torch.float32)
        self.sets = [TensorDataset(ids[a:b], r[a:b]) for a, b in ((0, 1000), (1000, 1300), (1300, 1500))]
        self.frequency = np.bincount(ids[:1000].reshape(-1).numpy(), minlength=70).astype(float).tolist()
        self.train_mean, self.batch_size = 3.0, batch_size

    def train_dataloader(self):
        trainer = self.trainer if self._trainer_attached() else None  # shard over ranks under DDP
        return CombinedLoader({"train": epoch_loader(self.sets[0], self.batch_size, train=True, seed=0, trainer=trainer),
                               "search": epoch_loader(self.sets[1], self.batch_size, train=True, seed=1,
                                                      trainer=trainer)},
                              mode="max_size_cycle")

    def _trainer_attached(self) -> bool:
        return getattr(self, "trainer", None) is not None

    def val_dataloader(self):
        return epoch_loader(self.sets[1], 256, train=False)

    def test_dataloader(self):
        return epoch_loader(self.sets[2], 256, train=False)


def test_frequency_blocks_and_the_soft_selection_is_e_times_repeated_alpha():
    freq = [5, 0, 9, 1, 7, 3, 2, 8]
    emb = DNISEmbedding(8, dim=6, frequency=freq, feature_blocks=4, dim_blocks=3)
    assert emb.block.tolist() == [1, 3, 0, 3, 1, 2, 2, 0]  # ids 2, 7 (counts 9, 8) are block 0, ...
    with torch.no_grad():
        emb.alpha.uniform_()
    ids = torch.tensor([0, 2, 7, 1])
    ref = torch.stack([emb.weight[i] * emb.alpha[emb.block[i]].repeat_interleave(2) for i in ids.tolist()])
    torch.testing.assert_close(emb(ids), ref)
    norm = DNISEmbedding(8, dim=6, frequency=freq, feature_blocks=4, dim_blocks=3, normalize=True)
    with torch.no_grad():
        norm.alpha.copy_(emb.alpha)
        norm.weight.copy_(emb.weight)
    a = emb.alpha[emb.block[ids]]
    torch.testing.assert_close(norm(ids), emb.weight[ids] * (a / a.sum(1, keepdim=True) * 3).repeat_interleave(2, 1))


def test_prune_to_a_budget_keeps_the_largest_alpha_and_leaves_the_function_unchanged():
    emb = DNISEmbedding(40, dim=8, frequency=list(range(40, 0, -1)), feature_blocks=4, dim_blocks=4)
    with torch.no_grad():
        emb.alpha.copy_(torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.9, 0.5, 0.4, 0.1], [0.3, 0.2, 0.05, 0.0],
                                      [0.1, 0.0, 0.0, 0.0]]))
    ids = torch.arange(40)
    before = emb(ids).detach().clone()
    mask = emb.prune(budget=0.5)
    assert mask.sum() == 8 and mask[0].all() and mask[1, :2].all() and not mask[3].any()
    assert emb.parameter_count() == 8 * 10 * 2 <= 0.5 * 40 * 8
    kept = mask.repeat_interleave(2, 1)[emb.block]
    torch.testing.assert_close(emb(ids), before * kept)  # kept dims unchanged, pruned dims zero
    assert not emb.alpha.requires_grad
    copy = DNISEmbedding(40, dim=8, feature_blocks=4, dim_blocks=4, search_space="feature_block")
    fb = DNISEmbedding(40, dim=8, feature_blocks=4, dim_blocks=4, search_space="feature_block")
    fb.prune(threshold=0.5)
    copy.load_state_dict(fb.state_dict())  # the pruned (F, K) mask loads into a (F, 1) search space
    torch.testing.assert_close(copy(ids), fb(ids))


def _reference_prediction(ids, weight, alpha, block, bias, mu, layers):
    """r̂ = μ + b_u + b_i + MLP([e_u ⊙ α_u ‖ e_i ⊙ α_i]) written from the paper's equations."""
    per = weight.shape[1] // alpha.shape[1]
    e = weight[ids] * torch.repeat_interleave(alpha, per, dim=1)[block[ids]]
    h = e.reshape(len(ids), -1)
    for k, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if k < len(layers) - 1:
            h = torch.relu(h)
    return mu + bias[ids].sum((1, 2)) + h.squeeze(-1)


def test_search_loss_and_alpha_gradient_match_the_paper():
    torch.manual_seed(0)
    model = DNISRecommender(num_ids=20, embedding_dim=8, dim_blocks=4, feature_blocks=2, mlp_hidden=[6], l1=0.01)
    with torch.no_grad():
        model.embedding.alpha.uniform_(0.2, 1.0)
        model.bias.weight.normal_()
    ids, rating = torch.tensor([[0, 12], [5, 19], [3, 10]]), torch.tensor([4.0, 2.0, 5.0])
    loss = model.search_loss(ids, rating)
    loss.backward()
    alpha = model.embedding.alpha.detach().clone().requires_grad_()
    layers = [(m.weight.detach(), m.bias.detach()) for m in model.backbone if isinstance(m, torch.nn.Linear)]
    pred = _reference_prediction(ids, model.embedding.weight.detach(), alpha, model.embedding.block,
                                 model.bias.weight.detach(), model.global_bias.detach(), layers)
    ref = ((pred - rating) ** 2).mean() + 0.01 * alpha.abs().sum()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(model.embedding.alpha.grad, alpha.grad)
    g = alpha.grad
    torch.testing.assert_close(normalized_alpha_grad(g), g / g.abs().mean(1, keepdim=True))


def test_phases_freeze_the_backbone_in_search_and_prune_to_the_budget():
    seed_everything(0)
    snaps = {}

    class Snap(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            snaps[trainer.current_epoch] = [p.detach().clone() for p in pl_module.backbone.parameters()]

    model = DNISRecommender(embedding_dim=8, dim_blocks=4, feature_blocks=5, lr_w=3e-2, lr_a=5e-2,
                            warm_start_epochs=3, search_epochs=2, prune_budget=0.5)
    trainer = Trainer(max_epochs=9, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[Snap()])
    trainer.fit(model, datamodule=TinyRatings())
    assert not all(torch.equal(a, b) for a, b in zip(snaps[0], snaps[1]))  # warm start trains the backbone
    assert all(torch.equal(a, b) for a, b in zip(snaps[3], snaps[5]))  # frozen through the search
    assert bool(model.embedding.pruned) and model.embedding.parameter_count() <= 0.5 * 70 * 8
    assert set(model.embedding.alpha.unique().tolist()) <= {0.0, 1.0}
    variance = float(TinyRatings().sets[1].tensors[1].var())
    assert float(trainer.callback_metrics["val_mse"]) < 0.8 * variance


def test_crash_and_resume_mid_search_ends_with_the_same_weights(tmp_path):
    def make():
        seed_everything(0)  # the tables are built here (num_ids given), from the same seed in every run
        return DNISRecommender(num_ids=70, embedding_dim=8, dim_blocks=4, feature_blocks=5, lr_w=1e-2, lr_a=5e-2,
                               warm_start_epochs=1, search_epochs=2, prune_budget=0.5)

    full, resumed, info = crash_and_resume(make, TinyRatings, lambda: [], max_epochs=4, crash_epoch=3,
                                           tmp_path=tmp_path, weights_only=True, num_sanity_val_steps=0)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    full, resumed, info = crash_and_resume(make, TinyRatings, lambda: [], max_epochs=3, crash_step=30,
                                           checkpoint_every_n_steps=5, tmp_path=tmp_path / "mid",
                                           weights_only=True, num_sanity_val_steps=0, limit_val_batches=0)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kwargs, name", [
    ({"backbone": "deepfm"}, "backbone"), ({"prune_budget": 0.0}, "prune_budget"), ({"lr_a": float("nan")}, "lr_a"),
    ({"dim_blocks": 5}, "dim_blocks"), ({"search_space": "grid"}, "search_space"), ({"l1": -1.0}, "l1"),
    ({"warm_start_epochs": -1}, "warm_start_epochs"),
])
def test_bad_arguments_are_refused_with_one_line(kwargs, name):
    with pytest.raises(ValueError, match=name) as err:
        DNISRecommender(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_ids_frequencies_and_prune_calls_are_refused():
    emb = DNISEmbedding(10, dim=4, dim_blocks=2, feature_blocks=2)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        emb(torch.tensor([10]))
    with pytest.raises(ValueError, match="integer"):
        emb(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="frequency"):
        DNISEmbedding(3, dim=4, dim_blocks=2, feature_blocks=1, frequency=[1, 2])
    with pytest.raises(ValueError, match="exactly one"):
        emb.prune()
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        DNISRecommender(num_ids=10, embedding_dim=4, dim_blocks=2, feature_blocks=2)(torch.tensor([1, 2]))


@pytest.mark.ddp
def test_two_processes_match_one_through_warm_start_search_and_pruning(tmp_path):
    """Both optimisers' steps (manual optimisation), the search's alpha and the pruning at the phase change are the
    same in two gloo processes with half the batch each as in one process."""
    def make():
        seed_everything(0)
        return DNISRecommender(num_ids=70, embedding_dim=8, dim_blocks=4, feature_blocks=5, lr_w=1e-2, lr_a=5e-2,
                               warm_start_epochs=1, search_epochs=1, prune_budget=0.5)

    single, ddp = fit_ddp_vs_single(make, lambda b: TinyRatings(batch_size=b), 64, tmp_path, max_epochs=3,
                                    ddp_kwargs={"find_unused_parameters": True}, limit_train_batches=6,
                                    num_sanity_val_steps=0)
    assert single.state_dict.keys() == ddp.state_dict.keys() and "embedding.alpha" in single.state_dict
    assert set(single.state_dict["embedding.alpha"].unique().tolist()) <= {0.0, 1.0}  # pruned in both runs
    for k, v in single.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[k], v, atol=1e-5, rtol=1e-4, msg=k)
    assert ddp.final_metrics["val_mse"] == pytest.approx(single.final_metrics["val_mse"], rel=1e-4)


def test_ddp_without_find_unused_parameters_is_refused_in_setup_with_one_line():
    from types import SimpleNamespace

    model = DNISRecommender(num_ids=70, embedding_dim=8, dim_blocks=4, feature_blocks=5)
    ddp = SimpleNamespace(_ddp_kwargs={}, world_size=2)
    model._trainer = SimpleNamespace(strategy=ddp, world_size=2, datamodule=None)
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true") as err:
        model.setup("fit")
    assert "\n" not in str(err.value)
    ddp._ddp_kwargs["find_unused_parameters"] = True
    model.setup("fit")  # accepted
