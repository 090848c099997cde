"""VAE reconstruction quality next to reference rows (docs/metrics.md#vae-reconstruction-quality).

PSNR and SSIM reward blur: a slightly blurred reconstruction can score well on both and still
look soft. This module puts the reconstructions on one scale with references computed by the
same code in the same run, so "how sharp" and "how real" read against known anchors:

    real    the originals themselves                        (the floor of rFID / rKID at this n)
    blur3   the originals box-blurred 3 x 3                 (visibly soft)
    blur5   the originals box-blurred 5 x 5                 (clearly blurred)
    vae     the VAE reconstructions D(mean of E(x))

Every row is scored against the same **disjoint** real set (the test-split features of the
``fid_reference`` stage; the originals are validation images), so the ``real`` row is the
distance between two real samples of these sizes: rFID / rKID of a row near ``real`` means the
network cannot tell that set from real images. Per row:

    rfid, rkid_mean, rkid_std   :func:`diffmodels.metrics.fid.fid_kid` against the disjoint set
    rfid_low / _high, rkid_...  seeded bootstrap 95% intervals over the row's images
    psnr, ssim                  against the originals, :class:`diffmodels.data.latent_cache.ReconMetrics`
                                (torchmetrics, data range 1; PSNR of the whole-set MSE, SSIM
                                averaged over images), the numbers train_vae reports; ``None`` for
                                ``real`` (a set against itself: PSNR infinite, SSIM 1)
    grad_ratio                  mean gradient magnitude of the set / that of the originals
    hf_ratio                    high-frequency energy fraction of the set / that of the originals
    n                           images in the set (``num_real``: in the disjoint set)

Both sharpness ratios are 1.0 for a set as sharp as the originals and fall below 1 as it
blurs; the ``real`` row gets them only when the disjoint set's pixels are given.

Box blur (:func:`box_blur`): the mean of the k x k neighbourhood with **reflect** padding (the
border pixel is not repeated: row -1 is row 1), rounded to the nearest uint8 (ties to even).

Gradient magnitude (:func:`mean_gradient`): images in [0, 1], forward differences
``dx = x[i, j+1] - x[i, j]``, ``dy = x[i+1, j] - x[i, j]`` on the (H-1) x (W-1) pixels having
both, ``sqrt(dx^2 + dy^2)`` averaged over pixels, channels and images.

High-frequency energy fraction (:func:`high_frequency_fraction`): per image and channel the
mean is subtracted and ``|FFT2|^2`` taken; frequencies ``(fy, fx)`` in cycles per pixel (each in
[-0.5, 0.5)) with ``sqrt(fy^2 + fx^2) > radius`` (default 0.125, a quarter of the Nyquist
frequency: periods shorter than 8 px) are high. The fraction is the high energy over the total,
both summed over the whole set (so flat images weigh nothing instead of dividing by zero). Not
0.25: a box filter's response has side lobes (the 3 x 3 one is zero at 1/3 cycle/px, the 5 x 5 one
at 0.2 and 0.4), and above 0.25 the 5 x 5 blur keeps as large a *fraction* as the 3 x 3 one, since
it removes more of the total too; from 0.125 the fraction falls with the blur as it should.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffmodels.data.images import tensor_copy, to_model_range
from diffmodels.data.latent_cache import ReconMetrics
from diffmodels.metrics.fid import EXTRACTOR, fid_kid
from diffmodels.metrics.intervals import fid_interval, kid_interval

BLUR_PADDING = "reflect"
HF_RADIUS = 0.125  # cycles per pixel (Nyquist is 0.5): periods under 8 px
BLUR_ROWS = {"blur3": 3, "blur5": 5}
ROWS = ("real", "blur3", "blur5", "vae")
ROW_KEYS = ("rfid", "rfid_low", "rfid_high", "rkid_mean", "rkid_low", "rkid_high", "psnr", "ssim", "grad_ratio",
            "hf_ratio", "n")


def _uint8_nhwc(images: np.ndarray | Tensor, name: str = "images") -> Tensor:
    x = tensor_copy(images)
    if x.ndim != 4 or x.dtype != torch.uint8:
        raise ValueError(f"{name} must be (N, H, W, C) uint8, got {tuple(x.shape)} {x.dtype}")
    return x


def box_blur(images: np.ndarray | Tensor, k: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> the same shape, each pixel the mean of its k x k neighbourhood
    (k odd, reflect padding, rounded half to even)."""
    if k < 1 or k % 2 == 0:
        raise ValueError(f"box blur size must be odd and >= 1, got {k}")
    x = _uint8_nhwc(images).permute(0, 3, 1, 2).double()
    pad = k // 2
    if pad and min(x.shape[2:]) <= pad:
        raise ValueError(f"images of {tuple(x.shape[2:])} pixels are too small for a {k} x {k} reflect blur")
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), mode=BLUR_PADDING)
    x = F.avg_pool2d(x, k, stride=1)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _unit(images: np.ndarray | Tensor) -> Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float64 in [0, 1]."""
    return _uint8_nhwc(images).permute(0, 3, 1, 2).double() / 255.0


def mean_gradient(images: np.ndarray | Tensor) -> float:
    """Mean forward-difference gradient magnitude of (N, H, W, C) uint8 images in [0, 1] units."""
    x = _unit(images)
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    return float(torch.sqrt(dx**2 + dy**2).mean())


def high_frequency_fraction(images: np.ndarray | Tensor, radius: float = HF_RADIUS) -> float:
    """Fraction of the (mean-removed) spectral energy of the set above ``radius`` cycles/pixel."""
    x = _unit(images)
    x = x - x.mean(dim=(2, 3), keepdim=True)
    power = torch.fft.fft2(x).abs() ** 2
    fy = torch.fft.fftfreq(x.shape[2], dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(x.shape[3], dtype=torch.float64)[None, :]
    high = (fy**2 + fx**2).sqrt() > radius
    total = float(power.sum())
    return float(power[..., high].sum()) / total if total > 0 else 0.0


def sharpness(images: np.ndarray | Tensor, radius: float = HF_RADIUS) -> dict[str, float]:
    """``{"grad": mean_gradient, "hf": high_frequency_fraction}`` of a set."""
    return {"grad": mean_gradient(images), "hf": high_frequency_fraction(images, radius)}


def sharpness_ratios(images: np.ndarray | Tensor, originals: np.ndarray | Tensor | dict[str, float],
                     radius: float = HF_RADIUS) -> dict[str, float]:
    """``grad_ratio`` and ``hf_ratio`` of ``images`` relative to ``originals`` (a set, or its
    :func:`sharpness`): 1.0 = as sharp as the originals."""
    ref = originals if isinstance(originals, dict) else sharpness(originals, radius)
    own = sharpness(images, radius)
    return {f"{k}_ratio": own[k] / ref[k] if ref[k] > 0 else float("nan") for k in ("grad", "hf")}


def _psnr_ssim(originals: Tensor, images: Tensor) -> dict[str, float]:
    metrics = ReconMetrics()
    metrics.update(originals, to_model_range(images))
    return metrics.compute()


def reconstruction_rows(
    originals: np.ndarray | Tensor,
    reconstructions: np.ndarray | Tensor,
    real_features: Tensor,
    features: Callable[[np.ndarray], Tensor],
    real_images: np.ndarray | Tensor | None = None,
    kid_subsets: int = 100,
    seed: int = 0,
    radius: float = HF_RADIUS,
    fid_bootstrap: int = 50,
) -> dict[str, dict]:
    """The rows ``real``, ``blur3``, ``blur5``, ``vae`` (module docstring) as
    ``{row: {rfid, rfid_low, rfid_high, rkid_mean, rkid_std, rkid_low, rkid_high, psnr, ssim,
    grad_ratio, hf_ratio, n}}``; ``*_low`` / ``*_high``: seeded bootstrap 95% intervals over the
    row's images (:mod:`diffmodels.metrics.intervals`, ``fid_bootstrap`` resamples; KID's
    ``rkid_std`` is 0 when the KID subset is the whole set, the interval is not).

    ``originals`` and ``reconstructions``: (N, H, W, C) uint8, image i of one the reconstruction of
    image i of the other. ``real_features``: (M, 2048) Inception features of a real set disjoint
    from the originals. ``features``: uint8 images -> (N, 2048) features by the same network
    (e.g. ``lambda x: inception_features(x, extractor, batch_size)``). ``real_images``: the
    disjoint set's pixels, for the ``real`` row's sharpness ratios (``None`` leaves them out).
    Every KID uses ``seed``, so rows differ by their images only.
    """
    originals = _uint8_nhwc(originals, "originals")
    reconstructions = _uint8_nhwc(reconstructions, "reconstructions")
    if reconstructions.shape != originals.shape:
        raise ValueError(f"reconstructions {tuple(reconstructions.shape)} and originals "
                         f"{tuple(originals.shape)} differ in shape")
    ref = sharpness(originals, radius)
    sets = {"real": originals,
            **{name: torch.from_numpy(box_blur(originals, k)) for name, k in BLUR_ROWS.items()},
            "vae": reconstructions}
    rows: dict[str, dict] = {}
    for name, images in sets.items():
        feats = features(images.numpy())
        scores = fid_kid(real_features, feats, kid_subsets=kid_subsets, seed=seed)
        fid = fid_interval(real_features, feats, num_resamples=fid_bootstrap, seed=seed, fid=scores["fid"])
        kid = kid_interval(real_features, feats, scores["kid_mean"], num_resamples=max(fid_bootstrap, 100), seed=seed)
        row = {"rfid": scores["fid"], "rfid_low": fid["low"], "rfid_high": fid["high"],
               "rkid_mean": scores["kid_mean"], "rkid_std": scores["kid_std"], "rkid_low": kid["low"],
               "rkid_high": kid["high"]}
        if name == "real":
            row.update(psnr=None, ssim=None)
            row.update(sharpness_ratios(real_images, ref, radius) if real_images is not None
                       else {"grad_ratio": None, "hf_ratio": None})
        else:
            row.update(_psnr_ssim(originals, images))
            row.update(sharpness_ratios(images, ref, radius))
        row.update(n=len(images), num_real=len(real_features), kid_subset_size=scores["kid_subset_size"])
        rows[name] = row
    return rows


def flat_metrics(rows: dict[str, dict], digits: int = 5) -> dict:
    """``{"<row>/<key>": value}`` (rounded) for metrics.json, plus the extractor and definitions."""
    out: dict = {}
    for name, row in rows.items():
        for key, value in row.items():
            out[f"{name}/{key}"] = round(value, digits) if isinstance(value, float) else value
    out.update(extractor=EXTRACTOR, blur_padding=BLUR_PADDING, hf_radius_cycles_per_px=HF_RADIUS)
    return out


def rows_table(rows: dict[str, dict]) -> str:
    """The rows as a tab-separated table (header + one line per row; empty cell = not defined)."""
    keys = ROW_KEYS

    def cell(v) -> str:
        return "" if v is None else f"{v:.5g}" if isinstance(v, float) else str(v)

    lines = ["\t".join(("row", *keys))]
    lines += ["\t".join((name, *(cell(row.get(k)) for k in keys))) for name, row in rows.items()]
    return "\n".join(lines) + "\n"
