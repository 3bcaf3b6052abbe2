r"""Geometry-adaptive harmonic analysis of blind denoisers: the blind-noise loss, the stochastic ascent sampler, the
Jacobian eigenbasis and the disjoint-subset generalisation probe (pure PyTorch, no Trainer).

Paper: Kadkhodaie, Guth, Simoncelli, Mallat, "Generalization in diffusion models arises from geometry-adaptive
harmonic representations", ICLR 2024, arXiv 2310.02557; reference code
https://github.com/LabForComputationalVision/memorization_generalization_in_diffusion_models (``code/trainer.py``,
``dataloader_func.py::add_noise_torch``, ``algorithm_inv_prob.py::univ_inv_sol``, ``linear_approx.py``). The
sampler is Kadkhodaie & Simoncelli's ("Stochastic solutions for linear inverse problems using the prior implicit in
a denoiser", NeurIPS 2021, arXiv 2007.13640) for pure synthesis.

A *denoiser* here is a callable returning the predicted noise (the residual) :math:`f(y)`; the denoised image is
:math:`D(y) = y - f(y)`. Denoisers are evaluated in eval mode (a :class:`BiasFreeUNet` then uses its running
normalisation and is homogeneous).

Example:
    >>> import torch
    >>> f = lambda y: 0.5 * y  # a linear "denoiser" that shrinks everything by half
    >>> out = sample_blind(f, (2, 1, 4, 4), h0=0.1, beta=0.5, sigma0=1.0, sigma_L=0.05, seed=0)
    >>> out.images.shape, bool((out.num_steps > 0).all())
    (torch.Size([2, 1, 4, 4]), True)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from lightning_ext.core.validation import check_number, check_positive, check_positive_int

__all__ = ["BlindSample", "GeneralizationProbe", "JacobianEigenbasis", "ProbeResult", "add_blind_noise",
           "blind_denoising_loss", "blind_noise_sigmas", "disjoint_subsets", "jacobian_eigenbasis",
           "nearest_cosine", "sample_blind", "step_size"]

Denoiser = Callable[[torch.Tensor], torch.Tensor]


def blind_noise_sigmas(n: int, sigma_range: tuple[float, float] = (0.0, 255.0), quadratic: bool = True,
                       pixel_scale: float = 255.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    r"""One noise level per image, shape ``(n, 1, 1, 1)``: with :math:`u \sim U(0, 1)`,
    :math:`\sigma = (u(\sqrt{hi} - \sqrt{lo}) + \sqrt{lo})^2 / s` (``quadratic``: uniform on the square-root
    scale, the official default) or :math:`(u(hi - lo) + lo) / s`, with ``(lo, hi) = sigma_range`` and
    :math:`s` = ``pixel_scale`` (official: range [0, 255], images in [0, 1])."""
    lo, hi = sigma_range
    u = torch.rand((n, 1, 1, 1), generator=generator)
    if quadratic:
        return (u * (math.sqrt(hi) - math.sqrt(lo)) + math.sqrt(lo)) ** 2 / pixel_scale
    return (u * (hi - lo) + lo) / pixel_scale


def add_blind_noise(clean: torch.Tensor, sigma: torch.Tensor,
                    generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noisy, noise)`` with ``noise = sigma * z``, ``z ~ N(0, I)`` drawn from ``generator`` on the CPU."""
    z = torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(clean.device)
    noise = z * sigma.to(clean.device, clean.dtype)
    return clean + noise, noise


def blind_denoising_loss(predicted_noise: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    r"""The official training loss: the squared error summed over pixels, averaged over the images of the batch,
    :math:`L = \frac{1}{B} \sum_b \lVert f(y_b) - (y_b - x_b) \rVert^2` (``nn.MSELoss(reduction="sum")`` divided by
    the batch size in ``code/trainer.py``; this reduction is fixed here, it sets Adam's effective step)."""
    if predicted_noise.shape != noise.shape:
        raise ValueError(f"predicted noise {tuple(predicted_noise.shape)} and noise {tuple(noise.shape)} differ in "
                         "shape; the denoiser must return one value per input pixel.")
    return (predicted_noise - noise).pow(2).sum() / noise.shape[0]


@contextmanager
def evaluating(denoiser: Denoiser) -> Iterator[Denoiser]:
    """Put an ``nn.Module`` in eval mode for the block, restoring each submodule's mode afterwards."""
    if not isinstance(denoiser, nn.Module):
        yield denoiser
        return
    modes = [(m, m.training) for m in denoiser.modules()]
    denoiser.eval()
    try:
        yield denoiser
    finally:
        for m, mode in modes:
            m.training = mode


def step_size(t: int, h0: float) -> float:
    r"""The sampler's step size at iteration ``t`` (1-based): :math:`h_t = h_0 t / (1 + h_0 (t - 1))`."""
    return h0 * t / (1.0 + h0 * (t - 1))


@dataclass
class BlindSample:
    """What :func:`sample_blind` returns: the final denoised images ``y - f(y)``, the iterations each image took,
    and per iteration the step size ``h``, the noise-level estimates ``sigmas`` ``(B,)`` and injected noise scales
    ``gammas`` ``(B,)`` (0 for images already stopped); ``diverged`` ``(B,)`` marks images stopped by ``sigma_max``."""

    images: torch.Tensor
    num_steps: torch.Tensor
    h: list[float]
    sigmas: list[torch.Tensor]
    gammas: list[torch.Tensor]
    diverged: Optional[torch.Tensor] = None


def _check_sampler(h0: float, beta: float, sigma0: float, sigma_L: float) -> None:
    check_number("h0", h0, low=0, high=1, low_open=True)
    check_number("beta", beta, low=0, high=1, low_open=True)
    check_positive("sigma0", sigma0)
    check_positive("sigma_L", sigma_L)


@torch.no_grad()
def sample_blind(denoiser: Denoiser, shape: tuple[int, ...], h0: float = 0.01, beta: float = 0.01,
                 sigma0: float = 1.0, sigma_L: float = 0.01, seed: int = 0, init_mean: float = 0.0,
                 max_steps: Optional[int] = None, init: Optional[torch.Tensor] = None,
                 sigma_max: float = 2.0) -> BlindSample:
    r"""Draw images from the prior implicit in a blind denoiser by stochastic coarse-to-fine ascent.

    Kadkhodaie & Simoncelli (2021), official ``univ_inv_sol`` without a measurement: start at
    :math:`y_0 = m + \sigma_0 z_0`; at iteration :math:`t = 1, 2, \ldots`, with :math:`d_t = f(y_{t-1})`,
    :math:`\sigma_t = \lVert d_t \rVert / \sqrt{N}`, :math:`h_t = h_0 t / (1 + h_0 (t - 1))` and
    :math:`\gamma_t = \sigma_t \sqrt{(1 - \beta h_t)^2 - (1 - h_t)^2}`,

    .. math:: y_t = y_{t-1} - h_t d_t + \gamma_t z_t,

    until :math:`\sigma < \sigma_L` (tested before each iteration on the last estimate, the first from
    :math:`f(y_0)`), or until :math:`\sigma > \sigma_{max}` (the official "not converging" stop, 2); the result is
    :math:`y - f(y)`, with ``diverged`` marking the images stopped by :math:`\sigma_{max}`. Images are drawn as a
    batch, each with its own :math:`\sigma_t` and stopping time (a stopped image is frozen); :math:`z_t` is drawn for
    the whole batch from a generator seeded with ``seed``, so the same seed gives two denoisers the same initial
    noise (and noise draws).

    Args:
        denoiser: returns the predicted noise :math:`f(y)` for a batch (an ``nn.Module`` is run in eval mode).
        shape: ``(B, C, H, W)``.
        h0: first step size (official 0.01); larger is faster and coarser.
        beta: share of the noise removed per step (official 0.01; 1 adds no noise).
        sigma0: standard deviation of the initial noise (official 1).
        sigma_L: stop once the estimated noise level falls below it (official 0.01).
        seed: seed of the initial noise and of every :math:`z_t`.
        init_mean: mean :math:`m` of the initial noise (official ``init_noise_mean`` 0).
        max_steps: stop every image after this many iterations (``None``: no cap, as the official code).
        init: an explicit :math:`y_0` of ``shape`` (replaces the seeded initial noise).
        sigma_max: stop an image whose noise estimate exceeds it (official 2).

    Returns:
        :class:`BlindSample`.
    """
    _check_sampler(h0, beta, sigma0, sigma_L)
    check_number("sigma_max (above sigma_L)", sigma_max, low=sigma_L, low_open=True)
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, C, H, W), got {tuple(shape)}.")
    if max_steps is not None:
        check_positive_int("max_steps", max_steps)
    g = torch.Generator().manual_seed(int(seed))
    with evaluating(denoiser):
        device = next(denoiser.parameters()).device if isinstance(denoiser, nn.Module) and \
            any(True for _ in denoiser.parameters()) else torch.device("cpu")
        y = init_mean + sigma0 * torch.randn(shape, generator=g)
        if init is not None:
            if tuple(init.shape) != tuple(shape):
                raise ValueError(f"init has shape {tuple(init.shape)}, expected {tuple(shape)}.")
            y = init.detach().to(torch.float32).clone()
        y = y.to(device)
        n = y[0].numel()
        sigma = denoiser(y).flatten(1).norm(dim=1) / math.sqrt(n)
        steps = torch.zeros(shape[0], dtype=torch.long)
        hs: list[float] = []
        sigmas: list[torch.Tensor] = []
        gammas: list[torch.Tensor] = []
        t = 1
        while True:
            diverged = (sigma > sigma_max).cpu()
            active = (sigma > sigma_L).cpu() & ~diverged
            if max_steps is not None:
                active &= steps < max_steps
            if not bool(active.any()):
                break
            h = step_size(t, h0)
            z = torch.randn(shape, generator=g).to(device)
            idx = active.nonzero().flatten().to(device)
            d = denoiser(y[idx])
            sig = d.flatten(1).norm(dim=1) / math.sqrt(n)
            gamma = sig * math.sqrt(max((1 - beta * h) ** 2 - (1 - h) ** 2, 0.0))
            y[idx] = y[idx] - h * d + gamma.view(-1, *[1] * (len(shape) - 1)) * z[idx]
            sigma[idx] = sig
            full_sig, full_gamma = torch.zeros(shape[0]), torch.zeros(shape[0])
            full_sig[active], full_gamma[active] = sig.cpu(), gamma.cpu()
            hs.append(h)
            sigmas.append(full_sig)
            gammas.append(full_gamma)
            steps += active.long()
            t += 1
        images = y - denoiser(y)
    return BlindSample(images.detach(), steps, hs, sigmas, gammas, diverged)


@dataclass
class JacobianEigenbasis:
    r"""What :func:`jacobian_eigenbasis` returns: the Jacobian :math:`J_D` ``(N, N)`` of the denoiser
    :math:`D(y) = y - f(y)` at one image, the eigenvalues (descending) and eigenvectors (columns, as images
    ``(N, C, H, W)`` in ``basis``) of its symmetric part, :math:`\operatorname{tr}(J_D)` (the effective dimension)
    and the relative asymmetry :math:`\lVert J - J^T \rVert_F / \lVert J \rVert_F`."""

    jacobian: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    trace: float
    asymmetry: float

    @property
    def basis(self) -> torch.Tensor:
        """Eigenvectors as images, first the largest eigenvalue's."""
        return self.eigenvectors.T.reshape(-1, *self._image_shape)

    _image_shape: tuple[int, ...] = ()


def jacobian_eigenbasis(denoiser: Denoiser, y: torch.Tensor, residual: bool = True) -> JacobianEigenbasis:
    r"""The adaptive basis and shrinkage factors of a denoiser at one noisy image.

    :math:`J_D = \partial D / \partial y` by ``torch.func.jacrev`` (the official ``linear_approx.py::calc_jacobian``
    builds it row by row with autograd), with :math:`D(y) = y - f(y)` for a noise-predicting denoiser
    (``residual=True``) or :math:`D = f` otherwise. For a bias-free network :math:`D(y) = J_D(y)\,y`; the paper reads
    :math:`J_D` as shrinkage (eigenvalues, expected in [0, 1]) in an adaptive orthonormal basis (eigenvectors), and
    :math:`\operatorname{tr}(J_D)` as the effective dimensionality, falling as the noise grows. :math:`J_D` is
    close to symmetric; the eigen-decomposition is that of :math:`(J + J^T)/2` (real, orthonormal), which has the
    same trace. The denoiser runs in eval mode.

    Args:
        denoiser: maps a batch ``(1, C, H, W)`` to the predicted noise (or to the denoised image, ``residual=False``).
        y: one noisy image ``(C, H, W)`` (or ``(1, C, H, W)``).
        residual: whether ``denoiser`` predicts the noise.
    """
    if not torch.is_tensor(y) or y.dim() not in (3, 4) or (y.dim() == 4 and y.shape[0] != 1):
        raise ValueError(f"y must be one image (C, H, W), got "
                         f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}.")
    image_shape = tuple(y.shape[-3:])
    flat = y.detach().reshape(-1)

    def d_of(v: torch.Tensor) -> torch.Tensor:
        x = v.reshape(1, *image_shape)
        out = denoiser(x)
        return (x - out if residual else out).reshape(-1)

    with evaluating(denoiser):
        jac = torch.func.jacrev(d_of)(flat).detach()
    sym = (jac + jac.T) / 2
    vals, vecs = torch.linalg.eigh(sym)
    vals, vecs = vals.flip(0), vecs.flip(1)
    asym = float((jac - jac.T).norm() / jac.norm().clamp_min(1e-12))
    return JacobianEigenbasis(jac, vals, vecs, float(torch.diagonal(jac).sum()), asym, image_shape)


def disjoint_subsets(num_items: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random index sets of ``size`` each out of ``range(num_items)`` (sorted; seeded)."""
    check_positive_int("size", size)
    if 2 * size > num_items:
        raise ValueError(f"two disjoint subsets of size {size} need {2 * size} items, only {num_items} exist; "
                         f"lower the size to at most {num_items // 2}.")
    perm = np.random.default_rng(seed).permutation(num_items)
    return np.sort(perm[:size]), np.sort(perm[size:2 * size])


def nearest_cosine(samples: torch.Tensor, pool: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, the largest cosine similarity to an image of ``pool`` (flattened pixels) and its index."""
    s = nn.functional.normalize(samples.flatten(1).float(), dim=1)
    best, where = torch.full((len(s),), -2.0), torch.zeros(len(s), dtype=torch.long)
    for start in range(0, len(pool), chunk):
        p = nn.functional.normalize(pool[start:start + chunk].flatten(1).float(), dim=1)
        val, idx = (s @ p.T).max(dim=1)
        better = val > best
        best[better], where[better] = val[better], idx[better] + start
    return best, where


@dataclass
class ProbeResult:
    """What :class:`GeneralizationProbe` measures: samples of both models from the same initial noise, their
    pairwise cosine ``model_cosine`` ``(n,)``, and each sample's cosine to its nearest image of its own model's
    training set (``nearest_a``/``nearest_b``, indices ``index_a``/``index_b``); ``diverged_*`` mark samples the
    sampler stopped as diverging."""

    samples_a: torch.Tensor
    samples_b: torch.Tensor
    model_cosine: torch.Tensor
    nearest_a: torch.Tensor
    nearest_b: torch.Tensor
    index_a: torch.Tensor
    index_b: torch.Tensor
    diverged_a: Optional[torch.Tensor] = None
    diverged_b: Optional[torch.Tensor] = None

    def summary(self) -> dict[str, float]:
        """Means: model-model cosine, nearest-training cosine (both models pooled)."""
        near = torch.cat([self.nearest_a, self.nearest_b])
        return {"model_cosine": float(self.model_cosine.mean()), "nearest_train_cosine": float(near.mean())}


class GeneralizationProbe:
    r"""Do two denoisers trained on disjoint training sets learn the same density? Sample both from shared noise.

    Kadkhodaie et al. (ICLR 2024), Fig. 2: two networks trained on non-overlapping subsets :math:`S_1, S_2` of size
    :math:`N` generate, from the same initial noise and noise draws, samples whose cosine similarity approaches 1
    as :math:`N` grows (generalisation), while at small :math:`N` each model reproduces images of its own training
    set (memorisation: cosine to the nearest training image near 1, model-model cosine low). The probe draws
    ``num_samples`` images from each denoiser with :func:`sample_blind` (same ``seed``) and reports the
    model-model cosine per sample and each sample's cosine to the nearest image of its own training set
    (cosine of raw pixel vectors, as the paper). Use :func:`disjoint_subsets` for the two index sets.

    Args:
        num_samples: samples per model.
        seed: seed of the shared initial noise and noise draws.
        h0, beta, sigma0, sigma_L, init_mean, max_steps: the sampler's (:func:`sample_blind`).

    Example:
        >>> probe = GeneralizationProbe(num_samples=2, h0=0.2, beta=0.5, sigma_L=0.05)
        >>> f = lambda y: 0.5 * y
        >>> r = probe(f, f, torch.rand(5, 1, 4, 4), torch.rand(5, 1, 4, 4), image_shape=(1, 4, 4))
        >>> [round(c, 4) for c in r.model_cosine.tolist()]  # the same model twice: identical samples
        [1.0, 1.0]
    """

    def __init__(self, num_samples: int = 16, seed: int = 0, h0: float = 0.01, beta: float = 0.01,
                 sigma0: float = 1.0, sigma_L: float = 0.01, init_mean: float = 0.0,
                 max_steps: Optional[int] = None) -> None:
        check_positive_int("num_samples", num_samples)
        _check_sampler(h0, beta, sigma0, sigma_L)
        check_number("init_mean", init_mean)
        self.num_samples, self.seed = num_samples, seed
        self.sampler_args = dict(h0=h0, beta=beta, sigma0=sigma0, sigma_L=sigma_L, init_mean=init_mean,
                                 max_steps=max_steps)

    def sample(self, denoiser: Denoiser, image_shape: tuple[int, int, int]) -> BlindSample:
        """``num_samples`` images of ``denoiser`` from the probe's shared seed."""
        return sample_blind(denoiser, (self.num_samples, *image_shape), seed=self.seed, **self.sampler_args)

    def __call__(self, denoiser_a: Denoiser, denoiser_b: Denoiser, train_a: torch.Tensor, train_b: torch.Tensor,
                 image_shape: Optional[tuple[int, int, int]] = None) -> ProbeResult:
        """Sample both denoisers from the same noise and compare (``train_*``: each model's training images)."""
        for name, t in (("train_a", train_a), ("train_b", train_b)):
            if not torch.is_tensor(t) or t.dim() != 4 or len(t) == 0:
                raise ValueError(f"{name} must be the model's training images (N, C, H, W), got "
                                 f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}.")
        shape = tuple(image_shape or train_a.shape[1:])
        sample_a, sample_b = self.sample(denoiser_a, shape), self.sample(denoiser_b, shape)
        a, b = sample_a.images.cpu(), sample_b.images.cpu()
        cos = nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
        near_a, idx_a = nearest_cosine(a, train_a.cpu())
        near_b, idx_b = nearest_cosine(b, train_b.cpu())
        return ProbeResult(a, b, cos, near_a, near_b, idx_a, idx_b, sample_a.diverged, sample_b.diverged)
