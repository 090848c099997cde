"""Pixels: conversions between uint8 images and model range, grids and PNG output."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffmodels.core.io import atomic_path


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one (rows*(H+pad)+pad, ncol*(W+pad)+pad, C) image.

    ``ncol`` defaults to a near-square layout; unused cells stay ``fill``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    n, h, w, c = images.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = max(1, math.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = image
    return grid


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Atomically write an (H, W, C) or (H, W) uint8 array as PNG."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")


def tensor_copy(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A writable tensor copy of an array or tensor: prepared splits are read-only memory maps.

    Tensors are cloned rather than passed through ``np.array``, which numpy 2 would ask for a
    copy with a keyword ``Tensor.__array__`` does not take.
    """
    if isinstance(images, torch.Tensor):
        return images.clone()
    return torch.from_numpy(np.array(images))


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Model-range (B, C, H, W) -> [0, 1], clamped (what metrics and PNGs see)."""
    return x.float().add(1.0).div(2.0).clamp(0.0, 1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-range (B, C, H, W) -> uint8 (B, H, W, C)."""
    return to_unit_range(x).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
