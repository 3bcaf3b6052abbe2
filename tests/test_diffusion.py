"""The diffusion family: DiT-MoE's SparseMoE (gate and balance loss against implementations written from the
equations), DiTMoE, DiffusionModule (DDPM loss, sampling, resume mid-epoch), ExpertRoutingStats."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from lightning.pytorch import Trainer  # noqa: E402

from lightning_ext.data.digits import DigitsDataModule  # noqa: E402
from lightning_ext.diffusion.dit_moe import DiTMoE  # noqa: E402
from lightning_ext.diffusion.module import DiffusionModule  # noqa: E402
from lightning_ext.diffusion.routing_stats import ExpertRoutingStats, routing_mutual_information  # noqa: E402
from lightning_ext.diffusion.sparse_moe import SparseMoE, moe_balance_loss  # noqa: E402
from lightning_ext.testing import crash_and_resume  # noqa: E402


def _tiny_net(**kw) -> DiTMoE:
    args = dict(input_size=8, patch_size=4, hidden_size=16, depth=2, num_heads=2, num_classes=10, num_experts=4)
    args.update(kw)
    return DiTMoE(**args)


# ------------------------------------------------------------------ balance loss and gate vs the equations


def _balance_loss_by_hand(scores, idx, alpha):
    """alpha * sum_i (E f_i) P_i with f_i = share of (token, slot) assignments to i, P_i = mean prob of i."""
    t, e = scores.shape
    k = idx.shape[1]
    total = 0.0
    for i in range(e):
        f_i = sum(int(idx[a, b] == i) for a in range(t) for b in range(k)) / (t * k)
        p_i = sum(scores[a, i] for a in range(t)) / t
        total = total + e * f_i * p_i
    return alpha * total


def test_balance_loss_matches_the_equation_and_its_gradient_flows_only_through_p():
    torch.manual_seed(0)
    logits = torch.randn(12, 5, requires_grad=True)
    scores = logits.softmax(-1)
    idx = scores.topk(2, dim=-1).indices
    ours = moe_balance_loss(scores, idx, alpha=0.01)
    ref = _balance_loss_by_hand(scores, idx, 0.01)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)
    # d loss / d scores[t, i] = alpha * E * f_i / T (the counts carry no gradient)
    s = scores.detach().requires_grad_(True)
    moe_balance_loss(s, idx, alpha=0.01).backward()
    f = torch.bincount(idx.reshape(-1), minlength=5).float() / idx.numel()
    torch.testing.assert_close(s.grad, (0.01 * 5 * f / 12).expand(12, 5))


def test_uniform_routing_gives_alpha_and_collapse_gives_more():
    scores = torch.full((8, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)
    collapsed = torch.zeros(8, 2, dtype=torch.long)
    assert float(moe_balance_loss(scores, balanced, 0.01)) == pytest.approx(0.01)
    peaked = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(8, 4)
    assert float(moe_balance_loss(peaked, collapsed, 0.01)) > 0.02


def _swiglu(x, mlp):
    return F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T) @ mlp.down_proj.weight.T


def _moe_by_hand(moe: SparseMoE, x: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """Token by token: s = softmax(W_g x); the k largest s_i; y = sum s_i E_i(x) (+ shared)."""
    out = []
    for tok in x.reshape(-1, x.shape[-1]):
        s = torch.exp(moe.router.detach() @ tok)
        s = s / s.sum()
        order = sorted(range(len(s)), key=lambda i: -float(s[i]))[:moe.top_k]
        w = [s[i] for i in order]
        if renormalize:
            w = [wi / sum(w) for wi in w]
        y = sum(wi * _swiglu(tok, moe.experts[i]) for wi, i in zip(w, order))
        if moe.shared_expert is not None:
            y = y + _swiglu(tok, moe.shared_expert)
        out.append(y)
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("renormalize", [False, True])
def test_sparse_moe_matches_the_gate_equations(renormalize):
    torch.manual_seed(0)
    moe = SparseMoE(8, num_experts=4, top_k=2, expert_hidden_mult=1.5, shared_hidden_mult=1.0,
                    renormalize=renormalize).train()
    x = torch.randn(3, 5, 8)
    y, aux = moe(x)
    torch.testing.assert_close(y, _moe_by_hand(moe, x, renormalize), rtol=1e-5, atol=1e-6)
    scores = (x.reshape(-1, 8) @ moe.router.T).softmax(-1)
    torch.testing.assert_close(aux, _balance_loss_by_hand(scores, scores.topk(2, -1).indices, 0.01))
    moe.eval()
    y_eval, aux_eval = moe(x)
    torch.testing.assert_close(y_eval, y)
    assert float(aux_eval) == 0.0


def test_top_k_weights_are_not_renormalised_by_default():
    torch.manual_seed(0)
    moe = SparseMoE(8, num_experts=8, top_k=2)
    _, _, weight = moe.route(torch.randn(20, 8))
    assert bool((weight.sum(-1) < 1).all())


def test_capacity_drops_assignments_beyond_the_cap():
    torch.manual_seed(0)
    moe = SparseMoE(8, num_experts=2, top_k=1, shared_hidden_mult=0.0, capacity_factor=0.5)
    x = torch.randn(1, 8, 8)
    y, _ = moe(x)
    idx = moe.last_routing.reshape(-1)
    cap = math.ceil(0.5 * 8 / 2)
    seen = {0: 0, 1: 0}
    for t, e in enumerate(idx.tolist()):
        seen[e] += 1
        if seen[e] > cap:
            assert torch.count_nonzero(y[0, t]) == 0
        else:
            assert torch.count_nonzero(y[0, t]) > 0


def test_balance_loss_trains_routing_towards_balance():
    torch.manual_seed(0)
    moe = SparseMoE(8, num_experts=4, top_k=1, shared_hidden_mult=0.0, balance_alpha=1.0)
    with torch.no_grad():
        moe.router[0] += 3.0 * torch.ones(8)  # most tokens (with positive mean) go to expert 0
    x = torch.randn(256, 8) + 1.0
    opt = torch.optim.SGD([moe.router], lr=0.5)
    first = None
    for _ in range(60):
        _, aux = moe(x)
        first = float(aux) if first is None else first
        opt.zero_grad()
        aux.backward()
        opt.step()
    counts = torch.bincount(moe.last_routing.reshape(-1), minlength=4)
    assert float(aux) < first and int(counts.max()) < 256


# ------------------------------------------------------------------ DiTMoE


def test_dense_and_moe_have_equal_active_mlp_parameters():
    d = 16
    dense, moe = _tiny_net(mlp="dense", num_experts=8), _tiny_net(mlp="moe", num_experts=8)
    dense_mlp = sum(p.numel() for p in dense.blocks[0].mlp.parameters())
    layer = moe.blocks[0].mlp
    active = 2 * sum(p.numel() for p in layer.experts[0].parameters()) + \
        sum(p.numel() for p in layer.shared_expert.parameters())
    assert dense_mlp == active == 12 * d * d
    assert len(moe.moe_layers()) == 2 and not dense.moe_layers()


def test_dit_moe_is_class_conditional_and_returns_the_summed_balance_loss():
    torch.manual_seed(0)
    net = _tiny_net()
    for p in net.parameters():  # adaLN-Zero starts as the identity: perturb so labels matter
        p.data += 0.05 * torch.randn_like(p)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 10])
    a, aux = net(x, t, torch.tensor([1, 1]))
    b, _ = net(x, t, torch.tensor([2, 2]))
    assert not torch.allclose(a, b)
    assert float(aux) > 0 and a.shape == x.shape


# ------------------------------------------------------------------ DiffusionModule


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddpm_loss_matches_the_forward_process(prediction):
    torch.manual_seed(0)
    model = DiffusionModule(_tiny_net(balance_alpha=0.0), prediction=prediction, num_train_timesteps=100)
    x0, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    loss, _ = model.diffusion_loss(x0, y, model._generator(5), False)
    g = model._generator(5)  # the same draws, by hand: t, then eps
    t = torch.randint(0, 100, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    betas = torch.linspace(1e-4, 0.02, 100, dtype=torch.float32)
    abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    target = {"eps": eps, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0, "x0": x0}[prediction]
    pred, _ = model.denoiser(x_t, t, y)
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_sampling_shapes_guidance_and_ddpm():
    model = DiffusionModule(_tiny_net(), num_train_timesteps=50)
    g = torch.Generator().manual_seed(0)
    assert model.sample(torch.tensor([0, 9]), steps=4, guidance_scale=2.0, generator=g).shape == (2, 1, 8, 8)
    assert model.sample(torch.tensor([3]), steps=3, sampler="ddpm", generator=g).shape == (1, 1, 8, 8)
    a = model.sample(torch.tensor([1]), steps=3, generator=torch.Generator().manual_seed(1))
    b = model.sample(torch.tensor([1]), steps=3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)


def test_a_diffusers_unet_trains_as_the_denoiser():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=11)
    model = DiffusionModule(unet, num_train_timesteps=100, lr=1e-3)
    trainer = Trainer(max_steps=2, limit_val_batches=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))
    assert model.sample(torch.tensor([2]), steps=2).shape == (1, 1, 8, 8)


def _resume_model():
    torch.manual_seed(0)
    return DiffusionModule(_tiny_net(depth=1), num_train_timesteps=100, lr=1e-3, seed=3,
                           sample_images_every_n_epochs=0)


@pytest.mark.slow
def test_crash_and_resume_mid_epoch_is_bit_identical(tmp_path):
    full, resumed, info = crash_and_resume(
        _resume_model, lambda: DigitsDataModule(batch_size=32), lambda: [ExpertRoutingStats(plot_every_n_epochs=0)],
        max_epochs=2, crash_step=13, checkpoint_every_n_steps=4, tmp_path=tmp_path, limit_train_batches=8,
        limit_val_batches=1, weights_only=True)
    assert info["resumed_from_step"] == 12  # mid-epoch: epoch 2 holds steps 9-16
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert info["full_callbacks"][0].history == info["resumed_callbacks"][0].history


# ------------------------------------------------------------------ ExpertRoutingStats


def test_mutual_information_matches_scikit_learn():
    from sklearn.metrics import mutual_info_score

    rng = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (500,), generator=rng)
    e = (a + torch.randint(0, 3, (500,), generator=rng)) % 4
    table = torch.zeros(5, 4)
    table.index_put_((a, e), torch.ones(500), accumulate=True)
    assert routing_mutual_information(table) == pytest.approx(mutual_info_score(a.numpy(), e.numpy()), abs=1e-9)


def test_routing_stats_count_every_assignment_and_log_per_layer(tmp_path):
    stats = ExpertRoutingStats(timestep_bins=5, plot_dir="routing")
    model = DiffusionModule(_tiny_net(), num_train_timesteps=100, sample_images_every_n_epochs=0)
    trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=3, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[stats], default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    tokens = 3 * 16 * 4 * 2  # batches x images x tokens x top-k
    for key in ("timestep", "class", "position"):
        assert [int(t.sum()) for t in stats.counts[key]] == [tokens, tokens]
    metrics = trainer.callback_metrics
    for name in ("mi_timestep_l0", "mi_class_l1", "mi_position_l0", "load_cv_l1", "min_share_l0"):
        assert f"routing/{name}" in metrics
    assert list(tmp_path.rglob("routing/epoch_001.png"))


def test_routing_stats_refuses_a_dense_model():
    model = DiffusionModule(_tiny_net(mlp="dense"), num_train_timesteps=100)
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, callbacks=[ExpertRoutingStats()],
                      enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="no SparseMoE layer"):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))


# ------------------------------------------------------------------ bad inputs and the missing extra


@pytest.mark.parametrize("make, match", [
    (lambda: SparseMoE(8, num_experts=2, top_k=3), "top_k"),
    (lambda: SparseMoE(8, balance_alpha=float("nan")), "balance_alpha"),
    (lambda: _tiny_net(patch_size=3), "patch_size"),
    (lambda: _tiny_net(num_heads=3), "num_heads"),
    (lambda: DiffusionModule(_tiny_net(), cfg_dropout=1.0), "cfg_dropout"),
    (lambda: DiffusionModule("unet"), "denoiser"),
    (lambda: DiffusionModule(_tiny_net(), prediction="score"), "prediction"),
    (lambda: ExpertRoutingStats(timestep_bins=0), "timestep_bins"),
])
def test_bad_arguments_fail_with_one_line(make, match):
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_bad_batches_fail_with_one_line():
    model = DiffusionModule(_tiny_net(), num_classes=10)
    with pytest.raises(ValueError, match="num_classes: 13"):
        model._batch((torch.randn(2, 1, 8, 8), torch.tensor([1, 12])))
    with pytest.raises(ValueError, match="DiTMoE expects images"):
        model.denoiser(torch.randn(2, 1, 9, 9), torch.tensor([1, 2]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"image batches \(B, C, H, W\)"):
        model._batch((torch.randn(2, 64), torch.tensor([1, 2])))


def test_missing_diffusers_names_the_extra(monkeypatch):
    for name in [m for m in list(sys.modules) if m == "diffusers" or m.startswith("diffusers.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "lightning-ext\[diffusion\]"'):
        DiffusionModule(torch.nn.Linear(2, 2))
    with pytest.raises(ModuleNotFoundError, match=r'pip install "lightning-ext\[diffusion\]"'):
        DiTMoE()
