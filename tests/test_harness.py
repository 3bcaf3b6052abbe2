"""The test harness itself: the network guard, and that crash_and_resume can catch a broken resume."""

import socket
import subprocess
import sys

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from lightning_ext.datamodules import DigitsDataModule
from lightning_ext.modules import ImageClassifier
from lightning_ext.testing import NetworkBlockedError, assert_same_parameters, crash_and_resume


def test_outbound_connections_and_lookups_are_blocked():
    with pytest.raises(NetworkBlockedError):
        socket.create_connection(("93.184.216.34", 80), timeout=1)
    with pytest.raises(NetworkBlockedError):
        socket.getaddrinfo("pypi.org", 443)


def test_loopback_stays_open():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=1)
    client.close(), server.close()


def test_child_python_processes_are_blocked_too():
    code = "import socket; socket.create_connection(('93.184.216.34', 80), timeout=1)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0 and "NetworkBlockedError" in res.stderr


# -- crash and resume ---------------------------------------------------------------------------------------


def _make_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return ImageClassifier(net, num_classes=10, image_size=8, lr=0.01,
                           scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))


def _make_dm():
    return DigitsDataModule(batch_size=64)


class HalveLROnce(Callback):
    """Halves the LR at the start of the third epoch it sees: stateful, and deliberately saves no state."""

    def __init__(self):
        self.epochs_seen = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs_seen += 1
        if self.epochs_seen == 3:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] *= 0.5


class HalveLROnceWithState(HalveLROnce):
    def state_dict(self):
        return {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, state):
        self.epochs_seen = state["epochs_seen"]


def test_resume_of_a_plain_fit_matches_the_uninterrupted_run(tmp_path):
    full, resumed, info = crash_and_resume(_make_model, _make_dm, lambda: [], max_epochs=4, crash_epoch=2,
                                           tmp_path=tmp_path)
    assert info["resumed_trainer"].current_epoch == 4
    assert_same_parameters(full, resumed)


def test_crash_and_resume_catches_a_callback_that_forgets_its_state(tmp_path):
    full, resumed, _ = crash_and_resume(_make_model, _make_dm, lambda: [HalveLROnce()], max_epochs=4,
                                        crash_epoch=2, tmp_path=tmp_path / "forgetful")
    with pytest.raises(AssertionError):
        assert_same_parameters(full, resumed)
    full, resumed, _ = crash_and_resume(_make_model, _make_dm, lambda: [HalveLROnceWithState()], max_epochs=4,
                                        crash_epoch=2, tmp_path=tmp_path / "stateful")
    assert_same_parameters(full, resumed)


def test_assert_same_parameters_reports_shape_and_key_differences():
    with pytest.raises(AssertionError, match="shape"):
        assert_same_parameters(nn.Linear(3, 2), nn.Linear(4, 2))
    with pytest.raises(AssertionError, match="keys"):
        assert_same_parameters(nn.Linear(3, 2), nn.Linear(3, 2, bias=False))
