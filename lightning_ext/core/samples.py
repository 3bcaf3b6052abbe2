"""Sample predictions as images: when a module saves them, and how (a PNG under the run's folder, TensorBoard too).

Image models log what they predict so a user can look before reading numbers. A module keeps a few inputs and
predictions during validation, builds a ``(C, H, W)`` image in [0, 1], and calls :func:`log_sample_image` at the
epoch's end when :func:`sample_epoch_due` says so.

Example:
    >>> import torch
    >>> grid = tile_rows([[torch.zeros(1, 4, 4), torch.ones(1, 4, 4)]], borders=[[None, (0.0, 1.0, 0.0)]])
    >>> tuple(grid.shape)
    (3, 8, 16)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from lightning_ext.core.paths import output_path

__all__ = ["log_sample_image", "sample_epoch_due", "tile_rows"]

GREEN, RED = (0.1, 0.75, 0.2), (0.9, 0.15, 0.1)


def sample_epoch_due(module: Any, every: int) -> bool:
    """Whether this validation epoch of a fit saves samples: every ``every`` epochs (0: never), rank 0, no sanity
    check, not a standalone ``validate``."""
    trainer = module.trainer
    return bool(every) and not trainer.sanity_checking and trainer.state.fn == "fit" and module.global_rank == 0 \
        and (module.current_epoch + 1) % every == 0


def _to_unit(img: torch.Tensor) -> torch.Tensor:
    img = img.detach().float().cpu()
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo).clamp_min(1e-6)


def tile_rows(rows: Sequence[Sequence[torch.Tensor]], borders: Optional[Sequence[Sequence[Any]]] = None,
              pad: int = 2) -> torch.Tensor:
    """Tile rows of ``(C, H, W)`` or ``(H, W)`` images (each min-max scaled, grey made RGB) into one ``(3, H', W')``
    image.

    ``borders[i][j]`` is an RGB triple framing image ``j`` of row ``i`` (``None``: no frame), e.g. green for a
    correct retrieval and red for a wrong one; frames take ``pad`` pixels inside each cell.
    """
    h = max(img.shape[-2] for row in rows for img in row)
    w = max(img.shape[-1] for row in rows for img in row)
    cols = max(len(row) for row in rows)
    out = torch.ones(3, len(rows) * (h + 2 * pad), cols * (w + 2 * pad))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            img = _to_unit(img if img.dim() == 3 else img.unsqueeze(0))
            img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
            top, left = i * (h + 2 * pad), j * (w + 2 * pad)
            color = borders[i][j] if borders is not None else None
            if color is not None:
                out[:, top:top + h + 2 * pad, left:left + w + 2 * pad] = torch.tensor(color).view(3, 1, 1)
            out[:, top + pad:top + pad + img.shape[-2], left + pad:left + pad + img.shape[-1]] = img
    return out


def log_sample_image(module: Any, image: torch.Tensor, tag: str, directory: Optional[str], title: str) -> Optional[Path]:
    """Log ``image`` (``(C, H, W)`` in [0, 1]) to a TensorBoard logger if there is one, and save it as
    ``<directory>/epoch_<n>.png`` under the run's folder (``directory=None``: no file). Returns the file."""
    logger = module.logger
    if logger is not None and hasattr(getattr(logger, "experiment", None), "add_image"):
        logger.experiment.add_image(tag, image, module.current_epoch)
    folder = output_path(module.trainer, directory) if directory is not None else None
    if folder is None:
        return None
    from lightning_ext.core.plotting import new_figure, save_figure

    c, h, w = image.shape
    fig, ax = new_figure(figsize=(1.0 + 8.0 * w / max(h, w), 1.3 + 8.0 * h / max(h, w)))
    ax.imshow(image[0].numpy() if c == 1 else image.permute(1, 2, 0).numpy(), cmap="gray" if c == 1 else None,
              vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return save_figure(fig, folder / f"epoch_{module.current_epoch + 1:03d}.png")
