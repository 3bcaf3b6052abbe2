"""OneFlow SBP (parallel/): the notation, DTensor placements, plan checks, two gloo processes against the dense
module, and a Lightning fit under ModelParallelStrategy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ext.parallel.module import SBPModule
from lightning_ext.parallel.sbp import SBP, from_placement, parse_sbp, parse_signature, plan_styles, to_placement
from lightning_ext.parallel.sbp_check import compare_with_dense

MLP_PLAN = {"0": "B, S(0) -> S(-1)", "2": "S(-1), S(1) -> B"}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


def test_sbp_notation_round_trips_through_dtensor_placements():
    from torch.distributed.tensor import Partial, Replicate, Shard

    assert to_placement(parse_sbp("S(1)")) == Shard(1) and to_placement(parse_sbp("split(-1)")) == Shard(-1)
    assert to_placement(parse_sbp("broadcast")) == Replicate() and to_placement(parse_sbp("P(sum)")) == Partial("sum")
    for p in (Shard(0), Replicate(), Partial("sum")):
        assert to_placement(from_placement(p)) == p
    assert parse_signature("S(-1), split(1) -> B") == (SBP("split", -1), SBP("split", 1), SBP("broadcast"))
    with pytest.raises(ValueError, match="no SBP"):
        from_placement(Partial("max"))


@pytest.mark.parametrize("plan, match", [
    ({"0": "B, S(1) -> S(-1)"}, "Linear '0' has no signature 'B, S\\(1\\) -> S\\(-1\\)'; supported:"),
    ({"0": "B, S(0) -> P"}, "OneFlow boxes them first: write '-> B'"),
    ({"1": "B, B -> B"}, "'1' is a ReLU; plans cover nn.Linear and nn.Embedding"),
    ({"9": "B, S(0) -> B"}, "9"),
    ({"0": "B, S(0)"}, "'input, weight -> output'"),
    ({"0": "Q, S(0) -> B"}, "'Q' is not an SBP"),
    ({"0": "B, S(0) -> S(-1)", "2": "B, S(1) -> B"}, "'0' outputs S\\(-1\\) but the next planned module '2' expects B"),
    ({}, "non-empty mapping"),
])
def test_bad_plans_are_refused_with_one_line(plan, match):
    with pytest.raises(ValueError, match=match) as info:
        plan_styles(_mlp(), plan)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=match):
        SBPModule(_mlp(), plan)


def test_chain_check_can_be_disabled_for_code_between_modules():
    assert sorted(plan_styles(_mlp(), {"0": "B, S(0) -> B", "2": "B, S(1) -> B"}, check_chain=False)) == ["0", "2"]
    with pytest.raises(ValueError, match="1-D mesh"):
        from lightning_ext.parallel.sbp import apply_sbp_plan

        apply_sbp_plan(_mlp(), type("Mesh", (), {"ndim": 2})(), MLP_PLAN)


PLANS = [
    ("linear_colwise_rowwise", _mlp, MLP_PLAN, (4, 8)),
    ("linear_colwise_gathered", _mlp, {"0": "B, S(0) -> B"}, (4, 8)),
    ("linear_rowwise_broadcast_input", _mlp, {"2": "B, S(1) -> B"}, (4, 8)),
    ("embedding_dim_split", None, {"0": "B, S(1) -> S(-1)", "1": "S(-1), S(1) -> B"}, (4, 3)),
    ("embedding_vocab_split", None, {"0": "B, S(0) -> B"}, (4, 3)),
]


def _emb():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))


@pytest.mark.parametrize("name, make, plan, shape", PLANS, ids=[p[0] for p in PLANS])
def test_two_gloo_processes_match_the_dense_module(name, make, plan, shape):
    model = (make or _emb)()
    torch.manual_seed(1)
    x = torch.randint(0, 10, shape) if make is None else torch.randn(*shape)
    ranks = compare_with_dense(model, plan, x, world_size=2, steps=3, lr=0.1)
    for r in ranks:
        assert r["out"] < 1e-5 and r["grad"] < 1e-5 and r["param"] < 1e-5, r
    first = next(iter(plan))
    weight = f"{first}.weight"
    sig = parse_signature(plan[first])
    assert ranks[0]["placements"][weight] == str((to_placement(sig[1]),))
    full = (make or _emb)().get_submodule(first).weight.shape
    split = sig[1].dim
    assert ranks[0]["local_shapes"][weight][split] == full[split] // 2


FIT_SCRIPT = Path(__file__).resolve().parents[1] / "lightning_ext" / "parallel" / "fit_check.py"


@pytest.mark.slow
def test_lightning_fit_under_model_parallel_strategy_matches_dense(tmp_path):
    out = tmp_path / "fit.json"
    env = dict(os.environ, PYTHONPATH=str(FIT_SCRIPT.parents[2]))
    subprocess.run([sys.executable, str(FIT_SCRIPT), str(out), "--steps", "4"], check=True, env=env, timeout=600,
                   cwd=tmp_path)
    res = json.loads(out.read_text())
    assert res["parallel"] and res["world_size"] == 2 and res["steps"] == 4
    assert res["max_param_diff"] < 1e-5, res
    assert res["sharded_local_shape"] == [8, 8]  # the 16x8 first layer split in two
