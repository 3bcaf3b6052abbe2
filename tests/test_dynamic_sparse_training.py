"""DSL (DynamicSparseTraining): the update-ratio schedule and the prune/grow selection against independent
implementations of the paper's equations and the official code's conventions, a whole training run against a
reference loop written the official way (``shuyao-wang/DSL`` ``utils/core.py::Masking``), the callback's
behaviour, bad inputs, crash-and-resume (epoch boundary and mid-epoch) and two gloo processes vs one."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from lightning_ext.compression.dynamic_sparse_training import (
    DynamicSparseTraining,
    DynamicSparsity,
    prune_and_grow,
    random_masks,
    sparse_parameters,
    update_ratio_schedule,
)
from lightning_ext.datamodules import DigitsDataModule
from lightning_ext.modules import MLPClassifier
from lightning_ext.recsys.mf_bpr import MFBPR
from lightning_ext.testing import assert_same_parameters, crash_and_resume, fit_ddp_vs_single


# -- independent references ------------------------------------------------------------------------------------
def reference_ratio(t: int, total: int, p0: float, eta_min: float) -> float:
    """The paper's p_t = eta_min + (p0 - eta_min) (1 + cos(pi t / T)) / 2, written out."""
    return eta_min + 0.5 * (p0 - eta_min) * (1 + math.cos(math.pi * t / total))


def reference_prune_grow(w: np.ndarray, m: np.ndarray, g: np.ndarray, p: float) -> np.ndarray:
    """From the equations: drop ceil(p * nnz) active entries of smallest |w|, then grow as many inactive entries
    (the just-dropped included) of largest |g|. Plain Python loops over the flat arrays."""
    w, m, g = w.ravel(), m.ravel().astype(bool).copy(), g.ravel()
    n = math.ceil(p * m.sum())
    active = sorted((abs(w[i]), i) for i in range(len(w)) if m[i])
    for _, i in active[:n]:
        m[i] = False
    inactive = sorted(((-abs(g[i]), i) for i in range(len(w)) if not m[i]))
    for _, i in inactive[:n]:
        m[i] = True
    return m


def official_update(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, p: float) -> torch.Tensor:
    """The official ``magnitude_death`` + ``gradient_growth`` conventions (threshold on the sorted |w| of the whole
    tensor, inactive weights being 0; growth by sorting |grad * (new_mask == 0)|), re-written."""
    nnz = int(mask.sum())
    num_remove = math.ceil(p * nnz)
    zeros = mask.numel() - nnz
    x = torch.sort(weight.abs().flatten()).values
    threshold = x[zeros + num_remove - 1]
    new_mask = (weight.abs() > threshold)
    regrow = nnz - int(new_mask.sum())
    score = (grad * (~new_mask).float()).abs().flatten()
    idx = torch.sort(score, descending=True).indices[:regrow]
    out = new_mask.flatten().clone()
    out[idx] = True
    return out.view_as(mask)


# -- one-batch equivalence tests -------------------------------------------------------------------------------
def test_update_ratio_schedule_matches_the_equation_and_the_official_cosine_stepper():
    total, p0, eta_min = 37, 0.5, 0.005
    # the official CosineDecay: an SGD learning rate stepped once per optimizer step by CosineAnnealingLR
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=p0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, total, eta_min)
    for t in range(1, total + 1):
        sgd.step()
        sched.step()
        ours = update_ratio_schedule(t, total, p0, eta_min)
        assert ours == pytest.approx(reference_ratio(t, total, p0, eta_min), abs=1e-12)
        assert ours == pytest.approx(sgd.param_groups[0]["lr"], abs=1e-9)
    assert update_ratio_schedule(0, total, p0, eta_min) == p0
    assert update_ratio_schedule(5 * total, total, p0, eta_min) == eta_min  # stays at eta_min after T


@pytest.mark.parametrize("p", [0.5, 0.3, 0.05])
def test_prune_and_grow_selection_matches_the_equations_and_the_official_conventions(p):
    gen = torch.Generator().manual_seed(1)
    mask = random_masks({"w": (13, 7)}, 0.4, seed=3)["w"]
    weight = torch.randn(13, 7, generator=gen) * mask  # inactive weights are 0, as in training
    grad = torch.randn(13, 7, generator=gen)
    ours, n = prune_and_grow(weight, mask, grad, p)
    expected = reference_prune_grow(weight.numpy(), mask.numpy(), grad.numpy(), p)
    assert n == math.ceil(p * int(mask.sum()))
    assert np.array_equal(ours.numpy().ravel(), expected)
    assert torch.equal(ours, official_update(weight, mask, grad, p))  # no ties: the official threshold agrees
    assert int(ours.sum()) == int(mask.sum())  # density kept


def test_prune_and_grow_replaces_exactly_n_on_ties_where_the_official_threshold_replaces_more():
    weight = torch.tensor([0.0, 0.2, 0.2, 0.2, 0.9, 0.0])
    mask = torch.tensor([False, True, True, True, True, False])
    grad = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, 0.4])
    ours, n = prune_and_grow(weight, mask, grad, 0.25)  # n = 1: drop index 1 (first of the tied), grow index 0
    assert n == 1 and ours.tolist() == [True, False, True, True, True, False]
    official = official_update(weight, mask, grad, 0.25)  # drops all 3 tied, regrows 3 (0, 5 and a zero-gradient one)
    assert int(official.sum()) == int(mask.sum()) and int((official != mask).sum()) > int((ours != mask).sum())


class _TinyRec(nn.Module):
    """Embeddings + a linear layer, BPR-scored."""

    def __init__(self) -> None:
        super().__init__()
        self.user = nn.Embedding(9, 6)
        self.item = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        u = self.proj(self.user(batch[:, 0]))
        pos, neg = self.item(batch[:, 1]), self.item(batch[:, 2])
        return nn.functional.softplus((u * neg).sum(-1) - (u * pos).sum(-1)).mean()


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.stack([torch.randint(0, 9, (16,), generator=gen), torch.randint(0, 11, (16,), generator=gen),
                         torch.randint(0, 11, (16,), generator=gen)], 1) for _ in range(n)]


def test_training_matches_a_reference_loop_written_the_official_way():
    """SGD with momentum (the official masks momentum buffers): our masked-gradient loop and the official order
    (step on unmasked gradients, then mask weights and momentum, then prune-and-grow) end with the same weights."""
    delta_t, total, density, steps = 3, 12, 0.5, 12
    torch.manual_seed(0)
    ours_model = _TinyRec()
    ref_model = _TinyRec()
    ref_model.load_state_dict(ours_model.state_dict())
    params = sparse_parameters(ours_model)
    masks0 = random_masks({n: tuple(p.shape) for n, p in params.items()}, density, seed=5)
    batches = _batches(steps)

    opt = torch.optim.SGD(ours_model.parameters(), lr=0.5, momentum=0.9)
    dsl = DynamicSparsity(params, density, delta_t, total, masks={k: v.clone() for k, v in masks0.items()})
    dsl.apply([opt])
    for batch in batches:
        opt.zero_grad()
        ours_model.loss(batch).backward()
        grads = dsl.before_step()
        opt.step()
        dsl.after_step([opt], grads)

    # reference: official Masking.step (optimizer.step; apply_mask; decay.step; steps += 1; truncate every k)
    ref_params = dict(ref_model.named_parameters())
    masks = {k: v.clone() for k, v in masks0.items()}
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.5, momentum=0.9)
    decay_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(decay_opt, total, 0.005)

    def apply_mask():
        with torch.no_grad():
            for k, m in masks.items():
                ref_params[k].mul_(m)
                buf = ref_opt.state.get(ref_params[k], {}).get("momentum_buffer")
                if buf is not None:
                    buf.mul_(m)

    apply_mask()
    count, updates = 0, 0
    for batch in batches:
        ref_opt.zero_grad()
        ref_model.loss(batch).backward()
        ref_opt.step()
        apply_mask()
        decay_opt.step()  # no gradient: only keeps the scheduler's call order
        decay.step()
        ratio = decay_opt.param_groups[0]["lr"]
        count += 1
        if count % delta_t == 0:
            updates += 1
            for k in masks:
                masks[k] = official_update(ref_params[k].detach(), masks[k], ref_params[k].grad, ratio)
            apply_mask()
    assert updates == len(dsl.history) == 4
    for k in masks:
        assert torch.equal(dsl.masks[k], masks[k]), k
    assert_same_parameters(ours_model, ref_model, atol=1e-6)
    assert any(not torch.equal(dsl.masks[k], masks0[k]) for k in masks)  # the masks did move


def test_adam_state_and_weights_of_inactive_entries_stay_zero():
    torch.manual_seed(0)
    model = _TinyRec()
    params = sparse_parameters(model, "embedding")
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    dsl = DynamicSparsity(params, 0.3, 2, 10, seed=1)
    dsl.apply([opt])
    for batch in _batches(7):
        opt.zero_grad()
        model.loss(batch).backward()
        grads = dsl.before_step()
        opt.step()
        dsl.after_step([opt], grads)
    for name, p in params.items():
        off = ~dsl.masks[name]
        assert (p[off] == 0).all() and (opt.state[p]["exp_avg"][off] == 0).all()
        assert (opt.state[p]["exp_avg_sq"][off] == 0).all()
        assert int(dsl.masks[name].sum()) == round(0.3 * p.numel())
    assert (model.proj.weight != 0).all()  # not targeted: dense


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.Adam(p, lr=0.05),
                                      lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1, amsgrad=True)],
                         ids=["adam", "adamw-amsgrad"])
def test_second_moment_fill_is_bit_identical_to_the_plain_path(make_opt):
    """The faster path (before_step given the optimizer: inactive second moments hold 1 during the step, zeroed by a
    step post-hook) ends with exactly the parameters, masks and optimizer state of before_step() without it."""
    def run(fast):
        torch.manual_seed(0)
        model = _TinyRec()
        params = sparse_parameters(model)
        opt = make_opt(model.parameters())
        dsl = DynamicSparsity(params, 0.4, 3, 12, seed=2)
        dsl.apply([opt])
        filled = []
        for batch in _batches(12):
            opt.zero_grad()
            model.loss(batch).backward()
            grads = dsl.before_step([opt] if fast else ())
            if opt.state:
                filled.append(all(bool((opt.state[p][k][~dsl.masks[n]] == 1).all()) for n, p in params.items()
                                  for k in ("exp_avg_sq", "max_exp_avg_sq") if k in opt.state[p]))
            opt.step()
            for n, p in params.items():  # zero again right after the step, before after_step
                assert all(bool((v[~dsl.masks[n]] == 0).all()) for k, v in opt.state[p].items() if k != "step")
            dsl.after_step([opt], grads)
        return model, dsl, opt, filled

    (a, da, oa, filled_a), (b, db, ob, filled_b) = run(True), run(False)
    assert len(filled_a) == 11 and all(filled_a) and not any(filled_b)  # the fast path was taken, the plain was not
    assert len(da.history) == 4 and any(not torch.equal(da.masks[k], m) for k, m in
                                        random_masks({n: tuple(p.shape) for n, p in da.params.items()}, 0.4, 2).items())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
        assert oa.state[pa].keys() == ob.state[pb].keys()
        for key in oa.state[pa]:
            assert torch.equal(oa.state[pa][key], ob.state[pb][key]), (name, key)
    assert all(torch.equal(da.masks[k], db.masks[k]) for k in da.masks)
    assert not oa._optimizer_step_post_hooks  # the one-shot hooks are gone
    # a step that never runs (e.g. skipped by a gradient scaler): after_step still zeroes the filled entries
    oa.zero_grad()
    a.loss(_batches(1, seed=3)[0]).backward()
    da.before_step([oa])
    da.after_step([oa])
    w = a.get_parameter("item.weight")
    assert (oa.state[w]["exp_avg_sq"][~da.masks["item.weight"]] == 0).all() and not oa._optimizer_step_post_hooks


# -- layer selection and bad inputs ---------------------------------------------------------------------------
def test_targets_layers_and_bias_selection():
    model = _TinyRec()
    assert list(sparse_parameters(model)) == ["user.weight", "item.weight", "proj.weight", "proj.bias"]
    assert list(sparse_parameters(model, "linear", include_bias=False)) == ["proj.weight"]
    assert list(sparse_parameters(model, layers=["u*"])) == ["user.weight"]
    assert list(sparse_parameters(model, "embedding", ignored_layers=["item"])) == ["user.weight"]


@pytest.mark.parametrize("density", [0.0, 1.0, 1.5, -0.2, float("nan")])
def test_density_outside_the_open_unit_interval_is_refused(density):
    with pytest.raises(ValueError, match="density must be a finite number > 0 and < 1"):
        DynamicSparseTraining(density=density)


@pytest.mark.parametrize("delta_t", [0, -3, 2.5])
def test_delta_t_below_one_is_refused(delta_t):
    with pytest.raises(ValueError, match=r"delta_t .* must be an integer >= 1"):
        DynamicSparseTraining(delta_t=delta_t)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="min_update_ratio"):
        DynamicSparseTraining(update_ratio=0.1, min_update_ratio=0.2)
    with pytest.raises(ValueError, match="targets must be one of"):
        DynamicSparseTraining(targets="conv")
    with pytest.raises(TypeError, match="list of module names"):
        DynamicSparseTraining(layers="user")


def test_no_matching_layer_names_the_modules_that_exist():
    with pytest.raises(ValueError, match=r"no nn.Linear layer.*modules are: 0 \(Embedding\), 1 \(ReLU\)"):
        sparse_parameters(nn.Sequential(nn.Embedding(4, 2), nn.ReLU()), "linear")
    with pytest.raises(ValueError, match=r"`layers` names 'usr'.*Close names: user"):
        sparse_parameters(_TinyRec(), layers=["usr"])


def test_sparse_embedding_gradients_are_refused():
    with pytest.raises(ValueError, match="sparse=True"):
        sparse_parameters(nn.Sequential(nn.Embedding(4, 2, sparse=True)))


def test_sharded_strategy_is_refused_in_setup():
    trainer = SimpleNamespace(strategy=type("FSDPStrategy", (), {})())
    with pytest.raises(ValueError, match="DynamicSparseTraining masks single weights.*FSDPStrategy shards them"):
        DynamicSparseTraining().setup(trainer, None, "fit")


# -- the callback on MF-BPR --------------------------------------------------------------------------------------
from tests.test_ddp_modules import TinyInteractions  # noqa: E402 - the same tiny synthetic interactions


def _dm(batch_size: int = 40) -> TinyInteractions:
    return TinyInteractions(batch_size=batch_size, eval_batch_size=7, val_fraction=0.1)


def _mf() -> MFBPR:
    torch.manual_seed(0)
    return MFBPR(num_users=40, num_items=30, embedding_dim=8, lr=0.05, eval_ks=(5, 10))


def _quiet(**kw) -> dict:
    return dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kw)


def test_callback_keeps_the_budget_and_updates_on_schedule(one_thread):
    dsl = DynamicSparseTraining(density=0.25, delta_t=4, seed=2)
    model = _mf()
    trainer = Trainer(max_epochs=4, callbacks=[dsl], **_quiet())
    trainer.fit(model, datamodule=_dm())
    assert trainer.global_step == 20 and dsl.sparsity.total_steps == 20
    assert [h["step"] for h in dsl.history] == [4.0, 8.0, 12.0, 16.0, 20.0]
    assert dsl.history[0]["update_ratio"] == pytest.approx(update_ratio_schedule(4, 20))
    assert all(h["grown"] > 0 for h in dsl.history[:3])
    for name in ("user_embedding.weight", "item_embedding.weight"):
        w, m = model.get_parameter(name), dsl.masks[name]
        assert int(m.sum()) == round(0.25 * w.numel())
        assert (w[~m] == 0).all()
        assert (trainer.optimizers[0].state[w]["exp_avg"][~m] == 0).all()
    first = random_masks({n: tuple(model.get_parameter(n).shape) for n in dsl.masks}, 0.25, seed=2)
    assert any(not torch.equal(first[n], dsl.masks[n]) for n in first)


def test_static_sparsity_is_delta_t_beyond_the_run(one_thread):
    dsl = DynamicSparseTraining(density=0.5, delta_t=1000, seed=2)
    model = _mf()
    Trainer(max_epochs=2, callbacks=[dsl], **_quiet()).fit(model, datamodule=_dm())
    first = random_masks({n: tuple(model.get_parameter(n).shape) for n in dsl.masks}, 0.5, seed=2)
    assert dsl.history == [] and all(torch.equal(first[n], dsl.masks[n]) for n in first)


def test_unbounded_trainer_needs_total_steps(one_thread):
    trainer = Trainer(max_epochs=-1, max_steps=-1, callbacks=[DynamicSparseTraining()], **_quiet())
    with pytest.raises(ValueError, match="Set `total_steps`"):
        trainer.fit(_mf(), datamodule=_dm())


def test_crash_and_resume_at_an_epoch_boundary_matches_the_uninterrupted_run(tmp_path, one_thread):
    def callbacks():
        return [DynamicSparseTraining(density=0.3, delta_t=3, seed=1)]

    full, resumed, info = crash_and_resume(_mf, _dm, callbacks, max_epochs=4, crash_epoch=2, tmp_path=tmp_path,
                                           weights_only=True, num_sanity_val_steps=0, limit_val_batches=0)
    assert info["resumed_from_step"] == 10
    assert_same_parameters(full, resumed, atol=1e-6)
    a, b = info["full_callbacks"][0], info["resumed_callbacks"][0]
    assert a.history == b.history and len(a.history) == 6
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


class FlatDigits(DigitsDataModule):
    """Digits as 64-feature vectors (a loader Lightning resumes mid-epoch; the interaction DataModules' is not)."""

    input_shape = (64,)


def _mlp() -> MLPClassifier:
    torch.manual_seed(0)
    return MLPClassifier(num_features=64, num_classes=10, hidden=[32], lr=0.05)


def test_mid_epoch_crash_and_resume_matches_the_uninterrupted_run(tmp_path, one_thread):
    """Linear layers, 21 steps per epoch: the crash at step 13 falls between updates (every 5 steps)."""
    def callbacks():
        return [DynamicSparseTraining(density=0.3, delta_t=5, targets="linear", seed=1)]

    full, resumed, info = crash_and_resume(_mlp, lambda: FlatDigits(batch_size=64), callbacks, max_epochs=2,
                                           crash_step=13, weights_only=True, tmp_path=tmp_path,
                                           limit_val_batches=1, num_sanity_val_steps=0)
    assert info["resumed_from_step"] == 13
    assert_same_parameters(full, resumed, atol=1e-6)
    a, b = info["full_callbacks"][0], info["resumed_callbacks"][0]
    assert a.history == b.history and len(a.history) == 8
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


@pytest.mark.ddp
@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, one_thread):
    """Identical masks on both ranks (seeded draw + all-reduced gradients + rank-0 broadcast): the two-process
    run ends with the weights, hence the zero pattern, of the one-process run."""
    dsl = DynamicSparseTraining(density=0.4, delta_t=3, seed=4)
    single, ddp = fit_ddp_vs_single(_mf, _dm, 40, tmp_path, max_epochs=3, num_sanity_val_steps=0,
                                    limit_val_batches=0, callbacks=[dsl])
    for name in ("user_embedding.weight", "item_embedding.weight"):
        a, b = single.state_dict[name], ddp.state_dict[name]
        assert torch.equal(a != 0, b != 0), name
        assert abs((a != 0).float().mean().item() - 0.4) < 0.02
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert single.test_metrics["test_recall@10"] == pytest.approx(ddp.test_metrics["test_recall@10"], abs=1e-6)


def test_the_config_trains_mf_bpr_with_half_of_each_table(tmp_path, monkeypatch, one_thread):
    from pathlib import Path

    from lightning_ext.cli import run_cli

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cli = run_cli(["fit", "--config", "configs/dynamic_sparse_training.yaml", "--trainer.fast_dev_run=2",
                   "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"])
    dsl = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DynamicSparseTraining))
    assert sorted(dsl.masks) == ["item_embedding.weight", "user_embedding.weight"]
    for name, mask in dsl.masks.items():
        weight = cli.model.get_parameter(name)
        assert int(mask.sum()) == round(0.5 * mask.numel()) and (weight[~mask] == 0).all()


def test_linear_time_selection_equals_a_stable_sort_on_ties():
    from lightning_ext.compression.dynamic_sparsity import _smallest

    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 50, 99, 100):
        values = torch.randint(0, 6, (100,), generator=gen).float()  # many ties
        expected = torch.sort(values, stable=True).indices[:n]
        assert sorted(_smallest(values, n).tolist()) == sorted(expected.tolist())


def test_official_order_without_gradient_masking_matches_the_reference_loop_too():
    """mask_gradients=False is the official order itself: same final weights and masks as with masking (SGD
    momentum), and with Adam the second moment keeps the inactive entries' history while the first is masked."""
    def run(mask_gradients, make_opt):
        torch.manual_seed(0)
        model = _TinyRec()
        params = sparse_parameters(model)
        opt = make_opt(model.parameters())
        dsl = DynamicSparsity(params, 0.5, 3, 12, seed=5, mask_gradients=mask_gradients)
        dsl.apply([opt])
        for batch in _batches(12):
            opt.zero_grad()
            model.loss(batch).backward()
            grads = dsl.before_step()
            opt.step()
            dsl.after_step([opt], grads)
        return model, dsl, opt

    sgd = lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9)  # noqa: E731
    (a, da, _), (b, db, _) = run(True, sgd), run(False, sgd)
    assert_same_parameters(a, b, atol=1e-6)
    assert all(torch.equal(da.masks[k], db.masks[k]) for k in da.masks)
    model, dsl, opt = run(False, lambda p: torch.optim.Adam(p, lr=0.05))
    w = model.get_parameter("item.weight")
    off = ~dsl.masks["item.weight"]
    assert (w[off] == 0).all() and (opt.state[w]["exp_avg"][off] == 0).all()
    assert (opt.state[w]["exp_avg_sq"][off] > 0).any()
