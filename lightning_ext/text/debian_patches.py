"""Real CVE patches as ReposVul records: Debian ``debian/patches/CVE-*.diff|.patch`` files (DEP-3 or ``DP:`` headers,
quilt ``Index:`` sections, ``git show`` / ``git format-patch`` output) turned into records in ReposVul's schema, so
:class:`~lightning_ext.text.vulnerability_data.VulnerabilityDataModule` can read real fixes without the dataset.

ReposVul (Wang et al., ICSE 2024 Industry Challenge Track, arXiv 2401.13169; https://github.com/Eshe0922/ReposVul)
crawls each fix commit with its whole changed files; a patch file holds only the hunks. So here ``code_before`` /
``code`` are the hunks' pre-images / post-images (context and ``-`` lines / context and ``+`` lines), one hunk after
another joined by newlines, **not the whole files**, and each hunk stands for one changed "function":
``function_before[k]`` / ``function_after[k]`` are the pre-/post-image of hunk ``k`` (aligned by index, as
:func:`~lightning_ext.text.repos_vul.function_samples` pairs them), named (``name``) after the hunk header's function
context (the text after ``@@ ... @@``: diff's ``-p`` guess at the enclosing function, sometimes truncated to 40
characters or naming a struct/impl; ``path:line`` when empty). A new file's pre-image and a deleted file's post-image
are empty strings, which the sample builders skip.

Labels (the untangling step is not re-run): ``target`` = 1 for every hunk of a changed non-test source file, 0 for a
test file (a path with a ``test``/``tests``/``testsuite``/``testing`` folder, or a file named ``test_*`` /
``*_test.*`` / ``*_tests.*``); the post-images always 0. Only files whose suffix names a language are kept (C, C++,
Java, Python, Rust, Go, ...; ``.h`` is C++ when the patch also changes C++ files, else C); documentation, build files
and ChangeLogs go to ``skipped_files``. ``cve_language`` is the most common language of the non-test files (of all
files when only tests changed).

Metadata: ``cve_id`` as given, else from the file name, else from the header; ``commit_date`` from the header's
latest ``Date:`` line, in UTC (else given: the ``DP:`` / DEP-3 headers of Debian's own patches carry none);
``commit_id`` the first 40-hex commit id the header lists (a backport of several upstream commits lists them all in
``commit_ids``), else given, else empty; ``commit_message`` the header as written; ``cwe_id`` is the caller's (a
patch names no CWE; CVE-2023-4039 as CWE-693 and CVE-2022-46176 as CWE-347 are Unverified here: NVD could not be
read offline). ``outdated`` is 0 (no trace-based filter ran). The record passes
:func:`~lightning_ext.text.repos_vul.check_record`.

From the shell (one record per patch, JSON Lines, written atomically)::

    python -m lightning_ext.text.debian_patches /usr/src/gcc-12/debian/patches/CVE-2023-4039.diff \\
        --cwe CWE-693 --project gcc-mirror/gcc --commit-date 2025-04-07T11:26:17Z --out records.jsonl

Example:
    >>> diff = '''commit 0123456789abcdef0123456789abcdef01234567
    ... Date:   Tue Dec 13 08:14:59 2022 -0800
    ...
    ... --- a/src/buf.c
    ... +++ b/src/buf.c
    ... @@ -10,3 +10,4 @@ int copy(char *dst, const char *src, size_t n)
    ...  {
    ... +    if (n > 64) return -1;
    ...      memcpy(dst, src, n);
    ...  }
    ... '''
    >>> rec = record_from_text(diff, "CVE-2022-0001.patch", cwe_id="CWE-787", project="me/buf")
    >>> rec["cve_id"], rec["commit_date"], rec["cve_language"]
    ('CVE-2022-0001', '2022-12-13T16:14:59Z', 'C')
    >>> fn = rec["details"][0]["function_before"][0]
    >>> fn["name"], fn["target"], fn["function"].count("\\n")
    ('int copy(char *dst, const char *src, size_t n)', 1, 2)
"""

from __future__ import annotations

import argparse
import email.utils
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from lightning_ext.text.repos_vul import check_record

__all__ = ["Hunk", "FilePatch", "parse_patch", "record_from_text", "patch_record", "patch_records", "language_of",
           "is_test_path", "LANGUAGES", "main"]

#: File suffix -> language (ReposVul's four, C, C++, Java, Python, and a few more).
LANGUAGES = {
    ".c": "C", ".h": "C", ".cc": "C++", ".cpp": "C++", ".cxx": "C++", ".c++": "C++", ".hh": "C++", ".hpp": "C++",
    ".hxx": "C++", ".java": "Java", ".py": "Python", ".rs": "Rust", ".go": "Go", ".js": "JavaScript",
    ".ts": "TypeScript", ".php": "PHP", ".rb": "Ruby", ".cs": "C#", ".kt": "Kotlin", ".scala": "Scala",
    ".swift": "Swift", ".m": "Objective-C", ".pl": "Perl", ".sh": "Shell",
}
_TEST_DIRS = {"test", "tests", "testsuite", "testing", "unittests"}
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@ ?(.*)$")
_CVE = re.compile(r"CVE-\d{4}-\d{4,}", re.IGNORECASE)
_SHA = re.compile(r"\b[0-9a-f]{40}\b")
_DATE = re.compile(r"^\s*(?:Date|AuthorDate|CommitDate):\s*(.+?)\s*$")
_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2})?(\.\d+)?(Z|[+-]\d{2}:?\d{2})?)?$")


@dataclass
class Hunk:
    """One hunk: its ``@@`` header, start lines and counts, function context, verbatim body lines, and the
    pre-image (``before``: context and ``-`` lines) and post-image (``after``: context and ``+`` lines)."""

    header: str
    old_start: int
    old_count: int
    new_start: int
    new_count: int
    context: str
    body: list[str] = field(default_factory=list)
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)


@dataclass
class FilePatch:
    """One changed file: old and new paths (``None`` for ``/dev/null``, leading component stripped as ``patch
    -p1`` does) and its hunks."""

    old_path: Optional[str]
    new_path: Optional[str]
    hunks: list[Hunk] = field(default_factory=list)

    @property
    def path(self) -> str:
        """The file's path (the new one unless the file is deleted)."""
        return self.new_path or self.old_path or ""

    @property
    def text(self) -> str:
        """The hunks verbatim (``@@`` headers and bodies), as ReposVul's ``patch`` field."""
        return "\n".join(line for h in self.hunks for line in [h.header, *h.body])


def _strip_path(raw: str) -> Optional[str]:
    path = raw.split("\t", 1)[0].strip().strip('"')
    if path == "/dev/null":
        return None
    return path.split("/", 1)[1] if "/" in path else path


def parse_patch(text: str, name: str = "the patch") -> tuple[list[str], list[FilePatch]]:
    """Split a unified diff into its header lines (everything before the first file) and its files' hunks.

    A file starts at a ``--- `` line followed by ``+++ `` and ``@@``; each hunk is read by the counts in its header, so
    removed lines that start with ``--`` and trailers such as git's ``-- `` signature are not misread. Raises one line
    naming ``name`` for text without any hunk or a hunk that ends early."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    files: list[FilePatch] = []
    header_end, i, n = None, 0, len(lines)
    while i < n:
        if not (lines[i].startswith("--- ") and i + 2 < n and lines[i + 1].startswith("+++ ")
                and lines[i + 2].startswith("@@")):
            i += 1
            continue
        if header_end is None:
            header_end = i
        fp = FilePatch(_strip_path(lines[i][4:]), _strip_path(lines[i + 1][4:]))
        i += 2
        while i < n and lines[i].startswith("@@"):
            m = _HUNK.match(lines[i])
            if m is None:
                raise ValueError(f"{name}: line {i + 1} is not a hunk header ({lines[i][:60]!r}); expected "
                                 "'@@ -a,b +c,d @@'.")
            old_n = int(m.group(2)) if m.group(2) is not None else 1
            new_n = int(m.group(4)) if m.group(4) is not None else 1
            h = Hunk(lines[i], int(m.group(1)), old_n, int(m.group(3)), new_n, m.group(5).strip())
            i += 1
            while old_n > 0 or new_n > 0 or (i < n and lines[i].startswith("\\")):
                if i >= n:
                    raise ValueError(f"{name}: the hunk {h.header!r} of {fp.path} ends early at the end of the file "
                                     f"({old_n} old and {new_n} new lines missing); the patch is truncated.")
                line = lines[i]
                tag, rest = (line[:1], line[1:]) if line else (" ", "")  # an empty line is blank context
                if tag == "\\":  # "\ No newline at end of file"
                    pass
                elif tag == " " and old_n > 0 and new_n > 0:
                    h.before.append(rest)
                    h.after.append(rest)
                    old_n, new_n = old_n - 1, new_n - 1
                elif tag == "-" and old_n > 0:
                    h.before.append(rest)
                    old_n -= 1
                elif tag == "+" and new_n > 0:
                    h.after.append(rest)
                    new_n -= 1
                else:
                    raise ValueError(f"{name}: line {i + 1} ends the hunk {h.header!r} of {fp.path} early "
                                     f"({old_n} old and {new_n} new lines missing); the patch is damaged.")
                h.body.append(line)
                i += 1
            fp.hunks.append(h)
        files.append(fp)
    if not files:
        raise ValueError(f"{name}: not a unified diff (no '--- ' / '+++ ' file header followed by an '@@' hunk); "
                         "give a Debian debian/patches/CVE-*.diff|.patch or a git format-patch file.")
    return lines[:header_end], files


def language_of(path: str, cxx: bool = False) -> Optional[str]:
    """The language of a file by its suffix (``None``: not source code); ``.h`` is C++ when ``cxx``."""
    suffix = Path(path).suffix.lower()
    lang = LANGUAGES.get(suffix)
    return "C++" if lang == "C" and suffix == ".h" and cxx else lang


def is_test_path(path: str) -> bool:
    """Whether ``path`` is a test file: a ``test``/``tests``/``testsuite``/``testing``/``unittests`` folder, or a
    file named ``test_*``, ``*_test.*`` or ``*_tests.*``."""
    parts = [p.lower() for p in Path(path).parts]
    stem = Path(path).stem.lower()
    return (any(p in _TEST_DIRS for p in parts[:-1]) or stem.startswith("test_") or stem.endswith(("_test", "_tests"))
            or stem == "test")


def _utc(value: str) -> Optional[datetime]:
    for parse in (lambda v: datetime.strptime(v, "%a %b %d %H:%M:%S %Y %z"), email.utils.parsedate_to_datetime,
                  lambda v: datetime.fromisoformat(v.replace("Z", "+00:00"))):
        try:
            when = parse(value)
        except (TypeError, ValueError, IndexError):
            continue
        if when is not None and when.tzinfo is not None:
            return when.astimezone(timezone.utc)
    return None


def _header_facts(header: Sequence[str]) -> tuple[list[str], list[datetime], list[str]]:
    shas: list[str] = []
    for line in header:
        for sha in _SHA.findall(line):
            if sha not in shas:
                shas.append(sha)
    dates = [d for line in header if (m := _DATE.match(line)) and (d := _utc(m.group(1))) is not None]
    return shas, dates, _CVE.findall("\n".join(header))


def record_from_text(text: str, name: str, cwe_id: str, project: str, cve_id: Optional[str] = None,
                     commit_date: Optional[str] = None, commit_id: Optional[str] = None) -> dict:
    """One ReposVul record from a patch's text; ``name`` is the file name (its ``CVE-...`` id is the record's unless
    ``cve_id`` is given). ``commit_date`` and ``commit_id`` fill in only where the header has none. See the module
    docstring for every field."""
    if not isinstance(project, str) or not project.strip():
        raise ValueError(f"{name}: give project= (the repository the patch fixes, e.g. 'gcc-mirror/gcc').")
    header, files = parse_patch(text, name)
    shas, dates, header_cves = _header_facts(header)
    named = _CVE.findall(Path(name).name)
    cve = cve_id or (named[0].upper() if named else header_cves[0].upper() if header_cves else None)
    if not cve:
        raise ValueError(f"{name}: no CVE id in the file name or header; give cve_id='CVE-YYYY-NNNN'.")
    if commit_date is not None and (not isinstance(commit_date, str) or not _ISO.match(commit_date.strip())):
        raise ValueError(f"{name}: commit_date {commit_date!r} is not an ISO 8601 date such as "
                         "'2023-01-12T16:31:37Z'.")
    if dates:
        date = max(dates).strftime("%Y-%m-%dT%H:%M:%SZ")
    elif commit_date is not None:
        date = commit_date.strip()
    else:
        raise ValueError(f"{name}: the header has no Date: line (Debian's DP:/DEP-3 headers carry none); give "
                         "commit_date='YYYY-MM-DDTHH:MM:SSZ' (e.g. the fix commit's or the Debian upload's date).")
    code_files = [f for f in files if f.hunks and language_of(f.path) is not None]
    if not code_files:
        raise ValueError(f"{name}: changes no source file ({', '.join(f.path for f in files)}); nothing to turn into "
                         "functions.")
    cxx = any(language_of(f.path) == "C++" for f in code_files)
    details = []
    for f in code_files:
        test = is_test_path(f.path)
        target = 0 if test else 1
        before = ["\n".join(h.before) for h in f.hunks]
        after = ["\n".join(h.after) for h in f.hunks]
        names = [h.context or f"{f.path}:{h.old_start}" for h in f.hunks]
        details.append({
            "file_path": f.path, "file_language": language_of(f.path, cxx), "test_file": int(test),
            "patch": f.text, "code_before": "\n".join(before), "code": "\n".join(after), "target": target,
            "function_before": [{"function": b, "target": target, "name": nm, "hunk": h.header, "line": h.old_start}
                                for b, nm, h in zip(before, names, f.hunks)],
            "function_after": [{"function": a, "target": 0, "name": nm, "hunk": h.header, "line": h.new_start}
                               for a, nm, h in zip(after, names, f.hunks)],
        })
    votes = Counter(d["file_language"] for d in details if not d["test_file"]) or \
        Counter(d["file_language"] for d in details)
    record = {
        "cve_id": cve, "cwe_id": cwe_id, "cve_language": votes.most_common(1)[0][0], "project": project.strip(),
        "commit_id": shas[0] if shas else (commit_id or ""), "commit_ids": shas, "commit_date": date,
        "commit_message": "\n".join(header).strip(), "outdated": 0, "source_patch": Path(name).name,
        "skipped_files": [f.path for f in files if f not in code_files], "details": details,
    }
    check_record(dict(record, _source=name))
    return record


def patch_record(path: Union[str, Path], cwe_id: str, project: str, cve_id: Optional[str] = None,
                 commit_date: Optional[str] = None, commit_id: Optional[str] = None) -> dict:
    """The ReposVul record of one patch file (read as UTF-8, undecodable bytes replaced)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Patch file {str(path)!r} does not exist (or is not a file); give a "
                                "debian/patches/CVE-*.diff|.patch file.")
    text = path.read_text(encoding="utf-8", errors="replace")
    return record_from_text(text, str(path), cwe_id, project, cve_id, commit_date, commit_id)


def patch_records(paths: Union[str, Path, Sequence[Union[str, Path]]], cwe_id: Union[str, Mapping[str, str]],
                  project: str, commit_date: Optional[str] = None) -> list[dict]:
    """Records of several patch files: a list of files, or a folder (its ``CVE-*.diff`` / ``CVE-*.patch`` files,
    sorted). ``cwe_id`` is one label or a ``{cve_id: cwe_id}`` map; ``commit_date`` fills in for headers without a
    date."""
    if isinstance(paths, (str, Path)):
        folder = Path(paths).expanduser()
        if folder.is_dir():
            paths = sorted(p for p in folder.iterdir() if p.is_file() and p.name.upper().startswith("CVE-")
                           and p.suffix in (".diff", ".patch"))
            if not paths:
                raise FileNotFoundError(f"No CVE-*.diff or CVE-*.patch files in {str(folder)!r}.")
        else:
            paths = [folder]
    out = []
    for p in paths:
        cwe = cwe_id
        if isinstance(cwe_id, Mapping):
            found = _CVE.findall(Path(p).name)
            cwe = cwe_id.get(found[0].upper()) if found else None
            if cwe is None:
                raise ValueError(f"{p}: no CWE for this patch's CVE in cwe_id ({sorted(cwe_id)}); add it.")
        out.append(patch_record(p, cwe, project, commit_date=commit_date))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m lightning_ext.text.debian_patches PATCH... --cwe CWE-n --project P --out records.jsonl``: one
    record per patch, written atomically as JSON Lines. A user error prints one line and exits with 2."""
    from lightning_ext.core.io import atomic_write_text

    parser = argparse.ArgumentParser(prog="python -m lightning_ext.text.debian_patches",
                                     description="Turn CVE patch files into ReposVul records (JSON Lines).")
    parser.add_argument("patches", nargs="+", help="patch files or folders of CVE-*.diff|.patch files")
    parser.add_argument("--cwe", required=True, help="the CWE id of the patches' CVE, e.g. CWE-693")
    parser.add_argument("--project", required=True, help="the repository fixed, e.g. gcc-mirror/gcc")
    parser.add_argument("--commit-date", default=None, help="for patches whose header has no Date: line")
    parser.add_argument("--out", required=True, help="the .jsonl file to write")
    args = parser.parse_args(argv)
    try:
        records = [r for p in args.patches for r in patch_records(p, args.cwe, args.project, args.commit_date)]
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    atomic_write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), Path(args.out).expanduser())
    print(f"wrote {len(records)} record(s) with {sum(len(r['details']) for r in records)} changed source file(s) to "
          f"{args.out}")
    return 0


if __name__ == "__main__":
    main()
