"""The static catalogue: every entry resolves to what it says, summaries match docstrings, search finds aliases."""

import importlib
import inspect

import pytest
from lightning.pytorch import Callback, LightningDataModule, LightningModule

from lightning_ext import catalogue

BASES = {"callbacks": Callback, "modules": LightningModule, "datamodules": LightningDataModule}


@pytest.mark.parametrize("entry", catalogue.ENTRIES, ids=lambda e: e.name)
def test_every_entry_resolves_in_its_family_with_its_documented_summary(entry):
    obj = entry.load()
    assert entry.module.startswith(f"lightning_ext.{entry.family}."), entry
    assert entry.family in catalogue.FAMILIES and entry.kind in catalogue.KINDS
    if entry.kind in BASES:
        assert inspect.isclass(obj) and issubclass(obj, BASES[entry.kind]), entry
        assert entry.summary == catalogue.docstring_summary(obj), (
            f"{entry.name}: the catalogue summary must be the docstring's first paragraph; docstring says "
            f"{catalogue.docstring_summary(obj)!r}"
        )
    else:
        assert callable(obj) and inspect.getdoc(obj), f"{entry.name} needs a docstring"
    if entry.arxiv is not None:
        assert entry.paper, f"{entry.name} has an arXiv id but no paper title"
        assert len(entry.arxiv.split(".")) == 2 and entry.arxiv.replace(".", "").isdigit(), entry.arxiv


def test_names_are_unique_and_facades_export_exactly_the_lightning_kinds():
    names = [e.name for e in catalogue.ENTRIES]
    assert len(names) == len(set(names))
    for kind in catalogue.LIGHTNING_KINDS:
        facade = importlib.import_module(f"lightning_ext.{kind}")
        assert sorted(facade.__all__) == sorted(e.name for e in catalogue.entries(kind))


@pytest.mark.parametrize("query, expected", [
    ("udfc", "DataFreeCompression"), ("InTune", "PipelineTuner"), ("ties", "ties_merging_merge"),
    ("semdedup", "SemDeDup"), ("el2n", "EL2NScorer"), ("dfn", "DFNScorer"), ("dbp", "DensityBasedPruning"),
    ("ssp", "SelfSupervisedPrototypes"), ("dp4tl", "DP4TLLabelMapping"), ("2310.02903", "FroSSL"),
    ("bayesian personalized ranking", "MFBPR"), ("AP", "ActivatingWhilePruning"),
])
def test_search_finds_methods_by_alias_paper_title_and_arxiv_id(query, expected):
    assert expected in [e.name for e in catalogue.search(query)]


def test_search_ranks_exact_alias_first_and_filters_validate():
    assert catalogue.search("udfc")[0].name == "DataFreeCompression"
    assert catalogue.search("no such method at all") == []
    with pytest.raises(ValueError, match="unknown family 'vision2'"):
        catalogue.entries(family="vision2")
    with pytest.raises(ValueError, match="unknown kind"):
        catalogue.entries(kind="optimizers")
    assert {e.family for e in catalogue.entries(kind="scorers")} == {"curation"}
