"""DDPM training objective and exponential moving average of weights (SPEC 5.4, 4.4).

Training (Ho et al. 2020, Algorithm 1): draw t ~ U{1..T} and eps ~ N(0, I), form
z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps, and regress the network output on the
target of the chosen parameterisation (eps by default; x0 or v optional) with MSE. For
classifier-free guidance (Ho & Salimans 2022) each label is replaced by the null label with
probability ``cond_dropout``.

All randomness comes from one ``torch.Generator`` on the CPU, so a run is reproducible and
resumable whatever the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathlib import Path

from diffmodels.checkpoint import load_checkpoint, load_module_state, save_checkpoint
from diffmodels.errors import CheckpointError
from diffmodels.schedule import NoiseSchedule, Prediction
from diffmodels.unet import UNet, UNetConfig


def diffusion_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    z0: Tensor,
    labels: Tensor | None,
    generator: torch.Generator,
    *,
    prediction: Prediction = "eps",
    cond_dropout: float = 0.0,
    null_label: int | None = None,
    rows: slice | None = None,
) -> Tensor:
    """Mean squared error of one batch of clean latents z0 (B, C, H, W); a scalar float32 tensor.

    With ``rows`` (data-parallel training, :mod:`diffmodels.distributed`) z0 and labels are the
    whole global batch but only ``z0[rows]`` goes through the model: the noise is drawn for all
    B rows, so ranks that share ``generator`` together take the one-process step.
    """
    b, device = z0.shape[0], z0.device
    t = torch.randint(1, schedule.num_steps + 1, (b,), generator=generator).to(device)
    eps = torch.randn(z0.shape, generator=generator, dtype=torch.float32).to(device, z0.dtype)
    drop = torch.rand(b, generator=generator).to(device) < cond_dropout  # drawn always: same RNG stream
    if rows is not None:
        z0, t, eps, drop = z0[rows], t[rows], eps[rows], drop[rows]
        labels = labels[rows] if labels is not None else None
    if labels is not None and cond_dropout > 0:
        if null_label is None:
            raise ValueError("cond_dropout > 0 needs the model's null_label")
        labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    zt = schedule.q_sample(z0, t, eps)
    output = model(zt, t, labels)
    target = schedule.training_target(z0, t, eps, prediction)
    return F.mse_loss(output.float(), target.float())


class EMA:
    """Exponential moving average of a model's parameters: theta_ema <- d theta_ema + (1 - d) theta.

    Kept in float32 whatever the training precision; buffers (none in our models' normalisation
    layers, but any running statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        self._params = {name for name, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            if name in self._params:
                self.shadow[name].lerp_(value.float(), 1.0 - self.decay)  # d * ema + (1 - d) * value
            else:
                self.shadow[name].copy_(value)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (e.g. a copy used for sampling)."""
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


# --------------------------------------------------------------------------------------------
# Weights file: denoiser + EMA weights, with everything needed to sample (nanoGPT style)
# --------------------------------------------------------------------------------------------

WEIGHTS_KIND = "ddpm"


def save_denoiser(path: str | Path, model: nn.Module, ema: EMA, meta: dict) -> None:
    """Atomically write raw (``model/*``) and EMA (``ema/*``) weights; ``meta`` must hold the
    UNet config (``unet``), the schedule (``schedule``) and the latent ``scale_factor``."""
    missing = {"unet", "schedule", "prediction", "scale_factor"} - set(meta)
    assert not missing, f"denoiser meta lacks {missing}"
    tensors = {f"model/{k}": v.float() for k, v in model.state_dict().items()}
    tensors.update({f"ema/{k}": v for k, v in ema.state_dict().items()})
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
