"""Evaluating an inpainting method (stage eval_inpaint): run it over every mask set in seeded
batches and score each set's outputs by preserved-region fidelity
(:func:`~diffmodels.metrics.fidelity.preserved_fidelity`) and the seam score
(:func:`~diffmodels.metrics.seam.seam_score`), averaged over images, with seeded bootstrap
intervals of the per-image means (:func:`metric_intervals`) and which method pairs they separate.

Seeds: batch ``i`` (its first image's index) of mask set number ``k`` inpaints with a generator
seeded ``seed + 7919 k + i``, so every (set, batch) draws its own noise and a method's numbers do
not depend on which other methods or sets run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from diffmodels.core.progress import progress
from diffmodels.diffusion import inpaint
from diffmodels.metrics.fidelity import preserved_fidelity
from diffmodels.metrics.intervals import bootstrap_interval, intervals_separate
from diffmodels.metrics.seam import seam_score

SET_SEED_STRIDE = 7919  # a prime: the seeds of two sets' batches never meet for fewer than 7919 images


@dataclass
class MaskSetResult:
    """One method on one mask set: ``output`` (n, C, H, W) in the decoder's range; ``scores`` (metric
    -> mean over images, None where no image has a finite value); ``process`` the first image's
    x0 estimates (1, C, h, w), scaled latents, at evenly spaced steps of its reverse process."""

    output: Tensor
    scores: dict[str, float | None]
    process: list[Tensor]
    per_image: dict[str, Tensor] = field(default_factory=dict)  # metric -> (n,) float values, inf/nan kept


INTERVAL_METRICS = ("psnr_image", "ssim_image", "seam")  # the per-image metrics given bootstrap intervals


@torch.no_grad()
def reconstructions(images: Tensor, encode: Callable[[Tensor], Tensor], decode: Callable[[Tensor], Tensor],
                    batch_size: int) -> Tensor:
    """D(E(x)) of ``images`` (n, C, H, W) in batches (:func:`~diffmodels.diffusion.inpaint.reconstruct`):
    the reference of the ``*_recon`` scores, what a perfect latent method could return."""
    return torch.cat([inpaint.reconstruct(images[i:i + batch_size], encode, decode)
                      for i in range(0, len(images), batch_size)])


def per_image_scores(output: Tensor, images: Tensor, recon: Tensor, hole: Tensor) -> dict[str, Tensor]:
    """Preserved-region fidelity against the image and its reconstruction, and the seam score:
    metric -> (n,) values, one per image."""
    values = preserved_fidelity(output, images, recon, hole)
    values["seam"] = seam_score(output, images, hole)
    return values


def mean_scores(output: Tensor, images: Tensor, recon: Tensor, hole: Tensor,
                values: dict[str, Tensor] | None = None) -> dict[str, float | None]:
    """:func:`per_image_scores` (or ``values`` already computed), each averaged over the images where
    it is finite (PSNR of an exact match is inf) and rounded to 5 digits."""
    values = per_image_scores(output, images, recon, hole) if values is None else values
    scores: dict[str, float | None] = {}
    for key, per_image in values.items():
        finite = per_image[torch.isfinite(per_image)]
        scores[key] = round(float(finite.mean()), 5) if len(finite) else None
    return scores


@torch.no_grad()
def inpaint_mask_set(method: inpaint.Method, images: Tensor, hole: Tensor, *, batch_size: int, seed: int,
                     process_points: int, **settings) -> tuple[Tensor, list[Tensor]]:
    """:func:`~diffmodels.diffusion.inpaint.inpaint_images` over ``images`` (n, C, H, W) and ``hole``
    (n, H, W) bool in batches, batch ``i`` seeded ``seed + i``; ``settings`` are its keyword arguments
    (encode, decode, denoise_fn, schedule, scale_factor, sampler, ...). Returns the outputs and the
    first image's x0 estimates at ``process_points`` evenly spaced steps."""
    outputs: list[Tensor] = []
    first: list[Tensor] = []
    for i in range(0, len(images), batch_size):
        callback = (lambda step: first.append(step.x0[:1])) if i == 0 else None
        outputs.append(inpaint.inpaint_images(method, images[i:i + batch_size], hole[i:i + batch_size],
                                              generator=torch.Generator().manual_seed(seed + i), callback=callback,
                                              **settings))
    keep = np.linspace(0, len(first) - 1, process_points).round().astype(int)
    return torch.cat(outputs), [first[k] for k in keep]


def evaluate_method(method: inpaint.Method, images: Tensor, recon: Tensor, masks: Mapping[str, np.ndarray], *,
                    batch_size: int, seed: int, process_points: int, **settings) -> Iterator[tuple[str, MaskSetResult]]:
    """Inpaint ``images`` (n, C, H, W) with ``method`` under each mask set (name -> (>= n, H, W) bool,
    True = hole) and score it against ``images`` and ``recon``; yields (set name, result) per set as
    it is done, showing progress. ``settings`` as :func:`inpaint_mask_set`."""
    n = len(images)
    for index, (name, set_masks) in enumerate(progress(masks.items(), total=len(masks), desc=method, unit="set")):
        hole = torch.from_numpy(set_masks[:n])
        output, process = inpaint_mask_set(method, images, hole, batch_size=batch_size,
                                           seed=seed + SET_SEED_STRIDE * index, process_points=process_points,
                                           **settings)
        values = per_image_scores(output, images, recon, hole)
        yield name, MaskSetResult(output, mean_scores(output, images, recon, hole, values), process, values)


def metric_intervals(per_image: Mapping[str, Tensor], num_resamples: int, seed: int,
                     keys: tuple[str, ...] = INTERVAL_METRICS) -> dict[str, dict]:
    """Bootstrap 95 % interval of the mean over images of each metric in ``keys``, over its finite
    values (:func:`~diffmodels.metrics.intervals.bootstrap_interval`); metric -> {value, low, high, n},
    None where fewer than 2 images have a finite value."""
    out: dict[str, dict] = {}
    for key in keys:
        values = per_image[key].double().flatten()
        finite = values[torch.isfinite(values)]
        out[key] = None if len(finite) < 2 else {
            k: (round(v, 5) if isinstance(v, float) else v)
            for k, v in bootstrap_interval(finite, num_resamples=num_resamples, seed=seed).items()
            if k in ("value", "low", "high", "n")}
    return out


def separated_pairs(intervals: Mapping[str, Mapping[str, dict | None]]) -> dict[str, list[str]]:
    """For each metric, the method pairs ``"a vs b"`` whose intervals do not overlap, from
    ``intervals`` method -> metric -> interval (as :func:`metric_intervals` returns, one mask set)."""
    methods = list(intervals)
    metrics = sorted({k for m in methods for k in intervals[m]})
    out: dict[str, list[str]] = {}
    for key in metrics:
        out[key] = [f"{a} vs {b}" for i, a in enumerate(methods) for b in methods[i + 1:]
                    if intervals[a].get(key) and intervals[b].get(key)
                    and intervals_separate(intervals[a][key], intervals[b][key])]
    return out
