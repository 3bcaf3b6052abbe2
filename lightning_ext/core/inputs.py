"""Finding a model's inputs: in a batch, in the training loader, or from a declared ``input_shape``.

One resolver for every component that needs an example input (pruning, compression, distillation, merging).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch

#: Dict keys searched, in order, for the input tensor of a dict batch.
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")


def batch_inputs(batch: Any, error: type[Exception] = ValueError, owner: str = "the callback") -> torch.Tensor:
    """The input tensor of a batch: the batch itself, its first item, or a dict value under :data:`INPUT_KEYS`.

    Example:
        >>> batch_inputs((torch.zeros(2, 3), torch.ones(2))).shape
        torch.Size([2, 3])
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in INPUT_KEYS:
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise error(
        f"Cannot find the model inputs in a batch of type {type(batch).__name__}; batches must be a tensor, a "
        f"tuple/list whose first item is the input tensor, or a dict with key 'x'. Otherwise subclass {owner} "
        "and override `batch_inputs`."
    )


def first_train_loader(trainer: Any, error: type[Exception] = ValueError) -> Iterable:
    """The trainer's training loader (the first one when there are several)."""
    loader = trainer.train_dataloader
    if loader is None and getattr(trainer, "fit_loop", None) is not None:
        source = getattr(trainer.fit_loop, "_data_source", None)
        loader = source.dataloader() if source is not None and source.is_defined() else None
    while isinstance(loader, (list, tuple)) and loader:
        loader = loader[0]
    if isinstance(loader, dict) and loader:
        loader = next(iter(loader.values()))
    if loader is None:
        raise error("No training dataloader is available to take example inputs from; pass `input_shape`.")
    return loader


def example_inputs(pl_module: Any, input_shape: Optional[Sequence[int]] = None, trainer: Any = None,
                   batch_size: int = 1, error: type[Exception] = ValueError) -> torch.Tensor:
    """A zero tensor shaped like one model input, on the module's device.

    Looked up in order: ``input_shape`` (without the batch dimension), ``pl_module.example_input_array``,
    ``pl_module.input_shape``, then the first batch of ``trainer``'s training loader.

    Example:
        >>> example_inputs(torch.nn.Linear(3, 2), input_shape=[3]).shape
        torch.Size([1, 3])
    """
    device = getattr(pl_module, "device", None) or next(iter(pl_module.parameters()), torch.zeros(0)).device
    dtype = torch.float32
    if input_shape is None:
        example = getattr(pl_module, "example_input_array", None)
        if isinstance(example, torch.Tensor):
            input_shape, dtype = list(example.shape[1:]), example.dtype
        elif getattr(pl_module, "input_shape", None) is not None:
            input_shape = list(pl_module.input_shape)
        elif trainer is not None:
            x = batch_inputs(next(iter(first_train_loader(trainer, error))), error)
            input_shape, dtype = list(x.shape[1:]), x.dtype
        else:
            raise error("Cannot tell the model's input shape: pass `input_shape` (without the batch dimension) "
                        "or set `example_input_array` on the module.")
    return torch.zeros(batch_size, *input_shape, dtype=dtype, device=device)
