"""Real Debian CVE patches as ReposVul records (text family): gcc-12's CVE-2023-4039.diff (trimmed, DP: header,
quilt sections) and three of cargo's CVE-2022-46176 patches (git show headers, a Debian-written quilt patch), see
tests/data/text/README.md. Records pass check_record, hunk images agree with GNU patch, the DataModule reads them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lightning_ext.text.debian_patches import is_test_path, main, parse_patch, patch_record, patch_records
from lightning_ext.text.repos_vul import check_record, file_samples, read_records, write_fixture
from lightning_ext.text.vulnerability_data import VulnerabilityDataModule

DATA = Path(__file__).resolve().parent / "data" / "text"
GCC = DATA / "CVE-2023-4039.diff"
CARGO_05 = DATA / "CVE-2022-46176-05-remove-let-else.patch"
CARGO_06 = DATA / "CVE-2022-46176-06-add-test-for-config-value-in-toml-array.patch"
CARGO_08 = DATA / "CVE-2022-46176-08-eliminate-let-else.patch"
GCC_DATE, CARGO_DATE = "2025-04-07T11:26:17Z", "2023-01-12T16:31:37Z"  # Debian changelog dates (README)
CWES = {"CVE-2023-4039": "CWE-693", "CVE-2022-46176": "CWE-347"}  # Unverified (README)


def _gcc():
    return patch_record(GCC, "CWE-693", "gcc-mirror/gcc", commit_date=GCC_DATE)


def _all(project="rust-lang/cargo"):
    return [_gcc()] + patch_records([CARGO_05, CARGO_06, CARGO_08], "CWE-347", project, commit_date=CARGO_DATE)


def test_gcc_patch_becomes_a_record_with_the_header_facts():
    rec = _gcc()
    assert check_record(rec) == "CWE-693"
    assert (rec["cve_id"], rec["cve_language"], rec["commit_date"]) == ("CVE-2023-4039", "C++", GCC_DATE)
    # the DP: header lists 21 upstream commits: the first is commit_id, all are kept in order
    assert len(rec["commit_ids"]) == 21 and rec["commit_id"] == rec["commit_ids"][0] == \
        "62fbb215cc817e9f2c1ca80282a64f4ee30806bc"
    assert rec["commit_ids"][-1] == "74f99f1adc696f446115f36974a3f94f66294a53"
    assert rec["commit_message"].startswith("DP: Fix CVE-2023-4039.")
    paths = [d["file_path"] for d in rec["details"]]
    assert paths == ["src/gcc/config/aarch64/aarch64.cc", "src/gcc/config/aarch64/aarch64.h",
                     "src/gcc/testsuite/gcc.target/aarch64/stack-check-prologue-20.c"]
    cc, h, test = rec["details"]
    assert [d["file_language"] for d in rec["details"]] == ["C++", "C++", "C"]  # .h follows the C++ sources
    assert (cc["target"], h["target"], test["target"]) == (1, 1, 0)
    assert [f["name"] for f in cc["function_before"]] == ["aarch64_needs_frame_chain (void)"] + \
        ["aarch64_layout_frame (void)"] * 3
    assert all(f["target"] == 1 for f in cc["function_before"] + h["function_before"])
    assert all(f["target"] == 0 for d in rec["details"] for f in d["function_after"] + test["function_before"])
    # the new test file: no pre-image, its post-image is the 3 added lines
    assert test["code_before"] == "" and test["code"].count("\n") == 2 and "stack-check-prologue-19.c" in test["code"]
    # the hunk that adds the probe roll-back: only the fixed code has it
    fix = "frame.hard_fp_save_and_probe = INVALID_REGNUM;"
    assert fix in cc["function_after"][3]["function"] and fix not in cc["function_before"][3]["function"]


def test_cargo_patches_take_date_and_commit_from_git_headers_else_the_given_ones():
    r05, r06, r08 = patch_records([CARGO_05, CARGO_06, CARGO_08], "CWE-347", "rust-lang/cargo",
                                  commit_date=CARGO_DATE)
    for r in (r05, r06, r08):
        assert check_record(r) == "CWE-347" and r["cve_id"] == "CVE-2022-46176" and r["cve_language"] == "Rust"
    # "Date:   Tue Dec 13 08:14:59 2022 -0800" wins over the fallback, in UTC
    assert r05["commit_id"] == "cf716fc3c2b0785013b321f08d6cf9e277f89c84"
    assert r05["commit_date"] == "2022-12-13T16:14:59Z"
    assert r06["commit_date"] == "2022-12-15T03:01:40Z"
    assert (r08["commit_id"], r08["commit_date"]) == ("", CARGO_DATE)  # Debian-written: no header facts
    before, after = (r05["details"][0][k][0]["function"] for k in ("function_before", "function_after"))
    assert "let Some(patterns) = parts.next() else { return None };" in before
    assert "let Some(patterns)" not in after and "let patterns = parts.next()?;" in after
    # 06 only touches tests/testsuite/config.rs: a test file, nothing vulnerable, language from all files
    assert r06["details"][0]["target"] == 0 and {f["target"] for f in r06["details"][0]["function_before"]} == {0}
    assert [f["name"] for f in r08["details"][0]["function_before"]] == ["pub fn certificate_check(",
                                                                        "fn check_ssh_known_hosts(", "impl KnownHost {"]


def _oracle_hunks(raw: str):
    """Hunk headers and bodies read with a different rule: a body runs to the next '@@', 'Index: ' or 'diff --git'
    line (fine for these fixtures, which hold no removed line starting with '--- ')."""
    out, body = [], None
    for line in raw.split("\n"):
        if line.startswith(("@@ ", "Index: ", "diff --git")):
            body = None
        if line.startswith("@@ "):
            body = []
            out.append((line, body))
        elif body is not None:
            body.append(line)
    for _, b in out:  # drop the next file's '---'/'+++'/'====' header lines and trailing blanks
        while b and (b[-1] == "" or b[-1].startswith(("--- ", "+++ ", "=" * 20))):
            b.pop()
    return out


@pytest.mark.parametrize("path", [GCC, CARGO_05, CARGO_06, CARGO_08], ids=lambda p: p.name[:20])
def test_hunk_images_are_the_diff_context_minus_and_plus_lines(path):
    raw = path.read_text()
    rec = patch_record(path, "CWE-693", "p", commit_date=GCC_DATE)
    hunks = [(f, k) for d in rec["details"] for f, k in zip(d["function_before"], d["function_after"])]
    oracle = _oracle_hunks(raw)
    assert [f["hunk"] for f, _ in hunks] == [h for h, _ in oracle]
    for (before, after), (header, body) in zip(hunks, oracle):
        old_n, new_n = (int(x) for x in re.match(r"@@ -\d+,(\d+) \+\d+,(\d+) @@", header).groups())
        want_before = [line[1:] for line in body if line[:1] in (" ", "-")]
        want_after = [line[1:] for line in body if line[:1] in (" ", "+")]
        assert (len(want_before), len(want_after)) == (old_n, new_n), header  # the oracle itself is right
        assert before["function"] == "\n".join(want_before) and after["function"] == "\n".join(want_after)
    for d in rec["details"]:
        assert d["patch"] in raw and d["patch"].startswith("@@ ")
        assert d["code_before"] == "\n".join(f["function"] for f in d["function_before"])
        assert d["code"] == "\n".join(f["function"] for f in d["function_after"])


@pytest.mark.skipif(shutil.which("patch") is None, reason="GNU patch is not installed")
def test_gnu_patch_turns_each_files_pre_images_into_its_post_images(tmp_path):
    """An independent check: the hunks' pre-images, one after another, are a file GNU patch can apply the file's own
    hunks to (it finds each hunk by its context at an offset); the result must be the post-images."""
    rec = _gcc()
    for d in rec["details"]:
        if not d["code_before"]:
            continue  # a new file
        target = tmp_path / "file"
        target.write_text(d["code_before"] + "\n")
        diff = f"--- a/file\n+++ b/file\n{d['patch']}\n"
        run = subprocess.run(["patch", "--batch", "--silent", "-F0", str(target)], input=diff, text=True,
                             capture_output=True)
        assert run.returncode == 0, (d["file_path"], run.stdout, run.stderr)
        assert target.read_text() == d["code"] + "\n", d["file_path"]


def test_the_datamodule_reads_converted_records_next_to_other_records(tmp_path):
    records = _all()
    (tmp_path / "debian.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    alone = VulnerabilityDataModule(str(tmp_path), split="record", representation="hashed_ngrams",
                                    num_features=32)
    with pytest.raises(ValueError, match=r"only 2 record group\(s\)") as err:  # 2 CVEs cannot make 3 splits
        alone.setup("fit")
    assert "\n" not in str(err.value)
    write_fixture(tmp_path / "synthetic.jsonl")
    assert len(read_records(tmp_path)) == len(records) + 12
    dm = VulnerabilityDataModule(str(tmp_path), split="record", representation="hashed_ngrams", num_features=32,
                                 batch_size=4, seed=3)
    dm.setup("fit")
    real = {s for split in dm.samples.values() for s in split if s.record in CWES}
    splits_of = {cve: {n for n, split in dm.samples.items() for s in split if s.record == cve} for cve in CWES}
    assert all(len(v) == 1 for v in splits_of.values())  # a CVE's patches stay in one split
    assert all(s.code.strip() for s in real)  # the new test file's empty pre-image is no sample
    vulnerable = {s.code for s in real if s.label == 1}
    assert any("aarch64" in c for c in vulnerable) and any("let Some(patterns)" in c for c in vulnerable)
    assert not any("value_in_array" in c for c in vulnerable)  # cargo's test file is never vulnerable
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 32) and set(y.tolist()) <= {0, 1}
    pairs = VulnerabilityDataModule(str(tmp_path), task="repair_pairs", split="record", max_length=256,
                                    batch_size=2, seed=3)
    pairs.setup("fit")
    real_pairs = [s for split in pairs.samples.values() for s in split if s.record == "CVE-2022-46176"]
    assert any("let patterns = parts.next()?;" in s.fixed and "let Some(patterns)" in s.code for s in real_pairs)
    for name in ("train", "val", "test"):
        if pairs.samples[name]:
            before, after = pairs.split_dataset(name)[0]
            assert before.shape == after.shape == (256,)
    # file level: the new file contributes its post-image only
    files = file_samples([records[0]])
    assert all(s.code.strip() for s in files) and sum(s.label for s in files) == 2  # aarch64.cc and aarch64.h


def test_the_command_line_writes_json_lines_and_refuses_bad_input_with_one_line(tmp_path, capsys):
    out = tmp_path / "out" / "records.jsonl"
    assert main([str(CARGO_05), str(CARGO_08), "--cwe", "CWE-347", "--project", "rust-lang/cargo", "--commit-date",
                 CARGO_DATE, "--out", str(out)]) == 0
    written = [{k: v for k, v in r.items() if k != "_source"} for r in read_records(out)]
    assert written == patch_records([CARGO_05, CARGO_08], "CWE-347", "rust-lang/cargo", commit_date=CARGO_DATE)
    assert "wrote 2 record(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as code:
        main([str(tmp_path / "nope.patch"), "--cwe", "CWE-347", "--project", "p", "--out", str(out)])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.count("\n") == 1 and "nope.patch" in err and "does not exist" in err


def _bad(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name, text, kwargs, match", [
    ("CVE-2020-0001.patch", "Just a description, no diff.\n", {}, "not a unified diff"),
    ("CVE-2020-0001.patch", "--- a/x.c\n+++ b/x.c\n", {}, "not a unified diff"),  # no hunk
    ("CVE-2020-0001.patch", "--- a/x.c\n+++ b/x.c\n@@ -1,3 +1,3 @@ f\n a\n-b\n", {}, "ends early"),
    ("CVE-2020-0001.patch", "--- a/x.c\n+++ b/x.c\n@@ -1,2 +1,2 @@ f\n a\n?b\n+c\n", {}, "ends the hunk"),
    ("CVE-2020-0001.patch", "--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n-a\n+b\n", {}, "changes no source file"),
    ("fix.patch", "--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\n", {}, "no CVE id"),
    ("CVE-2020-0001.patch", "--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\n", {"commit_date": None}, "no Date: line"),
    ("CVE-2020-0001.patch", "--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\n", {"commit_date": "yesterday"},
     "not an ISO 8601 date"),
    ("CVE-2020-0001.patch", "--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\n", {"cwe_id": "overflow"}, "not a CWE id"),
    ("CVE-2020-0001.patch", "--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\n", {"project": " "}, "give project="),
])
def test_bad_patches_fail_with_one_line_naming_the_file(tmp_path, name, text, kwargs, match):
    args = {"cwe_id": "CWE-787", "project": "p", "commit_date": "2020-01-01", **kwargs}
    with pytest.raises(ValueError, match=match) as err:
        patch_record(_bad(tmp_path, name, text), **args)
    assert "\n" not in str(err.value) and name in str(err.value)


def test_missing_files_and_empty_folders_fail_with_one_line(tmp_path):
    for call, match in ((lambda: patch_record(tmp_path / "CVE-2020-1.patch", "CWE-1", "p"), "does not exist"),
                        (lambda: patch_record(tmp_path, "CWE-1", "p"), "is not a file"),
                        (lambda: patch_records(tmp_path, "CWE-1", "p"), "No CVE-"),
                        (lambda: patch_records(DATA, {"CVE-2023-4039": "CWE-693"}, "p", GCC_DATE), "no CWE for")):
        with pytest.raises((FileNotFoundError, ValueError), match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_a_truncated_real_patch_is_refused_and_test_paths_are_recognised(tmp_path):
    lines = GCC.read_text().split("\n")
    cut = _bad(tmp_path, "CVE-2023-4039.diff", "\n".join(lines[:100]))  # stops inside the first hunk
    with pytest.raises(ValueError, match=r"aarch64\.cc ends early .*truncated"):
        patch_record(cut, "CWE-693", "gcc", commit_date=GCC_DATE)
    header, files = parse_patch(GCC.read_text())
    assert header[0] == "DP: Fix CVE-2023-4039." and [len(f.hunks) for f in files] == [4, 4, 1]
    assert files[2].old_path is None and files[2].new_path.endswith("stack-check-prologue-20.c")
    assert is_test_path("tests/testsuite/config.rs") and is_test_path("lib/foo_test.go")
    assert is_test_path("src/test_utils.py") and not is_test_path("src/cargo/sources/git/known_hosts.rs")
    assert not is_test_path("src/attestation.c")
