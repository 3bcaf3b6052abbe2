"""Issue 15: ``DistillationModule`` in two gloo processes against one process (no BatchNorm: same tolerance as the
KnowledgeDistillation callback's DDP test), with a learnable feature projector and a weight schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ext.data.digits import DigitsDataModule
from lightning_ext.distillation.losses import LinearWeight
from lightning_ext.distillation.module import DistillationModule
from lightning_ext.testing import fit_ddp_vs_single


def _model() -> DistillationModule:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return DistillationModule(student, teacher, num_classes=10, weight=LinearWeight(0.2, 0.8, steps=10),
                              temperature=3.0, feature_pairs={"2": "2"}, feature_weight=0.5, input_shape=(1, 8, 8),
                              lr=0.01)


def _digits(batch_size: int) -> DigitsDataModule:
    return DigitsDataModule(batch_size=batch_size, drop_last=True)


@pytest.mark.ddp
def test_distillation_module_in_two_processes_matches_one_process(tmp_path):
    single, ddp = fit_ddp_vs_single(_model, _digits, global_batch_size=64, tmp_path=tmp_path, test=True, max_epochs=1)
    assert any(k.startswith("projectors.") for k in single.state_dict), "the projector is part of the module"
    initial = _model().state_dict()
    for name, value in single.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[name], value, atol=1e-5, rtol=1e-5, msg=name)
        if value.is_floating_point():
            assert not torch.equal(value, initial[name]), f"{name} was not trained"
    for key in ("train_loss_epoch", "val_loss"):
        assert single.curve(key), key
        torch.testing.assert_close(torch.tensor(ddp.curve(key)), torch.tensor(single.curve(key)), atol=1e-5, rtol=0)
    for key, value in single.test_metrics.items():
        assert ddp.test_metrics[key] == pytest.approx(value, abs=1e-5), key
