"""`compress` (issue 18): a trained model and a latency budget in, a smaller fine-tuned model and a report out.

Latency is replaced by a deterministic cost of the model's shapes (timing on a shared CI machine is noise); the
plan, pruning, distillation, checkpoint, report and CLI paths are the real ones.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import yaml
from torch import nn

pytest.importorskip("torch_pruning")

import lightning_ext.compress as compress_module  # noqa: E402
from lightning_ext.compress import CompressError, compress  # noqa: E402
from lightning_ext.compression import PruningError, count_macs_params, load_pruned_checkpoint  # noqa: E402
from lightning_ext.compression import latency_pruning  # noqa: E402
from lightning_ext.data.digits import DigitsDataModule  # noqa: E402
from lightning_ext.vision.classifier import Classifier  # noqa: E402


def _fake_latency(model, inputs, warmup=0, repeats=1, num_threads=None):
    batch = inputs.shape[0] if isinstance(inputs, torch.Tensor) else 1
    return count_macs_params(model, inputs)[0] * batch * 1e-9


@pytest.fixture
def fake_clock(monkeypatch):
    monkeypatch.setattr(latency_pruning, "measure_latency", _fake_latency)
    monkeypatch.setattr(compress_module, "measure_latency", _fake_latency)


def _net() -> nn.Module:
    return nn.Sequential(nn.Identity(), nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def _model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(_net(), num_classes=10, lr=3e-3)


def test_compress_meets_the_budget_writes_everything_and_reloads(fake_clock, tmp_path):
    model, dm = _model(), DigitsDataModule(batch_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compress(model, dm, speedup=2.0, batch_size=16, finetune_epochs=1, output_dir=str(tmp_path / "out"),
                          progress=False)
    assert not [w for w in caught if "above the budget" in str(w.message)]
    assert result.budget_met and result.compressed_ms <= result.budget_ms * 1.05
    assert result.speedup >= 2.0 / 1.05 and result.macs_after < result.macs_before
    assert [r["stage"] for r in result.steps] == ["dense", "step 1: pruned", "step 1: fine-tuned"]
    assert all(0 <= r["metric"] <= 1 for r in result.steps)
    for path in (result.checkpoint_path, result.report_path, result.plot_path, result.config_path):
        assert (tmp_path / "out").joinpath(path.split("/")[-1]).stat().st_size > 0
    report = open(result.report_path).read()
    assert "| step 1: fine-tuned |" in report and "budget met" in report and "val_acc" in report
    assert "latency = median wall time of a forward pass" in report
    # a fresh process: build the dense model, replay the history, load the weights -> the same function
    fresh = load_pruned_checkpoint(_model(seed=1), result.checkpoint_path)
    x = torch.rand(5, 1, 8, 8)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))
    config = yaml.safe_load(open(result.config_path).read())
    assert config["speedup"] == 2.0 and config["model"]["class_path"].endswith("Classifier")


def test_the_report_names_a_callers_latency_fn(tmp_path):
    def macs_ms(model, inputs):  # a deterministic stand-in for a device timer: seconds proportional to MACs
        return count_macs_params(model, inputs)[0] * 1e-9

    result = compress(_model(), DigitsDataModule(batch_size=64), speedup=1.5, batch_size=16, finetune_epochs=1,
                      output_dir=str(tmp_path / "out"), progress=False, latency_fn=macs_ms)
    report = open(result.report_path).read()
    assert "latency = the caller's latency_fn" in report and "median wall time" not in report
    assert result.timing == "the caller's latency_fn" and result.budget_met


def test_distillation_runs_during_fine_tuning(fake_clock, tmp_path):
    from lightning.pytorch import Trainer

    trainer = Trainer(max_epochs=1, default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_train_batches=3)
    compress(_model(), DigitsDataModule(batch_size=64), speedup=1.5, batch_size=8, trainer=trainer, progress=False)
    names = [type(c).__name__ for c in trainer.callbacks]
    assert "KnowledgeDistillation" in names and "_CompressHistory" in names
    assert any(k.startswith("train_kd") for k in trainer.callback_metrics)


def test_two_steps_need_a_trainer_factory_and_prune_twice(fake_clock, tmp_path):
    from lightning.pytorch import Trainer

    with pytest.raises(CompressError, match="callable that returns a fresh Trainer"):
        compress(_model(), DigitsDataModule(), speedup=2.0, steps=2, trainer=Trainer(logger=False), progress=False)
    made = []

    def factory():
        made.append(Trainer(max_epochs=1, default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2))
        return made[-1]

    result = compress(_model(), DigitsDataModule(batch_size=64), speedup=2.0, steps=2, batch_size=8,
                      trainer=factory, distill_weight=0.0, progress=False)
    assert len(made) == 2 and result.budget_met
    assert [r["stage"] for r in result.steps][1:] == ["step 1: pruned", "step 1: fine-tuned", "step 2: pruned",
                                                     "step 2: fine-tuned"]
    ckpt = torch.load(result.checkpoint_path, weights_only=True)
    assert len(ckpt["callbacks"]["CompressHistory"]["steps"]) == 2
    assert not any("KnowledgeDistillation" == type(c).__name__ for t in made for c in t.callbacks)


def test_requests_it_cannot_carry_out_say_what_to_change(fake_clock, tmp_path):
    dm = DigitsDataModule(batch_size=64)
    for kwargs, words in [({}, "exactly one target"), ({"speedup": 2.0, "latency_budget_ms": 1.0}, "exactly one"),
                          ({"speedup": 0.5}, "> 1"), ({"latency_budget_ms": math.nan}, "finite"),
                          ({"speedup": 2.0, "keep": 0.5}, "needs both"),
                          ({"speedup": 2.0, "distill_weight": 1.5}, r"\[0, 1\]")]:
        with pytest.raises(CompressError, match=words):
            compress(_model(), dm, progress=False, output_dir=str(tmp_path), **kwargs)
    with pytest.raises(PruningError, match=r"cannot be reached.*at least"):
        compress(_model(), dm, speedup=500.0, batch_size=8, output_dir=str(tmp_path), progress=False)
    with pytest.raises(CompressError, match="logs no 'val_auc'"):
        compress(_model(), dm, speedup=1.5, monitor="val_auc", output_dir=str(tmp_path), progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_in_one_line(tmp_path):
    with pytest.raises(CompressError, match="no CUDA device is available here; use `device: cpu`"):
        compress(_model(), DigitsDataModule(batch_size=64), speedup=1.5, device="cuda", output_dir=str(tmp_path),
                 progress=False)


def test_checkpoint_weights_are_loaded_and_checked(fake_clock, tmp_path):
    trained = _model(seed=3)
    path = tmp_path / "trained.pt"
    torch.save(trained.state_dict(), path)
    model = _model(seed=4)
    compress(model, DigitsDataModule(batch_size=64), checkpoint=str(path), speedup=1.2, finetune_epochs=0,
             batch_size=8, output_dir=str(tmp_path / "o"), progress=False)
    # no fine-tuning: the kept filters carry the trained weights
    kept = model.net[1].weight
    assert any(torch.equal(kept[0], w) for w in trained.net[1].weight)
    bad = trained.state_dict()
    bad["net.1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(bad, path)
    with pytest.raises(ValueError, match="non-finite|NaN"):
        compress(_model(), DigitsDataModule(), checkpoint=str(path), speedup=1.2, output_dir=str(tmp_path),
                 progress=False)


def test_cli_compress_runs_from_yaml_and_refuses_bad_requests_with_exit_2(fake_clock, tmp_path, capsys,
                                                                          monkeypatch):
    from lightning_ext.cli import main, run_cli

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path / "run")},
        "model": {"class_path": "ImageClassifier",
                  "init_args": {"backbone": "resnet10t", "num_classes": 10, "in_chans": 1, "image_size": 8}},
        "data": {"class_path": "DigitsDataModule", "init_args": {"batch_size": 32}},
        "speedup": 1.5, "batch_size": 8, "progress": False, "max_widths": 4,
    }))
    cli = run_cli(["compress", "--config", str(config)])
    result = cli.compress_result
    assert result.budget_met and (tmp_path / "run" / "compress" / "report.md").exists()
    written = yaml.safe_load((tmp_path / "run" / "compress" / "compress.yaml").read_text())
    assert written["speedup"] == 1.5 and written["model"]["class_path"].endswith("ImageClassifier")
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "--config", str(config), "--latency_budget_ms", "1.0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exactly one target" in err[0] and "Traceback" not in err[0]
    # a checkpoint written by `lightning-ext fit` (hyperparameters of jsonargparse's constrained types) is read back
    # with weights_only=True (the held-out run found that it was not)
    fit = yaml.safe_load(config.read_text())
    fit["trainer"].update(enable_checkpointing=True, callbacks=[{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(tmp_path / "ck"), "filename": "trained"}}])
    fit = {k: v for k, v in fit.items() if k in ("seed_everything", "trainer", "model", "data")}
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(fit))
    run_cli(["fit", "--config", str(tmp_path / "fit.yaml")])
    cli = run_cli(["compress", "--config", str(config), f"--checkpoint={tmp_path / 'ck' / 'trained.ckpt'}",
                   f"--output_dir={tmp_path / 'from_fit'}"])
    assert cli.compress_result.macs_after < cli.compress_result.macs_before
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "--config", str(config), f"--checkpoint={tmp_path / 'missing.ckpt'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`checkpoint`" in err[0] and "does not exist" in err[0]


def test_an_interrupted_compress_resumes_mid_epoch_to_the_same_model(fake_clock, tmp_path):
    """Crash during fine-tuning (mid-epoch), run again with `resume=True`: the stages done are not redone and the
    final model equals an uninterrupted run's (plan, pruned weights and fine-tuning all the same)."""
    from lightning.pytorch import Trainer

    from lightning_ext.testing import SimulatedCrash, _crash_callback, assert_same_parameters

    from lightning.pytorch import Callback

    class CountBatches(Callback):
        def __init__(self):
            self.batches = 0

        def on_train_batch_end(self, *args):
            self.batches += 1

    def factory(crash_step=None, counter=None):
        def make():
            return Trainer(max_epochs=2, default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                           limit_train_batches=6, callbacks=([] if crash_step is None else
                                                             [_crash_callback(None, crash_step)]) +
                           ([] if counter is None else [counter]))
        return make

    common = dict(speedup=2.0, batch_size=8, progress=False, checkpoint_every_n_steps=2)
    full = _model()
    compress(full, DigitsDataModule(batch_size=32), trainer=factory(), output_dir=str(tmp_path / "full"), **common)
    out = str(tmp_path / "crashed")
    with pytest.raises(SimulatedCrash):
        compress(_model(), DigitsDataModule(batch_size=32), trainer=factory(crash_step=9), output_dir=out, **common)
    state = torch.load(tmp_path / "crashed" / "compress_state.pt", weights_only=True)
    assert state["done"] == 2 and len(state["history"]) == 1  # pruned, not yet fine-tuned
    assert (tmp_path / "crashed" / "finetune" / "step1" / "last.ckpt").is_file()
    calls = []
    original = latency_pruning.plan_latency_pruning
    monkey = pytest.MonkeyPatch()
    monkey.setattr(latency_pruning, "plan_latency_pruning", lambda *a, **k: calls.append(1) or original(*a, **k))
    try:
        resumed, counter = _model(), CountBatches()
        result = compress(resumed, DigitsDataModule(batch_size=32), trainer=factory(counter=counter), output_dir=out,
                          resume=True, **common)
    finally:
        monkey.undo()
    assert calls == []  # the pruning step was read back, not planned again
    assert counter.batches == 12 - 8  # fine-tuning went on from the step-8 checkpoint (epoch 2, batch 3 of 6)
    assert [r["stage"] for r in result.steps] == ["dense", "step 1: pruned", "step 1: fine-tuned"]
    assert_same_parameters(full, resumed)
    assert not (tmp_path / "crashed" / "finetune").exists()  # the step's checkpoints are gone once it is done
    assert load_pruned_checkpoint(_model(seed=2), result.checkpoint_path) is not None


def test_resume_refuses_a_different_request_and_a_multi_device_trainer(fake_clock, tmp_path):
    from lightning.pytorch import Trainer

    dm = DigitsDataModule(batch_size=64)
    compress(_model(), dm, speedup=1.5, batch_size=8, finetune_epochs=0, output_dir=str(tmp_path), progress=False)
    with pytest.raises(CompressError, match=r"different request: speedup=1\.5 \(now 2\.0\)"):
        compress(_model(), dm, speedup=2.0, batch_size=8, finetune_epochs=0, output_dir=str(tmp_path),
                 progress=False, resume=True)
    (tmp_path / "compress_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CompressError, match="start over"):
        compress(_model(), dm, speedup=1.5, batch_size=8, output_dir=str(tmp_path), progress=False, resume=True)
    two = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(CompressError, match="devices: 1"):
        compress(_model(), dm, speedup=1.5, trainer=two, output_dir=str(tmp_path / "x"), progress=False)
