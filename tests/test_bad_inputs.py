"""Bad inputs through every public constructor and through the CLI: each must end in one clear line.

Two tables, shared with ``benchmarks/reliability.py`` (which counts the outcomes for
``docs/results/reliability.md``):

* :data:`CLI_CASES`: bad YAML files, keys, types and values given to ``lightning-ext fit``. Each must exit with
  status 2 and one ``error:`` line on stderr that names the key (or file), without a traceback.
* :func:`python_cases`: for every Lightning component and scorer in the catalogue, constructed with minimal valid
  arguments plus one bad value (NaN, infinity, negative, zero where positive is required, a string where a number
  is expected, an unknown choice, an empty output path). Each must raise ``ValueError``/``TypeError`` whose
  one-line message names the argument.

A case a component still accepts silently is marked ``xfail(strict=True, reason="silent accept: ...")`` through
:data:`KNOWN_PY` / :data:`KNOWN_CLI`, so the count is honest and the test flips once the component checks it.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import yaml

from lightning_ext import catalogue

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.fast_dev_run=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--test_after_fit=false"]

# --------------------------------------------------------------------------------------------------- CLI table


@dataclass
class CLICase:
    """One bad command line: a base config (from configs/), edits to its YAML, extra flags, and the words the
    one-line error must contain (the key or file it names)."""

    id: str
    config: Optional[str] = "tabular_wine"
    edit: Optional[Callable[[dict], Any]] = None
    flags: list[str] = field(default_factory=list)
    expect: tuple[str, ...] = ()
    raw_yaml: Optional[str] = None  # written as the config file instead of the edited base config


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def edit(cfg: dict) -> None:
        node, keys = cfg, path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
        node[keys[-1]] = value
    return edit


def _callback(class_path: str, **init_args: Any) -> Callable[[dict], None]:
    def edit(cfg: dict) -> None:
        cfg["trainer"].setdefault("callbacks", []).append({"class_path": class_path, "init_args": init_args})
    return edit


def _filtered(scorer: dict, **kwargs: Any) -> Callable[[dict], None]:
    def edit(cfg: dict) -> None:
        cfg["model"] = {"class_path": "MLPClassifier", "init_args": {"num_features": 64, "num_classes": 10}}
        cfg["data"] = {"class_path": "FilteredDataModule", "init_args": {
            "datamodule": {"class_path": "DigitsDataModule"}, "scorer": scorer, "cache_dir": None, **kwargs}}
    return edit


CLI_CASES: list[CLICase] = [
    # the config file itself
    CLICase("yaml_syntax_error", raw_yaml="model:\n  class_path: MLPClassifier\n  init_args: {num_features: 13\n",
            expect=("bad.yaml:", "YAML syntax error")),
    CLICase("yaml_bad_indentation", raw_yaml="model:\n  class_path: MLPClassifier\n init_args:\n    x: 1\n",
            expect=("bad.yaml:", "YAML syntax error")),
    CLICase("yaml_tab_character", raw_yaml="trainer:\n\tmax_epochs: 1\n", expect=("bad.yaml:", "YAML syntax error")),
    CLICase("missing_config_file", config=None, flags=["--config", "no_such_config.yaml"],
            expect=("no_such_config.yaml",)),
    CLICase("config_is_a_directory", config=None, flags=["--config", "configs"], expect=("configs",)),
    CLICase("config_not_a_mapping", raw_yaml="- just\n- a list\n", expect=("bad.yaml",)),
    # unknown keys
    CLICase("unknown_model_key_flag", flags=["--model.init_args.lrr=0.1"], expect=("lrr",)),
    CLICase("unknown_model_key_yaml", edit=_set("model.init_args.hiden", [32]), expect=("hiden",)),
    CLICase("unknown_trainer_key_flag", flags=["--trainer.max_epocs=3"], expect=("max_epocs",)),
    CLICase("unknown_trainer_key_yaml", edit=_set("trainer.max_epocs", 3), expect=("max_epocs",)),
    CLICase("unknown_top_level_key", edit=_set("modle", {"class_path": "MLPClassifier"}), expect=("modle",)),
    CLICase("unknown_data_key_flag", flags=["--data.init_args.batchsize=3"], expect=("batchsize",)),
    CLICase("unknown_callback_key", edit=_callback("KNNEvaluation", kk=5), expect=("kk",)),
    CLICase("unknown_subcommand", config=None, flags=["fitt"], expect=("fitt",)),
    # wrong types
    CLICase("string_for_float", flags=["--model.init_args.lr=abc"], expect=("lr",)),
    CLICase("string_for_int_yaml", edit=_set("model.init_args.num_classes", "three"), expect=("num_classes",)),
    CLICase("float_for_int", flags=["--data.init_args.batch_size=2.5"], expect=("batch_size",)),
    CLICase("string_for_trainer_int", flags=["--trainer.max_epochs=abc"], expect=("max_epochs",)),
    CLICase("string_for_list", edit=_set("model.init_args.hidden", "big"), expect=("hidden",)),
    CLICase("string_for_callback_int", edit=_callback("KNNEvaluation", k="five"), expect=("k",)),
    CLICase("string_for_seed", flags=["--seed_everything=abc"], expect=("seed_everything",)),
    # values refused by a Literal or a constrained type
    CLICase("negative_lr", flags=["--model.init_args.lr=-1"], expect=("lr",)),
    CLICase("nan_lr", flags=["--model.init_args.lr=nan"], expect=("lr",)),
    CLICase("zero_batch_size", flags=["--data.init_args.batch_size=0"], expect=("batch_size",)),
    CLICase("dropout_of_one", edit=_set("model.init_args.dropout", 1.0), expect=("dropout",)),
    CLICase("unknown_dataset_choice", edit=_set("data.init_args.name", "mnist"), expect=("name",)),
    CLICase("unknown_stem_choice", config="quickstart", flags=["--model.init_args.stem_downsample=bogus"],
            expect=("stem_downsample",)),
    CLICase("one_class", flags=["--model.init_args.num_classes=1"], expect=("num_classes",)),
    CLICase("zero_knn_k", edit=_callback("KNNEvaluation", k=0), expect=("k",)),
    CLICase("negative_width", flags=["--model.init_args.num_classes=-3"], expect=("num_classes",)),
    CLICase("keep_zero", edit=_filtered({"class_path": "RandomScorer"}, keep=0), expect=("keep",)),
    CLICase("scorer_choice", edit=_filtered({"class_path": "SemDeDup", "init_args": {"which": "hardest"}}),
            expect=("which",)),
    # values refused by a constructor while the classes are built
    CLICase("infinite_lr", flags=["--model.init_args.lr=inf"], expect=("lr",)),
    CLICase("users_without_items", flags=["--model=LightGCN", "--model.init_args.num_users=5"],
            expect=("num_users",)),
    CLICase("bad_accelerator", flags=["--trainer.accelerator=tpuu"], expect=("accelerator",)),
    CLICase("bad_checkpoint_mode", edit=_callback("ModelCheckpoint", monitor="val_acc", mode="maxx"),
            expect=("mode",)),
    CLICase("unknown_short_class_name", flags=["--model=MLPClasifier"], expect=("MLPClasifier",)),
    CLICase("unknown_scorer_name", edit=_filtered({"class_path": "RandomScorrer"}), expect=("RandomScorrer",)),
    # data paths given in the config
    CLICase("missing_interaction_file", flags=["--model=LightGCN", "--data=InteractionFileDataModule",
                                               "--data.init_args.train_path=no_such_train.txt"],
            expect=("no_such_train.txt",)),
    CLICase("missing_checkpoint", flags=["--ckpt_path=no_such.ckpt"], expect=("no_such.ckpt",)),
    CLICase("missing_data_dir", config="fashion_mnist", flags=["--data.init_args.data_dir=no_such_dir"],
            expect=("no_such_dir",)),
]

#: CLI cases a component still gets wrong today: id -> reason (xfail, strict: the test flips when fixed).
KNOWN_CLI: dict[str, str] = {}


def write_cli_config(case: CLICase, tmp_path: Path) -> list[str]:
    """The argv of ``case`` (its config written under ``tmp_path``), with a fast, quiet trainer."""
    argv: list[str] = []
    if case.raw_yaml is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(case.raw_yaml)
        argv += ["--config", str(path)]
    elif case.config is not None:
        cfg = yaml.safe_load((REPO / "configs" / f"{case.config}.yaml").read_text())
        if case.edit is not None:
            case.edit(cfg)
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(cfg))
        argv += ["--config", str(path)]
    subcommand = [] if case.flags[:1] == ["fitt"] else ["fit"]
    trainer = [] if case.config is None and case.raw_yaml is None else [
        *QUIET, f"--trainer.default_root_dir={tmp_path / 'run'}"]
    return [*subcommand, *argv, *case.flags, *trainer]


def run_cli_case(case: CLICase, tmp_path: Path) -> tuple[Optional[int], str]:
    """Run ``case`` through :func:`lightning_ext.cli.main` in this process: (exit status, stderr).

    An exception escaping ``main`` is what a user sees as a traceback: it is returned as status ``None`` and the
    formatted traceback."""
    import traceback

    from lightning_ext.cli import main

    import sys

    argv, err = write_cli_config(case, tmp_path), io.StringIO()
    code: Optional[int] = 0
    saved = sys.argv
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sys.argv = ["lightning-ext", *argv]  # exactly what the console script sees
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:  # noqa: BLE001 - a traceback is what we measure
            return None, err.getvalue() + traceback.format_exc()
        finally:
            sys.argv = saved
    return code, err.getvalue()


def classify_cli(case: CLICase, code: Optional[int], stderr: str) -> str:
    """``clear`` (exit 2, stderr is one ``error:`` line naming the key), ``unclear`` (exit non-zero, but more
    lines, e.g. a usage dump, or the line misses the key), ``traceback``, or ``accepted`` (the run went on)."""
    if code is None or "Traceback (most recent call last)" in stderr:
        return "traceback"
    if code == 0:
        return "accepted"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if (code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
            and all(w.lower() in lines[0].lower() for w in case.expect)):
        return "clear"
    return "unclear"


def _cli_params():
    for case in CLI_CASES:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_CLI[case.id])] if case.id in KNOWN_CLI else []
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", list(_cli_params()))
def test_cli_user_error_is_one_line_with_exit_2(case, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("LIGHTNING_EXT_CACHE", str(tmp_path / "cache"))
    code, stderr = run_cli_case(case, tmp_path)
    verdict = classify_cli(case, code, stderr)
    assert verdict == "clear", f"{case.id}: {verdict}, exit {code}\n{stderr[-3000:]}"


def test_there_are_at_least_37_cli_cases():
    assert len(CLI_CASES) >= 37 and len({c.id for c in CLI_CASES}) == len(CLI_CASES)


# ------------------------------------------------------------------------------------------------ Python table

NAN, INF = float("nan"), float("inf")


def _minimal(tmp: Path) -> dict[str, Callable[[], dict]]:
    """Minimal valid constructor arguments of every Lightning component and scorer in the catalogue."""
    from torch import nn

    def digits():
        from lightning_ext.data.digits import DigitsDataModule

        return DigitsDataModule()

    def random_scorer():
        from lightning_ext.curation.random_selection import RandomScorer

        return RandomScorer()

    def law():
        from lightning_ext.curation.scaling_law import FilteringScalingLaw

        return FilteringScalingLaw([{"a": 1.0, "b": -0.5, "tau": 1.0}], bucket_size=100)

    def ada():
        import torch

        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
        paths = [tmp / f"task{i}.pt" for i in range(2)]
        for i, path in enumerate(paths):  # fine-tuned copies: the base plus a small task vector
            state = {k: v + 0.01 * (i + 1) for k, v in net.state_dict().items()}
            torch.save(state, path)
        return {"network": net, "checkpoints": [str(p) for p in paths]}

    def detr_teacher():
        import torch

        from lightning_ext.detection.detr import DETRDetector

        teacher = DETRDetector(hidden_dim=32, num_queries=4, decoder_layers=1)
        torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)},
                   tmp / "detr_teacher.ckpt")
        return {"teacher_checkpoint": str(tmp / "detr_teacher.ckpt")}

    def sbp():
        from lightning_ext.parallel.module import MLP

        return {"net": MLP([8, 16, 3]), "sbp_plan": {"1": "B, S(0) -> S(-1)", "3": "S(-1), S(1) -> B"}}

    def traffic_capture():  # the family's real fixture capture and its labels, copied so caches land in tmp
        import shutil

        for name in ("capture.pcap", "capture.labels.json"):
            shutil.copy(REPO / "tests" / "data" / "traffic" / name, tmp / name)
        return {"pcap_paths": [str(tmp / "capture.pcap")]}

    interactions = tmp / "train.txt"
    interactions.write_text("0 1 2\n1 0 2\n2 1\n")
    pruning = {"pruning_ratio": 0.3}
    return {
        "BetaRankPruning": lambda: dict(pruning), "L1FilterPruning": lambda: dict(pruning),
        "RandomFilterPruning": lambda: dict(pruning),
        "KnowledgeDistillation": lambda: {"teacher": nn.Linear(4, 3)},
        "HeadNetworkDistillation": lambda: {"teacher": nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)),
                                            "student_layers": ["2"]},
        "FedD2SModule": _fedd2s_net,
        "AdaMerging": ada,
        "RuleFilter": lambda: {"min_resolution": 8},
        "Classifier": lambda: {"net": nn.Linear(4, 3), "num_classes": 3},
        "FederatedDataModule": lambda: {"datamodule": digits()},
        "DistillationModule": lambda: {"student": nn.Linear(4, 3), "teacher": nn.Linear(4, 3), "num_classes": 3},
        "ImageClassifier": lambda: {"backbone": "resnet10t", "image_size": 8},
        "BarlowTwins": lambda: {"backbone": "resnet10t"}, "FroSSL": lambda: {"backbone": "resnet10t"},
        "SimCLR": lambda: {"backbone": "resnet10t"}, "VICReg": lambda: {"backbone": "resnet10t"},
        "MLPClassifier": lambda: {"num_features": 4, "num_classes": 3},
        "MILClassifier": lambda: {"in_features": 8, "dim": 8, "heads": 2},
        "FilteredDataModule": lambda: {"datamodule": digits(), "scorer": random_scorer(), "cache_dir": None},
        "InteractionFileDataModule": lambda: {"train_path": str(interactions)},
        "InfluenceAugmentedDataModule": lambda: {"influence_path": str(tmp / "influence.pt")},
        "MultiTaskDataModule": lambda: {"tasks": [digits(), digits()]},
        "DFNScorer": lambda: {"trusted_indices": [0, 1, 2]},
        "PlanetoidDataModule": lambda: {"root": str(REPO.parent / "shared" / "data" / "planetoid")},
        "SearchedGNN": lambda: {"architecture": [
            {"attention": "gcn", "aggregation": "sum", "activation": "relu", "heads": 1, "hidden": 16},
            {"attention": "gcn", "aggregation": "sum", "activation": "identity", "heads": 1}]},
        "LastFMDataModule": lambda: {"root": str(REPO.parent / "shared" / "data" / "lastfm")},
        "DP4TLLabelMapping": lambda: {"target": digits()}, "DP4TLFeatureMapping": lambda: {"target": digits()},
        "ComputeAwareSelection": lambda: {"scorer": random_scorer(), "law": law(), "samples_seen": 1000},
        "SplitComputingDetector": detr_teacher,
        "PcapBurstDataModule": traffic_capture, "FlowWindowDataModule": traffic_capture,
        "VulnerabilityDataModule": lambda: {"path": str(REPO / "tests" / "fixtures" / "reposvul_tiny.jsonl")},
        "SubgraphClientDataModule": lambda: {"root": str(REPO.parent / "shared" / "data" / "planetoid")},
        "SBPModule": sbp,
    }


def _parameters(cls: type) -> dict[str, Any]:
    """Constructor parameter -> resolved annotation, following ``**kwargs`` up the MRO."""
    import inspect

    params: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass.__module__.startswith(("lightning.", "torch.")):
            continue
        init = vars(klass)["__init__"]
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # noqa: BLE001 - an annotation we cannot resolve: skip its parameters
            hints = {}
        sig = inspect.signature(init)
        for name, p in sig.parameters.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name in hints:
                params.setdefault(name, hints[name])
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return params


def _refuses(hint: Any, value: Any) -> bool:
    try:
        if isinstance(value, bool) or (isinstance(value, str) and hint in (int, float)):
            return True
        if hint is int and isinstance(value, float):
            return True
        hint(value)
        return False
    except (ValueError, TypeError, OverflowError):
        return True


def _bad_values(name: str, hint: Any) -> list[tuple[str, Any]]:
    """(label, value) pairs that ``hint`` (or the house rules: finite numbers, no empty path) forbids."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return _bad_values(name, members[0])
        if not all(isinstance(m, type) and issubclass(m, (int, float)) and m is not bool for m in members):
            return []
        found = {label: v for m in members for label, v in _bad_values(name, m)}
        return [(label, v) for label, v in found.items()
                if isinstance(v, str) or all(_refuses(m, v) or (isinstance(v, float) and not math.isfinite(v))
                                             for m in members)]
    if origin is typing.Literal:
        return [("unknown choice", "no-such-choice")]
    if hint is str:
        return [("empty path", "")] if name.endswith(("_path", "_dir")) else []
    if not isinstance(hint, type) or hint is bool or not issubclass(hint, (int, float)):
        return []
    floaty = issubclass(hint, float)
    out = [("NaN", NAN), ("string", "abc")]
    if floaty or _refuses(hint, INF):
        out.append(("inf", INF))
    if hint not in (int, float):  # a constrained type: the first value out of its range
        out += [(label, v) for label, v in (("negative", -1), ("zero", 0), ("above one", 1.5))
                if _refuses(hint, v)][:1]
    if not floaty:
        out.append(("fraction", 2.5))
    return out


@dataclass
class PyCase:
    """One constructor call with one bad argument."""

    id: str
    component: str
    arg: str
    label: str
    value: Any
    extra: dict = field(default_factory=dict)  # further arguments the bad combination needs
    setup: bool = False  # the value is only read in ``setup("fit")`` (a DataModule's files)


def _file(name: str, text: str) -> Callable[[Path], str]:
    def make(tmp: Path) -> str:
        (tmp / name).write_text(text)
        return str(tmp / name)
    return make


#: Hand-written cases the issue names: combinations of arguments and bad file contents read in ``setup``.
HAND_CASES: list[PyCase] = [
    PyCase("LightGCN.num_users=without num_items", "LightGCN", "num_users", "without num_items", 5),
    PyCase("UltraGCN.num_items=without num_users", "UltraGCN", "num_items", "without num_users", 7),
    PyCase("MLPClassifier.num_classes=-3", "MLPClassifier", "num_classes", "negative", -3),
    PyCase("SelectiveTraining.trainable=empty", "SelectiveTraining", "trainable", "empty prefix", ""),
    PyCase("MLPClassifier.hidden=negative width", "MLPClassifier", "hidden", "negative width", [-4]),
    PyCase("InteractionFileDataModule.train_path=garbage lines", "InteractionFileDataModule", "train_path",
           "garbage lines", _file("garbage.txt", "0 1 2\nuser item\n"), setup=True),
    PyCase("InteractionFileDataModule.train_path=empty file", "InteractionFileDataModule", "train_path",
           "empty file", _file("empty.txt", ""), setup=True),
    PyCase("InteractionFileDataModule.train_path=negative ids", "InteractionFileDataModule", "train_path",
           "negative ids", _file("negative.txt", "0 1 2\n-1 3\n"), setup=True),
    PyCase("InteractionFileDataModule.num_items=smaller than the file", "InteractionFileDataModule", "num_items",
           "smaller than the file", 1, extra={"num_users": 3}, setup=True),
    PyCase("DigitsDataModule.train_fraction=leaves classes empty", "DigitsDataModule", "train_fraction",
           "leaves classes empty", 0.002, setup=True),
    PyCase("PlanetoidDataModule.split=unknown", "PlanetoidDataModule", "split", "unknown choice", "halves"),
    PyCase("KNNEvaluation.temperature=NaN", "KNNEvaluation", "temperature", "NaN", NAN),
    PyCase("KnowledgeDistillation.temperature=NaN", "KnowledgeDistillation", "temperature", "NaN", NAN),
    PyCase("PipelineTuner.decide_every_n_batches=NaN", "PipelineTuner", "decide_every_n_batches", "NaN", NAN),
]


def python_cases() -> list[PyCase]:
    """Every (component, argument, bad value) of the catalogue's Lightning components and scorers."""
    cases = []
    for entry in catalogue.ENTRIES:
        if entry.kind not in (*catalogue.LIGHTNING_KINDS, "scorers"):
            continue
        for arg, hint in _parameters(entry.load()).items():
            for label, value in _bad_values(arg, hint):
                cases.append(PyCase(f"{entry.name}.{arg}={label}", entry.name, arg, label, value))
    return cases + HAND_CASES


def run_python_case(case: PyCase, tmp: Path) -> tuple[str, str]:
    """(verdict, detail): ``clear`` (ValueError/TypeError/FileNotFoundError, one line naming the argument),
    ``unclear`` (such an error, but its message misses the argument or spans lines), ``silent`` (accepted),
    ``crash`` (any other exception: the value reached torch, numpy or our internals)."""
    import traceback

    entry = catalogue.get(case.component)
    kwargs = _minimal(tmp).get(case.component, dict)()
    kwargs.update(case.extra)
    kwargs[case.arg] = case.value(tmp) if callable(case.value) else case.value
    if case.arg == "macs_reduction":  # the two targets exclude each other
        kwargs.pop("pruning_ratio", None)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            obj = entry.load()(**kwargs)
            if case.setup:
                obj.prepare_data()
                obj.setup("fit")
        except (ValueError, TypeError, FileNotFoundError) as err:
            text = str(err).strip()
            one_line = "\n" not in text
            named = case.arg if not (case.setup and case.arg.endswith("_path")) else Path(kwargs[case.arg]).name
            if re.search(rf"(?<![\w.]){re.escape(named)}(?!\w)", text) and one_line:
                return "clear", f"{type(err).__name__}: {text}"
            return "unclear", f"{type(err).__name__}: {text[:300]}"
        except Exception as err:  # noqa: BLE001 - what escapes is the finding
            where = traceback.extract_tb(err.__traceback__)[-1]
            return "crash", f"{type(err).__name__} at {Path(where.filename).name}:{where.lineno}: {str(err)[:200]}"
    return "silent", "accepted"


#: Python cases a component still gets wrong today: id -> reason (xfail, strict: the test flips when fixed).
KNOWN_PY: dict[str, str] = {
}


def _py_params():
    for case in python_cases():
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_PY[case.id])] if case.id in KNOWN_PY else []
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", list(_py_params()))
def test_constructor_refuses_bad_value_naming_the_argument(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_EXT_CACHE", str(tmp_path / "cache"))
    verdict, detail = run_python_case(case, tmp_path)
    assert verdict == "clear", f"{case.id}: {verdict}: {detail}"


def _fedd2s_net() -> dict:
    from lightning_ext.federated.fedd2s import FedD2SNet

    return {"net": FedD2SNet(1, 10, (4, 8, 8))}


def lightning_components_and_scorers() -> list[str]:
    return [e.name for e in catalogue.ENTRIES if e.kind in (*catalogue.LIGHTNING_KINDS, "scorers")]


@pytest.mark.parametrize("name", lightning_components_and_scorers())
def test_minimal_arguments_construct(name, tmp_path, monkeypatch):
    """The control: without the bad value every constructor succeeds, so each refusal is the bad value's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_EXT_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        catalogue.get(name).load()(**_minimal(tmp_path).get(name, dict)())


def test_every_lightning_component_and_scorer_has_bad_value_cases():
    covered = {c.component for c in python_cases()}
    assert set(lightning_components_and_scorers()) - covered == set()
