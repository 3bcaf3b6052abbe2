"""FederatedSimulation: N rounds of a Flower strategy over in-process clients, with a progress bar, resumable."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import torch

from lightning_ext.core.io import atomic_torch_save
from lightning_ext.core.validation import check_number, check_positive_int
from lightning_ext.federated._flwr import require_flwr
from lightning_ext.federated.client import STATE_KEY, LightningClient
from lightning_ext.federated.grid import local_grid

EvaluateFn = Callable[[int, dict], Optional[dict]]


class FederatedSimulation:
    """Runs a federation in one process: Flower's strategy objects and the real ``ClientApp``, no Ray, no sockets.

    Each round mirrors ``flwr``'s ``Strategy.start``: ``configure_train`` -> the clients (through
    :func:`~lightning_ext.federated.grid.local_grid`) -> ``aggregate_train``, then (if the strategy's
    ``fraction_evaluate > 0``) ``configure_evaluate`` -> ``aggregate_evaluate``, then the server-side
    ``evaluate_fn(round, state_dict)``. Driving the rounds here, instead of calling ``Strategy.start``, is what makes
    the run resumable: after every round :meth:`state_dict` holds the round, the global arrays, every node's
    client state (its Lightning checkpoint bytes), the history, the strategy's own ``state_dict`` (if it has
    one) and is written atomically to ``checkpoint_path``; a new simulation that loads it continues
    identically (client sampling uses Python's ``random`` seeded per round inside a saved/restored state, and each
    client seeds its own round).

    Args:
        client: the :class:`~lightning_ext.federated.client.LightningClient` every node runs.
        num_clients: number of nodes (partitions).
        num_rounds: rounds to run in total.
        strategy: a ``flwr.serverapp.strategy`` object; ``None`` is ``FedAvg`` over all clients, no federated
            evaluation.
        evaluate_fn: server-side evaluation ``(round, global state_dict) -> dict of metrics``, also before round 1.
        seed: seed of client sampling.
        progress: show a Rich progress bar.
        checkpoint_path: where the state is saved after every round (``None`` disables).
        train_config: extra entries of every round's train ``ConfigRecord``.

    Example:
        >>> from torch import nn
        >>> from lightning_ext.data.digits import DigitsDataModule
        >>> from lightning_ext.federated.datamodule import FederatedDataModule
        >>> from lightning_ext.vision.classifier import Classifier
        >>> client = LightningClient(lambda: Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 10),
        ...                          lambda i, n: FederatedDataModule(DigitsDataModule(), n, i), local_steps=2)
        >>> sim = FederatedSimulation(client, num_clients=2, num_rounds=2, progress=False)
        >>> arrays = sim.fit()
        >>> sim.round, len(sim.history), sorted(arrays)
        (2, 2, ['net.1.bias', 'net.1.weight'])
    """

    def __init__(self, client: Optional[LightningClient] = None, num_clients: int = 2, num_rounds: int = 3, strategy: Any = None,
                 evaluate_fn: Optional[EvaluateFn] = None, seed: int = 0, progress: bool = True,
                 checkpoint_path: Optional[Union[str, Path]] = None, train_config: Optional[dict] = None) -> None:
        flwr = require_flwr("FederatedSimulation")
        if not isinstance(client, LightningClient):
            raise TypeError(f"client must be a LightningClient, got {type(client).__name__}.")
        check_positive_int("num_clients", num_clients)
        check_positive_int("num_rounds", num_rounds)
        check_number("seed", seed, integer=True)
        if checkpoint_path == "":
            raise ValueError("checkpoint_path='' is refused; give a file path or None to disable checkpointing.")
        if strategy is None:
            strategy = flwr.serverapp.strategy.FedAvg(fraction_evaluate=0.0, min_train_nodes=num_clients,
                                                      min_available_nodes=num_clients)
        self.client, self.num_clients, self.num_rounds = client, num_clients, num_rounds
        self.strategy, self.evaluate_fn, self.seed, self.progress = strategy, evaluate_fn, seed, progress
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.train_config = dict(train_config or {})
        self.grid = local_grid(client.client_app(), num_clients)
        self.round = 0
        self.arrays: Optional[dict] = None
        self.history: list[dict] = []

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Round, global arrays, each node's client state bytes, history and the strategy's state."""
        nodes = {}
        for i, nid in enumerate(self.grid.ids):
            state = self.grid.contexts[nid].state
            if STATE_KEY in state:
                nodes[i] = bytes(state[STATE_KEY]["ckpt"])
        strategy = self.strategy.state_dict() if hasattr(self.strategy, "state_dict") else None
        return {"round": self.round, "arrays": self.arrays, "nodes": nodes, "history": list(self.history),
                "strategy": strategy, "num_clients": self.num_clients, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (same number of clients)."""
        from flwr.app import ConfigRecord

        if state["num_clients"] != self.num_clients:
            raise ValueError(f"the saved federation has {state['num_clients']} clients, this one "
                             f"{self.num_clients}; build it with num_clients={state['num_clients']}.")
        self.round, self.arrays, self.history = state["round"], state["arrays"], list(state["history"])
        for i, blob in state["nodes"].items():
            self.grid.contexts[self.grid.ids[int(i)]].state[STATE_KEY] = ConfigRecord({"ckpt": blob})
        if state.get("strategy") is not None and hasattr(self.strategy, "load_state_dict"):
            self.strategy.load_state_dict(state["strategy"])

    def load(self, path: Union[str, Path]) -> None:
        """Load a state written to ``checkpoint_path`` (a file this library wrote; it holds pickled history)."""
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))

    # -- rounds ----------------------------------------------------------------------------------------------
    def _evaluate(self, server_round: int, record: dict) -> None:
        if self.evaluate_fn is not None:
            metrics = self.evaluate_fn(server_round, self.arrays)
            record.update({f"server/{k}": float(v) for k, v in (metrics or {}).items()})

    def run_round(self, server_round: int) -> dict:
        """One round: train, aggregate, optional federated and server-side evaluation; returns its record."""
        from flwr.app import ArrayRecord, ConfigRecord

        arrays = ArrayRecord(self.arrays)
        saved = random.getstate()
        random.seed(self.seed * 100_003 + server_round)  # Flower samples clients with the global `random`
        try:
            messages = list(self.strategy.configure_train(server_round, arrays, ConfigRecord(dict(self.train_config)),
                                                          self.grid))
        finally:
            random.setstate(saved)
        replies = self.grid.send_and_receive(messages)
        errors = [r.error.reason for r in replies if r.has_error()]
        agg, metrics = self.strategy.aggregate_train(server_round, replies)
        if agg is None:
            raise RuntimeError(f"round {server_round}: no client update was aggregated; client errors: {errors[:3]}")
        reference = self.arrays
        self.arrays = {k: v.to(reference[k].dtype) if k in reference else v for k, v in agg.to_torch_state_dict().items()}
        record: dict = {"round": server_round, "failures": len(errors)}
        record.update({f"train/{k}": float(v) for k, v in dict(metrics or {}).items() if isinstance(v, (int, float))})
        if getattr(self.strategy, "fraction_evaluate", 0.0) > 0:
            random.seed(self.seed * 100_003 + server_round + 50_000)
            try:
                eval_messages = list(self.strategy.configure_evaluate(server_round, ArrayRecord(self.arrays),
                                                                      ConfigRecord(), self.grid))
            finally:
                random.setstate(saved)
            eval_metrics = self.strategy.aggregate_evaluate(server_round, self.grid.send_and_receive(eval_messages))
            record.update({f"clients/{k}": float(v) for k, v in dict(eval_metrics or {}).items()
                           if isinstance(v, (int, float))})
        self._evaluate(server_round, record)
        return record

    def fit(self, initial_arrays: Optional[dict] = None) -> dict:
        """Run the remaining rounds (all of them unless resumed) and return the final global state_dict."""
        if self.arrays is None:
            self.arrays = dict(initial_arrays) if initial_arrays is not None else self.client.initial_arrays()
            record = {"round": 0}
            self._evaluate(0, record)
            if len(record) > 1:
                self.history.append(record)
        progress = None
        if self.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            progress = Progress(TextColumn("[bold]federated[/] {task.description}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn())
            task = progress.add_task("", total=self.num_rounds, completed=self.round)
            progress.start()
        try:
            for server_round in range(self.round + 1, self.num_rounds + 1):
                record = self.run_round(server_round)
                self.history.append(record)
                self.round = server_round
                if self.checkpoint_path is not None:
                    atomic_torch_save(self.state_dict(), self.checkpoint_path)
                if progress is not None:
                    shown = {k.split("/")[-1]: v for k, v in record.items() if "acc" in k or "loss" in k}
                    text = " ".join(f"{k}={v:.4g}" for k, v in list(shown.items())[:3])
                    progress.update(task, advance=1, description=f"round {server_round} {text}")
        finally:
            if progress is not None:
                progress.stop()
        return self.arrays
