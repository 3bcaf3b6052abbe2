"""Two CPU processes (gloo, ddp_spawn) give the same training as one process with the same global batch."""

import pytest
import torch
from torch import nn

from lightning_ext.datamodules import DigitsDataModule
from lightning_ext.modules import ImageClassifier
from lightning_ext.testing import fit_ddp_vs_single

pytestmark = pytest.mark.ddp


def _mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return ImageClassifier(net, num_classes=10, image_size=8, lr=0.01)


def _bn_cnn():
    """A small CNN with two BatchNorms: the batch-dependent layers are what this test is about, and a ResNet-18
    (122 s, the suite's slowest test) adds nothing to them."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    return ImageClassifier(net, num_classes=10, image_size=8, lr=0.01)


def _digits(batch_size):
    return DigitsDataModule(batch_size=batch_size, drop_last=True)


def test_ddp_matches_single_process_exactly_without_batchnorm(tmp_path):
    """No batch-dependent layers: the two runs must agree to float precision (1e-5) in every number."""
    single, ddp = fit_ddp_vs_single(_mlp, _digits, global_batch_size=64, tmp_path=tmp_path, max_epochs=2)
    for key in ("train_loss_epoch", "val_loss", "val_acc"):
        assert len(single.curve(key)) == 2
        torch.testing.assert_close(torch.tensor(ddp.curve(key)), torch.tensor(single.curve(key)), atol=1e-5, rtol=0)
    for name, value in single.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[name], value, atol=1e-5, rtol=1e-5)
    assert ddp.test_metrics["test_acc"] == pytest.approx(single.test_metrics["test_acc"], abs=1e-6)


@pytest.mark.slow
def test_ddp_fit_of_image_classifier_on_digits_matches_single_process(tmp_path):
    """A CNN with BatchNorm: each rank normalises its half batch, so runs differ slightly.

    Stated tolerance: per-epoch mean training loss within 0.05 (absolute) of the one-process run and final
    test accuracy within 0.03.
    """
    # 6 epochs: at 3 the small CNN's test accuracy is still climbing steeply and the per-rank BN difference moved it
    # by 0.031 (0.967 vs 0.936); near its plateau the runs agree within 0.011 at 1 and 2 threads
    single, ddp = fit_ddp_vs_single(_bn_cnn, _digits, global_batch_size=64, tmp_path=tmp_path, max_epochs=6)
    s_loss, d_loss = single.curve("train_loss_epoch"), ddp.curve("train_loss_epoch")
    assert len(s_loss) == len(d_loss) == 6
    assert s_loss[-1] < s_loss[0]  # it trained
    assert max(abs(a - b) for a, b in zip(s_loss, d_loss)) < 0.05, (s_loss, d_loss)
    assert single.test_metrics["test_acc"] > 0.9
    assert abs(single.test_metrics["test_acc"] - ddp.test_metrics["test_acc"]) < 0.03, (
        single.test_metrics, ddp.test_metrics)
