"""FedD2S (Atapour et al., 2024): personalised federated mutual distillation with deep-to-shallow layer dropping.

Paper: "FedD2S: Personalized Data-Free Federated Knowledge Distillation", Kawa Atapour, S. Jamal Seyedmohammadi,
Jamshid Abouei, Arash Mohammadi and Konstantinos N. Plataniotis, arXiv 2402.10846 (2024). Reference code: none
published (searched for the spec and again for this module).

What the paper's abstract and a third-party summary state: personalised FL through data-free knowledge distillation
(no public dataset); two-phase *mutual* distillation, with cross-entropy and KL divergence in both directions; the
local models progressively drop their *deeper* layers from the federation (deep-to-shallow), keeping them personal,
while a *global head* reads the partial (intermediate) representation and distils it back to the client; a
layer-dropping rate controls the pace. The PDF's section III (what crosses the network, the schedule, the loss
weights) could not be read here, so this module is a **reconstruction**, stated as such:

* The client model is ``L`` blocks ``f_1 .. f_L``, a *personal* head ``h`` on ``f_L`` and one *global exit head*
  ``g_d`` per block (pool + linear on block ``d``'s output), :class:`FedD2SNet`.
* Deep-to-shallow dropping: in round ``r`` the federation reaches depth ``d(r) = L - min(k_max, floor(r rho))``
  (``rho`` = ``drop_rate`` blocks per round, ``k_max`` = ``max_dropped``, at most ``L - 1``). Blocks
  ``f_1 .. f_d(r)`` and exit heads ``g_1 .. g_d(r)`` are shared (FedAvg); the deeper blocks, their exits and ``h``
  stay on the client (a dynamic version of FedPer's personal layers). The server decides ``d(r)``.
* Mutual distillation on the client's own batch ``(x, y)`` (data-free: only parameters travel, as in FedAvg), with
  ``z_p = h(f_L(..f_1(x)))`` (personal) and ``z_g = g_d(f_d(..f_1(x)))`` (the global head on the partial
  representation), temperature ``T`` and weight ``lambda``::

      L = CE(z_p, y) + CE(z_g, y)
          + lambda T^2 [ KL(sg[softmax(z_g / T)] || softmax(z_p / T))      # global -> personal
                       + KL(sg[softmax(z_p / T)] || softmax(z_g / T)) ]    # personal -> global

  (``sg`` = stop-gradient, KL averaged over the batch, Deep Mutual Learning's convention; ``T = lambda = 1`` by
  default, the paper's values unknown). The paper's two phases are summed into one step here.

Deviation flagged: the summary says the *server* turns intermediate representations into soft labels with head
models; a server that received per-sample representations would not be data-free in the privacy sense, so here the
global heads run on the clients and only their weights are averaged.

On Flower: :func:`fedd2s_fedavg` is a ``FedAvg`` that puts the round's depth, ``lambda`` and ``T`` into the train
config; :class:`FedD2SClient` is a :class:`~lightning_ext.federated.client.LightningClient` whose shared keys follow
that depth, training a :class:`~lightning_ext.federated.fedd2s_module.FedD2SModule` (a Classifier whose training loss is
:func:`fedd2s_loss`; validation and test use the personal head).

Example:
    >>> import torch
    >>> net = FedD2SNet(in_chans=1, num_classes=10, widths=(8, 16))
    >>> personal, exit_logits = net.forward_exit(torch.randn(2, 1, 28, 28), depth=1)
    >>> personal.shape, exit_logits.shape
    (torch.Size([2, 10]), torch.Size([2, 10]))
    >>> [exit_depth(r, num_blocks=4, drop_rate=0.25) for r in (1, 4, 8, 12, 40)]
    [4, 3, 2, 1, 1]
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lightning_ext.core.validation import check_number, check_positive_int
from lightning_ext.federated.client import LightningClient

#: keys of FedD2S's entries in a round's train ConfigRecord
CONFIG_DEPTH, CONFIG_KD_WEIGHT, CONFIG_TEMPERATURE = "fedd2s-depth", "fedd2s-kd-weight", "fedd2s-temperature"
#: where the module stores its last exit depth in a Lightning checkpoint
CKPT_DEPTH = "fedd2s_exit_depth"


def exit_depth(server_round: int, num_blocks: int, drop_rate: float, max_dropped: Optional[int] = None) -> int:
    """Depth the federation reaches in ``server_round``: ``L - min(k_max, floor(round * drop_rate))``, at least 1."""
    check_number("server_round", server_round, low=0, integer=True)
    check_positive_int("num_blocks", num_blocks)
    check_number("drop_rate", drop_rate, low=0)
    k_max = num_blocks - 1 if max_dropped is None else int(max_dropped)
    if not 0 <= k_max <= num_blocks - 1:
        raise ValueError(f"max_dropped={max_dropped} must lie in [0, {num_blocks - 1}] (num_blocks - 1): at least the "
                         "first block stays shared.")
    return num_blocks - min(k_max, math.floor(server_round * drop_rate + 1e-9))


def fedd2s_loss(personal_logits: torch.Tensor, global_logits: torch.Tensor, targets: torch.Tensor,
                kd_weight: float = 1.0, temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FedD2S's mutual-distillation loss (module docstring): both cross-entropies plus both stop-gradient KLs.

    Returns the total and its parts ``ce_personal``, ``ce_global``, ``kl_to_personal`` (the global head teaching the
    personal head) and ``kl_to_global`` (the reverse), the KLs already multiplied by ``T^2``.
    """
    check_number("kd_weight", kd_weight, low=0)
    check_number("temperature", temperature, low=0, low_open=True)
    t = float(temperature)
    ce_p = F.cross_entropy(personal_logits, targets)
    ce_g = F.cross_entropy(global_logits, targets)
    log_p, log_g = F.log_softmax(personal_logits / t, dim=1), F.log_softmax(global_logits / t, dim=1)
    kl_to_p = F.kl_div(log_p, log_g.detach(), reduction="batchmean", log_target=True) * t * t
    kl_to_g = F.kl_div(log_g, log_p.detach(), reduction="batchmean", log_target=True) * t * t
    total = ce_p + ce_g + kd_weight * (kl_to_p + kl_to_g)
    return total, {"ce_personal": ce_p, "ce_global": ce_g, "kl_to_personal": kl_to_p, "kl_to_global": kl_to_g}


class FedD2SNet(nn.Module):
    """``L`` conv blocks (conv3x3-BN-ReLU-maxpool2), a personal head on the last and a global exit head on each.

    ``forward`` is the personal path (``h(f_L(...))``), so the net also serves plain FedAvg/FedPer/local baselines
    (their exit heads then get no gradient). Heads are global average pooling + ``nn.Linear``.

    Args:
        in_chans: input channels.
        num_classes: outputs of every head.
        widths: channels of each block (its length is ``L``).

    Example:
        >>> FedD2SNet(widths=(8, 16, 16))(torch.randn(3, 1, 28, 28)).shape
        torch.Size([3, 10])
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64, 64)) -> None:
        super().__init__()
        check_positive_int("in_chans", in_chans)
        check_positive_int("num_classes", num_classes)
        if isinstance(widths, int) or not widths:
            raise ValueError("widths must be a non-empty list of block widths, e.g. [16, 32, 64, 64].")
        for w in widths:
            check_positive_int("widths", w)
        blocks, previous = [], in_chans
        for w in widths:
            blocks.append(nn.Sequential(nn.Conv2d(previous, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                                        nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)))
            previous = w
        self.blocks = nn.ModuleList(blocks)
        self.exits = nn.ModuleList(self._head(w, num_classes) for w in widths)
        self.head = self._head(widths[-1], num_classes)

    @staticmethod
    def _head(width: int, num_classes: int) -> nn.Module:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    @property
    def num_blocks(self) -> int:
        """``L``."""
        return len(self.blocks)

    def forward_exit(self, x: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Personal logits and the global exit head's logits at block ``depth`` (1-based), in one pass."""
        if not 1 <= depth <= self.num_blocks:
            raise ValueError(f"depth={depth} must lie in [1, {self.num_blocks}].")
        exit_logits = None
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i == depth:
                exit_logits = self.exits[i - 1](x)
        return self.head(x), exit_logits

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Personal logits."""
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class _RoundSettings(Callback):
    """Sets the module's exit depth, ``kd_weight`` and ``temperature`` for one round."""

    def __init__(self, depth: int, kd_weight: float, temperature: float) -> None:
        self.depth, self.kd_weight, self.temperature = depth, kd_weight, temperature

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse a module without an exit depth; set the round's values."""
        if not hasattr(pl_module, "exit_depth") or not hasattr(getattr(pl_module, "net", None), "forward_exit"):
            raise TypeError(f"FedD2SClient trains a FedD2SModule (fedd2s_module.py), got {type(pl_module).__name__}.")
        pl_module.exit_depth, pl_module.kd_weight, pl_module.temperature = self.depth, self.kd_weight, self.temperature


class FedD2SClient(LightningClient):
    """A :class:`~lightning_ext.federated.client.LightningClient` whose shared layers shrink from deep to shallow.

    Each round it reads the depth ``d`` (and ``lambda``, ``T``) from the :func:`fedd2s_fedavg` server's config; blocks
    ``1..d`` and exit heads ``1..d`` are shared, everything deeper and the personal head stay on the client (global
    arrays for keys that became personal are ignored), and the model trains with :func:`fedd2s_loss` at exit ``d``.
    An evaluate message tests the personal head with the depth of the client's last round.

    Args:
        blocks: ``state_dict`` prefix of the block list (``"net.blocks"`` for ``FedD2SModule(FedD2SNet())``).
        exits: prefix of the exit heads.
        head: prefix of the personal head.
        **kwargs: :class:`LightningClient`'s arguments (its ``personal`` patterns stay personal in every round).
    """

    def __init__(self, blocks: str = "net.blocks", exits: str = "net.exits", head: str = "net.head",
                 **kwargs: Any) -> None:
        from lightning_ext.federated._flwr import require_flwr

        require_flwr("FedD2SClient")
        super().__init__(**kwargs)
        for name, value in (("blocks", blocks), ("exits", exits), ("head", head)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a state_dict prefix such as 'net.{name}'.")
        self.blocks, self.exits, self.head = blocks, exits, head
        self.depth: Optional[int] = None  # None: nothing dropped (the initial model)
        self.settings = (1.0, 1.0)

    def _index(self, key: str, prefix: str) -> Optional[int]:
        if not key.startswith(prefix + "."):
            return None
        first = key[len(prefix) + 1:].split(".", 1)[0]
        return int(first) if first.isdigit() else None

    @override
    def is_personal(self, key: str) -> bool:
        """Base ``personal`` patterns, the personal head, and blocks/exits deeper than this round's depth."""
        if super().is_personal(key) or key.startswith(self.head + "."):
            return True
        if self.depth is None:
            return False
        for prefix in (self.blocks, self.exits):
            index = self._index(key, prefix)
            if index is not None and index >= self.depth:
                return True
        return False

    @override
    def shared_keys(self, state: dict) -> list[str]:
        """Refuse a model without the named blocks, exits or head; then :meth:`LightningClient.shared_keys`."""
        for name, prefix in (("blocks", self.blocks), ("exits", self.exits), ("head", self.head)):
            if not any(k.startswith(prefix + ".") for k in state):
                raise ValueError(f"{name}={prefix!r} matches no state_dict key of the model; keys look like "
                                 f"{list(state)[:4]}.")
        return super().shared_keys(state)

    @override
    def _merge(self, weights: dict, arrays: dict) -> dict:
        return super()._merge(weights, {k: v for k, v in arrays.items() if not self.is_personal(k)})

    @override
    def round_callbacks(self, config: dict, arrays: dict) -> list[Callback]:
        """The round's exit depth, ``kd_weight`` and ``temperature`` on the module."""
        return [_RoundSettings(self.depth, *self.settings)]

    @override
    def train(self, arrays: dict, config: dict, state: Optional[bytes], partition_id: int,
              num_partitions: int) -> tuple[dict, dict, bytes]:
        """:meth:`LightningClient.train` at the server's depth for this round; the reply holds the shared keys only."""
        if CONFIG_DEPTH not in config:
            raise ValueError("FedD2SClient received no `fedd2s-depth` in the config; run it with fedd2s_fedavg.")
        self.depth = int(config[CONFIG_DEPTH])
        self.settings = (float(config.get(CONFIG_KD_WEIGHT, 1.0)), float(config.get(CONFIG_TEMPERATURE, 1.0)))
        reply, metrics, new_state = super().train(arrays, config, state, partition_id, num_partitions)
        metrics[CONFIG_DEPTH] = self.depth
        return reply, metrics, new_state

    @override
    def evaluate(self, arrays: dict, state: Optional[bytes], partition_id: int, num_partitions: int) -> dict:
        """Personal-head test metrics with the depth of this client's last round (from its state)."""
        previous = torch.load(io.BytesIO(state), map_location="cpu", weights_only=False) if state else None
        self.depth = previous.get(CKPT_DEPTH) if previous else None
        return super().evaluate(arrays, state, partition_id, num_partitions)

    @override
    def initial_arrays(self) -> dict[str, torch.Tensor]:
        """The shared weights of the initial model: every block and exit head (nothing dropped yet)."""
        self.depth = None
        return super().initial_arrays()


def fedd2s_fedavg(num_blocks: int = 4, drop_rate: float = 0.1, max_dropped: Optional[int] = None,
                  kd_weight: float = 1.0, temperature: float = 1.0, **fedavg_kwargs: Any) -> Any:
    """A Flower ``FedAvg`` that schedules FedD2S's deep-to-shallow dropping and sends ``lambda`` and ``T``.

    ``configure_train`` adds ``fedd2s-depth = exit_depth(round, num_blocks, drop_rate, max_dropped)``,
    ``fedd2s-kd-weight`` and ``fedd2s-temperature`` to the round's config; aggregation is FedAvg over the keys the
    clients sent (the shared blocks and exits of that round), so the global model shrinks as blocks are dropped.
    ``num_blocks`` is ``L``, the model's block count (4 for the default :class:`FedD2SNet`).
    """
    from lightning_ext.federated._flwr import require_flwr

    require_flwr("fedd2s_fedavg")
    check_positive_int("num_blocks", num_blocks)
    exit_depth(1, num_blocks, drop_rate, max_dropped)  # validates drop_rate and max_dropped
    check_number("kd_weight", kd_weight, low=0)
    check_number("temperature", temperature, low=0, low_open=True)
    from flwr.serverapp.strategy import FedAvg

    class FedD2SFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            config[CONFIG_DEPTH] = exit_depth(server_round, num_blocks, drop_rate, max_dropped)
            config[CONFIG_KD_WEIGHT] = float(kd_weight)
            config[CONFIG_TEMPERATURE] = float(temperature)
            return super().configure_train(server_round, arrays, config, grid)

    return FedD2SFedAvg(**fedavg_kwargs)
