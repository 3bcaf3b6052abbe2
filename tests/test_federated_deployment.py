"""Federated family: the federation YAML as a Flower app (export-app), a real loopback deployment (SuperLink + two
SuperNodes), and the refusal of Flower's simulation runtime where Ray is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from lightning_ext.federated.flower_app import (  # noqa: E402
    export_app, message_bytes, ray_available, require_simulation,
)

SMALL = """\
seed: 0
federation: {num_clients: 2, num_rounds: 2, local_steps: 3, strategy: fedavg}
model:
  class_path: Classifier
  init_args:
    net: {class_path: lightning_ext.federated.fedins_module.TinyConvBackbone, init_args: {image_size: 8, feature_dim: 10}}
    num_classes: 10
    lr: 0.05
data:
  class_path: DigitsDataModule
  init_args: {batch_size: 32}
"""


@pytest.fixture
def small_config(tmp_path) -> Path:
    path = tmp_path / "fed.yaml"
    path.write_text(SMALL)
    return path


def test_export_app_writes_an_app_flower_accepts(small_config, tmp_path):
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import get_metadata_from_config, get_project_config, validate_config

    out = export_app(small_config, tmp_path / "app", num_rounds=5)
    config = get_project_config(out)
    valid, errors, _ = validate_config(config, check_module=True, project_dir=out)
    assert valid, errors
    fab = build_fab_from_disk(out)  # what `flwr run` uploads to the SuperLink: the YAML must travel with the code
    assert {"fedapp.py", "federation.yaml"} <= set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    assert get_metadata_from_config(config)[0] == "lightning-ext/lx-fed"
    assert config["tool"]["flwr"]["app"]["config"]["num-server-rounds"] == 5
    assert (out / "federation.yaml").read_text() == SMALL
    with pytest.raises(FileExistsError, match="not empty"):
        export_app(small_config, out)


def test_export_app_refuses_a_bad_config_before_writing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: {rounds: 3}\nmodel: {class_path: Classifier}\ndata: {class_path: DigitsDataModule}\n")
    with pytest.raises(ValueError, match="unknown federation key"):
        export_app(bad, tmp_path / "app")
    assert not (tmp_path / "app").exists()


def test_export_app_command_prints_the_next_steps(small_config, tmp_path, capsys):
    from lightning_ext.cli import main

    main(["federate", "export-app", "--config", str(small_config), "--out", str(tmp_path / "app")])
    out = capsys.readouterr().out
    assert "flower-superlink" in out and "flwr run" in out and (tmp_path / "app" / "pyproject.toml").is_file()
    with pytest.raises(SystemExit) as exit_info:  # the directory now exists: one line, exit 2
        main(["federate", "export-app", "--config", str(small_config), "--out", str(tmp_path / "app")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "not empty" in err


@pytest.mark.skipif(ray_available(), reason="Ray is installed: Flower's simulation runtime can run")
def test_simulation_without_ray_is_refused_with_the_install_line(small_config, capsys):
    with pytest.raises(RuntimeError, match=r'pip install "flwr\[simulation\]"'):
        require_simulation()
    from lightning_ext.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["federate", "--config", str(small_config), "--backend", "simulation"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and 'pip install "flwr[simulation]"' in err


def test_message_bytes_counts_the_arrays_a_reply_carries():
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from lightning_ext.federated.grid import local_grid

    local_grid(None, 1)  # sets Flower's task identity, as a runtime does, so messages can be built

    def reply(n):
        content = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(n)}), "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, dst_node_id=1000, message_type="train")

    small, large = message_bytes(reply(10)), message_bytes(reply(1010))
    assert 4000 <= large - small <= 4004  # 1000 more float32 values (and one more byte or so of shape)
    assert small > 40  # the envelope (message, records, metadata) is counted too


@pytest.mark.slow  # about 1-2 min on a loaded 2-core machine: a fresh flwr-clientapp process (torch + Lightning) per message
def test_loopback_deployment_two_supernodes_two_rounds(small_config, tmp_path):
    """A real SuperLink and two SuperNodes on 127.0.0.1 run the exported app for two rounds through `flwr run`."""
    from lightning_ext.federated.loopback import LoopbackDeployment

    app = export_app(small_config, tmp_path / "app")
    out = tmp_path / "out"
    with LoopbackDeployment(2, workdir=tmp_path / "flower") as deployment:
        done = deployment.run(app, {"output-dir": str(out), "test-final": False}, timeout=540)
        logs = deployment.logs()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs
    result = json.loads((out / "result.json").read_text())
    train = [e for e in result["exchanges"] if e["type"] == "train"]
    assert len(train) == 2 and len(result["round_seconds"]) == 2
    assert all(len(set(e["nodes"])) == 2 and not e["errors"] for e in train)  # both clients reported, every round
    steps = [result["train_metrics"][r]["global-step"] for r in ("1", "2")]
    assert steps == [3, 6]  # each client resumed its own Lightning checkpoint (context.state) in round 2
    assert result["global_change_l2"] > 1e-4  # the global model moved
    final = torch.load(out / "global.pt", weights_only=True)
    assert all(torch.isfinite(v.double()).all() for v in final.values())
    # every reply carried the model: at least 4 bytes per float32 parameter
    numel = sum(v.numel() for v in final.values())
    assert all(b >= 4 * numel for e in train for b in e["reply_bytes"])
