"""The family-first layout holds: file sizes, import directions, no facade imports inside the package."""

import ast
from pathlib import Path

import pytest

import lightning_ext
from lightning_ext import catalogue

ROOT = Path(lightning_ext.__file__).parent
FACADES = {"callbacks", "modules", "datamodules"}
FAMILIES = {"compression", "distillation", "merging", "ssl", "curation", "recsys", "graph", "pipeline", "vision",
            "data", "tabular", "mil", "metric_learning", "segmentation", "federated",
            "detection", "audio", "diffusion", "traffic", "text", "export", "parallel"}
#: Lightning wrappers: modules that define a Callback, LightningModule or LightningDataModule for users.
WRAPPERS = {e.module for e in catalogue.ENTRIES if e.kind in catalogue.LIGHTNING_KINDS}
#: Reasoned exceptions (importer, imported wrapper module): why each may import a wrapper module.
ALLOWED = {
    # DistillationModule *is* a Classifier (subclass): it extends the base every classifier shares
    ("lightning_ext.distillation.module", "lightning_ext.vision.classifier"),
    # the SELECT-style harness trains with FilteredDataModule: it is itself a Lightning-level tool, not a core
    ("lightning_ext.curation.select", "lightning_ext.curation.datamodule"),
    # MILClassifier *is* a Classifier over bags (subclass): the same loss, metrics, guards and optimiser injection
    ("lightning_ext.mil.module", "lightning_ext.vision.classifier"),
    # FedD2SModule *is* a Classifier (subclass) whose training loss is FedD2S's; evaluation is the Classifier's
    ("lightning_ext.federated.fedd2s_module", "lightning_ext.vision.classifier"),
    # the scikit-learn estimators load a checkpoint the PriorFittedNetwork module trained: they are user-facing tools
    ("lightning_ext.tabular.pfn_classifier", "lightning_ext.tabular.prior_fitted_network"),
    # the federation runner builds each client's FederatedDataModule from a YAML: a user-facing tool, not a core
    ("lightning_ext.federated.run", "lightning_ext.federated.datamodule"),
    # the SBP fit check runs SBPModule under ModelParallelStrategy against dense SGD: a user-facing tool, not a core
    ("lightning_ext.parallel.fit_check", "lightning_ext.parallel.module"),
    # ... and FED-PUB's / FedIns' client and strategy (beside their modules) for `strategy: fedpub|fedins`
    ("lightning_ext.federated.run", "lightning_ext.federated.fedpub_module"),
    ("lightning_ext.federated.run", "lightning_ext.federated.fedins_module"),
    # ... and FedSTO's client and strategy, beside its stage callbacks, for `strategy: fedsto`
    ("lightning_ext.federated.run", "lightning_ext.federated.fedsto"),
}
SOURCES = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("lightning_ext")}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_over_600_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= 600, f"{path.relative_to(ROOT)} has {n} lines; split its pure core from its wrapper"


def test_import_directions():
    problems = []
    for path in SOURCES:
        me = _module_name(path)
        parts = me.split(".")
        family = parts[1] if len(parts) > 1 else ""
        for target in _imports(path):
            tparts = target.split(".")
            tfamily = tparts[1] if len(tparts) > 1 else ""
            if family in FAMILIES | {"core"} and tfamily in FACADES:
                problems.append(f"{me} imports the facade {target}; import the defining module")
            if family == "core" and tfamily in FAMILIES:
                problems.append(f"{me} (core) imports the family module {target}")
            mod = ".".join(tparts[:3])
            if (me, mod) in ALLOWED:
                continue
            if family in FAMILIES and tfamily in FAMILIES - {"data"} and tfamily != family:
                # data/ is the shared floor of offline datasets: every family may read it
                if mod in WRAPPERS:
                    problems.append(f"{me} imports another family's Lightning wrapper {mod}")
            if family in FAMILIES and tfamily == family and me not in WRAPPERS:
                if mod in WRAPPERS and mod != me and not path.name == "__init__.py":
                    problems.append(f"{me} (a pure core) imports its family's wrapper {mod}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_every_config_names_catalogue_components_by_short_name():
    import yaml

    repo = ROOT.parent
    full = {e.class_path: e.name for e in catalogue.ENTRIES}
    problems = []

    def walk(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "class_path" and isinstance(v, str) and (v in full or v.startswith("lightning_ext.") and
                                                                 v.rsplit(".", 1)[-1] in {e.name for e in catalogue.ENTRIES}):
                    problems.append(f"{where}: class_path {v} -> write {v.rsplit('.', 1)[-1]}")
                walk(v, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for cfg in sorted((repo / "configs").glob("*.yaml")):
        walk(yaml.safe_load(cfg.read_text()), cfg.name)
    assert not problems, "\n".join(problems)


def _lightning_classes():
    import inspect
    import importlib
    import pkgutil

    from lightning.pytorch import Callback, LightningDataModule, LightningModule

    bases = (Callback, LightningModule, LightningDataModule)
    seen = {}
    for info in pkgutil.walk_packages([str(ROOT)], prefix="lightning_ext."):
        if info.name.split(".")[1] in FACADES or info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError:  # an optional extra that is not installed
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, bases):
                seen[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return bases, seen


def test_every_lightning_hook_is_marked_override_with_a_docstring():
    bases, classes = _lightning_classes()
    assert len(classes) >= 30, sorted(classes)
    problems = []
    for path, cls in sorted(classes.items()):
        base = next(b for b in bases if issubclass(cls, b))
        hooks = {n for n in dir(base) if not n.startswith("_") and callable(getattr(base, n, None))}
        for name, fn in vars(cls).items():
            if name in hooks and callable(fn):
                if not getattr(fn, "__override__", False):
                    problems.append(f"{path}.{name}: mark it @override (typing_extensions)")
                if not (fn.__doc__ or "").strip():
                    problems.append(f"{path}.{name}: give the hook a one-line docstring")
    assert not problems, "\n".join(problems)
