"""Optional extras: a component whose extra is missing fails at construction with the exact install line; the
extras in ``pyproject.toml`` match the catalogue; the facades, ``list`` and ``search`` import no heavy
dependency and no component."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lightning_ext import catalogue
from lightning_ext.core import optional

ROOT = Path(__file__).resolve().parents[1]
HEAVY = sorted(optional.EXTRAS)  # torch_geometric, torchdata, torch_pruning, mlxtend
MODULES_OF_EXTRA = {extra: sorted(m for m, e in optional.EXTRAS.items() if e == extra)
                    for extra in set(optional.EXTRAS.values())}

#: Minimal valid arguments to try, in order, until one is accepted by the signature (names are being unified:
#: ``pruning_ratio`` replaces ``ratio``/``prune_ratio``, ``macs_reduction`` replaces ``target_macs_reduction``).
CANDIDATE_ARGS: tuple[dict, ...] = (
    {},
    {"pruning_ratio": 0.5},
    {"ratio": 0.5},
    {"macs_reduction": 0.5},
    {"target_macs_reduction": 0.5},
    {"model": lambda: None, "datamodule": lambda i, n: None},  # runners built from factories (SFPromptFederation)
)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _extras_of_entries() -> list[catalogue.Entry]:
    return [e for e in catalogue.ENTRIES if e.extra]


def _block(monkeypatch: pytest.MonkeyPatch, modules: list[str]) -> None:
    """Make ``modules`` (and their already imported submodules) look not installed."""
    for top in modules:
        for name in [m for m in list(sys.modules) if m == top or m.startswith(top + ".")]:
            monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, top, None)


def _install_message(entry: catalogue.Entry) -> re.Pattern:
    modules = "|".join(re.escape(m) for m in MODULES_OF_EXTRA[entry.extra])
    line = re.escape(f'pip install "lightning-ext[{entry.extra}]"')
    return re.compile(rf"^`(?:{modules})(?:\.\w+)*` is needed for [^`]*\b{entry.name}\b[^`]* but is not installed\. "
                      rf"Install it with `{line}`\.$")


# ------------------------------------------------------------------------------------------ (a) construction


@pytest.mark.parametrize("entry", _extras_of_entries(), ids=lambda e: e.name)
def test_missing_extra_fails_at_construction_with_the_install_line(entry, monkeypatch):
    cls = entry.load()  # importing the component never needs its extra (checked in a fresh process below)
    _block(monkeypatch, MODULES_OF_EXTRA[entry.extra])
    errors = []
    for kwargs in CANDIDATE_ARGS:
        try:
            cls(**kwargs)
        except ModuleNotFoundError as err:
            assert _install_message(entry).match(str(err)), (
                f"{entry.name}: the error must end with the exact install line "
                f'`pip install "lightning-ext[{entry.extra}]"`, got: {err}')
            return
        except (TypeError, ValueError) as err:  # these arguments don't fit this signature: try the next ones
            errors.append(f"{kwargs}: {type(err).__name__}: {err}")
            continue
        pytest.fail(f"{entry.name}({kwargs}) was constructed although its extra [{entry.extra}] "
                    f"({', '.join(MODULES_OF_EXTRA[entry.extra])}) is missing: call "
                    f"core.optional.require(...) in __init__")
    pytest.fail(f"{entry.name}: no candidate arguments were accepted: {errors}")


def test_loading_every_component_imports_no_heavy_dependency():
    """Heavy imports are lazy: in a fresh process, loading every catalogue component imports none of the
    extras' modules (so each component also imports when its extra is missing)."""
    code = f"""
import json, sys
from lightning_ext import catalogue
heavy = {HEAVY!r}
needs = {{}}
# torchmetrics (a core dependency) imports transformers itself when it is installed (BERTScore, InfoLM): that
# import is torchmetrics', not a component's, and cannot be made lazy here; any other preloaded extra is a failure
import torchmetrics
preloaded = {{m for m in heavy if m in sys.modules}}
if preloaded - {{"transformers"}}:
    needs["torchmetrics"] = "imported " + ", ".join(sorted(preloaded))
for e in catalogue.ENTRIES:
    try:
        e.load()
    except ImportError as err:  # other breakage is test_package's business
        if (err.name or "").split(".")[0] in heavy:
            needs[e.name] = str(err)
    except Exception:
        pass
    now = [m for m in heavy if m in sys.modules and m not in preloaded and m not in needs.get("_imported", [])]
    if now:
        needs.setdefault("_imported", []).extend(now)
        needs[e.name] = "imported " + ", ".join(now)
needs.pop("_imported", None)
print(json.dumps(needs))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    needs = json.loads(out.stdout.strip().splitlines()[-1])
    assert not needs, f"components whose module imports an extra's module at import time: {needs}"


# ------------------------------------------------------------------------------------------ (b) pyproject


def test_pyproject_extras_match_the_catalogue():
    extras = _pyproject()["project"]["optional-dependencies"]
    family_extras = set(extras) - {"all", "test"}
    assert family_extras == {e.extra for e in catalogue.ENTRIES if e.extra}, (
        "pyproject's extras (besides all/test) must be exactly the catalogue's `extra` names")
    assert set(optional.EXTRAS.values()) == family_extras, "core.optional.EXTRAS must map a module to every extra"
    for extra in family_extras:
        assert extras[extra], f"[{extra}] is empty"
    union = sorted({req for extra in family_extras for req in extras[extra]})
    assert sorted(extras["all"]) == union, "[all] must be every family extra's requirements, nothing else"


def _dist_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_each_extra_installs_the_module_require_names_and_the_base_does_not():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    base = {_dist_name(r) for r in project["dependencies"]}
    for module, extra in optional.EXTRAS.items():
        pip_name = optional._PIP_NAMES.get(module, module).lower()
        assert pip_name in {_dist_name(r) for r in extras[extra]}, f"[{extra}] must install {pip_name} ({module})"
        assert pip_name not in base, f"{pip_name} belongs to [{extra}], not to the base install"


def test_test_extra_has_the_test_runner():
    names = {_dist_name(r) for r in _pyproject()["project"]["optional-dependencies"]["test"]}
    assert {"pytest", "pytest-timeout", "pytest-xdist"} <= names


def test_every_package_folder_is_a_package():
    """setuptools' packages.find only ships folders with an ``__init__.py``: a non-editable install must
    carry every subpackage (lightning_ext.core, lightning_ext.ssl.losses, ...)."""
    from setuptools import find_packages

    folders = {p.parent for p in (ROOT / "lightning_ext").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file())
    assert not missing, f"folders with Python files but no __init__.py (left out of a wheel): {missing}"
    include = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(str(ROOT), include=include))
    expected = {".".join(f.relative_to(ROOT).parts) for f in folders}
    assert expected <= found, f"packages.find misses {sorted(expected - found)}"


# ------------------------------------------------------------------------------------------ (c) light imports


def _run_python(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_facades_import_no_heavy_dependency():
    code = f"""
import json, sys
import lightning_ext.callbacks, lightning_ext.modules, lightning_ext.datamodules
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""
    assert _run_python(code) == [], "importing the facades must import none of the extras' modules"


def _component_modules(modules: list[str]) -> list[str]:
    return sorted(m for m in modules if m.startswith("lightning_ext.") and m.split(".")[1] in catalogue.FAMILIES)


@pytest.mark.parametrize("argv", [["list"], ["search", "ties"]], ids=" ".join)
def test_list_and_search_import_no_component_nor_torch(argv):
    """What keeps ``list``/``search`` fast is what they do not import (torch, Lightning, extras, components): that
    is asserted; their time is not (a wall-clock bound failed on a loaded 2-core machine)."""
    code = f"""
import contextlib, io, json, sys, time
t = time.perf_counter()
from lightning_ext.cli import run_cli
with contextlib.redirect_stdout(io.StringIO()) as out:
    run_cli({argv!r})
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "modules": sorted(sys.modules), "out": out.getvalue()}}))
"""
    result = _run_python(code)
    assert _component_modules(result["modules"]) == [], "list/search must read the catalogue, not import components"
    assert not {"torch", "lightning", *HEAVY} & set(result["modules"])
    if argv[0] == "search":
        assert "ModelMerging" in result["out"] or "TIES" in result["out"], result["out"]


@pytest.mark.parametrize("argv", [["list"], ["search", "ties"]], ids=" ".join)
def test_the_command_itself_imports_no_component(argv):
    """``python -X importtime -m lightning_ext ...``, the command as a user runs it."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "lightning_ext", *argv],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "lightning_ext.catalogue" in imported
    assert _component_modules(imported) == []
    assert not {"torch", "lightning", *HEAVY} & set(imported)
    assert out.stdout.strip(), "the command printed nothing"
