"""A-SDM (lightning_ext/diffusion/a_sdm.py): feature inheritance (interval 1 is the plain sampler exactly; reuse
skips the deep levels and stays close), model assembly (weights inherited), the assembly distillation loss against
an implementation written from the equation, the distillation module (fit, teacher checkpoint, resume), bad
inputs."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DModel  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402

from lightning_ext.data.digits import DigitsDataModule  # noqa: E402
from lightning_ext.diffusion.a_sdm import (  # noqa: E402
    AssemblyDistillationModule,
    FeatureInheritance,
    assemble_unet,
    assembly_distillation_loss,
    block_features,
    inherit_weights,
)
from lightning_ext.diffusion.module import DiffusionModule  # noqa: E402
from lightning_ext.testing import crash_and_resume  # noqa: E402


def _unet(layers: int = 2, levels: int = 3, classes: bool = True, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    widths = (8, 16, 16)[:levels]
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=widths,
                       down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
                       layers_per_block=layers, norm_num_groups=4, num_class_embeds=11 if classes else None)


# ------------------------------------------------------------------ feature inheritance


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_interval_one_reproduces_the_plain_sampler_exactly(guidance):
    model = DiffusionModule(_unet(), num_train_timesteps=100).eval()
    labels = torch.tensor([0, 3, 7])
    plain = model.sample(labels, steps=8, guidance_scale=guidance, generator=torch.Generator().manual_seed(4))
    unet = model.denoiser
    model.denoiser = FeatureInheritance(unet, interval=1, shallow_levels=1)
    wrapped = model.sample(labels, steps=8, guidance_scale=guidance, generator=torch.Generator().manual_seed(4))
    assert torch.equal(plain, wrapped)
    assert model.denoiser.full_calls == 8 and model.denoiser.reuse_calls == 0


@pytest.mark.parametrize("shallow", [1, 2, 3])
def test_full_steps_match_the_unet_and_reuse_steps_use_the_cache(shallow):
    unet = _unet().eval()
    fi = FeatureInheritance(unet, interval=2, shallow_levels=shallow)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        a = fi(x, torch.tensor(90), y).sample
        torch.testing.assert_close(a, unet(x, torch.tensor(90), y).sample, rtol=0, atol=0)
        # a reuse step: the deep features of step 90 with the shallow levels of step 80, by hand
        x2 = x + 0.1 * torch.randn_like(x)
        b = fi(x2, torch.tensor(80), y).sample
        assert (fi.full_calls, fi.reuse_calls) == (1, 1)
        deep = {}
        first_shallow_up = 3 - shallow
        hook = (unet.up_blocks[first_shallow_up - 1] if first_shallow_up > 0 else unet.mid_block).register_forward_hook(
            lambda m, i, o: deep.setdefault("h", o))
        unet(x, torch.tensor(90), y)
        hook.remove()
        swap = unet.up_blocks[first_shallow_up].register_forward_pre_hook(
            lambda m, args: (deep["h"], *args[1:]))
        expected = unet(x2, torch.tensor(80), y).sample
        swap.remove()
        torch.testing.assert_close(b, expected)
        assert not torch.allclose(b, unet(x2, torch.tensor(80), y).sample)
        c = fi(x2, torch.tensor(70), y).sample  # interval 2: a full step again
        torch.testing.assert_close(c, unet(x2, torch.tensor(70), y).sample, rtol=0, atol=0)
        assert (fi.full_calls, fi.reuse_calls) == (2, 1)


def test_a_new_trajectory_drops_the_cache_and_early_dense_keeps_noisy_steps_full():
    unet = _unet().eval()
    fi = FeatureInheritance(unet, interval=3)
    x, y = torch.randn(1, 1, 8, 8), torch.tensor([5])
    with torch.no_grad():
        for t in (90, 60, 30):
            fi(x, torch.tensor(t), y)
        assert (fi.full_calls, fi.reuse_calls) == (1, 2)
        out = fi(x, torch.tensor(90), y).sample  # timestep went up: a new trajectory, full
        torch.testing.assert_close(out, unet(x, torch.tensor(90), y).sample, rtol=0, atol=0)
        assert (fi.full_calls, fi.reuse_calls) == (1, 0)
        fi(torch.randn(3, 1, 8, 8), torch.tensor(80), torch.tensor([1, 2, 3]))  # new batch shape: full
        assert fi.full_calls == 1 and fi.reuse_calls == 0
        dense = FeatureInheritance(unet, interval=2, mode="early_dense", dense_timestep=50)
        for t in (90, 80, 70, 40, 30, 20):
            dense(x, torch.tensor(t), y)
        assert (dense.full_calls, dense.reuse_calls) == (4, 2)  # 90, 80, 70 full; then 40 reuse, 30 full, 20 reuse


def test_reuse_sampling_is_faster_in_unet_work_and_close_to_plain():
    model = DiffusionModule(_unet(layers=1), num_train_timesteps=100).eval()
    labels = torch.arange(4)
    plain = model.sample(labels, steps=10, generator=torch.Generator().manual_seed(0))
    unet = model.denoiser
    calls = []
    hook = unet.mid_block.register_forward_hook(lambda *a: calls.append(1))
    model.denoiser = FeatureInheritance(unet, interval=2)
    fast = model.sample(labels, steps=10, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert len(calls) == 5 and model.denoiser.reuse_calls == 5
    assert torch.isfinite(fast).all() and not torch.equal(plain, fast)


def test_training_mode_with_gradients_never_caches():
    fi = FeatureInheritance(_unet().train(), interval=4)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    for t in (90, 80):
        out = fi(x, torch.tensor(t), y).sample
    torch.testing.assert_close(out, fi.unet(x, torch.tensor(80), y).sample)
    assert fi.full_calls == 0 and fi.reuse_calls == 0


# ------------------------------------------------------------------ assembly


def test_assembled_student_inherits_the_teachers_blocks():
    teacher = _unet(layers=2)
    student = assemble_unet(teacher, drop_layers=1)
    assert student.config.layers_per_block == 1 and len(student.up_blocks[0].resnets) == 2
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["down_blocks.1.resnets.0.conv1.weight"], t["down_blocks.1.resnets.0.conv1.weight"])
    assert torch.equal(s["up_blocks.0.resnets.1.conv1.weight"], t["up_blocks.0.resnets.2.conv1.weight"])
    assert torch.equal(s["mid_block.resnets.0.conv1.weight"], t["mid_block.resnets.0.conv1.weight"])
    assert torch.equal(s["class_embedding.weight"], t["class_embedding.weight"])
    assert inherit_weights(student, teacher) == []  # every student tensor has a same-shape teacher tensor
    with torch.no_grad():
        x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
        assert student(x, 5, y).sample.shape == teacher(x, 5, y).sample.shape


# ------------------------------------------------------------------ the assembly distillation loss


def _loss_by_hand(s_out, t_out, target, s_feats, t_feats, wt, wo, wf):
    """The equation, element by element: mean squared errors of task, output and each block feature."""
    def mse(a, b):
        d = (a - b).flatten()
        return (d * d).sum() / d.numel()
    feature = 0.0
    for s, t in zip(s_feats, t_feats):
        feature = feature + mse(s, t)
    return wt * mse(s_out, target) + wo * mse(s_out, t_out) + wf * feature


def test_assembly_distillation_loss_matches_the_equation_on_one_batch():
    teacher = _unet(layers=2, seed=1).eval()
    student = assemble_unet(teacher)
    torch.manual_seed(3)
    for p in student.parameters():  # move the student away from the teacher so every term is non-zero
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, y, eps = torch.randn(4, 1, 8, 8), torch.tensor([3, 40, 70, 99]), torch.tensor([0, 1, 2, 10]), \
        torch.randn(4, 1, 8, 8)
    with block_features(student) as sf:
        s_out = student(x, t, y).sample
    with torch.no_grad(), block_features(teacher) as tf:
        t_out = teacher(x, t, y).sample
    assert len(sf) == len(tf) == 7  # 3 down, mid, 3 up
    got = assembly_distillation_loss(s_out, t_out, eps, list(sf), list(tf), 0.5, 2.0, 0.3)
    # independent: features by calling the blocks by hand, not through hooks
    with torch.no_grad():
        def feats(net):
            emb = net.time_embedding(net.time_proj(t)) + net.class_embedding(y)
            h, out = net.conv_in(x), []
            res = (h,)
            for b in net.down_blocks:
                h, r = b(hidden_states=h, temb=emb)
                res += r
                out.append(h)
            h = net.mid_block(h, emb)
            out.append(h)
            for b in net.up_blocks:
                n = len(b.resnets)
                h, res = b(h, res[-n:], emb), res[:-n]
                out.append(h)
            return out
        expected = _loss_by_hand(s_out, t_out, eps, feats(student), feats(teacher), 0.5, 2.0, 0.3)
    torch.testing.assert_close(got["loss"], expected, rtol=1e-5, atol=1e-7)
    assert got["task"] > 0 and got["output"] > 0 and got["feature"] > 0
    got["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_module_training_step_is_the_loss_on_the_drawn_batch():
    teacher = _unet(layers=2, seed=1)
    model = AssemblyDistillationModule(teacher, num_train_timesteps=100, output_weight=2.0, feature_weight=0.5,
                                       cfg_dropout=0.0)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    loss = model.training_step((x, y), 0)
    # recompute with the module's own draws (same generator key) and the pure loss
    g = model._generator(0, 0, 0)
    tt = torch.randint(0, 100, (4,), generator=g)
    eps = torch.randn((4, 1, 8, 8), generator=g)
    x_t = model.noise_scheduler.add_noise(x, eps, tt)
    with block_features(model.denoiser) as sf:
        s_out = model.denoiser(x_t, tt, y).sample
    with torch.no_grad(), block_features(model.teacher) as tf:
        t_out = model.teacher(x_t, tt, y).sample
    expected = assembly_distillation_loss(s_out, t_out, eps, list(sf), list(tf), 1.0, 2.0, 0.5)["loss"]
    torch.testing.assert_close(loss, expected)
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())


def test_module_fits_with_a_teacher_checkpoint_and_samples(tmp_path):
    teacher = _unet(layers=2, seed=5)
    trained = DiffusionModule(_unet(layers=2, seed=6), num_train_timesteps=100)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "teacher.ckpt")  # a DiffusionModule checkpoint
    model = AssemblyDistillationModule(teacher, teacher_checkpoint="teacher.ckpt", num_train_timesteps=100,
                                       lr=1e-3, sample_images_every_n_epochs=0)
    trainer = Trainer(max_steps=2, limit_val_batches=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    for k, v in trained.denoiser.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[k], v), k
    assert math.isfinite(float(trainer.callback_metrics["train_total_loss"]))
    assert float(trainer.callback_metrics["train_distill_feature"]) >= 0
    assert model.sample(torch.tensor([2]), steps=2).shape == (1, 1, 8, 8)


def _resume_model():
    return AssemblyDistillationModule(_unet(layers=2, seed=2), num_train_timesteps=100, lr=1e-3, seed=3,
                                      sample_images_every_n_epochs=0)


@pytest.mark.slow
def test_crash_and_resume_mid_epoch_is_bit_identical(tmp_path):
    full, resumed, info = crash_and_resume(
        _resume_model, lambda: DigitsDataModule(batch_size=32), lambda: [], max_epochs=2, crash_step=9,
        checkpoint_every_n_steps=4, tmp_path=tmp_path, limit_train_batches=6, limit_val_batches=1, weights_only=True)
    assert info["resumed_from_step"] == 8  # mid-epoch: epoch 2 holds steps 7-12
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("make, match", [
    (lambda: FeatureInheritance(torch.nn.Linear(2, 2)), "UNet2DModel"),
    (lambda: FeatureInheritance(_unet(), interval=0), "interval"),
    (lambda: FeatureInheritance(_unet(), shallow_levels=4), "shallow_levels"),
    (lambda: FeatureInheritance(_unet(), mode="fast"), "mode"),
    (lambda: FeatureInheritance(_unet(), dense_timestep=-1), "dense_timestep"),
    (lambda: assemble_unet(_unet(layers=1)), "drop_layers"),
    (lambda: AssemblyDistillationModule(_unet(), output_weight=float("nan")), "output_weight"),
    (lambda: AssemblyDistillationModule(_unet(), teacher_checkpoint=""), "teacher_checkpoint"),
    (lambda: AssemblyDistillationModule(torch.nn.Linear(2, 2)), "UNet2DModel"),
    (lambda: AssemblyDistillationModule(_unet(), drop_layers=0), "drop_layers"),
])
def test_bad_arguments_fail_with_one_line(make, match):
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_mismatched_features_fail_with_one_line():
    a = [torch.zeros(1, 2, 4, 4)]
    with pytest.raises(ValueError, match="same widths") as err:
        assembly_distillation_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), a, [torch.zeros(1, 3, 4, 4)])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="blocks"):
        assembly_distillation_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), a, a + a)


def test_missing_teacher_checkpoint_fails_with_one_line(tmp_path):
    model = AssemblyDistillationModule(_unet(), teacher_checkpoint="nope.pt", num_train_timesteps=100)
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="teacher_checkpoint") as err:
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert "\n" not in str(err.value)

