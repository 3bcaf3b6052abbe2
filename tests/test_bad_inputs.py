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
            expect=("bad.yaml", "line")),
    CLICase("yaml_bad_indentation", raw_yaml="model:\n  class_path: MLPClassifier\n init_args:\n    x: 1\n",
            expect=("bad.yaml", "line")),
    CLICase("yaml_tab_character", raw_yaml="trainer:\n\tmax_epochs: 1\n", expect=("bad.yaml", "line")),
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
