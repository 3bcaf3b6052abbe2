"""LightningDataModules: offline real datasets with fixed, documented splits (and, later, filtered data)."""

from lightning_ext._lazy import lazy_exports

_EXPORTS = {
    "InMemoryDataModule": "base",
    "DigitsDataModule": "digits",
    "FashionMNISTDataModule": "fashion_mnist",
    "MNIST5kDataModule": "mnist5k",
    "TabularDataModule": "tabular",
    "PlanetoidDataModule": "planetoid",
    "MultiTaskDataModule": "multi_task",
    "FilteredDataModule": "filtered",
    "StagedPipelineDataModule": "staged_pipeline",
    "InteractionFileDataModule": "interactions",
    "LastFMDataModule": "lastfm",
    "MovieLens100KDataModule": "movielens100k",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
