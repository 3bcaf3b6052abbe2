"""``SpeechEnhancementModule``: FRCRN trained on ``(noisy, clean)`` waveforms with the complex-mask and SI-SNR losses."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_ext.audio.frcrn import FRCRN, complex_ideal_ratio_mask, frcrn_loss, si_snr
from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optimization import check_optimization, configure_optimization
from lightning_ext.core.paths import check_path_argument
from lightning_ext.core.optional import require
from lightning_ext.core.samples import log_sample_image, sample_epoch_due, tile_rows
from lightning_ext.core.validation import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_number,
    check_positive_int,
)

__all__ = ["SpeechEnhancementModule"]


class SpeechEnhancementModule(LightningModule):
    r"""Speech enhancement with FRCRN: complex-mask plus SI-SNR loss, logging SI-SNR improvement, PESQ and STOI.

    Paper: "FRCRN: Boosting Feature Representation using Frequency Recurrence for Monaural Speech Enhancement"
    (Zhao et al., ICASSP 2022, arXiv 2206.07293; reference code https://github.com/modelscope/modelscope,
    ``modelscope/models/audio/ans/frcrn.py``). The network is :class:`~lightning_ext.audio.frcrn.FRCRN`, built from
    the arguments below.

    Loss (the reference ``'Mix'`` mode, final stage only; :func:`~lightning_ext.audio.frcrn.frcrn_loss`):
    :math:`L = -\mathrm{SI\text{-}SNR}(\hat s, s) + 2F\,[\mathrm{MSE}(\hat M_r, M_r) + \mathrm{MSE}(\hat M_i, M_i)]`
    with the clipped complex ideal ratio mask :math:`M = S\overline{Y}/|Y|^2`; ``loss="sisnr"`` keeps only the first
    term. Batches are ``(noisy (B, N), clean (B, N))`` at ``sample_rate`` (checked against the datamodule's).
    Logs ``train_loss``, ``train_sisnr``, ``{val,test}_sisnr``, ``{val,test}_sisnri`` (the improvement over the
    noisy input) and, on the first ``perceptual_utterances`` of each evaluated split, ``{stage}_pesq`` (narrow-band at
    8 kHz, wide-band at 16 kHz), ``{stage}_stoi`` and the noisy input's ``{stage}_pesq_noisy``/``{stage}_stoi_noisy``
    (torchmetrics' functional PESQ/STOI; PyPI ``pesq``/``pystoi``; CPU-heavy, so by default on test only). Every
    ``sample_images_every_n_epochs`` validation epochs a log-magnitude spectrogram image (noisy / clean / enhanced)
    of the first validation mixture is saved under ``sample_images_dir``.

    Args:
        num_layers, channels, fsmn_hidden, fsmn_order, fft_len, hop_length, num_unets, frequency_fsmn,
            temporal_fsmn: the FRCRN network.
        loss: ``"mix"`` (complex mask + SI-SNR) or ``"sisnr"``.
        sample_rate: the waveforms' rate in Hz.
        perceptual_metrics: where PESQ and STOI are computed: ``"test"``, ``"val_test"`` or ``"none"``.
        perceptual_utterances: at most this many utterances per epoch get PESQ/STOI.
        lr, weight_decay, optimizer, scheduler, scheduler_interval: the optimiser (default AdamW).
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.
        sample_images_every_n_epochs, sample_images_dir: spectrogram images (0 / ``None``: off).

    Example:
        >>> model = SpeechEnhancementModule(num_layers=2, channels=4, fsmn_hidden=4, fsmn_order=3, fft_len=64,
        ...                                 hop_length=32, perceptual_metrics="none")
        >>> model(torch.randn(2, 800)).shape
        torch.Size([2, 800])
    """

    def __init__(
        self,
        num_layers: PositiveInt = 4,
        channels: PositiveInt = 32,
        fsmn_hidden: PositiveInt = 32,
        fsmn_order: PositiveInt = 10,
        fft_len: PositiveInt = 256,
        hop_length: PositiveInt = 128,
        num_unets: Literal[1, 2] = 2,
        frequency_fsmn: bool = True,
        temporal_fsmn: bool = True,
        loss: Literal["mix", "sisnr"] = "mix",
        sample_rate: PositiveInt = 8000,
        perceptual_metrics: Literal["test", "val_test", "none"] = "test",
        perceptual_utterances: NonNegativeInt = 50,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.0,
        optimizer: Optional[OptimizerCallable] = None,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        nonfinite_loss: NonFiniteLoss = "error",
        sample_images_every_n_epochs: NonNegativeInt = 5,
        sample_images_dir: Optional[str] = "samples",
    ) -> None:
        super().__init__()
        check_choice("loss", loss, ("mix", "sisnr"))
        check_positive_int("sample_rate", sample_rate)
        check_choice("perceptual_metrics", perceptual_metrics, ("test", "val_test", "none"))
        check_number("perceptual_utterances", perceptual_utterances, low=0, integer=True)
        check_optimization(lr, weight_decay)
        check_nonfinite_policy(nonfinite_loss)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        check_number("sample_images_every_n_epochs", sample_images_every_n_epochs, low=0, integer=True)
        check_path_argument("sample_images_dir", sample_images_dir)
        if perceptual_metrics != "none":
            if sample_rate not in (8000, 16000):
                raise ValueError(f"PESQ needs 8000 or 16000 Hz audio, got sample_rate={sample_rate}; resample the data "
                                 "to 8 or 16 kHz or set perceptual_metrics='none'.")
            require("pesq", type(self).__name__)
            require("pystoi", type(self).__name__)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = FRCRN(num_layers, channels, fsmn_hidden, fsmn_order, fft_len, hop_length, None, num_unets,
                         frequency_fsmn, temporal_fsmn)
        self.loss_mode, self.sample_rate = loss, sample_rate
        self.perceptual, self.perceptual_utterances = perceptual_metrics, perceptual_utterances
        self.lr, self.weight_decay = lr, weight_decay
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.nonfinite_loss, self.skipped_steps = scheduler_interval, nonfinite_loss, 0
        self.sample_every, self.sample_dir = sample_images_every_n_epochs, sample_images_dir
        self.metric_names = ("sisnr", "sisnri", "pesq", "stoi", "pesq_noisy", "stoi_noisy")
        for stage in ("val", "test"):
            for name in self.metric_names:
                setattr(self, f"{stage}_{name}_mean", MeanMetric())
        self._perceptual_seen = 0
        self._sample: Optional[tuple[torch.Tensor, ...]] = None

    @override
    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        """The enhanced ``(B, N)`` waveforms of ``(B, N)`` noisy ones."""
        return self.net(noisy)["estimate"]

    @override
    def setup(self, stage: str) -> None:
        """Refuse ``nonfinite_loss='skip'`` under DDP and a datamodule at another sample rate."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        rate = getattr(dm, "sample_rate", None)
        if rate is not None and rate != self.sample_rate:
            raise ValueError(f"The datamodule's audio is at {rate} Hz but SpeechEnhancementModule has sample_rate="
                             f"{self.sample_rate}; set `model.init_args.sample_rate: {rate}`.")

    def _unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        noisy, clean = batch[0], batch[1]
        if noisy.dim() == 3 and noisy.shape[1] == 1:
            noisy, clean = noisy[:, 0], clean[:, 0]
        if noisy.dim() != 2 or noisy.shape != clean.shape:
            raise ValueError(f"SpeechEnhancementModule expects (noisy, clean) batches of equal (B, N) shape, got "
                             f"{tuple(noisy.shape)} and {tuple(clean.shape)}.")
        return noisy, clean

    def loss(self, out: dict[str, torch.Tensor], noisy: torch.Tensor, clean: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms of one batch (:func:`~lightning_ext.audio.frcrn.frcrn_loss`)."""
        target = complex_ideal_ratio_mask(self.net.stft(clean), out["spec"])
        return frcrn_loss(out["estimate"], clean, out["mask"], target, self.loss_mode)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """The FRCRN loss of one batch."""
        noisy, clean = self._unpack(batch)
        terms = self.loss(self.net(noisy), noisy, clean)
        if not check_loss(self, terms["loss"], self.nonfinite_loss, batch):
            return None
        self.log("train_loss", terms["loss"], prog_bar=True)
        self.log("train_sisnr", terms["sisnr"])
        return terms["loss"]

    def _evaluate(self, batch: Any, stage: str, batch_idx: int) -> None:
        noisy, clean = self._unpack(batch)
        out = self.net(noisy)
        est = out["estimate"]
        self.log(f"{stage}_loss", self.loss(out, noisy, clean)["loss"], sync_dist=True)
        s_est, s_noisy = si_snr(est, clean), si_snr(noisy, clean)
        for name, value in (("sisnr", s_est), ("sisnri", s_est - s_noisy)):
            metric = getattr(self, f"{stage}_{name}_mean")
            metric.update(value)
            self.log(f"{stage}_{name}", metric, prog_bar=name == "sisnri")
        if self.perceptual == "val_test" or (self.perceptual == "test" and stage == "test"):
            self._perceptual(stage, est, noisy, clean)
        if stage == "val" and batch_idx == 0:
            self._sample = (out["spec"][0].detach().cpu(), self.net.stft(clean[:1])[0].detach().cpu(),
                            self.net.stft(est[:1])[0].detach().cpu())

    def _perceptual(self, stage: str, est: torch.Tensor, noisy: torch.Tensor, clean: torch.Tensor) -> None:
        from torchmetrics.functional.audio import (
            perceptual_evaluation_speech_quality,
            short_time_objective_intelligibility,
        )

        mode = "nb" if self.sample_rate == 8000 else "wb"
        for i in range(est.shape[0]):
            if self._perceptual_seen >= self.perceptual_utterances:
                return
            self._perceptual_seen += 1
            ref = clean[i].detach().float().cpu()
            for suffix, x in (("", est[i]), ("_noisy", noisy[i])):
                x = x.detach().float().cpu()
                try:
                    pesq = perceptual_evaluation_speech_quality(x, ref, self.sample_rate, mode)
                except Exception:  # noqa: BLE001 - pesq raises on utterances it finds no speech in; skip those
                    pesq = None
                if pesq is not None:
                    getattr(self, f"{stage}_pesq{suffix}_mean").update(pesq)
                    self.log(f"{stage}_pesq{suffix}", getattr(self, f"{stage}_pesq{suffix}_mean"))
                stoi = short_time_objective_intelligibility(x, ref, self.sample_rate)
                getattr(self, f"{stage}_stoi{suffix}_mean").update(stoi)
                self.log(f"{stage}_stoi{suffix}", getattr(self, f"{stage}_stoi{suffix}_mean"))

    @override
    def on_validation_epoch_start(self) -> None:
        """Reset the PESQ/STOI utterance budget."""
        self._perceptual_seen = 0

    @override
    def on_test_epoch_start(self) -> None:
        """Reset the PESQ/STOI utterance budget."""
        self._perceptual_seen = 0

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation loss, SI-SNR and its improvement (and PESQ/STOI with ``perceptual_metrics="val_test"``)."""
        self._evaluate(batch, "val", batch_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Test loss, SI-SNR, its improvement, PESQ and STOI."""
        self._evaluate(batch, "test", batch_idx)

    @override
    def on_validation_epoch_end(self) -> None:
        """Every ``sample_images_every_n_epochs`` epochs of a fit, save a noisy / clean / enhanced spectrogram."""
        sample, self._sample = self._sample, None
        if sample is not None and sample_epoch_due(self, self.sample_every):
            log_sample_image(self, spectrogram_rows(*sample), "val_spectrograms", self.sample_dir,
                             f"epoch {self.current_epoch + 1}: noisy / clean / enhanced (log magnitude)")

    @override
    def configure_optimizers(self):
        """The injected optimiser (default AdamW) and scheduler."""
        return configure_optimization(self, [p for p in self.parameters() if p.requires_grad])


def spectrogram_rows(*specs: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` image of complex ``(F, T)`` spectra as rows of log magnitudes (low frequencies at the bottom,
    one shared dB scale from the first spectrum's peak down 80 dB)."""
    mags = [20 * torch.log10(s.abs().clamp_min(1e-8)).flip(0) for s in specs]
    top = float(mags[0].max())
    rows = [[m.clamp(top - 80, top)] for m in mags]
    for row in rows:  # a shared scale: pin one corner to each end so tile_rows' min-max keeps it
        row[0][0, 0], row[0][-1, -1] = top - 80, top
    return tile_rows(rows)
