"""FedIns on Lightning and Flower: a small frozen CNN backbone, the LightningModule, mixed-domain digits, client, server.

The pure core (SSF pools, per-instance selection, loss, uniform mean) is :mod:`lightning_ext.federated.fedins`.
Here:

- :class:`TinyConvBackbone`: a small CNN feature extractor (pretrained centrally, e.g. on Fashion-MNIST, then
  frozen); its ``conv1``, ``conv2`` and ``fc`` outputs are the SSF sites.
- :class:`FedInsModule`: a LightningModule over :class:`~lightning_ext.federated.fedins.FedInsNet` trained with
  :func:`~lightning_ext.federated.fedins.fedins_loss` (SGD without momentum, the reference optimiser).
- :class:`MixedDigitsDataModule`: intra-client heterogeneity from two real digit domains, MNIST-5k (28x28) and
  scikit-learn's 8x8 digits (upsampled to 20x20 and padded to 28x28, as MNIST's digits sit), batches
  ``(x, y, domain)``.
- :class:`FedInsClient` / :func:`fedins_fedavg`: only the pools, keys and heads leave the client, averaged with
  uniform weights (the reference ``communication``).
"""

from __future__ import annotations

import functools
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_ext.core.guards import check_loss, check_nonfinite_policy
from lightning_ext.core.paths import check_path_argument
from lightning_ext.core.sampling import epoch_loader
from lightning_ext.core.validation import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    check_number,
    check_positive_int,
)
from lightning_ext.federated.client import LightningClient
from lightning_ext.federated.fedins import FedInsNet, fedins_loss

#: the metric each FedIns reply carries so that Flower's FedAvg weighs every client equally
METRIC_WEIGHT = "fedins-weight"


class TinyConvBackbone(nn.Module):
    """``conv1 (3x3, stride 2) -> ReLU -> conv2 (3x3, stride 2) -> ReLU -> flatten -> fc -> ReLU -> LayerNorm``.

    The final LayerNorm (no affine parameters) standardises each instance's features, which keeps a linear head
    trained with plain SGD well conditioned (raw ReLU features have a large common mean).

    Args:
        in_chans: input channels.
        widths: channels of ``conv1`` and ``conv2``.
        feature_dim: output width of ``fc``.
        image_size: input side (28: 7x7 maps after two stride-2 convolutions).

    Example:
        >>> TinyConvBackbone()(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 32])
    """

    def __init__(self, in_chans: int = 1, widths: tuple[int, int] = (8, 16), feature_dim: int = 32,
                 image_size: int = 28) -> None:
        super().__init__()
        for name, value in (("in_chans", in_chans), ("feature_dim", feature_dim), ("image_size", image_size)):
            check_positive_int(name, value)
        if len(widths) != 2:
            raise ValueError(f"widths must give two channel counts (conv1, conv2), got {list(widths)}.")
        side = (((image_size + 1) // 2) + 1) // 2
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 2, 1)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, 2, 1)
        self.fc = nn.Linear(widths[1] * side * side, feature_dim)
        self.norm = nn.LayerNorm(feature_dim, elementwise_affine=False)
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(B, feature_dim)``."""
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.norm(F.relu(self.fc(h.flatten(1))))


class FedInsModule(LightningModule):
    """FedIns' client model: a frozen :class:`TinyConvBackbone` with SSF pools at ``conv1``, ``conv2`` and ``fc``,
    keys queried by the frozen backbone itself, and a pool of heads, trained with
    ``(1 - lambda) CE + lambda (1 - reduced_sim)``; instance-adaptive for any batch size.

    Batches are ``(x, y)`` or ``(x, y, domain)``. Logs ``{stage}_loss``, ``{stage}_acc`` and
    ``fedins/key_similarity`` (the matched cosine per instance).

    Args:
        backbone_path: weights of the pretrained backbone (a state dict or Lightning checkpoint, read with
            ``weights_only=True`` and checked for non-finite values); ``None`` keeps a random frozen backbone.
        in_chans, widths, feature_dim, image_size: the backbone's sizes (must match ``backbone_path``).
        num_classes: classes.
        pool_size: ``P`` (1: plain SSF, the "SSF + FedAvg" baseline).
        top_k: ``k`` (reference 3 of 25; 2 of 10 here).
        key_loss_weight: ``lambda`` (reference 0.1).
        batch_mean: the reference's batched selection (one SSF per batch).
        lr: SGD learning rate (reference 0.01, no momentum).
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` on a non-finite training loss.

    Example:
        >>> m = FedInsModule(pool_size=4, top_k=2)
        >>> sum(p.numel() for p in m.parameters() if p.requires_grad)
        1896
    """

    def __init__(self, backbone_path: Optional[str] = None, in_chans: PositiveInt = 1, widths: tuple[int, int] = (8, 16),
                 feature_dim: PositiveInt = 32, image_size: PositiveInt = 28, num_classes: PositiveInt = 10,
                 pool_size: PositiveInt = 10, top_k: PositiveInt = 2, key_loss_weight: NonNegativeFloat = 0.1,
                 batch_mean: bool = False, lr: PositiveFloat = 0.01,
                 nonfinite_loss: Literal["error", "skip", "warn"] = "error") -> None:
        super().__init__()
        check_path_argument("backbone_path", backbone_path)
        check_number("key_loss_weight", key_loss_weight, low=0, high=1)
        check_number("lr", lr, low=0, low_open=True)
        check_nonfinite_policy(nonfinite_loss)
        self.save_hyperparameters()
        backbone = TinyConvBackbone(in_chans, tuple(widths), feature_dim, image_size)
        if backbone_path is not None:
            from lightning_ext.core.checkpoints import read_state_dict

            state = read_state_dict(backbone_path, reference_keys=list(backbone.state_dict()), name="backbone_path")
            missing = set(backbone.state_dict()) - set(state)
            if missing:
                raise ValueError(f"backbone_path {backbone_path} lacks {sorted(missing)[:4]}; save a "
                                 "TinyConvBackbone's state_dict with the same widths/feature_dim.")
            backbone.load_state_dict({k: state[k] for k in backbone.state_dict()})
        self.net = FedInsNet(backbone, feature_dim, num_classes, ["conv1", "conv2", "fc"], pool_size, top_k,
                             batch_mean=batch_mean)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (each instance with its own selected SSF and head)."""
        return self.net(x)[0]

    def _step(self, batch: Any, stage: str) -> Optional[torch.Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("FedInsModule needs (x, y) or (x, y, domain) batches.")
        x, y = batch[0], batch[1]
        logits, reduced_sim, _ = self.net(x)
        loss = fedins_loss(logits, y, reduced_sim, self.hparams.key_loss_weight)
        if stage == "train" and not check_loss(self, loss, self.hparams.nonfinite_loss, batch):
            return None
        self.log(f"{stage}_loss", loss, batch_size=len(y))
        self.log(f"{stage}_acc", (logits.argmax(-1) == y).float().mean(), batch_size=len(y))
        self.log("fedins/key_similarity", reduced_sim / self.hparams.top_k, batch_size=len(y))
        return loss

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """FedIns' loss on a batch."""
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation loss and accuracy."""
        self._step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Test loss and accuracy."""
        self._step(batch, "test")

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD without momentum over the pools, keys and heads (the reference optimiser)."""
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def _digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits in [0, 1], upsampled (bilinear) to 20x20 and zero-padded to 28x28."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = F.pad(F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    return x.clamp(0, 1).numpy(), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=4)
def mixed_digits(split_seed: int = 0) -> dict:
    """``{"train"|"val"|"test": (x, y, domain)}``: MNIST-5k (domain 0) and scikit-learn digits (domain 1), each
    split 72/8/20 (class-stratified, seeded), standardised with the joint training statistics."""
    from lightning_ext.data.base import stratified_split
    from lightning_ext.data.mnist5k import mnist5k_path

    table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.float32)
    domains = [(table[:, :-1].reshape(-1, 1, 28, 28) / 255.0, table[:, -1].astype(np.int64)), _digits_28()]
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for d, (x, y) in enumerate(domains):
        rest, test = stratified_split(y, 0.2, split_seed)
        train, val = stratified_split(y[rest], 0.1, split_seed)
        for name, idx in (("train", rest[train]), ("val", rest[val]), ("test", test)):
            parts[name].append((torch.as_tensor(x[idx]), torch.as_tensor(y[idx]), torch.full((len(idx),), d)))
    out = {k: tuple(torch.cat([p[i] for p in v]) for i in range(3)) for k, v in parts.items()}
    mean, std = out["train"][0].mean(), out["train"][0].std()
    return {k: ((x - mean) / std, y, dom) for k, (x, y, dom) in out.items()}


class MixedDigitsDataModule(LightningDataModule):
    """Two real digit domains in one dataset: MNIST-5k (domain 0) and scikit-learn's digits (domain 1, 8x8
    upsampled to 20x20 and padded to 28x28); batches ``(x, y, domain)``, ``x`` of shape ``(B, 1, 28, 28)``.

    Each domain is split 72/8/20 train/val/test (class-stratified, ``split_seed``); pixels are standardised with the
    joint training statistics. Wrap it in :class:`~lightning_ext.federated.datamodule.FederatedDataModule` for
    clients: a label partition of the union gives every client a mix of both domains (intra-client heterogeneity).

    Example:
        >>> dm = MixedDigitsDataModule()
        >>> dm.setup(); [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
        [4893, 544, 1360]
    """

    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(self, batch_size: PositiveInt = 32, split_seed: int = 0, shuffle_seed: int = 0) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        check_number("split_seed", split_seed, integer=True)
        check_number("shuffle_seed", shuffle_seed, low=0, integer=True)
        self.batch_size, self.split_seed, self.shuffle_seed = batch_size, split_seed, shuffle_seed
        self.train_set = self.val_set = self.test_set = None

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Load both domains once per process."""
        if self.train_set is None:
            data = mixed_digits(self.split_seed)
            self.train_set, self.val_set, self.test_set = (TensorDataset(*data[k]) for k in ("train", "val", "test"))

    @override
    def train_dataloader(self) -> DataLoader:
        """Seeded shuffled batches (resumable mid-epoch)."""
        return epoch_loader(self.train_set, self.batch_size, train=True, trainer=getattr(self, "trainer", None),
                            seed=self.shuffle_seed)

    @override
    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        return epoch_loader(self.val_set, self.batch_size, train=False)

    @override
    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        return epoch_loader(self.test_set, self.batch_size, train=False)


class FedInsClient(LightningClient):
    """FedIns' client: only the trainable pools, keys and heads are exchanged (the frozen backbone never leaves), and
    every reply carries ``fedins-weight = 1`` so :func:`fedins_fedavg` averages uniformly.

    The model must hold its :class:`~lightning_ext.federated.fedins.FedInsNet` as ``net`` (:class:`FedInsModule`).
    Every argument is :class:`~lightning_ext.federated.client.LightningClient`'s.
    """

    @override
    def is_personal(self, key: str) -> bool:
        """The frozen backbone and query model stay local (identical on every client)."""
        return key.startswith(("net.backbone.", "net.query_model.")) or super().is_personal(key)

    @override
    def train(self, arrays: dict, config: dict, state: Optional[bytes], partition_id: int,
              num_partitions: int) -> tuple[dict, dict, bytes]:
        """:meth:`LightningClient.train` plus the uniform weight."""
        reply, metrics, new_state = super().train(arrays, config, state, partition_id, num_partitions)
        metrics[METRIC_WEIGHT] = 1.0
        return reply, metrics, new_state


def fedins_fedavg(**fedavg_kwargs: Any) -> Any:
    """A Flower ``FedAvg`` weighted by ``fedins-weight`` (1 per client): the uniform mean ``1/N sum_i theta_i`` of
    the pools, keys and heads (the reference ``communication``); run it with :class:`FedInsClient`."""
    from lightning_ext.federated._flwr import require_flwr

    require_flwr("fedins_fedavg")
    from flwr.serverapp.strategy import FedAvg

    if "weighted_by_key" in fedavg_kwargs:
        raise ValueError("fedins_fedavg weighs clients uniformly; do not pass weighted_by_key.")
    return FedAvg(weighted_by_key=METRIC_WEIGHT, **fedavg_kwargs)
