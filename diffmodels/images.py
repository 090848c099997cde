"""Image grids and PNG output for previews, reconstructions and sample sheets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from diffmodels.io import atomic_path


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
