"""Fit :class:`SBPModule` under Lightning's ``ModelParallelStrategy`` on two CPU processes (gloo) and compare the
trained parameters with a dense single-process SGD run on the same batches.

Run as a script (Lightning relaunches the script for rank 1)::

    python lightning_ext/parallel/fit_check.py out.json --steps 4

Writes ``{"parallel", "world_size", "steps", "max_param_diff", "sharded_local_shape", "losses"}`` from rank 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

PLAN = {"0": "B, S(0) -> S(-1)", "2": "S(-1), S(1) -> B"}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return x, torch.tanh(x @ torch.randn(8, 8, generator=g))


def main() -> None:
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ext.parallel.module import SBPModule

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    model = SBPModule(_net(), PLAN, loss="mse", lr=args.lr)

    class Record(Callback):
        def __init__(self) -> None:
            self.losses, self.batches = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))
            self.batches.append(float(batch[0].sum()))

    record = Record()
    trainer = Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=1,
                                                                                   tensor_parallel_size=2),
                      max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[record],
                      use_distributed_sampler=False)  # the dense reference reads the batches in order
    trainer.fit(model, loader)
    full = model.full_state_dict()  # a collective: every rank
    local = list(model.net[0].weight.to_local().shape) if model.is_parallel else None
    if trainer.global_rank != 0:
        return
    dense = _net()
    opt = torch.optim.SGD(dense.parameters(), lr=args.lr)
    losses, batches = [], []
    epochs = [b for _ in range(-(-args.steps // len(loader))) for b in loader]  # Lightning's epochs, in order
    for step, (xb, yb) in zip(range(args.steps), epochs):
        batches.append(float(xb.sum()))
        loss = nn.functional.mse_loss(dense(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    diff = max(float((full[k] - v).abs().max()) for k, v in dense.state_dict().items())
    Path(args.out).write_text(json.dumps({"parallel": model.is_parallel, "world_size": trainer.world_size,
                                          "steps": int(trainer.global_step), "max_param_diff": diff,
                                          "sharded_local_shape": local, "dense_losses": losses,
                                          "losses": record.losses, "dense_batches": batches,
                                          "batches": record.batches}))


if __name__ == "__main__":
    main()
