"""Helpers for the VAE tests: one intra-op thread, tiny prepared datasets and params files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from diffmodels.data.datasets import Split, write_prepared

ROOT = Path(__file__).resolve().parents[1]


def blob_images(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 1) uint8: a soft bright ellipse on a dark background per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(size * 0.25, size * 0.75, (2, n, 1, 1))
    sy, sx = rng.uniform(size * 0.1, size * 0.3, (2, n, 1, 1))
    img = np.exp(-((yy - cy) ** 2 / (2 * sy**2) + (xx - cx) ** 2 / (2 * sx**2)))
    return np.round(img * 255).astype(np.uint8)[..., None]


def tiny_prepared(out_dir: Path, size: int = 16, counts=(48, 12, 8)) -> Path:
    splits = {
        name: Split(blob_images(n, size, seed=i), np.arange(n, dtype=np.int16) % 3)
        for i, (name, n) in enumerate(zip(("train", "val", "test"), counts))
    }
    out_dir.mkdir(parents=True)
    write_prepared(out_dir, splits, ["a", "b", "c"], {"source": "test blobs"})
    return out_dir


TINY_VAE = {
    "arch": "localized", "norm_groups": 2, "freq_weight": 0.0, "disc_weight": 0.0, "disc_start": 0,
    "disc_channels": 4, "disc_layers": 2, "disc_lr": 1.0e-3,
    "base_channels": 4, "channel_mult": [1, 1, 2, 2], "blocks_per_level": 1, "se": True, "se_reduction": 2,
    "decoder_kernel": 3, "decoder_kernel_scales": [4, 2, 1], "upsample": "nearest", "loss": "l1", "beta_kl": 1.0e-4,
    "lr": 3.0e-3,
    "weight_decay": 0.0, "warmup_steps": 2, "steps": 12, "batch_size": 8, "grad_clip": 1.0, "amp": "off",
    "device": "cpu", "checkpoint_every": 4, "log_every": 1, "val_every": 6, "num_val_images": 8, "grid_images": 4,
}


def tiny_params(path: Path, vae: dict | None = None, latents: dict | None = None) -> Path:
    """The shipped params.yaml with a tiny ``vae`` group (and overrides) written to ``path``."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["vae"] = {**TINY_VAE, **(vae or {})}
    raw["latents"] = {**raw["latents"], "channels": 3, "batch_size": 5, **(latents or {})}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
