"""FedTiny on Flower: the server strategy (:func:`fedtiny_fedavg`) and the client (:class:`FedTinyClient`).

The algorithm, its equations and the reference code are in :mod:`lightning_ext.federated.fedtiny`. Message flow:

* Round 1, before training, the strategy runs the adaptive BN selection through the grid it is given: a
  ``query.fedtiny_bn`` message per client carries the initial weights and the candidates' masks, each client
  replies its recalibrated BN statistics per candidate; a ``query.fedtiny_score`` message carries the averaged
  statistics back, each client replies its loss per candidate (``fedtiny-loss``, a list). The strategy keeps
  the argmin candidate: its masked weights with the averaged statistics become the global model.
* Every train message carries the masks in the ``ArrayRecord`` (keys ``fedtiny.mask.<weight>``) and the round's
  prune-and-grow ratio in the config (``fedtiny-ratio``, 0 outside adjustment rounds). The client trains with
  masked weights, gradients and optimizer state (the compression family's
  :class:`~lightning_ext.compression.dynamic_sparse_training.DynamicSparsity`), and in adjustment rounds adds the
  top-k gradient entries of each layer's pruned positions to its reply (``fedtiny.grad_idx.<weight>``,
  ``fedtiny.grad_val.<weight>``). ``aggregate_train`` strips them, runs FedAvg, re-applies the masks, and in
  adjustment rounds prunes and grows.

Example:
    >>> from torch import nn
    >>> from lightning_ext.data.digits import DigitsDataModule
    >>> from lightning_ext.federated.datamodule import FederatedDataModule
    >>> from lightning_ext.federated.simulation import FederatedSimulation
    >>> from lightning_ext.vision.classifier import Classifier
    >>> def net():
    ...     return Classifier(nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
    ...                                     nn.Linear(8 * 6 * 6, 10)), 10)
    >>> client = FedTinyClient(model=net, datamodule=lambda i, n: FederatedDataModule(DigitsDataModule(), n, i),
    ...                        local_steps=2)
    >>> strategy = fedtiny_fedavg(density=0.2, num_candidates=3, adjust_every=1, adjust_until=3,
    ...                           fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    >>> arrays = FederatedSimulation(client, 2, 2, strategy, progress=False).fit()
    >>> strategy.selected is not None, round(strategy.density(), 2)
    (True, 0.2)
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_ext.compression.dynamic_sparsity import DynamicSparsity
from lightning_ext.core.guards import buffer_snapshot, restore_buffers
from lightning_ext.core.validation import check_number, check_positive_int
from lightning_ext.federated.client import LightningClient, seeded
from lightning_ext.federated.fedtiny import (
    adjust_masks,
    adjustment_ratio,
    average_statistics,
    bn_statistics,
    candidate_loss,
    candidate_masks,
    default_loss,
    is_adjustment_round,
    recalibrate_bn,
    select_candidate,
    sparse_gradient_sum,
    sparse_weights,
    top_inactive_gradients,
)

MASK, GRAD_IDX, GRAD_VAL = "fedtiny.mask.", "fedtiny.grad_idx.", "fedtiny.grad_val."
CONFIG_RATIO, CONFIG_GRAD_BATCHES = "fedtiny-ratio", "fedtiny-grad-batches"
CONFIG_BN_BATCHES, CONFIG_CANDIDATES = "fedtiny-bn-batches", "fedtiny-candidates"


def _split(arrays: dict) -> tuple[dict, dict, dict]:
    """``(model arrays, masks, gradient uploads)`` of an ArrayRecord's tensors."""
    model, masks, grads = {}, {}, {}
    for k, v in arrays.items():
        if k.startswith(MASK):
            masks[k[len(MASK):]] = torch.as_tensor(v).bool()
        elif k.startswith((GRAD_IDX, GRAD_VAL)):
            grads[k] = torch.as_tensor(v)
        else:
            model[k] = v
    return model, masks, grads


class SparseMasks(Callback):
    """Trains with fixed masks: zeroes the pruned weights and their optimizer state at the start, masks every
    gradient, re-masks the weights after every step (through ``DynamicSparsity``); with ``grad_k`` set, computes
    the dense gradient of ``grad_batches`` batches at the end of training and keeps, per layer, the top-k entries
    among the pruned positions (:attr:`uploads`)."""

    def __init__(self, masks: dict, grad_k: Optional[dict] = None, grad_batches: int = 1) -> None:
        self.masks, self.grad_k, self.grad_batches = masks, grad_k, grad_batches
        self.sparsity: Optional[DynamicSparsity] = None
        self.uploads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Install the masks on the named parameters; zero pruned weights and optimizer state."""
        params = dict(pl_module.named_parameters())
        missing = sorted(set(self.masks) - set(params))
        if missing:
            raise ValueError(f"FedTiny's masks name {missing[:3]}, which are not parameters of "
                             f"{type(pl_module).__name__}: the clients' architectures differ from the server's.")
        self.sparsity = DynamicSparsity({n: params[n] for n in self.masks}, density=0.5, delta_t=2**62,
                                        total_steps=1, masks=self.masks)
        self.sparsity.apply(trainer.optimizers)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Mask the gradients."""
        self.sparsity.before_step()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Re-mask the weights."""
        self.sparsity.after_step(trainer.optimizers)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """In an adjustment round: the top-k gradient entries of the pruned positions (BN statistics untouched)."""
        if not self.grad_k:
            return
        params = dict(pl_module.named_parameters())
        snapshot = buffer_snapshot(pl_module)
        pl_module.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for i, batch in enumerate(trainer.train_dataloader):
                if i >= self.grad_batches:
                    break
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                default_loss(pl_module, batch)[0].backward()
        restore_buffers(pl_module, snapshot)
        for name, k in self.grad_k.items():
            grad = params[name].grad
            grad = torch.zeros_like(params[name]) if grad is None else grad
            self.uploads[name] = top_inactive_gradients(grad.cpu(), self.masks[name].cpu(), k)
        pl_module.zero_grad(set_to_none=True)


class FedTinyClient(LightningClient):
    """A :class:`~lightning_ext.federated.client.LightningClient` that trains FedTiny's sparse model and answers its
    BN-selection queries.

    Train: the masks come with the global arrays (``fedtiny.mask.*``), training is masked (:class:`SparseMasks`),
    and when the round's ``fedtiny-ratio`` is > 0 the reply adds, per sparse weight, the
    ``ceil(ratio * nnz)`` largest gradient entries at pruned positions. Queries ``fedtiny_bn`` (recalibrate each
    candidate's BN statistics on at most ``fedtiny-bn-batches`` local training batches) and ``fedtiny_score``
    (each candidate's eval-mode cross-entropy with the averaged statistics) are answered by :meth:`bn_query` and
    :meth:`score_query`. Takes :class:`LightningClient`'s arguments.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._masker: Optional[SparseMasks] = None
        self._round = (None, 0.0, 1)

    @override
    def round_callbacks(self, config: dict, arrays: dict) -> list[Callback]:
        """:class:`SparseMasks` with this round's masks and gradient budget."""
        masks, ratio, grad_batches = self._round
        if masks is None:
            raise ValueError("FedTinyClient received no `fedtiny.mask.*` arrays; run it with fedtiny_fedavg.")
        grad_k = {n: math.ceil(ratio * int(m.sum())) for n, m in masks.items()} if ratio > 0 else None
        self._masker = SparseMasks(masks, grad_k, grad_batches)
        return [self._masker]

    @override
    def train(self, arrays: dict, config: dict, state: Optional[bytes], partition_id: int,
              num_partitions: int) -> tuple[dict, dict, bytes]:
        """Masked local training; in adjustment rounds the reply also carries the top-k pruned-position gradients."""
        model_arrays, masks, _ = _split(arrays)
        ratio = float(config.get(CONFIG_RATIO, 0.0))
        self._round = (masks or None, ratio, int(config.get(CONFIG_GRAD_BATCHES, 1)))
        reply, metrics, new_state = super().train(model_arrays, config, state, partition_id, num_partitions)
        for name, (idx, val) in (self._masker.uploads if ratio > 0 else {}).items():
            reply[GRAD_IDX + name], reply[GRAD_VAL + name] = idx, val.float()
        return reply, metrics, new_state

    def _candidates(self, arrays: dict, masks: dict, partition_id: int, num_partitions: int):
        model = self.build_model()
        dm = self.build_datamodule(partition_id, num_partitions)
        dm.setup("fit")
        base = self._merge(model.state_dict(), arrays)
        count = 1 + max(int(k.split(".", 1)[0][1:]) for k in masks)
        for c in range(count):
            state = dict(base)
            for key in {k.split(".", 1)[1] for k in masks if k.startswith(f"c{c}.")}:
                state[key] = base[key] * masks[f"c{c}.{key}"].to(base[key].dtype)
            model.load_state_dict(state)
            yield c, model, dm

    def bn_query(self, arrays: dict, masks: dict, config: dict, partition_id: int, num_partitions: int) -> tuple[dict, dict]:
        """Each candidate's recalibrated BN statistics (``c<i>.<key>``) and ``num-examples``."""
        out, seen = {}, 0
        with seeded(self.seed + 7 + partition_id):
            for c, model, dm in self._candidates(arrays, masks, partition_id, num_partitions):
                seen = recalibrate_bn(model, dm.train_dataloader(), int(config.get(CONFIG_BN_BATCHES, 20)))
                out.update({f"c{c}.{k}": v for k, v in bn_statistics(model).items()})
        return out, {"num-examples": seen}

    def score_query(self, arrays: dict, masks: dict, stats: dict, config: dict, partition_id: int,
                    num_partitions: int) -> dict:
        """Each candidate's eval-mode loss and accuracy with the averaged statistics: ``fedtiny-loss``,
        ``fedtiny-acc`` (lists) and ``num-examples``."""
        losses, accs, seen = [], [], 0
        with seeded(self.seed + 7 + partition_id):
            for c, model, dm in self._candidates(arrays, masks, partition_id, num_partitions):
                state = model.state_dict()
                state.update({k.split(".", 1)[1]: v for k, v in stats.items() if k.startswith(f"c{c}.")})
                model.load_state_dict(state)
                loss, acc, seen = candidate_loss(model, dm.train_dataloader(), int(config.get(CONFIG_BN_BATCHES, 20)))
                losses.append(loss)
                accs.append(acc)
        return {"fedtiny-loss": losses, "fedtiny-acc": accs, "num-examples": seen}

    @override
    def client_app(self) -> Any:
        """:meth:`LightningClient.client_app` plus the ``fedtiny_bn`` and ``fedtiny_score`` query handlers."""
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

        app = super().client_app()

        def _where(context: Any) -> tuple[int, int]:
            return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])

        @app.query("fedtiny_bn")
        def bn(msg: Message, context: Any) -> Message:
            content = msg.content
            stats, metrics = self.bn_query(content["arrays"].to_torch_state_dict(),
                                           content["masks"].to_torch_state_dict(), dict(content["config"]),
                                           *_where(context))
            return Message(RecordDict({"arrays": ArrayRecord(stats), "metrics": MetricRecord(metrics)}), reply_to=msg)

        @app.query("fedtiny_score")
        def score(msg: Message, context: Any) -> Message:
            content = msg.content
            metrics = self.score_query(content["arrays"].to_torch_state_dict(), content["masks"].to_torch_state_dict(),
                                       content["stats"].to_torch_state_dict(), dict(content["config"]), *_where(context))
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

        return app


def fedtiny_fedavg(density: float = 0.05, num_candidates: int = 5, bn_batches: int = 20, adjust_every: int = 10,
                   adjust_until: int = 100, alpha: float = 0.2, grad_batches: int = 1,
                   layers_per_adjustment: Optional[int] = None, ignored_layers: Optional[Sequence[str]] = None,
                   seed: int = 0, **fedavg_kwargs: Any) -> Any:
    """A Flower ``FedAvg`` running FedTiny's server: BN-selected candidate masks, masked FedAvg, prune-and-grow.

    Args:
        density: target share of the sparse weights kept, ``d`` in (0, 1].
        num_candidates: coarse-pruned candidates scored by adaptive BN selection (1: ERK magnitude pruning, no
            selection; the reference's ``ABNS_num_of_candidates`` = 5).
        bn_batches: local batches each client uses to recalibrate, and to score, each candidate.
        adjust_every: rounds between prune-and-grow adjustments (reference ``delta_T`` = 10; 0 disables).
        adjust_until: ``T_end``, the last adjustment round and the cosine schedule's horizon (reference 100).
        alpha: initial adjustment ratio (reference ``adjust_alpha`` = 0.2).
        grad_batches: batches of each client's dense gradient for growth (reference ``growth_data_mode="batch"``: 1).
        layers_per_adjustment: ``None`` adjusts every layer each adjustment round (reference); ``n`` adjusts
            ``n`` layers in turn.
        ignored_layers: weight keys (or globs) kept dense.
        seed: seed of the random allocations.
        **fedavg_kwargs: ``FedAvg``'s arguments.

    The strategy's :meth:`state_dict` (masks, selection, adjustment history) is saved by
    :class:`~lightning_ext.federated.simulation.FederatedSimulation` with every round, so a crashed federation
    resumes with the same masks.
    """
    from lightning_ext.federated._flwr import require_flwr

    require_flwr("fedtiny_fedavg")
    check_number("density", density, low=0, high=1, low_open=True)
    for name, value in (("num_candidates", num_candidates), ("bn_batches", bn_batches),
                        ("adjust_until", adjust_until), ("grad_batches", grad_batches)):
        check_positive_int(name, value)
    check_number("adjust_every", adjust_every, low=0, integer=True)
    check_number("alpha", alpha, low=0, high=1)
    check_number("seed", seed, integer=True)
    if layers_per_adjustment is not None:
        check_positive_int("layers_per_adjustment", layers_per_adjustment)
    if isinstance(ignored_layers, str):
        raise TypeError("ignored_layers must be a list of weight names or globs, not one string.")
    from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict
    from flwr.serverapp.strategy import FedAvg

    class FedTinyFedAvg(FedAvg):
        def __init__(self) -> None:
            super().__init__(**fedavg_kwargs)
            self.masks: Optional[dict] = None
            self.selected: Optional[int] = None
            self.scores: list[float] = []
            self.candidate_names: list[str] = []
            self.adjustments: list[dict] = []

        def density(self) -> float:
            """Kept share of the sparse weights."""
            return sum(int(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())

        def _query(self, grid: Any, content: dict, action: str) -> list:
            nodes = sorted(grid.get_node_ids())
            messages = [grid.create_message(RecordDict(content), f"{MessageType.QUERY}.{action}", n, "fedtiny")
                        for n in nodes]
            replies = list(grid.send_and_receive(messages))
            errors = [r.error.reason for r in replies if r.has_error()]
            if errors or len(replies) != len(nodes):
                raise RuntimeError(f"FedTiny's {action} query failed on {len(errors)} client(s): {errors[:2]}")
            return replies

        def select(self, arrays: dict, grid: Any) -> dict:
            """Adaptive BN selection over the candidates; returns the selected masked arrays."""
            weights = sparse_weights(arrays, ignored_layers)
            cands = candidate_masks(weights, density, num_candidates, seed)
            self.candidate_names = [n for n, _ in cands]
            if num_candidates == 1:
                self.selected, self.masks = 0, cands[0][1]
                return {k: v * self.masks[k].to(v.dtype) if k in self.masks else v for k, v in arrays.items()}
            masks = {f"c{c}.{k}": m for c, (_, ms) in enumerate(cands) for k, m in ms.items()}
            config = ConfigRecord({CONFIG_BN_BATCHES: bn_batches})
            content = {"arrays": ArrayRecord(arrays), "masks": ArrayRecord(masks), "config": config}
            replies = self._query(grid, content, "fedtiny_bn")
            counts = [int(r.content["metrics"]["num-examples"]) for r in replies]
            stats = average_statistics([r.content["arrays"].to_torch_state_dict() for r in replies], counts)
            content["stats"] = ArrayRecord(stats)
            replies = self._query(grid, content, "fedtiny_score")
            losses = [list(r.content["metrics"]["fedtiny-loss"]) for r in replies]
            self.selected, self.scores = select_candidate(losses, [int(r.content["metrics"]["num-examples"])
                                                                   for r in replies])
            self.masks = cands[self.selected][1]
            out = {k: v * self.masks[k].to(v.dtype) if k in self.masks else v for k, v in arrays.items()}
            prefix = f"c{self.selected}."
            out.update({k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)})
            return out

        @override
        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
            """Select the candidate (first call), then send weights + masks and the round's adjustment ratio."""
            state = arrays.to_torch_state_dict()
            if self.masks is None:
                state = self.select(state, grid)
            adjusting = is_adjustment_round(server_round, adjust_every, adjust_until)
            config[CONFIG_RATIO] = adjustment_ratio(server_round, alpha, adjust_until) if adjusting else 0.0
            config[CONFIG_GRAD_BATCHES] = grad_batches
            state.update({MASK + k: m for k, m in self.masks.items()})
            return super().configure_train(server_round, ArrayRecord(state), config, grid)

        @override
        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            """FedAvg over the model arrays, masks re-applied; in adjustment rounds, prune and grow."""
            replies = list(replies)
            uploads, counts = [], []
            for r in replies:
                if r.has_error():
                    continue
                record = r.content["arrays"]
                grads = {k: torch.as_tensor(record[k].numpy()) for k in list(record.keys())
                         if k.startswith((GRAD_IDX, GRAD_VAL))}
                for k in grads:
                    del record[k]
                uploads.append(grads)
                counts.append(float(r.content["metrics"][self.weighted_by_key]))
            agg, metrics = super().aggregate_train(server_round, replies)
            if agg is None:
                return agg, metrics
            state = agg.to_torch_state_dict()
            ratio = adjustment_ratio(server_round, alpha, adjust_until)
            if is_adjustment_round(server_round, adjust_every, adjust_until) and any(uploads):
                names = list(self.masks)
                if layers_per_adjustment is not None:
                    start = len(self.adjustments) * layers_per_adjustment
                    names = [names[(start + i) % len(names)] for i in range(min(layers_per_adjustment, len(names)))]
                grads = {n: sparse_gradient_sum([(u[GRAD_IDX + n], u[GRAD_VAL + n]) for u in uploads], counts,
                                                 self.masks[n].shape) for n in names}
                self.masks, changed = adjust_masks(state, self.masks, grads, ratio, names)
                self.adjustments.append({"round": server_round, "ratio": ratio, "replaced": sum(changed.values())})
            for k, m in self.masks.items():
                state[k] = state[k] * m.to(state[k].dtype)
            return ArrayRecord(state), metrics

        def state_dict(self) -> dict:
            """Masks, the selected candidate, its score list and the adjustment history."""
            return {"masks": None if self.masks is None else {k: m.clone() for k, m in self.masks.items()},
                    "selected": self.selected, "scores": list(self.scores), "names": list(self.candidate_names),
                    "adjustments": [dict(a) for a in self.adjustments]}

        def load_state_dict(self, state: dict) -> None:
            """Restore :meth:`state_dict`."""
            self.masks = None if state["masks"] is None else {k: m.clone().bool() for k, m in state["masks"].items()}
            self.selected, self.scores = state["selected"], list(state["scores"])
            self.candidate_names, self.adjustments = list(state["names"]), [dict(a) for a in state["adjustments"]]

    return FedTinyFedAvg()
