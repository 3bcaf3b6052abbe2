"""Head-network distillation (HND / GHND): the loss against an independent implementation of the papers' equations
(one batch, through the core, the callback and SplitComputingDetector), the callback's bottleneck insertion and
freezing, bad input, crash-and-resume and two processes against one."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from lightning_ext.data.digits import DigitsDataModule
from lightning_ext.detection.head_distillation import HeadDistiller, head_distillation_loss
from lightning_ext.detection.head_distillation_callback import HeadNetworkDistillation
from lightning_ext.detection.split_computing import BottleneckCodec
from lightning_ext.testing import assert_same_parameters, crash_and_resume


class TinyNet(LightningModule):
    """A digits classifier: two 'head' convs (run on the device), a strided stage, a classifier."""

    def __init__(self, lr: float = 1e-3, seed: int = 0, sgd: bool = False, codec: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lr, self.sgd = lr, sgd
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, 10))
        if codec:  # the user's own bottleneck (no BatchNorm: per-process statistics would differ under DDP)
            self.net[2] = nn.Sequential(nn.Conv2d(8, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 8, 3, padding=1))

    def forward(self, x):
        return self.net(x.reshape(len(x), 1, 8, 8))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=self.lr) if self.sgd else torch.optim.Adam(params, lr=self.lr)


def _independent_loss(student_feats, teacher_feats, weights):
    """The papers' equation written out: sum_l w_l * sum over batch, channels and positions of (f^S - f^T)^2."""
    total = 0.0
    for s, t, w in zip(student_feats, teacher_feats, weights):
        d = (s.double() - t.double()).reshape(-1)
        total += w * sum(float(v) ** 2 for v in d)
    return total


def _stages(net, x):
    """Outputs of every module of a Sequential, computed by hand (no hooks)."""
    outs, h = [], x.reshape(len(x), 1, 8, 8)
    for m in net:
        h = m(h)
        outs.append(h)
    return outs


def test_loss_matches_the_equation_for_hnd_and_ghnd():
    torch.manual_seed(0)
    student, teacher = TinyNet(seed=1), TinyNet(seed=2)
    x = torch.rand(3, 64)
    s, t = _stages(student.net, x), _stages(teacher.net, x)
    names, idx, weights = ["net.1", "net.3", "net.5"], [1, 3, 5], [1.0, 0.5, 2.0]
    ghnd = _independent_loss([s[i] for i in idx], [t[i] for i in idx], weights)
    hnd = _independent_loss([s[1]], [t[1]], [1.0])
    assert float(head_distillation_loss([s[i] for i in idx], [t[i] for i in idx], weights)) == pytest.approx(ghnd, rel=1e-5)
    for method, expected in (("ghnd", ghnd), ("hnd", hnd)):
        distiller = HeadDistiller(student, teacher, names, method=method, weights=weights if method == "ghnd" else None)
        assert float(distiller.loss(x, student_forward=student)) == pytest.approx(expected, rel=1e-5)
    # the teacher's side is detached; the student's gets the gradient 2 w (f^S - f^T)
    feat = s[1].detach().requires_grad_()
    head_distillation_loss([feat], [t[1]], [3.0]).backward()
    torch.testing.assert_close(feat.grad, 6.0 * (s[1] - t[1]).detach())
    with pytest.raises(ValueError, match="does not match"):
        head_distillation_loss([s[1]], [t[4]])


def test_callback_loss_on_one_batch_is_the_equation():
    """The loss the wrapped training_step returns equals the independent GHND sum (task loss weight 0), and with
    task_loss_weight the module's own loss is added."""
    teacher, x, y = TinyNet(seed=2), torch.rand(4, 64), torch.randint(0, 10, (4,))
    for task_weight in (0.0, 0.5):
        student = TinyNet(seed=1)
        cb = HeadNetworkDistillation(teacher, student_layers=["net.1", "net.3"], teacher_layers=["net.3", "net.3"],
                                     method="ghnd", layer_weights=[1.0, 0.25], task_loss_weight=task_weight)
        trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
        cb.setup(trainer, student, "fit")  # the student is not attached: its self.log is a no-op here
        loss = student.training_step((x, y), 0)
        s, t = _stages(student.net, x), _stages(teacher.net, x)
        expected = _independent_loss([s[1], s[3]], [t[3], t[3]], [1.0, 0.25])
        expected += task_weight * float(nn.functional.cross_entropy(student(x), y))
        assert float(loss) == pytest.approx(expected, rel=1e-5)
        cb.teardown(trainer, student, "fit")
        assert "training_step" not in vars(student)


def test_split_detector_uses_the_shared_core_with_the_old_trunk_values(tmp_path):
    """SplitComputingDetector's distill option goes through HeadDistiller and gives what the hand-written trunk
    (backbone block, projection, encoder memory) gives, loss and bottleneck gradients."""
    pytest.importorskip("pycocotools")
    from lightning_ext.detection.detr import DETRDetector
    from lightning_ext.detection.detr_net import sine_position
    from lightning_ext.detection.split_detector import SplitComputingDetector

    torch.manual_seed(11)
    teacher = DETRDetector(hidden_dim=32, num_queries=6, decoder_layers=2)
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, path)
    model = SplitComputingDetector(str(path), bottleneck_channels=3).train()
    assert isinstance(model._distiller, HeadDistiller)

    def trunk(net, x, tap):
        h, tapped = x, None
        for i, module in enumerate(net.backbone):
            h = module(h)
            tapped = h if i == tap else tapped
        feat = net.proj(h)
        memory = feat.flatten(2).transpose(1, 2) + sine_position(*feat.shape[2:], feat.shape[1], feat.device)[None]
        for layer in net.encoder:
            memory = layer(memory)
        return [tapped, feat, memory]

    x = torch.rand(2, 1, 32, 32)
    params = list(model.bottleneck.parameters())
    for mode, k in (("hnd", 1), ("ghnd", 3)):
        model.distill = mode
        new = model.distillation_loss(x)
        with torch.no_grad():
            t = trunk(model.teacher.net, x, model.tap_teacher)
        s = trunk(model.student.net, x, model.tap_student)
        old = sum(((a - b) ** 2).sum() for a, b in zip(s[:k], t[:k]))
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-4)
        for g_new, g_old in zip(torch.autograd.grad(new, params), torch.autograd.grad(old, params)):
            torch.testing.assert_close(g_new, g_old, rtol=1e-4, atol=1e-6)


def _dm(batch_size=16):
    return DigitsDataModule(batch_size=batch_size, train_fraction=0.1, drop_last=True)


def _hnd(method="hnd"):
    layers = ["net.2"] if method == "hnd" else ["net.2", "net.4"]
    return HeadNetworkDistillation(TinyNet(seed=2), student_layers=layers, method=method, bottleneck_layer="net.2",
                                   bottleneck_channels=2, init_from_teacher=True)


@pytest.mark.slow
def test_callback_inserts_the_bottleneck_trains_only_it_and_lowers_the_loss():
    student, cb = TinyNet(seed=1, lr=1e-2), _hnd("ghnd")
    teacher_before = {k: v.clone() for k, v in cb.teacher.state_dict().items()}
    trainer = Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[cb], log_every_n_steps=1)
    losses = []

    from lightning.pytorch import Callback

    class Track(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            losses.append(float(trainer.callback_metrics["hnd_loss_epoch"]))

    trainer.callbacks.append(Track())
    trainer.fit(student, _dm())
    assert isinstance(student.net[2], BottleneckCodec)
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in student.net[2].parameters()}
    torch.testing.assert_close(student.net[4].weight, cb.teacher.net[4].weight)  # copied from the teacher, frozen
    assert losses[-1] < 0.7 * losses[0], losses
    for k, v in cb.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k])
    assert "training_step" not in vars(student) and not cb.teacher.training


@pytest.mark.parametrize("kwargs, word", [
    (dict(student_layers=["net.0", "net.2"], method="hnd"), "one layer"),
    (dict(student_layers=["net.0"], teacher_layers=["net.0", "net.2"]), "one teacher layer per student"),
    (dict(student_layers=["net.0"], layer_weights=[-1.0]), "layer_weights"),
    (dict(student_layers=["net.0"], distillation_weight=float("nan")), "distillation_weight"),
    (dict(), "student_layers"),
    (dict(student_layers=["net.0"], method="fitnets"), "method"),
])
def test_bad_arguments_fail_in_one_line(kwargs, word):
    with pytest.raises(ValueError, match=word):
        HeadNetworkDistillation(TinyNet(seed=2), **kwargs)


@pytest.mark.parametrize("kwargs, word", [
    (dict(student_layers=["net.99"]), "no module 'net.99'"),
    (dict(bottleneck_layer="net.4"), "stride-1 Conv2d"),
    (dict(bottleneck_layer="net.1"), "stride-1 Conv2d"),
    (dict(bottleneck_layer="net.2", bottleneck_channels=8), "narrower"),  # as wide as the conv it replaces
])
def test_bad_layers_fail_at_setup(kwargs, word):
    cb = HeadNetworkDistillation(TinyNet(seed=2), **kwargs)
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[cb])
    with pytest.raises(ValueError, match=word):
        trainer.fit(TinyNet(seed=1), _dm())


@pytest.mark.slow
def test_resume_mid_epoch_gives_the_uninterrupted_parameters(tmp_path):
    """The bottleneck is re-inserted before the checkpoint is restored, the teacher's weights are not copied over
    the restored ones, and the stale wrapper of the crashed fit is dropped."""
    full, resumed, info = crash_and_resume(lambda: TinyNet(seed=1), _dm, lambda: [_hnd("ghnd")], max_epochs=2,
                                           crash_step=5, tmp_path=tmp_path, checkpoint_every_n_steps=2,
                                           weights_only=True, limit_val_batches=0, num_sanity_val_steps=0)
    assert info["resumed_from_step"] == 4
    assert isinstance(resumed.net[2], BottleneckCodec)
    torch.testing.assert_close(resumed.net[4].weight, info["resumed_callbacks"][0].teacher.net[4].weight)
    assert_same_parameters(full, resumed)


@pytest.mark.ddp
def test_two_processes_match_one_process(tmp_path):
    """The summed loss covers the global batch (times the world size per rank), so two gloo processes with half
    the batch each end with the one-process weights (a student that brings its own bottleneck; SGD)."""
    from lightning_ext.testing import fit_ddp_vs_single

    make_model = functools.partial(TinyNet, lr=1e-4, seed=1, sgd=True, codec=True)
    cb = HeadNetworkDistillation(TinyNet(seed=2), student_layers=["net.2", "net.4"], method="ghnd",
                                 trainable=["net.2"])
    single, ddp = fit_ddp_vs_single(make_model, lambda bs: DigitsDataModule(batch_size=bs, train_fraction=0.1,
                                                                            drop_last=True),
                                    16, tmp_path, test=False, max_epochs=1, num_sanity_val_steps=0,
                                    limit_val_batches=0, callbacks=[cb])
    start = make_model().state_dict()
    moved = max(float((single.state_dict[k] - start[k]).abs().max()) for k in start if k.startswith("net.2."))
    assert moved > 1e-4
    for key, value in single.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[key], value, atol=1e-5, rtol=1e-4, msg=key)
