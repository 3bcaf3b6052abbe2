"""Every YAML in configs/ runs through the CLI for a few steps (fit, then the test split if it asks)."""

import re
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
    said = re.search(r"^#\s*lightning-ext (\w+) --config", config.read_text(), re.M)
    subcommand = said.group(1) if said else "fit"
    # compress times the model on this (shared, noisy) machine: a loose tolerance, and its own cache folder
    # (a modest speedup: at batch 64 a ResNet-10t on 8x8 digits can reach about 1.6x on one thread; at small batches
    # fixed overheads leave nothing to gain)
    extra = (["--tolerance=0.5", "--progress=false", "--max_widths=3", "--repeats=3", "--speedup=1.2"]
             if subcommand == "compress" else [])
    if subcommand == "compress":
        monkeypatch.setenv("LIGHTNING_EXT_CACHE", str(tmp_path / "cache"))
    cli = run_cli([
        subcommand, "--config", str(config),
        "--trainer.fast_dev_run=2", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}", *extra,
    ])
    assert cli.trainer.state.finished, cli.trainer.state
    if subcommand in ("fit", "compress"):
        assert cli.trainer.global_step > 0
    if subcommand == "compress":
        # pruned and reported; whether it is faster is timing on a shared CI machine (tests/test_compress.py checks
        # the budget logic with a deterministic clock)
        result = cli.compress_result
        assert (tmp_path / "compress" / "report.md").exists() and result.macs_after < result.macs_before
