"""Sampling recipes over a denoiser: unconditional samples in seeded batches, and the short
trajectories the sampling figures show (:mod:`diffmodels.reporting.sampling_figures`).

Seeds are explicit so that a run is reproducible and two samplers start from the same x_T:
batch ``i`` (its first image's index) starts from noise seeded ``seed + i``, and the sampler's own
draws (DDPM's ancestral noise, DDIM with eta > 0) come from a generator seeded ``seed + 1000 + i``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor

from diffmodels.core.progress import progress
from diffmodels.diffusion import samplers
from diffmodels.diffusion.samplers import DenoiseFn, Step
from diffmodels.diffusion.schedule import NoiseSchedule, Prediction

SamplerKind = Literal["ddpm", "ddim"]
ClassModel = Callable[[Tensor, Tensor, Tensor], Tensor]  # model(x, t, labels)


def seeded_noise(shape: tuple[int, ...], seed: int, device: torch.device | str) -> Tensor:
    """N(0, I) of ``shape`` from a fresh CPU generator seeded ``seed``, then moved to ``device``
    (drawn on the CPU so that the same seed gives the same noise on every device)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def full_run(
    kind: SamplerKind, denoise_fn: DenoiseFn, x: Tensor, schedule: NoiseSchedule, *, prediction: Prediction,
    ddpm_variance: Literal["beta", "posterior"] = "beta", ddim_steps: int = 50, ddim_eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Iterator[Step]:
    """The progressive sampler of ``kind`` from z_T = ``x``: ancestral DDPM over all T steps, or DDIM
    over ``ddim_steps`` trailing steps with ``ddim_eta``."""
    if kind == "ddpm":
        return samplers.ddpm_steps(denoise_fn, x, schedule, prediction=prediction, variance=ddpm_variance,
                                   generator=generator)
    if kind == "ddim":
        return samplers.ddim_steps(denoise_fn, x, schedule, num_steps=ddim_steps, eta=ddim_eta, prediction=prediction,
                                   generator=generator)
    raise ValueError(f"sampler kind must be 'ddpm' or 'ddim', got {kind!r}")


def sample_batches(
    kind: SamplerKind, denoise_fn: DenoiseFn, schedule: NoiseSchedule, latent_shape: tuple[int, ...], *,
    num_images: int, batch_size: int, seed: int, device: torch.device | str, prediction: Prediction,
    ddpm_variance: Literal["beta", "posterior"] = "beta", ddim_steps: int = 50, ddim_eta: float = 0.0,
) -> Iterator[Tensor]:
    """``num_images`` samples z_0 of ``latent_shape`` (C, h, w) in batches of at most ``batch_size``,
    seeded as the module docstring says, so every sampler kind sees the same x_T. Yields each
    batch (n, C, h, w) as it is done (decode it before the next, to bound memory); shows progress."""
    for i in progress(range(0, num_images, batch_size), desc=kind, unit="batch"):
        n = min(batch_size, num_images - i)
        generator = torch.Generator().manual_seed(seed + 1000 + i)
        x = seeded_noise((n, *latent_shape), seed + i, device)
        yield samplers.run(full_run(kind, denoise_fn, x, schedule, prediction=prediction, ddpm_variance=ddpm_variance,
                                    ddim_steps=ddim_steps, ddim_eta=ddim_eta, generator=generator))


def class_batches(
    model: ClassModel, null_label: int, label: int, guidance: float, schedule: NoiseSchedule,
    latent_shape: tuple[int, ...], *, num_images: int, batch_size: int, seed: int, device: torch.device | str,
    prediction: Prediction, ddim_steps: int = 50, ddim_eta: float = 0.0,
) -> Iterator[Tensor]:
    """DDIM samples of class ``label`` by classifier-free guidance at scale ``guidance`` from a
    class-conditional ``model(x, t, labels)``, batched and seeded as :func:`sample_batches`."""

    def denoise_fn(x: Tensor, t: Tensor) -> Tensor:
        labels = torch.full((len(x),), label, dtype=torch.long, device=x.device)
        return samplers.classifier_free_guidance(model, labels, null_label, guidance)(x, t)

    return sample_batches("ddim", denoise_fn, schedule, latent_shape, num_images=num_images, batch_size=batch_size,
                          seed=seed, device=device, prediction=prediction, ddim_steps=ddim_steps, ddim_eta=ddim_eta)


def why_iterate_path(t: int, ddim_steps: int, num_train_steps: int) -> list[int]:
    """DDIM levels from t down (to 0 after the last step), as many as a ``ddim_steps`` run over all
    ``num_train_steps`` spends below t (at least one): the "iterative" column of the why-iterate figure."""
    k = max(1, round(ddim_steps * t / num_train_steps))
    return [round(t - i * t / k) for i in range(k)]
