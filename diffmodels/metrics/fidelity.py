"""Preserved-region fidelity (docs/metrics.md#preserved-region-fidelity): how well the kept pixels survive inpainting.

All three metrics compare the inpainted output with a reference, (a) the image x or (b) its
VAE reconstruction D(E(x)) (:func:`diffmodels.diffusion.inpaint.reconstruct`), over the kept pixels
K = ~hole only (``hole`` True = hole, as :mod:`diffmodels.data.masks`). Images (B, C, H, W) in
[-1, 1] are mapped to [0, 1] and clamped first (:func:`diffmodels.metrics.leakage.to_unit`),
so the data range is 1. Each function returns one value per image, (B,) float64:

    MAE   = mean_{p in K, c} |y - r|                                  (0..1 units)
    PSNR  = 10 log10(1 / max(MSE, 1e-10)),  MSE = mean_{p in K, c} (y - r)^2    (dB, capped at 100)
    SSIM  = mean_{p in K, c} SSIM map(y, r)(p)                        (unitless, <= 1)

The SSIM map is Wang et al. 2004 (eq. 13) with an 11x11 Gaussian window of sigma 1.5,
C1 = (0.01)^2, C2 = (0.03)^2, per channel, computed on the whole image with reflect padding so
every pixel has a value; the masked mean then keeps only kept pixels. Its unmasked mean is
torchmetrics' SSIM with the same settings (which averages the same reflect-padded map). The PSNR cap
keeps a perfect match (an all-keep clamp_mean against D(E(x))) a finite number in JSON.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffmodels.metrics.leakage import as_hole, to_unit

PSNR_CAP_DB = 100.0
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _keep_weights(hole: Tensor, like: Tensor) -> Tensor:
    """(B, 1, H, W) float64 1 on kept pixels; raises if an image keeps nothing."""
    keep = (~as_hole(hole)).to(like.device)[:, None].double()
    if (keep.sum(dim=(1, 2, 3)) == 0).any():
        raise ValueError("an image has no kept pixels: preserved-region fidelity is undefined")
    return keep


def _masked_mean(values: Tensor, keep: Tensor) -> Tensor:
    """Mean of (B, C, H, W) ``values`` over kept pixels and channels -> (B,) float64."""
    w = keep.expand_as(values)
    return (values.double() * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3))


def masked_mae(output: Tensor, reference: Tensor, hole: Tensor) -> Tensor:
    """MAE over kept pixels, [0, 1] units, (B,)."""
    return _masked_mean((to_unit(output) - to_unit(reference)).abs(), _keep_weights(hole, output))


def masked_psnr(output: Tensor, reference: Tensor, hole: Tensor) -> Tensor:
    """PSNR over kept pixels in dB with data range 1, (B,); capped at 100 dB (MSE floored at 1e-10)."""
    mse = _masked_mean((to_unit(output) - to_unit(reference)) ** 2, _keep_weights(hole, output))
    return 10.0 * torch.log10(1.0 / mse.clamp(min=10 ** (-PSNR_CAP_DB / 10)))


def ssim_map(a: Tensor, b: Tensor) -> Tensor:
    """Per-pixel SSIM (B, C, H, W) of images ``a``, ``b`` already in [0, 1] (module docstring)."""
    a, b = a.double(), b.double()
    channels, pad = a.shape[1], SSIM_WINDOW // 2
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=a.device) - pad
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(t: Tensor) -> Tensor:  # Gaussian-weighted local mean, same size
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def masked_ssim(output: Tensor, reference: Tensor, hole: Tensor) -> Tensor:
    """SSIM map averaged over kept pixels and channels, (B,)."""
    return _masked_mean(ssim_map(to_unit(output), to_unit(reference)), _keep_weights(hole, output))


def preserved_fidelity(output: Tensor, image: Tensor, reconstruction: Tensor, hole: Tensor) -> dict[str, Tensor]:
    """PSNR, SSIM and MAE of ``output`` over kept pixels against the image and against D(E(x)),
    each (B,): keys ``psnr_image``, ``ssim_image``, ``mae_image``, ``psnr_recon``, ``ssim_recon``,
    ``mae_recon``."""
    out = {}
    for name, ref in (("image", image), ("recon", reconstruction)):
        out[f"psnr_{name}"] = masked_psnr(output, ref, hole)
        out[f"ssim_{name}"] = masked_ssim(output, ref, hole)
        out[f"mae_{name}"] = masked_mae(output, ref, hole)
    return out
