"""scikit-learn's bundled tabular classification sets (iris, wine, breast cancer) as a DataModule."""

from __future__ import annotations

import difflib
from typing import Literal

from typing_extensions import override

from lightning_ext.core.validation import PositiveInt
from lightning_ext.data.base import Arrays, InMemoryDataModule

# name -> (loader in sklearn.datasets, number of features, number of classes)
TABULAR_DATASETS = {
    "iris": ("load_iris", 4, 3),
    "wine": ("load_wine", 13, 3),
    "breast_cancer": ("load_breast_cancer", 30, 2),
}


class TabularDataModule(InMemoryDataModule):
    """A scikit-learn tabular dataset by name: ``iris`` (150x4, 3 classes), ``wine`` (178x13, 3) or
    ``breast_cancer`` (569x30, 2).

    Protocol: class-stratified split with ``split_seed`` (default 0): 20% test, then 10% of the rest for
    validation. Each feature is standardised with the training split's mean and std. Batches are ``(x, y)``
    with ``x`` of shape ``(B, num_features)``.

    Args:
        name: which dataset.
        **kwargs: see :class:`~lightning_ext.data.base.InMemoryDataModule`.

    Example:
        >>> dm = TabularDataModule("wine")
        >>> dm.setup(); dm.num_features, dm.num_classes, dm.split_sizes
        (13, 3, {'train': 127, 'val': 15, 'test': 36})
    """

    def __init__(self, name: Literal["iris", "wine", "breast_cancer"] = "iris", batch_size: PositiveInt = 32,
                 **kwargs) -> None:
        if name not in TABULAR_DATASETS:
            close = difflib.get_close_matches(str(name), TABULAR_DATASETS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"name must be one of {sorted(TABULAR_DATASETS)}, got {name!r}.{hint}")
        super().__init__(batch_size=batch_size, **kwargs)
        self.name = name
        _, self.num_features, self.num_classes = TABULAR_DATASETS[name]
        self.input_shape = (self.num_features,)

    @override
    def load_arrays(self) -> Arrays:
        """The dataset's features and labels from scikit-learn."""
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, TABULAR_DATASETS[self.name][0])()
        return Arrays(x=bunch.data, y=bunch.target)
