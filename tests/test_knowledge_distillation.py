"""KnowledgeDistillation (callback), DistillationModule and the KD losses/schedules."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_ext.distillation.callback import KnowledgeDistillation
from lightning_ext.distillation.distiller import Distiller, select_input
from lightning_ext.distillation.teacher import build_teacher, load_teacher_weights
from lightning_ext.datamodules import DigitsDataModule
from lightning_ext.distillation.losses import (
    ConstantWeight,
    CosineWeight,
    KeptFractionWeight,
    LinearWeight,
    as_schedule,
    combine_losses,
    feature_mse_loss,
    hinton_loss,
    kd_kl_loss,
    make_projector,
)
from lightning_ext.modules import DistillationModule, ImageClassifier, MLPClassifier
from lightning_ext.testing import assert_same_parameters, crash_and_resume, fit_ddp_vs_single

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
             accelerator="cpu", devices=1)


# -- small models -----------------------------------------------------------------------------------------------


def _student_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _teacher(seed: int = 1, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes))


def _student(seed: int = 0, **kwargs) -> ImageClassifier:
    return ImageClassifier(_student_net(seed), num_classes=10, image_size=8, **kwargs)


def _digits(batch_size: int = 64, **kwargs) -> DigitsDataModule:
    return DigitsDataModule(batch_size=batch_size, drop_last=True, **kwargs)


def _kd(**kwargs) -> KnowledgeDistillation:
    kwargs.setdefault("weight", 0.7)
    kwargs.setdefault("temperature", 3.0)
    kwargs.setdefault("feature_pairs", {"net.2": "2"})  # 16 -> 32 wide: a learnable projector
    kwargs.setdefault("feature_weight", 0.5)
    return KnowledgeDistillation(_teacher(), **kwargs)


class FirstStep(Callback):
    """Records the first batch, the initial weights and the gradients of the first optimizer step."""

    def __init__(self, kd: KnowledgeDistillation | None = None):
        self.kd, self.batch, self.grads = kd, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batch is None:
            self.batch = [b.clone() for b in batch]
            self.net = copy.deepcopy(pl_module.net)
            self.projectors = copy.deepcopy(self.kd.projectors) if self.kd else None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.net.named_parameters()}
            self.projector_grads = [p.grad.clone() for p in self.kd.projectors.parameters()] if self.kd else []


# -- losses and schedules ---------------------------------------------------------------------------------------


def test_kd_kl_loss_is_t_squared_times_kl_of_softened_distributions():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    for T in (1.0, 4.0):
        p_t = F.softmax(t / T, dim=1)
        expected = (p_t * (p_t.log() - F.log_softmax(s / T, dim=1))).sum(1).mean() * T * T
        torch.testing.assert_close(kd_kl_loss(s, t, T), expected)
    assert float(kd_kl_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    # the teacher side carries no gradient; the student's gradient is (p_s - p_t) * T / B
    s.requires_grad_(True)
    t_req = t.clone().requires_grad_(True)
    kd_kl_loss(s, t_req, 2.0).backward()
    assert t_req.grad is None
    torch.testing.assert_close(s.grad, (F.softmax(s / 2, 1) - F.softmax(t / 2, 1)).detach() * 2 / 5)


def test_kd_loss_is_computed_in_float32_and_rejects_bad_input():
    s = torch.randn(4, 3).to(torch.bfloat16)
    assert kd_kl_loss(s, s.flip(0)).dtype == torch.float32
    with pytest.raises(ValueError, match="temperature"):
        kd_kl_loss(s, s, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        kd_kl_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_hinton_loss_and_combine():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,))
    expected = 0.25 * F.cross_entropy(s, y) + 0.75 * kd_kl_loss(s, t, 4.0)
    torch.testing.assert_close(hinton_loss(s, t, y, alpha=0.75, temperature=4.0), expected)
    assert float(combine_losses(torch.tensor(1.0), torch.tensor(3.0), 2.0, "add")) == 7.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        combine_losses(torch.tensor(1.0), torch.tensor(3.0), 2.0, "convex")
    with pytest.raises(ValueError, match="combine"):
        combine_losses(torch.tensor(1.0), torch.tensor(3.0), 0.5, "mean")


def _hinton_reference(s, t, y, alpha, temperature):
    """Loss and its gradient in float64 numpy, from Hinton et al. (2015) and Ben-Baruch et al. (2024), eq. 1:
    L = (1 - a) CE(y, softmax(s)) + a T^2 KL(softmax(t/T) || softmax(s/T)), rows averaged ("batchmean", as in
    torchdistill's KDLoss, whose ``alpha`` weighs the HARD term: its alpha is our 1 - a)."""
    import numpy as np

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    n = s.shape[0]
    onehot = np.eye(s.shape[1])[y]
    p, ps_t, pt_t = softmax(s), softmax(s / temperature), softmax(t / temperature)
    ce = -np.log(p[np.arange(n), y]).mean()
    kl = (pt_t * (np.log(pt_t) - np.log(ps_t))).sum(axis=1).mean()
    loss = (1 - alpha) * ce + alpha * temperature**2 * kl
    # d/ds: (1 - a)(p - onehot)/N + a T^2 (1/T)(softmax(s/T) - softmax(t/T))/N
    grad = ((1 - alpha) * (p - onehot) + alpha * temperature * (ps_t - pt_t)) / n
    return loss, grad


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_hinton_loss_matches_an_independent_implementation_of_the_paper_equation(alpha, temperature):
    gen = torch.Generator().manual_seed(3)
    s, t = 3 * torch.randn(8, 10, generator=gen), 3 * torch.randn(8, 10, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    expected, expected_grad = _hinton_reference(s.double().numpy(), t.double().numpy(), y.numpy(), alpha, temperature)
    s.requires_grad_(True)
    loss = hinton_loss(s, t, y, alpha=alpha, temperature=temperature)
    loss.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(s.grad.double(), torch.from_numpy(expected_grad), rtol=1e-4, atol=1e-6)


def test_projectors_and_feature_loss_align_shapes():
    proj = make_projector((8, 7, 7), (32, 4, 4))
    assert isinstance(proj, nn.Conv2d) and (proj.in_channels, proj.out_channels) == (8, 32)
    s, t = proj(torch.randn(2, 8, 7, 7)), torch.randn(2, 32, 4, 4)
    assert feature_mse_loss(s, t).shape == ()  # the larger map is pooled to 4x4
    assert isinstance(make_projector((10, 16), (10, 24)), nn.Linear)
    assert make_projector((5,), (5,)) is None
    with pytest.raises(ValueError, match="number of dimensions"):
        make_projector((8, 4, 4), (8,))
    with pytest.raises(ValueError, match="sequence lengths"):
        make_projector((10, 16), (12, 16))


def test_weight_schedules():
    assert [LinearWeight(0.0, 1.0, steps=4, delay=2)(k) for k in (0, 2, 4, 6, 100)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    cos = CosineWeight(1.0, 0.2, steps=10)
    assert cos(0) == pytest.approx(1.0) and cos(10) == pytest.approx(0.2) and cos(5) == pytest.approx(0.6)
    assert [KeptFractionWeight(f, 0.5, 0.9)(0) for f in (0.05, 0.1, 0.3, 0.5, 1.0)] == [0.9, 0.9, 0.7, 0.5, 0.5]
    assert isinstance(as_schedule(0.3), ConstantWeight) and as_schedule(0.3)(7) == 0.3
    with pytest.raises(TypeError, match="WeightSchedule"):
        as_schedule("0.3")
    with pytest.raises(ValueError, match="steps"):
        LinearWeight(steps=0)
    with pytest.raises(ValueError, match="kept_fraction"):
        KeptFractionWeight(0.0)


def test_kept_fraction_weight_reads_the_datamodule():
    class FakeTrainer:
        datamodule = _digits(train_fraction=0.3)

    w = KeptFractionWeight()
    w.setup(FakeTrainer())
    assert w.kept_fraction == 0.3 and w(0) == pytest.approx(0.7)

    class NoData:
        datamodule = None

    with pytest.raises(ValueError, match="kept_fraction"):
        KeptFractionWeight().setup(NoData())


# -- the callback changes the loss exactly as the explicit formula -------------------------------------------


def _explicit_loss(net, teacher, projector, x, y, alpha, T, beta):
    feats = {}
    h1 = net[2].register_forward_hook(lambda m, a, o: feats.__setitem__("s", o))
    h2 = teacher[2].register_forward_hook(lambda m, a, o: feats.__setitem__("t", o))
    logits = net(x)
    with torch.no_grad():
        t_logits = teacher(x)
    h1.remove(), h2.remove()
    p_t = F.softmax(t_logits / T, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(logits / T, dim=1))).sum(1).mean() * T * T
    feat = ((projector(feats["s"]) - feats["t"]) ** 2).mean()
    return (1 - alpha) * F.cross_entropy(logits, y) + alpha * kl + beta * feat


def test_callback_gradients_equal_those_of_the_explicitly_combined_loss():
    kd = _kd()
    rec = FirstStep(kd)
    student = _student()
    trainer = Trainer(max_steps=1, callbacks=[kd, rec], **QUIET)
    trainer.fit(student, datamodule=_digits())
    assert "training_step" not in student.__dict__  # the wrapper is removed after fit

    x, y = rec.batch
    net, projector = rec.net, rec.projectors["net_2__2"]
    loss = _explicit_loss(net, kd.teacher, projector, x, y, alpha=0.7, T=3.0, beta=0.5)
    loss.backward()
    assert rec.grads.keys() == dict(net.named_parameters()).keys()
    for name, p in net.named_parameters():
        torch.testing.assert_close(rec.grads[name], p.grad, atol=1e-7, rtol=1e-6, msg=name)
    torch.testing.assert_close(rec.projector_grads[0], projector.weight.grad, atol=1e-7, rtol=1e-6)
    # and the KD terms really contribute: the plain cross-entropy gradient is different
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    assert not torch.allclose(rec.grads["3.weight"], net[3].weight.grad, atol=1e-4)


def test_add_mode_and_weight_schedule_follow_the_global_step():
    seen = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step, float(trainer.callback_metrics["train_kd_weight"])))

    kd = _kd(weight=LinearWeight(0.0, 2.0, steps=4), combine="add", feature_pairs=None)
    Trainer(max_steps=6, callbacks=[kd, Spy()], **QUIET).fit(_student(), datamodule=_digits())
    # logged during step k (global_step k before the optimizer step), weight = 2 * min(k / 4, 1)
    assert [w for _, w in seen] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0])


def test_gradient_accumulation_matches_a_larger_batch():
    def run(batch_size, accumulate):
        kd = _kd()
        model = _student(lr=0.01)
        Trainer(max_epochs=1, accumulate_grad_batches=accumulate, callbacks=[kd], **QUIET).fit(
            model, datamodule=_digits(batch_size))
        return model, kd

    big, kd_big = run(64, 1)
    small, kd_small = run(32, 2)
    assert_same_parameters(big, small, atol=1e-5)
    assert_same_parameters(kd_big.projectors, kd_small.projectors, atol=1e-5)


def test_bf16_mixed_precision_on_cpu_runs_and_trains():
    kd = _kd()
    model = _student(lr=0.01)
    before = copy.deepcopy(model.net.state_dict())
    trainer = Trainer(max_steps=5, precision="bf16-mixed", callbacks=[kd], **QUIET)
    trainer.fit(model, datamodule=_digits())
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train_kd_loss"])) and math.isfinite(float(metrics["train_kd_feature_loss"]))
    assert not torch.equal(before["1.weight"], model.net[1].weight)
    assert kd.projectors["net_2__2"].weight.dtype == torch.float32  # parameters stay fp32 under mixed precision


# -- the teacher ---------------------------------------------------------------------------------------------


def test_teacher_is_frozen_in_eval_mode_outside_the_optimizer_and_the_checkpoint(tmp_path):
    teacher = _teacher()
    teacher.train()
    teacher_before = copy.deepcopy(teacher.state_dict())
    kd = KnowledgeDistillation(teacher, feature_pairs={"net.2": "2"})
    model = _student()
    seen = {}

    class Inspect(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            optimizer = trainer.optimizers[0]
            ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            seen["teacher_in_optimizer"] = any(id(p) in ids for p in teacher.parameters())
            seen["projector_in_optimizer"] = all(id(p) in ids for p in kd.projectors.parameters())
            seen["teacher_training"] = teacher.training

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = Trainer(max_steps=3, callbacks=[kd, Inspect(), ckpt], **{**QUIET, "enable_checkpointing": True})
    trainer.fit(model, datamodule=_digits())
    assert seen == {"teacher_in_optimizer": False, "projector_in_optimizer": True, "teacher_training": False}
    assert not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert set(state["state_dict"]) == set(model.state_dict())  # the student only, no teacher/projector tensors
    assert [k for k in state["callbacks"] if k.startswith("KnowledgeDistillation")]
    assert sum(len(g["params"]) for g in state["optimizer_states"][0]["param_groups"]) == len(
        list(model.parameters())) + 1  # + the projector's weight


def test_mismatched_teacher_is_refused_before_training_and_the_student_is_left_untouched():
    model = _student()
    before = copy.deepcopy(model.state_dict())
    kd = KnowledgeDistillation(_teacher(classes=5))
    with pytest.raises(ValueError, match=r"teacher predicts 5 classes and the student 10"):
        Trainer(max_steps=2, callbacks=[kd], **QUIET).fit(model, datamodule=_digits())
    assert "training_step" not in model.__dict__
    assert_same_parameters(model, ImageClassifier(_student_net(), num_classes=10, image_size=8))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])

    wrong_input = KnowledgeDistillation(nn.Sequential(nn.Flatten(), nn.Linear(100, 10)))
    with pytest.raises(ValueError, match="cannot process the student's inputs"):
        Trainer(max_steps=2, callbacks=[wrong_input], **QUIET).fit(_student(), datamodule=_digits())

    shared = _student()
    with pytest.raises(ValueError, match="shares parameters"):
        Trainer(max_steps=2, callbacks=[KnowledgeDistillation(shared.net)], **QUIET).fit(shared, datamodule=_digits())
    assert all(p.requires_grad for p in shared.parameters())


def test_bad_module_names_and_arguments_get_clear_errors():
    with pytest.raises(ValueError, match=r"no module named 'net.3x'.*Close names: net.3"):
        Trainer(max_steps=1, callbacks=[_kd(feature_pairs={"net.3x": "2"})], **QUIET).fit(
            _student(), datamodule=_digits())
    with pytest.raises(ValueError, match="combine"):
        KnowledgeDistillation(_teacher(), combine="sum")
    with pytest.raises(ValueError, match="weight"):
        KnowledgeDistillation(_teacher(), weight=1.5)
    with pytest.raises(ValueError, match="temperature"):
        KnowledgeDistillation(_teacher(), temperature=0)
    with pytest.raises(ValueError, match="looks like a file"):
        KnowledgeDistillation("runs/teacher.ckpt")
    with pytest.raises(ValueError, match="Close names"):
        KnowledgeDistillation("timm:resnet10", teacher_kwargs={"num_classes": 10})
    with pytest.raises(FileNotFoundError, match="teacher_checkpoint"):
        KnowledgeDistillation(_teacher(), teacher_checkpoint="/nonexistent/teacher.pt")
    with pytest.raises(TypeError, match="input_key"):
        KnowledgeDistillation(_teacher(), input_key=1.5)


def test_student_logits_must_come_from_a_module_that_runs():
    class CallsNetDirectly(ImageClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

    model = CallsNetDirectly(_student_net(), num_classes=10, image_size=8)
    with pytest.raises(RuntimeError, match="student_module"):
        Trainer(max_steps=1, callbacks=[KnowledgeDistillation(_teacher())], **QUIET).fit(model, datamodule=_digits())
    rec = FirstStep()
    Trainer(max_steps=1, callbacks=[KnowledgeDistillation(_teacher(), student_module="net"), rec], **QUIET).fit(
        CallsNetDirectly(_student_net(), num_classes=10, image_size=8), datamodule=_digits())
    assert rec.grads is not None


class DictBatchModel(ImageClassifier):
    """A module whose batches are dicts: the teacher's input is found by key (or from the student's input)."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["image"]), batch["label"])


def _dict_loader():
    from torch.utils.data import DataLoader

    dm = _digits()
    dm.setup()
    x, y = dm.train_set.tensors
    return DataLoader([{"image": x[i], "label": y[i]} for i in range(128)], batch_size=32)


@pytest.mark.parametrize("input_key", ["image", None])
def test_dict_batches_and_the_first_batch_check(input_key):
    model = DictBatchModel(_student_net(), num_classes=10, image_size=8)
    trainer = Trainer(max_steps=2, callbacks=[KnowledgeDistillation(_teacher(), input_key=input_key)], **QUIET)
    with pytest.warns(UserWarning, match="checked on the first training batch"):
        trainer.fit(model, train_dataloaders=_dict_loader())  # no datamodule: no probe before training
    assert float(trainer.callback_metrics["train_kd_loss"]) > 0

    bad = DictBatchModel(_student_net(), num_classes=10, image_size=8)
    before = copy.deepcopy(bad.state_dict())
    with pytest.raises(ValueError, match="teacher predicts 5 classes"):
        Trainer(max_steps=2, callbacks=[KnowledgeDistillation(_teacher(classes=5), input_key=input_key)],
                **QUIET).fit(bad, train_dataloaders=_dict_loader())
    for k, v in bad.state_dict().items():  # refused before any optimizer step
        assert torch.equal(v, before[k]), k


def test_manual_optimization_is_refused():
    class Manual(ImageClassifier):
        def __init__(self):
            super().__init__(_student_net(), num_classes=10, image_size=8)
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="manual optimization"):
        Trainer(max_steps=1, callbacks=[KnowledgeDistillation(_teacher())], **QUIET).fit(Manual(), datamodule=_digits())


def test_teacher_weights_load_with_weights_only(tmp_path):
    trained = _teacher(seed=5)
    torch.save(trained.state_dict(), tmp_path / "plain.pt")
    loaded = build_teacher(_teacher(seed=6), str(tmp_path / "plain.pt"))
    assert_same_parameters(trained, loaded)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())

    # a Lightning checkpoint of a LightningModule: its "net." prefix is matched to a plain teacher module
    module = ImageClassifier(_teacher(seed=7), num_classes=10, image_size=8)
    trainer = Trainer(max_steps=1, **QUIET)
    trainer.fit(module, datamodule=_digits())
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    plain = build_teacher(_teacher(seed=8), str(tmp_path / "teacher.ckpt"))
    assert_same_parameters(module.net, plain)

    # a LightningModule class path: rebuilt from the checkpoint's hyperparameters, then loaded
    mlp = MLPClassifier(num_features=64, num_classes=10, hidden=[24])
    torch.save({"state_dict": mlp.state_dict(), "hyper_parameters": dict(mlp.hparams)}, tmp_path / "mlp.ckpt")
    rebuilt = build_teacher("lightning_ext.modules.MLPClassifier", str(tmp_path / "mlp.ckpt"))
    assert isinstance(rebuilt, MLPClassifier) and rebuilt.hparams["hidden"] == [24]
    assert_same_parameters(mlp, rebuilt)

    # pickled objects are refused (weights_only=True), as are files that do not fit the architecture
    torch.save({"state_dict": trained.state_dict(), "extra": FirstStep()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        build_teacher(_teacher(), str(tmp_path / "pickled.pt"))
    with pytest.raises(ValueError, match="missing"):
        load_teacher_weights(nn.Linear(3, 3), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="other shapes"):
        load_teacher_weights(_teacher(classes=5), tmp_path / "plain.pt")


def test_teacher_by_name_and_class_path():
    timm_teacher = build_teacher("timm:resnet10t", None, {"num_classes": 10, "in_chans": 1})
    assert timm_teacher(torch.zeros(2, 1, 28, 28)).shape == (2, 10) and not timm_teacher.training
    seq = build_teacher("torch.nn.Linear", None, {"in_features": 4, "out_features": 3})
    assert isinstance(seq, nn.Linear)
    with pytest.raises(ValueError, match="class path"):
        build_teacher("resnet18")
    with pytest.raises(ValueError, match="teacher_kwargs"):
        build_teacher(_teacher(), None, {"num_classes": 3})


def test_select_input():
    x = torch.zeros(3, 2)
    assert select_input((x, 1), 0) is x and select_input({"img": x}, "img") is x and select_input(x, 0) is x
    with pytest.raises(KeyError, match="img"):
        select_input({"image": x}, "img")
    with pytest.raises(TypeError, match="dict batches"):
        select_input({"image": x}, 0)


# -- resume, DDP ---------------------------------------------------------------------------------------------


def _initial_projectors() -> dict:
    """The projector weights a fresh ``_kd()`` starts from (seeded, so the same in every run)."""
    kd, student = _kd(), _student()
    kd._distiller.attach(student)
    kd._distiller.build(student, torch.zeros(2, 1, 8, 8))
    kd._distiller.detach()
    return kd.projectors.state_dict()


def _half_digits() -> DigitsDataModule:
    return _digits(train_fraction=0.5)  # 10 steps per epoch


def _resume_model():
    return _student(lr=0.01, scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))


def test_projector_is_trained_saved_and_restored_on_resume(tmp_path):
    full, resumed, info = crash_and_resume(_resume_model, _half_digits, lambda: [_kd()], max_epochs=3, crash_epoch=2,
                                           tmp_path=tmp_path)
    assert_same_parameters(full, resumed)
    full_kd, resumed_kd = info["full_callbacks"][0], info["resumed_callbacks"][0]
    assert_same_parameters(full_kd.projectors, resumed_kd.projectors)
    initial = _initial_projectors()
    assert not torch.allclose(initial["net_2__2.weight"], full_kd.projectors["net_2__2"].weight, atol=1e-3)
    # the projector's param group is scheduled like the others (StepLR halves every epoch)
    lrs = [g["lr"] for g in info["resumed_trainer"].optimizers[0].param_groups]
    assert len(lrs) == 2 and lrs[0] == lrs[1] == pytest.approx(0.01 * 0.5**3)


def test_resume_without_the_projector_state_differs(tmp_path):
    """Control: the resume test above can fail. A callback that drops its state resumes with fresh projectors."""

    class Forgetful(KnowledgeDistillation):
        def load_state_dict(self, state_dict):
            pass

    full, resumed, _ = crash_and_resume(_resume_model, _half_digits, lambda: [Forgetful(_teacher(), weight=0.7,
                                        feature_pairs={"net.2": "2"}, feature_weight=5.0)],
                                        max_epochs=3, crash_epoch=2, tmp_path=tmp_path)
    with pytest.raises(AssertionError):
        assert_same_parameters(full, resumed)


def test_several_instances_have_distinct_state_keys():
    a, b = _kd(), _kd(feature_pairs={"net.1": "1"})
    assert a.state_key != b.state_key


class SaveProjectors(Callback):
    def on_fit_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            kd = next(c for c in trainer.callbacks if isinstance(c, KnowledgeDistillation))
            torch.save(kd.projectors.state_dict(), f"{trainer.logger.log_dir}/projectors.pt")


@pytest.mark.ddp
def test_ddp_two_processes_match_one_process(tmp_path):
    kd = _kd()
    single, ddp = fit_ddp_vs_single(lambda: _student(lr=0.01), _digits, global_batch_size=64, tmp_path=tmp_path,
                                    test=False, max_epochs=1, callbacks=[kd, SaveProjectors()])
    for name, value in single.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[name], value, atol=1e-5, rtol=1e-5, msg=name)
    for key in ("train_loss_epoch", "val_loss"):
        torch.testing.assert_close(torch.tensor(ddp.curve(key)), torch.tensor(single.curve(key)), atol=1e-5, rtol=0)
    p_single = torch.load(tmp_path / "single" / "projectors.pt", weights_only=True)
    p_ddp = torch.load(tmp_path / "ddp" / "projectors.pt", weights_only=True)
    initial = _initial_projectors()
    for k, v in p_single.items():
        torch.testing.assert_close(p_ddp[k], v, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(v, initial[k], atol=1e-4)  # it was trained


# -- DistillationModule (explicit composition, same core) ------------------------------------------------------


def test_distillation_module_trains_like_the_callback():
    kd = _kd()
    via_callback = _student(lr=0.01)
    Trainer(max_steps=8, callbacks=[kd], **QUIET).fit(via_callback, datamodule=_digits())
    explicit = DistillationModule(_student_net(), _teacher(), num_classes=10, weight=0.7, temperature=3.0,
                                  feature_pairs={"2": "2"}, feature_weight=0.5, input_shape=(1, 8, 8), lr=0.01)
    Trainer(max_steps=8, **QUIET).fit(explicit, datamodule=_digits())
    assert_same_parameters(via_callback.net, explicit.net, atol=1e-6)
    torch.testing.assert_close(explicit.projectors["2__2"].weight, kd.projectors["net_2__2"].weight, atol=1e-6, rtol=1e-5)


def test_distillation_module_keeps_the_teacher_out_of_its_state_and_optimizer(tmp_path):
    model = DistillationModule(_student_net(), _teacher(), num_classes=10, input_shape=(1, 8, 8),
                               feature_pairs={"2": "2"})
    assert not any(k.startswith(("teacher", "distiller")) for k in model.state_dict())
    assert "projectors.2__2.weight" in model.state_dict()
    ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in ids for p in model.teacher.parameters())
    with pytest.raises(ValueError, match="teacher predicts 5 classes"):
        DistillationModule(_student_net(), _teacher(classes=5), num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        DistillationModule(_student_net(), _teacher(), num_classes=10, feature_pairs={"2": "2"})
    trainer = Trainer(max_steps=2, **{**QUIET, "enable_checkpointing": True}, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=_digits())
    ckpt = torch.load(trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
                      or next(tmp_path.rglob("*.ckpt")), weights_only=True)
    assert set(ckpt["state_dict"]) == set(model.state_dict())


def test_distiller_works_without_a_trainer():
    student, teacher = _student_net(), _teacher()
    d = Distiller(teacher, temperature=2.0, feature_pairs={"2": "2"})
    d.attach(student)
    d.build(student, torch.zeros(2, 1, 8, 8))
    x = torch.randn(4, 1, 8, 8)
    with d.capturing():
        logits = student(x)
    terms = d.terms(logits, d.teacher_logits(x))
    (terms["kd"] + terms["feature"]).backward()
    assert student[1].weight.grad is not None and d.projectors["2__2"].weight.grad is not None
    d.detach()
    assert not student[2]._forward_hooks


# -- declarative validation: one clear ValueError naming the argument ---------------------------------------------

NAN, INF = float("nan"), float("inf")
KD_BAD = [
    ("temperature", {"temperature": NAN}),
    ("temperature", {"temperature": INF}),
    ("temperature", {"temperature": -1.0}),
    ("combine", {"combine": "sum"}),
    ("weight", {"weight": NAN}),
    ("weight", {"weight": INF}),
    ("weight", {"weight": -0.1}),
    ("weight", {"weight": 1.5}),  # above 1 with combine='convex'
    ("feature_weight", {"feature_weight": NAN}),
    ("feature_weight", {"feature_weight": -1.0}),
    ("input_shape", {"input_shape": [1, 0, 8]}),
    ("optimizer_index", {"optimizer_index": -1}),
]


@pytest.mark.parametrize("name,kwargs", KD_BAD, ids=lambda v: str(v))
def test_knowledge_distillation_refuses_bad_values(name, kwargs):
    with pytest.raises(ValueError, match=name) as info:
        KnowledgeDistillation(_teacher(), **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name,kwargs", [kv for kv in KD_BAD if kv[0] not in ("input_shape", "optimizer_index")]
                         + [("input_shape", {"input_shape": (1, -8, 8)})], ids=lambda v: str(v))
def test_distillation_module_refuses_bad_values(name, kwargs):
    with pytest.raises(ValueError, match=name):
        DistillationModule(_student_net(), _teacher(), num_classes=10, **kwargs)


@pytest.mark.parametrize("make", [lambda: ConstantWeight(NAN), lambda: LinearWeight(start=INF),
                                  lambda: CosineWeight(steps=0), lambda: KeptFractionWeight(kept_fraction=NAN),
                                  lambda: KeptFractionWeight(min_weight=NAN)])
def test_weight_schedules_refuse_non_finite_values(make):
    with pytest.raises(ValueError, match="finite number|integer"):
        make()


def test_a_teacher_checkpoint_with_nan_weights_is_refused(tmp_path):
    state = _teacher(seed=5).state_dict()
    state["3.bias"][2] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"Teacher checkpoint .*nan\.pt: tensor '3\.bias' holds 1 non-finite"):
        build_teacher(_teacher(seed=6), str(tmp_path / "nan.pt"))
    with pytest.raises(ValueError, match="non-finite"):
        KnowledgeDistillation(_teacher(), teacher_checkpoint=str(tmp_path / "nan.pt"))


def test_kd_refuses_sharded_strategies_in_setup():
    import types

    class FSDPStrategy:  # stands in for Lightning's: only the class name is inspected
        pass

    with pytest.raises(RuntimeError, match="KnowledgeDistillation .*FSDPStrategy shards them"):
        _kd().setup(types.SimpleNamespace(strategy=FSDPStrategy()), _student(), "fit")


def test_hooks_are_marked_override_with_a_docstring():
    from lightning_ext.distillation.module import DistillationModule as Module

    for cls, hooks in ((KnowledgeDistillation, ("setup", "on_fit_start", "on_train_epoch_start", "teardown",
                                                "on_before_optimizer_step", "on_exception", "state_dict",
                                                "load_state_dict")),
                       (Module, ("setup", "teardown", "on_fit_start", "on_train_epoch_start", "training_step"))):
        for hook in hooks:
            fn = vars(cls)[hook]
            assert getattr(fn, "__override__", False) and fn.__doc__, f"{cls.__name__}.{hook}"
