"""LightningClient: any LightningModule + DataModule as a Flower client that keeps its training state across rounds.

Flower's own Lightning example builds a new model and ``Trainer`` every round, so optimizer moments, LR
schedulers, callback state (EarlyStopping, ...) and the step/epoch counters restart each round. Here the
client's whole Lightning checkpoint is kept in Flower's per-node ``context.state`` (bytes in a ``ConfigRecord``,
the only store that survives in every Flower runtime: in-process, Ray, and a deployment's fresh ClientApp process
per message). Each round the global weights replace the checkpoint's shared weights and training *resumes*
from it with ``Trainer.fit(ckpt_path=...)``, so the loops, optimizer and schedulers continue where the last round
stopped; layers marked ``personal`` (FedBN's BatchNorm, a personal head) never leave the client.
"""

from __future__ import annotations

import copy
import importlib
import io
import random
import re
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from typing_extensions import override

from lightning_ext.core.validation import check_number, check_positive_int
from lightning_ext.federated._flwr import require_flwr

#: the key of this library's record in Flower's ``context.state``
STATE_KEY = "lightning_ext"
_TRAINER_DEFAULTS = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)

Factory = Union[Callable[..., Any], dict]


def _instantiate(spec: Factory, *args: Any, **extra: Any) -> Any:
    """Call a factory, or build ``{"class_path": ..., "init_args": {...}}`` (short catalogue names allowed)."""
    if callable(spec):
        return spec(*args)
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise TypeError("model/datamodule must be a factory or a dict with `class_path` (and `init_args`).")
    path = spec["class_path"]
    if "." not in path:
        from lightning_ext import catalogue

        path = catalogue.get(path).class_path
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    kwargs = {k: _instantiate(v) if isinstance(v, dict) and "class_path" in v else v
              for k, v in dict(spec.get("init_args", {})).items()}
    kwargs.update(extra)
    return cls(**kwargs)


@contextmanager
def seeded(seed: int):
    """Run a block under a fixed seed of torch, numpy and ``random`` and restore the caller's generators after."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class ProximalTerm(Callback):
    """FedProx's client side: adds ``mu (w - w_global)`` to each shared parameter's gradient before every step.

    That is exactly the gradient of ``mu / 2 ||w - w_global||^2`` (Li et al., MLSys 2020, arXiv 1812.06127), so
    the user's loss stays untouched. Flower's ``FedProx`` strategy only sends ``config["proximal-mu"]``; the
    :class:`LightningClient` adds this callback when it is > 0.
    """

    def __init__(self, mu: float, global_weights: dict) -> None:
        check_number("mu", mu, low=0)
        self.mu, self.global_weights = mu, global_weights

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Add the proximal gradient to every shared parameter."""
        for name, p in pl_module.named_parameters():
            ref = self.global_weights.get(name)
            if ref is not None and p.grad is not None:
                p.grad.add_(p.detach() - ref.to(p.device, p.dtype), alpha=self.mu)


class LightningClient:
    """A Flower client from any LightningModule and DataModule that resumes its own training state each round.

    Per train message: build the model (``model()``) and this client's data (``datamodule(partition_id,
    num_partitions)``); take the weights of this client's previous checkpoint (if any), overwrite every shared
    key with the global arrays, and resume ``Trainer.fit`` from that checkpoint for ``local_epochs`` more
    epochs (or ``local_steps`` more steps): optimizer and scheduler state, callback state and the step and
    epoch counters continue. The new checkpoint goes back into ``context.state``; the reply carries the shared
    weights only, ``num-examples`` (the partition's training size) and the scalar ``train_*`` metrics. With
    ``keep_state=False`` it behaves like Flower's example (fresh optimizer and counters every round), keeping only
    the personal weights. A ``proximal-mu`` in the round's config (Flower's ``FedProx``) adds
    :class:`ProximalTerm`. An evaluate message tests global + personal weights on the client's
    ``test_dataloader`` and replies ``num-examples`` and the ``test_*`` metrics.

    Seeding: each round's local training runs under seed ``seed + 1000 * server_round + partition_id`` inside
    a forked RNG, so a federation is reproducible and a resumed one continues identically.

    Args:
        model: factory ``() -> LightningModule`` or a ``{"class_path", "init_args"}`` dict.
        datamodule: factory ``(partition_id, num_partitions) -> LightningDataModule``, or a dict whose class
            receives ``partition_id`` and ``num_clients`` (e.g. ``FederatedDataModule``).
        trainer: extra ``Trainer`` arguments (``callbacks`` are deep-copied each round and their state restored
            from the checkpoint); defaults: CPU, no logger, no checkpointing, no progress bar, no validation.
        local_epochs: epochs per round (ignored when ``local_steps`` is set).
        local_steps: optimizer steps per round.
        personal: regular expressions of ``state_dict`` keys kept local (FedBN: ``[r"\\.bn\\d*\\."]``).
        keep_state: resume optimizer, scheduler, callback and loop state across rounds.
        seed: base seed of local training.
        reply_transform: a method's client side, ``(reply, global_arrays, server_round, partition_id) -> reply``
            applied to the shared weights before they are sent (e.g. :class:`~lightning_ext.federated.rqm.RQMUpdate`).

    Example:
        >>> from torch import nn
        >>> from lightning_ext.data.digits import DigitsDataModule
        >>> from lightning_ext.federated.datamodule import FederatedDataModule
        >>> from lightning_ext.vision.classifier import Classifier
        >>> client = LightningClient(lambda: Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 10),
        ...                          lambda i, n: FederatedDataModule(DigitsDataModule(), n, i), local_steps=2)
        >>> arrays, metrics, state = client.train(client.initial_arrays(), {"server-round": 1}, None, 0, 2)
        >>> sorted(arrays), metrics["num-examples"]
        (['net.1.bias', 'net.1.weight'], 647)
    """

    def __init__(self, model: Optional[Factory] = None, datamodule: Optional[Factory] = None, trainer: Optional[dict] = None, local_epochs: int = 1,
                 local_steps: Optional[int] = None, personal: Sequence[str] = (), keep_state: bool = True,
                 seed: int = 0, reply_transform: Optional[Callable[[dict, dict, int, int], dict]] = None) -> None:
        require_flwr(type(self).__name__)
        check_positive_int("local_epochs", local_epochs)
        if local_steps is not None:
            check_positive_int("local_steps", local_steps)
        check_number("seed", seed, integer=True)
        if isinstance(personal, str):
            raise TypeError("personal must be a list of regular expressions, not one string.")
        for name, spec in (("model", model), ("datamodule", datamodule)):
            if spec is None:
                raise ValueError(f"LightningClient needs `{name}`: a factory or a class_path dict.")
            if not (callable(spec) or (isinstance(spec, dict) and "class_path" in spec)):
                raise TypeError(f"{name} must be a factory or a dict with `class_path`.")
        self.model, self.datamodule = model, datamodule
        self.trainer_kwargs = {**_TRAINER_DEFAULTS, **dict(trainer or {})}
        for key in ("max_epochs", "max_steps", "fast_dev_run"):
            if key in self.trainer_kwargs:
                raise ValueError(f"trainer.{key} is set by the client; use local_epochs/local_steps instead.")
        self.local_epochs, self.local_steps = local_epochs, local_steps
        self.personal = [re.compile(p) for p in personal]
        self.keep_state, self.seed = keep_state, seed
        if reply_transform is not None and not callable(reply_transform):
            raise TypeError("reply_transform must be callable (reply, global_arrays, server_round, partition_id) -> reply.")
        self.reply_transform = reply_transform

    # -- pure engine (no Flower objects) ------------------------------------------------------------------------
    def build_model(self) -> LightningModule:
        """A fresh LightningModule from the factory."""
        return _instantiate(self.model)

    def build_datamodule(self, partition_id: int, num_partitions: int) -> LightningDataModule:
        """This client's DataModule."""
        if callable(self.datamodule):
            return self.datamodule(partition_id, num_partitions)
        return _instantiate(self.datamodule, partition_id=partition_id, num_clients=num_partitions)

    def is_personal(self, key: str) -> bool:
        """Whether a ``state_dict`` key stays on the client."""
        return any(p.search(key) for p in self.personal)

    def shared_keys(self, state: dict) -> list[str]:
        """The keys sent to and received from the server; refuses a ``personal`` pattern that matches nothing."""
        for p in self.personal:
            if not any(p.search(k) for k in state):
                raise ValueError(f"personal pattern {p.pattern!r} matches no state_dict key of the model; "
                                 f"keys look like {list(state)[:4]}.")
        return [k for k in state if not self.is_personal(k)]

    def initial_arrays(self) -> dict[str, torch.Tensor]:
        """The shared weights of a model built under ``seed`` (the server's initial global model)."""
        with seeded(self.seed):
            state = self.build_model().state_dict()
        return {k: v.detach().clone() for k, v in state.items() if k in set(self.shared_keys(state))}

    def _merge(self, weights: dict, arrays: dict) -> dict:
        shared = self.shared_keys(weights)
        if set(shared) != set(arrays):
            missing, extra = sorted(set(shared) - set(arrays)), sorted(set(arrays) - set(shared))
            raise ValueError(f"the global model does not match this client's model (architectures differ?): "
                             f"missing {missing[:5]}, unexpected {extra[:5]}.")
        out = dict(weights)
        for k in shared:
            glob = torch.as_tensor(arrays[k])
            if glob.shape != weights[k].shape:
                raise ValueError(f"global `{k}` has shape {tuple(glob.shape)} but this client's model has "
                                 f"{tuple(weights[k].shape)}: the clients' architectures differ.")
            out[k] = glob.to(dtype=weights[k].dtype)
        return out

    def round_callbacks(self, config: dict, arrays: dict) -> list[Callback]:
        """Callbacks a method adds to this round's ``Trainer`` from the round's config (FedGen's regulariser); none."""
        return []

    def _trainer(self, previous: Optional[dict], config: Optional[dict] = None, arrays: Optional[dict] = None) -> Trainer:
        kwargs = dict(self.trainer_kwargs)
        kwargs["callbacks"] = copy.deepcopy(list(kwargs.get("callbacks") or []))
        mu = float((config or {}).get("proximal-mu", 0.0))
        if mu > 0:
            kwargs["callbacks"].append(ProximalTerm(mu, {k: torch.as_tensor(v) for k, v in (arrays or {}).items()}))
        kwargs["callbacks"].extend(self.round_callbacks(dict(config or {}), arrays or {}))
        if self.local_steps is not None:
            done = previous["global_step"] if previous else 0
            kwargs.update(max_steps=done + self.local_steps, max_epochs=-1)
        else:
            done = previous["epoch"] if previous else 0
            kwargs.update(max_epochs=done + self.local_epochs)
        return Trainer(**kwargs)

    def train(self, arrays: dict, config: dict, state: Optional[bytes], partition_id: int,
              num_partitions: int) -> tuple[dict, dict, bytes]:
        """One round of local training: ``(shared weights, metrics with num-examples, new state bytes)``."""
        server_round = int(config.get("server-round", 1))
        with seeded(self.seed + 1000 * server_round + partition_id):
            model = self.build_model()
            dm = self.build_datamodule(partition_id, num_partitions)
            previous = torch.load(io.BytesIO(state), map_location="cpu", weights_only=False) if state else None
            start = previous["state_dict"] if previous else model.state_dict()
            weights = self._merge(start, arrays)
            resume = previous is not None and self.keep_state
            trainer = self._trainer(previous if resume else None, config, arrays)
            with tempfile.TemporaryDirectory() as tmp:
                if resume:
                    previous["state_dict"] = weights
                    path = Path(tmp) / "resume.ckpt"
                    torch.save(previous, path)
                    trainer.fit(model, dm, ckpt_path=str(path))
                else:
                    model.load_state_dict(weights)
                    trainer.fit(model, dm)
                out = Path(tmp) / "state.ckpt"
                trainer.save_checkpoint(out)
                new_state = out.read_bytes()
        final = model.state_dict()
        reply = {k: final[k].detach().cpu().clone() for k in self.shared_keys(final)}
        if self.reply_transform is not None:  # a method's client side (RQM's quantised update, commitments, ...)
            reply = self.reply_transform(reply, arrays, server_round, partition_id)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("train") and torch.as_tensor(v).numel() == 1}
        metrics["num-examples"] = int(len(trainer.train_dataloader.dataset))
        metrics["global-step"] = int(trainer.global_step)
        return reply, metrics, new_state

    def evaluate(self, arrays: dict, state: Optional[bytes], partition_id: int, num_partitions: int) -> dict:
        """Test global + personal weights on the client's test split: ``test_*`` metrics and num-examples."""
        model = self.build_model()
        dm = self.build_datamodule(partition_id, num_partitions)
        previous = torch.load(io.BytesIO(state), map_location="cpu", weights_only=False) if state else None
        model.load_state_dict(self._merge(previous["state_dict"] if previous else model.state_dict(), arrays))
        trainer = Trainer(**{**self.trainer_kwargs, "callbacks": [], "limit_val_batches": None})
        results = trainer.test(model, dm, verbose=False)[0]
        metrics = {k: float(v) for k, v in results.items()}
        metrics["num-examples"] = int(len(trainer.test_dataloaders.dataset))
        return metrics

    # -- Flower ----------------------------------------------------------------------------------------------
    def client_app(self) -> Any:
        """A Flower ``ClientApp`` whose train/evaluate handlers run :meth:`train`/:meth:`evaluate`."""
        flwr = require_flwr("LightningClient.client_app")
        from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

        app = flwr.clientapp.ClientApp()

        def _state(context: Any) -> Optional[bytes]:
            record = context.state.get(STATE_KEY) if STATE_KEY in context.state else None
            return record["ckpt"] if record is not None else None

        def _where(context: Any) -> tuple[int, int]:
            return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])

        @app.train()
        def train(msg: Message, context: Any) -> Message:
            arrays = msg.content["arrays"].to_torch_state_dict()
            config = dict(msg.content["config"]) if "config" in msg.content else {}
            reply, metrics, state = self.train(arrays, config, _state(context), *_where(context))
            context.state[STATE_KEY] = ConfigRecord({"ckpt": state})
            return Message(RecordDict({"arrays": ArrayRecord(reply), "metrics": MetricRecord(metrics)}),
                           reply_to=msg)

        @app.evaluate()
        def evaluate(msg: Message, context: Any) -> Message:
            arrays = msg.content["arrays"].to_torch_state_dict()
            metrics = self.evaluate(arrays, _state(context), *_where(context))
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

        return app
