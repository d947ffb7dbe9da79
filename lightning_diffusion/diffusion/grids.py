"""Image grids at the edges: [-1, 1] float samples to uint8, PNG files and logger images."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid


def to_uint8(images: Tensor) -> Tensor:
    """``[-1, 1]`` float NCHW -> uint8 NCHW (rounded, clamped)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def image_grid(images: Tensor, columns: int, padding: int = 2) -> Tensor:
    """A uint8 ``[3, H, W]`` grid of ``[-1, 1]`` images, ``columns`` per row."""
    return make_grid(to_uint8(images), nrow=columns, padding=padding, pad_value=255)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a uint8 ``[3, H, W]`` tensor as a PNG (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return path


def log_grid(logger: object, key: str, grid: Tensor, step: int, caption: str | None = None) -> None:
    """Send a uint8 grid to a W&B or TensorBoard logger (other loggers keep only the PNG)."""
    if logger is None:
        return
    if hasattr(logger, "log_image"):  # WandbLogger
        extra = {"caption": [caption]} if caption else {}  # WandbLogger checks len() of every keyword it gets
        logger.log_image(key=key, images=[grid.permute(1, 2, 0).numpy()], step=step, **extra)
    elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoardLogger
        logger.experiment.add_image(key, grid, global_step=step)
