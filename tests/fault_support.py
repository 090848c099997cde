"""Fast inputs for the fault and bad-input tests: prepared blobs, an untrained tiny VAE, its latent
cache and an untrained denoiser, written directly (no training stage, no MLflow run), in about a
second."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from diffmodels.core.config import load_params
from diffmodels.core.io import write_json
from diffmodels.data import latent_cache
from diffmodels.data.datasets import load_split
from diffmodels.data.masks import write_mask_sets
from diffmodels.diffusion.denoiser import save_denoiser
from diffmodels.models.unet import UNet, UNetConfig
from diffmodels.models.vae import VAE, VAEConfig, save_vae
from diffmodels.training.ema import EMA
from tests.vae_support import ROOT, tiny_params, tiny_prepared

# train_ddpm at 2x2 latents: 30 steps, checkpoints at 10, 20, 30; little logging so that the
# steps, not MLflow, set the pace.
FAST_DDPM = {
    "num_steps": 50, "base_channels": 8, "channel_mult": [1, 2], "blocks_per_level": 1, "norm_groups": 4,
    "mixer_downsample": [1, 2], "ssm_state": 4, "steps": 30, "warmup_steps": 2, "batch_size": 8,
    "checkpoint_every": 10, "log_every": 10, "sample_every": 1000, "sample_steps": 3, "device": "cpu",
}


def tiny_workdir(root: Path, ddpm: dict | None = None) -> Path:
    """``root/{params.yaml, prepared/, masks/, vae.safetensors, latents/, ddpm.safetensors}``."""
    root.mkdir(parents=True, exist_ok=True)
    tiny_prepared(root / "prepared")
    params_path = tiny_params(root / "params.yaml")
    raw = yaml.safe_load(params_path.read_text())
    raw["ddpm"] = {**raw["ddpm"], **FAST_DDPM, **(ddpm or {})}
    raw["data"] = {**raw["data"], "resolution": 16, "masks_per_set": 4, "mask_sets": ["centre_aligned"]}
    raw["inpaint"] = {**raw["inpaint"], "num_images": 2, "methods": ["clamp_mean"], "ddim_steps": 3}
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(params_path)
    write_mask_sets(root / "masks", ("centre_aligned",), 4, 16, seed=0)

    torch.manual_seed(0)
    vae = VAE(VAEConfig.from_params(params.vae, in_channels=1, latent_channels=params.latents.channels)).eval()
    save_vae(root / "vae.safetensors", vae)
    scale = 1.0
    with torch.no_grad():
        for split in ("train", "val", "test"):
            images = load_split(root / "prepared", split)
            mean, logvar = latent_cache.encode_images(vae, images.images, 16, torch.device("cpu"))
            if split == "train":
                scale = latent_cache.scale_factor(mean)
            latent_cache.write_split(root / "latents" / f"{split}.safetensors", mean, logvar, images.labels.copy(),
                                {"split": split, "scale_factor": scale})
    write_json(root / "latents" / "manifest.json", {"scale_factor": scale})

    p = params.ddpm
    cfg = UNetConfig.from_params(p, in_channels=params.latents.channels, latent_size=2, num_classes=0)
    unet = UNet(cfg)
    save_denoiser(root / "ddpm.safetensors", unet, EMA(unet, 0.9).state_dict(), {
        "unet": cfg.to_dict(), "prediction": p.prediction, "scale_factor": scale, "class_names": [],
        "schedule": {"kind": p.schedule, "num_steps": p.num_steps, "beta_start": p.beta_start, "beta_end": p.beta_end},
    })
    return root


def shared_store(tmp_path_factory) -> Iterator[str]:
    """Body of a module-scoped fixture: one sqlite store for a test module, since each new store
    costs seconds of MLflow schema migrations. DVC's environment is cleared so nothing leaks in."""
    import pytest

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "DIFFMODELS_PIPELINE_ID"):
        mp.delenv(var, raising=False)
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    mp.undo()


def ddpm_args(work: Path, out: Path, params: Path | None = None) -> list[str]:
    return ["--params", str(params or work / "params.yaml"), "--latents", str(work / "latents"),
            "--vae", str(work / "vae.safetensors"), "--prepared", str(work / "prepared"),
            "--out", str(out / "ddpm.safetensors"), "--reports", str(out / "reports"),
            "--checkpoints", str(out / "ckpt")]


def stage_env(uri: str) -> dict[str, str]:
    """Environment for a stage subprocess: this checkout's code, one thread, the given store."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "DIFFMODELS_PIPELINE_ID"):
        env.pop(var, None)
    return env


def stage_command(stage: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", f"stages.{stage}", *args]
