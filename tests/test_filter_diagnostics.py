"""FilterDiagnostics: each statistic against an independent implementation of the papers' equations (SVD of the
centred filter matrix, scikit-learn's PCA, numpy histograms, scipy's KL), layer selection, the warnings about
near-random and degenerate layers, the plot and table files, the reference model, resume and bad inputs."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from lightning_ext.data.digits import DigitsDataModule
from lightning_ext.testing import assert_same_parameters, crash_and_resume
from lightning_ext.vision.filter_diagnostics import (
    FilterDiagnostics,
    FilterPCA,
    conv3x3_layers,
    distribution_shift,
    entropy_threshold,
    filter_statistics,
    layer_filters,
    pairwise_shift,
    sparsity,
    variance_entropy,
)
from lightning_ext.vision.image_classifier import ImageClassifier


# -- independent implementations (torchconvquality's and the CNN Filter DB notebook's conventions) ----------------

def ref_variance_entropy(w: np.ndarray) -> float:
    x = w.reshape(-1, 9)
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    var = s ** 2 / (len(x) - 1)
    r = var / var.sum()
    r = r[r > 0]
    return float(-(r * np.log10(r)).sum())


def ref_sparsity(w: np.ndarray, eps: float = 0.01) -> float:
    x = w.reshape(-1, 9)
    t = np.abs(x).max() * eps
    return float(np.mean(np.all(np.abs(x) < t, axis=1)))


def ref_threshold(n: int) -> float:
    L, x0, k, b = 1.2618047, 2.30436435, 0.88767525, -0.31050834
    return L / (1 + np.exp(-k * (np.log2(n) - x0))) + b


def ref_shift(p_filters: np.ndarray, q_filters: np.ndarray, bins: int = 70) -> float:
    from scipy.stats import entropy
    from sklearn.decomposition import PCA

    def scale(f):
        peak = np.abs(f).max(axis=1, keepdims=True)
        peak[peak == 0] = 1
        return f / peak

    p, q = scale(p_filters), scale(q_filters)
    pca = PCA(n_components=9).fit(np.concatenate([p, q]))
    cp, cq = pca.transform(p), pca.transform(q)
    both = np.concatenate([cp, cq])
    lo, hi = both.min(axis=0), both.max(axis=0)
    total = 0.0
    for i in range(9):
        hp = np.histogram(cp[:, i], bins=bins, range=(lo[i], hi[i]), density=True)[0]
        hq = np.histogram(cq[:, i], bins=bins, range=(lo[i], hi[i]), density=True)[0]
        eps = np.finfo(np.float32).eps
        hp[hp == 0], hq[hq == 0] = eps, eps
        hp, hq = hp / hp.sum(), hq / hq.sum()
        total += pca.explained_variance_ratio_[i] * (entropy(hp, hq) + entropy(hq, hp))
    return float(total)


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 16, 3, 3, generator=g, dtype=torch.float64)
    w[:, :, 0, :] *= 3.0  # anisotropic: the entropy is below its maximum
    w[:5] *= 1e-4  # 80 near-zero filters: sparsity 80/512
    return w


def test_variance_entropy_and_sparsity_equal_the_reference_on_one_tensor(weights):
    f = layer_filters(weights)
    assert f.shape == (512, 9)
    assert variance_entropy(f) == pytest.approx(ref_variance_entropy(weights.numpy()), abs=1e-9)
    assert sparsity(f)[0] == pytest.approx(ref_sparsity(weights.numpy()), abs=0) and sparsity(f)[0] == 80 / 512
    stats = filter_statistics(f)
    assert stats["variance_entropy_norm"] == pytest.approx(ref_variance_entropy(weights.numpy()) / ref_threshold(512))
    clean = weights.numpy().reshape(-1, 9)[80:]
    assert stats["variance_entropy_clean"] == pytest.approx(ref_variance_entropy(clean), abs=1e-9)
    assert entropy_threshold(262144) == pytest.approx(ref_threshold(262144))
    # isotropic random filters sit at log10(9)
    iso = layer_filters(torch.randn(256, 256, 3, 3, dtype=torch.float64))
    assert variance_entropy(iso) == pytest.approx(math.log10(9), abs=2e-3)


def test_distribution_shift_equals_the_notebooks_sklearn_numpy_scipy_version(weights):
    g = torch.Generator().manual_seed(1)
    p = layer_filters(weights)
    q = layer_filters(torch.randn(32, 8, 3, 3, generator=g, dtype=torch.float64) + 0.3 * weights[:, :8])
    pca = FilterPCA.fit([p, q])
    ours = distribution_shift(pca.histograms(p), pca.histograms(q), pca.explained_variance_ratio)
    assert ours == pytest.approx(ref_shift(p.numpy(), q.numpy()), rel=1e-6, abs=1e-9)
    assert ours > 0.01
    assert distribution_shift(pca.histograms(p), pca.histograms(p), pca.explained_variance_ratio) == 0.0


def test_pca_histograms_and_the_pairwise_matrix(weights):
    sets = [layer_filters(torch.randn(c, 4, 3, 3, dtype=torch.float64)) for c in (8, 16, 32)]
    pca = FilterPCA.fit(sets, bins=20)
    hists = torch.stack([pca.histograms(s) for s in sets])
    assert hists.shape == (3, 9, 20)
    assert torch.allclose(hists.sum(-1), torch.ones(3, 9, dtype=torch.float64))
    assert pca.explained_variance_ratio.sum().item() == pytest.approx(1.0)
    m = pairwise_shift(hists, pca.explained_variance_ratio)
    for i in range(3):
        for j in range(3):
            assert m[i, j].item() == pytest.approx(
                distribution_shift(hists[i], hists[j], pca.explained_variance_ratio), abs=1e-10)
    # values beyond the fitted range count in the edge bins instead of vanishing
    far = pca.histograms(sets[0] * 0 + torch.tensor([9.0] + [0.0] * 8, dtype=torch.float64))
    assert torch.allclose(far.sum(-1), torch.ones(9, dtype=torch.float64))


def test_layer_selection():
    from timm.layers import Conv2dSame

    net = nn.Sequential(nn.Conv2d(1, 8, 3), Conv2dSame(8, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1),
                        nn.Conv2d(8, 8, 5), nn.ConvTranspose2d(8, 8, 3))
    assert list(conv3x3_layers(net)) == ["0", "1"]  # the timm subclass is included, unlike torchconvquality
    assert list(conv3x3_layers(net, include_depthwise=True)) == ["0", "1", "2"]
    assert list(conv3x3_layers(net, layers=["1"])) == ["1"]
    with pytest.raises(ValueError, match="no such entry"):
        conv3x3_layers(net, layers=["9"])


def _cnn(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(32, 10))
    return ImageClassifier(net, num_classes=10, in_chans=1, image_size=8, lr=0.01)


def _dm():
    return DigitsDataModule(batch_size=32, train_fraction=0.2)


def _fit(callbacks, model=None, tmp_path=None, **kw):
    args = dict(max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path) if tmp_path else None)
    args.update(kw)
    model = model or _cnn()
    Trainer(callbacks=callbacks, **args).fit(model, datamodule=_dm())
    return model


class Freeze(Callback):
    def __init__(self, name):
        self.name = name

    def on_fit_start(self, trainer, pl_module):
        pl_module.get_submodule(self.name).weight.requires_grad_(False)


def test_callback_flags_a_frozen_layer_as_near_random_and_writes_plot_and_table(tmp_path):
    diag = FilterDiagnostics(table_path="filters.csv")  # net.0 (16 filters) is under min_filters: not judged
    with pytest.warns(UserWarning, match=r"net\.2.* cannot be told from their random initialisation"):
        _fit([Freeze("net.2"), diag], tmp_path=tmp_path)
    init = [r for r in diag.history if r["epoch"] == -1]
    assert [r["layer"] for r in init] == ["net.0", "net.2", "net.4"]
    assert all(r["sparsity"] == 0 and r["drift_from_init"] == 0 for r in init)
    assert all(r["variance_entropy_norm"] > 0.9 for r in init if r["n"] >= 512)
    last = {r["layer"]: r for r in diag.history if r["epoch"] == 1}
    assert last["net.2"]["drift_from_init"] == 0.0 and last["net.4"]["drift_from_init"] > 0
    assert "net.2" in diag.summaries[-1]["near_random"] and "net.0" not in diag.summaries[-1]["near_random"]
    assert last["net.2"]["drift_floor"] > 0
    assert (tmp_path / "filter_diagnostics.png").stat().st_size > 1000
    lines = (tmp_path / "filters.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,layer,n,sparsity") and len(lines) == 1 + 3 * 3
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_degenerate_layer_is_reported():
    model = _cnn()
    diag = FilterDiagnostics(plot_path=None)
    stub = SimpleNamespace(is_global_zero=True, default_root_dir=".", strategy=None)
    diag.on_fit_start(stub, model)
    with torch.no_grad():
        w = model.net[4].weight
        w[:, 1:] = 0  # 31 of 32 input channels zero: 97% sparse filters
    rows = diag.compute(model, 0)
    by = {r["layer"]: r for r in rows}
    assert by["net.4"]["sparsity"] == pytest.approx(31 / 32)
    assert diag.summaries[-1]["degenerate"] == ["net.4"]
    # the untouched layer is indistinguishable from its init, the rewritten one is far above its noise floor
    assert diag.summaries[-1]["near_random"] == ["net.2"]
    assert by["net.4"]["drift_from_init"] > 10 * by["net.4"]["drift_floor"]
    assert by["net.4"]["drift_from_init"] > 10 * max(by["net.0"]["drift_from_init"], 1e-12)


def test_reference_model_drift(tmp_path):
    ref = _cnn(seed=0)
    torch.save(ref.state_dict(), tmp_path / "ref.ckpt")
    diag = FilterDiagnostics(reference="ref.ckpt", plot_path=None)
    stub = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path), strategy=None)
    model = _cnn(seed=0)
    diag.on_fit_start(stub, model)
    assert all(r["drift_reference"] == 0.0 for r in diag.history)  # identical weights
    other = FilterDiagnostics(reference="ref.ckpt", plot_path=None)
    other.on_fit_start(stub, _cnn(seed=1))
    assert all(r["drift_reference"] > 0 for r in other.history)
    torch.save({"x": torch.ones(2)}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="no weight matching"):
        FilterDiagnostics(reference="bad.ckpt").on_fit_start(stub, _cnn())


def test_resume_at_an_epoch_boundary_keeps_the_history(tmp_path):
    full, resumed, info = crash_and_resume(
        _cnn, _dm, lambda: [FilterDiagnostics(plot_path=None)], max_epochs=3, crash_epoch=2, tmp_path=tmp_path,
        weights_only=True, limit_val_batches=0, num_sanity_val_steps=0,
    )
    assert_same_parameters(full, resumed)
    a, b = info["full_callbacks"][0].history, info["resumed_callbacks"][0].history
    assert [(r["epoch"], r["layer"]) for r in a] == [(r["epoch"], r["layer"]) for r in b]
    for ra, rb in zip(a, b):
        assert ra["drift_from_init"] == pytest.approx(rb["drift_from_init"], abs=1e-9)
        assert ra["drift_prev"] == pytest.approx(rb["drift_prev"], abs=1e-9)


@pytest.mark.parametrize("kwargs,match", [
    ({"every_n_epochs": 0}, "every_n_epochs"), ({"sparsity_eps": 0.0}, "sparsity_eps"),
    ({"sparsity_eps": math.nan}, "sparsity_eps"), ({"bins": 0}, "bins"), ({"plot_path": ""}, "plot_path"),
    ({"degenerate_entropy": 1.5}, "degenerate_entropy"), ({"layers": "net.*"}, "layers"),
    ({"near_random_ratio": 0.0}, "near_random_ratio"), ({"min_filters": 0}, "min_filters"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FilterDiagnostics(**kwargs)


def test_model_without_3x3_convs_and_sharded_strategies_are_refused():
    mlp = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), num_classes=10, image_size=8)
    stub = SimpleNamespace(is_global_zero=True, default_root_dir=".", strategy=None)
    with pytest.raises(ValueError, match="no 3x3 Conv2d"):
        FilterDiagnostics().on_fit_start(stub, mlp)
    fsdp = SimpleNamespace(strategy=type("FSDPStrategy", (), {})())
    with pytest.raises(ValueError, match="FSDPStrategy shards them"):
        FilterDiagnostics().setup(fsdp, mlp, "fit")
