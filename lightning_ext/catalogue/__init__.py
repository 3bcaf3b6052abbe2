"""The static catalogue: every shipped component declared once, read without importing any of them.

Each :class:`Entry` names a component, its kind (``callbacks``, ``modules``, ``datamodules`` for the Lightning
parts; ``scorers``, ``merges``, ``losses`` for the functional cores), its family folder, its defining module,
a one-line summary, the paper (title, arXiv id) and aliases a reader may search for (UDFC, InTune, TIES, ...).
``lightning-ext list`` and ``lightning-ext search`` read it; the facades ``lightning_ext.callbacks``,
``.modules`` and ``.datamodules`` resolve names through it; the CLI imports only the classes a config names.
``tests/test_package.py`` checks that each entry resolves and that its summary matches the docstring.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

KINDS = ("callbacks", "modules", "datamodules", "scorers", "merges", "losses", "layers", "federated")
LIGHTNING_KINDS = ("callbacks", "modules", "datamodules")
KIND_TITLES = {
    "callbacks": "Callbacks", "modules": "LightningModules", "datamodules": "LightningDataModules",
    "scorers": "Data scorers", "merges": "Merge algorithms", "losses": "Losses",
    "layers": "Model parts (plain PyTorch)",
    "federated": "Federated learning (Flower)",
}
FAMILIES = ("vision", "data", "compression", "distillation", "merging", "ssl", "curation", "recsys", "graph",
            "pipeline", "tabular", "mil", "metric_learning", "segmentation", "detection", "federated",
            "audio", "diffusion", "traffic", "text", "export", "parallel")


from lightning_ext.catalogue import by_family, by_kind
from lightning_ext.catalogue.entry import Entry, _e  # noqa: F401 - re-exported

ENTRIES: tuple[Entry, ...] = by_kind.ENTRIES + by_family.ENTRIES

_BY_NAME = {e.name: e for e in ENTRIES}


def entries(kind: Optional[str] = None, family: Optional[str] = None) -> list[Entry]:
    """Catalogue entries, in catalogue order, optionally of one kind and/or one family (no imports)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return [e for e in ENTRIES if (kind is None or e.kind == kind) and (family is None or e.family == family)]


def get(name: str) -> Entry:
    """The entry called ``name`` (a short name); :class:`KeyError` if there is none."""
    return _BY_NAME[name]


def exports(kind: str) -> dict[str, str]:
    """Short name -> defining module for one Lightning kind: what a facade exports."""
    return {e.name: e.module for e in ENTRIES if e.kind == kind}


def search(words: Iterable[str] | str) -> list[Entry]:
    """Entries matching every word (case-insensitive) in name, aliases, paper title, arXiv id, family or summary.

    An exact name or alias match ranks first.

    Example:
        >>> [e.name for e in search("ties")][:2]
        ['ModelMerging', 'ties_merging_merge']
    """
    terms = [w.lower() for w in (words.split() if isinstance(words, str) else words) if w]
    if not terms:
        return []
    hits = [e for e in ENTRIES if all(t in e.words() for t in terms)]
    phrase = " ".join(terms)

    def rank(e: Entry) -> int:
        names = [e.name.lower(), *(a.lower() for a in e.aliases)]
        return 0 if phrase in names else 1 if any(phrase in n for n in names) else 2

    return sorted(hits, key=rank)


# ---------------------------------------------------------------------------- compatibility and docs helpers
def components(kind: Optional[str] = None) -> list[Entry]:
    """Lightning components (callbacks, modules, datamodules), in catalogue order; no imports."""
    kinds = LIGHTNING_KINDS if kind is None else (kind,)
    return [e for k in kinds for e in sorted(entries(k), key=lambda e: e.name)]


def import_all() -> None:
    """Import every Lightning component (tests only: the CLI imports just the classes a config names)."""
    for e in components():
        e.load()


def docstring_summary(obj: object) -> str:
    """The first paragraph of ``obj``'s docstring on one line, Sphinx roles and double backticks simplified."""
    import inspect

    doc = inspect.getdoc(obj) or ""
    paragraph = doc.strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in paragraph.splitlines())
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "`")


def markdown_table(items: Optional[list[Entry]] = None) -> str:
    """The README's component table (Lightning components, then scorers, merges and losses)."""
    items = [e for k in KINDS for e in sorted(entries(k), key=lambda e: e.name)] if items is None else items
    lines = ["| component | kind | family | what it is | paper |", "|---|---|---|---|---|"]
    for e in items:
        paper = f"[{e.arxiv}](https://arxiv.org/abs/{e.arxiv})" if e.arxiv else ""
        lines.append(f"| `{e.name}` | {KIND_TITLES[e.kind]} | {e.family} | {e.summary} | {paper} |")
    return "\n".join(lines)
