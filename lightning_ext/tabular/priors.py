"""Prior DataModules: every training batch is a batch of whole datasets drawn afresh from a prior.

Papers: Müller et al., "Transformers Can Do Bayesian Inference", ICLR 2022 (arXiv 2112.10510) for the GP and BNN
priors; the SCM prior of TabPFN (arXiv 2207.01848) is in :mod:`lightning_ext.tabular.scm_prior`.
Reference code: https://github.com/automl/TransformersCanDoBayesianInference (``priors/fast_gp.py``,
``priors/mlp.py``), https://github.com/automl/PFNs (``pfns/train.py``), written anew here.

A batch is a dict: ``x`` ``(B, N, d)``, ``y`` ``(B, N)`` (float; class ids for classification priors) and
``single_eval_pos`` (a 0-d tensor): the first ``single_eval_pos`` points of each dataset are its training set, the
rest its queries. ``single_eval_pos`` and ``d`` are shared by the batch.

Seeding, resuming and sharding (no state but a counter):

- The batch of global step ``t`` is a pure function of ``(seed, t)``: its shared sizes come from a generator seeded
  by ``(seed, t)``, and dataset ``j`` of the step's global batch of ``batch_size * world_size`` datasets from one
  seeded by ``(seed, t, j)``. DDP rank ``r`` draws datasets ``r * batch_size ... (r + 1) * batch_size - 1``, so the
  ranks' streams are disjoint and two ranks with ``batch_size`` see exactly the datasets one process sees with
  ``2 * batch_size``.
- DataLoader worker ``w`` of ``W`` produces steps ``t = w, w + W, ...``; the loader takes them round-robin, so the
  order does not depend on ``num_workers``.
- The train loader (:class:`PriorDataLoader`) counts the batches it has handed to the loop; Lightning saves that
  count in every checkpoint and a resumed fit continues with the next step's batch, mid-epoch too.
- An epoch is ``steps_per_epoch`` batches (a logging unit; there is no fixed data set). Validation uses
  ``val_batches`` fixed batches drawn with ``seed + 1`` (the same every epoch).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from typing_extensions import override

from lightning_ext.core.validation import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_non_negative,
    check_number,
    check_positive,
    check_positive_int,
)

__all__ = ["PriorDataModule", "PriorDataLoader", "PriorDataset", "GPPriorDataModule", "BNNPriorDataModule",
           "generator"]


def generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of non-negative integers (through NumPy's ``SeedSequence``)."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PriorDataset(IterableDataset):
    """Batches ``start, start + 1, ...`` of a prior's stream (one per step), split over DataLoader workers."""

    def __init__(self, prior: "PriorDataModule", seed: int, steps: int, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> None:
        self.prior, self.seed, self.steps = prior, int(seed), int(steps)
        self.rank, self.world_size = rank, world_size
        self.start, self.stop = 0, self.steps  # global steps of the next iteration

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        rank, world = _rank_world()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start + worker, self.stop, workers):
            yield self.prior.sample_batch(self.seed, step, rank, world)


class PriorDataLoader(DataLoader):
    """The train loader of a prior: ``state_dict`` is the number of batches handed to the loop.

    Example:
        >>> dm = GPPriorDataModule(batch_size=2, seq_len=8, steps_per_epoch=3)
        >>> dl = dm.train_dataloader(); it = iter(dl); _ = next(it); state = dl.state_dict()
        >>> fresh = dm.train_dataloader(); fresh.load_state_dict(state)
        >>> torch.equal(next(iter(fresh))["y"], next(it)["y"])
        True
    """

    def __init__(self, dataset: PriorDataset, **kwargs: Any) -> None:  # noqa: D107
        if kwargs.get("persistent_workers"):
            raise ValueError("PriorDataLoader does not support persistent_workers (each epoch re-seeds its workers).")
        super().__init__(dataset, batch_size=None, **kwargs)
        self._served = 0  # batches handed to the loop since the start of training

    def __iter__(self) -> Iterator[Any]:
        steps = self.dataset.steps
        start = self._served
        self.dataset.start = start
        self.dataset.stop = start + steps - start % steps  # the rest of the current epoch
        return self._counted(super().__iter__())

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The number of batches handed to the training loop so far."""
        return {"served": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after ``state['served']`` batches."""
        self._served = int(state["served"])


class PriorDataModule(LightningDataModule):
    """Base class: a prior over datasets. Subclasses implement :meth:`sample_dataset` (and may override
    :meth:`sample_sizes`).

    Args:
        batch_size: datasets per batch (per process).
        seq_len: points per dataset (training points + queries).
        steps_per_epoch: batches per epoch.
        min_train: fewest training points; ``single_eval_pos`` is uniform in ``[min_train, seq_len - min_test]``.
        min_test: fewest queries.
        val_batches: fixed validation batches (0: no validation loader).
        seed: seed of the stream.
        num_workers: DataLoader workers (each draws whole batches).
    """

    task: str = "regression"  #: ``"regression"`` or ``"classification"``

    def __init__(self, batch_size: PositiveInt = 16, seq_len: PositiveInt = 64, steps_per_epoch: PositiveInt = 100,
                 min_train: PositiveInt = 1, min_test: PositiveInt = 1, val_batches: NonNegativeInt = 0,
                 seed: int = 0, num_workers: NonNegativeInt = 0) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("steps_per_epoch", steps_per_epoch),
                            ("min_train", min_train), ("min_test", min_test)):
            check_positive_int(name, value)
        check_number("val_batches", val_batches, low=0, integer=True)
        check_number("num_workers", num_workers, low=0, integer=True)
        check_number("seed", seed, low=0, integer=True)
        if min_train + min_test > seq_len:
            raise ValueError(f"min_train + min_test ({min_train} + {min_test}) must be <= seq_len ({seq_len}).")
        self.batch_size, self.seq_len, self.steps_per_epoch = int(batch_size), int(seq_len), int(steps_per_epoch)
        self.min_train, self.min_test = int(min_train), int(min_test)
        self.val_batches, self.seed, self.num_workers = int(val_batches), int(seed), int(num_workers)

    # -- what a prior defines ---------------------------------------------------------------------------------
    def sample_sizes(self, gen: torch.Generator) -> dict[str, int]:
        """Sizes shared by one batch: ``single_eval_pos`` and ``num_features``."""
        lo, hi = self.min_train, self.seq_len - self.min_test
        pos = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        return {"single_eval_pos": pos, "num_features": self.num_features_of(gen)}

    def num_features_of(self, gen: torch.Generator) -> int:
        return int(getattr(self, "num_features"))

    def sample_dataset(self, gen: torch.Generator, n: int, num_features: int) -> tuple[Tensor, Tensor]:
        """One dataset: ``x`` ``(n, num_features)`` and ``y`` ``(n,)``."""
        raise NotImplementedError

    # -- the stream ---------------------------------------------------------------------------------------------
    def sample_batch(self, seed: int, step: int, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        """The datasets of rank ``rank`` at global step ``step`` (a pure function of its arguments)."""
        sizes = self.sample_sizes(generator(seed, step))
        xs, ys = [], []
        for j in range(rank * self.batch_size, (rank + 1) * self.batch_size):
            x, y = self.sample_dataset(generator(seed, step, j + 1), self.seq_len, sizes["num_features"])
            xs.append(x)
            ys.append(y)
        return {"x": torch.stack(xs).float(), "y": torch.stack(ys).float(),
                "single_eval_pos": torch.tensor(sizes["single_eval_pos"])}

    def target_samples(self, num_batches: int = 8) -> Tensor:
        """Targets drawn from the prior (stream ``seed + 2``), e.g. for the bar distribution's borders."""
        return torch.cat([self.sample_batch(self.seed + 2, t)["y"].flatten() for t in range(num_batches)])

    @override
    def train_dataloader(self) -> PriorDataLoader:
        """The endless prior stream, ``steps_per_epoch`` batches an epoch, resumable."""
        return PriorDataLoader(PriorDataset(self, self.seed, self.steps_per_epoch), num_workers=self.num_workers)

    @override
    def val_dataloader(self) -> Any:
        """``val_batches`` fixed batches (stream ``seed + 1``, rank-sharded like training)."""
        if not self.val_batches:
            return []
        return DataLoader(PriorDataset(self, self.seed + 1, self.val_batches), batch_size=None)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The stream's seed (the position lives in the train loader's state)."""
        return {"seed": self.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume a stream with another seed."""
        if int(state_dict.get("seed", self.seed)) != self.seed:
            raise ValueError(f"The checkpoint was trained on the prior stream with seed={state_dict['seed']}, this "
                             f"datamodule has seed={self.seed}; set `data.init_args.seed: {state_dict['seed']}`.")


def rbf_gp_sample(x: Tensor, gen: torch.Generator, lengthscale: float, outputscale: float, noise: float) -> Tensor:
    """One draw ``y = f(x) + eps`` with ``f ~ GP(0, outputscale * exp(-|x - x'|^2 / (2 lengthscale^2)))`` and
    ``eps ~ N(0, noise)`` (``noise`` is a variance)."""
    x = x.double()
    k = outputscale * torch.exp(-torch.cdist(x, x) ** 2 / (2 * lengthscale**2))
    k = k + (noise + 1e-8) * torch.eye(len(x), dtype=x.dtype)
    chol = torch.linalg.cholesky(k)
    return (chol @ torch.randn(len(x), dtype=x.dtype, generator=gen)).float()


class GPPriorDataModule(PriorDataModule):
    """The PFN paper's GP prior: datasets with ``x ~ U[0, 1]^d`` and ``y`` a draw of an RBF Gaussian process plus
    noise.

    ``y ~ GP(0, outputscale * RBF(lengthscale))`` plus Gaussian noise of variance ``noise``, with fixed
    hyperparameters as in the paper's GP experiment; :meth:`posterior_predictive` is the exact answer.

    Args:
        num_features: input dimension ``d``.
        lengthscale: RBF lengthscale.
        outputscale: RBF output variance.
        noise: observation-noise variance.
        **kwargs: the stream's arguments (:class:`PriorDataModule`: ``batch_size``, ``seq_len``,
            ``steps_per_epoch``, ``min_train``, ``min_test``, ``val_batches``, ``seed``, ``num_workers``).

    Example:
        >>> batch = GPPriorDataModule(batch_size=3, seq_len=20).sample_batch(seed=0, step=0)
        >>> batch["x"].shape, batch["y"].shape, 1 <= int(batch["single_eval_pos"]) < 20
        (torch.Size([3, 20, 1]), torch.Size([3, 20]), True)
    """

    def __init__(self, num_features: PositiveInt = 1, lengthscale: PositiveFloat = 0.6,
                 outputscale: PositiveFloat = 1.0, noise: NonNegativeFloat = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_positive_int("num_features", num_features)
        check_positive("lengthscale", lengthscale)
        check_positive("outputscale", outputscale)
        check_non_negative("noise", noise)
        self.num_features, self.lengthscale = int(num_features), float(lengthscale)
        self.outputscale, self.noise = float(outputscale), float(noise)

    @override
    def sample_dataset(self, gen: torch.Generator, n: int, num_features: int) -> tuple[Tensor, Tensor]:
        """``x ~ U[0, 1]^d`` and one GP draw at those points."""
        x = torch.rand(n, num_features, generator=gen)
        return x, rbf_gp_sample(x, gen, self.lengthscale, self.outputscale, self.noise)

    def posterior_predictive(self, x_train: Tensor, y_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
        """The exact GP posterior predictive under this prior: mean and variance (noise included) per query."""
        x_train, y_train, x_test = x_train.double(), y_train.double(), x_test.double()

        def kernel(a: Tensor, b: Tensor) -> Tensor:
            return self.outputscale * torch.exp(-torch.cdist(a, b) ** 2 / (2 * self.lengthscale**2))

        k = kernel(x_train, x_train) + (self.noise + 1e-8) * torch.eye(len(x_train), dtype=torch.float64)
        chol = torch.linalg.cholesky(k)
        ks = kernel(x_train, x_test)
        alpha = torch.cholesky_solve(y_train.unsqueeze(-1), chol)
        mean = (ks.T @ alpha).squeeze(-1)
        v = torch.linalg.solve_triangular(chol, ks, upper=False)
        var = self.outputscale - (v**2).sum(0) + self.noise + 1e-8
        return mean, var


_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "elu": torch.nn.functional.elu}


class BNNPriorDataModule(PriorDataModule):
    """The PFN paper's BNN prior: regression datasets from a freshly sampled random MLP per dataset, plus noise.

    Sampled depth and width, Gaussian weights of sampled scale, sampled activation, applied to ``x ~ N(0, I)``.

    Args:
        num_features: input dimension.
        max_layers: hidden layers are uniform in ``[1, max_layers]``.
        max_width: hidden width uniform in ``[4, max_width]``.
        weight_std: weights are ``N(0, s^2 / fan_in)`` with ``s`` log-uniform in ``[weight_std / 3, weight_std * 3]``.
        noise: observation-noise standard deviation (log-uniform in ``[noise / 10, noise]``).
        activation: ``"tanh"``, ``"relu"``, ``"elu"`` or ``"random"`` (one of them per dataset).
        **kwargs: the stream's arguments (:class:`PriorDataModule`).

    Example:
        >>> BNNPriorDataModule(num_features=3, batch_size=2, seq_len=10).sample_batch(0, 0)["x"].shape
        torch.Size([2, 10, 3])
    """

    def __init__(self, num_features: PositiveInt = 1, max_layers: PositiveInt = 3, max_width: PositiveInt = 32,
                 weight_std: PositiveFloat = 1.0, noise: PositiveFloat = 0.1,
                 activation: Literal["tanh", "relu", "elu", "random"] = "random", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, value in (("num_features", num_features), ("max_layers", max_layers), ("max_width", max_width)):
            check_positive_int(name, value)
        check_positive("weight_std", weight_std)
        check_positive("noise", noise)
        if activation not in (*_ACTIVATIONS, "random"):
            raise ValueError(f"activation must be one of {', '.join((*_ACTIVATIONS, 'random'))}; got {activation!r}.")
        self.num_features, self.max_layers, self.max_width = int(num_features), int(max_layers), max(int(max_width), 4)
        self.weight_std, self.noise, self.activation = float(weight_std), float(noise), activation

    @override
    def sample_dataset(self, gen: torch.Generator, n: int, num_features: int) -> tuple[Tensor, Tensor]:
        """``x ~ N(0, I)`` through a freshly sampled random MLP, plus noise; ``y`` standardised per dataset."""
        layers = int(torch.randint(1, self.max_layers + 1, (1,), generator=gen))
        width = int(torch.randint(4, self.max_width + 1, (1,), generator=gen))
        scale = self.weight_std * math.exp(float(torch.empty(1).uniform_(-math.log(3), math.log(3), generator=gen)))
        noise = self.noise * math.exp(float(torch.empty(1).uniform_(-math.log(10), 0, generator=gen)))
        names = list(_ACTIVATIONS)
        act = _ACTIVATIONS[self.activation if self.activation != "random"
                           else names[int(torch.randint(len(names), (1,), generator=gen))]]
        x = torch.randn(n, num_features, generator=gen)
        h, fan_in = x, num_features
        for _ in range(layers):
            w = torch.randn(fan_in, width, generator=gen) * scale / math.sqrt(fan_in)
            h, fan_in = act(h @ w + torch.randn(width, generator=gen) * 0.1), width
        y = h @ torch.randn(fan_in, generator=gen) / math.sqrt(fan_in)
        y = (y - y.mean()) / y.std().clamp_min(1e-6)
        return x, y + noise * torch.randn(n, generator=gen)
