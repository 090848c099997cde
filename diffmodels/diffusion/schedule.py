"""Gaussian diffusion in closed form (Ho et al. 2020, "Denoising Diffusion Probabilistic Models").

Steps are indexed 0..T; step 0 is the clean latent z_0, so every array below has T + 1 entries
and ``arr[t]`` is the value at step t (index 0 holds the values of the clean step: beta_0 = 0,
alpha_bar_0 = 1). diffusers counts the same steps 0..T-1 (its timestep k is our t = k + 1).

Symbols (arrays precomputed once in float64):

    beta_t          betas            noise added at step t, increasing over 1..T
    alpha_t         alphas           1 - beta_t
    alpha_bar_t     alpha_bar        prod_{s<=t} alpha_s                       (eq. 4)
    beta_tilde_t    posterior_var    beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)   (eq. 7)

Forward process (eq. 4):  z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps
Posterior (eq. 6-7):      q(z_{t-1} | z_t, z_0) = N(mu_tilde, beta_tilde_t I),
    mu_tilde = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) z_0
             + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) z_t
Parameterisations: eps (default), x0, and v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) z_0
(Salimans & Ho 2022, "Progressive Distillation", sec. 4).

The schedule holds no network: models predict from (z_t, t) and meet the schedule only in the
training loss and the samplers.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

ScheduleKind = Literal["linear", "scaled_linear", "cosine"]
Prediction = Literal["eps", "x0", "v"]


def make_betas(kind: ScheduleKind, num_steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """beta_1..beta_T as a (T,) float64 tensor.

    linear         evenly spaced from beta_start to beta_end (DDPM: 1e-4 .. 2e-2)
    scaled_linear  evenly spaced in sqrt(beta), squared (Stable Diffusion: 0.00085 .. 0.012)
    cosine         from alpha_bar(t) = cos^2(pi/2 (t/T + s)/(1 + s)), s = 0.008, each beta
                   clipped at 0.999 (Nichol & Dhariwal 2021, eq. 17); ignores the endpoints
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    if kind == "cosine":
        s = 0.008

        def alpha_bar(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((t + 1) / num_steps) / alpha_bar(t / num_steps), 0.999) for t in range(num_steps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"schedule kind must be one of 'linear', 'scaled_linear', 'cosine', got {kind!r}")


def extract(arr: Tensor, t: Tensor | int, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``arr[t]`` reshaped to broadcast against a batch of ``shape`` (B, ...), in ``dtype``."""
    t = torch.as_tensor(t, device=arr.device).long()
    out = arr[t].to(dtype)
    if out.ndim == 0:
        return out
    return out.reshape(-1, *([1] * (len(shape) - 1)))


class NoiseSchedule:
    """Precomputed float64 arrays of a discrete diffusion over steps 0..T (see module docstring)."""

    def __init__(self, betas: Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D tensor with every value in (0, 1)")
        self.num_steps = T = len(betas)
        zero = torch.zeros(1, dtype=torch.float64)
        self.betas = torch.cat([zero, betas])  # (T+1,), beta_0 = 0
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)  # alpha_bar_0 = 1
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()
        # eq. 7; at t = 0 the clean step has no posterior (0/0): define it as 0.
        denom = torch.where(self.alpha_bar < 1, 1.0 - self.alpha_bar, torch.ones_like(self.alpha_bar))
        self.posterior_var = self.betas * (1.0 - self.alpha_bar_prev) / denom
        self.posterior_coef_x0 = self.alpha_bar_prev.sqrt() * self.betas / denom
        self.posterior_coef_xt = self.alphas.sqrt() * (1.0 - self.alpha_bar_prev) / denom
        assert len(self.alpha_bar) == T + 1

    @classmethod
    def from_kind(cls, kind: ScheduleKind, num_steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> NoiseSchedule:
        return cls(make_betas(kind, num_steps, beta_start, beta_end))

    def to(self, device: torch.device | str) -> NoiseSchedule:
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
        return self

    # -- q: the forward process --------------------------------------------------------------

    def q_sample(self, z0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps (eq. 4). z0, eps: (B, ...); t: (B,) in 0..T."""
        return (
            extract(self.sqrt_alpha_bar, t, z0.shape, z0.dtype) * z0
            + extract(self.sqrt_one_minus_alpha_bar, t, z0.shape, z0.dtype) * eps
        )

    def q_posterior_mean_var(self, z0: Tensor, zt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(z_{t-1} | z_t, z_0) (eq. 6-7); t in 1..T."""
        mean = (
            extract(self.posterior_coef_x0, t, zt.shape, zt.dtype) * z0
            + extract(self.posterior_coef_xt, t, zt.shape, zt.dtype) * zt
        )
        return mean, extract(self.posterior_var, t, zt.shape, zt.dtype)

    # -- conversions between parameterisations ------------------------------------------------

    def predict_x0_from_eps(self, zt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """z_0 = (z_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (zt - extract(self.sqrt_one_minus_alpha_bar, t, zt.shape, zt.dtype) * eps) / extract(
            self.sqrt_alpha_bar, t, zt.shape, zt.dtype
        )

    def predict_eps_from_x0(self, zt: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (z_t - sqrt(alpha_bar_t) z_0) / sqrt(1 - alpha_bar_t); t in 1..T."""
        return (zt - extract(self.sqrt_alpha_bar, t, zt.shape, zt.dtype) * x0) / extract(
            self.sqrt_one_minus_alpha_bar, t, zt.shape, zt.dtype
        )

    def v_target(self, z0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) z_0."""
        return (
            extract(self.sqrt_alpha_bar, t, z0.shape, z0.dtype) * eps
            - extract(self.sqrt_one_minus_alpha_bar, t, z0.shape, z0.dtype) * z0
        )

    def to_eps_x0(self, zt: Tensor, t: Tensor, output: Tensor, prediction: Prediction) -> tuple[Tensor, Tensor]:
        """A model ``output`` in any parameterisation -> (eps_hat, x0_hat)."""
        if prediction == "eps":
            return output, self.predict_x0_from_eps(zt, t, output)
        if prediction == "x0":
            return self.predict_eps_from_x0(zt, t, output), output
        if prediction == "v":
            a = extract(self.sqrt_alpha_bar, t, zt.shape, zt.dtype)
            b = extract(self.sqrt_one_minus_alpha_bar, t, zt.shape, zt.dtype)
            # z_t = a z_0 + b eps and v = a eps - b z_0, with a^2 + b^2 = 1:
            return a * output + b * zt, a * zt - b * output
        raise ValueError(f"prediction must be one of 'eps', 'x0', 'v', got {prediction!r}")

    def training_target(self, z0: Tensor, t: Tensor, eps: Tensor, prediction: Prediction) -> Tensor:
        """What the network should output at (z_t, t) for the given parameterisation."""
        if prediction == "eps":
            return eps
        if prediction == "x0":
            return z0
        if prediction == "v":
            return self.v_target(z0, t, eps)
        raise ValueError(f"prediction must be one of 'eps', 'x0', 'v', got {prediction!r}")
