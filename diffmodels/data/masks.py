"""Evaluation mask sets (docs/metrics.md#mask-sets).

A mask is a boolean (H, W) array, True = hole (pixels to inpaint); the keep-mask of docs/metrics.md is
``K = ~hole``. On disk each mask is an 8-bit PNG with 255 = hole and 0 = keep, the convention
of LaMa and SD inpainting.

Shapes, on the 8-px latent grid (G = 8):
    centre  a square of side ~R/2 near the centre
    boxes   1-3 rectangles of 1..R/(2G) tiles a side
    brush   free-form strokes (DeepFill-style thick polylines), quantised to tiles: a tile is a
            hole when at least half its pixels are painted
    half    one half of the image (left, right, top or bottom)
Variants:
    ``<shape>_aligned``  every edge on the grid: each 8x8 tile is all hole or all keep
    ``<shape>_offset``   the aligned mask of the same index shifted by 1..7 px on each axis,
                         replicating the border, so every interior edge is off the grid
Mask ``i`` of a shape depends only on (seed, shape, i): the aligned and offset variants of one
index share their shape, which isolates the effect of alignment.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from diffmodels.core.errors import DataError
from diffmodels.core.io import write_json

GRID = 8
SHAPES = ("centre", "boxes", "brush", "half")


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    words = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else k for k in keys]
    return np.random.default_rng(words)


def _tiles_to_pixels(tiles: np.ndarray) -> np.ndarray:
    return np.kron(tiles, np.ones((GRID, GRID), dtype=bool)).astype(bool)


def _centre(size: int, rng: np.random.Generator) -> np.ndarray:
    n = size // GRID
    side = max(1, round(n / 2))
    start = (n - side) // 2
    tiles = np.zeros((n, n), dtype=bool)
    tiles[start:start + side, start:start + side] = True
    return _tiles_to_pixels(tiles)


def _boxes(size: int, rng: np.random.Generator) -> np.ndarray:
    n = size // GRID
    tiles = np.zeros((n, n), dtype=bool)
    for _ in range(rng.integers(1, 4)):
        h, w = rng.integers(1, max(1, n // 2) + 1, size=2)
        y, x = rng.integers(0, n - h + 1), rng.integers(0, n - w + 1)
        tiles[y:y + h, x:x + w] = True
    return _tiles_to_pixels(tiles)


def _brush(size: int, rng: np.random.Generator) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(1, 4)):
        width = int(rng.integers(max(2, size // 10), max(3, size // 5) + 1))
        points = [tuple(rng.integers(0, size, size=2).tolist())]
        for _ in range(rng.integers(2, 6)):
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(size / 8, size / 3)
            x = float(np.clip(points[-1][0] + length * np.cos(angle), 0, size - 1))
            y = float(np.clip(points[-1][1] + length * np.sin(angle), 0, size - 1))
            points.append((x, y))
        draw.line(points, fill=255, width=width, joint="curve")
    painted = np.asarray(canvas) > 0
    n = size // GRID
    coverage = painted.reshape(n, GRID, n, GRID).mean(axis=(1, 3))
    tiles = coverage >= 0.5
    if not tiles.any():  # a thin stroke covering no tile by half: keep its most-painted tile
        tiles.flat[np.argmax(coverage)] = True
    return _tiles_to_pixels(tiles)


def _half(size: int, rng: np.random.Generator) -> np.ndarray:
    cut = GRID * max(1, round(size / 2 / GRID))
    hole = np.zeros((size, size), dtype=bool)
    side = rng.integers(0, 4)
    if side == 0:
        hole[:, :cut] = True
    elif side == 1:
        hole[:, cut:] = True
    elif side == 2:
        hole[:cut, :] = True
    else:
        hole[cut:, :] = True
    return hole


_SHAPE_FNS = {"centre": _centre, "boxes": _boxes, "brush": _brush, "half": _half}


def shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate a mask by (dy, dx) pixels, replicating the border into the uncovered strip."""
    size_y, size_x = mask.shape
    pad = ((abs(dy), abs(dy)), (abs(dx), abs(dx)))
    padded = np.pad(mask, pad, mode="edge")
    y0, x0 = abs(dy) - dy, abs(dx) - dx
    return padded[y0:y0 + size_y, x0:x0 + size_x]


def make_mask(name: str, index: int, size: int, seed: int) -> np.ndarray:
    """Mask ``index`` of set ``name`` (e.g. ``'brush_offset'``) at ``size`` x ``size``; True = hole."""
    shape, _, variant = name.partition("_")
    if shape not in _SHAPE_FNS or variant not in ("aligned", "offset"):
        raise ValueError(f"unknown mask set {name!r}; expected <{'|'.join(SHAPES)}>_<aligned|offset>")
    if size % GRID or size < 2 * GRID:
        raise ValueError(f"mask size must be a multiple of {GRID} and >= {2 * GRID}, got {size}")
    hole = _SHAPE_FNS[shape](size, _rng(seed, shape, index))
    if variant == "offset":
        rng = _rng(seed, shape, index, "offset")
        dy, dx = rng.integers(1, GRID, size=2) * rng.choice([-1, 1], size=2)
        hole = shift(hole, int(dy), int(dx))
    return hole


def make_mask_set(name: str, count: int, size: int, seed: int) -> np.ndarray:
    """(count, size, size) bool holes."""
    return np.stack([make_mask(name, i, size, seed) for i in range(count)])


def write_mask_sets(out_dir: Path, names: tuple[str, ...], count: int, size: int, seed: int) -> dict[str, Any]:
    """PNG files ``<out_dir>/<set>/<index:05d>.png`` and ``manifest.json``; returns the manifest."""
    sets = {}
    for name in names:
        masks = make_mask_set(name, count, size, seed)
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        for i, hole in enumerate(masks):
            Image.fromarray(hole.astype(np.uint8) * 255).save(out_dir / name / f"{i:05d}.png")
        sets[name] = {"count": int(count), "mean_hole_fraction": float(masks.mean())}
    manifest = {
        "format": "diffmodels-masks/1",
        "encoding": "8-bit PNG, 255 = hole (inpaint), 0 = keep",
        "resolution": size,
        "pairing": "mask i of every set belongs to test image i",
        "sets": sets,
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def load_mask_set(mask_dir: str | Path, name: str, size: int | None = None) -> np.ndarray:
    """(N, H, W) bool holes of one set; a clear error for missing, mis-sized or non-binary masks."""
    folder = Path(mask_dir) / name
    files = sorted(folder.glob("*.png"))
    if not files:
        raise DataError(f"{folder}: no mask PNGs (run `dvc repro prepare`, or check data.mask_sets)")
    masks = []
    for path in files:
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("L"))
        except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
            raise DataError(f"{path}: not a readable PNG mask ({exc}); rerun `dvc repro prepare`") from None
        if size is not None and arr.shape != (size, size):
            raise DataError(f"{path}: mask is {arr.shape[1]}x{arr.shape[0]}, images are {size}x{size}")
        if not np.isin(arr, (0, 255)).all():
            raise DataError(f"{path}: mask is not binary (values other than 0 and 255)")
        masks.append(arr == 255)
    return np.stack(masks)
