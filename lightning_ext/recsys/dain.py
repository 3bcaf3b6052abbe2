"""DAIN (Oh et al., CIKM 2021): influence-guided data augmentation for neural tensor completion.

Oh, Kim, Rossi and Kumar, *Influence-guided Data Augmentation for Neural Tensor Completion*, CIKM 2021,
arXiv 2108.10248. Reference code: github.com/claws-lab/DAIN (``src/main.py``, ``src/model.py``).

The pipeline (``src/main.py``):

1. train a neural tensor-completion model (one embedding table per tensor mode, concatenated, an MLP, a linear
   output) with MSE, keeping the weights of the best validation epoch ``E*``;
2. cell importance, a TracIn-style influence on the last layer: with ``h_e(c)`` the last hidden layer of cell ``c``
   after epoch ``e`` and ``g_e(c) = h_e(c) · (ŷ_e(c) − y_c)`` (the gradient of the output weights),
   ``I(c) = Σ_{e ≤ E*} ⟨g_e(c), Σ_{v ∈ val} g_e(v)⟩``;
3. entity importance per mode ``m``: ``P_m(k) ∝ Σ_{train c: c_m = k} |I(c)|`` (``use_abs``; the official ``abs``);
4. augmentation: ``ratio · |train|`` new cells, each mode's index drawn independently from ``P_m``, labelled with the
   trained model's prediction; a fresh model trains on train ∪ augmented.

The pure core: :class:`TensorMLP`, :func:`last_layer_gradients`, :func:`cell_influence` (and its parts
:func:`validation_gradient`, :func:`train_influence`, split over ranks in :func:`sharded_cell_influence`),
:func:`entity_importance`, :func:`sample_cells`. The Lightning parts: :class:`NeuralTensorCompletion` (the model),
:class:`InfluenceCollector` (steps 2 while the model trains, then writes the importance and the best weights) and
:class:`~lightning_ext.recsys.movielens_tensor.InfluenceAugmentedDataModule` (steps 3-4).

Differences from the official code (on purpose): the gradients of every cell come from one pass at the end of each
epoch, with the same weights (the official code records validation gradients before an epoch's steps and training
gradients during them); one scalar per cell and epoch is accumulated instead of ``epochs × cells × width`` floats;
``RMSE`` is a true root mean squared error (the official "Test RMSE" is the MSE).

Example:
    >>> import torch
    >>> net = TensorMLP(dims=(4, 5, 3), layers=(12, 8, 6))
    >>> cells = torch.tensor([[0, 1, 2], [3, 4, 0]])
    >>> net(cells).shape, net.hidden(cells).shape
    (torch.Size([2]), torch.Size([2, 6]))
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torchmetrics import MeanSquaredError
from typing_extensions import override

from lightning_ext.core.guards import NonFiniteLoss, check_loss, check_nonfinite_policy, refuse_skip_under_ddp
from lightning_ext.core.validation import PositiveFloat, PositiveInt, check_positive, check_positive_int


# ------------------------------------------------------------------------------------------------ pure core
def check_dims(dims: Sequence[int]) -> tuple[int, ...]:
    """The tensor's size per mode, each >= 1, at least two modes (one clear line otherwise)."""
    dims = tuple(int(d) for d in dims)
    if len(dims) < 2:
        raise ValueError(f"a tensor needs at least two modes (e.g. user, item), got dims={list(dims)}.")
    for m, d in enumerate(dims):
        if d < 1:
            raise ValueError(f"tensor mode {m} is empty (size {d}); every mode needs at least one entity.")
    return dims


def check_cells(cells: torch.Tensor, dims: Sequence[int]) -> None:
    """Refuse cells that are not ``(B, order)`` integer indices inside the tensor."""
    if cells.dim() != 2 or cells.shape[1] != len(dims):
        raise ValueError(f"cells must be (B, {len(dims)}) indices (one column per tensor mode), got {tuple(cells.shape)}.")
    if cells.is_floating_point() or cells.is_complex() or cells.dtype == torch.bool:
        raise ValueError(f"cells must be integer indices, got dtype {cells.dtype}.")
    if len(cells):
        low, high = cells.min(0).values, cells.max(0).values
        for m, d in enumerate(dims):
            if low[m] < 0 or high[m] >= d:
                raise ValueError(f"mode {m} indices must lie in [0, {d}), got [{int(low[m])}, {int(high[m])}].")


class TensorMLP(nn.Module):
    """DAIN's neural tensor-completion model: one embedding per mode, concatenated, ReLU MLP, linear output.

    ``layers[0]`` is the concatenated embedding width (``layers[0] / order`` per mode, as ``src/model.py``);
    every ``Linear`` of ``layers`` is followed by a ReLU; the output layer maps ``layers[-1]`` to one value.
    PyTorch's default initialisation, as the official code.

    Args:
        dims: the size of each tensor mode.
        layers: widths, the first being the concatenated embedding size.
    """

    def __init__(self, dims: Sequence[int], layers: Sequence[int] = (150, 1024, 1024, 128)) -> None:
        super().__init__()
        self.dims = check_dims(dims)
        layers = [int(w) for w in layers]
        if len(layers) < 2 or min(layers) < 1:
            raise ValueError(f"layers must list at least two positive widths (embedding concat, hidden...), got {layers}.")
        if layers[0] % len(self.dims):
            raise ValueError(f"layers[0] ({layers[0]}) must be a multiple of the tensor order ({len(self.dims)}).")
        self.layers = tuple(layers)
        self.embeddings = nn.ModuleList(nn.Embedding(d, layers[0] // len(self.dims)) for d in self.dims)
        self.fc_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(layers[:-1], layers[1:]))
        self.output_layer = nn.Linear(layers[-1], 1)

    def hidden(self, cells: torch.Tensor) -> torch.Tensor:
        """The last hidden layer ``h(c)`` ``(B, layers[-1])`` (after its ReLU)."""
        check_cells(cells, self.dims)
        x = torch.cat([emb(cells[:, m]) for m, emb in enumerate(self.embeddings)], 1)
        for fc in self.fc_layers:
            x = F.relu(fc(x))
        return x

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        """Predicted values ``(B,)``."""
        return self.output_layer(self.hidden(cells)).squeeze(-1)

    @torch.no_grad()
    def predict(self, cells: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """Predictions for many cells, in batches, without gradients."""
        return torch.cat([self(c) for c in cells.split(batch_size)]) if len(cells) else cells.new_zeros(0).float()


def last_layer_gradients(hidden: torch.Tensor, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``g(c) = h(c) · (ŷ(c) − y(c))``: each cell's gradient of the output weights (``½`` squared error), ``(B, width)``."""
    return hidden * (prediction - target).unsqueeze(-1)


@torch.no_grad()
def validation_gradient(model: TensorMLP, val_cells: torch.Tensor, val_values: torch.Tensor,
                        batch_size: int = 8192) -> tuple[torch.Tensor, float]:
    """``Σ_v g(v)`` over the given validation cells ``(width,)`` and their summed squared error (zeros when empty)."""
    total = model.output_layer.weight.new_zeros(model.layers[-1])
    sq = 0.0
    for cells, values in zip(val_cells.split(batch_size), val_values.split(batch_size)):
        h = model.hidden(cells)
        pred = model.output_layer(h).squeeze(-1)
        total = total + last_layer_gradients(h, pred, values.to(pred.dtype)).sum(0)
        sq += float((pred - values).pow(2).sum())
    return total, sq


@torch.no_grad()
def train_influence(model: TensorMLP, train_cells: torch.Tensor, train_values: torch.Tensor,
                    val_gradient: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """``⟨g(c), G⟩`` for every given training cell, with ``G = Σ_v g(v)`` (:func:`validation_gradient`)."""
    out = [last_layer_gradients(h := model.hidden(c), model.output_layer(h).squeeze(-1), v.to(val_gradient.dtype))
           @ val_gradient for c, v in zip(train_cells.split(batch_size), train_values.split(batch_size))]
    return torch.cat(out) if out else val_gradient.new_zeros(0)


@torch.no_grad()
def cell_influence(model: TensorMLP, train_cells: torch.Tensor, train_values: torch.Tensor,
                   val_cells: torch.Tensor, val_values: torch.Tensor, batch_size: int = 8192) -> tuple[torch.Tensor, float]:
    """One checkpoint's term ``⟨g(c), Σ_v g(v)⟩`` for every training cell ``c``, and the validation MSE.

    Returns:
        ``(influence (N_train,), val_mse)``.
    """
    if not len(val_cells):
        raise ValueError("the validation split is empty: DAIN's influence needs validation cells.")
    total, sq = validation_gradient(model, val_cells, val_values, batch_size)
    return train_influence(model, train_cells, train_values, total, batch_size), sq / len(val_cells)


@torch.no_grad()
def sharded_cell_influence(model: TensorMLP, train_cells: torch.Tensor, train_values: torch.Tensor,
                           val_cells: torch.Tensor, val_values: torch.Tensor, rank: int, world_size: int,
                           reduce_sum: Callable[[torch.Tensor], torch.Tensor],
                           batch_size: int = 8192) -> tuple[torch.Tensor, float]:
    """:func:`cell_influence` split over ranks: each rank takes every ``world_size``-th cell from ``rank`` on.

    A rank sums the gradients of its validation cells, ``reduce_sum`` (an all-reduce) adds the ranks' sums into
    ``G`` and the squared errors; it then scores its training cells against ``G`` into a zero vector of all
    ``N_train`` cells and ``reduce_sum`` adds the ranks' vectors. With the same weights on every rank (DDP), every
    rank ends with the one-process result (up to summation order) at ``1 / world_size`` of the work.

    Example (one process: ``reduce_sum`` is the identity):
        >>> net = TensorMLP(dims=(4, 5), layers=(4, 3))
        >>> cells, values = torch.tensor([[0, 1], [3, 4], [2, 2]]), torch.tensor([1.0, 2.0, 3.0])
        >>> term, mse = sharded_cell_influence(net, cells, values, cells, values, 0, 1, lambda t: t)
        >>> torch.allclose(term, cell_influence(net, cells, values, cells, values)[0].double())
        True
    """
    g, sq = validation_gradient(model, val_cells[rank::world_size], val_values[rank::world_size], batch_size)
    stats = reduce_sum(torch.cat([g.double(), torch.tensor([sq, len(val_cells[rank::world_size])], dtype=torch.float64,
                                                        device=g.device)]))
    if float(stats[-1]) < 1:
        raise ValueError("the validation split is empty: DAIN's influence needs validation cells.")
    mine = torch.arange(rank, len(train_cells), world_size, device=train_cells.device)
    term = torch.zeros(len(train_cells), dtype=torch.float64, device=g.device)
    term[mine] = train_influence(model, train_cells[mine], train_values[mine], stats[:-2].to(g.dtype),
                                 batch_size).double()
    return reduce_sum(term), float(stats[-2] / stats[-1])


def entity_importance(cells: torch.Tensor, importance: torch.Tensor, dims: Sequence[int],
                      use_abs: bool = True) -> list[torch.Tensor]:
    """Per mode, the distribution ``P_m(k) ∝ Σ_{c: c_m = k} w(c)`` with ``w = |I|`` (``use_abs``) or ``max(I, 0)``.

    Example:
        >>> cells = torch.tensor([[0, 1], [1, 1], [1, 0]])
        >>> [p.tolist() for p in entity_importance(cells, torch.tensor([1.0, -2.0, 1.0]), (2, 2))]
        [[0.25, 0.75], [0.25, 0.75]]
    """
    dims = check_dims(dims)
    check_cells(cells, dims)
    if importance.shape != (len(cells),):
        raise ValueError(f"importance must hold one value per cell ({len(cells)}), got shape {tuple(importance.shape)}.")
    w = importance.double().abs() if use_abs else importance.double().clamp(min=0)
    if not torch.isfinite(w).all():
        raise ValueError("cell importance holds NaN or infinite values.")
    out = []
    for m, d in enumerate(dims):
        p = torch.bincount(cells[:, m], weights=w, minlength=d)
        if float(p.sum()) <= 0:
            raise ValueError("no cell has positive importance: nothing to sample augmented cells from "
                             "(use_abs=True counts harmful cells too).")
        out.append(p / p.sum())
    return out


def sample_cells(distributions: Sequence[torch.Tensor], n: int, generator: torch.Generator,
                 exclude: Optional[torch.Tensor] = None, max_rounds: int = 50) -> torch.Tensor:
    """``n`` cells ``(n, order)``, each mode's index drawn independently from its distribution (with replacement).

    With ``exclude`` (the observed cells) the draw is deduplicated: no cell of ``exclude`` and no cell twice
    (redrawn up to ``max_rounds`` times; fewer than ``n`` cells come back when the tensor is nearly full).
    """
    def draw(k: int) -> torch.Tensor:
        return torch.stack([torch.multinomial(p.float(), k, replacement=True, generator=generator)
                            for p in distributions], 1)

    if exclude is None:
        return draw(n)
    dims = [len(p) for p in distributions]
    strides = torch.tensor([int(torch.tensor(dims[m + 1:]).prod()) for m in range(len(dims))], dtype=torch.long)
    seen = set((exclude.long() * strides).sum(1).tolist())
    kept: list[torch.Tensor] = []
    missing = n
    for _ in range(max_rounds):
        cand = draw(2 * missing)
        for cell, key in zip(cand, (cand * strides).sum(1).tolist()):
            if key not in seen and missing:
                seen.add(key)
                kept.append(cell)
                missing -= 1
        if not missing:
            break
    return torch.stack(kept) if kept else torch.zeros(0, len(dims), dtype=torch.long)


# ------------------------------------------------------------------------------------------------ Lightning
class NeuralTensorCompletion(LightningModule):
    """DAIN's neural tensor completion (Oh et al., CIKM 2021): embeddings per tensor mode, an MLP, MSE on observed cells.

    The model of :mod:`lightning_ext.recsys.dain` (:class:`TensorMLP`) as a LightningModule. Batches are
    ``(cells (B, order), values (B,))`` from
    :class:`~lightning_ext.recsys.movielens_tensor.TensorCompletionDataModule` (or its augmented version); Adam
    (``lr``); logs ``train_loss``, ``val_rmse``, ``test_rmse`` and ``test_mse``. Add
    :class:`InfluenceCollector` to the first fit to compute DAIN's cell importance.

    Args:
        dims: size of each tensor mode (``None``: the DataModule's ``dims``).
        layers: MLP widths, ``layers[0]`` the concatenated embedding size (official ``[150, 1024, 1024, 128]``).
        lr: Adam learning rate (official 1e-3).
        nonfinite_loss: ``"error"``, ``"skip"`` or ``"warn"`` (see :mod:`lightning_ext.core.guards`).

    Example:
        >>> model = NeuralTensorCompletion(dims=[4, 5, 3], layers=[12, 8])
        >>> model(torch.tensor([[0, 1, 2]])).shape
        torch.Size([1])
    """

    def __init__(self, dims: Optional[Sequence[PositiveInt]] = None,
                 layers: Sequence[PositiveInt] = (150, 1024, 1024, 128), lr: PositiveFloat = 1e-3,
                 nonfinite_loss: NonFiniteLoss = "error") -> None:
        super().__init__()
        check_positive("lr", lr)
        check_nonfinite_policy(nonfinite_loss)
        for w in layers:
            check_positive_int("every layers width", w)
        self.save_hyperparameters()
        self.layers, self.lr, self.nonfinite_loss = tuple(layers), lr, nonfinite_loss
        self.net: Optional[TensorMLP] = None
        self.val_rmse = MeanSquaredError(squared=False)
        self.test_rmse = MeanSquaredError(squared=False)
        if dims is not None:
            self._build(dims)

    def _build(self, dims: Sequence[int]) -> None:
        self.net = TensorMLP(dims, self.layers)
        self.hparams["dims"] = list(self.net.dims)

    @override
    def setup(self, stage: str) -> None:
        """Build from the DataModule's ``dims`` (unless built); refuse ``nonfinite_loss='skip'`` under DDP."""
        refuse_skip_under_ddp(self, self.nonfinite_loss)
        if self.net is not None:
            return
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "dims"):
            raise RuntimeError("NeuralTensorCompletion needs a TensorCompletionDataModule (with `dims`) as "
                               "`datamodule=`, or `dims` given.")
        dm.setup(stage)
        self._build(dm.dims)

    @override
    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        """Predicted values ``(B,)`` of ``(B, order)`` cells."""
        return self.net(cells)

    def _unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise ValueError("NeuralTensorCompletion takes (cells (B, order), values (B,)) batches.")
        return batch[0], batch[1].float()

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        """MSE of the batch's cells (``None``: a skipped non-finite step)."""
        cells, values = self._unpack(batch)
        loss = F.mse_loss(self(cells), values)
        if not check_loss(self, loss, self.nonfinite_loss, batch):
            return None
        self.log("train_loss", loss, prog_bar=True, batch_size=len(cells))
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulate the validation RMSE."""
        cells, values = self._unpack(batch)
        self.val_rmse.update(self(cells), values)

    @override
    def on_validation_epoch_end(self) -> None:
        """Log ``val_rmse``."""
        self.log("val_rmse", self.val_rmse.compute(), prog_bar=True)
        self.val_rmse.reset()

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulate the test RMSE."""
        cells, values = self._unpack(batch)
        self.test_rmse.update(self(cells), values)

    @override
    def on_test_epoch_end(self) -> None:
        """Log ``test_rmse`` and ``test_mse``."""
        rmse = self.test_rmse.compute()
        self.log("test_rmse", rmse)
        self.log("test_mse", rmse ** 2)
        self.test_rmse.reset()

    @override
    def configure_optimizers(self) -> Any:
        """Adam with ``lr``."""
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class InfluenceCollector(Callback):
    """DAIN's cell importance: last-layer influence on the validation loss, summed over epochs up to the best one.

    After every validation (sanity checks excluded) one no-grad pass over the validation and training cells adds
    ``⟨g_e(c), Σ_v g_e(v)⟩`` to each training cell's running sum (:func:`cell_influence`) and tracks the validation
    MSE; under DDP each rank scores every ``world_size``-th cell and the shares are summed over ranks
    (:func:`sharded_cell_influence`), so every rank holds the one-process sums; the sums up to the best validation epoch and that epoch's weights are kept. When the fit ends, writes
    ``influence_path`` (a ``torch.save`` dict of tensors and plain values, loadable with ``weights_only=True``):
    ``importance`` (normalised by its maximum absolute value), the training ``cells``, ``dims``, ``best_epoch``,
    ``layers`` and the best weights ``state_dict`` (the teacher that labels augmented cells). The sums and the
    best weights are in checkpoints, so a resumed fit ends with the same importance.

    Args:
        influence_path: output file, relative to ``trainer.log_dir`` (``None``: not written; read
            :attr:`importance` and :attr:`best_state`).
        batch_size: cells per no-grad pass.
    """

    def __init__(self, influence_path: Optional[str] = "influence.pt", batch_size: PositiveInt = 8192) -> None:
        from lightning_ext.core.paths import check_path_argument

        check_path_argument("influence_path", influence_path)
        check_positive_int("batch_size", batch_size)
        self.influence_path, self.batch_size = influence_path, batch_size
        self.total: Optional[torch.Tensor] = None
        self.importance: Optional[torch.Tensor] = None
        self.best_epoch, self.best_val = -1, float("inf")
        self.best_state: Optional[dict] = None
        self.written = None

    @staticmethod
    def _data(trainer) -> tuple:
        dm = trainer.datamodule
        sets = [getattr(dm, name, None) for name in ("train_set", "val_set")]
        if any(s is None or not hasattr(s, "tensors") for s in sets):
            raise RuntimeError("InfluenceCollector needs a TensorCompletionDataModule (TensorDataset `train_set` and "
                               "`val_set` of (cells, values)).")
        if getattr(dm, "augmented_cells", 0):
            raise RuntimeError("InfluenceCollector runs on the first (un-augmented) fit; its DataModule already "
                               "holds augmented cells.")
        return (*sets[0].tensors[:2], *sets[1].tensors[:2])

    @override
    def on_validation_end(self, trainer, pl_module) -> None:
        """Add this epoch's influence term; keep the sums and weights of the best validation epoch."""
        if trainer.sanity_checking:
            return
        net = pl_module.net
        was_training = net.training
        net.eval()
        train_c, train_v, val_c, val_v = (t.to(pl_module.device) for t in self._data(trainer))
        term, val_mse = sharded_cell_influence(  # each rank a share of the cells, summed over ranks
            net, train_c, train_v, val_c, val_v, trainer.global_rank, trainer.world_size,
            lambda t: trainer.strategy.reduce(t, reduce_op="sum"), self.batch_size)
        net.train(was_training)
        term = term.cpu()
        self.total = term if self.total is None else self.total + term
        if val_mse < self.best_val:
            self.best_val, self.best_epoch = val_mse, trainer.current_epoch
            self.importance = self.total.clone()
            self.best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}

    @override
    def on_fit_end(self, trainer, pl_module) -> None:
        """Write ``influence_path`` (rank 0)."""
        if self.importance is None or self.influence_path is None:
            return
        from lightning_ext.core.io import atomic_torch_save
        from lightning_ext.core.paths import output_path

        path = output_path(trainer, self.influence_path)  # on every rank: trainer.log_dir broadcasts under DDP
        if not trainer.is_global_zero:
            return
        train_c, _, _, _ = self._data(trainer)
        scale = float(self.importance.abs().max()) or 1.0
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"importance": (self.importance / scale).float(), "cells": train_c.clone(),
                           "dims": list(pl_module.net.dims), "layers": list(pl_module.net.layers),
                           "best_epoch": self.best_epoch, "best_val_mse": self.best_val,
                           "state_dict": copy.copy(self.best_state)}, path)
        self.written = path

    @override
    def state_dict(self) -> dict:
        """Running sums, the best epoch's sums, validation MSE and weights."""
        return {"total": self.total, "importance": self.importance, "best_epoch": self.best_epoch,
                "best_val": self.best_val, "best_state": self.best_state}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.total, self.importance = state_dict["total"], state_dict["importance"]
        self.best_epoch, self.best_val = int(state_dict["best_epoch"]), float(state_dict["best_val"])
        self.best_state = state_dict["best_state"]
