"""SBPModule: a user's network trained tensor-parallel by an SBP plan under Lightning's ModelParallelStrategy."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from typing_extensions import override

from lightning_ext.core.validation import PositiveFloat, check_choice, check_number
from lightning_ext.parallel.sbp import apply_sbp_plan, plan_styles

__all__ = ["MLP", "SBPModule"]


class MLP(nn.Sequential):
    """``[Flatten,] Linear, ReLU, ..., Linear`` with the given sizes: a network a YAML SBP plan can name
    (``flatten=True``: linear layers are ``"1"``, ``"3"``, ...; otherwise ``"0"``, ``"2"``, ...).

    Example:
        >>> [n for n, m in MLP([4, 8, 2], flatten=False).named_children()]
        ['0', '1', '2']
    """

    def __init__(self, sizes: list[int], flatten: bool = True) -> None:
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"MLP sizes must list at least two positive widths, got {sizes}")
        layers: list[nn.Module] = [nn.Flatten()] if flatten else []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            layers += [nn.Linear(int(a), int(b))] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        super().__init__(*layers)


class SBPModule(LightningModule):
    """Train a network tensor-parallel by an SBP plan (OneFlow's split/broadcast/partial-sum) given in YAML.

    OneFlow (Yuan et al., "OneFlow: Redesign the Distributed Deep Learning Framework from Scratch", arXiv
    2110.15032; code https://github.com/Oneflow-Inc/oneflow) describes model parallelism by each tensor's SBP
    signature. ``sbp_plan`` maps module names (or globs) of ``net`` to signatures ``"input, weight -> output"``
    (see :data:`lightning_ext.parallel.sbp.SIGNATURES`), e.g. the Megatron MLP ``{"0": "B, S(0) -> S(-1)",
    "2": "S(-1), S(1) -> B"}``; the plan is checked when the module is built and applied in ``configure_model``
    on the tensor-parallel dimension of ``ModelParallelStrategy``'s mesh (``data_parallel_size`` x
    ``tensor_parallel_size``), so each process holds only its shards. Without that strategy (one device, DDP)
    ``net`` trains dense, unchanged. Loss: mean squared error on ``(x, y)`` batches, or cross-entropy; optimiser
    SGD with ``lr``. Logs ``train_loss`` and ``val_loss``. With ``data_parallel_size=1`` every rank must read the
    same batches (Lightning's distributed sampler does, seeded alike).

    Args:
        net: the network (any ``nn.Module``; planned submodules are ``nn.Linear`` / ``nn.Embedding``).
        sbp_plan: ``{module name or glob: "input, weight -> output"}``.
        loss: ``"mse"`` or ``"cross_entropy"``.
        lr: SGD learning rate.
        check_chain: refuse plans whose consecutive planned modules disagree on the SBP between them.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> m = SBPModule(net, {"0": "B, S(0) -> S(-1)", "2": "S(-1), S(1) -> B"})
        >>> m(torch.zeros(3, 4)).shape  # dense until configure_model runs under ModelParallelStrategy
        torch.Size([3, 2])
    """

    def __init__(self, net: nn.Module, sbp_plan: dict[str, str], loss: Literal["mse", "cross_entropy"] = "mse",
                 lr: PositiveFloat = 0.01, check_chain: bool = True) -> None:
        super().__init__()
        check_choice("loss", loss, ("mse", "cross_entropy"))
        check_number("lr", lr, low=0, low_open=True)
        plan_styles(net, sbp_plan, check_chain)  # refuse a bad plan now, with one line
        self.net, self.sbp_plan, self.loss_name, self.lr, self.check_chain = net, dict(sbp_plan), loss, float(lr), \
            bool(check_chain)
        self.save_hyperparameters(ignore=["net"])
        self._parallel = False

    @override
    def configure_model(self) -> None:
        """Apply the SBP plan on the tensor-parallel mesh dimension (once; no-op without ModelParallelStrategy)."""
        mesh = self.device_mesh
        if self._parallel or mesh is None:
            return
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" not in names:
            raise ValueError(f"SBPModule needs ModelParallelStrategy's mesh with a 'tensor_parallel' dimension; got "
                             f"dimensions {names}")
        apply_sbp_plan(self.net, mesh["tensor_parallel"], self.sbp_plan, self.check_chain)
        self._parallel = True

    @property
    def is_parallel(self) -> bool:
        """Whether the plan has been applied."""
        return self._parallel

    @override
    def forward(self, x: Tensor) -> Tensor:
        """The network's output (a plain tensor: the plan's outputs are local)."""
        return self.net(x)

    def _loss(self, batch: tuple) -> Tensor:
        x, y = batch[0], batch[1]
        out = self(x)
        return F.mse_loss(out, y) if self.loss_name == "mse" else F.cross_entropy(out, y)

    @override
    def training_step(self, batch: tuple, batch_idx: int) -> Tensor:
        """The loss of one batch (every tensor-parallel rank sees the same batch)."""
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        """Validation loss."""
        self.log("val_loss", self._loss(batch), prog_bar=True)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD over the (possibly sharded) parameters."""
        return torch.optim.SGD(self.parameters(), lr=self.lr, foreach=False)

    def full_state_dict(self) -> dict[str, Tensor]:
        """Parameters gathered to full tensors (a collective under the plan: call it on every rank)."""
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in self.net.state_dict().items()}
