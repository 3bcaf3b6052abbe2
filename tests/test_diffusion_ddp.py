"""DiT-MoE under DDP: two gloo processes against one process on the same global batches (``fit_ddp_vs_single``).

What must match: ExpertRoutingStats' assignment counts (by timestep bucket, class and position, per MoE layer)
summed over the two ranks equal one process's counts over the same validation images; the routing metrics logged
from them; the held-out loss; and the weights after training, which checks SparseMoE's load-balancing statistics
(the expert shares f_i of the balance loss must be those of the global batch, as in one process).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from lightning_ext.data.digits import DigitsDataModule  # noqa: E402
from lightning_ext.diffusion.dit_moe import DiTMoE  # noqa: E402
from lightning_ext.diffusion.module import DiffusionModule  # noqa: E402
from lightning_ext.diffusion.routing_stats import ExpertRoutingStats  # noqa: E402
from lightning_ext.testing import fit_ddp_vs_single  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

GLOBAL_BATCH = 16  # the digits validation split (144 images) is 9 global batches: no rank pads or drops one


class SavedRoutingStats(ExpertRoutingStats):
    """ExpertRoutingStats that also saves its cross-rank counts (rank 0, after the reduction) under the run's log
    dir, so the spawned run's counts can be read back by the test."""

    def on_validation_epoch_end(self, trainer, pl_module):
        super().on_validation_epoch_end(trainer, pl_module)
        if trainer.sanity_checking:
            return
        folder = Path(trainer.log_dir)  # a broadcast under DDP: every rank asks
        if trainer.is_global_zero:
            torch.save({key: [t.clone() for t in tables] for key, tables in self.counts.items()},
                       folder / f"routing_counts_epoch{trainer.current_epoch}.pt")


def _model():
    torch.manual_seed(0)
    net = DiTMoE(input_size=8, patch_size=2, hidden_size=16, depth=2, num_heads=2, num_classes=10, num_experts=4,
                 top_k=2)
    return DiffusionModule(net, num_classes=10, num_train_timesteps=100, lr=3e-3, seed=1,
                           sample_images_every_n_epochs=0)


@pytest.mark.slow
def test_routing_counts_and_balance_statistics_over_two_ranks_equal_one_process(tmp_path):
    single, ddp = fit_ddp_vs_single(
        _model, lambda b: DigitsDataModule(batch_size=b), GLOBAL_BATCH, tmp_path, test=False, max_epochs=1,
        limit_train_batches=4, num_sanity_val_steps=0,
        callbacks=[SavedRoutingStats(timestep_bins=5, plot_every_n_epochs=0)])
    for epoch in (0,):
        one = torch.load(tmp_path / "single" / f"routing_counts_epoch{epoch}.pt", weights_only=True)
        two = torch.load(tmp_path / "ddp" / f"routing_counts_epoch{epoch}.pt", weights_only=True)
        assert one.keys() == two.keys() == {"timestep", "class", "position"}
        for key in one:
            for layer, (a, b) in enumerate(zip(one[key], two[key])):
                # every validation image once: 144 images x 16 tokens x top-2, in every table
                assert int(a.sum()) == 144 * 16 * 2, (key, layer)
                assert torch.equal(a, b), f"epoch {epoch}, {key} counts of MoE layer {layer} differ"
    names = [k for k in single.final_metrics if k.startswith("routing/")]
    assert len(names) == 2 * 5  # 3 mutual informations, load CV and min share for each of the 2 MoE layers
    for name in [*names, "val_loss"]:
        assert ddp.final_metrics[name] == pytest.approx(single.final_metrics[name], abs=1e-5), name
    # 4 optimiser steps with the balance loss (alpha 0.01): equal weights need the global expert shares f_i
    for name, value in single.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[name], value, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
