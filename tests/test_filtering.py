"""FilteredDataModule and the data scorers (lightning_ext.curation) on digits with planted faults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_ext.datamodules import DigitsDataModule
from lightning_ext.curation.datamodule import FilteredDataModule, FilteredDataModuleError
from lightning_ext.curation import (
    ComputeAwareSelection, DensityBasedPruning, DFNScorer, DP4TLFeatureMapping, DP4TLLabelMapping, EL2NScorer, Embedder,
    FilteringScalingLaw, RandomScorer, RuleFilter, Scorer, ScoringData, SelfSupervisedPrototypes, SemDeDup,
    cluster_quotas, compare_curations, count_to_keep, results_table, top_k,
)
from lightning_ext.modules import ImageClassifier


def _digits_pool(noise: float = 0.0, seed: int = 0):
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.train_set.tensors
    y_noisy = y.clone()
    rng = np.random.default_rng(seed)
    flip = rng.random(len(y)) < noise
    y_noisy[torch.as_tensor(flip)] = torch.as_tensor((y[flip].numpy() + rng.integers(1, 10, flip.sum())) % 10)
    return x, y, y_noisy, ~flip


# -- selection helpers -------------------------------------------------------------------------------------


def test_count_to_keep_and_top_k():
    assert count_to_keep(0.25, 8) == 2 and count_to_keep(3, 8) == 3 and count_to_keep(None, 8) is None
    for bad in (0.0, 1.5, 0, 9):
        with pytest.raises(ValueError):
            count_to_keep(bad, 8)
    s = np.array([0.3, -np.inf, 0.9, 0.1, 0.5, 0.7])
    assert top_k(s, 3).tolist() == [2, 4, 5]
    assert top_k(s, None).tolist() == [0, 2, 3, 4, 5]
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert top_k(s, 4, labels).tolist() == [0, 2, 4, 5]  # two per class


# -- FilteredDataModule ------------------------------------------------------------------------------------


class DropClass(Scorer):
    """Rejects one class entirely (to test the per-class minimum)."""

    def __init__(self, label: int = 3) -> None:
        self.label = label

    def score(self, data):
        return {"score": np.where(data.labels == self.label, -np.inf, 1.0)}


def test_filtered_datamodule_filters_train_only_caches_and_exports(tmp_path):
    cache, export = tmp_path / "cache", tmp_path / "kept.json"
    dm = FilteredDataModule(DigitsDataModule(batch_size=32), RandomScorer(seed=1), keep=0.25, class_balanced=True,
                            cache_dir=str(cache), export_path=str(export))
    dm.setup("fit")
    full = DigitsDataModule()
    full.setup()
    assert len(dm.kept_indices) == round(0.25 * 1293)
    assert len(dm.datamodule.val_set) == len(full.val_set) and len(dm.datamodule.test_set) == len(full.test_set)
    # the loader yields exactly the kept samples
    xs = torch.cat([x for x, _ in dm.train_dataloader()])
    assert len(xs) == len(dm.kept_indices)
    expected = full.train_set.tensors[0][torch.as_tensor(dm.kept_indices)]
    assert {tuple(r.flatten().tolist()[:8]) for r in xs} == {tuple(r.flatten().tolist()[:8]) for r in expected}
    # per-class survivors, class-balanced
    assert sum(k for k, _ in dm.survivors.values()) == len(dm.kept_indices)
    assert all(k >= 30 for k, _ in dm.survivors.values())
    info = json.loads(export.read_text())
    assert info["kept_indices"] == dm.kept_indices.tolist() and info["fingerprint"] == dm.fingerprint
    assert len(list(cache.glob("*.npz"))) == 1 and not dm.loaded_from_cache
    # same data + scorer: read from the cache, and a new `keep` does not rescore
    again = FilteredDataModule(DigitsDataModule(), RandomScorer(seed=1), keep=0.5, cache_dir=str(cache))
    again.setup("fit")
    assert again.loaded_from_cache and again.fingerprint == dm.fingerprint
    # another scorer configuration or other data: another fingerprint
    other = FilteredDataModule(DigitsDataModule(), RandomScorer(seed=2), keep=0.5, cache_dir=str(cache))
    other.setup("fit")
    assert not other.loaded_from_cache and other.fingerprint != dm.fingerprint
    other_data = FilteredDataModule(DigitsDataModule(split_seed=1), RandomScorer(seed=1), keep=0.5, cache_dir=str(cache))
    other_data.setup("fit")
    assert other_data.fingerprint != dm.fingerprint
    # attributes of the wrapped datamodule are visible (models check them)
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8)


def test_emptied_class_raises_unless_allowed():
    dm = FilteredDataModule(DigitsDataModule(), DropClass(3), keep=None, cache_dir=None)
    with pytest.raises(FilteredDataModuleError, match=r"class 3: 0 of .*min_per_class: 0"):
        dm.setup("fit")
    ok = FilteredDataModule(DigitsDataModule(), DropClass(3), keep=None, min_per_class=0, cache_dir=None)
    ok.setup("fit")
    assert ok.survivors[3][0] == 0 and len(ok.kept_indices) == 1293 - ok.survivors[3][1]
    with pytest.raises(ValueError, match="class_balanced"):
        FilteredDataModule(DigitsDataModule(), DensityBasedPruning(), keep=0.3, class_balanced=True)
    with pytest.raises(ValueError, match="fraction"):
        FilteredDataModule(DigitsDataModule(), RandomScorer(), keep=1.5)


class PlainDataModule(LightningDataModule):
    """A user datamodule that only defines loaders (no train_set attribute)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(60, 1, 8, 8, generator=g), torch.arange(60) % 3

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:12], self.y[:12]), batch_size=8)


def test_any_lightning_datamodule_trains_on_the_subset():
    dm = FilteredDataModule(PlainDataModule(), RandomScorer(), keep=24, cache_dir=None)
    model = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), num_classes=3, image_size=8)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3  # 24 kept samples / batch 8
    assert dm.train_dataloader().batch_size == 8


class RankDependentScorer(Scorer):
    """Different scores on every rank: only a broadcast from rank 0 gives the ranks one subset."""

    def score(self, data):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return {"score": np.random.default_rng(100 + rank).random(len(data))}


def _mlp():
    torch.manual_seed(0)
    return ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                           num_classes=10, image_size=8, lr=0.01)


def _filtered_digits(batch_size):
    return FilteredDataModule(DigitsDataModule(batch_size=batch_size, drop_last=True), RankDependentScorer(),
                              keep=0.5, cache_dir=None)


@pytest.mark.ddp
def test_ddp_ranks_train_on_rank_zeros_subset(tmp_path):
    from lightning_ext.testing import fit_ddp_vs_single

    single, ddp = fit_ddp_vs_single(_mlp, _filtered_digits, global_batch_size=64, tmp_path=tmp_path,
                                    max_epochs=2, test=False)
    torch.testing.assert_close(torch.tensor(ddp.curve("train_loss_epoch")),
                               torch.tensor(single.curve("train_loss_epoch")), atol=1e-5, rtol=0)
    for name, value in single.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[name], value, atol=1e-5, rtol=1e-5)


# -- scorers on planted faults ------------------------------------------------------------------------------


def test_dfn_trained_on_trusted_samples_finds_clean_labels():
    x, _, y_noisy, clean = _digits_pool(noise=0.3)
    data = ScoringData.from_tensors(x, y_noisy)
    trusted = np.flatnonzero(clean)[:150]
    s = DFNScorer(trusted_indices=trusted.tolist(), epochs=40, progress=False)
    kept = s.select(s.score(data), data, len(data) // 2)
    precision = clean[kept].mean()
    assert precision > 0.9, precision  # vs 0.7 clean in the pool
    with pytest.raises(ValueError, match="exactly one"):
        DFNScorer()


def test_el2n_easy_prefers_clean_labels():
    x, _, y_noisy, clean = _digits_pool(noise=0.3)
    data = ScoringData.from_tensors(x, y_noisy)
    s = EL2NScorer(epochs=3, proxies=1, which="easy", progress=False)
    kept = s.select(s.score(data), data, len(data) // 2)
    assert clean[kept].mean() > 0.8


def test_semdedup_removes_planted_duplicates():
    x, y, _, _ = _digits_pool()
    g = torch.Generator().manual_seed(0)
    src = torch.arange(100)
    dup = x[src] + 1e-3 * torch.randn(100, *x.shape[1:], generator=g)
    data = ScoringData.from_tensors(torch.cat([x, dup]), torch.cat([y, y[src]]))
    s = SemDeDup(Embedder(progress=False), num_clusters=10, eps=0.001)
    scores = s.score(data)
    kept = s.select(scores, data, None)
    removed = np.setdiff1d(np.arange(len(data)), kept)
    pairs = {frozenset((int(i), len(x) + j)) for j, i in enumerate(src)}
    # one member of every planted pair goes, and (almost) nothing else
    assert sum(any(r in p for r in removed) for p in pairs) == 100
    assert len(removed) <= 105


def test_cluster_quotas_solve_the_bounded_problem():
    p = np.array([0.4, 0.3, 0.2, 0.1])
    x = cluster_quotas(100, p, np.zeros(4), np.full(4, 1000))
    assert x.tolist() == [40, 30, 20, 10]  # proportional when no bound is active
    x = cluster_quotas(100, p, np.array([0, 0, 0, 25]), np.array([30, 1000, 1000, 1000]))
    assert x.sum() == 100 and x[0] == 30 and x[3] == 25 and x[1] > x[2]
    with pytest.raises(ValueError, match="Cannot keep"):
        cluster_quotas(100, p, np.zeros(4), np.full(4, 10))


def test_dbp_gives_complex_clusters_more_of_the_budget():
    x, y, _, _ = _digits_pool()
    # classes 0-4 made redundant: 6 jittered copies of 20 images each; classes 5-9 stay diverse
    g = torch.Generator().manual_seed(0)
    parts, labels = [], []
    for c in range(10):
        xc = x[y == c]
        if c < 5:
            xc = xc[:20].repeat(6, 1, 1, 1) + 0.05 * torch.randn(120, *x.shape[1:], generator=g)
        parts.append(xc)
        labels.append(torch.full((len(xc),), c))
    data = ScoringData.from_tensors(torch.cat(parts), torch.cat(labels))
    s = DensityBasedPruning(Embedder(progress=False), num_clusters=20, dedup_eps=None, temperature=0.05)
    scores = s.score(data)
    kept = s.select(scores, data, int(0.3 * len(data)))
    assert len(kept) == int(0.3 * len(data))
    share = np.bincount(data.labels[kept], minlength=10) / np.bincount(data.labels, minlength=10)
    assert share[5:].mean() > 1.3 * share[:5].mean(), share
    # SSP and random run on the same pool
    ssp = SelfSupervisedPrototypes(Embedder(progress=False), num_clusters=10)
    assert len(ssp.select(ssp.score(data), data, 100)) == 100


def test_dp4tl_label_mapping_drops_distractor_classes():
    x, y, _, _ = _digits_pool()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(500, *x.shape[1:], generator=g)
    src_x = torch.cat([x[y < 8], noise])  # source: digits 0-7 plus 5 classes of noise images
    src_y = torch.cat([y[y < 8], 8 + torch.arange(500) % 5])
    target = x[y < 8][::5]  # target inputs resemble the digit classes
    s = DP4TLLabelMapping(target=target, surrogate_epochs=3, class_fraction=0.5, progress=False)
    dm_data = ScoringData.from_tensors(src_x, src_y)
    scores = s.score(dm_data)
    assert len(scores["kept_classes"]) == round(0.5 * 13)
    assert set(scores["kept_classes"].tolist()) <= set(range(8))
    kept = s.select(scores, dm_data, None)
    assert set(src_y[kept].unique().tolist()) == set(scores["kept_classes"].tolist())


def reject_label_zero(x, y, meta):
    return int(y) != 0


def test_rule_filter_resolution_blank_images_keywords_and_predicates():
    x = torch.randn(6, 1, 8, 8)
    x[2] = 0.5  # constant image
    meta = {"caption": ["a portrait photo", "a woman", "a doctor smiling", "landscape", "the actor", "man"],
            "height": [300, 100, 400, 400, 400, 400], "width": [300, 100, 400, 1500, 400, 400]}
    data = ScoringData.from_tensors(x, torch.tensor([1, 1, 1, 1, 0, 1]), metadata=meta)
    f = RuleFilter(min_resolution=200, max_aspect_ratio=3.0, min_pixel_std=1e-3,
                   keywords=["portrait", "woman", "man", "actor", "doctor"],
                   predicates=["test_filtering.reject_label_zero"])
    scores = f.score(data)
    assert f.select(scores, data, None).tolist() == [0, 5]
    assert f.rejection_counts(scores) == {"min_resolution": 1, "max_aspect_ratio": 1, "min_pixel_std": 1,
                                          "keywords": 0, "test_filtering.reject_label_zero": 1}
    with pytest.raises(ValueError, match="no rule"):
        RuleFilter()
    with pytest.raises(ValueError, match="Cannot import"):
        RuleFilter(predicates=["nowhere.nothing"])


def test_scaling_law_fit_and_compute_aware_selection():
    truth = FilteringScalingLaw([{"a": 1.0, "b": -0.5, "tau": 1.0}, {"a": 1.0, "b": -0.4, "tau": 4.0}],
                                bucket_size=100, d=0.0)
    n = [50, 100, 200, 400, 800]
    fit = FilteringScalingLaw.fit_bucket(n, [truth.error(m, 1) + 0.0 for m in n], 100, d=0.0)
    assert abs(fit.b + 0.5) < 0.05
    assert truth.best_pool(50) == 1 and truth.best_pool(10_000) == 2
    data = ScoringData.from_tensors(torch.zeros(200, 1), torch.zeros(200, dtype=torch.long))
    sizes = []
    for budget in (50, 10_000):
        s = ComputeAwareSelection(RandomScorer(), truth, samples_seen=budget)
        sizes.append(len(s.select(s.score(data), data, None)))
    assert sizes == [100, 200]


def test_embedder_reads_a_checkpoint_and_timm_names(tmp_path):
    def arch():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))

    torch.manual_seed(1)
    trained = ImageClassifier(arch(), num_classes=5, image_size=8)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "model.ckpt")  # keys net.*
    x = torch.randn(10, 1, 8, 8)
    emb = Embedder(arch(), checkpoint=str(tmp_path / "model.ckpt"), normalize=False, progress=False).embed(x)
    np.testing.assert_allclose(emb, trained.net(x).detach().numpy(), atol=1e-6)
    assert Embedder("resnet10t", progress=False).embed(torch.randn(3, 1, 16, 16)).shape == (3, 512)
    with pytest.raises(FileNotFoundError):
        Embedder(arch(), checkpoint=str(tmp_path / "missing.pt"), progress=False).embed(x)


def test_select_harness_tabulates_equal_size_subsets():
    def make_model(seed):
        return ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), num_classes=10, image_size=8)

    results = compare_curations(lambda: DigitsDataModule(batch_size=64), make_model,
                                {"random": RandomScorer(0), "ssp": SelfSupervisedPrototypes(Embedder(progress=False))},
                                keep=0.3, seeds=(0, 1), trainer_kwargs={"max_epochs": 1})
    assert len(results) == 4 and {r.num_kept for r in results} == {388}
    table = results_table(results)
    assert "| random | 388 |" in table and "| ssp | 388 |" in table and "±" in table


# -- one vocabulary, declarative validation -----------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
_TARGET = torch.zeros(4, 1, 8, 8)
_LAW = FilteringScalingLaw([{"a": 1.0, "b": -0.5, "tau": 1.0}], bucket_size=10, d=0.0)

#: (constructor, valid keyword arguments besides the bad one)
SCORERS = {
    "RandomScorer": (RandomScorer, {}),
    "EL2NScorer": (EL2NScorer, {}),
    "DFNScorer": (DFNScorer, {"trusted_indices": [0, 1]}),
    "SemDeDup": (SemDeDup, {}),
    "SelfSupervisedPrototypes": (SelfSupervisedPrototypes, {}),
    "DensityBasedPruning": (DensityBasedPruning, {}),
    "DP4TLLabelMapping": (DP4TLLabelMapping, {"target": _TARGET}),
    "DP4TLFeatureMapping": (DP4TLFeatureMapping, {"target": _TARGET}),
    "RuleFilter": (RuleFilter, {"min_pixel_std": 0.0}),
    "ComputeAwareSelection": (ComputeAwareSelection, {"scorer": RandomScorer(), "law": _LAW, "samples_seen": 10}),
}

#: (scorer, argument, bad value): NaN, infinity, negative numbers, a wrong `which`, out-of-range fractions
BAD_SCORER_VALUES = [
    ("RandomScorer", "seed", -1), ("RandomScorer", "seed", NAN),
    ("EL2NScorer", "lr", NAN), ("EL2NScorer", "lr", INF), ("EL2NScorer", "lr", -1e-3), ("EL2NScorer", "epochs", 0),
    ("EL2NScorer", "proxies", -2), ("EL2NScorer", "which", "medium"), ("EL2NScorer", "batch_size", 0),
    ("EL2NScorer", "seed", -1),
    ("DFNScorer", "lr", NAN), ("DFNScorer", "weight_decay", -1.0), ("DFNScorer", "weight_decay", INF),
    ("DFNScorer", "embed_dim", 0), ("DFNScorer", "epochs", -1), ("DFNScorer", "seed", -3),
    ("SemDeDup", "eps", NAN), ("SemDeDup", "eps", 1.0), ("SemDeDup", "eps", -0.1), ("SemDeDup", "num_clusters", 0),
    ("SemDeDup", "which", "farthest"), ("SemDeDup", "seed", -1),
    ("SelfSupervisedPrototypes", "which", "medium"), ("SelfSupervisedPrototypes", "num_clusters", -1),
    ("SelfSupervisedPrototypes", "seed", NAN),
    ("DensityBasedPruning", "temperature", NAN), ("DensityBasedPruning", "temperature", INF),
    ("DensityBasedPruning", "temperature", -0.5), ("DensityBasedPruning", "dedup_eps", 1.5),
    ("DensityBasedPruning", "dedup_eps", NAN), ("DensityBasedPruning", "cls_bal_ratio", NAN),
    ("DensityBasedPruning", "cls_bal_ratio", 1.1), ("DensityBasedPruning", "num_neighbors", 0),
    ("DensityBasedPruning", "dedup_clusters", -4), ("DensityBasedPruning", "which", "medium"),
    ("DP4TLLabelMapping", "class_fraction", NAN), ("DP4TLLabelMapping", "class_fraction", 0.0),
    ("DP4TLLabelMapping", "class_fraction", 1.5), ("DP4TLLabelMapping", "lr", INF),
    ("DP4TLLabelMapping", "surrogate_epochs", -1), ("DP4TLLabelMapping", "seed", -1),
    ("DP4TLFeatureMapping", "class_fraction", INF), ("DP4TLFeatureMapping", "class_fraction", -0.5),
    ("DP4TLFeatureMapping", "num_clusters", 1),
    ("RuleFilter", "min_pixel_std", NAN), ("RuleFilter", "min_pixel_std", -1.0), ("RuleFilter", "max_aspect_ratio", INF),
    ("RuleFilter", "max_aspect_ratio", 0.5), ("RuleFilter", "min_resolution", -10), ("RuleFilter", "keyword_mode", "all"),
    ("ComputeAwareSelection", "samples_seen", 0), ("ComputeAwareSelection", "samples_seen", NAN),
]


def test_bad_value_table_covers_every_scorer():
    assert {name for name, _, _ in BAD_SCORER_VALUES} == set(SCORERS)


@pytest.mark.parametrize("name,arg,value", BAD_SCORER_VALUES, ids=lambda v: str(v))
def test_scorer_rejects_bad_value_naming_the_argument(name, arg, value):
    cls, kwargs = SCORERS[name]
    cls(**kwargs)  # the valid baseline constructs
    with pytest.raises(ValueError, match=rf"^`?{arg}`? must be") as err:
        cls(**{**kwargs, arg: value})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arg,value", [
    ("keep", NAN), ("keep", INF), ("keep", -0.5), ("keep", 0.0), ("keep", 1.5), ("keep", 0), ("keep", -3),
    ("min_per_class", -1), ("min_per_class", NAN), ("shuffle_seed", -1), ("shuffle_seed", INF),
], ids=str)
def test_filtered_datamodule_rejects_bad_value_naming_the_argument(arg, value):
    with pytest.raises(ValueError, match=rf"`?{arg}`?") as err:
        FilteredDataModule(DigitsDataModule(), RandomScorer(), **{arg: value})
    assert str(err.value).split()[0].strip("`") in (arg, f"{arg}`") and "\n" not in str(err.value)


def test_cli_types_reject_bad_yaml_values():
    """The constructor annotations (Literal, constrained numbers) let jsonargparse refuse a bad value by key."""
    from jsonargparse import ArgumentParser

    for cls, arg, value in [(EL2NScorer, "which", "medium"), (EL2NScorer, "lr", "nan"),
                            (DensityBasedPruning, "temperature", "-1"), (SemDeDup, "eps", "1.0"),
                            (DP4TLFeatureMapping, "class_fraction", "inf"), (FilteredDataModule, "keep", "0")]:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "c", skip={"datamodule", "scorer", "target", "law", "embedder"})
        with pytest.raises(Exception, match=rf"c\.{arg}"):
            parser.parse_args([f"--c.{arg}={value}"])
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(FilteredDataModule, "c", skip={"datamodule", "scorer"})
    assert parser.parse_args(["--c.keep=1"]).c.keep == 1  # one sample, not 100%
    assert parser.parse_args(["--c.keep=0.5"]).c.keep == 0.5


def test_which_orders_hard_easy_random():
    x, y, _, _ = _digits_pool()
    data = ScoringData.from_tensors(x, y)
    emb = Embedder(progress=False)
    scores = {w: SelfSupervisedPrototypes(emb, num_clusters=10, which=w).score(data) for w in ("hard", "easy", "random")}
    dist = scores["hard"]["distance"]
    np.testing.assert_allclose(scores["hard"]["score"], dist)
    np.testing.assert_allclose(scores["easy"]["score"], -dist)
    assert abs(np.corrcoef(scores["random"]["score"], dist)[0, 1]) < 0.1
    # SemDeDup: `which` picks the survivor of a near-duplicate pair: the one farthest from the centroid ("hard",
    # row 0) or nearest to it ("easy", row 1); the other one gets the high similarity and goes
    from lightning_ext.curation import semdedup_max_similarity

    e = np.array([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0]])
    assign, centroids = np.zeros(3, dtype=int), np.array([[0.7071, 0.7071]])
    hard = semdedup_max_similarity(e, assign, centroids, which="hard")
    easy = semdedup_max_similarity(e, assign, centroids, which="easy")
    assert hard[1] > 0.99 > hard[0] and easy[0] > 0.99 > easy[1]
    with pytest.raises(ValueError, match="which"):
        semdedup_max_similarity(e, assign, centroids, which="middle")


# -- scorer training through Fabric ---------------------------------------------------------------------------


def test_scorer_training_is_deterministic_per_seed_and_leaves_the_global_rng_alone():
    x, _, y_noisy, _ = _digits_pool(noise=0.2)
    data = ScoringData.from_tensors(x[:300], y_noisy[:300])
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = EL2NScorer(epochs=1, proxies=1, seed=3, progress=False, accelerator="cpu").score(data)["el2n"]
    assert torch.equal(torch.get_rng_state(), state)  # no global reseeding
    b = EL2NScorer(epochs=1, proxies=1, seed=3, progress=False, accelerator="cpu").score(data)["el2n"]
    c = EL2NScorer(epochs=1, proxies=1, seed=4, progress=False, accelerator="cpu").score(data)["el2n"]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    dfn = [DFNScorer(trusted_indices=list(range(50)), epochs=2, seed=s, progress=False).score(data)["score"]
           for s in (0, 0, 1)]
    np.testing.assert_array_equal(dfn[0], dfn[1])
    assert not np.allclose(dfn[0], dfn[2])
    assert torch.equal(torch.get_rng_state(), state)


def test_train_classifier_runs_through_fabric_on_the_named_accelerator(monkeypatch):
    import lightning.fabric

    from lightning_ext.curation.training import predict_logits, train_classifier

    made = []
    original = lightning.fabric.Fabric.__init__

    def spy(self, *args, **kwargs):
        made.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(lightning.fabric.Fabric, "__init__", spy)
    data = TensorDataset(torch.randn(32, 4), torch.arange(32) % 2)
    net = train_classifier(nn.Linear(4, 2), data, 2, batch_size=8, progress=False, accelerator="cpu")
    assert made and made[0]["accelerator"] == "cpu" and made[0]["devices"] == 1
    assert not net.training and predict_logits(net, torch.randn(5, 4)).shape == (5, 2)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(nn.Linear(4, 2), data, -1, progress=False)


def test_curation_imports_no_other_familys_lightning_wrapper():
    import subprocess
    import sys

    from lightning_ext.catalogue import FAMILIES

    others = tuple(f"lightning_ext.{f}" for f in FAMILIES if f != "curation") + (
        "lightning_ext.modules", "lightning_ext.callbacks", "lightning_ext.datamodules")
    code = ("import sys, lightning_ext.curation as c, lightning_ext.curation.datamodule; "
            "from lightning_ext.curation.training import build_model; "
            "build_model('resnet10t', 3, 1, seed=0); c.Embedder('resnet10t', progress=False).network(1); "
            # import timm registers the library's timm models (lightning_ext/timm_hook.py): plain modules, no wrapper
            f"bad = sorted(m for m in sys.modules if m.startswith({others!r}) and m not in "
            "('lightning_ext.vision', 'lightning_ext.vision.ffnet')); assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# -- where FilteredDataModule writes --------------------------------------------------------------------------


def test_score_cache_under_cache_root_and_damaged_cache_rescored(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_EXT_CACHE", str(tmp_path / "root"))
    dm = FilteredDataModule(DigitsDataModule(), RandomScorer(seed=1), keep=0.5)  # default cache_dir "scores"
    dm.setup("fit")
    path = dm.cache_path()
    assert path.parent == tmp_path / "root" / "curation" / "scores" and path.is_file()
    assert not list(path.parent.glob("*.tmp"))  # atomic write: no temporary file left
    path.write_bytes(b"not an npz")
    again = FilteredDataModule(DigitsDataModule(), RandomScorer(seed=1), keep=0.5)
    with pytest.warns(UserWarning, match="unreadable score cache"):
        again.setup("fit")
    assert not again.loaded_from_cache and np.array_equal(again.kept_indices, dm.kept_indices)
    third = FilteredDataModule(DigitsDataModule(), RandomScorer(seed=1), keep=0.5)
    third.setup("fit")
    assert third.loaded_from_cache  # the damaged file was rewritten
    off = FilteredDataModule(DigitsDataModule(), RandomScorer(seed=1), keep=0.5, cache_dir=None)
    off.setup("fit")
    assert off.cache_path() is None and not off.loaded_from_cache


def test_export_path_is_relative_to_the_run_directory(tmp_path):
    dm = FilteredDataModule(PlainDataModule(), RandomScorer(), keep=24, cache_dir=None, export_path="kept.json")
    model = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), num_classes=3, image_size=8)
    trainer = Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    exported = sorted(tmp_path.rglob("kept.json"))
    assert exported == [Path(trainer.log_dir) / "kept.json"]
    assert json.loads(exported[0].read_text())["kept_indices"] == dm.kept_indices.tolist()


# -- one-batch equivalence of every scoring rule against the paper's equations ------------------------------


def test_el2n_scores_match_the_papers_equation():
    from lightning_ext.curation.el2n import el2n_scores

    torch.manual_seed(0)
    net = nn.Linear(6, 4)
    x, y = torch.randn(9, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])
    logits = (x.double() @ net.weight.double().T + net.bias.double()).detach().numpy()
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(4)[y.numpy()]
    expected = np.sqrt(((p - onehot) ** 2).sum(1))  # Paul et al. eq. 2: || p(x) - y ||_2
    np.testing.assert_allclose(el2n_scores(net, x, y).numpy(), expected, atol=1e-6)


def test_dp4tl_label_mapping_matches_the_official_rule_and_flags_unvoted_classes():
    from lightning_ext.curation.dp4tl import label_mapping_votes, top_classes

    torch.manual_seed(0)
    surrogate = nn.Sequential(nn.Flatten(), nn.Linear(16, 6))
    target = torch.randn(12, 1, 4, 4)
    logits = surrogate(target).detach().double().numpy()
    counts = np.zeros(6, dtype=int)
    for pred in logits.argmax(1):  # lm_selection_for_imagenet.py: a histogram of argmax source classes
        counts[pred] += 1
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).sum(0)
    got_counts, got_probs = label_mapping_votes(surrogate, target, 6)
    np.testing.assert_array_equal(got_counts, counts)
    np.testing.assert_allclose(got_probs, probs, atol=1e-6)
    for frac in (1 / 6, 0.5, 5 / 6):
        k = round(frac * 6)
        order = sorted(range(6), key=lambda c: (-counts[c], -probs[c], c))  # votes, then summed probability
        assert top_classes(counts, frac, tie_break=probs).tolist() == sorted(order[:k])
    # the scorer with this (already trained) surrogate keeps the same classes and flags zero-vote ones
    src = ScoringData.from_tensors(torch.randn(24, 1, 4, 4), torch.arange(24) % 6)
    voted = int((counts > 0).sum())
    frac = min(1.0, (voted + 1) / 6)
    s = DP4TLLabelMapping(target=target, surrogate=surrogate, surrogate_epochs=0, class_fraction=frac, progress=False)
    with pytest.warns(UserWarning, match="received a target vote"):
        scores = s.score(src)
    assert scores["kept_classes"].tolist() == top_classes(counts, frac, tie_break=probs).tolist()
    assert int(scores["unvoted_kept"]) == round(frac * 6) - voted
    with pytest.raises(ValueError, match="received a target vote"):
        DP4TLLabelMapping(target=target, surrogate=surrogate, surrogate_epochs=0, class_fraction=frac,
                          progress=False, on_unvoted="error").score(src)


def test_dbp_complexity_and_shares_match_the_papers_equations():
    from lightning_ext.curation.density_based_pruning import cluster_complexity

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((40, 5))
    assign = np.arange(40) % 4
    cent = np.stack([emb[assign == j].mean(0) for j in range(4)])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    d_intra = np.array([np.mean([1 - unit[i] @ cent[j] for i in np.flatnonzero(assign == j)]) for j in range(4)])
    d_inter = np.array([np.mean(sorted(1 - cent[j] @ cent[m] for m in range(4) if m != j)[:2]) for j in range(4)])
    c, di, de = cluster_complexity(emb, assign, cent, num_neighbors=2)
    np.testing.assert_allclose(di, d_intra, atol=1e-6)
    np.testing.assert_allclose(de, d_inter, atol=1e-6)
    np.testing.assert_allclose(c, d_intra * d_inter, atol=1e-6)  # C_j = d_inter * d_intra (Abbas et al., eq. 1)
    p = np.exp(c / 0.5) / np.exp(c / 0.5).sum()  # the shares, softmax(C / tau)
    q = cluster_quotas(1000, p, np.zeros(4), np.full(4, 1000))  # no bound active: the rounded shares
    assert q.sum() == 1000 and np.abs(q - 1000 * p).max() < 1


def test_scaling_law_official_mixture_matches_the_reference_code_equations():
    pools = [{"a": 1.0, "b": -0.5, "tau": 1.0}, {"a": 1.0, "b": -0.3, "tau": 3.0}]
    size, unit = 100, 10.0

    def reference(n, chosen, scale_tau):  # objective.py's effective utility aggregation, d added outside
        spe = size * len(chosen)
        epochs = np.arange(n // spe + 1)
        b = np.mean([p["b"] * 0.5 ** (epochs / (p["tau"] * (len(chosen) if scale_tau else 1))) for p in chosen], 0)
        samples = np.minimum(spe * (epochs + 1), n) / unit
        before = spe * epochs / unit
        loss = samples[0] ** b[0]
        if len(samples) > 1:
            loss *= np.prod((samples[1:] / before[1:]) ** b[1:])
        return loss

    official = FilteringScalingLaw(pools, bucket_size=size, d=0.0, unit=unit)
    repetitions = FilteringScalingLaw(pools, bucket_size=size, d=0.0, unit=unit, mixture="repetitions")
    assert official.mixture == "official"
    for n in (50, 100, 250, 1000, 5000):
        for m in (1, 2):
            assert official.error(n, m) == pytest.approx(reference(n, pools[:m], True), rel=1e-9)
            assert repetitions.error(n, m) == pytest.approx(reference(n, pools[:m], False), rel=1e-9)
    assert official.error(5000, 2) != pytest.approx(repetitions.error(5000, 2))  # the two rules differ
    with pytest.raises(ValueError, match="mixture"):
        FilteringScalingLaw(pools, mixture="mean")
