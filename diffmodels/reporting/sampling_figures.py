"""The figures of the sampling stages: what a denoiser does, step by step (stage sample), and
the example panels of inpainting (stage eval_inpaint).

Each function samples what its figure needs, draws it with :func:`~diffmodels.reporting.figures.labelled_grid`
and returns the PNG's path. ``decode`` maps scaled latents (B, C, h, w) to (B, H, W, C) uint8
images; ``denoise_fn(x, t)`` is the unconditional denoiser (the null label when class-conditional).
DDIM here is deterministic (eta = 0), so these figures draw no noise beyond their x_T.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffmodels.diffusion import samplers
from diffmodels.diffusion.samplers import (
    DenoiseFn,
    Step,
    classifier_free_guidance,
    run,
    visual_anagram,
)
from diffmodels.diffusion.sampling import ClassModel, why_iterate_path
from diffmodels.diffusion.schedule import NoiseSchedule, Prediction
from diffmodels.reporting.figures import gaussian_blur, labelled_grid

Decode = Callable[[Tensor], np.ndarray]
PER_CLASS = 6  # samples per class row (guidance grids) and per anagram


def evenly_spaced(count: int, points: int) -> list[int]:
    """``points`` indices spread evenly over 0..count-1, both ends included (repeats when count < points)."""
    return np.linspace(0, count - 1, points).round().astype(int).tolist()


def denoising_strip(path: Path, denoise_fn: DenoiseFn, x: Tensor, schedule: NoiseSchedule, *, ddim_steps: int,
                    prediction: Prediction, points: int, decode: Decode) -> Path:
    """Decoded x0 estimates at ``points`` steps of one DDIM trajectory from ``x`` (one row per sample)."""
    keep = set(evenly_spaced(len(samplers.ddim_timesteps(ddim_steps, schedule.num_steps)), points))
    snaps: list[Step] = []
    steps = samplers.ddim_steps(denoise_fn, x, schedule, num_steps=ddim_steps, prediction=prediction)
    run(steps, callback=snaps.append)
    chosen = [s for i, s in enumerate(snaps) if i in keep]
    cols = [decode(s.x0) for s in chosen]
    labelled_grid([[col[r] for col in cols] for r in range(len(x))], path,
                  col_labels=[f"t={s.t}" for s in chosen], title="DDIM: decoded x0 estimate at each step")
    return path


def forward_strip(path: Path, z0: Tensor, eps: Tensor, schedule: NoiseSchedule, decode: Decode) -> Path:
    """Latents ``z0`` noised by q(z_t | z_0) with the same ``eps`` to 9 evenly spaced t in 0..T, decoded."""
    levels = np.linspace(0, schedule.num_steps, 9).round().astype(int).tolist()
    cols = [decode(schedule.q_sample(z0, torch.full((len(z0),), t, device=z0.device), eps)) for t in levels]
    labelled_grid([[col[r] for col in cols] for r in range(len(z0))], path,
                  col_labels=[f"t={t}" for t in levels], title="Forward diffusion q(z_t | z_0), decoded")
    return path


def why_iterate(path: Path, denoise_fn: DenoiseFn, z0: Tensor, eps: Tensor, schedule: NoiseSchedule, *,
                levels: Sequence[int], ddim_steps: int, prediction: Prediction, decode: Decode) -> Path:
    """At each t of ``levels``, for one latent ``z0`` (1, C, h, w) noised with ``eps``: the clean image,
    z_t decoded, a Gaussian blur of that (the naive denoiser), the one-step x0 estimate, and DDIM from
    z_t (:func:`~diffmodels.diffusion.sampling.why_iterate_path`) -- why the reverse process iterates."""
    rows = []
    for t in levels:
        tt = torch.full((1,), t, device=z0.device)
        zt = schedule.q_sample(z0, tt, eps)
        _, x0_hat = schedule.to_eps_x0(zt, tt, denoise_fn(zt, tt), prediction)
        timesteps = why_iterate_path(t, ddim_steps, schedule.num_steps)
        iterated = run(samplers.ddim_steps(denoise_fn, zt, schedule, prediction=prediction, timesteps=timesteps))
        noisy = decode(zt)
        rows.append([decode(z0)[0], noisy[0], gaussian_blur(noisy, 1.5)[0], decode(x0_hat)[0], decode(iterated)[0]])
    labelled_grid(rows, path, row_labels=[f"t={t}" for t in levels],
                  col_labels=["clean", "noisy z_t", "blur", "one step", "iterative"],
                  title="Why iterate: one-step estimate vs the reverse process")
    return path


def guidance_grids(folder: Path, model: ClassModel, null_label: int, class_names: Sequence[str], x: Tensor,
                   schedule: NoiseSchedule, *, scales: Sequence[float], ddim_steps: int, prediction: Prediction,
                   decode: Decode) -> list[Path]:
    """``guidance_<w>.png`` per scale w: one row of :data:`PER_CLASS` samples per class, all scales
    from the same x_T ``x`` (PER_CLASS * classes, C, h, w), by classifier-free guidance."""
    labels = torch.arange(len(class_names), device=x.device).repeat_interleave(PER_CLASS)
    paths = []
    for w in scales:
        fn = classifier_free_guidance(model, labels, null_label, w)
        images = decode(run(samplers.ddim_steps(fn, x, schedule, num_steps=ddim_steps, prediction=prediction)))
        path = folder / f"guidance_{w:g}.png"
        labelled_grid([list(images[i * PER_CLASS:(i + 1) * PER_CLASS]) for i in range(len(class_names))], path,
                      row_labels=list(class_names), title=f"classifier-free guidance w = {w:g}")
        paths.append(path)
    return paths


def anagram(path: Path, model: ClassModel, null_label: int, classes: tuple[int, int], class_names: Sequence[str],
            guidance: float, x: Tensor, schedule: NoiseSchedule, *, ddim_steps: int, prediction: Prediction,
            decode: Decode) -> Path:
    """Visual anagrams from x_T ``x`` (n, C, h, w): class ``classes[0]`` upright, ``classes[1]`` with
    the latent grid flipped upside down; shown upright and flipped."""
    a, b = classes
    n = len(x)
    up = classifier_free_guidance(model, torch.full((n,), a, device=x.device), null_label, guidance)
    down = classifier_free_guidance(model, torch.full((n,), b, device=x.device), null_label, guidance)
    fn = visual_anagram(up, down, lambda z: z.flip(-2))
    images = decode(run(samplers.ddim_steps(fn, x, schedule, num_steps=ddim_steps, prediction=prediction)))
    labelled_grid([list(images), list(images[:, ::-1])], path,
                  row_labels=[class_names[a], f"{class_names[b]}\n(upside down)"],
                  title="Visual anagram (latent grid flipped)")
    return path


def mask_overlay(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 with the hole tinted mid-grey, for the panels' mask column."""
    out = image.astype(np.float32)
    out[hole] = 0.35 * out[hole] + 0.65 * 128.0
    return out.round().astype(np.uint8)


def inpaint_panel(path: Path, original: np.ndarray, holes: dict[str, np.ndarray],
                  examples: dict[str, list[np.ndarray]], title: str) -> Path:
    """One row per mask set: ``original`` (H, W, C) uint8, its ``holes[set]`` (H, W) bool tinted, then
    ``examples[set]`` (the inpainted image and decoded x0 estimates along the process)."""
    rows = [[original, mask_overlay(original, holes[name]), *examples[name]] for name in examples]
    points = max(len(cells) for cells in examples.values()) - 1
    labelled_grid(rows, path, row_labels=list(examples),
                  col_labels=["original", "mask", "inpainted", *(f"x0 @{j + 1}/{points}" for j in range(points))],
                  title=title)
    return path
