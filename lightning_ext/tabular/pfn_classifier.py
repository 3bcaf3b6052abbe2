"""scikit-learn front ends of a trained PFN: ``PFNClassifier`` and ``PFNRegressor``.

Paper: Hollmann, Müller, Eggensperger and Hutter, "TabPFN: A Transformer That Solves Small Tabular Classification
Problems in a Second", ICLR 2023 (arXiv 2207.01848). Reference code: https://github.com/automl/TabPFN
(``tabpfn/scripts/transformer_prediction_interface.py``), written anew here.

``fit`` only checks and stores the training set (the "context"); ``predict_proba``/``predict`` run one forward
pass of the transformer over the context and the queries, for ``n_ensemble`` members at once (a batch of
datasets): member ``e`` sees the features in a random order (seeded by ``random_state``) and, for
classification, the class ids rotated by ``e``; with ``power_transform`` every second member sees Yeo-Johnson
transformed features (fitted on the context). The members' class probabilities (rotated back) or predictive
means are averaged.

Input rules (one line each when broken): numeric columns only; ``inf`` refused; NaN allowed in ``X`` (the model
reads a missing entry as the context's mean of that feature, see :func:`~lightning_ext.tabular.pfn.
normalize_features`), refused in ``y``; at most the model's ``max_features`` features and, for classification,
``max_classes`` classes, and at least two classes in the context. A context longer than the prior's datasets
(``seq_len`` minus its ``min_test``) is accepted but lies outside what the model was trained on; subsample it
(or average predictions over chunks) when accuracy drops.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Union

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin

from lightning_ext.core.checkpoints import load_checkpoint, read_state_dict
from lightning_ext.tabular.pfn import bar_mean
from lightning_ext.tabular.prior_fitted_network import PriorFittedNetwork

__all__ = ["PFNClassifier", "PFNRegressor", "load_pfn"]

Source = Union[str, os.PathLike, PriorFittedNetwork]


def load_pfn(source: Source) -> PriorFittedNetwork:
    """A :class:`PriorFittedNetwork` from itself or from a checkpoint file written by Lightning (``torch.load`` with
    ``weights_only=True``; hyperparameters from the checkpoint; non-finite weights refused)."""
    if isinstance(source, PriorFittedNetwork):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"`model` must be a PriorFittedNetwork or a checkpoint path, got {type(source).__name__}.")
    ckpt = load_checkpoint(source, "PFN checkpoint", "model")
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise ValueError(f"PFN checkpoint {source} has no `hyper_parameters`: save it with a Lightning Trainer "
                         "(trainer.save_checkpoint) from a PriorFittedNetwork.")
    model = PriorFittedNetwork(**{k: v for k, v in hparams.items() if k not in ("optimizer", "scheduler")})
    state = read_state_dict(ckpt, reference_keys=model.state_dict().keys(), name=f"PFN checkpoint {source}")
    model.load_state_dict(state)
    return model.eval()


def _numeric_dtype(dtype: Any) -> bool:
    try:
        dt = np.dtype(dtype)
    except TypeError:  # pandas extension dtypes (string, category, nullable ints)
        return getattr(dtype, "kind", "O") in "biuf"
    return dt.kind in "biuf"


def _as_numeric(X: Any, what: str = "X") -> np.ndarray:
    """A float64 2-D array, refusing non-numeric columns and infinities with one line."""
    dtypes = getattr(X, "dtypes", None)
    if dtypes is not None and hasattr(X, "columns"):  # a DataFrame: name the offending column
        bad = [str(c) for c, t in zip(X.columns, dtypes) if not _numeric_dtype(t)]
        if bad:
            raise ValueError(f"{what} has non-numeric columns {bad}: encode them as numbers first (e.g. "
                             "sklearn.preprocessing.OrdinalEncoder).")
    try:
        arr = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be numeric: encode non-numeric columns as numbers first (e.g. "
                         f"sklearn.preprocessing.OrdinalEncoder); {err}.") from None
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D (n_samples, n_features), got shape {arr.shape}.")
    if np.isinf(arr).any():
        raise ValueError(f"{what} contains infinite values; replace them (NaN is allowed and read as missing).")
    return arr


class _PFNEstimator(BaseEstimator):
    _task = "classification"

    def __init__(self, model: Source, n_ensemble: int = 8, power_transform: bool = True, random_state: int = 0,
                 device: str = "cpu") -> None:
        self.model = model
        self.n_ensemble = n_ensemble
        self.power_transform = power_transform
        self.random_state = random_state
        self.device = device

    def _load(self) -> PriorFittedNetwork:
        net = load_pfn(self.model).to(self.device).eval()
        if net.task != self._task:
            raise ValueError(f"{type(self).__name__} needs a {self._task} PFN, got task={net.task!r}.")
        if not isinstance(self.n_ensemble, int) or self.n_ensemble < 1:
            raise ValueError(f"n_ensemble must be an integer >= 1, got {self.n_ensemble!r}.")
        return net

    def _fit_x(self, X: Any) -> np.ndarray:
        self.net_ = self._load()
        X = _as_numeric(X)
        if len(X) < 2:
            raise ValueError(f"The context needs at least 2 rows, got {len(X)}.")
        if X.shape[1] > self.net_.max_features:
            raise ValueError(f"X has {X.shape[1]} features but this PFN supports at most max_features="
                             f"{self.net_.max_features}; select or reduce features (e.g. PCA) first.")
        self.n_features_in_ = X.shape[1]
        self.X_ = X
        return X

    def _members(self, X: np.ndarray) -> tuple[torch.Tensor, list[int]]:
        """``(n_ensemble, n_context + n_query, d)`` inputs of the ensemble members and their class shifts."""
        X = _as_numeric(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, the context has {self.n_features_in_}.")
        both = np.concatenate([self.X_, X])
        rng = np.random.default_rng(self.random_state)
        transformed = None
        members = []
        for e in range(self.n_ensemble):
            data = both
            if self.power_transform and e % 2 == 1:
                if transformed is None:
                    transformed = self._power(both)
                data = transformed
            members.append(data[:, rng.permutation(both.shape[1])] if e else data)
        return torch.as_tensor(np.stack(members), dtype=torch.float32, device=self.device), list(range(self.n_ensemble))

    def _power(self, both: np.ndarray) -> np.ndarray:
        from sklearn.preprocessing import PowerTransformer

        n = len(self.X_)
        out = both.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for j in range(both.shape[1]):
                col = both[:n, j]
                if np.nanstd(col) < 1e-12 or np.isnan(col).all():
                    continue
                pt = PowerTransformer(standardize=True).fit(col[~np.isnan(col)].reshape(-1, 1))
                res = pt.transform(both[:, j:j + 1])[:, 0]
                if np.isfinite(res[~np.isnan(both[:, j])]).all():
                    out[:, j] = res
        return out


class PFNClassifier(ClassifierMixin, _PFNEstimator):
    """Classify a small table with a trained classification PFN: no training, one forward pass (TabPFN-style).

    Args:
        model: a trained :class:`PriorFittedNetwork` (``task="classification"``) or the path of its Lightning
            checkpoint (read with ``weights_only=True``; non-finite weights refused).
        n_ensemble: ensemble members (feature permutations, class rotations, power transform on every second).
        power_transform: Yeo-Johnson transform the features of every second member.
        random_state: seed of the feature permutations.
        device: where the forward pass runs.

    Example:
        >>> import numpy as np
        >>> net = PriorFittedNetwork("classification", max_features=4, max_classes=3, d_model=16, nhead=2,
        ...                          num_layers=1, dim_feedforward=32)
        >>> X, y = np.random.default_rng(0).normal(size=(30, 4)), np.arange(30) % 3
        >>> PFNClassifier(net, n_ensemble=2).fit(X[:20], y[:20]).predict_proba(X[20:]).shape
        (10, 3)
    """

    _task = "classification"

    def fit(self, X: Any, y: Any) -> "PFNClassifier":
        """Check and store the context ``(X, y)``; no training."""
        X = self._fit_x(X)
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(X):
            raise ValueError(f"y must be 1-D with one label per row of X ({len(X)}), got shape {y.shape}.")
        if y.dtype.kind == "f" and np.isnan(y).any():
            raise ValueError("y contains NaN: drop the unlabelled rows from the context.")
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"The context has a single class ({self.classes_[0]!r}): a classifier needs at least "
                             "two classes in y.")
        if len(self.classes_) > self.net_.max_classes:
            raise ValueError(f"y has {len(self.classes_)} classes but this PFN supports at most max_classes="
                             f"{self.net_.max_classes}; merge classes or use a PFN trained with more.")
        self.y_ = codes.astype(np.int64)
        return self

    @torch.no_grad()
    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``(n, n_classes)``, averaged over the ensemble members."""
        x, shifts = self._members(X)
        k = len(self.classes_)
        y = torch.as_tensor(self.y_, device=self.device)
        y_train = torch.stack([(y + s) % k for s in shifts]).float()
        logits = self.net_(x, y_train).float()[..., :k]
        probs = torch.softmax(logits, -1)  # member e's class c is the original class (c - s) % k
        back = torch.stack([probs[e][:, (torch.arange(k) + s) % k] for e, s in enumerate(shifts)])
        return back.mean(0).cpu().numpy()

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row."""
        return self.classes_[self.predict_proba(X).argmax(1)]


class PFNRegressor(RegressorMixin, _PFNEstimator):
    """Regress with a trained regression PFN (Riemann-distribution head): predictive mean in one forward pass.

    ``y`` is z-scored with the context's mean and standard deviation before it enters the model (the prior's
    targets are of unit scale), and predictions are mapped back.

    Args:
        model: a trained :class:`PriorFittedNetwork` (``task="regression"``) or its checkpoint path.
        n_ensemble: ensemble members (feature permutations, power transform on every second).
        power_transform: Yeo-Johnson transform the features of every second member.
        random_state: seed of the feature permutations.
        device: where the forward pass runs.

    Example:
        >>> import numpy as np
        >>> net = PriorFittedNetwork("regression", max_features=1, num_buckets=10, bucket_range=[-3.0, 3.0],
        ...                          d_model=16, nhead=2, num_layers=1, dim_feedforward=32)
        >>> X = np.linspace(0, 1, 20)[:, None]
        >>> PFNRegressor(net, n_ensemble=1).fit(X[:15], np.sin(X[:15, 0])).predict(X[15:]).shape
        (5,)
    """

    _task = "regression"

    def fit(self, X: Any, y: Any) -> "PFNRegressor":
        """Check and store the context ``(X, y)``; no training."""
        X = self._fit_x(X)
        y = np.asarray(y, dtype=np.float64)
        if y.ndim != 1 or len(y) != len(X):
            raise ValueError(f"y must be 1-D with one target per row of X ({len(X)}), got shape {y.shape}.")
        if not np.isfinite(y).all():
            raise ValueError("y contains NaN or infinite values: drop those rows from the context.")
        self.y_mean_, self.y_std_ = float(y.mean()), float(y.std()) or 1.0
        self.y_ = (y - self.y_mean_) / self.y_std_
        return self

    @torch.no_grad()
    def predict(self, X: Any) -> np.ndarray:
        """Predictive mean of each row, averaged over the ensemble members."""
        x, _ = self._members(X)
        y_train = torch.as_tensor(self.y_, dtype=torch.float32, device=self.device).expand(len(x), -1)
        mean = bar_mean(self.net_(x, y_train), self.net_.borders).mean(0)
        return mean.cpu().numpy() * self.y_std_ + self.y_mean_
