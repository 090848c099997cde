"""The DDPM training objective (docs/maths.md#diffusion).

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

from diffmodels.diffusion.schedule import NoiseSchedule, Prediction


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

    With ``rows`` (data-parallel training, :mod:`diffmodels.training.distributed`) z0 and labels are the
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


# --------------------------------------------------------------------------------------------
# Weights file: denoiser + EMA weights, with everything needed to sample (nanoGPT style)
# --------------------------------------------------------------------------------------------


