"""Model merging (issue 5): the state-dict core (task vectors, averaging, Task Arithmetic, TIES), AdaMerging's
functional model, the AdaMerging LightningModule, the ModelMerging callback and MultiTaskDataModule."""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import nn

from lightning_ext.merging.callback import ModelMerging
from lightning_ext.datamodules import DigitsDataModule
from lightning_ext.data.base import Arrays
from lightning_ext.merging.multi_task import MultiTaskDataModule, prepare_images
from lightning_ext.merging import (
    AdaMergingHistory,
    AdaMergingModel,
    ArchitectureMismatchError,
    ForeignBaseError,
    apply_coefficients,
    base_distance,
    check_same_architecture,
    diagnose_agreement,
    diagnose_collapse,
    disjoint_merge,
    elect_sign,
    entropy_loss,
    finetuned_agreement,
    fit_ada_merging,
    load_coefficients,
    measure_peak_memory,
    plot_coefficients,
    prediction_agreement,
    read_state_dict,
    save_coefficients,
    simple_average,
    task_arithmetic_merge,
    task_vector,
    ties_merging_merge,
    trim_top_k,
)
from lightning_ext.merging.ada_merging import layer_rows
from lightning_ext.merging.ties_merging import ties_selected_task_vectors
from lightning_ext.modules import AdaMerging, ImageClassifier
from lightning_ext.testing import assert_same_parameters, crash_and_resume

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
             accelerator="cpu", devices=1)
REPO = Path(__file__).resolve().parents[1]


# -- tiny models and tasks ------------------------------------------------------------------------------------------


def _net(seed: int = 0, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, classes))


HEAD = ["4"]  # the last Linear of _net


class InvertedDigits(DigitsDataModule):
    """A second input domain for tests: digits with inverted pixels."""

    def load_arrays(self) -> Arrays:
        a = super().load_arrays()
        return Arrays(1.0 - a.x, a.y)


def _digits_arrays(invert: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dm = InvertedDigits() if invert else DigitsDataModule()
    dm.setup()
    return dm.train_set.tensors


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, params=None) -> nn.Module:
    opt = torch.optim.Adam(params if params is not None else net.parameters(), lr=lr)
    net.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A "pretrained" MLP (digits, both domains), and two task models: the body fine-tuned per domain with the head
    frozen after a linear probe on the pretrained body (the AdaMerging protocol). Saved as state dicts."""
    root = tmp_path_factory.mktemp("zoo")
    (x0, y0), (x1, y1) = _digits_arrays(False), _digits_arrays(True)
    base = _train(_net(0), torch.cat([x0, x1]), torch.cat([y0, y1]), steps=150, lr=3e-3)
    torch.save(base.state_dict(), root / "base.pt")
    paths = []
    for i, (x, y) in enumerate([(x0, y0), (x1, y1)]):
        model = copy.deepcopy(base)
        head = model[4]
        head.reset_parameters()
        body = [p for n, p in model.named_parameters() if not n.startswith("4.")]
        for p in body:
            p.requires_grad_(False)
        _train(model, x, y, steps=60, lr=1e-2, params=head.parameters())  # linear probe on the pretrained body
        for p in body:
            p.requires_grad_(True)
        head.requires_grad_(False)
        _train(model, x, y, steps=60, lr=1e-3, params=body)  # fine-tune the body, head frozen
        paths.append(root / f"task{i}.pt")
        torch.save(model.state_dict(), paths[-1])
    return {"root": root, "base": root / "base.pt", "tasks": paths}


def _sd(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


# -- task vectors, checks ---------------------------------------------------------------------------------------------


def test_task_arithmetic_with_lambda_one_and_one_task_returns_the_finetuned_weights(zoo):
    base, ft = _sd(zoo["base"]), _sd(zoo["tasks"][0])
    merged = task_arithmetic_merge(base, [ft], scaling=1.0, ignored_layers=HEAD)
    assert not any(k.startswith("4.") for k in merged), "heads are not merged"
    for k, v in merged.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, ft[k], atol=1e-6, rtol=0)
        else:
            assert torch.equal(v, base[k])  # num_batches_tracked comes from the base


def test_task_arithmetic_streams_paths_and_takes_per_task_coefficients(zoo):
    base = _sd(zoo["base"])
    fts = [_sd(p) for p in zoo["tasks"]]
    from_paths = task_arithmetic_merge(base, zoo["tasks"], scaling=[0.2, 0.7], ignored_layers=HEAD)
    tvs = [task_vector(base, ft, HEAD) for ft in fts]
    for k, tv0 in tvs[0].items():
        torch.testing.assert_close(from_paths[k], base[k] + 0.2 * tv0 + 0.7 * tvs[1][k], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="2 scaling coefficients for 3 models"):
        task_arithmetic_merge(base, zoo["tasks"] + zoo["tasks"][:1], scaling=[0.1, 0.2], ignored_layers=HEAD)
    with pytest.raises(ValueError, match="No fine-tuned models"):
        task_arithmetic_merge(base, [], ignored_layers=HEAD)


def test_simple_average_is_task_arithmetic_with_one_over_n(zoo):
    base = _sd(zoo["base"])
    avg = simple_average(zoo["tasks"], ignored_layers=HEAD, base=base)
    ta = task_arithmetic_merge(base, zoo["tasks"], scaling=0.5, ignored_layers=HEAD)
    assert avg.keys() == ta.keys()
    for k in avg:
        torch.testing.assert_close(avg[k], ta[k], atol=1e-6, rtol=0)


def test_ties_steps_on_hand_made_vectors():
    # trim keeps the top 50% magnitudes per task vector, over all its tensors together
    assert trim_top_k(torch.tensor([3.0, -1.0, 0.5, -2.0]), 0.5).tolist() == [3.0, 0.0, 0.0, -2.0]
    assert trim_top_k(torch.tensor([0.1, -0.4, 0.2, 0.3]), 0.25).tolist() == pytest.approx([0.0, -0.4, 0.0, 0.0])
    assert trim_top_k(torch.tensor([1.0, -2.0]), 1.0).tolist() == [1.0, -2.0]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        trim_top_k(torch.ones(3), 20)
    # sign election by mass, zeros to the majority sign
    assert elect_sign(torch.tensor([3.0, 2.0, 0.0, -6.0])).tolist() == [1, 1, 1, -1]
    assert elect_sign(torch.tensor([-1.0, -2.0, 0.0])).tolist() == [-1, -1, -1]
    # disjoint mean: only non-zero entries agreeing with the elected sign count
    trimmed = torch.tensor([[3.0, 0.0, 0.0, -2.0], [-1.0, 2.0, 0.0, -4.0], [-1.0, 0.0, 0.0, 0.0]])
    sign = elect_sign(trimmed.sum(0))
    assert disjoint_merge(trimmed, sign).tolist() == [3.0, 2.0, 0.0, -3.0]
    assert disjoint_merge(trimmed, sign, "sum").tolist() == [3.0, 2.0, 0.0, -6.0]


def test_ties_merge_matches_the_hand_computed_result():
    base = {"a": torch.zeros(2), "b": torch.zeros(2), "head": torch.zeros(3), "n": torch.tensor(5)}
    fts = [
        {"a": torch.tensor([3.0, -1.0]), "b": torch.tensor([0.5, -2.0]), "head": torch.ones(3), "n": torch.tensor(9)},
        {"a": torch.tensor([-1.0, 2.0]), "b": torch.tensor([-0.2, -4.0]), "head": torch.ones(3), "n": torch.tensor(9)},
        {"a": torch.tensor([-1.0, 0.1]), "b": torch.tensor([0.0, 0.05]), "head": torch.ones(3), "n": torch.tensor(9)},
    ]
    # trim (density=0.5 over the 4 shared entries): [3,0,0,-2], [0,2,0,-4], [-1,0.1,0,0]
    # mass [2, 2.1, 0, -6] -> sign [+,+,+(majority),-]; agreeing means: [3, (2+0.1)/2, 0, -3]
    merged = ties_merging_merge(base, fts, density=0.5, scaling=2.0, ignored_layers=["head"], on_foreign_base="ignore")
    assert set(merged) == {"a", "b", "n"}
    torch.testing.assert_close(merged["a"], torch.tensor([6.0, 2.1]))
    torch.testing.assert_close(merged["b"], torch.tensor([0.0, -6.0]))
    assert int(merged["n"]) == 5
    summed = ties_merging_merge(base, fts, density=0.5, scaling=1.0, merge="sum", ignored_layers=["head"], on_foreign_base="ignore")
    torch.testing.assert_close(summed["a"], torch.tensor([3.0, 2.1]))
    # AdaMerging++'s per-task selected vectors: trimmed and sign-agreeing entries only
    selected = [tv for _, tv, _ in ties_selected_task_vectors(base, fts, 0.5, ["head"], on_foreign_base="ignore")]
    assert selected[2]["a"].tolist() == pytest.approx([0.0, 0.1])  # -1 disagrees with the elected +


def test_mismatched_architecture_is_refused_naming_the_key_and_shapes(zoo):
    base = _sd(zoo["base"])
    other = _net(3, classes=10)
    other[1] = nn.Linear(64, 16)
    with pytest.raises(ArchitectureMismatchError, match=r"'1\.weight' has shape \(16, 64\) in .* but \(32, 64\)"):
        task_arithmetic_merge(base, [other.state_dict()], ignored_layers=HEAD)
    missing = {k: v for k, v in base.items() if k != "2.running_var"}
    with pytest.raises(ArchitectureMismatchError, match=r"'2\.running_var' \(shape \(32,\) .*\) is missing"):
        check_same_architecture(base, missing)
    extra = {**base, "5.weight": torch.zeros(2)}
    with pytest.raises(ArchitectureMismatchError, match=r"'5\.weight' \(shape \(2,\)\) is in the model but not"):
        check_same_architecture(base, extra)
    # a head for another number of classes is fine when it is listed in ignored_layers, refused otherwise
    four_classes = copy.deepcopy(_sd(zoo["tasks"][0]))
    four_classes["4.weight"], four_classes["4.bias"] = torch.zeros(4, 32), torch.zeros(4)
    task_arithmetic_merge(base, [four_classes], ignored_layers=HEAD)
    with pytest.raises(ArchitectureMismatchError, match="ignored_layers"):
        task_arithmetic_merge(base, [four_classes])


def test_a_model_from_another_base_is_refused_or_warned(zoo):
    base = _sd(zoo["base"])
    body = [k for k in base if not k.startswith("4.")]
    assert base_distance(base, _sd(zoo["tasks"][0]), body).ratio < 0.25  # real fine-tuning: well inside 0.5
    foreign = _net(7).state_dict()  # another random initialisation
    with pytest.raises(ForeignBaseError, match=r"far from the base model: .* = 1\.\d+ .*max_task_vector_ratio=0\.5"):
        task_arithmetic_merge(base, [zoo["tasks"][0], foreign], ignored_layers=HEAD, names=["t0", "t_foreign"])
    with pytest.warns(UserWarning, match="far from the base"):
        ties_merging_merge(base, [foreign], ignored_layers=HEAD, on_foreign_base="warn")
    with pytest.raises(ForeignBaseError):
        simple_average([zoo["tasks"][0], foreign], ignored_layers=HEAD, base=base)


def test_read_state_dict_uses_weights_only_and_unwraps_lightning_checkpoints(tmp_path):
    state = {"w": torch.ones(2)}
    torch.save({"state_dict": {"net.w": torch.ones(2)}, "epoch": 3}, tmp_path / "x.ckpt")
    assert read_state_dict(tmp_path / "x.ckpt", reference_keys=["w"]).keys() == {"w"}
    torch.save({"model": state, "note": object.__new__(Arrays)}, tmp_path / "unsafe.pt")  # a pickled class
    with pytest.raises(ValueError, match="weights_only=True"):
        read_state_dict(tmp_path / "unsafe.pt")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.pt")
    torch.save({"a": 1}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="no tensors"):
        read_state_dict(tmp_path / "empty.pt")


def test_peak_memory_helper_returns_sane_numbers_and_merges_stream(tmp_path):
    def alloc():
        a = torch.ones(10_000_000)  # 40 MB
        b = a * 2                   # 40 MB more at the peak
        del a
        return b.sum()

    _, mem = measure_peak_memory(alloc)
    assert 79e6 < mem.peak_bytes < 90e6 and abs(mem.end_bytes) < 1e4 and mem.method == "torch-profiler"
    # task arithmetic over checkpoint paths: peak memory does not grow with the number of models
    torch.manual_seed(0)
    base = {"w": torch.randn(1_000_000), "v": torch.randn(500_000)}  # 6 MB
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"m{i}.pt")
        torch.save({k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}, paths[-1])
    size = 1_500_000 * 4
    peaks = {}
    for n in (2, 6):
        _, mem = measure_peak_memory(task_arithmetic_merge, base, paths[:n], 0.3)
        peaks[n] = mem.peak_bytes
        assert mem.peak_bytes < 5 * size, "accumulator + result + one loaded model + temporaries"
    assert peaks[6] - peaks[2] < 0.5 * size
    _, mem = measure_peak_memory(ties_merging_merge, base, paths, on_foreign_base="ignore")
    assert mem.peak_bytes < 9 * size, "TIES streams too (two passes over the files)"


# -- AdaMerging, functional ---------------------------------------------------------------------------------------------


def _ada(zoo, granularity="layer", **kwargs) -> AdaMergingModel:
    net = _net(0)
    net.load_state_dict(_sd(zoo["base"]))
    return AdaMergingModel.from_finetuned(net, zoo["tasks"], HEAD, granularity=granularity, **kwargs)


def test_ada_merging_starts_at_the_prior_and_matches_task_arithmetic_there(zoo):
    model = _ada(zoo, "task")
    assert torch.equal(model.coefficients(), torch.full((1, 2), 0.3))
    ta = task_arithmetic_merge(_sd(zoo["base"]), zoo["tasks"], 0.3, ignored_layers=HEAD)
    merged = model.merged_state_dict()
    for k in ta:
        torch.testing.assert_close(merged[k], ta[k], atol=1e-6, rtol=0)


def test_ada_merging_heads_stay_per_task(zoo):
    model = _ada(zoo)
    x = torch.randn(5, 1, 8, 8)
    for task in (0, 1):
        reference = _net(0).eval()
        state = model.merged_state_dict(task)
        reference.load_state_dict(state)
        torch.testing.assert_close(state["4.weight"], _sd(zoo["tasks"][task])["4.weight"])
        torch.testing.assert_close(model(x, task), reference(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.export(task)(x), reference(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(x, 0), model(x, 1))


def test_ada_merging_gradient_reaches_only_the_coefficients(zoo):
    model = _ada(zoo)
    model.train()
    assert not model.network.training, "the merged network always runs in eval mode"
    loss = entropy_loss(model(torch.randn(8, 1, 8, 8), 0)) + entropy_loss(model(torch.randn(8, 1, 8, 8), 1))
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["raw_coefficients"]
    assert model.raw_coefficients.grad is not None and model.raw_coefficients.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.network.parameters())
    # layer = each parameter tensor; BatchNorm running statistics share their module's weight row
    names, rows = layer_rows(model.keys)
    assert "2.running_mean" not in names and rows["2.running_mean"] == rows["2.weight"]
    assert model.coefficients().shape == (len(names), 2) == (4, 2)  # 1.w, 1.b, 2.w, 2.b; 2.running_* tied to 2.w


def test_ada_merging_coefficients_are_clamped(zoo):
    model = _ada(zoo)
    with torch.no_grad():
        model.raw_coefficients[0, 0] = 1.7
        model.raw_coefficients[1, 1] = -0.4
    lam = model.coefficients()
    assert float(lam.max()) == 1.0 and float(lam.min()) == 0.0
    lam.sum().backward()
    assert model.raw_coefficients.grad[0, 0] == 0 and model.raw_coefficients.grad[1, 1] == 0  # no gradient past a bound
    assert model.raw_coefficients.grad[2, 0] == 1


def test_ada_merging_entropy_decreases_and_history_is_recorded(zoo):
    torch.manual_seed(0)
    model = _ada(zoo)
    batches = [_digits_arrays(False)[0][:64], _digits_arrays(True)[0][:64]]
    with torch.no_grad():
        before = sum(float(entropy_loss(model(b, k))) for k, b in enumerate(batches))
    history = fit_ada_merging(model, [[b] for b in batches], steps=25, lr=0.02, record_every=5, progress=False)
    with torch.no_grad():
        after = sum(float(entropy_loss(model(b, k))) for k, b in enumerate(batches))
    assert after < before - 0.01
    assert len(history.steps) == 25 and history.coefficient_steps == [0, 5, 10, 15, 20, 24]
    assert len(history.entropy[0]) == 2 and all(0 < s <= 1 for s in history.dominant_share[-1])
    assert not torch.allclose(model.coefficients(), torch.full_like(model.coefficients(), 0.3))


def test_ada_merging_plus_plus_learns_over_ties_vectors(zoo):
    model = _ada(zoo, "task", ties_density=0.2)
    base = _sd(zoo["base"])
    selected = [tv for _, tv, _ in ties_selected_task_vectors(base, zoo["tasks"], 0.2, HEAD)]
    torch.testing.assert_close(model._stacks["1.weight"][1], selected[1]["1.weight"])
    nonzero = float((model._stacks["1.weight"] != 0).float().mean())
    assert 0.01 < nonzero < 0.25


def test_learned_coefficients_save_load_apply_and_plot(zoo, tmp_path):
    model = _ada(zoo)
    with torch.no_grad():
        model.raw_coefficients.uniform_(0.1, 0.9)
    lam = model.coefficients().detach()
    save_coefficients(tmp_path / "c.pt", lam, model.layer_names, model.task_names, "layer")
    data = load_coefficients(tmp_path / "c.pt")
    merged = apply_coefficients(_sd(zoo["base"]), zoo["tasks"], data["coefficients"], data["layer_names"], ignored_layers=HEAD)
    expected = model.merged_state_dict()
    for k in merged:
        torch.testing.assert_close(merged[k], expected[k], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="other layers"):
        apply_coefficients(_sd(zoo["base"]), zoo["tasks"], lam, list(reversed(model.layer_names)), ignored_layers=HEAD)
    history = fit_ada_merging(model, [[torch.randn(8, 1, 8, 8)]] * 2, steps=3, progress=False)
    png = plot_coefficients(tmp_path / "c.png", model.coefficients(), model.layer_names, model.task_names, history)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_diagnose_collapse_names_the_task_the_step_and_the_bounds():
    h = AdaMergingHistory(["a", "b"])
    for step in range(20):
        collapsed = step >= 12
        h.record(step, [1.5 if collapsed else 1.0, 0.01 if collapsed else 1.0], [0.2, 1.0 if collapsed else 0.3],
                 torch.tensor([[1.0 if collapsed else 0.5, 0.0 if collapsed else 0.5]]), (0.0, 1.0), snapshot=True)
    messages = diagnose_collapse(h)
    assert any("b: predictions collapsed to one class" in m and "step 12" in m for m in messages)
    assert any("clamp bound" in m and "step 12" in m for m in messages)
    assert any("entropy went to ~0 on ['b'] while it rose on ['a']" in m for m in messages)
    assert not diagnose_collapse(AdaMergingHistory(["a"]))


# -- MultiTaskDataModule ------------------------------------------------------------------------------------------


def _multi(**kwargs) -> MultiTaskDataModule:
    kwargs.setdefault("batch_size", 16)
    kwargs.setdefault("steps_per_epoch", 4)
    return MultiTaskDataModule([DigitsDataModule(), InvertedDigits()], task_names=["digits", "inverted"], **kwargs)


def test_multi_task_datamodule_serves_unlabelled_batches_of_every_task():
    dm = _multi()
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = list(loader)
    assert len(first) == 4
    for step in first:
        assert [task for _, task in step] == [0, 1]
        assert all(isinstance(x, torch.Tensor) and x.shape == (16, 1, 8, 8) for x, _ in step)  # inputs only
    assert torch.equal(first[0][0][0], list(dm.train_dataloader())[0][0][0]), "an epoch is deterministic"
    loader.sampler.set_epoch(1)
    assert not torch.equal(first[0][0][0], next(iter(loader))[0][0]), "another epoch, another order"
    test_x = dm.tasks[1].test_set.tensors[0]
    served = torch.cat([step[1][0] for step in first])
    assert all(any(torch.equal(s, t) for t in test_x) for s in served[:5]), "adapts on the test split's inputs"
    vals = dm.val_dataloader()
    assert len(vals) == 2 and len(next(iter(vals[0]))) == 2  # labelled (x, y) per task for evaluation
    resized = MultiTaskDataModule([DigitsDataModule()], image_size=16, in_chans=3, batch_size=4)
    resized.setup()
    assert next(iter(resized.train_dataloader()))[0][0].shape == (4, 3, 16, 16)
    assert next(iter(resized.test_dataloader()[0]))[0].shape[1:] == (3, 16, 16)
    assert prepare_images(torch.ones(2, 1, 4, 4), (8, 8), 3).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="adapt_split"):
        MultiTaskDataModule([DigitsDataModule()], adapt_split="holdout")


# -- the AdaMerging LightningModule --------------------------------------------------------------------------------------


def _module(zoo, **kwargs) -> AdaMerging:
    net = _net(0)
    kwargs.setdefault("plot_path", None)
    kwargs.setdefault("coefficients_path", None)
    return AdaMerging(net, [str(p) for p in zoo["tasks"]], base_checkpoint=str(zoo["base"]), ignored_layers=HEAD,
                      task_names=["digits", "inverted"], **kwargs)


def test_ada_merging_module_fits_the_coefficients_only_and_saves_plot_and_coefficients(zoo, tmp_path):
    model = _module(zoo, plot_path="coef.png", coefficients_path="coef.pt", lr=0.01)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["merger.raw_coefficients"]
    network_before = {k: v.clone() for k, v in model.merger.network.state_dict().items()}
    trainer = Trainer(max_steps=6, default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=1,
                      val_check_interval=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=_multi())
    metrics = trainer.callback_metrics
    assert {"train_entropy", "val_acc", "val_acc/digits", "val_acc/inverted", "coef_mean/digits"} <= metrics.keys()
    assert not torch.allclose(model.coefficients(), torch.full_like(model.coefficients(), 0.3))
    for k, v in model.merger.network.state_dict().items():
        assert torch.equal(v, network_before[k]), f"{k} changed: only the coefficients may train"
    assert (tmp_path / "coef.png").is_file()
    saved = load_coefficients(tmp_path / "coef.pt")
    assert saved["task_names"] == ["digits", "inverted"] and saved["layer_names"] == model.merger.layer_names
    assert len(model.history.steps) == 6
    # module state round-trip: a fresh module given the state dict has the same coefficients
    fresh = _module(zoo)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.coefficients(), model.coefficients())
    test = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                   limit_test_batches=1)
    out = test.test(fresh, datamodule=_multi(), verbose=False)
    assert 0.5 < out[0]["test_acc"] <= 1.0


def test_ada_merging_module_refuses_bad_checkpoints_with_clear_messages(zoo, tmp_path):
    wrong = _net(0)
    wrong[1] = nn.Linear(64, 16)
    torch.save(wrong.state_dict(), tmp_path / "wrong.pt")
    with pytest.raises(ArchitectureMismatchError, match=r"'1\.weight' has shape \(16, 64\)"):
        AdaMerging(_net(0), [str(zoo["tasks"][0]), str(tmp_path / "wrong.pt")], base_checkpoint=str(zoo["base"]))
    torch.save(_net(11).state_dict(), tmp_path / "foreign.pt")
    with pytest.raises(ForeignBaseError, match=r"foreign \(.*foreign\.pt\) is far from the base"):
        AdaMerging(_net(0), [str(zoo["tasks"][0]), str(tmp_path / "foreign.pt")], base_checkpoint=str(zoo["base"]))
    with pytest.raises(ValueError, match="granularity"):
        _module(zoo, granularity="block")
    trainer = Trainer(max_steps=1, **QUIET)
    three = MultiTaskDataModule([DigitsDataModule(), DigitsDataModule(), InvertedDigits()], steps_per_epoch=1)
    with pytest.raises(ValueError, match="2 task models but MultiTaskDataModule serves 3 tasks"):
        trainer.fit(_module(zoo), datamodule=three)


def test_ada_merging_module_resumes_to_the_same_coefficients(zoo, tmp_path):
    full, resumed, _ = crash_and_resume(
        lambda: _module(zoo, lr=0.01), lambda: _multi(steps_per_epoch=3), lambda: [], max_epochs=3, crash_epoch=2,
        tmp_path=tmp_path, limit_val_batches=0, num_sanity_val_steps=0,
    )
    assert_same_parameters(full, resumed)
    assert len(resumed.history.steps) == 9


# -- the ModelMerging callback -------------------------------------------------------------------------------------------


def _classifier(zoo, load_base: bool = True) -> ImageClassifier:
    net = _net(0)
    if load_base:
        net.load_state_dict(_sd(zoo["base"]))
    return ImageClassifier(net, num_classes=10, image_size=8, lr=1e-3)


def _lightning_checkpoint(zoo, task: int, path: Path) -> Path:
    """A real Lightning checkpoint of the user's module holding task model ``task``."""
    module = _classifier(zoo, load_base=False)
    module.net.load_state_dict(_sd(zoo["tasks"][task]))
    trainer = Trainer(max_steps=0, **QUIET)
    trainer.fit(module, datamodule=DigitsDataModule())
    trainer.save_checkpoint(path)
    return path


def test_callback_merges_lightning_checkpoints_into_the_users_module(zoo, tmp_path):
    ckpt = _lightning_checkpoint(zoo, 1, tmp_path / "inverted.ckpt")
    merging = ModelMerging(checkpoints=[str(ckpt)], method="task_arithmetic", scaling=0.4, finetuned_path="ft.pt",
                           merged_path="merged.pt")
    module = _classifier(zoo)
    trainer = Trainer(max_steps=3, default_root_dir=tmp_path, callbacks=[merging], **QUIET)
    trainer.fit(module, datamodule=DigitsDataModule())
    assert merging.merged and merging.num_models == 2 and merging.ignored_layers == ["net.4"]
    finetuned = torch.load(tmp_path / "ft.pt", weights_only=True)
    base = {f"net.{k}": v for k, v in _sd(zoo["base"]).items()}
    expected = task_arithmetic_merge(base, [finetuned, {f"net.{k}": v for k, v in _sd(zoo["tasks"][1]).items()}],
                                     0.4, ignored_layers=["net.4"])
    state = module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(state["net.4.weight"], finetuned["net.4.weight"])  # own head kept
    assert torch.load(tmp_path / "merged.pt", weights_only=True).keys() == state.keys()
    # a later evaluation of the already merged module does not merge again
    trainer.test(module, datamodule=DigitsDataModule(), verbose=False)
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k])


def test_callback_refuses_other_architectures_and_foreign_bases(zoo, tmp_path):
    wrong = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), image_size=8)
    torch.save(wrong.state_dict(), tmp_path / "wrong.pt")
    trainer = Trainer(max_steps=1, callbacks=[ModelMerging(checkpoints=[str(tmp_path / "wrong.pt")])], **QUIET)
    with pytest.raises(ArchitectureMismatchError, match=r"net\.1\.weight' has shape \(16, 64\) in checkpoint .* but \(32, 64\)"):
        trainer.fit(_classifier(zoo), datamodule=DigitsDataModule())
    foreign = _classifier(zoo, load_base=False)
    foreign.net.load_state_dict(_net(5).state_dict())
    torch.save(foreign.state_dict(), tmp_path / "foreign.pt")
    trainer = Trainer(max_steps=1, callbacks=[ModelMerging(checkpoints=[str(tmp_path / "foreign.pt")], method="ties")], **QUIET)
    with pytest.raises(ForeignBaseError, match="foreign.pt is far from the base"):
        trainer.fit(_classifier(zoo), datamodule=DigitsDataModule())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(max_steps=1, callbacks=[ModelMerging(checkpoints=[str(tmp_path / "nope.pt")])], **QUIET).fit(
            _classifier(zoo), datamodule=DigitsDataModule())
    with pytest.raises(ValueError, match="ada_data"):
        ModelMerging(method="ada_merging")
    with pytest.raises(ValueError, match="Nothing to merge"):
        ModelMerging(include_current=False)


def test_callback_test_run_merges_with_base_checkpoint_and_learned_coefficients(zoo, tmp_path):
    ada = _ada(zoo)
    with torch.no_grad():
        ada.raw_coefficients.uniform_(0.2, 0.8)
    save_coefficients(tmp_path / "c.pt", ada.coefficients(), ada.layer_names, ["digits", "inverted"], "layer")
    base_module = _classifier(zoo)
    torch.save(base_module.state_dict(), tmp_path / "base.pt")
    module = _classifier(zoo, load_base=False)
    module.net.load_state_dict(_sd(zoo["tasks"][0]))  # this run evaluates task 0's model
    merging = ModelMerging(checkpoints=[str(zoo["tasks"][1])], method="coefficients", coefficients=str(tmp_path / "c.pt"),
                           base_checkpoint=str(tmp_path / "base.pt"))
    trainer = Trainer(callbacks=[merging], limit_test_batches=1, **QUIET)
    trainer.test(module, datamodule=DigitsDataModule(), verbose=False)
    expected = ada.merged_state_dict(task=0)
    for k, v in expected.items():
        torch.testing.assert_close(module.net.state_dict()[k], v, atol=1e-6, rtol=0)


def test_callback_learns_ada_merging_coefficients(zoo, tmp_path):
    merging = ModelMerging(checkpoints=[str(zoo["tasks"][1])], method="ada_merging", ada_data=_multi(), ada_steps=4,
                           ada_lr=0.01, progress=False, plot_path="ada.png")
    module = _classifier(zoo, load_base=True)
    trainer = Trainer(max_steps=2, default_root_dir=tmp_path, callbacks=[merging], **QUIET)
    trainer.fit(module, datamodule=DigitsDataModule())
    assert merging.learned_coefficients.shape == (4, 2) and len(merging.history.steps) == 4
    assert set(merging.agreement) == {"digits", "inverted"} and all(0 <= a <= 1 for a in merging.agreement.values())
    assert (tmp_path / "ada.png").is_file()
    assert all(p.requires_grad for p in module.parameters()), "the module's flags are restored"


def test_callback_failed_ada_merging_leaves_the_module_as_it_was(zoo, tmp_path):
    foreign = _classifier(zoo, load_base=False)
    foreign.net.load_state_dict(_net(5).state_dict())
    torch.save(foreign.state_dict(), tmp_path / "foreign.pt")
    module = _classifier(zoo)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    merging = ModelMerging(checkpoints=[str(tmp_path / "foreign.pt")], method="ada_merging", ada_data=_multi(),
                           ada_steps=2, progress=False, plot_path=None)
    with pytest.raises(ForeignBaseError):
        Trainer(max_steps=0, callbacks=[merging], **QUIET).fit(module, datamodule=DigitsDataModule())
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in module.parameters())


def test_callback_state_round_trips_and_resume_gives_the_same_weights(zoo, tmp_path):
    ckpt = str(zoo["tasks"][1])

    def make_model():
        return _classifier(zoo)

    full, resumed, info = crash_and_resume(
        make_model, lambda: DigitsDataModule(batch_size=256), lambda: [ModelMerging(checkpoints=[ckpt], method="ties")],
        max_epochs=2, crash_epoch=1, tmp_path=tmp_path, limit_val_batches=0, num_sanity_val_steps=0,
    )
    assert_same_parameters(full, resumed)
    cb = info["resumed_callbacks"][0]
    assert cb.merged
    state = cb.state_dict()
    fresh = ModelMerging(checkpoints=[ckpt], method="ties")
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.state_dict()["merged_fingerprint"] == state["merged_fingerprint"]
    with pytest.raises(ValueError, match="method='ties'"):
        ModelMerging(checkpoints=[ckpt], method="average").load_state_dict(state)


def test_model_merging_yaml_runs(tmp_path, monkeypatch):
    import yaml

    from lightning_ext.cli import run_cli

    config = REPO / "configs" / "model_merging.yaml"
    assert yaml.safe_load(config.read_text())["trainer"]["callbacks"][0]["class_path"] == "ModelMerging"
    monkeypatch.chdir(REPO)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(["fit", "--config", str(config), "--trainer.fast_dev_run=2", "--trainer.enable_progress_bar=false",
                       f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.state.finished and cli.trainer.global_step > 0
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ModelMerging))
    assert callback.merged and callback.num_models == 1
    assert (tmp_path / "tasks" / "digits.pt").is_file() and (tmp_path / "merged.pt").is_file()
    # the next task's run (same base: same seed and model) merges the first one's saved model too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(["fit", "--config", str(config), "--trainer.fast_dev_run=2", "--trainer.enable_progress_bar=false",
                       f"--trainer.default_root_dir={tmp_path}", "--data=MNIST5kDataModule",
                       "--model.init_args.image_size=28", "--trainer.callbacks.init_args.finetuned_path=tasks/mnist5k.pt"])
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ModelMerging))
    assert callback.merged and callback.num_models == 2 and (tmp_path / "tasks" / "mnist5k.pt").is_file()


def test_ada_merging_module_and_multi_task_data_are_written_in_yaml(tmp_path, monkeypatch):
    """The AdaMerging LightningModule with a MultiTaskDataModule, configured entirely in YAML."""
    import yaml

    from lightning_ext.cli import run_cli

    torch.manual_seed(0)
    network = ImageClassifier("test_efficientnet", num_classes=10, in_chans=1, image_size=8, stem_downsample=1)
    torch.save(network.state_dict(), tmp_path / "base.pt")
    for name in ("digits", "inverted"):
        torch.save({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                    for k, v in network.state_dict().items()}, tmp_path / f"{name}.pt")
    config = {
        "model": {"class_path": "AdaMerging", "init_args": {
            "network": {"class_path": "lightning_ext.modules.ImageClassifier", "init_args": {
                "backbone": "test_efficientnet", "num_classes": 10, "in_chans": 1, "image_size": 8, "stem_downsample": 1}},
            "base_checkpoint": str(tmp_path / "base.pt"),
            "checkpoints": [str(tmp_path / "digits.pt"), str(tmp_path / "inverted.pt")],
            "granularity": "layer", "plot_path": "coefficients.png"}},
        "data": {"class_path": "MultiTaskDataModule", "init_args": {
            "tasks": [{"class_path": "DigitsDataModule"},
                      {"class_path": "tests.test_model_merging.InvertedDigits"}],
            "batch_size": 8, "steps_per_epoch": 2}},
    }
    path = tmp_path / "ada.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(REPO)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(["fit", "--config", str(path), "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                       "--trainer.enable_progress_bar=false", "--trainer.logger=false",
                       "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 2 and cli.model.ignored_layers == ["net.classifier"]
    assert cli.model.task_names == ["digits", "inverted"] and (tmp_path / "coefficients.png").is_file()


# -- DDP: two gloo processes learn/merge exactly what one process does ----------------------------------------------


@pytest.mark.ddp
def test_ada_merging_module_under_ddp_learns_the_single_process_coefficients(zoo, tmp_path):
    """Two processes with half the per-task batch each learn the coefficients of one process over 2 epochs (the
    second epoch checks that both ranks move on to the next epoch's inputs instead of replaying the first)."""
    from lightning_ext.testing import fit_ddp_vs_single

    total = 64  # inputs per task per epoch

    def make_data(batch_size: int) -> MultiTaskDataModule:
        return _multi(batch_size=batch_size, steps_per_epoch=total // batch_size)

    single, ddp = fit_ddp_vs_single(lambda: _module(zoo, lr=0.02), make_data, global_batch_size=16, tmp_path=tmp_path,
                                    test=False, max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0)
    raw = "merger.raw_coefficients"
    assert not torch.allclose(single.state_dict[raw], torch.full_like(single.state_dict[raw], 0.3)), "it trained"
    torch.testing.assert_close(ddp.state_dict[raw], single.state_dict[raw], atol=1e-6, rtol=1e-5)


class FrozenNorm(ImageClassifier):
    """ImageClassifier whose BatchNorm uses running statistics in training too (for exact DDP comparisons)."""

    def on_train_epoch_start(self) -> None:
        self.net[2].eval()


@pytest.mark.ddp
def test_model_merging_callback_under_ddp_merges_like_one_process(zoo, tmp_path):
    from lightning_ext.testing import fit_ddp_vs_single

    """Rank 0 merges and broadcasts; training on after the merge (BatchNorm frozen, so the two runs can agree
    exactly) gives the one-process weights only if every rank holds the merged model."""
    ckpt = str(zoo["tasks"][1])

    def make_model() -> ImageClassifier:
        net = _net(0)
        net.load_state_dict(_sd(zoo["base"]))
        # SGD: Adam's first steps turn float-rounding differences of near-zero gradients into +-lr updates
        return FrozenNorm(net, num_classes=10, image_size=8, optimizer=functools.partial(torch.optim.SGD, lr=0.05))

    single, ddp = fit_ddp_vs_single(make_model, lambda bs: DigitsDataModule(batch_size=bs, drop_last=True),
                                    global_batch_size=64, tmp_path=tmp_path, test=False, max_epochs=1,
                                    limit_val_batches=0, num_sanity_val_steps=0,
                                    callbacks=[ModelMerging(checkpoints=[ckpt], method="ties", scaling=0.8)])
    base = _sd(zoo["base"])
    assert not torch.allclose(single.state_dict["net.1.weight"], base["1.weight"]), "merged and trained"
    for name, value in single.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[name], value, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# -- issue 14: one vocabulary, declarative validation, shared mechanics -----------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("name,kwargs", [
    ("method", {"method": "soup"}),
    ("scaling", {"scaling": NAN}),
    ("scaling", {"scaling": INF}),
    ("ties_density", {"ties_density": NAN}),
    ("ties_density", {"ties_density": 0.0}),
    ("ties_density", {"ties_density": 20}),
    ("ties_merge", {"ties_merge": "max"}),
    ("ada_steps", {"ada_steps": 0}),
    ("ada_lr", {"ada_lr": NAN}),
    ("ada_lr", {"ada_lr": -1e-3}),
    ("ada_granularity", {"ada_granularity": "block"}),
    ("ada_prior", {"ada_prior": INF}),
    ("ada_prior", {"ada_prior": -0.1}),
    ("max_task_vector_ratio", {"max_task_vector_ratio": NAN}),
    ("max_task_vector_ratio", {"max_task_vector_ratio": -1.0}),
    ("on_foreign_base", {"on_foreign_base": "skip"}),
    ("merged_path", {"merged_path": ""}),
], ids=lambda v: str(v))
def test_model_merging_refuses_bad_values(name, kwargs):
    with pytest.raises(ValueError, match=name) as info:
        ModelMerging(checkpoints=["other.pt"], **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name,kwargs", [
    ("granularity", {"granularity": "block"}),
    ("prior", {"prior": NAN}),
    ("prior", {"prior": 1.5}),
    ("lr", {"lr": INF}),
    ("lr", {"lr": 0.0}),
    ("ties_density", {"ties_density": NAN}),
    ("ties_density", {"ties_density": -0.2}),
    ("max_task_vector_ratio", {"max_task_vector_ratio": INF}),
    ("on_foreign_base", {"on_foreign_base": "skip"}),
    ("record_every_n_steps", {"record_every_n_steps": 0}),
    ("plot_path", {"plot_path": ""}),
], ids=lambda v: str(v))
def test_ada_merging_module_refuses_bad_values(zoo, name, kwargs):
    with pytest.raises(ValueError, match=name):
        _module(zoo, **kwargs)


@pytest.mark.parametrize("name,kwargs", [
    ("adapt_split", {"adapt_split": "dev"}),
    ("batch_size", {"batch_size": 0}),
    ("eval_batch_size", {"eval_batch_size": NAN}),
    ("steps_per_epoch", {"steps_per_epoch": -1}),
    ("image_size", {"image_size": [8, 0]}),
    ("in_chans", {"in_chans": 0}),
    ("num_workers", {"num_workers": -1}),
], ids=lambda v: str(v))
def test_multi_task_datamodule_refuses_bad_values(name, kwargs):
    with pytest.raises(ValueError, match=name):
        _multi(**kwargs)


def test_merging_functions_refuse_bad_values(zoo):
    base = _sd(zoo["base"])
    with pytest.raises(ValueError, match="density"):
        ties_merging_merge(base, zoo["tasks"], density=NAN, ignored_layers=HEAD)
    with pytest.raises(ValueError, match="merge"):
        ties_merging_merge(base, zoo["tasks"], merge="max", ignored_layers=HEAD)
    with pytest.raises(ValueError, match="max_task_vector_ratio"):
        task_arithmetic_merge(base, zoo["tasks"], max_task_vector_ratio=NAN, ignored_layers=HEAD)
    with pytest.raises(ValueError, match="on_foreign_base"):
        task_arithmetic_merge(base, zoo["tasks"], on_foreign_base="skip", ignored_layers=HEAD)
    with pytest.raises(ValueError, match="prior"):
        _ada(zoo, prior=NAN)
    with pytest.raises(ValueError, match="granularity"):
        _ada(zoo, granularity="block")


def test_a_checkpoint_with_nan_weights_is_refused_with_a_clear_message(zoo, tmp_path):
    state = _sd(zoo["tasks"][0])
    state["1.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    base = _sd(zoo["base"])
    message = r"nan\.pt.*tensor '1\.weight' holds 1 non-finite value\(s\) \(NaN or inf\)"
    with pytest.raises(ValueError, match=message):
        read_state_dict(tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=message):
        task_arithmetic_merge(base, [zoo["tasks"][1], tmp_path / "nan.pt"], ignored_layers=HEAD)
    with pytest.raises(ValueError, match=message):
        AdaMerging(_net(0), [str(zoo["tasks"][1]), str(tmp_path / "nan.pt")], base_checkpoint=str(zoo["base"]))
    with pytest.raises(ValueError, match="non-finite"):
        Trainer(max_steps=1, callbacks=[ModelMerging(checkpoints=[str(tmp_path / "nan.pt")])], **QUIET).fit(
            _classifier(zoo), datamodule=DigitsDataModule())


def test_ignored_layers_take_module_names_and_globs():
    from lightning_ext.merging import is_head_key, resolve_ignored_layers

    module = ImageClassifier(_net(0), num_classes=10, image_size=8)
    assert resolve_ignored_layers(module, None) == ["net.4"]
    assert resolve_ignored_layers(module, ["net.[24]"]) == ["net.2", "net.4"]
    assert resolve_ignored_layers(module, ["net.4", "net.4.weight"]) == ["net.4"]  # a tensor inside adds nothing
    assert resolve_ignored_layers(module, []) == []
    with pytest.raises(ValueError, match=r"ignored_layers.*'net\.9'.*Close names"):
        resolve_ignored_layers(module, ["net.9"])
    assert is_head_key("net.4.bias", ["net.*"]) and not is_head_key("net_x.bias", ["net"])
    base = {"a.weight": torch.zeros(2), "heads.x.weight": torch.zeros(3), "heads.y.weight": torch.zeros(1)}
    ft = {"a.weight": torch.ones(2), "heads.x.weight": torch.ones(3), "heads.y.weight": torch.ones(1)}
    assert set(task_arithmetic_merge(base, [ft], 1.0, ["heads.*"], on_foreign_base="ignore")) == {"a.weight"}
    with pytest.raises(ValueError, match="ignored_layers"):
        Trainer(max_steps=1, callbacks=[ModelMerging(checkpoints=[], ignored_layers=["head"])], **QUIET).fit(
            module, datamodule=DigitsDataModule())


def test_output_paths_are_relative_to_the_log_dir_and_none_disables(zoo, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    merging = ModelMerging(finetuned_path="tasks/a.pt", merged_path="merged.pt", method="average")
    trainer = Trainer(max_steps=1, default_root_dir=tmp_path, callbacks=[merging], logger=CSVLogger(tmp_path),
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      accelerator="cpu", devices=1)
    trainer.fit(_classifier(zoo), datamodule=DigitsDataModule())
    log_dir = Path(trainer.log_dir)
    assert log_dir != tmp_path and (log_dir / "tasks" / "a.pt").is_file() and (log_dir / "merged.pt").is_file()
    assert not list(log_dir.glob(".*.tmp")), "atomic writes leave no temporary file"
    # a later run (another log dir) finds it with a recursive glob under default_root_dir
    later = ModelMerging(checkpoints=["**/tasks/*.pt"], method="average", plot_path=None)
    Trainer(max_steps=0, default_root_dir=tmp_path, callbacks=[later], **QUIET).fit(
        _classifier(zoo), datamodule=DigitsDataModule())
    assert later.num_models == 2


def test_wrappers_refuse_sharded_strategies_in_setup(zoo):
    import types

    class FSDPStrategy:  # stands in for Lightning's: only the class name is inspected
        pass

    trainer = types.SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(RuntimeError, match="ModelMerging .*FSDPStrategy shards them"):
        ModelMerging(checkpoints=["x.pt"]).setup(trainer, _classifier(zoo), "fit")
    module = _module(zoo)
    module.trainer = trainer  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="AdaMerging .*FSDPStrategy shards them"):
        module.setup("fit")


def test_step_sampler_shards_steps_and_moves_on_with_the_epoch():
    from lightning_ext.merging.multi_task import _StepSampler

    single = _StepSampler(5)
    ranks = [_StepSampler(5, num_replicas=2, rank=r) for r in range(2)]
    assert list(single) == [0, 1, 2, 3, 4] and [list(s) for s in ranks] == [[0, 2, 4], [1, 3, 0]]
    it = iter(single)
    single.set_epoch(2)  # read when iteration starts (a resumed run sets the epoch after making the iterator)
    assert list(it) == [10, 11, 12, 13, 14]


def test_hooks_are_marked_override_with_a_docstring():
    hooks = {
        ModelMerging: ("setup", "on_fit_end", "on_validation_start", "on_test_start", "on_predict_start", "state_dict",
                       "load_state_dict"),
        AdaMerging: ("forward", "setup", "training_step", "validation_step", "test_step", "on_validation_epoch_end",
                     "on_test_epoch_end", "configure_optimizers", "on_fit_end", "on_save_checkpoint",
                     "on_load_checkpoint"),
        MultiTaskDataModule: ("prepare_data", "setup", "train_dataloader", "val_dataloader", "test_dataloader"),
    }
    for cls, names in hooks.items():
        for hook in names:
            fn = vars(cls)[hook]
            assert getattr(fn, "__override__", False) and fn.__doc__, f"{cls.__name__}.{hook}"


# -- one-batch equivalence with independent implementations (the papers' equations, the official codes' conventions) ---


def _independent_entropy(logits: torch.Tensor) -> torch.Tensor:
    # AdaMerging's softmax_entropy: -(softmax(x) * log_softmax(x)).sum(1), averaged over the batch; written with exp/log
    z = logits.double() - logits.double().max(dim=1, keepdim=True).values
    p = z.exp() / z.exp().sum(dim=1, keepdim=True)
    return -(p * p.log()).sum(dim=1).mean()


def test_layer_wise_ada_merging_loss_and_gradient_match_an_independent_implementation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    shared = ["0.weight", "0.bias"]
    taus = [{k: 0.5 * torch.randn_like(base[k]) for k in shared} for _ in range(2)]
    heads = [{"2.weight": torch.randn(3, 6), "2.bias": torch.randn(3)} for _ in range(2)]
    model = AdaMergingModel(net, taus, heads, granularity="layer")
    raw = torch.tensor([[0.2, 1.4], [0.7, -0.3]])  # rows: 0.weight, 0.bias; two entries outside the clamp range
    with torch.no_grad():
        model.raw_coefficients.copy_(raw)
    xs = [torch.randn(7, 5), torch.randn(7, 5)]
    loss = sum(entropy_loss(model(x, k)) for k, x in enumerate(xs))
    loss.backward()
    # independent: theta^l = theta0^l + sum_k clamp(lambda_k^l, 0, 1) tau_k^l, forward written by hand, own head per task
    lam = raw.clone().double().requires_grad_(True)
    used = lam.clamp(0, 1)
    w = base["0.weight"].double() + used[0, 0] * taus[0]["0.weight"].double() + used[0, 1] * taus[1]["0.weight"].double()
    b = base["0.bias"].double() + used[1, 0] * taus[0]["0.bias"].double() + used[1, 1] * taus[1]["0.bias"].double()
    ref = 0
    for k, x in enumerate(xs):
        hidden = torch.tanh(x.double() @ w.T + b)
        ref = ref + _independent_entropy(hidden @ heads[k]["2.weight"].double().T + heads[k]["2.bias"].double())
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.raw_coefficients.grad.double(), lam.grad, atol=1e-5, rtol=1e-4)
    assert float(lam.grad[0, 1]) == 0.0 and float(lam.grad[1, 1]) == 0.0  # clamped: no gradient


def _official_ties(task_vectors: torch.Tensor, density: float) -> torch.Tensor:
    # TIES-Merging's reference code (prateeksr/ties-merging, topk_values_mask/resolve_sign/disjoint_merge): rows are
    # flattened task vectors. One deliberate difference: the reference takes kthvalue(d - int(d * K)), which keeps
    # int(d * K) + 1 entries and fails at K = 1; we keep the paper's top int(d * K) ("top-k %"), hence the + 1.
    n, d = task_vectors.shape
    k = d - int(d * density) + 1
    kth = task_vectors.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = task_vectors * (task_vectors.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    return selected.sum(dim=0) / (selected != 0).sum(dim=0).float().clamp(min=1)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_merge_matches_the_official_trim_elect_merge(density):
    torch.manual_seed(1)
    base = {"a": torch.randn(4, 5), "b": torch.randn(7), "head": torch.zeros(2)}
    fts = [{"a": base["a"] + torch.randn(4, 5), "b": base["b"] + torch.randn(7), "head": torch.ones(2)} for _ in range(3)]
    flat = torch.stack([torch.cat([(ft[k] - base[k]).flatten() for k in ("a", "b")]) for ft in fts])
    expected = _official_ties(flat, density) * 0.7
    merged = ties_merging_merge(base, fts, density=density, scaling=0.7, ignored_layers=["head"], on_foreign_base="ignore")
    got = torch.cat([(merged[k] - base[k]).flatten() for k in ("a", "b")])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


# -- label-free agreement ----------------------------------------------------------------------------------------


def test_agreement_flags_a_confident_but_wrong_merge_that_the_collapse_diagnosis_misses():
    torch.manual_seed(0)
    own = torch.randn(200, 10)  # the task's fine-tuned model
    wrong = 30.0 * F.one_hot((own.argmax(1) + 3) % 10, 10).float()  # sure of a shifted class: spread, not one class
    right = own + 0.01 * torch.randn(200, 10)
    assert prediction_agreement(right, own) > 0.95 and prediction_agreement(wrong, own) == 0.0
    h = AdaMergingHistory(["a", "b"])
    for step in range(10):  # entropy falls on both tasks, no dominant class, coefficients inside the bounds
        share = float(torch.bincount(wrong.argmax(1), minlength=10).max()) / 200
        h.record(step, [1.0 - 0.1 * step, 1.0 - 0.1 * step], [share, 0.2], torch.full((1, 2), 0.4), (0.0, 1.0), True)
    assert diagnose_collapse(h) == []
    entropy = {"a": float(entropy_loss(wrong)), "b": float(entropy_loss(right))}
    messages = diagnose_agreement({"a": prediction_agreement(wrong, own), "b": prediction_agreement(right, own)}, entropy)
    assert len(messages) == 1 and messages[0].startswith("a:") and "confident-but-wrong" in messages[0]
    with pytest.raises(ValueError, match="one shape"):
        prediction_agreement(own, own[:, :5])


def test_finetuned_agreement_is_one_where_the_merge_is_that_task_model(zoo):
    model = _ada(zoo, "task")
    loaders = [[torch.randn(16, 1, 8, 8)] for _ in range(2)]
    with torch.no_grad():
        model.raw_coefficients.copy_(torch.tensor([[1.0, 0.0]]))  # the merge is task 0's fine-tuned model
    agreement, entropy = finetuned_agreement(model, loaders)
    assert agreement[0] == 1.0 and len(entropy) == 2
    with pytest.raises(ValueError, match="2 tasks"):
        finetuned_agreement(model, loaders[:1])
