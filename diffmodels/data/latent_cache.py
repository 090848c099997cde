"""Latent cache (docs/design.md#stage-contracts): posterior moments of every split under a frozen
VAE, and the scale.

Layout of the cache directory (written whole by :func:`write_cache`)::

    <dir>/train.safetensors   tensors mean, logvar (N, C, h, w) float32; labels (N,) int16
    <dir>/val.safetensors     (same)
    <dir>/test.safetensors    (same)
    <dir>/manifest.json       scale_factor, per-channel stats, VAE config and weights digest

Scale factor
    ``scale_factor = 1 / std(train posterior means)``, the population standard deviation
    (ddof = 0) over *all* N * C * h * w elements of the training split's means, computed in
    float64 and not centred, the role of SD's 0.18215. Diffusion models train on
    ``z = mean * scale_factor`` (or a sample of the posterior times it) and divide by it before
    decoding.

Reconstruction metrics (:class:`ReconMetrics`) are torchmetrics' PSNR and SSIM with
``data_range=1`` on images in [0, 1], PSNR from the MSE accumulated over the whole set, SSIM
averaged over images. ``train_vae``'s final validation and ``cache_latents`` both decode the
posterior means through :func:`decode_latents` in batches of ``latents.batch_size``, so the
two stages report the same number.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmodels.core.checkpoint import load_checkpoint, save_checkpoint
from diffmodels.core.device import evaluating
from diffmodels.core.errors import DataError
from diffmodels.data.images import make_grid, tensor_copy, to_model_range, to_uint8, to_unit_range
from diffmodels.models.vae import VAE

FORMAT = "diffmodels-latents/1"
SCALE_FACTOR_DEFINITION = (
    "1 / std of the train split's posterior means over all N*C*h*w elements "
    "(population std, ddof=0, float64, not centred)"
)


def _batches(n: int, batch_size: int, progress: Callable[[Iterable], Iterable]) -> Iterable[slice]:
    return progress([slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)])


@torch.no_grad()
def encode_images(
    vae: VAE, images: np.ndarray, batch_size: int, device: torch.device, progress: Callable[[Iterable], Iterable] = iter
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, H, W, C) -> posterior mean, logvar, each (N, C_lat, H/8, W/8) float32 on CPU."""
    means, logvars = [], []
    for sl in _batches(len(images), batch_size, progress):
        x = to_model_range(tensor_copy(images[sl])).to(device)
        mean, logvar = vae.encode(x)
        means.append(mean.float().cpu())
        logvars.append(logvar.float().cpu())
    return torch.cat(means), torch.cat(logvars)


@torch.no_grad()
def decode_latents(
    vae: VAE, z: torch.Tensor, batch_size: int, device: torch.device, progress: Callable[[Iterable], Iterable] = iter
) -> Iterable[tuple[slice, torch.Tensor]]:
    """Yield (slice, x_hat) with x_hat (b, C, H, W) float32 on CPU in model range, batch by batch."""
    for sl in _batches(len(z), batch_size, progress):
        yield sl, vae.decode(z[sl].to(device)).float().cpu()


class ReconMetrics:
    """Streaming PSNR (over the whole set) and mean SSIM of reconstructions, data_range=1."""

    def __init__(self) -> None:
        # Imported here: torchmetrics pulls in transformers, half the start-up time of train_ddpm
        # (which never computes these) and of each extra training process.
        from torchmetrics.image import (
            PeakSignalNoiseRatio,
            StructuralSimilarityIndexMeasure,
        )

        # One process computes these (rank 0 under data-parallel training): torchmetrics would
        # otherwise all-gather its state over the process group and wait for the other ranks.
        self.psnr = PeakSignalNoiseRatio(data_range=1.0, sync_on_compute=False)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False)

    def update(self, images: np.ndarray | torch.Tensor, x_hat: torch.Tensor) -> None:
        """images uint8 (b, H, W, C); x_hat (b, C, H, W) in model range [-1, 1]."""
        target = to_unit_range(to_model_range(tensor_copy(images)))
        preds = to_unit_range(x_hat)
        self.psnr.update(preds, target)
        self.ssim.update(preds, target)

    def compute(self) -> dict[str, float]:
        return {"psnr": float(self.psnr.compute()), "ssim": float(self.ssim.compute())}


def reconstruction_metrics(
    vae: VAE, images: np.ndarray, batch_size: int, device: torch.device, progress: Callable[[Iterable], Iterable] = iter
) -> dict[str, float]:
    """PSNR/SSIM of decode(posterior mean) against ``images`` (uint8 (N, H, W, C)); eval mode."""
    was_training = vae.training
    vae.eval()
    try:
        mean, _ = encode_images(vae, images, batch_size, device, progress)
        return metrics_from_latents(vae, mean, images, batch_size, device)
    finally:
        vae.train(was_training)


def metrics_from_latents(
    vae: VAE, mean: torch.Tensor, images: np.ndarray, batch_size: int, device: torch.device
) -> dict[str, float]:
    """PSNR/SSIM of decode(``mean``) against ``images``: the reconstruction through the cache."""
    metrics = ReconMetrics()
    for sl, x_hat in decode_latents(vae, mean, batch_size, device):
        metrics.update(images[sl], x_hat)
    return metrics.compute()


def recon_grid(vae: VAE, images: np.ndarray, device: torch.device, ncol: int = 8) -> np.ndarray:
    """Rows of ``images`` (uint8 (N, H, W, C)) each followed by a row of their reconstructions
    (decode of the posterior mean), tiled into one uint8 image; eval mode, one batch."""
    with evaluating(vae):
        x = to_model_range(tensor_copy(images)).to(device)
        recon = to_uint8(vae.decode(vae.encode(x)[0])).cpu().numpy()
    rows = []
    for i in range(0, len(images), ncol):
        rows += [images[i:i + ncol], recon[i:i + ncol]]
    return make_grid(np.concatenate(rows), ncol=min(ncol, len(images)))


def scale_factor(train_means: torch.Tensor) -> float:
    """1 / population std of all elements of the training posterior means (float64)."""
    std = train_means.double().std(correction=0).item()
    if not np.isfinite(std) or std <= 0:
        raise DataError(f"training latents have std {std}; the VAE is degenerate, retrain it")
    return 1.0 / std


def channel_stats(means: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel mean and population std of (N, C, h, w) latents."""
    m = means.double().transpose(0, 1).reshape(means.shape[1], -1)  # (C, N*h*w)
    return {"mean": m.mean(1).tolist(), "std": m.std(1, correction=0).tolist()}


def write_split(path: Path, mean: torch.Tensor, logvar: torch.Tensor, labels: np.ndarray, info: dict[str, Any]) -> None:
    tensors = {"mean": mean, "logvar": logvar, "labels": torch.from_numpy(np.array(labels, dtype=np.int16))}  # a copy: labels may be a read-only memmap
    save_checkpoint(path, tensors, {"format": FORMAT, **info})


def read_scale_factor(cache_dir: str | Path) -> float:
    """The cache's ``scale_factor`` (module docstring) from its ``manifest.json``."""
    path = Path(cache_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: latent cache missing; run `dvc repro cache_latents`")
    return float(json.loads(path.read_text())["scale_factor"])


def load_split(cache_dir: str | Path, split: str) -> dict[str, torch.Tensor]:
    """{"mean", "logvar", "labels"} of one cached split (see the module docstring)."""
    path = Path(cache_dir) / f"{split}.safetensors"
    if not path.is_file():
        raise DataError(f"{path}: latent cache missing; run `dvc repro cache_latents`")
    ckpt = load_checkpoint(path)
    if ckpt.meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a latent cache file (format {ckpt.meta.get('format')!r})")
    return ckpt.tensors
