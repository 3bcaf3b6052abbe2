"""SFPrompt over Flower messages: split federated fine-tuning with prompts, through the in-process ``LocalGrid``.

The server holds the frozen body of a :class:`~lightning_ext.federated.sfprompt.SplitPromptViT`; each client holds
its head and tail. One round (``tune="sfprompt"``), per client, all through Flower ``Message``s whose
``RecordDict`` carries ``ArrayRecord``s of activations and gradients:

1. ``train.local`` (global prompts + tail down): phase 1, the local-loss update (``CE(tail(head(x)), y)``, no
   server) for one pass over the client's data; phase 2, EL2N scores under that local model and the hardest
   ``keep`` fraction of this round's samples kept. The reply says how many split batches follow.
2. per kept batch: ``train.forward`` -> the head's activations (``smashed``) up; the server runs the body and
   sends its output down in ``train.tail`` -> the client runs the tail, the loss, the backward, and sends the
   gradient at the body's output up; the server back-propagates through the (frozen) body and sends the gradient at
   the head's output down in ``train.backward`` -> the client back-propagates into its prompts and steps.
3. ``train.upload``: the client's prompts and tail, ``num-examples`` (kept samples), client FLOPs and loss; the
   server averages them weighted by ``num-examples`` (FedAvg).

``tune="full"`` (federated full fine-tuning) and ``tune="prompt"`` (prompts + classifier, no split) are the
baselines: one ``train`` message per client, one local pass over the whole model, FedAvg of the trained weights.

Accounting: every array crossing the grid is counted in bytes (both directions), and each client counts its own
floating-point operations with ``torch.utils.flop_counter.FlopCounterMode`` (forward and backward of everything it
runs). Resume: :meth:`SFPromptFederation.state_dict` (round, global trainable arrays, history) is saved atomically
after every round; a client keeps nothing across rounds (its optimiser restarts each round; each round's work is
seeded by ``(seed, round, client)``), so a reloaded federation continues identically. In this in-process runtime
the client keeps its head's autograd graph between ``train.forward`` and ``train.backward`` in memory; a
deployment (a fresh ClientApp process per message, spec 1.5d) would have to recompute it.

Example:
    >>> from lightning_ext.data.digits import DigitsDataModule
    >>> from lightning_ext.federated.datamodule import FederatedDataModule
    >>> fed = SFPromptFederation(
    ...     lambda: SplitPromptViT(img_size=8, patch_size=4, embed_dim=16, depth=3, num_heads=2, cut=[1, 2]),
    ...     lambda i, n: FederatedDataModule(DigitsDataModule(batch_size=64), n, i), num_clients=2, num_rounds=1,
    ...     local_steps=2)
    >>> arrays = fed.fit()
    >>> fed.round, fed.history[-1]["bytes_per_client"] > 0
    (1, True)
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lightning_ext.core.io import atomic_torch_save
from lightning_ext.core.validation import check_fraction, check_number, check_positive, check_positive_int
from lightning_ext.federated._flwr import require_flwr
from lightning_ext.federated.client import seeded
from lightning_ext.federated.grid import local_grid
from lightning_ext.federated.sfprompt import TUNE_MODES, SplitPromptViT, Tune, el2n_keep

__all__ = ["SFPromptFederation", "build_sfprompt"]


def _tensors(dm: Any) -> tuple[torch.Tensor, torch.Tensor]:
    dm.setup("fit")
    data = dm.train_set
    xs, ys = zip(*[data[i] for i in range(len(data))])
    return torch.stack([torch.as_tensor(x) for x in xs]).float(), torch.as_tensor(ys).long()


def _nbytes(content: Any) -> int:
    """Payload bytes of every array in a message (shape x item size; the serialisation's headers not counted)."""
    import numpy as np

    total = 0
    for record in content.array_records.values():
        for array in record.values():
            total += int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize
    return total


class _Counter:
    """``FlopCounterMode`` when counting (it slows a step about 4x), else a no-op with zero FLOPs."""

    def __init__(self, on: bool) -> None:
        self.mode = FlopCounterMode(display=False) if on else None

    def __enter__(self) -> "_Counter":
        if self.mode is not None:
            self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.mode is not None:
            self.mode.__exit__(*exc)

    def get_total_flops(self) -> int:
        return self.mode.get_total_flops() if self.mode is not None else 0


class _Local(torch.nn.Module):
    """The client's local model (head then tail) as a module, for EL2N scoring."""

    def __init__(self, net: SplitPromptViT) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.local_forward(x)


class SFPromptFederation:
    """SFPrompt (and its two baselines) as a Flower federation run in-process, round by round, resumable.

    Args:
        model: factory ``() -> SplitPromptViT`` (the same architecture on server and clients).
        datamodule: factory ``(partition_id, num_partitions) -> DataModule`` with ``train_set`` after ``setup``.
        num_clients: number of clients (all take part every round).
        num_rounds: rounds in total.
        tune: ``"sfprompt"`` (split, prompts + tail), ``"prompt"`` (no split, prompts + classifier) or ``"full"``.
        keep: fraction of each client's data kept by EL2N pruning (``"sfprompt"``; 1 keeps all).
        local_loss: run SFPrompt's local-loss phase.
        lr: Adam learning rate of every client (a fresh optimiser each round).
        batch_size: client batch size.
        local_steps: batches of this round's data window per client (``None``: all its data); every pass of
            the round (local loss, pruning, split) works on that window.
        initial_state: the pretrained ``state_dict`` every party starts from (``None``: the factory's weights
            under ``seed``).
        seed: base seed (per-round client seeds are ``seed + 1000 * round + client``).
        checkpoint_path: the federation's state after every round (``None``: not saved).
        evaluate_fn: ``(round, full state_dict) -> metrics`` on the server after every round.
        flop_rounds: count client FLOPs in rounds ``1..flop_rounds`` only (counting slows a step about 4x; every
            round does the same work, so one round measures it); ``None``: every round.
    """

    def __init__(self, model: Callable[[], SplitPromptViT], datamodule: Callable[[int, int], Any], num_clients: int = 2,
                 num_rounds: int = 3, tune: Tune = "sfprompt", keep: float = 0.7, local_loss: bool = True,
                 lr: float = 1e-3, batch_size: int = 32, local_steps: Optional[int] = None,
                 initial_state: Optional[dict] = None, seed: int = 0,
                 checkpoint_path: Optional[Union[str, Path]] = None,
                 evaluate_fn: Optional[Callable[[int, dict], Optional[dict]]] = None,
                 flop_rounds: Optional[int] = None) -> None:
        require_flwr("SFPromptFederation")
        if not callable(model) or not callable(datamodule):
            raise TypeError("model and datamodule must be factories: () -> SplitPromptViT, (i, n) -> DataModule.")
        check_positive_int("num_clients", num_clients)
        check_positive_int("num_rounds", num_rounds)
        if tune not in TUNE_MODES:
            raise ValueError(f"tune={tune!r} is unknown; choose one of {', '.join(TUNE_MODES)}.")
        check_fraction("keep", keep, allow_zero=False)
        check_positive("lr", lr)
        check_positive_int("batch_size", batch_size)
        if local_steps is not None:
            check_positive_int("local_steps", local_steps)
        check_number("seed", seed, integer=True)
        if flop_rounds is not None:
            check_number("flop_rounds", flop_rounds, low=0, integer=True)
        if checkpoint_path == "":
            raise ValueError("checkpoint_path='' is refused; give a file path or None.")
        self.model_fn, self.data_fn = model, datamodule
        self.num_clients, self.num_rounds, self.tune, self.keep = num_clients, num_rounds, tune, keep
        self.local_loss, self.lr, self.batch_size, self.local_steps = local_loss, lr, batch_size, local_steps
        self.seed, self.evaluate_fn, self.flop_rounds = seed, evaluate_fn, flop_rounds
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        with seeded(seed):
            self.server = model()
        if not isinstance(self.server, SplitPromptViT):
            raise TypeError(f"model() must return a SplitPromptViT, got {type(self.server).__name__}.")
        if initial_state is not None:
            self.server.load_state_dict(initial_state)
        self.initial_state = {k: v.detach().clone() for k, v in self.server.state_dict().items()}
        self.server.requires_grad_(False)
        self.keys = self.server.trainable_keys(tune)
        self.arrays: dict = {k: self.initial_state[k].clone() for k in self.keys}
        self.round, self.history = 0, []
        self._data: dict[int, tuple] = {}
        self._sessions: dict[int, dict] = {}
        self.grid = local_grid(self.client_app(), num_clients)

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Round, global trainable arrays and history."""
        return {"round": self.round, "arrays": self.arrays, "history": list(self.history), "tune": self.tune,
                "num_clients": self.num_clients, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (same clients and tuning)."""
        for key in ("num_clients", "tune"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the saved federation has {key}={state[key]!r}, this one {getattr(self, key)!r}.")
        if set(state["arrays"]) != set(self.keys):
            raise ValueError("the saved federation's trainable arrays do not match this model.")
        self.round, self.arrays, self.history = state["round"], dict(state["arrays"]), list(state["history"])

    def load(self, path: Union[str, Path]) -> None:
        """Load a state this library wrote to ``checkpoint_path``."""
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))

    def full_state(self, arrays: Optional[dict] = None) -> dict:
        """The whole model's ``state_dict``: the pretrained weights with the global trainable arrays."""
        state = dict(self.initial_state)
        state.update(arrays if arrays is not None else self.arrays)
        return state

    # -- client side -----------------------------------------------------------------------------------------
    def _client_data(self, pid: int) -> tuple[torch.Tensor, torch.Tensor]:
        if pid not in self._data:
            self._data[pid] = _tensors(self.data_fn(pid, self.num_clients))
        return self._data[pid]

    def _batches(self, n: int, server_round: int, pid: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 7919 + server_round * 1009 + pid)
        order = torch.randperm(n, generator=gen)
        batches = list(order.split(self.batch_size))
        return batches[:self.local_steps] if self.local_steps is not None else batches

    def _open(self, pid: int, arrays: dict, server_round: int) -> dict:
        net = self.model_fn()
        net.load_state_dict(self.full_state({k: torch.as_tensor(v) for k, v in arrays.items()}))
        params = [p for n, p in net.named_parameters() if n in set(net.set_trainable(self.tune))]
        session = {"net": net, "opt": torch.optim.Adam(params, lr=self.lr), "flops": 0, "loss": [],
                   "round": server_round, "count": self.flop_rounds is None or server_round <= self.flop_rounds}
        self._sessions[pid] = session
        return session

    def _step_local(self, session: dict, x: torch.Tensor, y: torch.Tensor, forward: str) -> None:
        net, opt = session["net"], session["opt"]
        with _Counter(session["count"]) as counter:
            opt.zero_grad()
            loss = F.cross_entropy(getattr(net, forward)(x), y)
            loss.backward()
        opt.step()
        session["flops"] += counter.get_total_flops()
        session["loss"].append(float(loss.detach()))

    def client_app(self) -> Any:
        """The Flower ``ClientApp``: ``train`` (baselines), ``train.local``, ``train.forward``, ``train.tail``,
        ``train.backward`` and ``train.upload`` (SFPrompt)."""
        flwr = require_flwr("SFPromptFederation.client_app")
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

        app = flwr.clientapp.ClientApp()

        def pid_of(context: Any) -> int:
            return int(context.node_config["partition-id"])

        def upload(session: dict, pid: int, examples: int) -> RecordDict:
            state = session["net"].state_dict()
            metrics = {"num-examples": examples, "client-flops": float(session["flops"]),
                       "train-loss": float(sum(session["loss"]) / max(1, len(session["loss"])))}
            self._sessions.pop(pid, None)
            return RecordDict({"arrays": ArrayRecord({k: state[k].detach().clone() for k in self.keys}),
                               "metrics": MetricRecord(metrics)})

        @app.train()
        def train(msg: Message, context: Any) -> Message:  # a baseline: one local pass, no split
            pid, rnd = pid_of(context), int(msg.content["config"]["server-round"])
            x, y = self._client_data(pid)
            with seeded(self.seed + 1000 * rnd + pid):
                session = self._open(pid, msg.content["arrays"].to_torch_state_dict(), rnd)
                for idx in self._batches(len(y), rnd, pid):
                    self._step_local(session, x[idx], y[idx], "forward")
                examples = sum(len(idx) for idx in self._batches(len(y), rnd, pid))
            return Message(upload(session, pid, examples), reply_to=msg)

        @app.train("local")
        def local(msg: Message, context: Any) -> Message:  # phases 1 and 2: local loss, EL2N pruning
            from lightning_ext.curation.el2n import el2n_scores

            pid, rnd = pid_of(context), int(msg.content["config"]["server-round"])
            x, y = self._client_data(pid)
            with seeded(self.seed + 1000 * rnd + pid):
                session = self._open(pid, msg.content["arrays"].to_torch_state_dict(), rnd)
                window = self._batches(len(y), rnd, pid)  # this round's data (the local_steps cap)
                if self.local_loss:
                    for idx in window:
                        self._step_local(session, x[idx], y[idx], "local_forward")
                kept = torch.cat(window)
                if self.keep < 1:
                    with _Counter(session["count"]) as counter:
                        scores = el2n_scores(_Local(session["net"]), x[kept], y[kept], batch_size=256)
                    session["net"].train()
                    session["flops"] += counter.get_total_flops()
                    kept = kept[el2n_keep(scores, self.keep)]
                session["kept"] = kept
                gen = torch.Generator().manual_seed(self.seed * 7919 + rnd * 1009 + pid + 500_000)
                session["batches"] = list(kept[torch.randperm(len(kept), generator=gen)].split(self.batch_size))
            return Message(RecordDict({"metrics": MetricRecord({"batches": len(session["batches"]),
                                                               "kept": len(kept)})}), reply_to=msg)

        @app.train("forward")
        def forward(msg: Message, context: Any) -> Message:  # phase 3: head forward, activations up
            pid = pid_of(context)
            session = self._sessions[pid]
            x, _ = self._client_data(pid)
            idx = session["batches"][int(msg.content["config"]["batch"])]  # indices into this client's data
            with _Counter(session["count"]) as counter:
                session["opt"].zero_grad()
                smashed = session["net"].head(x[idx])
            session["flops"] += counter.get_total_flops()
            session["pending"] = (smashed, idx)
            return Message(RecordDict({"smashed": ArrayRecord({"x": smashed.detach()})}), reply_to=msg)

        @app.train("tail")
        def tail(msg: Message, context: Any) -> Message:  # tail forward, loss, gradient at the body's output up
            pid = pid_of(context)
            session = self._sessions[pid]
            _, y = self._client_data(pid)
            body_out = msg.content["body"].to_torch_state_dict()["x"].requires_grad_(True)
            with _Counter(session["count"]) as counter:
                loss = F.cross_entropy(session["net"].tail(body_out), y[session["pending"][1]])
                loss.backward()
            session["flops"] += counter.get_total_flops()
            session["loss"].append(float(loss.detach()))
            return Message(RecordDict({"grad": ArrayRecord({"x": body_out.grad.detach()})}), reply_to=msg)

        @app.train("backward")
        def backward(msg: Message, context: Any) -> Message:  # gradient at the head's output down; prompts step
            pid = pid_of(context)
            session = self._sessions[pid]
            smashed, _ = session.pop("pending")
            grad = msg.content["grad"].to_torch_state_dict()["x"]
            with _Counter(session["count"]) as counter:
                if smashed.requires_grad:
                    smashed.backward(grad)
            session["flops"] += counter.get_total_flops()
            session["opt"].step()
            return Message(RecordDict({"metrics": MetricRecord({"ok": 1})}), reply_to=msg)

        @app.train("upload")
        def upload_handler(msg: Message, context: Any) -> Message:  # phase 3 ends: prompts + tail up
            pid = pid_of(context)
            session = self._sessions[pid]
            return Message(upload(session, pid, len(session["kept"])), reply_to=msg)

        return app

    # -- server side -----------------------------------------------------------------------------------------
    def _send(self, node: int, message_type: str, content: Any, counter: dict) -> Any:
        from flwr.app import Message

        counter["down"] += _nbytes(content)
        (reply,) = self.grid.send_and_receive([Message(content, dst_node_id=node, message_type=message_type,
                                                       group_id=str(self.round + 1))])
        if reply.has_error():
            raise RuntimeError(f"client {node - 1000} failed on {message_type}: {reply.error.reason}")
        counter["up"] += _nbytes(reply.content)
        return reply.content

    def run_round(self, server_round: int) -> dict:
        """One round over every client; returns its record (bytes, FLOPs, loss per client)."""
        from flwr.app import ArrayRecord, ConfigRecord, RecordDict

        counter = {"up": 0, "down": 0}
        replies, flops, losses = [], [], []
        for node in self.grid.get_node_ids():
            config = ConfigRecord({"server-round": server_round})
            start = RecordDict({"arrays": ArrayRecord(self.arrays), "config": config})
            if self.tune != "sfprompt":
                out = self._send(node, "train", start, counter)
            else:
                n = int(self._send(node, "train.local", start, counter)["metrics"]["batches"])
                for b in range(n):
                    smashed = self._send(node, "train.forward", RecordDict(
                        {"config": ConfigRecord({"batch": b})}), counter)["smashed"].to_torch_state_dict()["x"]
                    smashed.requires_grad_(True)
                    body_out = self.server.body(smashed)
                    grad = self._send(node, "train.tail", RecordDict(
                        {"body": ArrayRecord({"x": body_out.detach()})}), counter)["grad"].to_torch_state_dict()["x"]
                    body_out.backward(grad)
                    self._send(node, "train.backward", RecordDict(
                        {"grad": ArrayRecord({"x": smashed.grad.detach()})}), counter)
                out = self._send(node, "train.upload", RecordDict({"config": config}), counter)
            metrics = out["metrics"]
            replies.append((out["arrays"].to_torch_state_dict(), int(metrics["num-examples"])))
            flops.append(float(metrics["client-flops"]))
            losses.append(float(metrics["train-loss"]))
        total = sum(n for _, n in replies)
        self.arrays = {k: sum(a[k].double() * (n / total) for a, n in replies).to(self.arrays[k].dtype)
                       for k in self.keys}
        record = {"round": server_round, "bytes_per_client": (counter["up"] + counter["down"]) / self.num_clients,
                  "bytes_up_per_client": counter["up"] / self.num_clients,
                  "client_flops_per_client": (sum(flops) / self.num_clients
                                              if self.flop_rounds is None or server_round <= self.flop_rounds
                                              else None),
                  "train_loss": sum(losses) / len(losses), "examples": total}
        if self.evaluate_fn is not None:
            record.update({f"server/{k}": float(v) for k, v in (self.evaluate_fn(server_round, self.full_state())
                                                                 or {}).items()})
        return record

    def fit(self) -> dict:
        """Run the remaining rounds; returns the global trainable arrays."""
        for server_round in range(self.round + 1, self.num_rounds + 1):
            self.history.append(self.run_round(server_round))
            self.round = server_round
            if self.checkpoint_path is not None:
                atomic_torch_save(self.state_dict(), self.checkpoint_path)
        return self.arrays


@torch.no_grad()
def evaluate_accuracy(net: SplitPromptViT, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of the whole model on ``(x, y)``."""
    net.eval()
    correct = sum(int((net(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return correct / max(1, len(y))


def build_sfprompt(config: dict, data: Callable[[int, int], Any], num_rounds: Optional[int] = None) -> tuple:
    """``(federation, test)`` for a ``federation.strategy: sfprompt`` config of ``lightning_ext.federated.run``
    (``data(i, n)``: client ``i``'s DataModule, the runner's ``FederatedDataModule`` of the config's data).

    ``strategy_args``: ``tune`` (sfprompt/prompt/full), ``keep``, ``local_loss``, ``lr``, ``pretrained_path``
    (a ``state_dict`` file read with ``weights_only=True``; ``None``: the model's own initialisation).
    """
    from lightning_ext.core.checkpoints import read_state_dict
    from lightning_ext.federated.client import _instantiate

    fed = dict(config.get("federation") or {})
    args = dict(fed.get("strategy_args") or {})
    known = {"tune", "keep", "local_loss", "lr", "pretrained_path"}
    if set(args) - known:
        raise ValueError(f"unknown sfprompt strategy_args {sorted(set(args) - known)}; known: {sorted(known)}.")
    seed = int(config.get("seed", 0))
    n = int(fed.get("num_clients", 2))

    def model() -> SplitPromptViT:
        return _instantiate(config["model"])

    initial = None
    if args.get("pretrained_path"):
        with seeded(seed):
            reference = model().state_dict()
        initial = read_state_dict(args["pretrained_path"], reference_keys=reference, name="pretrained_path")
    federation = SFPromptFederation(
        model, data, n, num_rounds or int(fed.get("num_rounds", 3)), tune=args.get("tune", "sfprompt"),
        keep=float(args.get("keep", 0.7)), local_loss=bool(args.get("local_loss", True)),
        lr=float(args.get("lr", 1e-3)), batch_size=int(getattr(_instantiate(config["data"]), "batch_size", 32)),
        local_steps=fed.get("local_steps"), initial_state=initial, seed=seed,
        checkpoint_path=fed.get("checkpoint_path"))

    def test(arrays: dict) -> dict:
        dm = _instantiate(config["data"])
        dm.setup("test")
        x, y = (torch.stack([torch.as_tensor(a) for a in t]) if i == 0 else torch.as_tensor(t)
                for i, t in enumerate(zip(*[dm.test_set[j] for j in range(len(dm.test_set))])))
        net = model()
        net.load_state_dict(federation.full_state(arrays))
        return {"test_acc": evaluate_accuracy(net, x.float(), y.long())}

    return federation, test
