r"""FedSTO (Kim et al., NeurIPS 2023): semi-supervised federated object detection in two stages.

Paper: "Navigating Data Heterogeneity in Federated Learning: A Semi-Supervised Federated Object Detection", Taehyeon
Kim, Eric Lin, Junu Lee, Christian Lau, Vaikkunth Mugunthan, NeurIPS 2023 (OpenReview 2D7ou48q0E). Reference code:
https://github.com/Kthyeon/ssfod holds only data-split scripts ("Code Implementation - Still in progress"), so
everything below the abstract's outline is **Proposed** here, not checked against code or the PDF.

Setting (Verified text): labels only at the server, unlabelled and non-IID clients. Method (Verified text, abstract):

1. **Selective training** (stage 1, ``stage1_rounds`` rounds): clients refine only the detector's *backbone* on
   pseudo-labels; neck and head stay frozen and only backbone weights are sent and averaged.
2. **Orthogonally enhanced full-parameter training** (stage 2): clients train everything, with an orthogonality
   regulariser on the non-backbone weights, and pseudo-labels from a *local EMA* teacher.

The regulariser (Proposed form, Unverified against the paper) for each non-backbone weight ``W`` reshaped to
``(out, in * k * k)``, with ``M = W W^T`` when ``out <= in k k`` and ``W^T W`` otherwise:

.. math::  R(W) = \lambda \, \lVert M - I \rVert_F^2, \qquad \nabla_W R = 4 \lambda (W W^T - I) W

applied as a gradient hook (:class:`OrthogonalityRegularizer` adds ``lambda * grad R`` to each weight's gradient
before every optimizer step), so the user's loss stays untouched. Each round the server (labels only there) first
aggregates the clients' replies (FedAvg; in stage 1 the backbone keys only, merged into the global model), then
fine-tunes the whole model on its labelled data for ``server_steps`` steps (with the regulariser in stage 2); before
round 1 it warms the model up for ``warmup_steps`` steps so that the first pseudo-labels are not random. Also
Proposed: the teacher's EMA decay (0.95 per step), the pseudo-label score threshold (0.5), and that the server's
fine-tuning follows aggregation each round.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 3, 1))
    >>> r = orthogonality_penalty([m.weight for m in net])
    >>> bool(r > 0)
    True
    >>> with torch.no_grad():
    ...     _ = net[1].weight.copy_(torch.eye(4)[:3].reshape(3, 4, 1, 1))
    >>> float(orthogonality_penalty([net[1].weight]))
    0.0
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_ext.core.validation import NonNegativeFloat, check_number, check_positive_int
from lightning_ext.federated.client import Factory, LightningClient, _instantiate

#: the ``state_dict`` prefix of the EMA teacher, kept on each client
TEACHER_PREFIX = "teacher."


def orthogonality_penalty(weights: Iterable[Tensor]) -> Tensor:
    """``sum_W ||W W^T - I||_F^2`` over weights reshaped to ``(out, -1)`` (``W^T W`` when ``out`` is the larger)."""
    total = None
    for w in weights:
        m = w.reshape(w.shape[0], -1)
        if m.shape[0] > m.shape[1]:
            m = m.T
        gram = m @ m.T
        term = (gram - torch.eye(len(gram), dtype=gram.dtype, device=gram.device)).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("orthogonality_penalty needs at least one weight.")
    return total


def regularised_weights(module: torch.nn.Module, backbone: str = "net.backbone") -> list[str]:
    """Names of the weights FedSTO's regulariser acts on: every conv/linear weight outside ``backbone`` and the
    teacher (``*.weight`` of rank >= 2)."""
    names = [n for n, p in module.named_parameters() if n.endswith("weight") and p.ndim >= 2
             and not n.startswith((backbone + ".", TEACHER_PREFIX))]
    if not names:
        raise ValueError(f"no weight outside `{backbone}` to regularise; check the backbone prefix.")
    return names


class OrthogonalityRegularizer(Callback):
    """Adds ``weight * grad R(W)`` (:func:`orthogonality_penalty`) to the gradient of each listed weight before
    every optimizer step: exactly the gradient of ``loss + weight * R`` without changing the user's loss.

    Args:
        weight: ``lambda`` (>= 0).
        names: parameter names (default: :func:`regularised_weights` with ``backbone``).
        backbone: the backbone's prefix, excluded by default.
    """

    def __init__(self, weight: NonNegativeFloat = 1e-2, names: Optional[list[str]] = None,
                 backbone: str = "net.backbone") -> None:
        check_number("weight", weight, low=0)
        if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
            raise TypeError("names must be a list of parameter names (or null for every non-backbone weight).")
        if not isinstance(backbone, str) or not backbone:
            raise ValueError("backbone must be the backbone's parameter prefix, e.g. 'net.backbone'.")
        self.weight, self.names, self.backbone = float(weight), list(names) if names else None, backbone

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Add the regulariser's gradient."""
        params = dict(pl_module.named_parameters())
        for name in self.names or regularised_weights(pl_module, self.backbone):
            p = params[name]
            with torch.enable_grad():
                w = p.detach().clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(orthogonality_penalty([w]), w)
            if p.grad is None:
                p.grad = self.weight * grad
            else:
                p.grad.add_(grad, alpha=self.weight)


class SelectiveTraining(Callback):
    """FedSTO's stage 1: only parameters under ``trainable`` change (every other gradient is dropped before the
    optimizer step, so Adam and SGD leave those parameters exactly as they were)."""

    def __init__(self, trainable: str = "net.backbone") -> None:
        if not isinstance(trainable, str) or not trainable:
            raise ValueError("trainable must be a parameter prefix, e.g. 'net.backbone'.")
        self.trainable = trainable

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Drop the gradients outside the backbone."""
        for name, p in pl_module.named_parameters():
            if not name.startswith(self.trainable + "."):
                p.grad = None


class FedSTOClient(LightningClient):
    """FedSTO's client (and the server's supervised step): backbone-only training and replies in stage 1, full
    training with the orthogonality regulariser in stage 2.

    The round's ``stage`` (from the strategy's config) selects backbone-only training and a backbone-only reply (stage 1) or full training with
    :class:`OrthogonalityRegularizer` (stage 2, ``orthogonal-weight`` in the config). The model's EMA teacher
    (``teacher.*`` keys, :class:`~lightning_ext.federated.fedsto_module.FedSTODetector`) stays local and resumes
    with the client's checkpoint.

    Args:
        backbone: the backbone's ``state_dict`` prefix.
        **kwargs: :class:`~lightning_ext.federated.client.LightningClient`'s arguments.
    """

    def __init__(self, backbone: str = "net.backbone", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(backbone, str) or not backbone:
            raise ValueError("backbone must be the backbone's state_dict prefix, e.g. 'net.backbone'.")
        self.backbone = backbone

    @override
    def is_personal(self, key: str) -> bool:
        """The EMA teacher never leaves the client."""
        return key.startswith(TEACHER_PREFIX) or super().is_personal(key)

    @override
    def round_callbacks(self, config: dict, arrays: dict) -> list[Callback]:
        """Stage 1: :class:`SelectiveTraining`; stage 2: :class:`OrthogonalityRegularizer` (if its weight > 0)."""
        if int(config.get("stage", 2)) == 1:
            return [SelectiveTraining(self.backbone)]
        weight = float(config.get("orthogonal-weight", 0.0))
        return [OrthogonalityRegularizer(weight, backbone=self.backbone)] if weight > 0 else []

    @override
    def train(self, arrays: dict, config: dict, state: Optional[bytes], partition_id: int,
              num_partitions: int) -> tuple[dict, dict, bytes]:
        """:meth:`LightningClient.train`; in stage 1 the reply holds the backbone's keys only."""
        reply, metrics, new_state = super().train(arrays, config, state, partition_id, num_partitions)
        if int(config.get("stage", 2)) == 1:
            reply = {k: v for k, v in reply.items() if k.startswith(self.backbone + ".")}
            if not reply:
                raise ValueError(f"no state_dict key starts with backbone={self.backbone!r}; set the right prefix.")
        return reply, metrics, new_state


def fedsto_fedavg(model: Optional[Factory] = None, server_data: Optional[Factory] = None, stage1_rounds: int = 10, server_steps: int = 20,
                  warmup_steps: int = 100, orthogonal_weight: float = 1e-2, backbone: str = "net.backbone",
                  seed: int = 0, server_trainer: Optional[dict] = None, **fedavg_kwargs: Any) -> Any:
    """A Flower ``FedAvg`` running FedSTO's server: stage schedule, merge of backbone-only averages, and the
    server's supervised fine-tuning on ``server_data`` (labelled) every round.

    Rounds ``1..stage1_rounds`` are stage 1, later rounds stage 2 (``stage1_rounds=0`` and
    ``orthogonal_weight=0``: naive semi-supervised FedAvg with pseudo-labels from round 1). The server's training
    state (its Lightning checkpoint, optimizer included) is part of :meth:`state_dict`, which
    :class:`~lightning_ext.federated.simulation.FederatedSimulation` saves every round, so a crashed federation
    resumes identically.

    Args:
        model: factory ``() -> LightningModule`` or ``class_path`` dict (the clients' model).
        server_data: the labelled DataModule (factory ``() -> DataModule`` or ``class_path`` dict).
        stage1_rounds: rounds of selective (backbone-only) client training.
        server_steps: the server's supervised steps after each aggregation.
        warmup_steps: the server's supervised steps before round 1 (0: none).
        orthogonal_weight: ``lambda`` of the stage-2 regulariser (clients and server).
        backbone: the backbone's ``state_dict`` prefix.
        seed: seed of the server's training.
        server_trainer: extra ``Trainer`` arguments of the server's fits.
        **fedavg_kwargs: Flower ``FedAvg``'s arguments.
    """
    from lightning_ext.federated._flwr import require_flwr

    require_flwr("fedsto_fedavg")
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    if model is None:
        raise ValueError("fedsto_fedavg needs `model`: the clients' model factory or class_path dict (for the server).")
    check_number("stage1_rounds", stage1_rounds, low=0, integer=True)
    check_positive_int("server_steps", server_steps)
    check_number("warmup_steps", warmup_steps, low=0, integer=True)
    check_number("orthogonal_weight", orthogonal_weight, low=0)
    if callable(server_data):
        data_factory = lambda i, n: server_data()  # noqa: E731 - the server is one labelled "partition"
    elif isinstance(server_data, dict) and "class_path" in server_data:
        data_factory = lambda i, n: _instantiate(server_data)  # noqa: E731
    else:
        raise TypeError("server_data must be a DataModule factory or a dict with `class_path` (the labelled data).")
    server = FedSTOClient(backbone=backbone, model=model, datamodule=data_factory, local_steps=server_steps, seed=seed,
                          trainer=server_trainer)
    warm = FedSTOClient(backbone=backbone, model=model, datamodule=data_factory, local_steps=warmup_steps or 1,
                        seed=seed, trainer=server_trainer)

    class FedSTOFedAvg(FedAvg):
        def __init__(self) -> None:
            super().__init__(**fedavg_kwargs)
            self.stage1_rounds, self.orthogonal_weight = int(stage1_rounds), float(orthogonal_weight)
            self.server, self.warmup_steps = server, int(warmup_steps)
            self.server_state: Optional[bytes] = None
            self.global_arrays: Optional[dict] = None

        def stage(self, server_round: int) -> int:
            """1 during selective training, 2 after."""
            return 1 if server_round <= self.stage1_rounds else 2

        def server_update(self, arrays: dict, server_round: int, stage: int = 2) -> tuple[dict, dict]:
            """The server's supervised fine-tuning from ``arrays`` (its optimizer state continues across rounds)."""
            config = {"server-round": server_round, "stage": 2,
                      "orthogonal-weight": self.orthogonal_weight if stage == 2 else 0.0}
            reply, metrics, self.server_state = self.server.train(arrays, config, self.server_state, 0, 1)
            return reply, metrics

        def warm_up(self, arrays: dict) -> dict:
            """``warmup_steps`` supervised steps before round 1 (the server's state starts there)."""
            if self.warmup_steps == 0:
                return arrays
            reply, _, self.server_state = warm.train(arrays, {"server-round": 0, "stage": 2}, None, 0, 1)
            return reply

        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
            glob = arrays.to_torch_state_dict()
            if server_round == 1 and self.server_state is None:
                glob = self.warm_up(glob)
                arrays = ArrayRecord(glob)
            self.global_arrays = glob
            config = ConfigRecord({**dict(config), "stage": self.stage(server_round),
                                   "orthogonal-weight": self.orthogonal_weight})
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            agg, metrics = super().aggregate_train(server_round, replies)
            if agg is None:
                return agg, metrics
            merged = dict(self.global_arrays)
            merged.update({k: v.to(merged[k].dtype) for k, v in agg.to_torch_state_dict().items()})
            updated, server_metrics = self.server_update(merged, server_round, self.stage(server_round))
            metrics = dict(metrics or {})
            metrics.update({f"server-{k}": v for k, v in server_metrics.items() if k.startswith("train")})
            metrics["stage"] = self.stage(server_round)
            return ArrayRecord(updated), metrics

        def state_dict(self) -> dict:
            return {"server_state": self.server_state}

        def load_state_dict(self, state: dict) -> None:
            self.server_state = state["server_state"]

    return FedSTOFedAvg()
