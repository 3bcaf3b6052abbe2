"""``NetFoundModule``: netFound's pretraining objectives and its fine-tuning head as a LightningModule."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from typing_extensions import override

from lightning_ext.core.checkpoints import read_state_dict
from lightning_ext.core.guards import NonFiniteLoss, check_nonfinite_policy
from lightning_ext.core.optimization import check_num_classes, check_optimization
from lightning_ext.core.validation import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    UnitIntervalRightOpen,
    check_choice,
    check_fraction,
    check_non_negative,
    check_number,
    check_positive_int,
)
from lightning_ext.traffic.classification import TrafficClassifierBase
from lightning_ext.traffic.net_found import NetFound, mask_bursts, netfound_losses

__all__ = ["NetFoundModule"]


class NetFoundModule(TrafficClassifierBase):
    r"""netFound: a hierarchical burst/flow transformer pretrained on unlabelled bursts, then fine-tuned to classify.

    Paper: "netFound: Foundation Model for Network Security" (Guthula et al., arXiv 2310.17025); reference code
    https://github.com/SNL-UCSB/netFound (v2, payload-stripped by default). The network is
    :class:`~lightning_ext.traffic.net_found.NetFound`; batches are ``(tokens, metadata, label)`` from
    :class:`~lightning_ext.traffic.pcap_bursts.PcapBurstDataModule` (``representation="netfound_bursts"``).

    - ``task="pretrain"``: swapped-burst detection (``swap_rate``, 0.5), masked token modelling (``mlm_probability``,
      0.3; each 16-bit token predicted as two bytes) and L1 regression of masked bursts' metadata
      (``metadata_weight``, 0.4): :func:`~lightning_ext.traffic.net_found.netfound_losses`. Corruption is drawn from
      a generator seeded by ``seed`` and the global step (a resumed run draws the same). Labels unused.
    - ``task="classify"``: attentive pooling over burst CLS tokens, Linear-GELU-Linear, cross-entropy;
      ``pretrained_path`` loads a pretraining run's encoder (``weights_only=True``, NaN/inf refused) and
      ``freeze_encoder`` (netFound's ``freeze_base``) trains the pooling and head only.

    Args:
        task: ``"pretrain"`` or ``"classify"``.
        num_classes: classes (checked against the datamodule).
        tokens_per_burst, bursts: the datamodule's burst layout (``1 + max_packets * tokens per packet``, 73 and 12 by
            default).
        hidden, layers, heads, ff_dim, flat, dropout: the network (``flat`` drops the flow-level layers: the
            paper's ablation). netFound-small is 512/4/4/768; the default here is a CPU-sized 128/2/4/256.
        mlm_probability, swap_rate, metadata_weight: pretraining.
        pretrained_path, freeze_encoder: fine-tuning from pretrained weights.
        lr, weight_decay, optimizer, scheduler, scheduler_interval, nonfinite_loss, seed: training.

    Example:
        >>> model = NetFoundModule(num_classes=3, tokens_per_burst=13, bursts=4, hidden=16, layers=1, heads=2)
        >>> tokens = torch.randint(1, 300, (2, 4, 13)); tokens[:, :, 0] = 65537
        >>> model(tokens, torch.rand(2, 4, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        task: Literal["pretrain", "classify"] = "classify",
        num_classes: PositiveInt = 2,
        tokens_per_burst: PositiveInt = 73,
        bursts: PositiveInt = 12,
        hidden: PositiveInt = 128,
        layers: PositiveInt = 2,
        heads: PositiveInt = 4,
        ff_dim: PositiveInt = 256,
        flat: bool = False,
        dropout: UnitIntervalRightOpen = 0.1,
        mlm_probability: UnitIntervalRightOpen = 0.3,
        swap_rate: UnitIntervalRightOpen = 0.5,
        metadata_weight: NonNegativeFloat = 0.4,
        pretrained_path: Optional[str] = None,
        freeze_encoder: bool = False,
        lr: PositiveFloat = 1e-4,
        weight_decay: NonNegativeFloat = 0.0,
        optimizer: Optional[OptimizerCallable] = None,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        nonfinite_loss: NonFiniteLoss = "error",
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_choice("task", task, ("pretrain", "classify"))
        check_num_classes(num_classes)
        for name, value in (("tokens_per_burst", tokens_per_burst), ("bursts", bursts), ("hidden", hidden),
                            ("layers", layers), ("heads", heads), ("ff_dim", ff_dim)):
            check_positive_int(name, value)
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads}).")
        for name, value in (("dropout", dropout), ("mlm_probability", mlm_probability), ("swap_rate", swap_rate)):
            check_fraction(name, value, allow_one=False)
        check_non_negative("metadata_weight", metadata_weight)
        check_optimization(lr, weight_decay)
        check_nonfinite_policy(nonfinite_loss)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        check_number("seed", seed, low=0, integer=True)
        if pretrained_path == "":
            raise ValueError("pretrained_path must name a checkpoint; use None (null in YAML) to start from scratch.")
        if freeze_encoder and pretrained_path is None:
            raise ValueError("freeze_encoder=True needs pretrained_path (a frozen random encoder learns nothing).")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.task, self.num_classes, self.seed = task, num_classes, seed
        self.tokens_per_burst, self.bursts = tokens_per_burst, bursts
        self.mlm_probability, self.swap_rate, self.metadata_weight = mlm_probability, swap_rate, metadata_weight
        self.lr, self.weight_decay, self.nonfinite_loss = lr, weight_decay, nonfinite_loss
        self.optimizer_factory, self.scheduler_factory, self.scheduler_interval = optimizer, scheduler, scheduler_interval
        self.net = NetFound(tokens_per_burst, bursts, hidden, layers, heads, ff_dim, num_classes, flat, dropout)
        if pretrained_path is not None:
            self.load_encoder(pretrained_path)
        if freeze_encoder:
            for name, p in self.net.named_parameters():
                p.requires_grad_(name.startswith(("head.", "pool.")))
        self._init_metrics()

    def load_encoder(self, path: str) -> None:
        """Load a pretraining run's encoder (everything but the pooling and classification head)."""
        own = self.net.state_dict()
        state = read_state_dict(path, reference_keys=[f"net.{k}" for k in own], name="pretrained_path")
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.") and not k.startswith(("net.head.",
                                                                                                   "net.pool."))}
        bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
        if not state or bad:
            raise ValueError(f"pretrained_path {path} does not fit this network (e.g. {bad[:3] or 'no net.* keys'}); "
                             "build it with the pretraining run's sizes.")
        self.net.load_state_dict(state, strict=False)

    @override
    def forward(self, tokens: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.net(tokens, meta)

    @override
    def logits(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Class logits of ``(tokens, metadata)``."""
        return self.net(inputs[0], inputs[1])

    @property
    @override
    def uses_labels(self) -> bool:
        """Pretraining ignores labels."""
        return self.task == "classify"

    @override
    def setup(self, stage: str) -> None:
        """Also refuse a datamodule with another burst layout."""
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        layout = getattr(dm, "layout", None)
        if layout is not None and getattr(dm, "representation", "") == "netfound_bursts":
            per = 12 + 2 * (not dm.mask_ports) + layout["payload_tokens"]
            theirs = {"tokens_per_burst": 1 + layout["max_packets"] * per, "bursts": layout["max_bursts"]}
            for key, value in theirs.items():
                if value != getattr(self, key):
                    raise ValueError(f"the datamodule has {key}={value} but NetFoundModule has {getattr(self, key)};"
                                     f" set `model.init_args.{key}: {value}`.")

    @override
    def objective(self, batch: Any, stage: str) -> torch.Tensor:
        """Pretraining loss (``task="pretrain"``) or cross-entropy with metrics."""
        if self.task == "classify":
            return super().objective(batch, stage)
        step = self.global_step if self._trainer is not None else 0
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 3 * step + {"train": 0, "val": 1, "test": 2}[stage])
        corrupted = mask_bursts(batch[0], batch[1], self.mlm_probability, self.swap_rate, g)
        terms = netfound_losses(self.net, corrupted, self.metadata_weight)
        if stage == "train":
            for name in ("mlm_hi", "mlm_lo", "swap", "meta"):
                self.log(f"netfound/{name}", terms[name])
        return terms["loss"]
