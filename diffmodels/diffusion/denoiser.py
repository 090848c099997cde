"""The trained denoiser's weights file: raw and EMA weights with everything needed to sample
(UNet config, noise schedule, prediction target, latent scale factor) in its header; and the
strip of samples that shows how training goes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from diffmodels.core.checkpoint import (
    load_checkpoint,
    load_module_state,
    save_checkpoint,
)
from diffmodels.core.errors import CheckpointError
from diffmodels.data.images import to_uint8
from diffmodels.diffusion.samplers import classifier_free_guidance, ddim_steps
from diffmodels.diffusion.samplers import run as run_sampler
from diffmodels.diffusion.schedule import NoiseSchedule
from diffmodels.models.unet import UNet, UNetConfig
from diffmodels.models.vae import VAE

WEIGHTS_KIND = "ddpm"


def save_denoiser(path: str | Path, model: nn.Module, ema_weights: dict[str, Tensor], meta: dict) -> None:
    """Atomically write raw (``model/*``) and EMA (``ema/*``, from ``EMA.state_dict()``) weights; ``meta`` must hold the
    UNet config (``unet``), the schedule (``schedule``) and the latent ``scale_factor``."""
    missing = {"unet", "schedule", "prediction", "scale_factor"} - set(meta)
    assert not missing, f"denoiser meta lacks {missing}"
    tensors = {f"model/{k}": v.float() for k, v in model.state_dict().items()}
    tensors.update({f"ema/{k}": v for k, v in ema_weights.items()})
    save_checkpoint(path, tensors, {"kind": WEIGHTS_KIND, **meta})


def load_denoiser(path: str | Path, device: str | torch.device = "cpu", weights: str = "ema") -> tuple[UNet, NoiseSchedule, dict]:
    """Rebuild the UNet from a file written by :func:`save_denoiser` -> (model in eval mode,
    NoiseSchedule, meta). ``weights`` picks ``ema`` (default, for sampling) or ``model``."""
    ckpt = load_checkpoint(path)
    if ckpt.meta.get("kind") != WEIGHTS_KIND:
        raise CheckpointError(f"{path}: not denoiser weights (kind {ckpt.meta.get('kind')!r}); run `dvc repro train_ddpm`")
    try:
        model = UNet(UNetConfig.from_dict(ckpt.meta["unet"]))
        s = ckpt.meta["schedule"]
        schedule = NoiseSchedule.from_kind(s["kind"], s["num_steps"], s["beta_start"], s["beta_end"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: denoiser config in the header is invalid ({exc})") from None
    prefix = f"{weights}/"
    load_module_state(model, {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}, path)
    return model.to(device).eval(), schedule.to(device), ckpt.meta


@torch.no_grad()
def sample_strip(model: UNet, schedule: NoiseSchedule, vae: VAE, scale: float, device: torch.device, *, seed: int,
                 num_images: int, num_classes: int, guidance: float, steps: int, prediction: str) -> np.ndarray:
    """Decoded DDIM samples from fixed seeds: (N, H, W, C) uint8.

    One image per class with classifier-free guidance of scale ``guidance`` when the model is
    conditional (``num_classes`` > 0), else ``num_images`` unconditional ones. The noise and the
    sampler's draws come from one generator seeded with ``seed``, so strips from different
    training steps are comparable. Latents are divided by ``scale`` before decoding.
    """
    n = num_classes or num_images
    c, size = model.config.in_channels, model.config.latent_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g).to(device)
    if num_classes:
        labels = torch.arange(num_classes, device=device)
        denoise = classifier_free_guidance(model, labels, model.null_label, guidance)
    else:
        denoise = lambda z, t: model(z, t)  # noqa: E731
    z0 = run_sampler(ddim_steps(denoise, x, schedule, num_steps=steps, prediction=prediction, generator=g))
    return to_uint8(vae.decode(z0 / scale)).cpu().numpy()
