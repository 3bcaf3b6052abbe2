"""The README's results table agrees with the results pages: every page exists, every page is listed, and each
verdict the table states appears in its page (the pages are rendered by their benchmark scripts)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| \[[^\]]+\]\((docs/results/[\w.]+\.md)\) \| [^|]+ \| ([^|]+) \|$")
VERDICTS = ("partly reproduced", "not reproduced", "reproduced", "inconclusive", "not testable here", "baseline")


def _rows() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    return [(m.group(1), m.group(2).strip()) for line in text.splitlines() if (m := ROW.match(line))]


def test_every_results_page_is_in_the_readme_table():
    listed = {path for path, _ in _rows()}
    pages = {f"docs/results/{p.name}" for p in (ROOT / "docs" / "results").glob("*.md")}
    assert pages == listed, f"not in the README table: {sorted(pages - listed)}; missing pages: {sorted(listed - pages)}"


@pytest.mark.parametrize("path,verdict", _rows(), ids=lambda v: str(v)[:40])
def test_readme_verdicts_appear_in_their_pages(path, verdict):
    page = (ROOT / path).read_text().lower()
    words = [v for v in VERDICTS if v in verdict.lower()]
    assert words, f"{path}: the README verdict {verdict!r} uses none of {VERDICTS}"
    for word in words:
        if word == "reproduced" and ("partly reproduced" in words or "not reproduced" in words):
            continue
        if word == "baseline":
            continue
        assert word in page, f"{path}: the README says {word!r} but the page never does"
