"""A federation YAML as a Flower app: ``lightning-ext federate export-app`` writes a directory that ``flwr run`` takes.

The same YAML that ``lightning-ext federate --config x.yaml`` runs in-process becomes a Flower app (a directory with
``pyproject.toml``, the YAML and a two-line ``fedapp.py``) for Flower's own runtimes: a real deployment
(``flower-superlink`` plus one ``flower-supernode`` per data silo, each with ``--node-config "partition-id=i
num-partitions=N"``) or ``flwr run``'s simulation (Ray, the ``flwr[simulation]`` extra). Both apps build the
:class:`~lightning_ext.federated.client.LightningClient` and the strategy through
:func:`lightning_ext.federated.run.build_parts`, so a deployed federation trains the same client code as the
in-process one. The client state (the Lightning checkpoint) lives in Flower's ``context.state``, which a SuperNode
keeps across the fresh ``flwr-clientapp`` process it starts for every message.

The ServerApp waits for replies by polling the SuperLink every ``POLL_INTERVAL`` seconds instead of Flower's
fixed 3 s (``HttpGrid.send_and_receive``); with ``output-dir`` set in the run config it writes ``result.json``
(per round: wall time, the nodes that replied, the bytes of each reply, the train metrics; the change of the
global model; the final model's test metrics) and ``global.pt`` there.

Example:
    >>> import pathlib, tempfile
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (tmp / "fed.yaml").write_text(
    ...     "federation: {num_clients: 2, num_rounds: 3}\\n"
    ...     "model: {class_path: Classifier, init_args: {num_classes: 10, net: {class_path: "
    ...     "lightning_ext.federated.fedins_module.TinyConvBackbone, init_args: {image_size: 8, feature_dim: 10}}}}\\n"
    ...     "data: {class_path: DigitsDataModule}\\n")
    >>> sorted(p.name for p in export_app(tmp / "fed.yaml", tmp / "app").iterdir())
    ['fedapp.py', 'federation.yaml', 'pyproject.toml']
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from lightning_ext.federated._flwr import require_flwr

#: seconds between two polls of the SuperLink for replies (Flower's grid sleeps 3 s)
POLL_INTERVAL = 0.2
#: the install line Flower's simulation runtime needs (Ray is its only backend in flwr 1.42)
SIMULATION_INSTALL = 'pip install "flwr[simulation]"'
APP_MODULE = "fedapp"

_PYPROJECT = """\
# Written by `lightning-ext federate export-app` from {source}.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "A lightning-ext federation ({source}) as a Flower app"
license = "Apache-2.0"
dependencies = ["lightning-ext[federated]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "lightning-ext"

[tool.flwr.app.components]
serverapp = "{module}:serverapp"
clientapp = "{module}:clientapp"

[tool.flwr.app.config]
config-file = "federation.yaml"
num-server-rounds = {rounds}
output-dir = ""
test-final = true
"""

_MODULE = '''\
"""Flower components of a lightning-ext federation (written by `lightning-ext federate export-app`)."""

from pathlib import Path

from lightning_ext.federated.flower_app import lightning_client_app, lightning_server_app

clientapp = lightning_client_app(Path(__file__).parent)
serverapp = lightning_server_app(Path(__file__).parent)
'''


def ray_available() -> bool:
    """Whether Flower's simulation backend (Ray) can be imported."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def require_simulation() -> None:
    """Raise one line naming the install when Flower's simulation runtime cannot run here (no Ray)."""
    if not ray_available():
        raise RuntimeError(f"Flower's simulation runtime (`flwr run` with a local SuperLink, run_simulation) needs "
                           f"Ray, which is not installed: {SIMULATION_INSTALL}; or run in-process (`lightning-ext "
                           f"federate --config ...`) or deploy with a SuperLink and SuperNodes (no Ray needed).")


def load_app_config(app_dir: Union[str, Path], run_config: dict) -> tuple[dict, Path]:
    """The federation YAML named by ``run_config["config-file"]`` (relative to the app directory) and its path."""
    path = Path(app_dir) / str(run_config.get("config-file", "federation.yaml"))
    if not path.is_file():
        raise FileNotFoundError(f"the app's federation config {str(path)!r} does not exist; set `config-file` in "
                                "[tool.flwr.app.config] to a YAML inside the app directory.")
    return yaml.safe_load(path.read_text()) or {}, path


def _parts(app_dir: Union[str, Path], run_config: dict) -> Any:
    from lightning_ext.federated.run import FederationParts, build_parts

    config, path = load_app_config(app_dir, run_config)
    rounds = run_config.get("num-server-rounds")
    parts = build_parts(config, int(rounds) if rounds else None)
    if not isinstance(parts, FederationParts):
        raise ValueError(f"{path.name}: strategy `sfprompt` runs its own message flow in-process only; "
                         "use `lightning-ext federate --config` for it.")
    return parts


def message_bytes(message: Any) -> int:
    """Bytes of a Flower ``Message`` as its transport pushes them: every object of its tree (the message, its
    ``RecordDict``, each record and each ``Array``) serialised with ``deflate()``, the contents a SuperNode uploads."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return int(sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values()))


def lightning_client_app(app_dir: Union[str, Path]) -> Any:
    """A Flower ``ClientApp`` that runs the app's federation YAML (its LightningClient) for every message.

    The client is built on the first message of a process (each message is a fresh process on a SuperNode; a Ray
    actor may serve several nodes) from ``context.run_config``; ``context.node_config`` gives its partition.
    """
    flwr = require_flwr("lightning_client_app")
    app_dir = Path(app_dir)
    built: dict = {}

    class LightningClientApp(flwr.clientapp.ClientApp):
        def __call__(self, message: Any, context: Any) -> Any:
            key = tuple(sorted((k, str(v)) for k, v in dict(context.run_config).items()))
            if key not in built:
                built[key] = _parts(app_dir, dict(context.run_config)).client.client_app()
            return built[key](message, context)

    return LightningClientApp()


def _polling(grid: Any, interval: float, log: list) -> Any:
    """``grid`` with a ``send_and_receive`` that polls every ``interval`` s and records each exchange in ``log``."""
    from flwr.serverapp import Grid

    class PollingGrid(Grid):
        def set_run(self, run: Any) -> None:
            grid.set_run(run)

        @property
        def run(self) -> Any:
            return grid.run

        def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                           ttl: Optional[float] = None) -> Any:
            return grid.create_message(content, message_type, dst_node_id, group_id, ttl)

        def get_node_ids(self) -> Any:
            return grid.get_node_ids()

        def push_messages(self, messages: Any) -> Any:
            return grid.push_messages(messages)

        def pull_messages(self, message_ids: Any) -> Any:
            return grid.pull_messages(message_ids)

        def send_and_receive(self, messages: Any, *, timeout: Optional[float] = None) -> Any:
            messages = list(messages)
            if not messages:  # e.g. no federated evaluation
                return []
            kind = messages[0].metadata.message_type
            start = time.time()
            pending = set(self.push_messages(messages))
            replies: list = []
            while pending and (timeout is None or time.time() < start + timeout):
                got = list(self.pull_messages(pending))
                replies.extend(got)
                pending -= {m.metadata.reply_to_message_id for m in got}
                if pending:
                    time.sleep(interval)
            log.append({"type": kind, "seconds": time.time() - start,
                        "nodes": sorted(int(m.metadata.src_node_id) for m in replies if not m.has_error()),
                        "errors": [m.error.reason for m in replies if m.has_error()],
                        "reply_bytes": [message_bytes(m) for m in replies if not m.has_error()]})
            return replies

    return PollingGrid()


def lightning_server_app(app_dir: Union[str, Path]) -> Any:
    """A Flower ``ServerApp`` running the app's federation YAML: its strategy, ``num-server-rounds`` rounds."""
    flwr = require_flwr("lightning_server_app")
    from flwr.app import ArrayRecord

    app = flwr.serverapp.ServerApp()
    app_dir = Path(app_dir)

    @app.main()
    def main(grid: Any, context: Any) -> None:
        import random

        import torch

        from lightning_ext.core.io import atomic_torch_save, atomic_write_json

        run_config = dict(context.run_config)
        parts = _parts(app_dir, run_config)
        random.seed(parts.seed)  # Flower samples clients with the global `random`
        initial = parts.client.initial_arrays()
        exchanges: list = []
        stamps = [time.time()]

        def round_end(server_round: int, arrays: Any) -> Optional[Any]:
            if server_round > 0:
                stamps.append(time.time())
            return None

        result = parts.strategy.start(grid=_polling(grid, POLL_INTERVAL, exchanges),
                                      initial_arrays=ArrayRecord(initial), num_rounds=parts.num_rounds,
                                      evaluate_fn=round_end)
        final = result.arrays.to_torch_state_dict()
        change = float(sum((final[k].double() - initial[k].double()).pow(2).sum() for k in initial) ** 0.5)
        out = str(run_config.get("output-dir", ""))
        if not out:
            return
        summary = {
            "num_rounds": parts.num_rounds, "num_clients": parts.num_clients,
            "round_seconds": [b - a for a, b in zip(stamps, stamps[1:])], "exchanges": exchanges,
            "train_metrics": {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
            "global_change_l2": change,
            "test": parts.test(final) if bool(run_config.get("test-final", True)) else None,
        }
        os.makedirs(out, exist_ok=True)
        atomic_torch_save({k: torch.as_tensor(v) for k, v in final.items()}, Path(out) / "global.pt")
        atomic_write_json(summary, Path(out) / "result.json", indent=1)

    return app


def export_app(config: Union[str, Path], out_dir: Union[str, Path], num_rounds: Optional[int] = None) -> Path:
    """Write a Flower app directory for the federation YAML ``config``: ``pyproject.toml``, ``federation.yaml``,
    ``fedapp.py``. Refuses an existing non-empty ``out_dir`` and a config ``build_parts`` rejects."""
    from lightning_ext.federated.run import FederationParts, build_parts, load_config

    source = Path(config)
    parsed = load_config(str(source))
    parts = build_parts(parsed, num_rounds)  # the config's errors now, not on the SuperNodes
    if not isinstance(parts, FederationParts):
        raise ValueError("strategy `sfprompt` runs its own message flow in-process only; it cannot be exported.")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export-app: {str(out)!r} exists and is not empty; give a new directory.")
    out.mkdir(parents=True, exist_ok=True)
    name = "".join(c if c.isalnum() else "-" for c in source.stem.lower()).strip("-") or "federation"
    (out / "pyproject.toml").write_text(_PYPROJECT.format(source=source.name, name=f"lx-{name}", module=APP_MODULE,
                                                          rounds=parts.num_rounds))
    shutil.copyfile(source, out / "federation.yaml")
    (out / f"{APP_MODULE}.py").write_text(_MODULE)
    return out


def deployment_commands(app_dir: Union[str, Path], num_clients: int, port: int = 9092) -> str:
    """The shell commands that run an exported app on a SuperLink and ``num_clients`` SuperNodes, all on this
    machine (the flags :class:`~lightning_ext.federated.loopback.LoopbackDeployment` uses). On several machines the
    SuperLink binds ``--host 0.0.0.0`` and each SuperNode names ``--superlink <server-ip>:<port>``."""
    lines = ["export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 "
             "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1",
             'export FLWR_HOME="$PWD/flwr_home" && mkdir -p "$FLWR_HOME"   # Flower\'s state, apps and connections',
             f"flower-superlink --insecure --host 127.0.0.1 --port {port} --disable-runtime-dependency-installation &"]
    for i in range(num_clients):
        lines.append(f"flower-supernode --insecure --superlink 127.0.0.1:{port} --port {9200 + i} "
                     f"--node-config 'partition-id={i} num-partitions={num_clients}' &")
    lines += [f"printf '[superlink]\\ndefault = \"deploy\"\\n[superlink.deploy]\\naddress = \"127.0.0.1:{port}\"\\n"
              f"insecure = true\\n' > \"$FLWR_HOME/config.toml\"",
              f"flwr run {app_dir} deploy --stream"]
    return "\n".join(lines)
