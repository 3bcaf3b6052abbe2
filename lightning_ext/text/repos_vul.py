"""ReposVul's pure core: read repository-level vulnerability records, check them, filter them, turn them into samples.

Paper: "ReposVul: A Repository-Level High-Quality Vulnerability Dataset" (Wang et al., ICSE 2024 Industry Challenge
Track, arXiv 2401.13169); reference code https://github.com/Eshe0922/ReposVul (crawlers, untangling, dependency
extraction, trace-based filtering; the data themselves are on Google Drive and are never downloaded here).

A record is one CVE patch (the README's schema): ``cve_id, cwe_id, cve_language, project, commit_id, commit_date,
outdated, ...`` and ``details[]``, one entry per changed file with ``code`` (after the fix), ``code_before``,
``file_path``, ``file_language``, ``llm_check``, ``static_check``, ``target`` and ``function_before`` /
``function_after`` (lists of ``{function, target}``). :func:`read_records` reads JSON Lines, a JSON array or one
indented JSON document per file (the official ``*.jsonl`` files are in places written with ``json.dumps(...,
indent=4)``), and :func:`check_record` rejects a record with one line naming what is missing.

The filtering steps that can run offline: the untangling labels (``target``; or the LLM's / static analysers'
``llm_check`` / ``static_check`` flags) decide which changed functions are vulnerable; the trace-based filter's
``outdated`` flags drop patches superseded by later commits; exact duplicate functions (after whitespace
normalisation) are kept once; CWE ids are checked against the CWE list. The LLM untangling itself needs a commercial
API and is not re-run.

Example:
    >>> recs = [fixture_records()[0]]
    >>> [(s.label, s.cwe) for s in function_samples(recs)]  # vulnerable, unrelated change, and both after the fix
    [(1, 'CWE-787'), (0, 'CWE-787'), (0, 'CWE-787'), (0, 'CWE-787')]
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence

__all__ = ["read_records", "check_record", "read_cwe_list", "function_samples", "file_samples", "Sample",
           "normalise_code", "fixture_records", "write_fixture", "REQUIRED_FIELDS"]

#: Fields every record needs here (the schema has more; they are kept but unused).
REQUIRED_FIELDS = ("cve_id", "cwe_id", "project", "commit_date", "details")
#: Fields every ``details`` entry needs.
DETAIL_FIELDS = ("file_path", "code_before", "code", "function_before", "function_after")
_CWE = re.compile(r"^CWE-\d+$")
#: NVD's placeholders, which ReposVul keeps as CWE labels.
NVD_PLACEHOLDERS = ("NVD-CWE-Other", "NVD-CWE-noinfo")

Relevance = Literal["target", "llm_check", "static_check", "llm_and_static"]


@dataclass(frozen=True)
class Sample:
    """One function or file: its code, label (1 vulnerable, 0 not), CWE, project, commit date, record id, and the
    fixed version (for repair pairs; empty when none)."""

    code: str
    label: int
    cwe: str
    project: str
    date: str
    record: str
    fixed: str = ""


def read_records(path: str | Path) -> list[dict]:
    """Records from a ``.json``/``.jsonl`` file or a folder of them (JSON Lines, a JSON array, or JSON documents
    one after another, indented or not). Raises one line for a path that does not exist or text that is not JSON."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"ReposVul data path {str(path)!r} does not exist; give a .json/.jsonl file or a "
                                "folder of them (download ReposVul yourself: this library never downloads).")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"No .json or .jsonl files under {str(path)!r}.")
    out: list[dict] = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        decoder, i, n = json.JSONDecoder(), 0, len(text)
        while True:
            while i < n and text[i].isspace():
                i += 1
            if i >= n:
                break
            try:
                obj, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError as err:
                raise ValueError(f"{f}: not JSON at line {err.lineno} column {err.colno} ({err.msg}); ReposVul files "
                                 "hold JSON Lines, a JSON array or indented JSON documents.") from None
            items = obj if isinstance(obj, list) else [obj]
            for item in items:
                if not isinstance(item, dict):
                    raise ValueError(f"{f}: a record must be a JSON object, got {type(item).__name__}.")
                out.append(dict(item, _source=str(f)))
    return out


def read_cwe_list(path: str | Path) -> set[str]:
    """CWE ids (``CWE-<n>``) of a CSV such as ReposVul's ``CWE.csv`` or MITRE's export: the first column, digits
    with or without the ``CWE-`` prefix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"CWE list {str(path)!r} does not exist; give a CSV whose first column is the CWE id.")
    ids = set()
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.reader(f):
            if row and row[0].strip():
                head = row[0].strip()
                digits = head[4:] if head.upper().startswith("CWE-") else head
                if digits.isdigit():
                    ids.add(f"CWE-{int(digits)}")
    if not ids:
        raise ValueError(f"{path}: no CWE ids found in the first column.")
    return ids


def _where(record: dict, index: int) -> str:
    return f"record {index} ({record.get('cve_id', 'no cve_id')}) of {record.get('_source', 'the input')}"


def check_record(record: dict, index: int = 0, cwe_list: Optional[set[str]] = None,
                 on_unknown_cwe: Literal["error", "warn", "ignore"] = "error") -> str:
    """Check one record's fields; returns its CWE label (``"other"`` for an unknown CWE when allowed).

    Raises one line naming the record and what to change."""
    missing = [k for k in REQUIRED_FIELDS if record.get(k) in (None, "")]
    if missing:
        raise ValueError(f"{_where(record, index)} lacks {', '.join(missing)}; ReposVul records need "
                         f"{', '.join(REQUIRED_FIELDS)}.")
    if not isinstance(record["details"], list):
        raise ValueError(f"{_where(record, index)}: 'details' must be a list of changed files.")
    for j, d in enumerate(record["details"]):
        gone = [k for k in DETAIL_FIELDS if not isinstance(d, dict) or k not in d]
        if gone:
            raise ValueError(f"{_where(record, index)}: details[{j}] lacks {', '.join(gone)}.")
        for key in ("function_before", "function_after"):
            for k, fn in enumerate(d[key] or []):
                if not isinstance(fn, dict) or "function" not in fn:
                    raise ValueError(f"{_where(record, index)}: details[{j}].{key}[{k}] must be an object with "
                                     "'function' (and 'target').")
    cwe = str(record["cwe_id"]).strip()
    if cwe in NVD_PLACEHOLDERS:
        return cwe
    if not _CWE.match(cwe):
        raise ValueError(f"{_where(record, index)}: cwe_id {cwe!r} is not a CWE id; write 'CWE-<number>' or one of "
                         f"{', '.join(NVD_PLACEHOLDERS)}.")
    if cwe_list is not None and cwe not in cwe_list:
        if on_unknown_cwe == "error":
            raise ValueError(f"{_where(record, index)}: {cwe} is not in the CWE list; fix the label, extend the list "
                             "or set on_unknown_cwe to 'warn' or 'ignore' (it then counts as 'other').")
        if on_unknown_cwe == "warn":
            import warnings

            warnings.warn(f"{_where(record, index)}: {cwe} is not in the CWE list; counted as 'other'.", stacklevel=2)
        return "other"
    return cwe


def normalise_code(code: str) -> str:
    """Whitespace-normalised code (runs of whitespace -> one space), the key for duplicate removal."""
    return " ".join(str(code).split())


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y")
    return bool(value)


def _is_outdated(record: dict, detail: Optional[dict] = None) -> bool:
    if _flag(record.get("outdated", 0)):
        return True
    if detail is not None:
        return any(_flag(v) for k, v in detail.items() if k.startswith("outdated_file") and not isinstance(v, dict))
    return False


def _vulnerable(fn: dict, detail: dict, relevance: Relevance) -> bool:
    if relevance == "target":
        return _flag(fn.get("target", 0))
    llm, static = _flag(detail.get("llm_check", 0)), _flag(detail.get("static_check", 0))
    if relevance == "llm_check":
        return llm and _flag(fn.get("target", 1))
    if relevance == "static_check":
        return static and _flag(fn.get("target", 1))
    return llm and static and _flag(fn.get("target", 1))


def _kept(records: Iterable[tuple[dict, str]], drop_outdated: bool, languages: Optional[Sequence[str]]):
    langs = {lang.lower() for lang in languages} if languages else None
    for rec, cwe in records:
        if drop_outdated and _is_outdated(rec):
            continue
        for d in rec["details"]:
            if drop_outdated and _is_outdated(rec, d):
                continue
            lang = str(d.get("file_language") or rec.get("cve_language") or "").lower()
            if langs is not None and lang not in langs:
                continue
            yield rec, cwe, d


def function_samples(records: Sequence[dict], cwes: Optional[Sequence[str]] = None, relevance: Relevance = "target",
                     drop_outdated: bool = True, languages: Optional[Sequence[str]] = None,
                     deduplicate: bool = True) -> list[Sample]:
    """Function-level samples: each changed function before the fix (label 1 when the untangling flag marks it
    vulnerable, else 0) and each function after the fix (label 0, the repaired version). ``cwes`` are the checked
    labels of :func:`check_record` (default: the records' ``cwe_id``). With ``deduplicate`` an identical function
    (whitespace-normalised) is kept once, and a vulnerable function whose text also appears as fixed code is dropped
    (its label would contradict itself). Empty code (a new file's pre-image, a deleted file's post-image) is no
    sample."""
    cwes = [r["cwe_id"] for r in records] if cwes is None else cwes
    out: list[Sample] = []
    for rec, cwe, d in _kept(zip(records, cwes), drop_outdated, languages):
        after = [fn["function"] for fn in d["function_after"] or []]
        for k, fn in enumerate(d["function_before"] or []):
            if not str(fn["function"]).strip():  # a new file's (empty) pre-image
                continue
            fixed = after[k] if k < len(after) else ""
            out.append(Sample(fn["function"], int(_vulnerable(fn, d, relevance)), cwe, str(rec["project"]),
                              str(rec["commit_date"]), str(rec["cve_id"]), fixed if str(fixed).strip() else ""))
        for code in after:
            if str(code).strip():  # a deleted file's (empty) post-image is no sample
                out.append(Sample(code, 0, cwe, str(rec["project"]), str(rec["commit_date"]), str(rec["cve_id"])))
    return _dedup(out) if deduplicate else out


def file_samples(records: Sequence[dict], cwes: Optional[Sequence[str]] = None, relevance: Relevance = "target",
                 drop_outdated: bool = True, languages: Optional[Sequence[str]] = None,
                 deduplicate: bool = True) -> list[Sample]:
    """File-level samples: ``code_before`` (label 1 when the file's flag marks it vulnerable, else 0) and ``code``
    after the fix (label 0)."""
    cwes = [r["cwe_id"] for r in records] if cwes is None else cwes
    out: list[Sample] = []
    for rec, cwe, d in _kept(zip(records, cwes), drop_outdated, languages):
        vulnerable = _vulnerable({"target": d.get("target", 1)}, d, relevance)
        meta = (cwe, str(rec["project"]), str(rec["commit_date"]), str(rec["cve_id"]))
        if str(d["code_before"]).strip():  # a new file has no code before the fix
            out.append(Sample(d["code_before"], int(vulnerable), *meta, fixed=d["code"]))
        if str(d["code"]).strip():
            out.append(Sample(d["code"], 0, *meta))
    return _dedup(out) if deduplicate else out


def _dedup(samples: list[Sample]) -> list[Sample]:
    fixed_texts = {normalise_code(s.code) for s in samples if s.label == 0}
    seen, out = set(), []
    for s in samples:
        key = normalise_code(s.code)
        if key in seen or (s.label == 1 and key in fixed_texts):
            continue
        seen.add(key)
        out.append(s)
    return out


# ----------------------------------------------------------------------------------------------- tiny fixture
_C_BEFORE = """static int {name}(struct buf *b, const char *src, size_t n)
{{
    char tmp[64];
    memcpy(tmp, src, n);
    return append(b, tmp, n);
}}"""
_C_AFTER = """static int {name}(struct buf *b, const char *src, size_t n)
{{
    char tmp[64];
    if (n > sizeof(tmp))
        return -EINVAL;
    memcpy(tmp, src, n);
    return append(b, tmp, n);
}}"""
_C_NULL_BEFORE = """int {name}(struct node *list, int key)
{{
    struct node *n = find(list, key);
    return n->value;
}}"""
_C_NULL_AFTER = """int {name}(struct node *list, int key)
{{
    struct node *n = find(list, key);
    if (n == NULL)
        return -ENOENT;
    return n->value;
}}"""
_PY_BEFORE = """def {name}(db, user):
    query = "SELECT * FROM users WHERE name = '%s'" % user
    return db.execute(query).fetchall()"""
_PY_AFTER = """def {name}(db, user):
    query = "SELECT * FROM users WHERE name = ?"
    return db.execute(query, (user,)).fetchall()"""
_JAVA_BEFORE = """public String {name}(HttpServletRequest req) {{
    return "<p>" + req.getParameter("q") + "</p>";
}}"""
_JAVA_AFTER = """public String {name}(HttpServletRequest req) {{
    return "<p>" + Encode.forHtml(req.getParameter("q")) + "</p>";
}}"""
_HELPER = """static size_t {name}(const struct buf *b)
{{
    return b->len;
}}"""
_KINDS = {"CWE-787": ("C", _C_BEFORE, _C_AFTER), "CWE-476": ("C", _C_NULL_BEFORE, _C_NULL_AFTER),
          "CWE-89": ("Python", _PY_BEFORE, _PY_AFTER), "CWE-79": ("Java", _JAVA_BEFORE, _JAVA_AFTER)}
_PLAN = [  # (project, cwe, year, outdated)
    ("libfoo/libfoo", "CWE-787", 2018, 0), ("libfoo/libfoo", "CWE-476", 2019, 0), ("netd/netd", "CWE-787", 2019, 0),
    ("netd/netd", "CWE-476", 2020, 1), ("pyshop/pyshop", "CWE-89", 2020, 0), ("pyshop/pyshop", "CWE-89", 2021, 0),
    ("webapp/webapp", "CWE-79", 2021, 0), ("webapp/webapp", "CWE-79", 2022, 0), ("imgtool/imgtool", "CWE-787", 2022, 0),
    ("imgtool/imgtool", "CWE-476", 2023, 0), ("dbkit/dbkit", "CWE-89", 2023, 0), ("dbkit/dbkit", "CWE-89", 2024, 0),
]


def fixture_records() -> list[dict]:
    """A tiny dataset in ReposVul's schema, written here (not real CVEs): 12 patches in 6 projects, 4 CWEs, C,
    Python and Java, 2018-2024, one flagged outdated; each changes one vulnerable function and one unrelated one."""
    out = []
    for i, (project, cwe, year, outdated) in enumerate(_PLAN):
        lang, before, after = _KINDS[cwe]
        name, helper = f"handle_{project.split('/')[0]}_{i}", f"length_{project.split('/')[0]}_{i}"
        ext = {"C": "c", "Python": "py", "Java": "java"}[lang]
        file_before = before.format(name=name) + "\n\n" + _HELPER.format(name=helper)
        file_after = after.format(name=name) + "\n\n" + _HELPER.format(name=helper).replace("b->len", "b ? b->len : 0")
        out.append({
            "cve_id": f"CVE-{year}-{1000 + i}", "cwe_id": cwe, "cve_language": lang,
            "cve_description": f"A {cwe} weakness in {name} of {project} (fixture, not a real CVE).",
            "cvss": 7.5, "publish_date": f"{year}-06-0{1 + i % 9}", "project": project,
            "commit_id": f"{i:040x}", "commit_message": f"fix {cwe} in {name}",
            "commit_date": f"{year}-05-{10 + i:02d}T12:00:00Z", "url": f"https://example.invalid/{project}",
            "outdated": outdated,
            "details": [{
                "file_path": f"src/{name}.{ext}", "file_language": lang, "code_before": file_before,
                "code": file_after, "patch": "", "llm_check": 1, "static_check": 1, "target": 1,
                "function_before": [{"function": before.format(name=name), "target": 1},
                                    {"function": _HELPER.format(name=helper), "target": 0}],
                "function_after": [{"function": after.format(name=name), "target": 0},
                                   {"function": _HELPER.format(name=helper).replace("b->len", "b ? b->len : 0"),
                                    "target": 0}],
            }],
        })
    return out


def write_fixture(path: str | Path) -> Path:
    """Write :func:`fixture_records` as JSON Lines to ``path`` (atomically); returns the path."""
    from lightning_ext.core.io import atomic_write_text

    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in fixture_records())
    return atomic_write_text(text, Path(path))
