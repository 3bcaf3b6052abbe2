"""Planetoid citation graphs (Cora, CiteSeer, PubMed) through PyG, from a local root, with the public split."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal, Optional

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_ext.core.optional import require
from lightning_ext.core.validation import check_choice, check_number
from lightning_ext.core.paths import cache_root, check_path_argument

# name -> (file prefix, number of node features, number of classes)
PLANETOID = {"Cora": ("cora", 1433, 7), "CiteSeer": ("citeseer", 3703, 6), "PubMed": ("pubmed", 500, 3)}
_RAW_SUFFIXES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")


def _single_graph(batch):
    return batch[0]


class FullGraphLoaders:
    """Mixin for a full-batch graph DataModule: every loader yields ``self.graph`` (a PyG ``Data``, set by
    ``setup``) once; the module picks its nodes with the graph's masks (put it before ``LightningDataModule``)."""

    graph = None

    def _loader(self) -> DataLoader:
        if self.graph is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader.")
        return DataLoader([self.graph], batch_size=1, collate_fn=_single_graph)

    def train_dataloader(self) -> DataLoader:
        """The whole graph, once per epoch."""
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        """The whole graph (the module uses ``val_mask``)."""
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        """The whole graph (the module uses ``test_mask``)."""
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        """The whole graph."""
        return self._loader()


class PlanetoidDataModule(FullGraphLoaders, LightningDataModule):
    """A Planetoid citation graph for full-batch node classification (Yang et al., 2016), read by PyG.

    Protocol: the fixed public split of Kipf & Welling (``split="public"``): 20 labelled nodes per class for
    training, 500 for validation, 1,000 for testing; or PyG's ``"full"``/``"random"`` splits (``"random"`` is
    seeded by ``split_seed``). Every dataloader yields the whole graph once per epoch as a
    ``torch_geometric.data.Data`` with ``train_mask``, ``val_mask`` and ``test_mask``; the module picks the
    mask for its stage. Under DDP every rank gets the same single graph.

    The raw files (``ind.<name>.{x,tx,allx,y,ty,ally,graph,test.index}``) are read from ``root/<name>/raw``.
    PyG writes a ``processed/`` folder beside ``raw/``, so the raw files are first copied to
    ``cache_dir/<name>/raw`` and the source stays untouched (it may be read-only).

    Args:
        root: folder holding ``<name>/raw``; default ``$PLANETOID_ROOT``.
        name: ``"Cora"``, ``"CiteSeer"`` or ``"PubMed"``.
        split: PyG split type.
        split_seed: seed for ``split="random"``.
        cache_dir: where PyG may write; default ``planetoid`` under :func:`~lightning_ext.core.paths.cache_root`
            (``$LIGHTNING_EXT_CACHE`` or ``~/.cache/lightning_ext``); it must not be a file.
        download: let PyG download missing files (needs a network).
        normalize_features: row-normalise the bag-of-words features, as in the GCN paper.

    Example:
        >>> dm = PlanetoidDataModule(root="../shared/data/planetoid", name="Cora")  # doctest: +SKIP
        >>> dm.setup(); dm.graph.num_nodes, int(dm.graph.train_mask.sum())  # doctest: +SKIP
        (2708, 140)
    """

    def __init__(
        self,
        root: Optional[str] = None,
        name: Literal["Cora", "CiteSeer", "PubMed"] = "Cora",
        split: Literal["public", "full", "random"] = "public",
        split_seed: int = 0,
        cache_dir: Optional[str] = None,
        download: bool = False,
        normalize_features: bool = True,
    ) -> None:
        super().__init__()
        require("torch_geometric", "PlanetoidDataModule")
        check_choice("name", name, sorted(PLANETOID))
        check_choice("split", split, ("public", "full", "random"))
        check_number("split_seed", split_seed, integer=True)
        check_path_argument("root", root)
        check_path_argument("cache_dir", cache_dir)
        self.root = root or os.environ.get("PLANETOID_ROOT")
        self.name = name
        self.split = split
        self.split_seed = split_seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else cache_root("planetoid")
        if self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise ValueError(f"cache_dir {self.cache_dir} is a file, not a folder; point `cache_dir` at a folder.")
        self.download = download
        self.normalize_features = normalize_features
        _, self.num_features, self.num_classes = PLANETOID[name]
        self.graph = None
        if not download:
            self.raw_files()  # fail early, with instructions

    def raw_files(self) -> list[Path]:
        """The eight raw files under ``root/<name>/raw``; raises FileNotFoundError saying how to get them."""
        prefix = PLANETOID[self.name][0]
        raw = Path(self.root).expanduser() / self.name / "raw" if self.root else None
        files = [raw / f"ind.{prefix}.{s}" for s in _RAW_SUFFIXES] if raw else []
        missing = [f.name for f in files if not f.is_file()] if raw else ["(no root given)"]
        if missing:
            raise FileNotFoundError(
                f"Planetoid {self.name}: raw files not found ({', '.join(missing)}) under "
                f"{raw if raw else '`root`'}. Pass `root=` (or set $PLANETOID_ROOT) to a folder containing "
                f"`{self.name}/raw/ind.{prefix}.*` (this repo's tests use ../shared/data/planetoid), or set "
                "`download=True` on a machine with a network so PyG downloads them."
            )
        return files

    @override
    def prepare_data(self) -> None:
        """Copy the raw files into ``cache_dir`` (or let PyG download them with ``download=True``)."""
        raw_dst = self.cache_dir / self.name / "raw"
        raw_dst.mkdir(parents=True, exist_ok=True)
        if self.root and not self.download:
            for src in self.raw_files():
                dst = raw_dst / src.name
                if not dst.exists() or dst.stat().st_size != src.stat().st_size:
                    shutil.copyfile(src, dst)
        if self.download:
            self._dataset()

    def _dataset(self):
        require("torch_geometric", "PlanetoidDataModule")
        import torch
        from torch_geometric.datasets import Planetoid
        from torch_geometric.transforms import NormalizeFeatures

        transform = NormalizeFeatures() if self.normalize_features else None
        with torch.random.fork_rng():
            torch.manual_seed(self.split_seed)
            return Planetoid(str(self.cache_dir), self.name, split=self.split, transform=transform)

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Read the graph once (PyG processes the raw files in ``cache_dir``)."""
        if self.graph is not None:
            return
        if not (self.cache_dir / self.name / "raw").is_dir():
            self.prepare_data()
        self.graph = self._dataset()[0]
