"""Latency-aware pruning plans (issue 18): the measured table, its cache, and plans that meet a budget.

Timing on a shared CI machine is noise, so most tests replace the clock by a deterministic cost of the pruned
model's shapes (``latency_fn`` or a patched ``measure_latency``); one test runs the real clock loosely.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")

from lightning_ext.compression import latency_pruning as lp  # noqa: E402
from lightning_ext.compression import PruningError, apply_pruning_history, count_macs_params  # noqa: E402
from lightning_ext.compression.l1_filter_pruning import l1_filter_scores  # noqa: E402


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(48, 5))


class _Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 24, 3, padding=1)
        self.b = nn.Conv2d(24, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.b(torch.relu(self.a(h)))
        h = torch.relu(self.dw(h))
        return self.head(h.mean((2, 3)))


X = torch.randn(4, 3, 12, 12)


def macs_cost(model, inputs):
    """A deterministic 'latency': MACs, plus a penalty for widths that are not multiples of 16 (a staircase)."""
    macs = count_macs_params(model, inputs)[0]
    odd = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels % 16)
    return macs * 1e-9 * (1 + 0.6 * odd)


def test_table_measures_each_group_on_its_grid_and_predicts_additively():
    net = _net()
    table = lp.build_latency_table(net, X, step=8, cache_dir=None, progress=False, latency_fn=macs_cost)
    assert table.widths == {"0": [8, 16, 24, 32], "3": [8, 16, 24, 32], "6": [8, 16, 24, 32, 40, 48]}
    assert table.seconds["0"][-1] == table.dense_s == pytest.approx(macs_cost(net, X))
    # the staircase: 24 channels (not a multiple of 16) is slower than 32, so it is never a planned width
    assert table.seconds["3"][2] > table.seconds["3"][3]
    assert table.fast_widths("3") == [8, 16, 32]
    # additive prediction equals the measurement when only one group changes
    only = lp.LatencyTable.from_dict(table.to_dict())
    assert only.predict({"0": 16, "3": 32, "6": 48}) == pytest.approx(table.seconds["0"][1])


def test_plan_meets_the_budget_with_fast_widths_and_applies():
    net = _net()
    scores = l1_filter_scores(net)
    table = lp.build_latency_table(net, X, step=8, cache_dir=None, progress=False, latency_fn=macs_cost)
    plan = lp.plan_latency_pruning(net, X, scores, speedup=2.0, table=table, latency_fn=macs_cost)
    assert plan.measured_s <= plan.budget_s * 1.02
    assert plan.speedup >= 2.0 / 1.02
    for root, (_, kept) in plan.channels.items():
        assert kept in table.fast_widths(root)
    assert plan.macs_after < plan.macs_before
    pruned = apply_pruning_history(_net(), plan.ops, X)
    assert macs_cost(pruned, X) == pytest.approx(plan.measured_s)
    assert pruned(X).shape == (4, 5)
    # the lowest-L1 filters went
    removed = {op[0]: op[2] for op in plan.ops}
    for root, idxs in removed.items():
        s = scores[root]
        assert s[idxs].max() <= s[[i for i in range(len(s)) if i not in idxs]].min() + 1e-6


def test_importance_decides_between_groups_that_save_the_same_time():
    net = _net()
    table = lp.build_latency_table(net, X, step=8, cache_dir=None, progress=False, latency_fn=macs_cost)
    flat = {k: torch.ones_like(v) for k, v in l1_filter_scores(net).items()}
    skewed = dict(flat, **{"3": torch.cat([torch.full((16,), 0.01), torch.full((16,), 10.0)])})
    plan = lp.plan_latency_pruning(net, X, skewed, speedup=1.3, table=table, latency_fn=macs_cost)
    assert plan.channels["3"][1] == 16  # the 16 near-zero filters are the cheapest importance to lose


def test_measurement_corrects_the_additive_prediction():
    net = _net()
    calls = []

    def interacting(model, inputs):  # narrowing two neighbours saves less than the sum: additive is optimistic
        w = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
        calls.append(w)
        return 1e-3 * (1 + sum(w) / 112) ** 2 / 4 + 1e-3 * 0.5 * (w[0] * w[1] / 1024)

    table = lp.build_latency_table(net, X, step=8, cache_dir=None, progress=False, latency_fn=interacting)
    plan = lp.plan_latency_pruning(net, X, l1_filter_scores(net), speedup=1.8, table=table, latency_fn=interacting)
    assert plan.measured_s <= plan.budget_s * 1.02
    measured = {i: m for i, _, m in plan.history}
    guess = next(i for i, p, _ in plan.history[1:])  # where the additive table predicted the crossing
    assert measured[guess] > plan.budget_s * 1.02  # ... optimistic: that plan missed the budget
    assert plan.position > guess and plan.position < plan.path_length - 1
    # no overshoot: the plan one step earlier on the path was measured over the budget
    assert measured[plan.position - 1] > plan.budget_s * 1.02


def test_unreachable_budget_names_the_lowest_reachable_latency():
    net = _net()
    table = lp.build_latency_table(net, X, step=8, cache_dir=None, progress=False, latency_fn=macs_cost)
    with pytest.raises(PruningError, match=r"cannot be reached.*at least [0-9.]+ ms"):
        lp.plan_latency_pruning(net, X, l1_filter_scores(net), speedup=100.0, table=table, latency_fn=macs_cost)
    with pytest.raises(ValueError, match="exactly one"):
        lp.plan_latency_pruning(net, X, l1_filter_scores(net), table=table)
    with pytest.raises(ValueError, match="finite number > 1"):
        lp.plan_latency_pruning(net, X, l1_filter_scores(net), speedup=float("nan"), table=table)


def test_widths_a_noisy_table_calls_slow_are_tried_before_refusing():
    """A table measured under load can find a narrow width slower than the dense one (noise): it is then not a
    "fast width", but when the fast widths cannot meet the budget the plan goes on through every measured width and
    lets the measurement of the whole plan decide, instead of refusing a budget the model can reach."""
    net = _net()
    table = lp.build_latency_table(net, X, step=8, cache_dir=None, progress=False, latency_fn=macs_cost)
    noisy = lp.LatencyTable.from_dict(table.to_dict())
    for root in noisy.seconds:  # every narrower width of every group "measured" 10% slower than dense
        noisy.seconds[root] = [noisy.dense_s * 1.1] * (len(noisy.seconds[root]) - 1) + [noisy.dense_s]
    assert all(noisy.fast_widths(r) == [noisy.channels[r]] for r in noisy.channels)
    plan = lp.plan_latency_pruning(net, X, l1_filter_scores(net), speedup=2.0, table=noisy, latency_fn=macs_cost)
    assert plan.measured_s <= plan.budget_s * 1.02 and plan.macs_after < plan.macs_before
    with pytest.raises(PruningError, match="cannot be reached"):  # still refused when truly out of reach
        lp.plan_latency_pruning(net, X, l1_filter_scores(net), speedup=100.0, table=noisy, latency_fn=macs_cost)


def test_residual_and_depthwise_groups_plan_and_replay():
    net = _Res()
    table = lp.build_latency_table(net, X, step=8, cache_dir=None, progress=False, latency_fn=macs_cost)
    assert len(table.widths) == 2 and "a" in table.widths  # stem, b and dw share the residual group; a its own
    residual = next(r for r in table.widths if r != "a")
    assert table.channels[residual] == 16
    plan = lp.plan_latency_pruning(net, X, l1_filter_scores(net), speedup=1.5, table=table, latency_fn=macs_cost)
    pruned = apply_pruning_history(_Res(), plan.ops, X)
    assert pruned.dw.in_channels == pruned.dw.out_channels == pruned.stem.out_channels == plan.channels[residual][1]
    assert pruned.b.out_channels == plan.channels[residual][1] and pruned.a.out_channels == plan.channels["a"][1]
    assert pruned(X).shape == (4, 3)


def test_table_is_cached_keyed_by_device_and_shape_and_validated(tmp_path, monkeypatch):
    count = {"n": 0}

    def fake(model, inputs, warmup=0, repeats=1, num_threads=None):
        count["n"] += 1
        return macs_cost(model, inputs)

    monkeypatch.setattr(lp, "measure_latency", fake)
    net = _net()
    first = lp.build_latency_table(net, X, step=8, cache_dir=tmp_path, progress=False)
    n = count["n"]
    assert n == 1 + 3 + 3 + 5 + 1 and len(list(tmp_path.glob("*.json"))) == 1
    again = lp.build_latency_table(net, X, step=8, cache_dir=tmp_path, progress=False)
    assert count["n"] == n and again == first  # read, not measured
    assert "cpu:" in first.key["device"] and first.key["inputs"] == [[4, 3, 12, 12], "torch.float32"]
    # another batch size is another table
    lp.build_latency_table(net, X[:2], step=8, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.json"))) == 2
    # a corrupted cache file is measured again, with a warning, and rewritten
    path = next(p for p in tmp_path.glob("*.json") if json.loads(p.read_text())["key"]["inputs"][0][0] == 4)
    data = json.loads(path.read_text())
    data["seconds"]["0"][0] = -1.0
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="Ignoring the cached latency table"):
        rebuilt = lp.build_latency_table(net, X, step=8, cache_dir=tmp_path, progress=False)
    assert rebuilt == first and json.loads(path.read_text())["seconds"]["0"][0] > 0
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="Ignoring"):
        lp.build_latency_table(net, X, step=8, cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_non_finite_measurement_is_refused():
    with pytest.raises(ValueError, match="finite"):
        lp.build_latency_table(_net(), X, step=8, cache_dir=None, progress=False,
                               latency_fn=lambda m, x: float("nan"))


def test_from_dict_refuses_malformed_tables():
    good = lp.build_latency_table(_net(), X, step=16, cache_dir=None, progress=False,
                                  latency_fn=macs_cost).to_dict()
    for mutate, words in [(lambda d: d.pop("widths"), "not a latency table"),
                          (lambda d: d["widths"].__setitem__("0", [32, 16]), "ascending"),
                          (lambda d: d.__setitem__("dense_s", math.inf), "finite"),
                          (lambda d: d["seconds"].pop("3"), "different groups")]:
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(ValueError, match=words):
            lp.LatencyTable.from_dict(bad)


def test_wall_clock_table_and_plan_on_this_cpu():
    """The real clock runs end to end (mechanics only: speed is timing, which lives in benchmarks/compress.py)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2))
    x = torch.randn(16, 3, 32, 32)
    table = lp.build_latency_table(net, x, step=16, repeats=3, num_threads=1, cache_dir=None, progress=True)
    assert table.key["device"].endswith(":1 threads") and table.widths["2"] == [16, 32, 48, 64]
    assert all(t > 0 for ts in table.seconds.values() for t in ts)
    plan = lp.plan_latency_pruning(net, x, l1_filter_scores(net), speedup=1.1, table=table, repeats=3,
                                   num_threads=1, tolerance=10.0)  # any measured plan passes: no timing assert
    assert plan.position >= 1 and plan.macs_after < plan.macs_before and plan.measured_s > 0


class _FakeCudaTensor:
    """Stands in for a CUDA tensor where only the device checks look (no GPU on the CI machines)."""

    is_cuda = True
    device = torch.device("cuda", 0)


def test_cuda_inputs_key_the_table_by_gpu_name_and_cache_apart_from_cpu(tmp_path, monkeypatch):
    """The CUDA branch of the device key, exercised on CPU: a CUDA batch names the GPU (not the CPU and threads),
    so a table measured on a GPU is cached under another file than the CPU one and never read for it."""
    net = _net()
    cpu_key = lp.table_key(net, X, 8, 12)
    monkeypatch.setattr(lp, "_first_tensor", lambda inputs: _FakeCudaTensor())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert lp.device_name(X) == "cuda:NVIDIA H100 80GB HBM3"
    cuda_key = lp.table_key(net, X, 8, 12)
    assert cuda_key["device"] == "cuda:NVIDIA H100 80GB HBM3" and cpu_key["device"].startswith("cpu:")
    assert {k: v for k, v in cuda_key.items() if k != "device"} == {k: v for k, v in cpu_key.items() if k != "device"}
    assert lp._key_digest(cuda_key) != lp._key_digest(cpu_key)
    gpu_table = lp.build_latency_table(net, X, step=16, cache_dir=tmp_path, progress=False, repeats=1)
    assert gpu_table.key["device"].startswith("cuda:") and len(list(tmp_path.glob("*.json"))) == 1
    monkeypatch.undo()  # back on the CPU: the GPU's cached table is not this device's; a second file is measured
    cpu_table = lp.build_latency_table(net, X, step=16, cache_dir=tmp_path, progress=False, repeats=1)
    assert cpu_table.key["device"].startswith("cpu:") and len(list(tmp_path.glob("*.json"))) == 2


def test_cuda_latency_synchronises_around_every_timed_pass(monkeypatch):
    """measure_latency on CUDA inputs waits for the device before and after each pass (kernels are asynchronous:
    without it the clock would time the launch only), on the inputs' device; on CPU it never synchronises."""
    from lightning_ext.core import measure

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    measure.measure_latency(_net(), X, warmup=1, repeats=3)
    assert calls == []
    monkeypatch.setattr(measure, "_first_tensor", lambda inputs: _FakeCudaTensor())
    assert measure.measure_latency(_net(), X, warmup=1, repeats=3) > 0
    assert calls == [torch.device("cuda", 0)] * (2 * (1 + 3))
