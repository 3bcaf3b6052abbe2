"""Issue 15: PipelineTuner(mode="dataloader") leaves the user's DataLoader with the best allocation found (or the
user's own), never with the last exploratory one; its default exploration is sized in epochs."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_ext.pipeline import Allocation
from lightning_ext.pipeline.agents import Agent, DQNAgent
from lightning_ext.pipeline.tuner import PipelineTuner
from tests.test_pipeline_tuner import _model, _trainer

pytest.importorskip("torchdata")


class Scripted(Agent):
    """Proposes fixed allocations in turn; its best is whatever the test says."""

    def __init__(self, space, proposals, best=None):
        super().__init__(space)
        self.proposals, self.best = list(proposals), best

    def act(self, obs):
        self.decisions += 1
        return self.proposals[min(self.decisions, len(self.proposals)) - 1]


def _loader():
    x = torch.randn(128, 8)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32, num_workers=0)


def _fit(tuner, loader, epochs=3):
    _trainer([tuner], max_epochs=epochs).fit(_model(), train_dataloaders=loader)


def test_fit_ends_with_the_best_allocation_not_the_last_exploratory_one():
    tuner = PipelineTuner(agent="hill_climb", mode="dataloader", cpu_budget=2, max_prefetch=3)
    best = Allocation((1,), 3)
    tuner._make_agent = lambda space: Scripted(space, [Allocation((1,), 3), Allocation((2,), 2), Allocation((2,), 1)],
                                               best=best)
    loader = _loader()
    _fit(tuner, loader)
    assert tuner.history[-1]["next"] == {"workers": [2], "prefetch": 1}  # the last exploratory setting
    assert (loader.num_workers, loader.prefetch_factor) == (1, 3)  # restored to the best one
    assert tuner.final_allocation == best


def test_fit_without_a_best_allocation_restores_the_users_settings():
    tuner = PipelineTuner(agent="hill_climb", mode="dataloader", cpu_budget=2, max_prefetch=3)
    tuner._make_agent = lambda space: Scripted(space, [Allocation((2,), 2), Allocation((1,), 1)], best=None)
    loader = _loader()
    _fit(tuner, loader, epochs=2)
    assert (loader.num_workers, loader.prefetch_factor) == (0, None)


def test_fit_interrupted_by_an_error_also_restores():
    from lightning.pytorch import Callback

    class Boom(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("boom")

    tuner = PipelineTuner(agent="hill_climb", mode="dataloader", cpu_budget=2, max_prefetch=3)
    tuner._make_agent = lambda space: Scripted(space, [Allocation((2,), 2)], best=None)
    loader = _loader()
    with pytest.raises(RuntimeError, match="boom"):
        _trainer([tuner, Boom()], max_epochs=3).fit(_model(), train_dataloaders=loader)
    assert (loader.num_workers, loader.prefetch_factor) == (0, None)


def test_real_hill_climber_ends_on_a_measured_allocation_or_the_users():
    tuner = PipelineTuner(agent="hill_climb", mode="dataloader", cpu_budget=2, max_prefetch=3)
    loader = _loader()
    _fit(tuner, loader, epochs=3)
    final = (loader.num_workers, loader.prefetch_factor)
    measured = {(h["workers"][0], h["prefetch"] if h["workers"][0] else None) for h in tuner.history}
    assert final in measured | {(0, None)}


def test_default_exploration_is_sized_in_epochs_in_dataloader_mode():
    from lightning_ext.pipeline.agents import SearchSpace
    from lightning_ext.pipeline.staged import Stage

    space = SearchSpace.for_stages([Stage("workers", None, "process", min_workers=0)], 2, (1, 3), None)
    per_epoch = PipelineTuner(agent="rl", mode="dataloader")._make_agent(space)
    per_window = PipelineTuner(agent="rl", mode="pipeline")._make_agent(space)
    assert isinstance(per_epoch, DQNAgent) and per_epoch._explore_until <= 10 < per_window._explore_until
    assert "epoch" in PipelineTuner.__doc__.split("explore_decisions:")[1].split("\n")[1] + \
        PipelineTuner.__doc__.split("explore_decisions:")[1].split("\n")[2]
    assert PipelineTuner(agent="rl", mode="dataloader", explore_decisions=3)._make_agent(space)._explore_until == 3
