"""FedSTO (federated/fedsto.py, fedsto_module.py) and its detection parts (detection/centernet.py, domain_canvas.py)."""

from __future__ import annotations

import io
import math

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("pycocotools")

from lightning_ext.detection.centernet import (  # noqa: E402
    TinyCenterNet,
    centernet_loss,
    decode_detections,
)
from lightning_ext.federated.fedsto import (  # noqa: E402
    OrthogonalityRegularizer,
    orthogonality_penalty,
    regularised_weights,
)
from lightning_ext.testing import crash_in_aggregation  # noqa: E402

# ------------------------------------------------------------------------ independent implementations (equations)


def _reference_centernet_loss(out, targets, c, size_w, off_w, stride=8, alpha=2.0, beta=4.0):
    """CenterNet's loss written from the equations, one heatmap cell and one object at a time."""
    b, _, h, w = out.shape
    objs = []
    for i, t in enumerate(targets):
        for box, lab in zip(t["boxes"].tolist(), t["labels"].tolist()):
            cx, cy = (box[0] + box[2]) / 2 / stride, (box[1] + box[3]) / 2 / stride
            bw, bh = (box[2] - box[0]) / stride, (box[3] - box[1]) / stride
            objs.append((i, lab, math.floor(cx), math.floor(cy), cx, cy, bw, bh))
    heat = [[[[0.0] * w for _ in range(h)] for _ in range(c)] for _ in range(b)]
    for i, lab, px, py, _, _, bw, bh in objs:
        sx, sy = max(bw / 6, 1 / 3), max(bh / 6, 1 / 3)
        for y in range(h):
            for x in range(w):
                g = math.exp(-(x - px) ** 2 / (2 * sx * sx) - (y - py) ** 2 / (2 * sy * sy))
                heat[i][lab][y][x] = max(heat[i][lab][y][x], g)
    total, npos = 0.0, 0
    for i in range(b):
        for k in range(c):
            for y in range(h):
                for x in range(w):
                    p = min(max(1 / (1 + math.exp(-float(out[i, k, y, x]))), 1e-4), 1 - 1e-4)
                    yv = heat[i][k][y][x]
                    if yv == 1.0:
                        total += (1 - p) ** alpha * math.log(p)
                        npos += 1
                    else:
                        total += (1 - yv) ** beta * p ** alpha * math.log(1 - p)
    loss = -total / max(npos, 1)
    if objs:
        size = sum(abs(float(out[i, c, py, px]) - bw) + abs(float(out[i, c + 1, py, px]) - bh)
                   for i, _, px, py, _, _, bw, bh in objs) / len(objs)
        off = sum(abs(float(out[i, c + 2, py, px]) - (cx - px)) + abs(float(out[i, c + 3, py, px]) - (cy - py))
                  for i, _, px, py, cx, cy, _, _ in objs) / len(objs)
        loss += size_w * size + off_w * off
    return loss


def test_centernet_loss_matches_an_independent_implementation_on_one_batch():
    torch.manual_seed(0)
    out = torch.randn(3, 14, 8, 8)
    targets = [{"boxes": torch.tensor([[3.0, 5.0, 21.0, 30.0], [40.0, 33.0, 60.0, 61.0]]), "labels": torch.tensor([2, 7])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
               {"boxes": torch.tensor([[10.0, 10.0, 17.0, 36.0]]), "labels": torch.tensor([2])}]
    loss, parts = centernet_loss(out, targets, 10, size_weight=0.7, offset_weight=1.3)
    ref = _reference_centernet_loss(out, targets, 10, 0.7, 1.3)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert set(parts) == {"heatmap", "size", "offset"}


def test_orthogonality_penalty_and_its_gradient_hook_match_the_closed_form():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.net = TinyCenterNet(widths=(4, 8, 8), neck_width=12)
    names = regularised_weights(model)
    assert names == ["net.neck.0.weight", "net.head.weight"]
    params = dict(model.named_parameters())
    for name in names:  # penalty = sum ||W W^T - I||^2 with the smaller Gram; gradient 4 (W W^T - I) W
        w = params[name].detach().reshape(params[name].shape[0], -1).double()
        m = w if w.shape[0] <= w.shape[1] else w.T
        gram = m @ m.T
        expected = ((gram - torch.eye(len(gram), dtype=torch.double)) ** 2).sum()
        assert float(orthogonality_penalty([params[name].detach()])) == pytest.approx(float(expected), rel=1e-5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    OrthogonalityRegularizer(0.3).on_before_optimizer_step(None, model, None)
    for name in names:
        w = params[name].detach().reshape(params[name].shape[0], -1).double()
        if w.shape[0] <= w.shape[1]:
            closed = 4 * (w @ w.T - torch.eye(w.shape[0], dtype=torch.double)) @ w
        else:
            closed = 4 * w @ (w.T @ w - torch.eye(w.shape[1], dtype=torch.double))
        assert torch.allclose(params[name].grad.reshape(closed.shape).double(), 0.3 * closed, atol=1e-5), name
    assert all(p.grad.abs().sum() == 0 for n, p in model.named_parameters() if n not in names)


def test_decode_recovers_a_planted_box():
    out = torch.full((1, 14, 8, 8), -8.0)
    out[0, 3, 2, 5] = 6.0  # class 3 at cell (row 2, col 5)
    out[0, 10:, 2, 5] = torch.tensor([2.0, 3.0, 0.5, 0.25])  # size in cells, sub-cell offset
    det = decode_detections(out, 10, max_detections=3, score_threshold=0.5)[0]
    assert det["labels"].tolist() == [3]
    cx, cy = (5 + 0.5) * 8, (2 + 0.25) * 8
    assert torch.allclose(det["boxes"][0], torch.tensor([cx - 8, cy - 12, cx + 8, cy + 12]))


# ------------------------------------------------------------------------------------------------ module, client


def _client_dm(i=None, n=None, labelled=False):
    from lightning_ext.detection.domain_canvas import DomainCanvasDetectionDataModule

    return DomainCanvasDetectionDataModule("sklearn" if not labelled else "mnist5k", labelled=labelled,
                                           num_canvases=[16, 8, 8], batch_size=4, partition_id=i, num_clients=n)


def _model():
    from lightning_ext.federated.fedsto_module import FedSTODetector

    return FedSTODetector(widths=(8, 8, 16), neck_width=16, pseudo_label_threshold=0.2)


def _client(**kw):
    from lightning_ext.federated.fedsto import FedSTOClient

    return FedSTOClient(model=_model, datamodule=lambda i, n: _client_dm(i, n), local_steps=3, **kw)


def test_datamodule_hides_training_labels_and_cuts_client_shares():
    dm = _client_dm(1, 2)
    dm.setup()
    assert len(dm.train_set) == 8 and all(set(dm.train_set[i][1]) == {"image_id"} for i in range(8))
    assert "boxes" in dm.split_dataset("val")[0][1]
    x0 = _client_dm(0, 2)
    x0.setup()
    assert not torch.equal(x0.train_set[0][0], dm.train_set[0][0])
    assert dm.split_dataset("val")[0][0].min() > 0.1  # the client domain's brighter background
    with pytest.raises(ValueError, match="partition_id and num_clients"):
        _client_dm(0, None)


def test_ema_teacher_follows_the_student_and_lives_in_the_checkpoint():
    from lightning_ext.federated.fedsto_module import EMATeacher

    student = torch.nn.Linear(3, 2)
    teacher = EMATeacher(student)
    with torch.no_grad():
        teacher.net.weight.zero_()
    teacher.update(student, 0.9)  # the first update copies
    assert torch.equal(teacher.net.weight, student.weight) and bool(teacher.ready)
    old = teacher.net.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    teacher.update(student, 0.9)
    assert torch.allclose(teacher.net.weight, 0.9 * old + 0.1 * student.weight)

    client = _client()
    reply, metrics, state = client.train(client.initial_arrays(), {"server-round": 1, "stage": 2}, None, 0, 2)
    ckpt = torch.load(io.BytesIO(state), weights_only=False)
    sd = ckpt["state_dict"]
    assert bool(sd["teacher.ready"]) and not any(k.startswith("teacher.") for k in reply)
    assert not torch.equal(sd["teacher.net.head.weight"], sd["net.head.weight"])  # an EMA, not a copy
    assert "train_pseudo_boxes" in metrics


def test_stage_one_trains_and_sends_only_the_backbone():
    client = _client()
    start = client.initial_arrays()
    reply, _, state = client.train(start, {"server-round": 1, "stage": 1}, None, 0, 2)
    assert reply and all(k.startswith("net.backbone.") for k in reply)
    assert any(not torch.equal(reply[k], start[k]) for k in reply)
    sd = torch.load(io.BytesIO(state), weights_only=False)["state_dict"]
    for k in start:
        if not k.startswith("net.backbone."):
            assert torch.equal(sd[k], start[k]), k


def _strategy(**kw):
    from lightning_ext.federated.fedsto import fedsto_fedavg

    return fedsto_fedavg(_model, lambda: _client_dm(labelled=True), stage1_rounds=1, server_steps=2, warmup_steps=2,
                         fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2, **kw)


def test_federation_merges_backbone_averages_then_the_server_fine_tunes():
    from lightning_ext.federated.simulation import FederatedSimulation

    strategy = _strategy()
    sim = FederatedSimulation(_client(), 2, 2, strategy, progress=False)
    final = sim.fit()
    assert [h["train/stage"] for h in sim.history] == [1.0, 2.0]
    assert strategy.server_state is not None and not any(k.startswith("teacher.") for k in final)
    assert "train/server-train_loss" in sim.history[0]


def test_federation_resumes_after_a_crash(tmp_path):
    """A crash after round 2's aggregation has run (server state mutated, nothing saved) resumes from round 1."""
    from lightning_ext.federated.simulation import FederatedSimulation

    def make(path=None, crash=False):
        strategy = _strategy()
        if crash:
            crash_in_aggregation(strategy, 2, after=True)
        return FederatedSimulation(_client(), 2, 2, strategy, progress=False, checkpoint_path=path, seed=1)

    reference = make()
    ref = reference.fit()
    path = tmp_path / "fedsto.pt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        make(path, crash=True).fit()
    resumed = make(path)
    resumed.load(path)
    assert resumed.round == 1 and resumed.strategy.server_state is not None
    final = resumed.fit()
    for k in ref:
        assert torch.equal(final[k], ref[k]), k
    for i in range(2):  # every client's state (the EMA teacher included) ends identical
        a = torch.load(io.BytesIO(resumed.state_dict()["nodes"][i]), weights_only=False)["state_dict"]
        b = torch.load(io.BytesIO(reference.state_dict()["nodes"][i]), weights_only=False)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("teacher."))


def test_bad_arguments_fail_with_one_line():
    from lightning_ext.federated.fedsto import FedSTOClient, SelectiveTraining, fedsto_fedavg
    from lightning_ext.federated.fedsto_module import FedSTODetector

    with pytest.raises(ValueError, match="ema_decay"):
        FedSTODetector(ema_decay=1.0)
    with pytest.raises(ValueError, match="pseudo_label_threshold"):
        FedSTODetector(pseudo_label_threshold=float("nan"))
    with pytest.raises(ValueError, match="orthogonal_weight"):
        fedsto_fedavg(_model, lambda: None, orthogonal_weight=-1.0)
    with pytest.raises(TypeError, match="server_data"):
        fedsto_fedavg(_model, "mnist")
    with pytest.raises(ValueError, match="trainable"):
        SelectiveTraining("")
    client = FedSTOClient(backbone="encoder", model=_model, datamodule=lambda i, n: _client_dm(i, n), local_steps=1)
    with pytest.raises(ValueError, match="backbone='encoder'"):
        client.train(client.initial_arrays(), {"server-round": 1, "stage": 1}, None, 0, 2)
    with pytest.raises(ValueError, match="mixes labelled and unlabelled"):
        _model().training_step((torch.zeros(2, 1, 64, 64), [{"image_id": 0}, {"boxes": torch.zeros(0, 4),
                                                                             "labels": torch.zeros(0)}]), 0)


@pytest.mark.slow  # one short federation through `lightning-ext federate`
def test_fedsto_config_runs_through_the_federate_command(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    import yaml

    from lightning_ext.cli import main

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    cfg = yaml.safe_load((root / "configs" / "federated" / "fedsto_digit_canvas.yaml").read_text())
    cfg["federation"].update(local_steps=2)
    cfg["federation"]["strategy_args"].update(server_steps=2, warmup_steps=2, stage1_rounds=1)
    small = tmp_path / "fedsto.yaml"
    small.write_text(yaml.safe_dump(cfg))
    main(["federate", "--config", str(small), "--num_rounds", "2", "--output", str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["rounds"] == 2 and 0.0 <= out["test"]["test_ap50"] <= 1.0
    assert [h["train/stage"] for h in out["history"]] == [1.0, 2.0]
