"""The trained denoiser's weights file: raw and EMA weights with everything needed to sample
(UNet config, noise schedule, prediction target, latent scale factor) in its header."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from diffmodels.core.checkpoint import (
    load_checkpoint,
    load_module_state,
    save_checkpoint,
)
from diffmodels.core.errors import CheckpointError
from diffmodels.diffusion.schedule import NoiseSchedule
from diffmodels.models.unet import UNet, UNetConfig

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
