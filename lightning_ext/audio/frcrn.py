"""FRCRN: a complex encoder-decoder with frequency-recurrent FSMN blocks for monaural speech enhancement (pure core).

Plain PyTorch, no Lightning: the network (:class:`FRCRN`), its parts (complex convolution, batch norm and SE layers,
:class:`UniDeepFSMN`) and its loss (:func:`si_snr`, :func:`complex_ideal_ratio_mask`, :func:`frcrn_loss`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ext.core.validation import check_choice, check_number, check_positive_int

__all__ = ["FRCRN", "UniDeepFSMN", "complex_ideal_ratio_mask", "frcrn_loss", "si_snr", "frequency_plan"]


def si_snr(estimate: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Scale-invariant signal-to-noise ratio in dB of each row of ``(..., N)`` signals (means removed first).

    :math:`\mathrm{SI\text{-}SNR}(\hat s, s) = 10\log_{10}\frac{\lVert a s\rVert^2}{\lVert \hat s - a s\rVert^2}`,
    :math:`a = \langle \hat s, s\rangle / \lVert s\rVert^2`, after removing each signal's mean (as torchmetrics'
    ``scale_invariant_signal_noise_ratio``; the FRCRN reference code skips the mean removal).

    Example:
        >>> s = torch.sin(torch.arange(100.0))
        >>> float(si_snr(2 * s, s)) > 60
        True
    """
    estimate = estimate - estimate.mean(-1, keepdim=True)
    target = target - target.mean(-1, keepdim=True)
    scale = (estimate * target).sum(-1, keepdim=True) / (target.pow(2).sum(-1, keepdim=True) + eps)
    projection = scale * target
    noise = estimate - projection
    return 10 * torch.log10((projection.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps))


def complex_ideal_ratio_mask(clean_spec: Tensor, noisy_spec: Tensor, eps: float = 1e-8) -> Tensor:
    r"""The clipped complex ideal ratio mask :math:`M = S\,\overline{Y}/|Y|^2` as ``(..., 2)`` (real, imaginary).

    As in the reference code, mask values above 2 are set to 1 and below -2 to -1 (not clipped to +-2).
    """
    power = noisy_spec.real.pow(2) + noisy_spec.imag.pow(2) + eps
    real = (clean_spec.real * noisy_spec.real + clean_spec.imag * noisy_spec.imag) / power
    imag = (clean_spec.imag * noisy_spec.real - clean_spec.real * noisy_spec.imag) / power
    mask = torch.stack((real, imag), dim=-1)
    mask = torch.where(mask > 2, torch.ones_like(mask), mask)
    return torch.where(mask < -2, -torch.ones_like(mask), mask)


def frcrn_loss(estimate: Tensor, clean: Tensor, mask: Tensor, target_mask: Tensor,
               loss: Literal["mix", "sisnr"] = "mix") -> dict[str, Tensor]:
    r"""FRCRN's training loss: :math:`L = -\mathrm{SI\text{-}SNR}(\hat s, s) + d\,\mathrm{MSE}(\hat M_r, M_r) +
    d\,\mathrm{MSE}(\hat M_i, M_i)` (``"mix"``) or the SI-SNR term only (``"sisnr"``).

    ``estimate``/``clean`` are ``(B, N)`` waveforms, ``mask``/``target_mask`` ``(B, F, T, 2)`` complex masks;
    :math:`d = 2F`, the reference code's channel count of the stacked real/imaginary mask. Returns the total
    (``"loss"``) and its terms (``"sisnr"``: mean SI-SNR in dB, ``"mask_real"``, ``"mask_imag"``).
    """
    check_choice("loss", loss, ("mix", "sisnr"))
    sisnr = si_snr(estimate, clean).mean()
    d = 2 * mask.shape[1]
    real = F.mse_loss(mask[..., 0], target_mask[..., 0]) * d
    imag = F.mse_loss(mask[..., 1], target_mask[..., 1]) * d
    total = -sisnr + (real + imag if loss == "mix" else 0.0)
    return {"loss": total, "sisnr": sisnr, "mask_real": real, "mask_imag": imag}


# ------------------------------------------------------------------------------------------------ complex layers
def _complex(layer_re: nn.Module, layer_im: nn.Module, x: Tensor) -> Tensor:
    """``(W_r + i W_i)(x_r + i x_i)`` for two real layers applied to ``x[..., 0]`` and ``x[..., 1]``."""
    real = layer_re(x[..., 0]) - layer_im(x[..., 1])
    imag = layer_re(x[..., 1]) + layer_im(x[..., 0])
    return torch.stack((real, imag), dim=-1)


class ComplexConv2d(nn.Module):
    """A complex 2D convolution on ``(B, C, F, T, 2)`` (two real convolutions)."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], stride: tuple[int, int] = (1, 1),
                 padding: tuple[int, int] = (0, 0), transposed: bool = False) -> None:
        super().__init__()
        conv = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.re = conv(cin, cout, kernel, stride=stride, padding=padding)
        self.im = conv(cin, cout, kernel, stride=stride, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        """The complex convolution of ``x``."""
        return _complex(self.re, self.im, x)


class ComplexBatchNorm2d(nn.Module):
    """Separate batch norms of the real and imaginary parts (as the reference code)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.re, self.im = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise each part."""
        return torch.stack((self.re(x[..., 0]), self.im(x[..., 1])), dim=-1)


class ComplexSE(nn.Module):
    """Complex squeeze-and-excitation: complex gates from the pooled real/imag features, applied part-wise."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)

        def gate() -> nn.Module:
            return nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid())

        self.re, self.im = gate(), gate()

    def forward(self, x: Tensor) -> Tensor:
        """``x`` scaled by the channel gates (real part by the real gate, imaginary by the imaginary)."""
        pooled = x.mean(dim=(2, 3))  # (B, C, 2)
        y = _complex(self.re, self.im, pooled)  # (B, C, 2)
        return x * y[:, :, None, None, :]


class UniDeepFSMN(nn.Module):
    r"""A unidirectional deep FSMN layer over ``(N, L, dim)`` sequences:
    :math:`p = W_2\,\mathrm{ReLU}(W_1 x + b)`, :math:`y = x + p + \sum_{k=0}^{K-1} a_k \odot p_{t-k}` (a causal
    depthwise memory of order :math:`K`; the reference ``UniDeepFsmn`` with output size equal to input size)."""

    def __init__(self, dim: int, hidden: int, order: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, hidden)
        self.project = nn.Linear(hidden, dim, bias=False)
        self.memory = nn.Conv1d(dim, dim, order, groups=dim, bias=False)
        self.order = order

    def forward(self, x: Tensor) -> Tensor:
        """``x`` plus the projection and its causal memory along ``L``."""
        p = self.project(F.relu(self.linear(x)))  # (N, L, dim)
        q = F.pad(p.transpose(1, 2), (self.order - 1, 0))
        return x + p + self.memory(q).transpose(1, 2)


class ComplexFSMN(nn.Module):
    """Stacked complex FSMN layers over ``(N, L, dim, 2)`` (real/imaginary FSMN pairs combined like complex weights)."""

    def __init__(self, dim: int, hidden: int, order: int, layers: int) -> None:
        super().__init__()
        self.re = nn.ModuleList(UniDeepFSMN(dim, hidden, order) for _ in range(layers))
        self.im = nn.ModuleList(UniDeepFSMN(dim, hidden, order) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        """The stack applied along ``L``."""
        for re, im in zip(self.re, self.im):
            x = _complex(re, im, x)
        return x


class FrequencyFSMN(ComplexFSMN):
    """FRCRN's frequency recurrence: a complex FSMN along the frequency axis of ``(B, C, F, T, 2)``, per frame."""

    def forward(self, x: Tensor) -> Tensor:
        """Run along ``F`` for every ``(batch, frame)``, channels as features."""
        b, c, f, t, _ = x.shape
        y = x.permute(0, 3, 2, 1, 4).reshape(b * t, f, c, 2)
        y = super().forward(y)
        return y.reshape(b, t, f, c, 2).permute(0, 3, 2, 1, 4)


class TemporalFSMN(ComplexFSMN):
    """The bottleneck's temporal model: a complex FSMN along time, channels x frequency as features."""

    def forward(self, x: Tensor) -> Tensor:
        """Run along ``T``."""
        b, c, f, t, _ = x.shape
        y = x.reshape(b, c * f, t, 2).transpose(1, 2)
        y = super().forward(y)
        return y.transpose(1, 2).reshape(b, c, f, t, 2)


def frequency_plan(bins: int, num_layers: int, kernel: int = 5) -> tuple[list[int], list[int], list[int]]:
    """Frequency sizes after each stride-2 encoder, the encoders' and the decoders' frequency kernels.

    An encoder uses ``min(kernel, size)`` (the reference depth-14 net: 5 six times, then 2 on 2 bins); each
    decoder's kernel is chosen so its transposed convolution restores its skip's size exactly (5 or 6 as in the
    reference). With 321 bins and 7 layers this gives the reference code's sizes 321, 159, 78, 37, 17, 7, 2, 1.

    Example:
        >>> frequency_plan(321, 7)
        ([321, 159, 78, 37, 17, 7, 2, 1], [5, 5, 5, 5, 5, 5, 2], [2, 5, 5, 5, 6, 5, 5])
    """
    sizes, enc = [bins], []
    for _ in range(num_layers):
        f = sizes[-1]
        if f < 2:
            raise ValueError(f"FRCRN: {num_layers} encoders halve {bins} frequency bins below 1; use fewer "
                             "`num_layers` or a larger `fft_len`.")
        k = min(kernel, f)
        enc.append(k)
        sizes.append((f - k) // 2 + 1)
    dec = [sizes[i] - 2 * (sizes[i + 1] - 1) for i in reversed(range(num_layers))]
    return sizes, enc, dec


class ComplexUNet(nn.Module):
    """One FRCRN complex U-Net on ``(B, 1, F, T, 2)`` spectra, returning ``(B, 1, F, T, 2)``.

    Encoders: complex conv (kernel ``(k_f, 2)``, stride ``(2, 1)``, padding ``(0, 1)``), complex BN, LeakyReLU, with
    a frequency FSMN before every encoder but the first and a complex SE on the outputs that feed the skips; a
    two-layer temporal FSMN in the bottleneck; decoders: complex transposed conv, BN, LeakyReLU, a frequency FSMN
    after all but the last and an SE on all but the last two; skips concatenated; a final complex 1x1 convolution.
    """

    def __init__(self, bins: int, num_layers: int, channels: int, fsmn_hidden: int, fsmn_order: int,
                 frequency_fsmn: bool, temporal_fsmn: bool, se_reduction: int = 8) -> None:
        super().__init__()
        sizes, enc_k, dec_k = frequency_plan(bins, num_layers)
        self.num_layers = num_layers

        def block(cin: int, cout: int, k: int, transposed: bool) -> nn.Module:
            return nn.Sequential(ComplexConv2d(cin, cout, (k, 2), (2, 1), (0, 1), transposed=transposed),
                                 ComplexBatchNorm2d(cout), nn.LeakyReLU())

        def ffsmn() -> nn.Module:
            return FrequencyFSMN(channels, fsmn_hidden, fsmn_order, 1) if frequency_fsmn else nn.Identity()

        L = num_layers
        self.encoders = nn.ModuleList(block(1 if i == 0 else channels, channels, enc_k[i], False) for i in range(L))
        self.enc_fsmn = nn.ModuleList(ffsmn() if i > 0 else nn.Identity() for i in range(L))
        self.enc_se = nn.ModuleList(ComplexSE(channels, se_reduction) for _ in range(L - 1))
        self.bottleneck = (TemporalFSMN(channels * sizes[-1], fsmn_hidden, fsmn_order, 2) if temporal_fsmn
                           else nn.Identity())
        self.decoders = nn.ModuleList(
            block(channels if i == 0 else 2 * channels, 1 if i == L - 1 else channels, dec_k[i], True)
            for i in range(L))
        self.dec_fsmn = nn.ModuleList(ffsmn() for _ in range(L - 1))
        self.dec_se = nn.ModuleList(ComplexSE(channels, se_reduction) for _ in range(max(0, L - 2)))
        self.out = ComplexConv2d(1, 1, (1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Complex spectrum in, complex (mask logits) out, same shape."""
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(self.enc_fsmn[i](x))
            if i < self.num_layers - 1:
                skips.append(self.enc_se[i](x))
        p = self.bottleneck(x)
        for i, decoder in enumerate(self.decoders):
            p = decoder(p)
            if i == self.num_layers - 1:
                break
            p = self.dec_fsmn[i](p)
            if i < self.num_layers - 2:
                p = self.dec_se[i](p)
            p = torch.cat([p, skips[-1 - i]], dim=1)
        return self.out(p)


class FRCRN(nn.Module):
    r"""FRCRN: a complex encoder-decoder with frequency-recurrent FSMN blocks that estimates a complex ratio mask.

    Paper: "FRCRN: Boosting Feature Representation using Frequency Recurrence for Monaural Speech Enhancement"
    (Zhao, Ma, Watcharasupat, Gan, ICASSP 2022, arXiv 2206.07293). Reference code (the released model):
    https://github.com/modelscope/modelscope (``modelscope/models/audio/ans/{frcrn,unet,complex_nn}.py``) and
    https://github.com/modelscope/ClearerVoice-Studio (``clearvoice/models/frcrn_se/frcrn.py``); this is a
    re-implementation from their block definitions.

    The noisy waveform's STFT :math:`Y` (``torch.stft``, square-root Hann window) goes through ``num_unets``
    cascaded complex U-Nets (:class:`ComplexUNet`); the first gives :math:`M_1 = \tanh(U_1(Y))`, the second
    :math:`M_2 = \tanh(U_2(U_1(Y))) + M_1` (the reference "double U-Net"); the estimate is
    :math:`\hat S = Y \cdot M` (complex product) and the inverse STFT. Inside each U-Net, FSMN layers
    (:class:`UniDeepFSMN`) run along the frequency axis of every frame (the frequency recurrence) before encoders
    and after decoders, and along time in the bottleneck. The reference network is ``num_layers=7,
    channels=128, fsmn_hidden=128, fsmn_order=20, fft_len=640, hop_length=320`` (16 kHz); the defaults here are a
    small 8 kHz model. ``frequency_fsmn=False``/``temporal_fsmn=False`` are the ablations.

    Args:
        num_layers: encoders (and decoders) per U-Net (the reference depth 14 is 7).
        channels: complex channels of every encoder/decoder.
        fsmn_hidden, fsmn_order: FSMN hidden size and memory order.
        fft_len, hop_length, win_length: the STFT (``win_length`` defaults to ``fft_len``).
        num_unets: 1 or 2 cascaded U-Nets.
        frequency_fsmn, temporal_fsmn: keep the frequency-recurrence and the bottleneck FSMNs.

    Example:
        >>> net = FRCRN(num_layers=2, channels=4, fsmn_hidden=4, fsmn_order=3, fft_len=64, hop_length=32)
        >>> out = net(torch.randn(2, 800))
        >>> out["estimate"].shape, out["mask"].shape
        (torch.Size([2, 800]), torch.Size([2, 33, 26, 2]))
    """

    def __init__(self, num_layers: int = 4, channels: int = 32, fsmn_hidden: int = 32, fsmn_order: int = 10,
                 fft_len: int = 256, hop_length: int = 128, win_length: int | None = None, num_unets: int = 2,
                 frequency_fsmn: bool = True, temporal_fsmn: bool = True) -> None:
        super().__init__()
        for name, value in (("num_layers", num_layers), ("channels", channels), ("fsmn_hidden", fsmn_hidden),
                            ("fsmn_order", fsmn_order), ("fft_len", fft_len), ("hop_length", hop_length)):
            check_positive_int(name, value)
        win_length = fft_len if win_length is None else win_length
        check_positive_int("win_length", win_length)
        check_number("num_unets", num_unets, low=1, high=2, integer=True)
        if win_length > fft_len or hop_length > win_length:
            raise ValueError(f"FRCRN needs hop_length <= win_length <= fft_len, got {hop_length}, {win_length}, "
                             f"{fft_len}.")
        self.fft_len, self.hop_length, self.win_length = fft_len, hop_length, win_length
        self.bins = fft_len // 2 + 1
        self.register_buffer("window", torch.hann_window(win_length).sqrt(), persistent=False)
        self.unets = nn.ModuleList(
            ComplexUNet(self.bins, num_layers, channels, fsmn_hidden, fsmn_order, frequency_fsmn, temporal_fsmn)
            for _ in range(num_unets))

    def stft(self, wav: Tensor) -> Tensor:
        """Complex ``(B, F, T)`` spectrum of ``(B, N)`` waveforms."""
        return torch.stft(wav, self.fft_len, self.hop_length, self.win_length, self.window, center=True,
                          return_complex=True)

    def istft(self, spec: Tensor, length: int) -> Tensor:
        """``(B, length)`` waveforms of complex ``(B, F, T)`` spectra."""
        return torch.istft(spec, self.fft_len, self.hop_length, self.win_length, self.window, center=True,
                           length=length)

    def forward(self, noisy: Tensor) -> dict[str, Tensor]:
        """``estimate`` (B, N) waveform, ``mask`` (B, F, T, 2) final complex mask, ``spec`` (B, F, T) noisy STFT."""
        if noisy.dim() != 2:
            raise ValueError(f"FRCRN expects (batch, samples) waveforms, got shape {tuple(noisy.shape)}.")
        spec = self.stft(noisy)
        x = torch.view_as_real(spec).unsqueeze(1)  # (B, 1, F, T, 2)
        mask, h = None, x
        for unet in self.unets:
            h = unet(h)
            mask = torch.tanh(h) if mask is None else torch.tanh(h) + mask
        m = mask[:, 0]
        est = spec * torch.complex(m[..., 0], m[..., 1])
        return {"estimate": self.istft(est, noisy.shape[-1]), "mask": m, "spec": spec}

