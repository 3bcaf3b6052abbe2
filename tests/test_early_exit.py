"""EarlyExitClassifier, the attacks and TransferAttackEvaluation: the joint exit loss, exit policy, FGSM and PGD steps
against independent implementations, ε-ball and range constraints, the static twin, compute accounting, the
callback end to end, resume and bad inputs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import nn

from lightning_ext.data.digits import DigitsDataModule
from lightning_ext.testing import assert_same_parameters, crash_and_resume
from lightning_ext.vision.adversarial import attack_loss_fn, fgsm, pgd, transfer_attack
from lightning_ext.vision.early_exit import EarlyExitNetwork, exit_decisions, joint_exit_loss
from lightning_ext.vision.early_exit_classifier import EarlyExitClassifier
from lightning_ext.vision.transfer_attack_evaluation import TransferAttackEvaluation


def _tiny_backbone():
    block = lambda i, o, s: nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.BatchNorm2d(o), nn.ReLU())  # noqa: E731
    return nn.Sequential(block(1, 8, 1), block(8, 16, 2), block(16, 16, 2))


def _model(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return EarlyExitClassifier(_tiny_backbone(), num_classes=10, in_chans=1, image_size=8, **kw)


def test_joint_exit_loss_equals_the_weighted_sum_of_exit_cross_entropies():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(7, 5, generator=g) for _ in range(3)]
    y = torch.randint(0, 5, (7,), generator=g)
    w = [0.3, 0.5, 2.0]
    # independent: -log softmax at the label, averaged over the batch, weighted sum over exits
    expected = sum(wk * -(z[torch.arange(7), y] - z.exp().sum(1).log()).mean() for wk, z in zip(w, logits))
    torch.testing.assert_close(joint_exit_loss(logits, y, w), expected)
    torch.testing.assert_close(joint_exit_loss(logits, y), sum(F.cross_entropy(z, y) for z in logits))


@pytest.mark.parametrize("policy", ["confidence", "entropy"])
def test_exit_decisions_match_a_per_sample_loop(policy):
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(50, 4, generator=g) * s for s in (1.0, 2.0, 3.0)]
    tau = 0.7
    got = exit_decisions(logits, tau, policy)
    for i in range(50):
        want = 2
        for k in range(2):
            p = logits[k][i].softmax(0)
            ent = float(-(p * p.log()).sum() / math.log(4))
            if (policy == "confidence" and float(p.max()) >= tau) or (policy == "entropy" and ent <= 1 - tau):
                want = k
                break
        assert int(got[i]) == want, (i, policy)


def test_exits_are_ordered_by_depth_and_compute_grows_to_one():
    model = _model()
    assert model.net.exit_stages == [0, 1, 2]
    ff = model.flops_fraction
    assert all(a < b for a, b in zip(ff, ff[1:])) and ff[-1] == pytest.approx(1.0)
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    exits = model.forward_exits(x)
    torch.testing.assert_close(model.forward_exits(x, upto=1)[1], exits[1])
    chosen, taken = model.exit_and_logits(x)
    torch.testing.assert_close(taken, torch.stack(exits, 1)[torch.arange(4), chosen])
    model.net.threshold = 0.0  # everything leaves at the first exit
    torch.testing.assert_close(model(x), exits[0])
    model.net.threshold = 1.0  # softmax never reaches 1 here: everything goes to the end
    torch.testing.assert_close(model(x), exits[-1])


def test_pooled_internal_exits_keep_a_coarse_layout_and_the_final_exit_pools_globally():
    model = _model(exit_pool_size=2)
    assert [h[-1].in_features for h in model.net.heads] == [8 * 4, 16 * 4, 16]
    model.eval()
    x = torch.randn(5, 1, 8, 8)
    h0 = model.net.stages[0](x)
    h2 = model.net.stages[2](model.net.stages[1](h0))
    # independent: 8x8 map -> mean over each 4x4 quadrant, row-major (channel, row, column) flattening
    quads = h0.reshape(5, 8, 2, 4, 2, 4).mean(dim=(3, 5)).reshape(5, -1)
    exits = model.forward_exits(x)
    torch.testing.assert_close(exits[0], quads @ model.net.heads[0][-1].weight.T + model.net.heads[0][-1].bias)
    torch.testing.assert_close(exits[-1], model.net.heads[-1][-1](h2.mean(dim=(2, 3))))
    twin = model.static_twin(share_weights=True).eval()  # the twin is the final path, whatever the exits' pooling
    torch.testing.assert_close(twin(x), exits[-1])
    ff = model.flops_fraction
    assert all(a < b for a, b in zip(ff, ff[1:])) and ff[-1] == pytest.approx(1.0)


def test_timm_backbone_gets_one_exit_per_feature_stage():
    model = EarlyExitClassifier("resnet10t", num_classes=3, in_chans=1, image_size=8, exits=[1, 3])
    assert model.net.exit_stages == [1, 3] and model.num_exits == 2
    assert [z.shape for z in model.forward_exits(torch.zeros(2, 1, 8, 8))] == [torch.Size([2, 3])] * 2


def test_static_twin_shares_no_parameters_and_can_copy_the_final_exit():
    model = _model()
    twin, same = model.static_twin(), model.static_twin(share_weights=True)
    for t in (twin, same):
        assert t.num_exits == 1
        ptrs = {p.data_ptr() for p in model.parameters()}
        assert not ptrs & {p.data_ptr() for p in t.parameters()}
    x = torch.randn(3, 1, 8, 8)
    model.eval(), same.eval(), twin.eval()
    torch.testing.assert_close(same(x), model.forward_exits(x)[-1])
    assert not torch.allclose(twin(x), model.forward_exits(x)[-1])


def _independent_loss(model, x, y):
    return F.cross_entropy(model(x), y, reduction="sum")


def test_fgsm_is_one_signed_gradient_step_clipped_to_range():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(5, 1, 4, 4), torch.randint(0, 3, (5,))
    xg = x.clone().requires_grad_(True)
    _independent_loss(model, xg, y).backward()
    expected = torch.clamp(x + 0.2 * xg.grad.sign(), 0, 1)
    torch.testing.assert_close(fgsm(attack_loss_fn(model), x, y, 0.2), expected)


def test_pgd_steps_equal_an_independent_implementation():
    # torchattacks' PGD convention: x += α sign(g); project to [x - ε, x + ε]; clamp to [0, 1]; random start U(-ε, ε)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,))
    eps, alpha = 0.1, 0.04
    g = torch.Generator().manual_seed(3)
    adv, first = pgd(attack_loss_fn(model), x, y, eps, steps=3, step_size=alpha, random_start=True,
                     predict=model, generator=g)
    g2 = torch.Generator().manual_seed(3)
    z = torch.clamp(x + eps * (torch.rand(x.shape, generator=g2) * 2 - 1), 0, 1)
    fooled_at = torch.full((6,), 4)
    for i in range(3):
        z = z.clone().requires_grad_(True)
        _independent_loss(model, z, y).backward()
        z = torch.clamp(torch.min(torch.max(z.detach() + alpha * z.grad.sign(), x - eps), x + eps), 0, 1)
        wrong = model(z).argmax(1) != y
        fooled_at = torch.where(wrong & (fooled_at == 4), torch.full_like(fooled_at, i + 1), fooled_at)
    torch.testing.assert_close(adv, z)
    assert first.tolist() == fooled_at.tolist()
    assert float((adv - x).abs().max()) <= eps + 1e-6 and 0 <= float(adv.min()) and float(adv.max()) <= 1


def test_source_loss_modes_of_a_multi_exit_model():
    model = _model().eval()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    exits = model.forward_exits(x)
    torch.testing.assert_close(attack_loss_fn(model, "final")(x, y), F.cross_entropy(exits[-1], y, reduction="sum"))
    torch.testing.assert_close(attack_loss_fn(model, "sum")(x, y),
                               sum(F.cross_entropy(z, y, reduction="sum") for z in exits))
    model.net.threshold = 0.0  # the taken exit is exit 0: the loss is exit 0's and only its head gets a gradient
    loss = attack_loss_fn(model, "taken")(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(exits[0], y, reduction="sum"))
    loss.backward()
    assert model.net.heads[0][2].weight.grad.abs().sum() > 0
    assert model.net.heads[2][2].weight.grad is None or model.net.heads[2][2].weight.grad.abs().sum() == 0


def test_transfer_to_the_same_model_is_total_and_to_a_constant_model_is_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(64, 1, 4, 4)
    y = model(x).argmax(1).detach()  # every input correct for the source
    r = transfer_attack(model, model, x, y, epsilon=0.5, steps=5)
    assert r["n"] == 64 and r["white_box_success"] > 0.5 and r["transfer_success"] == 1.0

    c = int(y.mode().values)

    class Constant(nn.Module):
        def forward(self, x):
            return torch.zeros(len(x), 3).index_fill_(1, torch.tensor([c]), 1.0)

    keep = y == c
    r = transfer_attack(model, Constant(), x[keep], y[keep], epsilon=0.5, steps=5)
    assert r["transfer_success"] == 0.0 or math.isnan(r["transfer_success"])


def _dm():
    return DigitsDataModule(batch_size=64)


@pytest.mark.slow  # ~15-25 s on the loaded 2-core machine
def test_training_then_the_callback_reports_transfer_both_ways(tmp_path):
    model = _model(lr=3e-3)
    cb = TransferAttackEvaluation(twin_checkpoint=None, epsilon=0.5, steps=3, num_samples=64, clamp_min=None,
                                  clamp_max=None, source_loss=["taken", "final"], report_path="attack.json")
    trainer = Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                      callbacks=[cb])
    trainer.fit(model, datamodule=_dm())
    assert float(trainer.callback_metrics["val_acc"]) > 0.5
    assert 0 <= float(trainer.callback_metrics["val_exit_mean"]) <= 2
    assert 0 < float(trainer.callback_metrics["val_flops_fraction"]) <= 1
    trainer.test(model, datamodule=_dm())
    s = cb.report["summary"]
    assert set(s) >= {"white_box_dynamic", "white_box_static", "transfer_dynamic_to_static",
                      "transfer_static_to_dynamic", "transfer_asymmetry", "dynamic_flops_adv"}
    assert s["white_box_dynamic"] > 0.5 and 0 <= s["transfer_dynamic_to_static"] <= 1
    assert "attack/transfer_asymmetry" in trainer.callback_metrics
    assert json.loads((tmp_path / "attack.json").read_text())["n_inputs"] == 64


def test_callback_with_a_separately_trained_twin_checkpoint(tmp_path):
    model = _model()
    twin = model.static_twin()
    torch.save({"state_dict": twin.state_dict()}, tmp_path / "twin.ckpt")
    cb = TransferAttackEvaluation(twin_checkpoint="twin.ckpt", epsilon=0.5, steps=2, num_samples=32,
                                  clamp_min=None, clamp_max=None, report_path=None)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                      callbacks=[cb], limit_test_batches=1)
    trainer.test(model, datamodule=_dm())
    assert cb.report["n_inputs"] == 32
    loaded = cb._twin(trainer, model)
    for (k, a), b in zip(loaded.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_callback_refuses_a_plain_classifier(tmp_path):
    from lightning_ext.vision.classifier import Classifier

    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                      callbacks=[TransferAttackEvaluation()], limit_test_batches=1)
    with pytest.raises(ValueError, match="needs an EarlyExitClassifier"):
        trainer.test(Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 10), datamodule=_dm())


@pytest.mark.slow  # three short fits: ~20-70 s on the loaded 2-core machine
def test_crash_and_resume_mid_epoch(tmp_path):
    full, resumed, info = crash_and_resume(lambda: _model(lr=3e-3),
                                           lambda: DigitsDataModule(batch_size=64, train_fraction=0.25),
                                           lambda: [], max_epochs=2, tmp_path=tmp_path, crash_step=7,
                                           limit_val_batches=0)
    assert info["resumed_from_step"] == 7
    assert_same_parameters(full, resumed)


@pytest.mark.parametrize("make, match", [
    (lambda: _model(exits=[5]), r"\[0, 2\]"),
    (lambda: _model(exit_weights=[1.0, 1.0]), "one weight per exit"),
    (lambda: _model(exit_weights=[1.0, float("nan"), 1.0]), "exit_weights"),
    (lambda: _model(threshold=1.5), "threshold"),
    (lambda: _model(policy="margin"), "policy"),
    (lambda: _model(exit_pool_size=0), "exit_pool_size"),
    (lambda: EarlyExitClassifier(nn.Linear(3, 3), num_classes=3, in_chans=1, image_size=8), "nn.Sequential"),
    (lambda: EarlyExitClassifier("resnet10x", num_classes=3), "Unknown timm backbone"),
    (lambda: EarlyExitNetwork([nn.Identity()], [3, 4], 2), "one channel count per stage"),
    (lambda: joint_exit_loss([torch.zeros(2, 3)], torch.zeros(2).long(), [1.0, 2.0]), "one weight per exit"),
    (lambda: fgsm(attack_loss_fn(nn.Linear(2, 2)), torch.zeros(1, 2), torch.zeros(1).long(), 0.0), "epsilon"),
    (lambda: pgd(attack_loss_fn(nn.Linear(2, 2)), torch.zeros(1, 2), torch.zeros(1).long(), 0.1, steps=0), "steps"),
    (lambda: TransferAttackEvaluation(epsilon=float("inf")), "epsilon"),
    (lambda: TransferAttackEvaluation(source_loss=[]), "source_loss"),
    (lambda: TransferAttackEvaluation(source_loss=["first"]), "source_loss"),
    (lambda: TransferAttackEvaluation(clamp_min=1.0, clamp_max=0.0), "clamp_min"),
    (lambda: TransferAttackEvaluation(report_path=""), "null"),
])
def test_bad_inputs_say_what_to_change(make, match):
    with pytest.raises(ValueError, match=match):
        make()
