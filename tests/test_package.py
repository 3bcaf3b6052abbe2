"""The package imports fast and lazily, and every export resolves."""

import subprocess
import sys

import pytest

import lightning_ext
from lightning_ext import catalogue


def test_import_is_light_and_fast():
    code = (
        "import sys, time; t = time.perf_counter(); import lightning_ext; dt = time.perf_counter() - t; "
        "print(dt, 'torch' in sys.modules, 'lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    seconds, torch_loaded, lightning_loaded = float(out[0]), out[1] == "True", out[2] == "True"
    assert not torch_loaded and not lightning_loaded, "importing lightning_ext must not import torch or Lightning"
    assert seconds < 0.5, f"import lightning_ext took {seconds:.3f}s"


@pytest.mark.parametrize("component", catalogue.components(), ids=lambda c: c.name)
def test_every_export_resolves_from_the_top_level_and_its_subpackage(component):
    cls = component.load()
    assert getattr(lightning_ext, component.name) is cls
    assert getattr(getattr(lightning_ext, component.kind), component.name) is cls
    assert component.summary, f"{component.name} has no docstring summary"
    assert component.name in dir(lightning_ext)


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="NoSuchThing"):
        lightning_ext.NoSuchThing  # noqa: B018


def test_components_are_of_the_right_kind():
    from lightning.pytorch import Callback, LightningDataModule, LightningModule

    bases = {"callbacks": Callback, "modules": LightningModule, "datamodules": LightningDataModule}
    for c in catalogue.components():
        assert issubclass(c.load(), bases[c.kind]), c


def test_package_never_imports_pytorch_lightning():
    from pathlib import Path

    root = Path(lightning_ext.__file__).parent
    offenders = [p for p in root.rglob("*.py") if "pytorch_lightning" in p.read_text().replace("`pytorch_lightning`", "")]
    assert not offenders, f"import lightning.pytorch, not pytorch_lightning: {offenders}"


def test_missing_optional_dependency_error_says_what_to_install(monkeypatch):
    from lightning_ext.core.optional import require

    monkeypatch.setitem(sys.modules, "torch_geometric", None)  # simulates "not installed"
    with pytest.raises(ModuleNotFoundError) as info:
        require("torch_geometric", "PlanetoidDataModule")
    assert str(info.value) == (
        "`torch_geometric` is needed for PlanetoidDataModule but is not installed. "
        'Install it with `pip install "lightning-ext[graph]"`.'
    )


def test_missing_module_outside_any_extra_names_its_pip_package(monkeypatch):
    from lightning_ext.core.optional import require

    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ModuleNotFoundError, match=r"needed for TabularDataModule.*`pip install scikit-learn`\.$"):
        require("sklearn", "TabularDataModule")


def test_missing_import_inside_an_installed_module_reraises_the_real_error(tmp_path, monkeypatch):
    from lightning_ext.core.optional import require

    (tmp_path / "fake_optional_pkg.py").write_text("import no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        require("fake_optional_pkg", "something")
    assert info.value.name == "no_such_module_xyz" and "pip install" not in str(info.value)
