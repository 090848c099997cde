"""Samplers: small functions sharing one signature (k-diffusion style).

    steps = ddpm_steps(denoise_fn, x_T, schedule, *, prediction=..., generator=...)

``denoise_fn(x, t)`` is any network or wrapper mapping latents x (B, ...) at integer steps
t (B,) in 1..T to its output in the ``prediction`` parameterisation (eps, x0 or v; see
:mod:`diffmodels.diffusion.schedule`). Guidance (:func:`classifier_free_guidance`), inpainting clamps and
anagram flips wrap ``denoise_fn`` or act on the yielded steps; they never fork a sampler.

Each sampler is a generator that yields a :class:`Step` after every update (the progressive
form, for denoising strips and inpainting callbacks); :func:`run` drains one and returns the
final sample. The generators are loops over single updates, :func:`ddpm_step` and
:func:`ddim_step`, which methods that edit z between updates (inpainting clamps, RePaint's
jumps back up) call directly. All randomness comes from the ``generator`` argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from diffmodels.diffusion.schedule import NoiseSchedule, Prediction, extract

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
FinalAlphaBar = Literal["one", "first"]  # where DDIM's last step lands: alpha_bar_0 = 1 or alpha_bar_1


@dataclass
class Step:
    """The state after one update: ``x`` is z_{t_prev}; ``x0`` and ``eps`` are the estimates at t."""

    t: int
    t_prev: int
    x: Tensor
    x0: Tensor
    eps: Tensor


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


Variance = Literal["beta", "posterior"]


def ddpm_step(
    denoise_fn: DenoiseFn,
    x: Tensor,
    t: int,
    schedule: NoiseSchedule,
    *,
    prediction: Prediction = "eps",
    variance: Variance = "beta",
    generator: torch.Generator | None = None,
) -> Step:
    """One ancestral DDPM update z_t -> z_{t-1} (Ho et al. 2020, Algorithm 2, line 4):

        z_{t-1} = (z_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_t) + sigma_t n   (eq. 11)

    with fresh noise n (one draw from ``generator``) only when t > 1, and sigma_t^2 = beta_t
    (``variance="beta"``) or the posterior variance beta_tilde_t (``"posterior"``).
    ``x`` is z_t (B, ...), t in 1..T; one denoiser call.
    """
    if variance not in ("beta", "posterior"):
        raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
    if not 1 <= t <= schedule.num_steps:
        raise ValueError(f"DDPM step t must be in 1..{schedule.num_steps}, got {t}")
    sigma2 = schedule.betas if variance == "beta" else schedule.posterior_var
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    eps, x0 = schedule.to_eps_x0(x, tt, denoise_fn(x, tt), prediction)
    coef = extract(schedule.betas / schedule.sqrt_one_minus_alpha_bar.clamp(min=1e-30), t, x.shape, x.dtype)
    mean = (x - coef * eps) / extract(schedule.alphas.sqrt(), t, x.shape, x.dtype)
    x = mean + extract(sigma2.sqrt(), t, x.shape, x.dtype) * _noise_like(x, generator) if t > 1 else mean
    return Step(t=t, t_prev=t - 1, x=x, x0=x0, eps=eps)


def ddpm_steps(
    denoise_fn: DenoiseFn,
    x: Tensor,
    schedule: NoiseSchedule,
    *,
    prediction: Prediction = "eps",
    variance: Variance = "beta",
    generator: torch.Generator | None = None,
) -> Iterator[Step]:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2): :func:`ddpm_step` from t = T down
    to 1. ``x`` is z_T (B, ...)."""
    for t in range(schedule.num_steps, 0, -1):
        step = ddpm_step(denoise_fn, x, t, schedule, prediction=prediction, variance=variance, generator=generator)
        x = step.x
        yield step


def ddim_timesteps(num_steps: int, num_train_steps: int) -> list[int]:
    """Evenly spaced steps from T down, ending above 0 ("trailing" spacing: Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2), so sampling starts
    from pure noise at t = T. E.g. (5, 1000) -> [1000, 800, 600, 400, 200]."""
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"DDIM steps must be in 1..{num_train_steps}, got {num_steps}")
    ratio = num_train_steps / num_steps
    return [round(num_train_steps - i * ratio) for i in range(num_steps)]


def ddim_steps(
    denoise_fn: DenoiseFn,
    x: Tensor,
    schedule: NoiseSchedule,
    *,
    num_steps: int = 50,
    eta: float = 0.0,
    prediction: Prediction = "eps",
    generator: torch.Generator | None = None,
    timesteps: list[int] | None = None,
    final_alpha_bar: FinalAlphaBar = "one",
) -> Iterator[Step]:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12):

        z_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps_hat + sigma n
        sigma  = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)

    over ``timesteps`` (default :func:`ddim_timesteps`). eta = 0 is deterministic; eta = 1
    matches DDPM's posterior variance. Noise is drawn only when sigma > 0.

    The last step lands on ``final_alpha_bar``:

    "one"    t_prev = 0, alpha_bar_0 = 1: the step returns the x0 estimate (diffusers:
             ``set_alpha_to_one=True``).
    "first"  t_prev = 1, alpha_bar_1 = 1 - beta_1: where LDM's DDIM sampler and SD v1's scheduler
             stop (diffusers: ``set_alpha_to_one=False``, i.e. ``final_alpha_cumprod =
             alphas_cumprod[0]``), since their 0-based step 0 is the first noisy training step.
    """
    if final_alpha_bar not in ("one", "first"):
        raise ValueError(f"final_alpha_bar must be 'one' or 'first', got {final_alpha_bar!r}")
    # "one" is right for our own DDPM: our schedule defines step 0 as the clean latent, so landing
    # on alpha_bar_0 = 1 returns the x0 estimate. "first" is for models trained on LDM's schedule.
    t_end = 0 if final_alpha_bar == "one" else 1
    ts = timesteps or ddim_timesteps(num_steps, schedule.num_steps)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else t_end
        step = ddim_step(denoise_fn, x, t, t_prev, schedule, eta=eta, prediction=prediction, generator=generator)
        x = step.x
        yield step


def ddim_step(
    denoise_fn: DenoiseFn,
    x: Tensor,
    t: int,
    t_prev: int,
    schedule: NoiseSchedule,
    *,
    eta: float = 0.0,
    prediction: Prediction = "eps",
    generator: torch.Generator | None = None,
) -> Step:
    """One DDIM update z_t -> z_{t_prev}, 0 <= t_prev <= t <= T (Song et al. 2021, eq. 12; the
    formula is in :func:`ddim_steps`). One denoiser call; one noise draw from ``generator``
    only when sigma > 0 (eta > 0 and t_prev < t). t_prev = 0 lands on alpha_bar_0 = 1 and returns
    the x0 estimate; t_prev = t (a "first" landing after a grid that ends at 1) keeps z_t's level.
    """
    if not 0 <= t_prev <= t <= schedule.num_steps:
        raise ValueError(f"a DDIM step needs 0 <= t_prev <= t <= {schedule.num_steps}, got t={t}, t_prev={t_prev}")
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    eps, x0 = schedule.to_eps_x0(x, tt, denoise_fn(x, tt), prediction)
    a_t, a_prev = schedule.alpha_bar[t], schedule.alpha_bar[t_prev]
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    x = a_prev.sqrt().to(x.dtype) * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt().to(x.dtype) * eps
    if sigma > 0:
        x = x + sigma.to(x.dtype) * _noise_like(x, generator)
    return Step(t=t, t_prev=t_prev, x=x, x0=x0, eps=eps)


def run(steps: Iterator[Step], callback: Callable[[Step], None] | None = None) -> Tensor:
    """Drain a progressive sampler and return its final sample; ``callback`` sees every step."""
    last = None
    for last in steps:
        if callback is not None:
            callback(last)
    if last is None:
        raise ValueError("the sampler made no steps")
    return last.x


def classifier_free_guidance(
    model: Callable[[Tensor, Tensor, Tensor], Tensor], labels: Tensor, null_label: int, scale: float
) -> DenoiseFn:
    """Wrap a class-conditional ``model(x, t, labels)`` as ``denoise_fn(x, t)`` with guidance

        out = out_u + w (out_c - out_u)        (Ho & Salimans 2022, eq. 6)

    evaluated in one batched call (conditional and unconditional halves). w = 1 is plain
    conditional sampling, w = 0 unconditional.
    """

    def denoise_fn(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1.0:
            return model(x, t, labels)
        null = torch.full_like(labels, null_label)
        out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        return out_u + scale * (out_c - out_u)

    return denoise_fn


def visual_anagram(upright: DenoiseFn, flipped: DenoiseFn, flip: Callable[[Tensor], Tensor]) -> DenoiseFn:
    """Visual anagrams (Geng et al. 2024, "Visual Anagrams", eq. 3): average the prediction for the
    upright latent with the un-flipped prediction for the flipped latent,

        out(x, t) = 1/2 [ upright(x, t) + flip^-1( flipped(flip(x), t) ) ],

    so the sample reads as the first condition upright and the second after ``flip``. ``flip``
    must be an orthogonal pixel permutation that is its own inverse (a vertical or horizontal
    flip, a 180-degree rotation), which keeps the noise statistics of eps-prediction intact.
    """

    def denoise_fn(x: Tensor, t: Tensor) -> Tensor:
        return 0.5 * (upright(x, t) + flip(flipped(flip(x), t)))

    return denoise_fn
