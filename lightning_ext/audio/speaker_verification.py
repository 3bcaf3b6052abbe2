"""``SpeakerVerificationModule``: EfficientTDNN trained with AAM-softmax, verified by cosine scoring (EER, minDCF)."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from typing_extensions import override

from lightning_ext.audio.efficient_tdnn import EfficientTDNN, LogMel
from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.optimization import check_optimization, configure_optimization
from lightning_ext.core.validation import (
    NonNegativeFloat,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    check_choice,
    check_number,
    check_positive,
    check_positive_int,
)

__all__ = ["SpeakerVerificationModule", "aam_softmax_logits", "cosine_trials", "equal_error_rate", "min_dcf"]


def aam_softmax_logits(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, margin: float = 0.2,
                       scale: float = 30.0) -> torch.Tensor:
    r"""Additive angular margin softmax (AAM-softmax, ArcFace) logits; their cross-entropy is the speaker loss.

    The logits are :math:`s\cos(\theta_y + m)` for the true class and :math:`s\cos\theta_j` for the others,
    :math:`\cos\theta_j = \hat x \cdot \hat W_j`. Where :math:`\theta_y + m > \pi` (``cos < cos(pi - m)``) the
    target logit is :math:`s(\cos\theta_y - m\sin m)`, which keeps it monotonic (the reference ``sugar/loss/aamsoftmax.py``
    convention, ``easy_margin=False``). ``weight`` is ``(dim, classes)`` as in the reference.

    Example:
        >>> x, w = torch.eye(2), torch.eye(2)
        >>> aam_softmax_logits(x, w, torch.tensor([0, 1]), margin=0.0, scale=1.0)
        tensor([[1., 0.],
                [0., 1.]])
    """
    cosine = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=0)
    sine = (1.0 - cosine * cosine).clamp(0, 1).sqrt()
    phi = cosine * math.cos(margin) - sine * math.sin(margin)
    phi = torch.where(cosine - math.cos(math.pi - margin) > 0, phi, cosine - math.sin(math.pi - margin) * margin)
    one_hot = F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
    return scale * (one_hot * phi + (1 - one_hot) * cosine)


def cosine_trials(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unordered pair of utterances as a trial: cosine scores and targets (1 when both have one label).

    Example:
        >>> s, t = cosine_trials(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), torch.tensor([0, 0, 1]))
        >>> t.tolist()
        [1, 0, 0]
    """
    e = F.normalize(embeddings.float(), dim=1)
    i, j = torch.triu_indices(len(e), len(e), offset=1, device=e.device)
    return (e[i] * e[j]).sum(1), (labels[i] == labels[j]).long()


def _rates(scores: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-rejection and false-acceptance rates when accepting ``score >= threshold``, at every distinct score."""
    s, t = scores.detach().double().cpu().numpy(), targets.detach().cpu().numpy().astype(bool)
    n_t, n_n = int(t.sum()), int((~t).sum())
    if n_t == 0 or n_n == 0:
        raise ValueError(f"verification needs target and non-target trials, got {n_t} target and {n_n} non-target; "
                         "give every trial speaker at least two utterances and use at least two speakers.")
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # accept all scores down to each distinct value
    tp, fp = np.cumsum(t)[last], np.cumsum(~t)[last]
    frr = np.r_[1.0, 1 - tp / n_t]
    far = np.r_[0.0, fp / n_n]
    return frr, far, np.r_[np.inf, s[last]]


def equal_error_rate(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """The equal error rate: where the false-rejection and false-acceptance rates cross along the ROC curve
    (linear interpolation between its points, as the reference's ``brentq`` on ``interp1d(fpr, tpr)``).

    Example:
        >>> equal_error_rate(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1, 0, 1, 0]))
        0.5
    """
    frr, far, _ = _rates(scores, targets)
    diff = frr - far  # decreasing from 1 to -1
    k = int(np.flatnonzero(diff <= 0)[0])
    if diff[k] == 0 or k == 0:
        return float(far[k])
    w = diff[k - 1] / (diff[k - 1] - diff[k])
    return float(far[k - 1] + w * (far[k] - far[k - 1]))


def min_dcf(scores: torch.Tensor, targets: torch.Tensor, p_target: float = 0.01, c_miss: float = 1.0,
            c_fa: float = 1.0) -> float:
    r"""The minimum normalised detection cost (NIST SRE): :math:`\min_\tau [c_{miss} P_{miss}(\tau) p +
    c_{fa} P_{fa}(\tau)(1-p)] / \min(c_{miss} p, c_{fa}(1-p))` over thresholds (the reference ``compute_mindcf``).

    Example:
        >>> min_dcf(torch.tensor([0.9, 0.1]), torch.tensor([1, 0]))
        0.0
    """
    frr, far, _ = _rates(scores, targets)
    cost = c_miss * frr * p_target + c_fa * far * (1 - p_target)
    return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))


class SpeakerVerificationModule(LightningModule):
    r"""Speaker recognition with the EfficientTDNN supernet: AAM-softmax speaker classification on training speakers,
    verification of unseen speakers by cosine scoring of embeddings (EER and minDCF).

    Paper: "EfficientTDNN: Efficient Architecture Search for Speaker Recognition" (Wang et al., IEEE/ACM TASLP 2022,
    arXiv 2103.13581; reference code https://github.com/mechanicalsea/sugar, ``scripts/train_vox2_veri.py``,
    ``sugar/loss/aamsoftmax.py``). The network is :class:`~lightning_ext.audio.efficient_tdnn.EfficientTDNN` on
    log-mel features (:class:`~lightning_ext.audio.efficient_tdnn.LogMel`). Loss: cross-entropy of
    :func:`aam_softmax_logits` (margin 0.2, scale 30 by default, the reference's values).

    Weight sharing is best driven by the callbacks: keep ``subnet_sampling="none"`` (the module trains :attr:`net`'s
    active config: the whole network, or a fixed sub-network) and add
    :class:`~lightning_ext.audio.subnet_sampling.SubnetSampling` (the sub-networks of each step, seeded and
    resume-exact) and :class:`~lightning_ext.audio.bn_recalibration.BNRecalibration` (BatchNorm statistics of the
    evaluated sub-network before validation/test). The older in-module rules stay available: ``"random"`` trains
    one sub-network drawn from a generator seeded by ``(seed, global_step)`` (the same draw as
    ``SubnetSampling(rule="random")``); ``"sandwich"`` adds the largest one (two forward/backward passes a step,
    losses summed). Evaluation uses ``eval_config`` (``None``: the active config); recalibrate BatchNorm for it
    (``BNRecalibration``, or :func:`~lightning_ext.audio.efficient_tdnn.recalibrate_batchnorm`).

    Batches are ``(waveform (B, N), speaker index)`` (:class:`~lightning_ext.audio.speakers.SpeakerDataModule`);
    validation and test trials are every pair of the split's utterances. Logs ``train_loss``, ``train_acc``,
    ``{val,test}_eer`` (in %), ``{val,test}_mindcf`` (``p_target``) and ``{val,test}_trials``. One process only:
    the trials need every embedding of a split.

    Args:
        num_classes: training speakers (``None``: the datamodule's ``num_classes`` at ``setup``).
        sample_rate, n_mels: the features.
        channels, widths, num_blocks, kernel_size, catconv_channels, embed_dim, res2_scale, attention_dim,
            width_ratios, kernel_choices, min_depth: the supernet and its search space.
        margin, logit_scale: AAM-softmax.
        subnet_sampling: ``"none"``, ``"random"`` or ``"sandwich"``; seed: the sampling seed.
        p_target: the minDCF target prior.
        lr, weight_decay, optimizer, scheduler, scheduler_interval: the optimiser (default AdamW).
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.

    Example:
        >>> m = SpeakerVerificationModule(num_classes=3, n_mels=16, channels=16, widths=16, num_blocks=2,
        ...                               catconv_channels=32, embed_dim=8, attention_dim=8)
        >>> m(torch.randn(2, 8000)).shape
        torch.Size([2, 8])
    """

    def __init__(self, num_classes: Optional[PositiveInt] = None, sample_rate: PositiveInt = 8000,
                 n_mels: PositiveInt = 40, channels: PositiveInt = 128, widths: PositiveInt = 128,
                 num_blocks: PositiveInt = 3, kernel_size: PositiveInt = 5, catconv_channels: PositiveInt = 384,
                 embed_dim: PositiveInt = 64, res2_scale: PositiveInt = 8, attention_dim: PositiveInt = 64,
                 width_ratios: list[float] = [0.25, 0.35, 0.5, 0.75, 1.0],  # noqa: B006 - read only
                 kernel_choices: list[int] = [1, 3, 5], min_depth: Optional[PositiveInt] = None,  # noqa: B006
                 margin: NonNegativeFloat = 0.2, logit_scale: PositiveFloat = 30.0,
                 subnet_sampling: Literal["none", "random", "sandwich"] = "none", seed: int = 0,
                 p_target: OpenUnitInterval = 0.01, lr: PositiveFloat = 1e-3, weight_decay: NonNegativeFloat = 0.0,
                 optimizer: Optional[OptimizerCallable] = None, scheduler: Optional[LRSchedulerCallable] = None,
                 scheduler_interval: Literal["epoch", "step"] = "epoch", nonfinite_loss: NonFiniteLoss = "error",
                 eval_config: Optional[dict] = None) -> None:
        super().__init__()
        if num_classes is not None:
            check_number("num_classes", num_classes, low=2, integer=True)
        for name, value in (("sample_rate", sample_rate), ("n_mels", n_mels), ("channels", channels),
                            ("widths", widths), ("num_blocks", num_blocks), ("kernel_size", kernel_size),
                            ("catconv_channels", catconv_channels), ("embed_dim", embed_dim),
                            ("res2_scale", res2_scale), ("attention_dim", attention_dim)):
            check_positive_int(name, value)
        if min_depth is not None:
            check_positive_int("min_depth", min_depth)
        check_number("margin", margin, low=0, high=math.pi / 2)
        check_positive("logit_scale", logit_scale)
        check_choice("subnet_sampling", subnet_sampling, ("none", "random", "sandwich"))
        check_number("seed", seed, integer=True)
        check_number("p_target", p_target, low=0, high=1)
        if not 0 < p_target < 1:
            raise ValueError(f"`p_target` must be in (0, 1), got {p_target}.")
        check_optimization(lr, weight_decay)
        check_nonfinite_policy(nonfinite_loss)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.features = LogMel(sample_rate, n_mels)
        self.net = EfficientTDNN(n_mels, channels, widths, num_blocks, kernel_size, catconv_channels, embed_dim,
                                 res2_scale, attention_dim=attention_dim, width_ratios=width_ratios,
                                 kernel_choices=kernel_choices, min_depth=min_depth)
        self.num_classes, self.margin, self.logit_scale = num_classes, float(margin), float(logit_scale)
        self.classifier: Optional[nn.Parameter] = None
        if num_classes is not None:
            self._build_classifier(num_classes)
        self.sample_rate, self.subnet_sampling, self.seed, self.p_target = sample_rate, subnet_sampling, seed, p_target
        self.eval_config = eval_config
        self.lr, self.weight_decay = lr, weight_decay
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.nonfinite_loss, self.skipped_steps = scheduler_interval, nonfinite_loss, 0
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}

    def _build_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Parameter(torch.empty(self.net.embed_dim, num_classes))
        nn.init.xavier_normal_(self.classifier, gain=1)

    @override
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """Speaker embeddings ``(B, embed_dim)`` of waveforms ``(B, N)`` through the active sub-network."""
        if wav.dim() == 3 and wav.shape[1] == 1:
            wav = wav[:, 0]
        if wav.dim() != 2:
            raise ValueError(f"SpeakerVerificationModule expects waveforms (B, N), got shape {tuple(wav.shape)}.")
        return self.net(self.features(wav))

    @override
    def setup(self, stage: str) -> None:
        """Take ``num_classes`` from the datamodule, check its sample rate, refuse several processes."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)
        if self._trainer is not None and self.trainer.world_size > 1:
            raise ValueError("SpeakerVerificationModule scores trials over every embedding of a split and runs in "
                             "one process; set trainer.devices=1 (or strategy='auto' on one device).")
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        rate = getattr(dm, "sample_rate", None)
        if rate is not None and rate != self.sample_rate:
            raise ValueError(f"The datamodule's audio is at {rate} Hz but SpeakerVerificationModule has sample_rate="
                             f"{self.sample_rate}; set `model.init_args.sample_rate: {rate}`.")
        if self.classifier is None:
            if dm is None or not hasattr(dm, "num_classes"):
                raise ValueError("SpeakerVerificationModule needs num_classes (training speakers): set it, or use a "
                                 "datamodule with a num_classes attribute such as SpeakerDataModule.")
            dm.setup(stage)
            self.num_classes = int(dm.num_classes)
            self.hparams["num_classes"] = self.num_classes  # a checkpoint rebuilds the classifier
            self._build_classifier(self.num_classes)

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """AAM-softmax cross-entropy and the logits."""
        if int(labels.max()) >= self.classifier.shape[1]:
            raise ValueError(f"speaker index {int(labels.max())} is out of range for num_classes="
                             f"{self.classifier.shape[1]}; set num_classes to the number of training speakers.")
        logits = aam_softmax_logits(embeddings, self.classifier, labels, self.margin, self.logit_scale)
        return F.cross_entropy(logits, labels), logits

    def step_configs(self, global_step: int) -> list[Optional[dict]]:
        """The sub-network(s) trained at ``global_step`` (drawn from a generator seeded by ``(seed, step)``, so every
        rank and a resumed run draw the same)."""
        if self.subnet_sampling == "none":
            return [self.net.active]
        g = np.random.default_rng([self.seed, int(global_step)])
        sampled = self.net.sample_config(g)
        return [sampled] if self.subnet_sampling == "random" else [None, sampled]

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """The AAM-softmax loss of the step's sub-network(s)."""
        wav, labels = batch[0], batch[1].long()
        kept = self.net.active
        feats = self.features(wav)
        total, acc = 0.0, 0.0
        try:
            configs = self.step_configs(self.global_step)
            for config in configs:
                self.net.active = config
                loss, logits = self.loss(self.net(feats), labels)
                total = total + loss
                acc = acc + (logits.argmax(1) == labels).float().mean() / len(configs)
        finally:
            self.net.active = kept
        if not check_loss(self, total, self.nonfinite_loss, batch):
            return None
        self.log("train_loss", total, prog_bar=True)
        self.log("train_acc", acc)
        return total

    def _evaluate(self, batch: Any, stage: str) -> None:
        kept = self.net.active
        self.net.active = self.eval_config if self.eval_config is not None else kept
        try:
            emb = self(batch[0])
        finally:
            self.net.active = kept
        self._outputs[stage].append((emb.detach().float().cpu(), batch[1].detach().cpu()))

    def _score(self, stage: str) -> None:
        outputs, self._outputs[stage] = self._outputs[stage], []
        if not outputs or self.trainer.sanity_checking:
            return
        scores, targets = cosine_trials(torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs]))
        self.log(f"{stage}_eer", 100.0 * equal_error_rate(scores, targets), prog_bar=stage == "val")
        self.log(f"{stage}_mindcf", min_dcf(scores, targets, self.p_target))
        self.log(f"{stage}_trials", float(len(scores)))

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Embed the batch (trials are scored at the epoch's end)."""
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Embed the batch (trials are scored at the epoch's end)."""
        self._evaluate(batch, "test")

    @override
    def on_validation_epoch_end(self) -> None:
        """EER and minDCF over every pair of validation utterances."""
        self._score("val")

    @override
    def on_test_epoch_end(self) -> None:
        """EER and minDCF over every pair of test utterances."""
        self._score("test")

    @override
    def configure_optimizers(self):
        """The injected optimiser (default AdamW) and scheduler."""
        return configure_optimization(self, [p for p in self.parameters() if p.requires_grad])
