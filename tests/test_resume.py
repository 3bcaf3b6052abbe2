"""Mid-epoch crash and resume of the in-memory DataModules (issue 15): the resumed run ends exactly where an
uninterrupted run ends, also when the checkpoint is read with ``weights_only=True``."""

import pytest
import torch

from lightning_ext.datamodules import DigitsDataModule
from lightning_ext.modules import MLPClassifier
from lightning_ext.testing import crash_and_resume


class FlatDigits(DigitsDataModule):
    """Digits as 64-feature vectors, so an MLPClassifier can train on them."""

    input_shape = (64,)


def _model():
    torch.manual_seed(0)
    return MLPClassifier(num_features=64, num_classes=10, hidden=[32], lr=0.05)


def _max_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


@pytest.mark.parametrize("crash_step,every", [(13, 1), (27, 5), (21, 21), (40, 3)])
def test_mid_epoch_crash_and_resume_ends_with_the_uninterrupted_weights(tmp_path, crash_step, every):
    # 1,293 training samples / 64 = 21 batches per epoch (the last one short): step 13 and 27 are mid-epoch,
    # 21 is the first batch of epoch 1 (checkpoint saved after the last batch of epoch 0), 40 resumes at 39.
    full, resumed, info = crash_and_resume(
        _model, lambda: FlatDigits(batch_size=64), lambda: [], max_epochs=3, crash_step=crash_step,
        checkpoint_every_n_steps=every, weights_only=True, tmp_path=tmp_path,
        limit_val_batches=1, num_sanity_val_steps=0,
    )
    assert info["resumed_from_step"] == crash_step // every * every
    assert info["resumed_trainer"].global_step == full_steps(info)
    assert _max_diff(full, resumed) <= 1e-6


def full_steps(info) -> int:
    return info["full_trainer"].global_step


def test_mid_epoch_resume_with_loader_workers(tmp_path):
    full, resumed, _ = crash_and_resume(
        _model, lambda: FlatDigits(batch_size=64, num_workers=1), lambda: [], max_epochs=2, crash_step=30,
        weights_only=True, tmp_path=tmp_path, limit_val_batches=1, num_sanity_val_steps=0,
    )
    assert _max_diff(full, resumed) <= 1e-6


class PlainLoaderDigits(FlatDigits):
    """The loader before the fix: a plain DataLoader, which Lightning cannot resume mid-epoch."""

    def train_dataloader(self):
        from torch.utils.data import DataLoader

        loader = super().train_dataloader()
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler)


def test_the_harness_catches_a_loader_that_cannot_resume_mid_epoch(tmp_path):
    full, resumed, _ = crash_and_resume(
        _model, lambda: PlainLoaderDigits(batch_size=64), lambda: [], max_epochs=2, crash_step=13,
        weights_only=True, tmp_path=tmp_path, limit_val_batches=1, num_sanity_val_steps=0,
    )
    assert _max_diff(full, resumed) > 1e-3  # the resumed run replays the epoch's first batches: not the same


def test_crash_and_resume_refuses_ambiguous_or_missing_crash_points(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        crash_and_resume(_model, FlatDigits, lambda: [], max_epochs=2, tmp_path=tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        crash_and_resume(_model, FlatDigits, lambda: [], max_epochs=2, crash_epoch=1, crash_step=3, tmp_path=tmp_path)


def test_filtered_datamodule_builds_a_resumable_loader():
    from torch.utils.data import DataLoader, TensorDataset
    from lightning.pytorch import LightningDataModule

    from lightning_ext.core.sampling import ResumableDataLoader
    from lightning_ext.curation import RandomScorer
    from lightning_ext.curation.datamodule import FilteredDataModule

    class Bare(LightningDataModule):  # keeps its dataset under no known attribute: the filter builds the loader
        num_classes = 2

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(20, 3), torch.arange(20) % 2), batch_size=4)

    dm = FilteredDataModule(Bare(), RandomScorer(seed=0), keep=0.5, cache_dir=None)
    dm.setup("fit")
    assert isinstance(dm.train_dataloader(), ResumableDataLoader)
