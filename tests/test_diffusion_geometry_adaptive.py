"""Geometry-adaptive harmonic representations (Kadkhodaie et al., ICLR 2024): BiasFreeUNet's homogeneity, the blind
denoising loss against an implementation written from the official trainer, the sampler against its equations,
the Jacobian against row-by-row autograd and finite differences, the generalisation probe, BlindDenoiserModule."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from lightning_ext.data.digits import DigitsDataModule
from lightning_ext.diffusion.bias_free_unet import BFBatchNorm2d, BiasFreeUNet
from lightning_ext.diffusion.blind_denoiser import BlindDenoiserModule
from lightning_ext.diffusion.geometry_adaptive import (
    GeneralizationProbe,
    blind_denoising_loss,
    blind_noise_sigmas,
    disjoint_subsets,
    jacobian_eigenbasis,
    nearest_cosine,
    sample_blind,
    step_size,
)
from lightning_ext.testing import crash_and_resume


def _trained_unet(seed: int = 0, **kw) -> BiasFreeUNet:
    """A small BiasFreeUNet after a few training steps (running sds and gains away from their initial values)."""
    torch.manual_seed(seed)
    net = BiasFreeUNet(**{"base_channels": 4, "num_blocks": 2, **kw})
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(5):
        x = torch.rand(8, net.in_channels, 8, 8)
        noise = 0.2 * torch.randn_like(x)
        loss = blind_denoising_loss(net(x + noise), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


# ------------------------------------------------------------------ BiasFreeUNet


@pytest.mark.parametrize("a", [0.3, 2.5, 17.0])
def test_bias_free_unet_is_homogeneous_in_eval_mode(a):
    net = _trained_unet()
    assert all(getattr(m, "bias", None) is None for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    y = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    net = net.double()
    torch.testing.assert_close(net(a * y), a * net(y), rtol=1e-10, atol=1e-12)
    assert net(y).abs().max() > 1e-6  # not trivially zero


def test_a_bias_or_a_mean_subtracting_norm_breaks_homogeneity():
    net = _trained_unet().double()
    y = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    conv = net.encoder[0][0]
    conv.bias = nn.Parameter(torch.full((conv.out_channels,), 0.1, dtype=torch.float64))
    assert not torch.allclose(net(3 * y), 3 * net(y), atol=1e-6)


def test_bf_batchnorm_divides_by_the_batch_sd_without_centering_and_tracks_it():
    bn = BFBatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    sd = torch.sqrt(x.var(dim=(0, 2, 3), keepdim=True, unbiased=False) + 1e-5)
    torch.testing.assert_close(bn(x), x / sd * bn.gammas)
    torch.testing.assert_close(bn.running_sd, 0.9 + 0.1 * sd)
    bn.eval()
    torch.testing.assert_close(bn(x), x / bn.running_sd * bn.gammas)
    assert float(bn.gammas.detach().abs().max()) <= 0.025


def test_bias_free_unet_layout_matches_the_official_unet():
    net = BiasFreeUNet(base_channels=64, num_blocks=3)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 * 2 + 2 + 3 * 2  # encoder, middle, decoder (the last a plain conv to the image)
    assert net.mid[0].in_channels == 256 and net.mid[0].out_channels == 512
    assert net.decoder[0][-1].out_channels == 1
    assert net(torch.rand(2, 1, 16, 16)).shape == (2, 1, 16, 16)


# ------------------------------------------------------------------ the loss vs the official trainer


def _official_one_batch(model, clean, generator, noise_level_range=(0, 255)):
    """Written from code/dataloader_func.py::add_noise_torch (quadratic) and code/trainer.py::one_iter (skip=True)."""
    n = clean.size()[0]
    std = torch.rand(size=(n, 1, 1, 1), generator=generator)
    std = std * (noise_level_range[1] ** .5 - noise_level_range[0] ** .5) + noise_level_range[0] ** .5
    std = std ** 2
    std = std / 255
    noise_samples = torch.randn(size=clean.size(), generator=generator) * std
    noisy = noise_samples + clean
    output = model(noisy)
    criterion = nn.MSELoss(reduction="sum")
    return criterion(output, noise_samples) / (clean.size()[0])


@pytest.mark.parametrize("sigma_range", [(0, 255), (5, 100)])
def test_blind_loss_matches_the_official_one_batch(sigma_range):
    torch.manual_seed(0)
    module = BlindDenoiserModule(BiasFreeUNet(base_channels=4, num_blocks=2), sigma_range=sigma_range)
    clean = torch.rand(6, 1, 8, 8)
    ours = module.training_loss(clean, torch.Generator().manual_seed(3))
    ref = _official_one_batch(module.net, clean, torch.Generator().manual_seed(3), sigma_range)
    torch.testing.assert_close(ours, ref)
    # the reduction: sum over pixels, mean over images (not the mean over pixels)
    assert ours.item() > 10 * (ref / clean[0].numel()).item()


def test_noise_levels_are_uniform_on_the_square_root_scale():
    s = blind_noise_sigmas(200_000, (0, 255), True, 255.0, torch.Generator().manual_seed(0)).flatten()
    root = (s * 255).sqrt() / math.sqrt(255)
    assert abs(float(root.mean()) - 0.5) < 0.005 and abs(float(root.quantile(0.25)) - 0.25) < 0.005
    assert abs(float((s < 0.25).float().mean()) - 0.5) < 0.005  # half the images below sigma = 1/4 (uniform: 1/4)
    linear = blind_noise_sigmas(200_000, (0, 255), False, 255.0, torch.Generator().manual_seed(0)).flatten()
    assert abs(float((linear < 0.25).float().mean()) - 0.25) < 0.005


# ------------------------------------------------------------------ the sampler vs its equations


def _official_synthesis(f, shape, h0, beta, sigma0, sigma_L, generator, init_mean=0.0):
    """One image at a time, as code/algorithm_inv_prob.py::univ_inv_sol without a measurement (M = 0)."""
    n = math.prod(shape[1:])
    y = torch.normal(torch.full(shape, init_mean), sigma0, generator=generator)
    sigma = torch.norm(f(y)) / math.sqrt(n)
    t, hs, gammas = 1, [], []
    while sigma > sigma_L:
        h = h0 * t / (1 + (h0 * (t - 1)))
        d = f(y)
        sigma = torch.norm(d) / math.sqrt(n)
        gamma = sigma * math.sqrt((1 - (beta * h)) ** 2 - (1 - h) ** 2)
        noise = torch.randn(shape, generator=generator)
        y = y - h * d + gamma * noise
        hs.append(h)
        gammas.append(float(gamma))
        t += 1
    return y - f(y), hs, gammas


@pytest.mark.parametrize("h0, beta", [(0.01, 0.01), (0.1, 0.3)])
def test_sampler_follows_the_official_iteration(h0, beta):
    mu = torch.rand(1, 1, 6, 6)
    f = lambda y: 0.3 * (y - mu)  # noqa: E731 - a linear denoiser with a known fixed point
    out = sample_blind(f, (1, 1, 6, 6), h0=h0, beta=beta, sigma0=1.0, sigma_L=0.01, seed=7)
    ref, hs, gammas = _official_synthesis(f, (1, 1, 6, 6), h0, beta, 1.0, 0.01, torch.Generator().manual_seed(7))
    assert int(out.num_steps[0]) == len(hs) > 10
    assert out.h == pytest.approx(hs)
    assert [float(g[0]) for g in out.gammas] == pytest.approx(gammas, rel=1e-5)
    torch.testing.assert_close(out.images, ref, rtol=1e-4, atol=1e-5)
    assert out.h == pytest.approx([h0 * t / (1 + h0 * (t - 1)) for t in range(1, len(hs) + 1)])
    assert step_size(1, h0) == pytest.approx(h0) and step_size(10 ** 6, h0) == pytest.approx(1, abs=1e-3)
    assert float(out.sigmas[-1][0]) < 0.01 <= float(out.sigmas[-2][0])
    assert not bool(out.diverged.any())


def test_sampler_stops_each_image_on_its_own_and_caps_iterations():
    f = lambda y: 0.5 * y  # noqa: E731 - sigma_t = ||y|| / 2 sqrt(N): the fainter start stops earlier
    init = torch.ones(2, 1, 4, 4) * torch.tensor([1.0, 0.1]).view(2, 1, 1, 1)
    out = sample_blind(f, (2, 1, 4, 4), h0=0.05, beta=0.2, seed=0, init=init)
    first, second = out.num_steps.tolist()
    assert 0 < second < first
    assert all(float(g[1]) == 0.0 for g in out.gammas[second:])  # frozen once stopped
    capped = sample_blind(f, (2, 1, 4, 4), h0=0.05, beta=0.2, seed=0, init=init, max_steps=5)
    assert capped.num_steps.tolist() == [5, 5]


def test_sampler_stops_a_diverging_image_at_sigma_max():
    f = lambda y: -0.5 * y  # noqa: E731 - pushes y away from 0: the noise estimate grows without bound
    out = sample_blind(f, (1, 1, 4, 4), h0=0.1, beta=0.1, seed=0, sigma_max=2.0)
    assert out.diverged.tolist() == [True] and float(out.sigmas[-1][0]) > 2.0 >= float(out.sigmas[-2][0])


# ------------------------------------------------------------------ the Jacobian


def test_jacobian_matches_row_by_row_autograd_and_finite_differences():
    net = _trained_unet(base_channels=2, num_blocks=1).double()
    y = torch.rand(1, 4, 4, dtype=torch.float64) + 0.1 * torch.randn(1, 4, 4, dtype=torch.float64)
    jb = jacobian_eigenbasis(net, y)
    # official calc_jacobian: one autograd row per output pixel, of D(y) = y - f(y)
    inp = y.unsqueeze(0).clone().requires_grad_(True)
    out = inp - net(inp)
    rows = [torch.autograd.grad(out[0, 0, i, j], inp, retain_graph=True)[0].reshape(-1)
            for i in range(4) for j in range(4)]
    torch.testing.assert_close(jb.jacobian, torch.stack(rows))
    eps, flat, fd_trace = 1e-6, y.reshape(-1), 0.0
    with torch.no_grad():
        for k in range(16):
            e = torch.zeros(16, dtype=torch.float64)
            e[k] = eps
            d_plus = (flat + e) - net((flat + e).view(1, 1, 4, 4)).reshape(-1)
            d_minus = (flat - e) - net((flat - e).view(1, 1, 4, 4)).reshape(-1)
            fd_trace += float((d_plus[k] - d_minus[k]) / (2 * eps))
        assert jb.trace == pytest.approx(fd_trace, rel=1e-6)
        assert float(jb.eigenvalues.sum()) == pytest.approx(jb.trace, rel=1e-9)
        # bias-free: D(y) = J_D(y) y
        torch.testing.assert_close(jb.jacobian @ flat, flat - net(y.unsqueeze(0)).reshape(-1))
    assert jb.basis.shape == (16, 1, 4, 4) and bool((jb.eigenvalues[:-1] >= jb.eigenvalues[1:]).all())
    assert net.training is False


def test_jacobian_of_a_linear_shrinkage_is_that_shrinkage():
    lam = torch.linspace(0.1, 0.9, 9)
    f = lambda y: y * (1 - lam.view(1, 1, 3, 3))  # noqa: E731 - D(y) = diag(lam) y
    jb = jacobian_eigenbasis(f, torch.rand(1, 3, 3))
    torch.testing.assert_close(jb.eigenvalues, lam.flip(0))
    assert jb.trace == pytest.approx(float(lam.sum())) and jb.asymmetry == pytest.approx(0.0)


# ------------------------------------------------------------------ the generalisation probe


def _memoriser(train: torch.Tensor):
    """f(y) = y - (the nearest training image): its prior is the training set itself."""
    def f(y):
        d = torch.cdist(y.flatten(1), train.flatten(1))
        return y - train[d.argmin(1)]
    return f


def test_probe_sees_memorisation_and_agreement():
    g = torch.Generator().manual_seed(0)
    train_a, train_b = torch.rand(5, 1, 4, 4, generator=g), torch.rand(5, 1, 4, 4, generator=g)
    probe = GeneralizationProbe(num_samples=6, seed=1, h0=0.1, beta=0.3, sigma_L=0.01, init_mean=0.5)
    mem = probe(_memoriser(train_a), _memoriser(train_b), train_a, train_b)
    assert bool((mem.nearest_a > 0.999).all() and (mem.nearest_b > 0.999).all())
    assert float(mem.model_cosine.mean()) < 0.98
    same = probe(_memoriser(train_a), _memoriser(train_a), train_a, train_b)
    torch.testing.assert_close(same.model_cosine, torch.ones(6))
    assert set(mem.summary()) == {"model_cosine", "nearest_train_cosine"}


def test_disjoint_subsets_and_nearest_cosine():
    a, b = disjoint_subsets(100, 30, seed=3)
    assert len(a) == len(b) == 30 and not set(a) & set(b)
    assert (a == disjoint_subsets(100, 30, seed=3)[0]).all() and not (a == disjoint_subsets(100, 30, seed=4)[0]).all()
    pool = torch.rand(50, 1, 3, 3)
    best, idx = nearest_cosine(2.0 * pool[[7, 31]], pool, chunk=8)
    assert idx.tolist() == [7, 31] and best.tolist() == pytest.approx([1.0, 1.0])


# ------------------------------------------------------------------ BlindDenoiserModule


def _module(**kw) -> BlindDenoiserModule:
    torch.manual_seed(0)
    return BlindDenoiserModule(BiasFreeUNet(base_channels=4, num_blocks=2), **{"sample_images_every_n_epochs": 0, **kw})


def test_module_learns_to_denoise_and_logs_samples(tmp_path):
    model = _module(sample_images_every_n_epochs=2, num_sample_images=3, sample_max_steps=20, lr=3e-3)
    trainer = Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      limit_train_batches=20, limit_val_batches=2)
    dm = DigitsDataModule(batch_size=32)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]
    trainer.fit(model, datamodule=dm)
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert after["val_loss"] < 0.9 * before["val_loss"]
    assert (tmp_path / "samples" / "epoch_002.png").exists()
    assert model.sample(2, seed=1).shape == (2, 1, 8, 8)


@pytest.mark.slow
def test_crash_and_resume_mid_epoch_is_bit_identical(tmp_path):
    full, resumed, info = crash_and_resume(
        _module, lambda: DigitsDataModule(batch_size=32), lambda: [], max_epochs=2, crash_step=11,
        checkpoint_every_n_steps=4, tmp_path=tmp_path, limit_train_batches=8, limit_val_batches=1,
        weights_only=True)
    assert info["resumed_from_step"] == 8
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("make, match", [
    (lambda: BlindDenoiserModule("unet"), "net must be a torch.nn.Module"),
    (lambda: BlindDenoiserModule(sigma_range=(50, 10)), "lo < hi"),
    (lambda: BlindDenoiserModule(sigma_range=(-1, 10)), r"sigma_range\[0\]"),
    (lambda: BlindDenoiserModule(sigma_range=(0, float("nan"))), r"sigma_range\[1\]"),
    (lambda: BlindDenoiserModule(sample_beta=0.0), "sample_beta"),
    (lambda: BiasFreeUNet(convs_per_block=1), "convs_per_block"),
    (lambda: BiasFreeUNet(kernel_size=4), "kernel_size must be odd"),
    (lambda: BiasFreeUNet(num_blocks=2)(torch.rand(1, 1, 10, 10)), "divisible by 2\\*\\*num_blocks = 4"),
    (lambda: BiasFreeUNet()(torch.rand(1, 3, 8, 8)), r"expects \(B, 1, H, W\)"),
    (lambda: sample_blind(lambda y: y, (1, 1, 4, 4), h0=0.0), "h0"),
    (lambda: sample_blind(lambda y: y, (1, 1, 4, 4), beta=1.5), "beta"),
    (lambda: sample_blind(lambda y: y, (4, 4)), "shape must be"),
    (lambda: sample_blind(lambda y: y, (1, 1, 4, 4), sigma_L=0.1, sigma_max=0.05), "sigma_max"),
    (lambda: jacobian_eigenbasis(lambda y: y, torch.rand(2, 1, 4, 4)), "one image"),
    (lambda: disjoint_subsets(10, 6), "at most 5"),
    (lambda: GeneralizationProbe()(lambda y: y, lambda y: y, torch.rand(4, 4), torch.rand(1, 1, 4, 4)), "train_a"),
    (lambda: blind_denoising_loss(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 3)), "differ in shape"),
    (lambda: _module()._images(torch.ones(2, 1, 4, 4, dtype=torch.long)), "float image batches"),
])
def test_bad_inputs_fail_with_one_line(make, match):
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert "\n" not in str(err.value)
