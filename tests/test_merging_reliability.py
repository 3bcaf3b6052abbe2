"""Issue 15, merging: AdaMerging under Lightning's inference mode (test after fit), every named checkpoint
read-checked in ``setup`` (truncated, non-finite, other architecture), and atomic fine-tuned/merged files."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_ext.data.digits import DigitsDataModule
from lightning_ext.merging.callback import ModelMerging
from lightning_ext.merging.multi_task import MultiTaskDataModule
from lightning_ext.merging.task_vectors import ArchitectureMismatchError
from lightning_ext.vision.image_classifier import ImageClassifier

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)


def _module(seed: int = 0, hidden: int = 16) -> ImageClassifier:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    return ImageClassifier(net, num_classes=10, image_size=8, lr=1e-3)


def _task_file(path: Path, shift: float = 0.01, **kwargs) -> Path:
    state = {k: v + shift for k, v in _module(**kwargs).state_dict().items()}
    torch.save(state, path)
    return path


def _multi() -> MultiTaskDataModule:
    return MultiTaskDataModule([DigitsDataModule(), DigitsDataModule()], task_names=["a", "b"], batch_size=16,
                               steps_per_epoch=2)


# -- item: AdaMerging re-run inside inference mode ---------------------------------------------------------------------


def test_ada_merging_test_after_fit_with_a_best_checkpoint_reapplies_the_learned_coefficients(tmp_path):
    """``trainer.test(ckpt_path=best)`` restores the unmerged fine-tuned weights, so the callback merges again
    inside Lightning's inference mode: it must re-apply the coefficients learned at the end of fit."""
    other = _task_file(tmp_path / "other.pt")
    merging = ModelMerging(checkpoints=[str(other)], method="ada_merging", ada_data=_multi(), ada_steps=3,
                           ada_lr=0.01, progress=False, plot_path=None)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", mode="min")
    module = _module()
    trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1,
                      default_root_dir=tmp_path, callbacks=[merging, ckpt], num_sanity_val_steps=0, **QUIET)
    trainer.fit(module, datamodule=DigitsDataModule())
    learned = merging.learned_coefficients.clone()
    merged_after_fit = {k: v.clone() for k, v in module.state_dict().items()}
    assert ckpt.best_model_path
    trainer.test(module, datamodule=DigitsDataModule(), ckpt_path=ckpt.best_model_path, verbose=False,
                 weights_only=False)
    torch.testing.assert_close(merging.learned_coefficients, learned)  # re-applied, not learned again
    # fit ended on the best (only) checkpoint's weights: the re-applied merge is the merge made at the end of fit
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, merged_after_fit[k], atol=1e-6, rtol=0, msg=k)


def test_ada_merging_learns_coefficients_in_a_test_only_run(tmp_path):
    """Outside fit (``test`` with ``base_checkpoint``) the merge learns its coefficients inside the test loop's
    inference mode: it runs with gradients enabled."""
    base = tmp_path / "base.pt"
    torch.save(_module().state_dict(), base)
    other = _task_file(tmp_path / "other.pt")
    module = _module()
    module.load_state_dict(torch.load(_task_file(tmp_path / "own.pt", shift=-0.01), weights_only=True))
    merging = ModelMerging(checkpoints=[str(other)], method="ada_merging", ada_data=_multi(), ada_steps=2,
                           progress=False, plot_path=None, base_checkpoint=str(base))
    Trainer(callbacks=[merging], limit_test_batches=1, **QUIET).test(module, datamodule=DigitsDataModule(), verbose=False)
    assert merging.merged and merging.learned_coefficients.shape == (2, 2)
    assert all(p.requires_grad for p in module.parameters())


def test_ada_merging_yaml_with_test_after_fit_and_a_best_checkpoint(tmp_path, monkeypatch):
    from lightning_ext.cli import run_cli

    monkeypatch.chdir(REPO)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(["fit", "--config", "configs/ada_merging.yaml", "--test_after_fit=true", "--trainer.max_epochs=1",
                       "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
                       "--trainer.enable_progress_bar=false", "--trainer.callbacks.init_args.ada_steps=2",
                       f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.state.finished and cli.trainer.checkpoint_callback.best_model_path
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ModelMerging))
    assert callback.merged and callback.learned_coefficients is not None


# -- item: every named checkpoint read-checked in setup ----------------------------------------------------------------


class _CountSteps(ModelCheckpoint):
    pass


def _fit_fails_before_training(tmp_path, checkpoints, match, error=ValueError, **kwargs):
    module = _module()
    steps = []

    class Count(Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    merging = ModelMerging(checkpoints=[str(c) for c in checkpoints], **kwargs)
    trainer = Trainer(max_steps=3, default_root_dir=tmp_path, callbacks=[merging, Count()], enable_checkpointing=False, **QUIET)
    start = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        trainer.fit(module, datamodule=DigitsDataModule())
    assert steps == [], "the bad checkpoint was found only after training"
    assert "\n" not in str(info.value), str(info.value)
    assert time.perf_counter() - start < 30
    return info.value


def test_a_truncated_checkpoint_fails_in_setup_naming_the_file(tmp_path):
    good = _task_file(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    err = _fit_fails_before_training(tmp_path, [good, truncated], "truncated.pt")
    assert "good.pt" not in str(err)


def test_a_non_finite_checkpoint_found_by_a_glob_fails_in_setup(tmp_path):
    (tmp_path / "tasks").mkdir()
    _task_file(tmp_path / "tasks" / "a.pt")
    state = _module().state_dict()
    state["net.1.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "tasks" / "nan.pt")
    _fit_fails_before_training(tmp_path, ["tasks/*.pt"], r"nan\.pt.*non-finite")


def test_a_checkpoint_of_another_architecture_fails_in_setup(tmp_path):
    wrong = _task_file(tmp_path / "wrong.pt", hidden=8)
    _fit_fails_before_training(tmp_path, [wrong], r"wrong\.pt", error=ArchitectureMismatchError)


def test_a_pickled_checkpoint_fails_in_setup(tmp_path):
    bad = tmp_path / "pickled.pt"
    torch.save({"state_dict": _module().state_dict(), "extra": _CountSteps}, bad)
    _fit_fails_before_training(tmp_path, [bad], r"pickled\.pt")


def test_a_bad_coefficients_file_fails_in_setup(tmp_path):
    good = _task_file(tmp_path / "good.pt")
    (tmp_path / "c.pt").write_bytes(b"not a torch file")
    _fit_fails_before_training(tmp_path, [good], r"c\.pt", method="coefficients", coefficients=str(tmp_path / "c.pt"))


# -- item: fine-tuned and merged files are written atomically ---------------------------------------------------------


class Killed(RuntimeError):
    """Stands for a kill arriving mid-write (Lightning turns a real KeyboardInterrupt into SystemExit)."""


def _save_that_dies_midway(real_save):
    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:  # what a kill mid-write leaves: a truncated file
            handle.truncate(100)
        raise Killed("killed mid-write")

    return save


@pytest.mark.parametrize("which", ["finetuned_path", "merged_path"])
def test_a_kill_while_writing_leaves_the_previous_file_not_a_truncated_one(tmp_path, monkeypatch, which):
    other = _task_file(tmp_path / "other.pt")
    target = tmp_path / "out" / f"{which}.pt"
    target.parent.mkdir()
    target.write_bytes(b"previous")
    merging = ModelMerging(checkpoints=[str(other)], **{which: f"out/{which}.pt"})
    trainer = Trainer(max_steps=1, default_root_dir=tmp_path, callbacks=[merging], enable_checkpointing=False, **QUIET)
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(Path(f))
        if len(calls) == 1:
            return _save_that_dies_midway(real_save)(obj, f, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(Killed):
        trainer.fit(_module(), datamodule=DigitsDataModule())
    assert calls, "nothing was written"
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name], "a temporary file was left behind"
