"""Check an SBP plan against the dense module: spawned gloo processes, outputs, gradients and SGD steps.

:func:`compare_with_dense` runs the plan on ``world_size`` CPU processes (gloo, a 1-D mesh) and, in each, the dense
module on the same input, and returns the largest differences of outputs, parameter gradients and parameters after
``steps`` SGD steps (DTensors gathered with ``full_tensor``). It is what the tests and ``benchmarks/sbp.py`` run.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_ext.core.distributed import free_port

__all__ = ["compare_cases", "compare_with_dense", "free_port"]


def _full(t: Any) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _compare(mesh: Any, model: nn.Module, plan: dict, x: torch.Tensor, steps: int, lr: float) -> dict:
    from lightning_ext.parallel.sbp import apply_sbp_plan

    dense, tp = copy.deepcopy(model), copy.deepcopy(model)
    apply_sbp_plan(tp, mesh, plan)
    placements = {n: str(p.placements) for n, p in tp.named_parameters() if hasattr(p, "placements")}
    opt_d = torch.optim.SGD(dense.parameters(), lr=lr)
    opt_t = torch.optim.SGD(tp.parameters(), lr=lr, foreach=False)
    res: dict[str, Any] = {"placements": placements, "out": 0.0, "grad": 0.0, "param": 0.0}
    for _ in range(max(steps, 1)):
        out_d, out_t = dense(x), tp(x)
        res["out"] = max(res["out"], float((_full(out_t) - out_d).detach().abs().max()))
        (out_d.square().mean()).backward()
        (_full(out_t).square().mean()).backward()
        for (_, pd), (_, pt) in zip(dense.named_parameters(), tp.named_parameters()):
            res["grad"] = max(res["grad"], float((_full(pt.grad) - pd.grad).abs().max()))
        if steps:
            opt_d.step(), opt_t.step()
        opt_d.zero_grad(), opt_t.zero_grad()
    for (_, pd), (_, pt) in zip(dense.named_parameters(), tp.named_parameters()):
        res["param"] = max(res["param"], float((_full(pt.detach()) - pd.detach()).abs().max()))
    res["local_shapes"] = {n: list(p.to_local().shape) for n, p in tp.named_parameters() if hasattr(p, "to_local")}
    return res


def _boxing(mesh: Any, rank: int) -> dict:
    """OneFlow's boxing P -> B and S(0) -> B as DTensor redistributions, on known values."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    p = DTensor.from_local(torch.ones(2) * (rank + 1), mesh, [Partial()]).redistribute(mesh, [Replicate()])
    s = DTensor.from_local(torch.full((1, 2), float(rank)), mesh, [Shard(0)]).redistribute(mesh, [Replicate()])
    return {"partial_to_broadcast": p.to_local().tolist(), "split_to_broadcast": s.to_local().tolist()}


def _worker(rank: int, world: int, port: int, cases: list, steps: int, lr: float, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = [_compare(mesh, model, plan, x, steps, lr) for model, plan, x in cases]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"cases": results, "boxing": _boxing(mesh, rank)}))
    finally:
        dist.destroy_process_group()


def compare_cases(cases: list, world_size: int = 2, steps: int = 3, lr: float = 0.1) -> list[dict]:
    """:func:`compare_with_dense` for several ``(model, plan, x)`` cases in one group of processes; per rank
    ``{"cases": [...], "boxing": {...}}`` (boxing: ``P -> B`` of ``rank + 1`` and ``S(0) -> B`` of ``rank``)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world_size, free_port(), list(cases), steps, lr, tmp),
                           nprocs=world_size, join=True, start_method="spawn")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world_size)]


def compare_with_dense(model: nn.Module, plan: dict[str, str], x: torch.Tensor, world_size: int = 2, steps: int = 3,
                       lr: float = 0.1) -> list[dict]:
    """Per rank: ``out``/``grad``/``param`` (largest absolute differences to the dense module), the planned
    parameters' DTensor ``placements`` and their ``local_shapes``. The loss is ``mean(output²)``; ``steps`` SGD
    steps (0: one forward/backward, no step)."""
    return [r["cases"][0] for r in compare_cases([(model, plan, x)], world_size, steps, lr)]
