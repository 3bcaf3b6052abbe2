"""``OrderlyDDPSpawn``'s forkserver ranks get what a spawned rank gets: the parent's environment, RNG and unshared
weights (checked in-process on the function a rank runs; the two-process fits are in the ``ddp``-marked tests)."""

import os

import pytest
import torch
from torch import nn

from lightning_ext.core.ddp_spawn import OrderlyDDPSpawn, _call_with_parent_state


def test_forkserver_rank_gets_the_parents_environment_rng_and_keeps_its_local_rank(monkeypatch):
    from lightning.pytorch.strategies.launchers.multiprocessing import _GlobalStateSnapshot

    torch.manual_seed(123)
    snapshot = _GlobalStateSnapshot.capture()
    expected = torch.rand(3)
    parent_env = {"PATH": os.environ.get("PATH", ""), "USER_SETTING": "from-the-test"}
    monkeypatch.setenv("LOCAL_RANK", "1")  # what the launcher set in the rank
    monkeypatch.setenv("ONLY_IN_THE_SERVER", "stale")
    torch.manual_seed(999)  # the fork server's own RNG state
    module = nn.Linear(2, 2)
    shared = module.weight.data  # the storage a rank receives (shared memory under torch's pickling)
    before = shared.clone()

    def rank_function(m):
        with torch.no_grad():
            m.weight.add_(1.0)
        return dict(os.environ), torch.rand(3), m

    env, drawn, returned = _call_with_parent_state(snapshot, parent_env, rank_function, module)
    assert env["USER_SETTING"] == "from-the-test" and env["LOCAL_RANK"] == "1"
    assert "ONLY_IN_THE_SERVER" not in env
    torch.testing.assert_close(drawn, expected)  # the parent's RNG state, not the server's
    torch.testing.assert_close(shared, before)  # the rank trained a copy of the storage, as under spawn on CPU
    torch.testing.assert_close(returned.weight.detach(), before + 1.0)


def test_unknown_start_method_is_one_clear_error():
    with pytest.raises(ValueError, match="start_method must be 'spawn' or 'forkserver', got 'fork'"):
        OrderlyDDPSpawn(start_method="fork")
