"""DyCL (export/): rewriting data-dependent control flow into torch.cond/while_loop, the report, the callback."""

import json

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ext.export.callback import DynamicExportCheck
from lightning_ext.export.dycl import cond, export_dynamic, make_exportable, rewritten, while_loop
from lightning_ext.export.dynamic_nets import BatchEarlyExit, IterativeRefiner, MeanGatedNet, SkipGateNet
from lightning_ext.vision.early_exit import EarlyExitNetwork


def _early_exit(threshold=0.34):
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())]
    return EarlyExitNetwork(stages, [4, 8, 8], num_classes=3, threshold=threshold)


NETS = {
    "mean_gated": (lambda: MeanGatedNet(8), (6, 8), "torch.cond"),
    "skip_gate": (lambda: SkipGateNet(8, blocks=3), (6, 8), "torch.cond"),
    "refiner": (lambda: IterativeRefiner(8), (6, 8), "torch.while_loop"),
    "early_exit": (lambda: BatchEarlyExit(_early_exit()), (6, 1, 8, 8), "torch.cond"),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_dynamic_nets_fail_plain_export_and_export_after_rewriting_with_eager_outputs(name):
    make, shape, op = NETS[name]
    torch.manual_seed(1)
    net = make().eval()
    x = torch.randn(*shape)
    program, report = export_dynamic(net, (x,), try_original=True)
    assert report.exported_before is False and "data-dependent" in report.error_before
    assert report.exported and report.dynamic_batch, report.lines()
    assert any(b.status == "rewritten" and b.rewrite == op for b in report.sites())
    assert not report.not_rewritten
    assert type(net).__name__ == type(net).__qualname__.split(".")[-1] and "forward" in type(net).__dict__
    exported = program.module()
    with torch.no_grad():
        for xb in (x, -x, 3 * x, x[:2], torch.randn(11, *shape[1:])):
            torch.testing.assert_close(exported(xb), net(xb), rtol=1e-5, atol=1e-6)
    one = x[:1]  # batch 1 through a program exported at batch 1 (a symbolic batch may assert >= 2)
    program1, _ = export_dynamic(net, (one,), dynamic_batch=False)
    torch.testing.assert_close(program1.module()(one), net(one), rtol=1e-5, atol=1e-6)


def test_both_branches_are_exercised_and_match():
    torch.manual_seed(0)
    net = MeanGatedNet(8).eval()
    program, _ = export_dynamic(net, (torch.randn(4, 8),))
    taken = set()
    with torch.no_grad():
        for scale in (-5.0, 5.0):
            x = torch.full((4, 8), scale)
            taken.add(bool(net.inp(x).mean() > 0))
            torch.testing.assert_close(program.module()(x), net(x))
    assert taken == {True, False}


def test_early_exit_leaves_early_and_late_like_eager():
    net = BatchEarlyExit(_early_exit()).eval()
    head0 = lambda x: net.heads[0](net.segments[0](x))  # noqa: E731
    torch.manual_seed(0)
    xs = [torch.randn(1, 1, 8, 8) * (0.1 + seed) for seed in range(12)]
    with torch.no_grad():  # the threshold: the median first-exit confidence, so both outcomes occur
        net.threshold = float(torch.stack([head0(x).softmax(-1).max() for x in xs]).median())
    program, _ = export_dynamic(net, (xs[0],), dynamic_batch=False)
    early = late = 0
    with torch.no_grad():
        for x in xs:
            out = net(x)
            left_first = bool(torch.equal(out, head0(x)))
            early, late = early + left_first, late + (not left_first)
            torch.testing.assert_close(program.module()(x), out)
    assert early and late, (early, late)


class _Static(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.dim() == 3:
            x = x.flatten(1)
        y = self.lin(x) * 2 if x.mean().item() > 0 and x.std() > 0.1 else self.lin(x) - 1
        if self.training:
            y = y + 0
        return y


def test_static_predicates_stay_python_and_conditional_expressions_with_item_and_and_are_rewritten():
    net = _Static().eval()
    x = torch.randn(3, 4)
    program, report = export_dynamic(net, (x,))
    status = {(b.kind, b.source.split()[1]): b.status for b in report.sites()}
    assert status[("if", "x.dim()")] == "static" and status[("if", "self.training:")] == "static"
    assert status[("ifexp", "=")] == "rewritten"
    with torch.no_grad():
        for xb in (x, -x.abs(), x.abs() + 1, torch.full((3, 4), 0.5)):
            torch.testing.assert_close(program.module()(xb), net(xb))


class _Unrewritable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("hits", torch.zeros(()))

    def forward(self, x):
        if x.sum() > 0:
            self.hits += 1
        for _ in range(3):
            if x.mean() > 10:
                break
            x = x * 2
        if x.mean() > 0:
            if x.std() > 100:
                return x
        return self.lin(x)


def test_unrewritable_sites_are_reported_with_one_line_reasons_and_export_fails():
    net = _Unrewritable().eval()
    program, report = export_dynamic(net, (torch.ones(3, 4) + 0.1 * torch.randn(3, 4),))
    reasons = {b.source: b.reason for b in report.not_rewritten}
    assert "writes to `self.hits`" in reasons["if x.sum() > 0:"]
    assert "break/continue" in reasons["if x.mean() > 10:"]
    assert "returns on some paths only" in reasons["if x.std() > 100:"]
    assert all("\n" not in r for r in reasons.values())
    assert program is None and not report.exported and "data-dependent" in report.error
    assert report.lines()[-1].startswith("export failed")


def test_rewriting_leaves_eager_outputs_and_the_class_unchanged():
    torch.manual_seed(0)
    net = SkipGateNet(8).eval()
    x = torch.randn(5, 8)
    want = net(x)
    with rewritten(net) as report:
        assert type(net) is not SkipGateNet and isinstance(net, SkipGateNet)
        torch.testing.assert_close(net(x), want, rtol=0, atol=0)
    assert type(net) is SkipGateNet and report.sites()[0].observed == "tensor"
    copy, _ = make_exportable(net, x)
    assert type(net) is SkipGateNet and type(copy) is not SkipGateNet
    torch.testing.assert_close(copy(x), want, rtol=0, atol=0)


def test_library_early_exit_network_needs_no_rewrite():
    net = _early_exit().eval()  # per-sample exits through torch.where: no data-dependent branch
    program, report = export_dynamic(net, (torch.randn(2, 1, 8, 8),), try_original=True)
    assert report.exported_before and report.exported and not report.not_rewritten
    x = torch.randn(2, 1, 8, 8)  # len(x) in its per-sample gather makes the batch static
    torch.testing.assert_close(program.module()(x), net(x))


def test_explicit_api_matches_python_semantics_in_eager():
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(cond(x.sum() > 0, lambda v: v + 1, lambda v: v - 1, (x,)), x + 1)
    assert cond(False, lambda: 1, lambda: 2) == 2
    i, y = while_loop(lambda i, v: v.sum() < 20, lambda i, v: (i + 1, v * 2), (0, x))
    assert i == 3 and torch.equal(y, x * 8)


# ------------------------------------------------------------------------------------------------------ callback
def _fit(tmp_path, net, **cb_kwargs):
    from lightning_ext.vision.classifier import Classifier

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 8, (64,)))
    cb = DynamicExportCheck(module="net", **cb_kwargs)
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[cb])
    model = Classifier(net, num_classes=8, lr=1e-2)
    trainer.fit(model, DataLoader(data, batch_size=16), DataLoader(data, batch_size=10))
    return cb, model


def test_callback_exports_checks_saves_and_times_after_fit(tmp_path):
    cb, model = _fit(tmp_path, SkipGateNet(8), latency=["eager", "exported"], latency_repeats=3)
    res = cb.results
    assert res["equal"] and res["batches_compared"] == 2 and res["max_abs_diff"] < 1e-5
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["report"]["exported_before"] is False and report["report"]["exported"] is True
    table = (tmp_path / "export" / "latency.md").read_text()
    assert "| eager | 1 |" in table and "| exported | 1 |" in table
    program = torch.export.load(tmp_path / "export" / "model.pt2")
    x = torch.randn(7, 8)
    model.net.eval()
    torch.testing.assert_close(program.module()(x), model.net(x))
    assert not list(tmp_path.glob("export/.*.tmp"))


def test_callback_fails_with_one_line_when_a_branch_cannot_be_rewritten(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.seen = 0

        def forward(self, x):
            if x.mean() > 0:
                self.seen = self.seen + 1
            return self.lin(x)

    with pytest.raises(RuntimeError, match=r"did not export: .*writes to `self.seen`"):
        _fit(tmp_path, Net(), latency=[], on_failure="error")


@pytest.mark.parametrize("kwargs, match", [
    (dict(wrap="BatchEarlyExit"), "wrap must be an import path"),
    (dict(latency=["fast"]), "latency"),
    (dict(on="fit_start"), "on"),
    (dict(export_path=""), "export_path"),
    (dict(check_batches=0), "check_batches"),
    (dict(atol=float("nan")), "atol"),
])
def test_callback_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicExportCheck(**kwargs)


def test_callback_names_a_missing_submodule(tmp_path):
    with pytest.raises(ValueError, match="no submodule 'backbone'"):
        DynamicExportCheck(module="backbone").target(nn.Module().__class__())



def test_callback_refuses_more_than_one_process_in_setup():
    """Under two gloo processes the export hung (rank 0 exporting, rank 1 at the barrier): refused up front."""

    class _Trainer:
        world_size = 2
        strategy = None

    with pytest.raises(RuntimeError, match="devices=1"):
        DynamicExportCheck(module="net").setup(_Trainer(), None, "fit")
