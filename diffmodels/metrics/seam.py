"""Seam score (docs/metrics.md#seam-score): does the mask boundary show in the output?

    seam(y, x) = (G(y) + eps) / (G(x) + eps),    eps = 1e-6,
    G(img) = mean over the band B and channels of |grad img|,
    |grad img|(p) = sqrt(g_x(p)^2 + g_y(p)^2),  g_x(i, j) = (img(i, j+1) - img(i, j-1)) / 2

(central differences, border pixels repeated, so a step of height h gives h/2 at the two
pixels beside it), on images mapped to [0, 1] and clamped; gradients are in [0, 1] units per
pixel. The band B is every pixel within 2 px of the mask boundary: kept pixels whose distance
to the nearest hole pixel is <= 2 and hole pixels whose distance to the nearest kept pixel is
<= 2 (Euclidean, ``distance_transform_edt``), i.e. two pixel rows each side of a straight
edge. 1.0 means the output is exactly as sharp around the boundary as the image (the output
equal to the image gives exactly 1.0); a visible seam adds gradient there and raises it. eps
keeps a flat image finite. NaN for an image whose mask has no boundary (all keep or all hole).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from torch import Tensor

from diffmodels.metrics.leakage import as_hole, to_unit

BAND_PX = 2
EPS = 1e-6


def boundary_band(hole: Tensor, width: int = BAND_PX) -> Tensor:
    """(B, H, W) bool: pixels within ``width`` px of the hole/keep boundary, on both sides."""
    holes = as_hole(hole).cpu().numpy()
    band = np.zeros(holes.shape, dtype=bool)
    for i, h in enumerate(holes):
        if h.any() and not h.all():
            band[i] = (~h & (distance_transform_edt(~h) <= width)) | (h & (distance_transform_edt(h) <= width))
    return torch.from_numpy(band)


def gradient_magnitude(x: Tensor) -> Tensor:
    """|grad x| (B, C, H, W) by central differences with repeated borders (module docstring)."""
    p = F.pad(x.double(), (1, 1, 1, 1), mode="replicate")
    gx = (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / 2
    gy = (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / 2
    return (gx**2 + gy**2).sqrt()


def seam_score(output: Tensor, image: Tensor, hole: Tensor, width: int = BAND_PX) -> Tensor:
    """Seam score of each output (B,) float64: band gradient of ``output`` over that of ``image``;
    both (B, C, H, W) in [-1, 1], ``hole`` (B, H, W) True = hole."""
    band = boundary_band(hole, width).to(output.device)[:, None].double()  # (B, 1, H, W)
    area = band.sum(dim=(1, 2, 3)) * output.shape[1]

    def band_mean(x: Tensor) -> Tensor:
        return (gradient_magnitude(to_unit(x)) * band).sum(dim=(1, 2, 3)) / area.clamp(min=1)

    score = (band_mean(output) + EPS) / (band_mean(image) + EPS)
    return torch.where(area > 0, score, torch.full_like(score, math.nan))
