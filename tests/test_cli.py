"""The `lightning-ext` command: list, print_config, short names, subclass mode, errors with suggestions."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import LightningDataModule, LightningModule

from lightning_ext import catalogue
from lightning_ext.cli import UnknownClassError, run_cli

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
FAST = ["--trainer.fast_dev_run=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _run(*args, **kwargs):
    exe = Path(sys.executable).parent / "lightning-ext"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_ext"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=REPO, **kwargs)


def test_list_prints_every_component_grouped_by_kind():
    out = subprocess.run([sys.executable, "-m", "lightning_ext", "list"], capture_output=True, text=True,
                         check=True, env={"COLUMNS": "200", "PATH": ""}).stdout
    for title in catalogue.KIND_TITLES.values():
        assert title in out
    for comp in catalogue.components():
        assert comp.name in out
    # grouped: every module is listed after the LightningModules title and before the DataModules title
    mod_at, dm_at = out.index("LightningModules"), out.index("LightningDataModules")
    assert all(mod_at < out.index(c.name) < dm_at for c in catalogue.components("modules"))


def test_readme_component_table_matches_the_catalogue():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- components:start -->\n(.*?)\n<!-- components:end -->", readme, re.S)
    assert block, "README.md needs the component table between the components:start/end markers"
    assert block.group(1).strip() == catalogue.markdown_table().strip(), (
        "README component table is out of date; regenerate it with "
        "`python -c 'from lightning_ext import catalogue; print(catalogue.markdown_table())'`"
    )


def test_console_script_version_and_print_config():
    assert _run("--version").stdout.startswith("lightning-ext ")
    res = _run("fit", "--config", QUICKSTART, "--print_config")
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    assert cfg["model"]["class_path"] == "lightning_ext.ImageClassifier"  # short name resolved to our class
    assert cfg["data"]["class_path"] == "lightning_ext.DigitsDataModule"
    assert cfg["model"]["init_args"]["image_size"] == 8 and cfg["test_after_fit"] is True


def test_unknown_class_name_exits_2_and_suggests_close_names():
    res = _run("fit", "--config", QUICKSTART, "--model=ImageClasifier")
    assert res.returncode == 2
    assert "Unknown class 'ImageClasifier'" in res.stderr and "Did you mean: ImageClassifier" in res.stderr


def test_unknown_names_in_a_config_file_are_caught(tmp_path):
    cfg = yaml.safe_load(Path(QUICKSTART).read_text())
    cfg["trainer"]["callbacks"] = [{"class_path": "EarlyStoping", "init_args": {"monitor": "val_loss"}}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UnknownClassError, match="Did you mean: EarlyStopping"):
        run_cli(["fit", "--config", str(path)])
    cfg["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.EarlyStoping"}]
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UnknownClassError, match="lightning.pytorch.callbacks.EarlyStopping"):
        run_cli(["fit", "--config", str(path)])


def test_short_names_for_our_components_and_lightning_callbacks(tmp_path):
    cli = run_cli(["fit", "--config", QUICKSTART, f"--trainer.default_root_dir={tmp_path}",
                   "--trainer.callbacks+=LearningRateMonitor", "--data.init_args.batch_size=32", *FAST])
    assert type(cli.model).__name__ == "ImageClassifier" and cli.datamodule.batch_size == 32
    assert any(type(c).__name__ == "LearningRateMonitor" for c in cli.trainer.callbacks)
    assert "test_acc" in cli.trainer.callback_metrics  # test_after_fit ran the test split


class UserModel(LightningModule):
    """A user's own module, named by full class path in YAML."""

    def __init__(self, width: int = 4):
        super().__init__()
        import torch

        self.layer = torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        import torch.nn.functional as F

        x, y = batch
        return F.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self):
        import torch

        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_users_own_module_by_class_path(tmp_path):
    cli = run_cli(["fit", "--model=test_cli.UserModel", "--model.width=8", "--data=DigitsDataModule",
                   f"--trainer.default_root_dir={tmp_path}", *FAST])
    assert isinstance(cli.model, UserModel) and isinstance(cli.datamodule, LightningDataModule)


def test_list_one_kind_and_unknown_kind():
    out = subprocess.run([sys.executable, "-m", "lightning_ext", "list", "datamodules"], capture_output=True,
                         text=True, check=True, env={"COLUMNS": "200", "PATH": ""}).stdout
    assert "DigitsDataModule" in out and "ImageClassifier" not in out
    res = subprocess.run([sys.executable, "-m", "lightning_ext", "list", "optimizers"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown kind 'optimizers'" in res.stderr


def test_list_by_family_and_search_read_the_catalogue_without_importing_components():
    code = ("import sys; from lightning_ext.cli import run_cli; run_cli(['list', '--family', 'curation']); "
            "run_cli(['search', 'ties']); run_cli(['list', '--kind=losses']); "
            "print('IMPORTED', sorted(m for m in sys.modules if m.startswith('lightning_ext.') and "
            "m.split('.')[1] not in ('cli', 'catalogue', 'core', 'timm_hook')), 'torch' in sys.modules)")  # timm_hook: stdlib only
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"COLUMNS": "200", "PATH": ""}).stdout
    assert "SemDeDup" in out and "DensityBasedPruning" in out and "FilteredDataModule" in out
    assert "ties_merging_merge" in out and "ModelMerging" in out  # found by alias TIES
    assert "kd_kl_loss" in out and "frossl_loss" in out
    assert out.strip().endswith("IMPORTED [] False"), out[-300:]
    res = _run("search", "udfc")
    assert res.returncode == 0 and "DataFreeCompression" in res.stdout
    res = _run("list", "--family", "nosuch")
    assert res.returncode == 2 and "unknown family 'nosuch'" in res.stderr and "Traceback" not in res.stderr


def test_a_config_imports_only_the_components_it_names():
    code = ("import sys; from lightning_ext.cli import run_cli\ntry:\n"
            f"    run_cli(['fit', '--config', {QUICKSTART!r}, '--print_config'])\nexcept SystemExit:\n    pass\n"
            "print('FAMILIES', sorted({m.split('.')[1] for m in sys.modules if m.startswith('lightning_ext.') "
            "and len(m.split('.')) > 2}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    families = res.stdout.strip().splitlines()[-1]
    # ImageClassifier (vision) and DigitsDataModule (data) plus shared core; no other family was imported
    assert families.startswith("FAMILIES"), res.stdout[-500:]
    loaded = set(eval(families[len("FAMILIES"):]))  # noqa: S307 - our own printed list
    assert loaded <= {"vision", "data", "core", "catalogue"}, loaded
    assert {"vision", "data"} <= loaded


def _lightning_ext_cmd():
    exe = Path(sys.executable).parent / "lightning-ext"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_ext"]


def test_sigterm_mid_training_exits_non_zero(tmp_path):
    """A scheduler's SIGTERM must not look like success: exit 143 with one line saying where it stopped."""
    cmd = [*_lightning_ext_cmd(), "fit", "--config", str(REPO / "configs" / "tabular_wine.yaml"),
           "--trainer.max_epochs=100000", "--test_after_fit=false", "--trainer.enable_progress_bar=false",
           "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out: list[str] = []

    def read() -> None:  # in a thread, so a silent child never blocks the test
        for line in proc.stdout:
            out.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("params" in line.lower() for line in list(out)) and time.monotonic() < deadline:
            assert proc.poll() is None, "".join(out)[-2000:]
            time.sleep(0.2)  # the model summary is printed when fit starts
        time.sleep(3)  # some training steps
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    text = "".join(out)
    assert proc.returncode == 143, f"exit {proc.returncode}\n{text[-2000:]}"
    assert "stopped by SIGTERM" in text and "Traceback" not in text, text[-2000:]


@pytest.mark.parametrize("flags, words", [
    (["--model.init_args.lr=abc"], ["model", "lr"]),
    (["--model.init_args.lr=inf"], ["MLPClassifier", "lr"]),
    (["--trainer.max_epocs=3"], ["max_epocs"]),
])
def test_user_errors_from_the_console_script_are_one_line(flags, words, tmp_path):
    res = _run("fit", "--config", str(REPO / "configs" / "tabular_wine.yaml"), *flags,
               f"--trainer.default_root_dir={tmp_path}", "--trainer.fast_dev_run=1")
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr and "usage:" not in res.stderr, res.stderr[-2000:]
    assert len(errors) == 1 and all(w in errors[0] for w in words), res.stderr[-2000:]


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  class_path: MLPClassifier\n  init_args: {num_features: 13\n")
    res = _run("fit", "--config", str(path))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert re.search(r"error: .*broken\.yaml:\d+:\d+: YAML syntax error", res.stderr), res.stderr[-2000:]


def test_full_class_path_of_a_scorer_passes_the_name_check(tmp_path):
    """Names the short-name check cannot follow fall through to jsonargparse; valid paths are never refused."""
    from lightning_ext.lightning_cli import check_class_names

    cfg = {"data": {"class_path": "FilteredDataModule", "init_args": {
        "datamodule": {"class_path": "DigitsDataModule"},
        "scorer": {"class_path": "lightning_ext.curation.random_selection.RandomScorer"}}}}
    path = tmp_path / "scorer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    check_class_names(["fit", "--config", str(path)])  # no error
    check_class_names(["fit", "--data.init_args.scorer.class_path=lightning_ext.curation.RandomScorer"])
    with pytest.raises(UnknownClassError, match="no module 'no_such_pkg'"):
        check_class_names(["fit", "--model.class_path=no_such_pkg.Model"])


def test_help_still_exits_0_and_run_cli_raises_config_error(tmp_path):
    res = _run("fit", "--help")
    assert res.returncode == 0 and "--model" in res.stdout, res.stderr[-2000:]
    from lightning_ext.cli import ConfigError

    with pytest.raises(ConfigError, match=r"^model\.init_args\.lr: .*PositiveFloat"):
        run_cli(["fit", "--config", str(REPO / "configs" / "tabular_wine.yaml"), "--model.init_args.lr=-1",
                 f"--trainer.default_root_dir={tmp_path}"])


class FailsInTraining(UserModel):
    """Raises inside training: a bug, not a user error, so the CLI must keep its traceback."""

    def training_step(self, batch, batch_idx):
        raise ValueError("boom inside training_step")


def test_errors_raised_inside_training_keep_their_traceback(tmp_path):
    from lightning_ext.cli import main

    with pytest.raises(ValueError, match="boom inside training_step"):
        main(["fit", "--model=test_cli.FailsInTraining", "--data=DigitsDataModule",
              f"--trainer.default_root_dir={tmp_path}", *FAST])


def test_inline_json_callbacks_on_the_command_line_are_parsed_not_taken_as_a_class_name(tmp_path):
    cli = run_cli(["fit", "--config", QUICKSTART, *FAST, f"--trainer.default_root_dir={tmp_path}",
                   '--trainer.callbacks=[{"class_path": "LearningRateMonitor"}]', "--test_after_fit=false"])
    assert any(type(c).__name__ == "LearningRateMonitor" for c in cli.trainer.callbacks)
    with pytest.raises(UnknownClassError, match="LearningRateMonitr"):
        run_cli(["fit", "--config", QUICKSTART, *FAST, '--trainer.callbacks=[{"class_path": "LearningRateMonitr"}]'])
