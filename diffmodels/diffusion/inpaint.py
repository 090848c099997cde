"""Latent inpainting and editing as wrappers over the shared samplers.

Every method is a progressive generator of :class:`~diffmodels.diffusion.samplers.Step` (drain it with
:func:`diffmodels.diffusion.samplers.run`), built from the samplers' single updates ``ddpm_step`` /
``ddim_step`` plus a *clamp* applied to the latent after each step; no sampler is forked. Latents are the
scaled ones the denoiser sees (``z = posterior mean * scale_factor``).

Masks follow :mod:`diffmodels.data.masks`: ``hole`` is boolean, **True = hole** (to inpaint), and the
keep-mask is ``K = ~hole``. Pixel holes are (B, H, W) or (B, 1, H, W); latent holes
are (B, 1, H/8, W/8) (:func:`latent_hole`), and anything that broadcasts against the latents.

Symbols:

    z_a        anchor        scaled posterior mean of the image, E(x) * scale_factor
    m          hole          latent hole tiles (True = regenerate)
    t          level         diffusion step, 0 = clean .. T (see :mod:`diffmodels.diffusion.schedule`)
    q(z_t|z_a)               forward process, z_t = sqrt(alpha_bar_t) z_a + sqrt(1 - alpha_bar_t) n

Methods (each step: the shared sampler takes z_t -> z_{t_prev}, then the clamp sets kept tiles):

    clamp_mean      kept tiles = z_a at every level, the original design; since the clamp
                    target is the clean anchor, kept latents end bit-identical to z_a
    replace_noised  kept tiles = q(z_{t_prev} | z_a) with fresh noise (Rombach et al. 2022's
                    latent inpainting; Song et al. 2021 "Score-Based Generative Modeling", app. I)
    repaint         replace_noised plus resampling: after some steps the whole latent is
                    noised back up ``jump_length`` levels and denoised again, ``resample`` times
                    in all (Lugmayr et al. 2022, "RePaint", alg. 1 and sec. 4.2)
    sdedit          no mask: z_{t0} = q(z_{t0} | z_a), denoised to 0 (Meng et al. 2022, "SDEdit")

:func:`inpaint_images` runs one method from pixels to pixels; pixel paste-back is a separate,
optional post-process, off by default, so metrics see what the latent method itself does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffmodels.diffusion.samplers import (
    DenoiseFn,
    Step,
    ddim_step,
    ddim_timesteps,
    ddpm_step,
    run,
)
from diffmodels.diffusion.schedule import NoiseSchedule, Prediction

GRID = 8  # pixels per latent tile side (diffmodels.models.vae.GRID)
METHODS = ("clamp_mean", "replace_noised", "repaint", "sdedit")
MASK_POLICIES = ("nearest", "conservative")
Method = Literal["clamp_mean", "replace_noised", "repaint", "sdedit"]
MaskPolicy = Literal["nearest", "conservative"]
Clamp = Callable[[Tensor, int], Tensor]


# --------------------------------------------------------------------------------------------
# Masks on the latent grid
# --------------------------------------------------------------------------------------------


def _as_pixel_hole(hole: Tensor, grid: int = GRID) -> Tensor:
    """(B, H, W) or (B, 1, H, W) bool -> (B, 1, H, W) bool, its sides multiples of ``grid``."""
    hole = torch.as_tensor(hole)
    if hole.dtype != torch.bool:
        raise ValueError(f"hole mask must be boolean (True = hole), got {hole.dtype}")
    if hole.ndim == 3:
        hole = hole.unsqueeze(1)
    if hole.ndim != 4 or hole.shape[1] != 1:
        raise ValueError(f"hole mask must be (B, H, W) or (B, 1, H, W), got {tuple(hole.shape)}")
    if hole.shape[-2] % grid or hole.shape[-1] % grid:
        raise ValueError(f"hole mask size {hole.shape[-2]}x{hole.shape[-1]} is not a multiple of {grid} (the VAE's stride)")
    return hole


def latent_hole(hole: Tensor, policy: MaskPolicy = "nearest", grid: int = GRID) -> Tensor:
    """Map a pixel hole (B, H, W) or (B, 1, H, W), True = hole, to latent tiles (B, 1, H/8, W/8).

    nearest       tile (i, j) takes the pixel nearest its centre, (8i + 4, 8j + 4): nearest-
                  neighbour downsampling with half-pixel centres (``F.interpolate`` mode
                  ``"nearest-exact"``, PIL's NEAREST)
    conservative  a tile is kept only if all its 64 pixels are kept: hole if any pixel is

    Grid-aligned holes (every tile all hole or all keep) map exactly under both policies.
    ``grid`` is the VAE's stride (8 for ours and SD's; other strides for other VAEs).
    """
    hole = _as_pixel_hole(hole, grid)
    if policy == "nearest":
        return hole[..., grid // 2 :: grid, grid // 2 :: grid]
    if policy == "conservative":
        return F.max_pool2d(hole.float(), grid) > 0
    raise ValueError(f"mask_policy must be one of {MASK_POLICIES}, got {policy!r}")


def upsample_tiles(tiles: Tensor, grid: int = GRID) -> Tensor:
    """Latent-grid mask (B, 1, h, w) -> pixel mask (B, 1, 8h, 8w): tile (i, j) covers [8i, 8i+8) x [8j, 8j+8)
    (for a VAE of stride ``grid``: (B, 1, grid h, grid w), tile (i, j) covers [grid i, grid i + grid) x ...)."""
    return tiles.repeat_interleave(grid, dim=-2).repeat_interleave(grid, dim=-1)


# --------------------------------------------------------------------------------------------
# One reverse step of a shared sampler, and the forward jump
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    """Which shared sampler takes each reverse step, with its settings.

    ddpm  ancestral DDPM over every level T, T-1, .., 0; sigma_t^2 = ``variance``
    ddim  DDIM with ``eta`` over the trailing grid of ``ddim_steps`` levels
          (:func:`~diffmodels.diffusion.samplers.ddim_timesteps`) and 0
    """

    kind: Literal["ddpm", "ddim"] = "ddpm"
    ddim_steps: int = 50
    eta: float = 0.0
    variance: Literal["beta", "posterior"] = "beta"
    prediction: Prediction = "eps"

    def __post_init__(self) -> None:
        if self.kind not in ("ddpm", "ddim"):
            raise ValueError(f"sampler kind must be 'ddpm' or 'ddim', got {self.kind!r}")
        if self.variance not in ("beta", "posterior"):
            raise ValueError(f"variance must be 'beta' or 'posterior', got {self.variance!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")

    def grid(self, schedule: NoiseSchedule) -> list[int]:
        """The levels this sampler visits, ascending: [0, ..., T]."""
        if self.kind == "ddpm":
            return list(range(schedule.num_steps + 1))
        return [0] + ddim_timesteps(self.ddim_steps, schedule.num_steps)[::-1]

    def step(
        self, denoise_fn: DenoiseFn, x: Tensor, schedule: NoiseSchedule, t: int, t_prev: int,
        generator: torch.Generator | None,
    ) -> Step:
        """z_t -> z_{t_prev} by one update of the shared sampler (one denoiser call).

        The update is the very function the sampler's generator loops over
        (:func:`~diffmodels.diffusion.samplers.ddpm_step`, :func:`~diffmodels.diffusion.samplers.ddim_step`),
        so a run of single steps equals one uninterrupted sampler run, noise draws included,
        while the clamp can edit z between steps.
        """
        if self.kind == "ddpm":
            if t_prev != t - 1:
                raise ValueError(f"a DDPM step goes from t to t - 1, got t={t}, t_prev={t_prev}")
            return ddpm_step(denoise_fn, x, t, schedule, prediction=self.prediction, variance=self.variance,
                             generator=generator)
        return ddim_step(denoise_fn, x, t, t_prev, schedule, eta=self.eta, prediction=self.prediction,
                         generator=generator)


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def renoise(schedule: NoiseSchedule, z: Tensor, t: int, t_next: int, generator: torch.Generator | None) -> Tensor:
    """Forward jump z_t -> z_{t_next}, t < t_next, from q(z_{t_next} | z_t) (Ho et al. eq. 2 composed):

        z_{t_next} = sqrt(alpha_bar_{t_next} / alpha_bar_t) z_t + sqrt(1 - alpha_bar_{t_next} / alpha_bar_t) n

    For t_next = t + 1 this is RePaint's line x_t ~ N(sqrt(1 - beta_t) x_{t-1}, beta_t I).
    """
    ratio = schedule.alpha_bar[t_next] / schedule.alpha_bar[t]
    return ratio.sqrt().to(z.dtype) * z + (1 - ratio).sqrt().to(z.dtype) * _noise(z, generator)


def _follow(
    denoise_fn: DenoiseFn, x: Tensor, schedule: NoiseSchedule, sampler: Sampler, path: list[int],
    clamp: Clamp, generator: torch.Generator | None,
) -> Iterator[Step]:
    """Walk the levels in ``path``: a move down is one sampler step followed by ``clamp(z, level)``
    and is yielded (with the clamped z); a move up is :func:`renoise` of the whole latent, whose
    kept tiles then stay distributed as q(z_level | z_a), so no clamp follows it."""
    x = clamp(x, path[0])
    for t, t_next in zip(path, path[1:]):
        if t_next < t:
            step = sampler.step(denoise_fn, x, schedule, t, t_next, generator)
            x = clamp(step.x, t_next)
            yield replace(step, x=x)
        else:
            x = renoise(schedule, x, t, t_next, generator)


def _clamp_to_anchor(anchor: Tensor, hole: Tensor) -> Clamp:
    return lambda z, t: torch.where(hole, z, anchor)


def _replace_with_noised(schedule: NoiseSchedule, anchor: Tensor, hole: Tensor, generator: torch.Generator | None) -> Clamp:
    def clamp(z: Tensor, t: int) -> Tensor:
        tt = torch.full((anchor.shape[0],), t, device=anchor.device, dtype=torch.long)
        return torch.where(hole, z, schedule.q_sample(anchor, tt, _noise(anchor, generator)))

    return clamp


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


def clamp_mean(
    denoise_fn: DenoiseFn, anchor: Tensor, hole: Tensor, schedule: NoiseSchedule, *,
    sampler: Sampler = Sampler(), generator: torch.Generator | None = None,
) -> Iterator[Step]:
    """The original design: start from z_T ~ N(0, I) with kept tiles set to z_a; for
    each level down to 0, one sampler step (fresh noise only when t > 1, as the sampler does),
    then kept tiles re-clamped to z_a itself, not a noised z_a:

        z_{t_prev} = (1 - m) z_a + m step(z_t)

    ``anchor`` (B, C, h, w): scaled posterior mean; ``hole`` (B or 1, 1, h, w) bool, True = hole.
    Kept latents are bit-identical to z_a in every yielded step and at the end.
    """
    x = _noise(anchor, generator)
    path = sampler.grid(schedule)[::-1]
    return _follow(denoise_fn, x, schedule, sampler, path, _clamp_to_anchor(anchor, hole), generator)


def replace_noised(
    denoise_fn: DenoiseFn, anchor: Tensor, hole: Tensor, schedule: NoiseSchedule, *,
    sampler: Sampler = Sampler(), generator: torch.Generator | None = None,
) -> Iterator[Step]:
    """Latent-diffusion inpainting: as :func:`clamp_mean`, but after each step (and at the start,
    level T) kept tiles are a fresh forward-noised anchor at the new level,

        z_{t_prev} = (1 - m) q_sample(z_a, t_prev, n) + m step(z_t),    n ~ N(0, I),

    which is z_a exactly at t_prev = 0 (alpha_bar_0 = 1). Shapes as :func:`clamp_mean`.
    """
    x = _noise(anchor, generator)
    path = sampler.grid(schedule)[::-1]
    clamp = _replace_with_noised(schedule, anchor, hole, generator)
    return _follow(denoise_fn, x, schedule, sampler, path, clamp, generator)


def repaint_schedule(num_steps: int, jump_length: int, resample: int) -> list[int]:
    """RePaint's time schedule (Lugmayr et al. 2022, sec. 4.2 and their ``get_schedule_jump``
    with one sample per step): the levels visited, from ``num_steps`` (T) down to 0.

    Going down one level at a time, at each level t = 1, 1 + j, 1 + 2j, ... below T - j + 1
    (j = ``jump_length``) the walk jumps back up j levels one at a time, the first
    ``resample - 1`` times it reaches t; so every stretch of j levels is denoised ``resample``
    times. ``resample = 1`` is the plain descent T, T-1, ..., 0. In the reference code's
    0-based timesteps (-1 = clean) every level here is one less.
    E.g. (T=5, j=2, r=2): 5 4 3 4 5 4 3 2 1 2 3 2 1 0.
    """
    if num_steps < 1 or jump_length < 1 or resample < 1:
        raise ValueError(f"RePaint needs num_steps, jump_length and resample >= 1, got {num_steps}, {jump_length}, {resample}")
    jumps_left = {t: resample - 1 for t in range(1, num_steps - jump_length + 1, jump_length)}
    levels = [num_steps]
    t = num_steps
    while t > 0:
        t -= 1
        levels.append(t)
        if jumps_left.get(t, 0) > 0:
            jumps_left[t] -= 1
            levels.extend(range(t + 1, t + jump_length + 1))
            t += jump_length
    return levels


def repaint(
    denoise_fn: DenoiseFn, anchor: Tensor, hole: Tensor, schedule: NoiseSchedule, *,
    jump_length: int = 10, resample: int = 10, sampler: Sampler = Sampler(),
    generator: torch.Generator | None = None,
) -> Iterator[Step]:
    """RePaint (Lugmayr et al. 2022, alg. 1 with jumps): :func:`replace_noised` along
    :func:`repaint_schedule` over the sampler's levels (every level for DDPM; for DDIM, jumps
    count grid levels), going back up by :func:`renoise`. ``resample=1`` equals
    :func:`replace_noised` with the same generator. Yields the downward steps only.
    """
    grid = sampler.grid(schedule)
    path = [grid[i] for i in repaint_schedule(len(grid) - 1, jump_length, resample)]
    x = _noise(anchor, generator)
    clamp = _replace_with_noised(schedule, anchor, hole, generator)
    return _follow(denoise_fn, x, schedule, sampler, path, clamp, generator)


def sdedit(
    denoise_fn: DenoiseFn, anchor: Tensor, schedule: NoiseSchedule, t0: int, *,
    sampler: Sampler = Sampler(), generator: torch.Generator | None = None,
) -> Iterator[Step]:
    """SDEdit (Meng et al. 2022, alg. 1): z_{t0} = q_sample(z_a, t0, n), then denoise to 0 through
    t0 and the sampler's levels below it. Editing, not inpainting: no mask. t0 in 1..T."""
    if not 1 <= t0 <= schedule.num_steps:
        raise ValueError(f"sdedit t0 must be in 1..{schedule.num_steps}, got {t0}")
    tt = torch.full((anchor.shape[0],), t0, device=anchor.device, dtype=torch.long)
    x = schedule.q_sample(anchor, tt, _noise(anchor, generator))
    path = [t0] + [t for t in sampler.grid(schedule)[::-1] if t < t0]
    return _follow(denoise_fn, x, schedule, sampler, path, lambda z, t: z, generator)


# --------------------------------------------------------------------------------------------
# Pixels to pixels
# --------------------------------------------------------------------------------------------


def paste_back(output: Tensor, images: Tensor, hole: Tensor) -> Tensor:
    """Pixel paste-back: kept pixels from ``images``, hole pixels from ``output`` (B, C, H, W)."""
    return torch.where(_as_pixel_hole(hole).to(output.device), output, images)


@torch.no_grad()
def reconstruct(images: Tensor, encode: Callable[[Tensor], Tensor], decode: Callable[[Tensor], Tensor]) -> Tensor:
    """D(E(x)): decode the posterior mean of ``images``, as :func:`inpaint_images` decodes it.

    The mean is made contiguous first: ``VAE.encode`` returns chunk views, and CPU convolutions
    pick kernels by memory layout, so decoding the view and a contiguous copy can differ by
    ~1e-6. One layout for both keeps "all-keep inpainting == reconstruction" exact.
    """
    return decode(encode(images).contiguous())


@torch.no_grad()
def inpaint_images(
    method: Method,
    images: Tensor,
    hole: Tensor,
    *,
    encode: Callable[[Tensor], Tensor],
    decode: Callable[[Tensor], Tensor],
    denoise_fn: DenoiseFn,
    schedule: NoiseSchedule,
    scale_factor: float,
    mask_policy: MaskPolicy = "nearest",
    sampler: Sampler = Sampler(),
    jump_length: int = 10,
    resample: int = 10,
    sdedit_t0: int | None = None,
    paste: bool = False,
    generator: torch.Generator | None = None,
    callback: Callable[[Step], None] | None = None,
) -> Tensor:
    """Inpaint (or, for ``sdedit``, edit) ``images`` (B, C, H, W) in [-1, 1] where ``hole``
    (B, H, W) bool is True. ``encode`` maps images to the posterior mean (e.g.
    ``lambda x: vae.encode(x)[0]``), ``decode`` unscaled latents to images (``vae.decode``).
    Returns (B, C, H, W) in the decoder's range; ``callback`` sees every yielded Step
    (scaled latents, for process strips).

        1. z_a = encode(x) * scale_factor
        2. latent hole tiles from the pixel hole by ``mask_policy``
        3. the method's reverse process over the shared sampler
        4. decode: kept tiles of inpainting methods from the unscaled posterior mean itself
           (they equal z_a exactly, but z_a / s * s is not always bit-exact in float32), so an
           all-keep mask returns :func:`reconstruct` bit for bit; the rest from z_0 / scale_factor
        5. optional pixel paste-back (``paste``), off by default
    """
    if method not in METHODS:
        raise ValueError(f"inpainting method must be one of {METHODS}, got {method!r}")
    mean = encode(images).contiguous()  # (B, C_lat, H/8, W/8), unscaled; see reconstruct()
    anchor = mean * scale_factor
    tiles = latent_hole(hole, mask_policy).to(mean.device)  # (B, 1, h, w)
    if method == "clamp_mean":
        steps = clamp_mean(denoise_fn, anchor, tiles, schedule, sampler=sampler, generator=generator)
    elif method == "replace_noised":
        steps = replace_noised(denoise_fn, anchor, tiles, schedule, sampler=sampler, generator=generator)
    elif method == "repaint":
        steps = repaint(denoise_fn, anchor, tiles, schedule, jump_length=jump_length, resample=resample,
                        sampler=sampler, generator=generator)
    else:
        if sdedit_t0 is None:
            raise ValueError("sdedit needs sdedit_t0, the level in 1..T to noise the image to")
        steps = sdedit(denoise_fn, anchor, schedule, sdedit_t0, sampler=sampler, generator=generator)
    z0 = run(steps, callback) / scale_factor
    if method != "sdedit":
        z0 = torch.where(tiles, z0, mean)
    out = decode(z0)
    return paste_back(out, images, hole) if paste else out

