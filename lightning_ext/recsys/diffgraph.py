"""DiffGraph (Li et al., WSDM 2025): latent diffusion from auxiliary-behaviour embeddings to target-behaviour ones."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from lightning_ext.core.guards import NonFiniteLoss
from lightning_ext.core.validation import (
    NonNegativeFloat, PositiveFloat, PositiveInt, UnitIntervalRightOpen, check_fraction, check_non_negative,
    check_number, check_positive, check_positive_int,
)
from lightning_ext.recsys.graph import SparseGraph, bipartite_graph, spmm, symmetric_norm_values
from lightning_ext.recsys.recommender import Init, Recommender, bpr_loss


def diffgraph_betas(steps: int, noise_scale: float = 1e-4, noise_min: float = 1e-4, noise_max: float = 1e-3,
                    beta_first: Optional[float] = 1e-4) -> torch.Tensor:
    """The official variance schedule (float64): ``1 - ᾱ_t`` linear in ``noise_scale·[noise_min, noise_max]``.

    ``v_t = linspace(s·min, s·max, T)``, ``β_0 = v_0``, ``β_t = min(1 - (1 - v_t)/(1 - v_{t-1}), 0.999)``; the
    official ``beta_fixed`` then sets ``β_0 = beta_first`` (1e-4; ``None`` keeps ``v_0``).

    Example:
        >>> b = diffgraph_betas(5); b.dtype, f"{float(b[0]):.0e}", bool((b[1:] > 0).all() and (b[1:] < 1e-7).all())
        (torch.float64, '1e-04', True)
    """
    v = np.linspace(noise_scale * noise_min, noise_scale * noise_max, steps, dtype=np.float64)
    alpha_bar = 1.0 - v
    betas = [1.0 - alpha_bar[0]] + [min(1.0 - alpha_bar[t] / alpha_bar[t - 1], 0.999) for t in range(1, steps)]
    betas = torch.tensor(betas, dtype=torch.float64)
    if beta_first is not None:
        betas[0] = beta_first
    return betas


class LatentDiffusion(nn.Module):
    """Gaussian diffusion on embeddings with DiffGraph's conventions (the forward process, loss weight, mean-only reverse chain).

    ``q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I)`` with ᾱ from :func:`diffgraph_betas`; the loss weight of step t is
    ``SNR(t-1) - SNR(t)`` (``SNR = ᾱ / (1 - ᾱ)``) and 1 at t = 0; the reverse chain applies the posterior mean
    ``x_{t-1} = c1_t · f(x_t, t) + c2_t · x_t`` for t = T-1 .. 0, no noise (``c1_t = β_t √ᾱ_{t-1} / (1 - ᾱ_t)``,
    ``c2_t = (1 - ᾱ_{t-1}) √α_t / (1 - ᾱ_t)``; ``c1_0 = 1, c2_0 = 0``, so the chain ends with ``f(x_1, 0)``).
    The schedule lives in float64 buffers (not saved: rebuilt from the arguments).

    Args:
        steps: diffusion steps T.
        noise_scale, noise_min, noise_max: the official schedule's arguments.
    """

    def __init__(self, steps: int = 200, noise_scale: float = 1e-4, noise_min: float = 1e-4,
                 noise_max: float = 1e-3) -> None:
        super().__init__()
        self.steps = steps
        betas = diffgraph_betas(steps, noise_scale, noise_min, noise_max)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        for name, value in {
            "alphas_cumprod": abar,
            "snr": abar / (1.0 - abar),
            "coef1": betas * abar_prev.sqrt() / (1.0 - abar),
            "coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        }.items():
            self.register_buffer(name, value, persistent=False)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``√ᾱ_t x_0 + √(1 - ᾱ_t) ε`` row by row."""
        abar = self.alphas_cumprod[t].to(x0.dtype)[:, None]
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """``SNR(t-1) - SNR(t)``, and 1 where t = 0."""
        w = self.snr[(t - 1).clamp(min=0)] - self.snr[t]
        return torch.where(t == 0, torch.ones_like(w), w)

    def reverse(self, denoiser: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The mean-only reverse chain from ``x`` (no noise added first: the official ``sampling_steps=0``)."""
        for i in reversed(range(self.steps)):
            t = torch.full((len(x),), i, dtype=torch.long, device=x.device)
            x = self.coef1[i].to(x.dtype) * denoiser(x, t) + self.coef2[i].to(x.dtype) * x
        return x


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal ``[cos(t ω), sin(t ω)]`` with ``ω_k = 10000^(-k / (dim/2))`` (zero-padded to an odd ``dim``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angle = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class Denoiser(nn.Module):
    """DiffGraph's denoiser: ``MLP([normalize(x) ⊙ dropout, W_e τ(t)])``, tanh between layers, linear output.

    Layers ``d + time_dim -> hidden[0] -> ... -> hidden[-1] -> d`` (the official ``dims='[64]'``): tanh after
    every input-side layer and between output-side layers, none at the end; weights ``N(0, 2/(fan_in+fan_out))``,
    biases ``N(0, 1e-3)``. Dropout on the (L2-normalised) input in training only; ``mask`` replaces the random
    dropout mask (the module's seeded steps pass one).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64,), time_dim: int = 8, dropout: float = 0.5,
                 normalize: bool = True) -> None:
        super().__init__()
        self.time_dim, self.dropout, self.normalize = time_dim, dropout, normalize
        self.time_layer = nn.Linear(time_dim, time_dim)
        sizes = [dim + time_dim, *hidden, dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        for layer in [self.time_layer, *self.layers]:
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / sum(layer.weight.shape)))
            nn.init.normal_(layer.bias, 0.0, 1e-3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The predicted target embedding ``(N, d)`` of noisy inputs ``x (N, d)`` at steps ``t (N,)``."""
        if self.normalize:
            x = F.normalize(x, dim=-1)
        if self.training and self.dropout > 0:
            x = x * mask if mask is not None else F.dropout(x, self.dropout)
        h = torch.cat([x, self.time_layer(timestep_embedding(t, self.time_dim).to(x.dtype))], dim=-1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = torch.tanh(h)
        return h


def diffgraph_diffusion_loss(denoiser: nn.Module, diffusion: LatentDiffusion, target: torch.Tensor,
                             auxiliary: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                             mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffGraph's cross-view denoising loss per row, and the denoiser's output.

    ``x_t = q_sample(auxiliary, t, noise)``, ``out = f(x_t, t)``, ``loss_r = w_t · mean_d (target_r - out_r)²`` with
    ``w_t = SNR(t-1) - SNR(t)`` (1 at t = 0): the noisy **auxiliary** embedding is denoised into the **target**
    embedding (official ``training_losses2``). Neither side is detached.

    Example:
        >>> diff, den = LatentDiffusion(steps=4), Denoiser(3, hidden=(5,), time_dim=2).eval()
        >>> loss, out = diffgraph_diffusion_loss(den, diff, torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([0, 3]),
        ...                                      torch.zeros(2, 3))
        >>> tuple(loss.shape), tuple(out.shape)
        ((2,), (2, 3))
    """
    out = denoiser(diffusion.q_sample(auxiliary, t, noise), t, mask)
    mse = (target - out).pow(2).mean(dim=-1)
    return diffusion.loss_weight(t).to(mse.dtype) * mse, out


def diffgraph_propagate(graph: SparseGraph, values: torch.Tensor, x: torch.Tensor, num_layers: int,
                        negative_slope: float = 0.5) -> torch.Tensor:
    """``x + Σ_l normalize(h_l)`` with ``h_l = LeakyReLU(Â h_{l-1})``, ``h_0 = x``: the official weightless GCN.

    Â is ``D^-1/2 A D^-1/2`` (DGL's ``out_degrees``/``in_degrees`` normalisation, degrees clamped at 1); each
    layer's LeakyReLU (slope 0.5) output feeds the next layer and enters the sum L2-normalised per row.
    """
    out, h = x, x
    for _ in range(num_layers):
        h = F.leaky_relu(spmm(graph, values, h), negative_slope)
        out = out + F.normalize(h, dim=1)
    return out


class DiffGraphRec(Recommender):
    """DiffGraph (Li et al., WSDM 2025): target embeddings plus a denoiser's map of auxiliary-behaviour embeddings.

    Li, Xia, Hua, Zhang, Wang and Huang, *DiffGraph: Heterogeneous Graph Diffusion Model*, WSDM 2025, arXiv
    2501.02313.
    Reference code: github.com/HKUDS/DiffGraph (``DiffGraph-Rec/Model.py``, ``main.py``, ``params.py``; written
    anew here on torch sparse products, no DGL).

    One free embedding table ``E⁰`` (users and items, Xavier-uniform). The target behaviour's graph and every
    auxiliary behaviour's graph propagate it without weights (:func:`diffgraph_propagate`):
    ``E^tgt = P_tgt(E⁰)``, ``E^aux = Σ_b P_b(E⁰)``. For users and for items separately (two denoisers), the
    auxiliary embedding is diffused and denoised into the target one (:func:`diffgraph_diffusion_loss`, one
    random step ``t ~ U{0..T-1}`` per node); the final embeddings are ``E = E^tgt + f(x_t, t)`` in training and
    ``E = E^tgt + reverse(E^aux)`` (the mean-only reverse chain from the clean auxiliary embedding) for
    ranking. Loss on a batch of target-behaviour triples::

        L = BPR(E_u, E_i+, E_i-) + reg_weight · (||E_u||² + ||E_i+||² + ||E_i-||²) / B
            + mean_{u in batch} ℓ^user_u + mean_{i+ in batch} ℓ^item_i

    (BPR as a mean, the code's sum / batch size; the L2 term on the batch's *final* embeddings; duplicates in the
    batch counted as often as they occur, as in the code). Defaults are ``params.py``'s: d 64, 2 layers, Adam
    lr 1e-3 without weight decay, reg 3e-2, T = 200, noise scale/min/max 1e-4/1e-4/1e-3, denoiser
    ``dims=[64]``, time embedding 8, dropout 0.5, normalised input. With these the betas are ~1e-8 (β_0 = 1e-4):
    the "diffusion" is almost a deterministic map; ``diffusion=False`` is the ablation without it (noise-free
    input, t = 0, weight 1, one denoiser call at prediction).

    Random draws (steps, noise, dropout masks) come from a generator seeded by ``(seed, global_step)``, so a run
    resumed from a checkpoint continues exactly. Needs a
    :class:`~lightning_ext.recsys.multi_behavior.MultiBehaviorDataModule` (or any data with ``auxiliary``
    behaviours); the target graph is the data's training pairs.

    Args:
        num_layers: propagation layers (official ``gcn_layer``).
        reg_weight: L2 weight on the batch's final embeddings (official ``reg``).
        steps: diffusion steps T.
        noise_scale, noise_min, noise_max: the variance schedule (:func:`diffgraph_betas`).
        denoiser_hidden: hidden sizes of the denoiser (official ``dims``).
        time_dim: size of the step embedding (official ``d_emb_size``).
        denoiser_dropout: dropout on the denoiser's input.
        diffusion: ``False`` for the no-diffusion ablation.
        seed: seed of the steps, noise and dropout masks.
        num_users, num_items, embedding_dim, lr, init, init_std, eval_ks, optimizer, nonfinite_loss: see
            :class:`~lightning_ext.recsys.recommender.Recommender`.

    Example:
        >>> from lightning_ext.recsys.multi_behavior import MultiBehaviorInteractions
        >>> target = np.array([[0, 0], [1, 1], [2, 3]])
        >>> data = MultiBehaviorInteractions(3, 4, target, target[:0], target[:0],
        ...                                  auxiliary={"view": np.array([[0, 0], [0, 2], [1, 1], [2, 3]])})
        >>> model = DiffGraphRec(embedding_dim=8, steps=10, denoiser_hidden=[8]).bind(data)
        >>> sorted(model.training_loss(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2, 3])))
        ['bpr', 'diffusion', 'loss', 'reg']
        >>> [tuple(e.shape) for e in model.propagate()]
        [(3, 8), (4, 8)]
    """

    def __init__(self, num_layers: PositiveInt = 2, reg_weight: NonNegativeFloat = 3e-2, steps: PositiveInt = 200,
                 noise_scale: PositiveFloat = 1e-4, noise_min: PositiveFloat = 1e-4, noise_max: PositiveFloat = 1e-3,
                 denoiser_hidden: Sequence[PositiveInt] = (64,), time_dim: PositiveInt = 8,
                 denoiser_dropout: UnitIntervalRightOpen = 0.5, diffusion: bool = True, seed: int = 0,
                 num_users: Optional[PositiveInt] = None, num_items: Optional[PositiveInt] = None,
                 embedding_dim: PositiveInt = 64, lr: PositiveFloat = 1e-3, init: Init = "xavier_uniform",
                 init_std: PositiveFloat = 0.1, eval_ks: Sequence[PositiveInt] = (10, 20, 40),
                 optimizer: Optional[OptimizerCallable] = None, nonfinite_loss: NonFiniteLoss = "error") -> None:
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.reg_weight = check_non_negative("reg_weight", reg_weight)
        self.steps = check_positive_int("steps", steps)
        for name, value in (("noise_scale", noise_scale), ("noise_min", noise_min), ("noise_max", noise_max)):
            check_positive(name, value)
        if noise_min > noise_max:
            raise ValueError(f"noise_min ({noise_min}) must not exceed noise_max ({noise_max}).")
        if noise_scale * noise_max >= 1:
            raise ValueError(f"noise_scale * noise_max must be below 1 (1 - ᾱ_t reaches it), got "
                             f"{noise_scale * noise_max:g}; lower noise_scale or noise_max.")
        if isinstance(denoiser_hidden, (str, bytes)) or not isinstance(denoiser_hidden, Sequence):
            raise ValueError(f"denoiser_hidden must be a list of layer widths, e.g. [64], got {denoiser_hidden!r}.")
        for width in denoiser_hidden:
            check_positive_int("every denoiser_hidden entry", width)
        self.time_dim = check_positive_int("time_dim", time_dim)
        self.denoiser_dropout = check_fraction("denoiser_dropout", denoiser_dropout, allow_one=False)
        if not isinstance(diffusion, bool):
            raise TypeError(f"diffusion must be true or false, got {diffusion!r}.")
        self.seed = check_number("seed", seed, integer=True)
        self.noise = (noise_scale, noise_min, noise_max)
        self.denoiser_hidden, self.diffusion = [int(w) for w in denoiser_hidden], diffusion
        super().__init__(num_users, num_items, embedding_dim, lr, init, init_std, eval_ks, optimizer,
                         nonfinite_loss)

    def build_extra(self) -> None:
        self.schedule = LatentDiffusion(self.steps, *self.noise)
        self.user_denoiser, self.item_denoiser = (
            Denoiser(self.embedding_dim, self.denoiser_hidden, self.time_dim, self.denoiser_dropout)
            for _ in range(2))

    def prepare(self, data) -> None:
        auxiliary = getattr(data, "auxiliary", None)
        if not auxiliary:
            raise ValueError("DiffGraphRec needs auxiliary behaviours: pass a MultiBehaviorDataModule (or data with "
                             "an `auxiliary` dict of behaviour -> (user, item) pairs).")
        self.build_graph(data)
        self.aux_graphs = nn.ModuleList()
        for i, pairs in enumerate(auxiliary.values()):
            pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
            graph = bipartite_graph(pairs[:, 0], pairs[:, 1], self.num_users, self.num_items)
            self.aux_graphs.append(graph)
            self.register_buffer(f"aux_values_{i}", symmetric_norm_values(graph), persistent=False)

    # -- the model -------------------------------------------------------------------------------------------
    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E^tgt, E^aux)``, each ``(U + I, d)``."""
        x = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        target = diffgraph_propagate(self.graph, self.norm_values, x, self.num_layers)
        aux = sum(diffgraph_propagate(g, getattr(self, f"aux_values_{i}"), x, self.num_layers)
                  for i, g in enumerate(self.aux_graphs))
        return target, aux

    def _draws(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        gen = torch.Generator(device=like.device).manual_seed(self.seed * 1_000_003 + int(self.global_step_or_zero))
        t = torch.randint(0, self.steps, (n,), generator=gen, device=like.device)
        noise = torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)
        keep = 1.0 - self.denoiser_dropout
        mask = (torch.rand(like.shape, generator=gen, device=like.device) < keep).to(like.dtype) / keep
        if not self.diffusion:
            t, noise = torch.zeros_like(t), torch.zeros_like(noise)
        return t, noise, mask

    @property
    def global_step_or_zero(self) -> int:
        return self.trainer.global_step if self._trainer is not None else 0

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        target, aux = self.views()
        denoised = []
        for side, (tgt, a) in enumerate(zip(target.split([self.num_users, self.num_items]),
                                            aux.split([self.num_users, self.num_items]))):
            denoiser = self.user_denoiser if side == 0 else self.item_denoiser
            if self.diffusion:
                out = self.schedule.reverse(denoiser, a)
            else:
                out = denoiser(a, torch.zeros(len(a), dtype=torch.long, device=a.device))
            denoised.append(tgt + out)
        return denoised[0], denoised[1]

    def training_loss(self, users, pos, neg):
        target, aux = self.views()
        t, noise, mask = self._draws(len(target), target)
        final, diff = [], 0.0
        sizes = [self.num_users, self.num_items]
        for side, (tgt, a, ts, eps, m, batch) in enumerate(zip(
                target.split(sizes), aux.split(sizes), t.split(sizes), noise.split(sizes), mask.split(sizes),
                (users, pos))):
            denoiser = self.user_denoiser if side == 0 else self.item_denoiser
            loss, out = diffgraph_diffusion_loss(denoiser, self.schedule, tgt, a, ts, eps, m)
            diff = diff + loss[batch].mean()
            final.append(tgt + out)
        u, p, n = final[0][users], final[1][pos], final[1][neg]
        bpr = bpr_loss(u, p, n)
        reg = self.reg_weight * (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / len(users)
        return {"loss": bpr + reg + diff, "bpr": bpr, "reg": reg, "diffusion": diff}
