"""Run a whole federation from one YAML: ``lightning-ext federate --config x.yaml`` (or
``python -m lightning_ext.federated.run --config x.yaml``).

A federation is not a LightningCLI run (one Trainer per client per round), so it has its own small config, in the
LightningCLI style for the parts that are: ``model`` and ``data`` are ``class_path``/``init_args`` dicts (short
catalogue names allowed), ``trainer`` holds extra ``Trainer`` arguments of each client, and ``federation`` says
how many clients and rounds, the partition, the strategy and the client's options::

    seed: 0
    federation: {num_clients: 4, num_rounds: 5, local_steps: 20, partitioner: dirichlet, alpha: 0.3,
                 strategy: fedavg, personal: [], remove_normalization: false}
    model: {class_path: ImageClassifier, init_args: {backbone: resnet10t, num_classes: 10, in_chans: 1, image_size: 8}}
    data: {class_path: DigitsDataModule}

It runs in-process (:class:`~lightning_ext.federated.simulation.FederatedSimulation`), tests the final global
model on the data's test split and prints one JSON line; ``--num_rounds`` overrides the config,
``--output`` writes the history as JSON. A config error (missing file, YAML that does not parse, an unknown key or
strategy) is one ``error:`` line and exit status 2 from ``lightning-ext federate``; with
``federation.checkpoint_path`` set, running the same command again after a crash resumes the federation (server
and client states) from its last finished round.

``lightning-ext federate export-app --config x.yaml --out DIR`` writes the same federation as a Flower app for
``flwr run`` (a SuperLink + SuperNodes deployment, or Flower's Ray simulation; see
:mod:`lightning_ext.federated.flower_app`) and prints the commands. ``--backend simulation`` refuses with the install
line when Ray (``flwr[simulation]``) is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import yaml

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavgm", "fedgen", "fedd2s", "fedpub", "fedins", "fedsyn", "sfprompt",
              "fedtiny", "fedsto")
_FEDERATION_KEYS = {"num_clients", "num_rounds", "local_steps", "local_epochs", "partitioner", "alpha", "strategy",
                    "strategy_args", "personal", "remove_normalization", "keep_state", "checkpoint_path"}


def _strategy(name: str, n: int, extra: dict) -> Any:
    from lightning_ext.federated._flwr import require_flwr

    require_flwr("lightning_ext.federated.run")
    from flwr.serverapp import strategy as st

    classes = {"fedavg": st.FedAvg, "fedprox": st.FedProx, "fedadam": st.FedAdam, "fedavgm": st.FedAvgM}
    if name == "fedgen":  # FedGen's server (its FedGenClient is built in `build`)
        from lightning_ext.federated.fedgen import fedgen_fedavg

        return fedgen_fedavg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n, **extra)
    if name == "fedd2s":  # FedD2S's schedule; personal models, so the clients also test theirs every round
        from lightning_ext.federated.fedd2s import fedd2s_fedavg

        return fedd2s_fedavg(fraction_evaluate=1.0, min_train_nodes=n, min_available_nodes=n, min_evaluate_nodes=n,
                             **extra)
    if name == "fedpub":  # FED-PUB's personalised server; the clients test their personalised models every round
        from lightning_ext.federated.fedpub_module import fedpub_fedavg

        return fedpub_fedavg(fraction_evaluate=1.0, min_train_nodes=n, min_available_nodes=n, min_evaluate_nodes=n,
                             **extra)
    if name == "fedins":  # FedIns' server: a uniform mean of the pools, keys and heads
        from lightning_ext.federated.fedins_module import fedins_fedavg

        return fedins_fedavg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n, **extra)
    if name == "fedtiny":  # FedTiny's server: BN-selected candidate masks, masked FedAvg, prune-and-grow
        from lightning_ext.federated.fedtiny_flower import fedtiny_fedavg

        return fedtiny_fedavg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n, **extra)
    if name == "fedsyn":  # FedSyn's server is FedAvg over generator and discriminator; clip/epsilon go to the clients
        return st.FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    if name not in classes:
        raise ValueError(f"federation.strategy={name!r} is unknown; choose one of {', '.join(STRATEGIES)}.")
    return classes[name](fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n, **extra)


def _partitions_itself(spec: dict) -> bool:
    """Whether the data class takes ``partition_id``/``num_clients`` itself (``federated_partitions = True``)."""
    import importlib

    path = spec["class_path"]
    if "." not in path:
        from lightning_ext import catalogue

        path = catalogue.get(path).class_path
    module, name = path.rsplit(".", 1)
    return bool(getattr(getattr(importlib.import_module(module), name), "federated_partitions", False))


def build(config: dict, num_rounds: Optional[int] = None):
    """``(simulation, test)``: the simulation the config describes and a function testing a global state_dict."""
    from lightning_ext.federated.simulation import FederatedSimulation

    parts = build_parts(config, num_rounds)
    if not isinstance(parts, FederationParts):  # SFPrompt's own federation
        return parts
    fed = parts.federation
    sim = FederatedSimulation(parts.client, parts.num_clients, parts.num_rounds, parts.strategy, seed=parts.seed,
                              checkpoint_path=fed.get("checkpoint_path"), progress=sys.stderr.isatty())
    return sim, parts.test


class FederationParts(NamedTuple):
    """What a federation YAML describes, for any runtime (in-process, or the Flower app of ``export-app``)."""

    client: Any
    strategy: Any
    num_clients: int
    num_rounds: int
    seed: int
    federation: dict
    test: Callable[[dict], dict]


def build_parts(config: dict, num_rounds: Optional[int] = None) -> Any:
    """The client, the strategy and a test function of a federation config (SFPrompt: its federation, as ``build``)."""
    from lightning.pytorch import Trainer

    from lightning_ext.federated.client import LightningClient, _instantiate
    from lightning_ext.federated.datamodule import FederatedDataModule
    from lightning_ext.federated.fedwon import remove_normalization

    fed = dict(config.get("federation") or {})
    unknown = set(fed) - _FEDERATION_KEYS
    if unknown:
        raise ValueError(f"unknown federation key(s) {sorted(unknown)}; known: {sorted(_FEDERATION_KEYS)}.")
    for key in ("model", "data"):
        if not isinstance(config.get(key), dict) or "class_path" not in config[key]:
            raise ValueError(f"the config needs `{key}:` with a class_path.")
    n = int(fed.get("num_clients", 2))
    seed = int(config.get("seed", 0))

    def model():
        module = _instantiate(config["model"])
        return remove_normalization(module) if fed.get("remove_normalization") else module

    def data(i: int, num: int):
        if _partitions_itself(config["data"]):  # e.g. FED-PUB's subgraph clients: the class cuts its own share
            return _instantiate(config["data"], partition_id=i, num_clients=num)
        return FederatedDataModule(_instantiate(config["data"]), num, i, partitioner=fed.get("partitioner", "iid"),
                                   alpha=float(fed.get("alpha", 0.5)), partition_seed=seed)

    if fed.get("strategy") == "sfprompt":  # split learning: its own message flow (SFPromptFederation), no Trainer
        from lightning_ext.federated.sfprompt_federation import build_sfprompt

        return build_sfprompt(config, data, num_rounds)
    client_kwargs = dict(model=model, datamodule=data, trainer=config.get("trainer"),
                         local_epochs=int(fed.get("local_epochs", 1)), local_steps=fed.get("local_steps"),
                         personal=fed.get("personal") or [], keep_state=bool(fed.get("keep_state", True)), seed=seed)
    if fed.get("strategy") == "fedsyn":  # FedSyn's optional Laplace noise on each client's update
        args = dict(fed.get("strategy_args") or {})
        if set(args) - {"clip", "epsilon"}:
            raise ValueError(f"unknown fedsyn strategy_args {sorted(set(args) - {'clip', 'epsilon'})}; known: "
                             "['clip', 'epsilon'] (both set: Laplace noise on the updates).")
        if args and "epsilon" not in args:
            raise ValueError("fedsyn strategy_args need `epsilon` (and optionally `clip`) for Laplace noise.")
        if args:
            from lightning_ext.federated.fedsyn import LaplaceUpdateNoise

            client_kwargs["reply_transform"] = LaplaceUpdateNoise(float(args.get("clip", 1.0)),
                                                                  float(args["epsilon"]), seed)
    if fed.get("strategy") == "fedgen":  # the client side of FedGen: the generator's regulariser, label counts
        from lightning_ext.federated.fedgen import FedGenClient

        head = dict(fed.get("strategy_args") or {}).get("head", "net.decode_fc2")
        client = FedGenClient(head=head, **client_kwargs)
    elif fed.get("strategy") == "fedpub":  # masks stay personal, replies carry the functional embedding
        from lightning_ext.federated.fedpub_module import FedPubClient

        client = FedPubClient(**client_kwargs)
    elif fed.get("strategy") == "fedins":  # only the pools, keys and heads travel, weighted uniformly
        from lightning_ext.federated.fedins_module import FedInsClient

        client = FedInsClient(**client_kwargs)
    elif fed.get("strategy") == "fedd2s":  # the client side of FedD2S: shared keys follow the server's depth
        from lightning_ext.federated.fedd2s import FedD2SClient

        client = FedD2SClient(**client_kwargs)
    elif fed.get("strategy") == "fedtiny":  # masked training, BN-selection queries, top-k gradient uploads
        from lightning_ext.federated.fedtiny_flower import FedTinyClient

        client = FedTinyClient(**client_kwargs)
    elif fed.get("strategy") == "fedsto":  # stage 1: backbone only; stage 2: all + orthogonality; local EMA teacher
        from lightning_ext.federated.fedsto import FedSTOClient, fedsto_fedavg

        args = dict(fed.get("strategy_args") or {})
        client = FedSTOClient(backbone=args.get("backbone", "net.backbone"), **client_kwargs)
        if "server_data" not in args:
            raise ValueError("fedsto needs strategy_args.server_data: the server's labelled DataModule (class_path).")
        fedsto = fedsto_fedavg(model, seed=seed, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n, **args)
    else:
        client = LightningClient(**client_kwargs)
    if fed.get("strategy") == "fedsto":
        strategy = fedsto
    else:
        strategy = _strategy(fed.get("strategy", "fedavg"), n, dict(fed.get("strategy_args") or {}))

    def test(arrays: dict) -> dict:
        module = model()
        state = module.state_dict()
        state.update({k: v.to(state[k].dtype) for k, v in arrays.items()})
        module.load_state_dict(state)
        dm = _instantiate(config["data"])
        trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False)
        return {k: float(v) for k, v in trainer.test(module, dm, verbose=False)[0].items()}

    return FederationParts(client, strategy, n, num_rounds or int(fed.get("num_rounds", 3)), seed, fed, test)


def load_config(path: str) -> dict:
    """The federation YAML at ``path`` as a dict; a missing file or bad YAML raises one-line ``UsageError``."""
    from lightning_ext.cli import UsageError

    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"federate: the config {path!r} does not exist; give the path of a federation YAML "
                         "(examples in configs/federated/).")
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise UsageError(f"federate: {path!r} is not valid YAML ({str(err).splitlines()[0]}); fix the file.") from None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise UsageError(f"federate: {path!r} must hold a mapping with `federation:`, `model:` and `data:` keys.")
    return config


def main(argv: Optional[list[str]] = None, prog: str = "python -m lightning_ext.federated.run") -> dict:
    """Parse ``--config`` (and overrides), run the federation, print and return the summary. Config errors (see the
    module docstring) raise :class:`lightning_ext.cli.UsageError`, which ``lightning-ext federate`` prints as one
    line with exit status 2."""
    from lightning_ext.cli import UsageError

    if list(argv or [])[:1] == ["export-app"]:
        return export_app_main(list(argv)[1:], prog=f"{prog} export-app")
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="federation YAML")
    parser.add_argument("--num_rounds", type=int, default=None, help="override federation.num_rounds")
    parser.add_argument("--output", default=None, help="write the per-round history here (JSON)")
    parser.add_argument("--backend", choices=("local", "simulation"), default="local",
                        help="local: in-process (default); simulation: Flower's simulation runtime, which needs Ray "
                             "(for it and for a deployment, see `federate export-app`)")
    args = parser.parse_args(argv)
    if args.num_rounds is not None and args.num_rounds < 1:
        raise UsageError(f"federate: --num_rounds must be a positive integer, got {args.num_rounds}.")
    if args.backend == "simulation":
        from lightning_ext.federated.flower_app import require_simulation

        try:
            require_simulation()
        except RuntimeError as err:
            raise UsageError(f"federate: {err}") from None
        raise UsageError("federate: Ray is installed; run Flower's simulation with `lightning-ext federate export-app "
                         f"--config {args.config} --out APP_DIR` and then `flwr run APP_DIR --stream`.")
    config = load_config(args.config)
    try:
        sim, test = build(config, args.num_rounds)
    except (ValueError, TypeError) as err:  # the config's keys and values (before any training)
        raise UsageError(f"federate: {args.config}: {str(err).strip().splitlines()[0]}") from None
    saved = getattr(sim, "checkpoint_path", None)
    if saved is not None and Path(saved).is_file() and hasattr(sim, "load"):  # the same command after a crash
        try:
            sim.load(saved)
        except (ValueError, KeyError) as err:
            raise UsageError(f"federate: cannot resume from {str(saved)!r} ({str(err).strip().splitlines()[0]}); "
                             "use the config that wrote it, or move the file away to start afresh.") from None
        print(f"federate: resuming from {saved} after round {sim.round}", file=sys.stderr)
    arrays = sim.fit()
    summary = {"rounds": sim.round, "test": test(arrays), "history": sim.history}
    if args.output:
        from lightning_ext.core.io import atomic_write_json

        atomic_write_json(summary, args.output, indent=1)
    print(json.dumps({"rounds": summary["rounds"], "test": summary["test"]}))
    return summary


def export_app_main(argv: list[str], prog: str) -> dict:
    """``federate export-app --config x.yaml --out DIR [--num_rounds N]``: write the Flower app, print how to run it."""
    from lightning_ext.cli import UsageError
    from lightning_ext.federated.flower_app import SIMULATION_INSTALL, deployment_commands, export_app, ray_available

    parser = argparse.ArgumentParser(prog=prog, description="Write a Flower app (for `flwr run`) from a federation YAML")
    parser.add_argument("--config", required=True, help="federation YAML")
    parser.add_argument("--out", required=True, help="a new (or empty) directory for the app")
    parser.add_argument("--num_rounds", type=int, default=None, help="override federation.num_rounds")
    args = parser.parse_args(argv)
    if args.num_rounds is not None and args.num_rounds < 1:
        raise UsageError(f"federate export-app: --num_rounds must be a positive integer, got {args.num_rounds}.")
    load_config(args.config)  # a missing file or bad YAML: one line
    try:
        out = export_app(args.config, args.out, args.num_rounds)
    except (ValueError, TypeError, FileExistsError) as err:
        raise UsageError(f"federate export-app: {str(err).strip().splitlines()[0]}") from None
    n = int(dict(load_config(args.config).get("federation") or {}).get("num_clients", 2))
    simulation = (f"flwr run {out} --stream" if ray_available() else
                  f"(Flower's simulation, `flwr run {out}`, needs Ray: {SIMULATION_INSTALL})")
    print(f"wrote the Flower app {out}\n# a deployment (SuperLink + {n} SuperNodes, here all on this machine):\n"
          f"{deployment_commands(out, n)}\n# simulation:\n{simulation}")
    return {"app": str(out)}


if __name__ == "__main__":
    from lightning_ext.cli import main as cli_main

    cli_main(["federate", *sys.argv[1:]])
