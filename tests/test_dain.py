"""DAIN: the tensor-completion model, the last-layer influence and entity importance against independent
implementations from the paper's equations, the collector's sums up to the best epoch, the augmented DataModule,
crash-and-resume mid-epoch, and bad inputs.

Conventions from github.com/claws-lab/DAIN ``src/main.py`` (read, not copied): a cell's gradient is the last hidden
layer times the error (the output weights' gradient); a training cell's importance is the sum over epochs up to the
best validation epoch of its gradient dotted with the sum of the validation cells' gradients; entity importance per
mode sums ``|importance|`` over the cells holding the entity, normalised to a distribution; augmented cells draw each
mode's index independently from it and are labelled by the trained model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_ext.recsys.dain import (
    InfluenceCollector, NeuralTensorCompletion, TensorMLP, cell_influence, entity_importance, sample_cells,
)
from lightning_ext.recsys.movielens_tensor import InfluenceAugmentedDataModule, TensorCompletionDataModule
from lightning_ext.testing import crash_and_resume, fit_ddp_vs_single

pytestmark = pytest.mark.usefixtures("one_thread")
DIMS = [20, 15, 4]


class TinyTensor(TensorCompletionDataModule):
    """A rank-2 CP tensor 20 x 15 x 4 with 900 observed cells (noise 0.1), split 72/18/10."""

    def __init__(self, **kwargs):
        kwargs.setdefault("batch_size", 64)
        super().__init__(**kwargs)

    def load_cells(self):
        rng = np.random.default_rng(0)
        keys = rng.choice(int(np.prod(DIMS)), size=900, replace=False)
        cells = np.stack(np.unravel_index(keys, DIMS), 1).astype(np.int64)
        a, b, c = (rng.normal(size=(d, 2)) for d in DIMS)
        values = 3 + (a[cells[:, 0]] * b[cells[:, 1]] * c[cells[:, 2]]).sum(1) + 0.1 * rng.normal(size=900)
        return cells, values.astype(np.float32), list(DIMS)


def trainer(epochs, callbacks=(), **kwargs):
    return Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks), **kwargs)


# --------------------------------------------------------------------------- independent implementations
def influence_by_autograd(net, train_c, train_v, val_c, val_v):
    """TracIn on the output weights from the definition: per-cell autograd of ½(ŷ − y)² w.r.t. ``W_out``."""
    def grad(cell, value):
        net.zero_grad()
        (0.5 * (net(cell[None]) - value) ** 2).sum().backward()
        return net.output_layer.weight.grad.detach().reshape(-1).clone()

    g_val = sum(grad(c, v) for c, v in zip(val_c, val_v))
    return torch.stack([grad(c, v) @ g_val for c, v in zip(train_c, train_v)])


def entity_importance_loops(cells, importance, dims):
    """``src/main.py`` step 3, as loops: add |importance| to each of the cell's entities, normalise per mode."""
    out = [np.zeros(d) for d in dims]
    for i, cell in enumerate(cells.tolist()):
        for m, k in enumerate(cell):
            out[m][k] += abs(float(importance[i]))
    return [o / o.sum() for o in out]


def test_cell_influence_matches_per_cell_autograd():
    torch.manual_seed(0)
    net = TensorMLP(DIMS, layers=(12, 16, 8)).double()
    cells = torch.stack([torch.randint(d, (40,)) for d in DIMS], 1)
    values = torch.randn(40, dtype=torch.float64) + 3
    ours, val_mse = cell_influence(net, cells[:30], values[:30], cells[30:], values[30:], batch_size=7)
    ref = influence_by_autograd(net, cells[:30], values[:30], cells[30:], values[30:])
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        assert val_mse == pytest.approx(float((net(cells[30:]) - values[30:]).pow(2).mean()))


def test_entity_importance_matches_the_official_loops_and_the_clean_variant_drops_harm():
    gen = torch.Generator().manual_seed(1)
    cells = torch.stack([torch.randint(d, (50,), generator=gen) for d in DIMS], 1)
    imp = torch.randn(50, generator=gen, dtype=torch.float64)
    for ours, ref in zip(entity_importance(cells, imp, DIMS), entity_importance_loops(cells, imp, DIMS)):
        np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12)
    clean = entity_importance(cells, imp, DIMS, use_abs=False)
    harmful_only = [k for k in range(DIMS[0]) if (cells[:, 0] == k).any() and (imp[cells[:, 0] == k] <= 0).all()]
    assert harmful_only and all(float(clean[0][k]) == 0 for k in harmful_only)


def test_sample_cells_follows_the_distributions_and_dedupes():
    gen = torch.Generator().manual_seed(0)
    p = [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.5, 0.5])]
    cells = sample_cells(p, 200, gen)
    assert cells.shape == (200, 2) and (cells[:, 0] == 1).all() and 50 < int((cells[:, 1] == 0).sum()) < 150
    uniform = [torch.full((6,), 1 / 6), torch.full((5,), 1 / 5)]
    observed = torch.tensor([[0, 0], [1, 1], [2, 2]])
    new = sample_cells(uniform, 20, gen, exclude=observed)
    keys = set(map(tuple, new.tolist()))
    assert len(new) == 20 and len(keys) == 20 and not keys & set(map(tuple, observed.tolist()))
    full = sample_cells([torch.tensor([1.0, 0.0]), torch.tensor([1.0])], 5, gen, exclude=torch.tensor([[1, 0]]))
    assert full.tolist() == [[0, 0]]  # the tensor has one free cell: fewer than asked come back


def test_model_learns_a_low_rank_tensor():
    seed_everything(0)
    dm = TinyTensor()
    model = NeuralTensorCompletion(layers=(24, 32, 16), lr=1e-2)
    tr = trainer(25)
    tr.fit(model, datamodule=dm)
    rmse = tr.test(model, datamodule=dm, verbose=False)[0]["test_rmse"]
    assert rmse < 0.8 * float(dm.test_set.tensors[1].std())


def test_collector_sums_influence_up_to_the_best_epoch_and_the_augmented_data_uses_it(tmp_path):
    class Snap(Callback):  # the net after each epoch, as the collector saw it
        def __init__(self):
            self.states = []

        def on_validation_end(self, trainer, pl_module):
            self.states.append({k: v.clone() for k, v in pl_module.net.state_dict().items()})

    seed_everything(0)
    dm, snap = TinyTensor(), Snap()
    col = InfluenceCollector(influence_path=str(tmp_path / "inf.pt"))
    model = NeuralTensorCompletion(layers=(24, 32, 16), lr=3e-2)
    trainer(6, [snap, col]).fit(model, datamodule=dm)
    train_c, train_v = dm.train_set.tensors
    val_c, val_v = dm.val_set.tensors
    ref, val_mse = torch.zeros(len(train_c), dtype=torch.float64), []
    net = TensorMLP(DIMS, (24, 32, 16))
    for state in snap.states:
        net.load_state_dict(state)
        with torch.no_grad():
            val_mse.append(float((net(val_c) - val_v).pow(2).mean()))
        if len(val_mse) - 1 <= col.best_epoch:  # the reference loops over cells: the first 60 training cells
            ref[:60] += influence_by_autograd(net, train_c[:60], train_v[:60], val_c, val_v).double()
    assert col.best_epoch == int(np.argmin(val_mse))
    torch.testing.assert_close(col.importance[:60], ref[:60], rtol=1e-4, atol=1e-6)
    saved = torch.load(tmp_path / "inf.pt", weights_only=True)
    assert saved["best_epoch"] == col.best_epoch and float(saved["importance"].abs().max()) == pytest.approx(1.0)
    for k, v in snap.states[col.best_epoch].items():
        torch.testing.assert_close(saved["state_dict"][k], v)

    aug = InfluenceAugmentedDataModule(str(tmp_path / "inf.pt"), batch_size=64, ratio=0.5, augment_seed=3)
    aug.load_cells = dm.load_cells
    aug.setup()
    n = len(train_c)
    assert aug.augmented_cells == n // 2 and len(aug.train_set) == n + n // 2
    cells, labels = aug.train_set.tensors
    assert torch.equal(cells[:n], train_c) and torch.equal(labels[:n], train_v)
    net.load_state_dict(snap.states[col.best_epoch])
    torch.testing.assert_close(labels[n:], net.predict(cells[n:]))
    # the draw follows the entity importance: mode 0's empirical frequencies track P_0
    p0 = entity_importance(train_c, saved["importance"], DIMS)[0]
    big = InfluenceAugmentedDataModule(str(tmp_path / "inf.pt"), batch_size=64, ratio=20.0)
    big.load_cells = dm.load_cells
    big.setup()
    freq = torch.bincount(big.train_set.tensors[0][n:, 0], minlength=DIMS[0]).double() / (20 * n)
    assert float((freq - p0).abs().max()) < 0.02
    clean = InfluenceAugmentedDataModule(str(tmp_path / "inf.pt"), batch_size=64, use_abs=False, dedupe=True)
    clean.load_cells = dm.load_cells
    clean.setup()
    new = clean.train_set.tensors[0][n:]
    keys = set(map(tuple, new.tolist()))
    assert len(keys) == len(new) and not keys & set(map(tuple, train_c.tolist()))
    other = InfluenceAugmentedDataModule(str(tmp_path / "inf.pt"), batch_size=64, split_seed=5)
    other.load_cells = dm.load_cells
    with pytest.raises(ValueError, match="other training cells"):
        other.setup()


def test_crash_and_resume_mid_epoch_ends_with_the_same_weights_and_importance(tmp_path):
    def make():
        seed_everything(0)
        return NeuralTensorCompletion(dims=DIMS, layers=(24, 32, 16), lr=1e-2)

    full, resumed, info = crash_and_resume(make, TinyTensor, lambda: [InfluenceCollector(influence_path=None)],
                                           max_epochs=3, crash_step=15, checkpoint_every_n_steps=4,
                                           tmp_path=tmp_path, weights_only=True, num_sanity_val_steps=0)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    a, b = info["full_callbacks"][0], info["resumed_callbacks"][0]
    assert a.best_epoch == b.best_epoch
    torch.testing.assert_close(a.importance, b.importance, rtol=1e-5, atol=1e-7)


class CollectingCompletion(NeuralTensorCompletion):
    """The model with a fresh InfluenceCollector of its own (writes ``influence.pt`` under the run's log_dir)."""

    def configure_callbacks(self):
        return [InfluenceCollector(influence_path="influence.pt", batch_size=50)]


def _collecting_model():
    seed_everything(0)
    return CollectingCompletion(dims=DIMS, layers=(24, 32, 16), lr=1e-2)


@pytest.mark.ddp
def test_two_processes_sum_their_shares_of_the_influence_to_the_one_process_influence(tmp_path):
    """Each of 2 gloo ranks scores half of the cells; the summed shares equal one process on the same global batches."""
    single, ddp = fit_ddp_vs_single(_collecting_model, lambda b: TinyTensor(batch_size=b), 72, tmp_path, test=False,
                                    max_epochs=4, num_sanity_val_steps=0)
    for k, v in single.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[k], v, atol=1e-5, rtol=1e-4, msg=k)
    one = torch.load(tmp_path / "single" / "influence.pt", weights_only=True)
    two = torch.load(tmp_path / "ddp" / "influence.pt", weights_only=True)
    assert two["best_epoch"] == one["best_epoch"]
    assert two["best_val_mse"] == pytest.approx(one["best_val_mse"], rel=1e-5)
    assert torch.equal(two["cells"], one["cells"]) and float(one["importance"].abs().max()) == pytest.approx(1.0)
    torch.testing.assert_close(two["importance"], one["importance"], atol=1e-5, rtol=1e-4)
    # the influence is not trivial: both signs, and not one cell carrying it all
    assert (one["importance"] > 0).any() and (one["importance"] < 0).any()
    assert int((one["importance"].abs() > 0.1).sum()) > 10


@pytest.mark.parametrize("make, match", [
    (lambda: TensorMLP([5, 0, 3]), "mode 1 is empty"),
    (lambda: TensorMLP([5]), "at least two modes"),
    (lambda: TensorMLP([5, 4, 3], layers=(10, 8)), "multiple of the tensor order"),
    (lambda: TensorMLP([5, 4])(torch.tensor([[0, 4]])), r"mode 1 indices must lie in \[0, 4\)"),
    (lambda: TensorMLP([5, 4])(torch.tensor([[0.0, 1.0]])), "integer"),
    (lambda: TensorMLP([5, 4])(torch.tensor([0, 1])), r"\(B, 2\)"),
    (lambda: NeuralTensorCompletion(lr=float("nan")), "lr"),
    (lambda: TensorCompletionDataModule(modes=["user", "user"]), "two different"),
    (lambda: TensorCompletionDataModule(modes=["user", "year"]), "modes"),
    (lambda: TensorCompletionDataModule(split=(0.5, 0.5, 0.0)), "split"),
    (lambda: InfluenceAugmentedDataModule("x.pt", strategy="best"), "strategy"),
    (lambda: InfluenceAugmentedDataModule("x.pt", ratio=0.0), "ratio"),
    (lambda: entity_importance(torch.tensor([[0, 0]]), torch.tensor([-1.0]), [1, 1], use_abs=False), "positive"),
    (lambda: InfluenceCollector(influence_path=""), "influence_path"),
])
def test_bad_inputs_are_refused_with_one_line(make, match):
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_a_missing_or_non_finite_influence_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="influence_path"):
        InfluenceAugmentedDataModule(str(tmp_path / "none.pt")).setup()
    seed_everything(0)
    dm = TinyTensor()
    trainer(1, [InfluenceCollector(influence_path=str(tmp_path / "inf.pt"))]).fit(
        NeuralTensorCompletion(layers=(24, 16)), datamodule=dm)
    saved = torch.load(tmp_path / "inf.pt", weights_only=True)
    saved["state_dict"]["output_layer.weight"][0, 0] = float("nan")
    torch.save(saved, tmp_path / "bad.pt")
    aug = InfluenceAugmentedDataModule(str(tmp_path / "bad.pt"))
    aug.load_cells = dm.load_cells
    with pytest.raises(ValueError, match="non-finite"):
        aug.setup()
