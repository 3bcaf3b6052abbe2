"""Every YAML in configs/ runs through the CLI for a few steps (fit, then the test split if it asks)."""

from pathlib import Path

import pytest
import yaml

from lightning_ext.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_through_the_cli(config, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # configs use paths relative to the repository root
    subcommand = yaml.safe_load(config.read_text()).get("subcommand", "fit")
    cli = run_cli([
        subcommand, "--config", str(config),
        "--trainer.fast_dev_run=2", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ])
    assert cli.trainer.state.finished, cli.trainer.state
    if subcommand == "fit":
        assert cli.trainer.global_step > 0
