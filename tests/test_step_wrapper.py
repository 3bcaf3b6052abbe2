"""core.step_wrapper: stacking, exact restore, stale-wrapper removal, loss extraction."""

import pytest
import torch
from lightning.pytorch import LightningModule

from lightning_ext.core.step_wrapper import loss_of, unwrap_training_step, with_loss, wrap_training_step, wrapped_by


class M(LightningModule):
    def training_step(self, batch, batch_idx):
        return {"loss": torch.tensor(1.0), "extra": 7}


def _add(k):
    return lambda step, args, kwargs: with_loss(out := step(*args, **kwargs), loss_of(out, None, "t") + k)


def test_stacked_wrappers_restore_exactly():
    m, a, b = M(), object(), object()
    wrap_training_step(m, a, _add(1))
    wrap_training_step(m, b, _add(10))
    out = m.training_step(None, 0)
    assert float(out["loss"]) == 12.0 and out["extra"] == 7
    assert not unwrap_training_step(m, a)  # not outermost: left in place
    assert unwrap_training_step(m, b) and wrapped_by(m) is a
    assert float(m.training_step(None, 0)["loss"]) == 2.0
    assert unwrap_training_step(m, a) and "training_step" not in vars(m)


def test_user_instance_attribute_is_restored():
    m = M()
    own = lambda batch, batch_idx: torch.tensor(5.0)  # noqa: E731
    m.training_step = own
    wrap_training_step(m, "x", _add(1))
    assert float(m.training_step(None, 0)) == 6.0
    unwrap_training_step(m, "x")
    assert vars(m)["training_step"] is own


def test_stale_wrappers_are_dropped_from_the_top_only():
    m = M()
    wrap_training_step(m, "stale-inner", _add(1))
    wrap_training_step(m, "keep", _add(100))
    wrap_training_step(m, "stale-outer", _add(10))
    wrap_training_step(m, "new", _add(1000), drop_stale=lambda o: o.startswith("stale"))
    # the outer stale wrapper goes; the walk stops at "keep", so the inner one (under it) stays
    assert float(m.training_step(None, 0)["loss"]) == 1.0 + 1 + 100 + 1000


def test_loss_of_rejects_other_outputs():
    assert loss_of(None, M(), "X") is None
    with pytest.raises(TypeError, match="returned list; X needs the loss"):
        loss_of([1], M(), "X")
