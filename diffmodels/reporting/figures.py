"""Figures for people: labelled image grids (matplotlib) and the small image operations they need.

Every sampling figure (denoising strip, forward-diffusion strip, "why iterate", guidance rows,
visual anagram) is a table of images with row and column labels: :func:`labelled_grid` draws
one, so the stages only decide what goes in the cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

from diffmodels.core.io import atomic_path  # noqa: E402


def labelled_grid(
    cells: Sequence[Sequence[np.ndarray]],
    path: str | Path,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    cell_inches: float = 1.1,
) -> None:
    """Save a PNG of ``cells[r][c]`` images ((H, W) or (H, W, C) uint8) with labels, atomically."""
    n_rows, n_cols = len(cells), max(len(r) for r in cells)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell_inches * n_cols + 1.2, cell_inches * n_rows + 0.6),
                             squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(cells[r]):
                img = cells[r][c]
                img = img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            if r == 0 and col_labels is not None and c < len(col_labels):
                ax.set_title(col_labels[c], fontsize=8)
            if c == 0 and row_labels is not None and r < len(row_labels):
                ax.set_ylabel(row_labels[r], fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """(N, H, W, C) uint8 blurred over H and W only (the naive denoiser of the "why iterate" figure)."""
    out = gaussian_filter(images.astype(np.float64), sigma=(0, sigma, sigma, 0), mode="nearest")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def text_figure(path: str | Path, title: str, lines: Sequence[str], width_inches: float = 8.0) -> None:
    """A PNG of a few lines of wrapped text, for a figure slot that has nothing to show (a stage
    that skipped says why where its images would be)."""
    import textwrap

    wrapped = [w for line in lines for w in (textwrap.wrap(line, width=int(width_inches * 11)) or [""])]
    fig = plt.figure(figsize=(width_inches, 0.8 + 0.22 * len(wrapped)))
    fig.text(0.02, 0.98, title, fontsize=11, weight="bold", va="top")
    fig.text(0.02, 0.98 - 0.35 / fig.get_figheight(), "\n".join(wrapped), fontsize=8, va="top", family="monospace")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
