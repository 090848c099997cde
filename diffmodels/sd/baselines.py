"""The Stable Diffusion baselines of stage sd_baselines, on a converted pipeline
(:class:`~diffmodels.sd.pipeline.StableDiffusion`): txt2img, img2img (SDEdit), latent inpainting and
visual anagrams, and the SD VAE's reconstruction and leakage under our metrics.

Images are (B, 3, H, W) float in [0, 1] on the CPU unless said otherwise. Each baseline runs in
batches of ``sd.batch_size``; batch ``i`` (its first item's index) draws from a generator seeded
``seed + i``, where the stage gives each baseline its own ``seed`` (params.seed + 0, 100, 200,
300, 400), so adding prompts or images never changes the noise of the others. Each baseline also
writes its time per image into ``metrics`` as ``<name>_seconds_per_image``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffmodels.core.config import LeakageParams, SdParams
from diffmodels.core.errors import DiffmodelsError
from diffmodels.core.progress import progress
from diffmodels.data.datasets import load_split
from diffmodels.data.latent_cache import ReconMetrics
from diffmodels.data.masks import load_mask_set
from diffmodels.metrics.leakage import VaeLeakage, vae_leakage
from diffmodels.sd.pipeline import StableDiffusion
from diffmodels.sd.vae import SCALE_FACTOR

T = TypeVar("T")


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def load_test_images(prepared: Path, n: int, size: tuple[int, int] | None = None) -> Tensor:
    """The first ``n`` test images as (n, 3, H, W) float in [0, 1]: grey repeated to RGB, bilinear to ``size``."""
    images = np.array(load_split(prepared, "test").images[:n])  # copy: the split is memory-mapped
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return x if size is None else F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def inpaint_masks(mask_dir: Path, name: str, n: int, size: tuple[int, int]) -> Tensor:
    """The first ``n`` holes of mask set ``name`` as (n, 1, H, W) float, 1 = hole, nearest-resized to ``size``."""
    masks = torch.from_numpy(load_mask_set(mask_dir, name)[:n]).float()[:, None]
    if len(masks) < n:
        raise DiffmodelsError(f"{mask_dir / name}: {len(masks)} masks for {n} test images (raise data.masks_per_set)")
    return F.interpolate(masks, size=size, mode="nearest")


def psnr(a: Tensor, b: Tensor, where: Tensor | None = None) -> float:
    """PSNR in dB of images in [0, 1], over the pixels ``where`` is True (all by default)."""
    err = (a.float().cpu() - b.float().cpu()) ** 2
    mse = err.mean() if where is None else err[where.expand_as(err)].mean()
    return float(10 * torch.log10(1 / mse.clamp(min=1e-12)))


def timed(metrics: dict, name: str, count: int, fn: Callable[[], T]) -> T:
    """``fn()``, with its wall time per item recorded as ``metrics[<name>_seconds_per_image]``."""
    started = time.perf_counter()
    result = fn()
    metrics[f"{name}_seconds_per_image"] = round((time.perf_counter() - started) / count, 3)
    return result


def seeded_batches(fn: Callable[[list, torch.Generator], Tensor], items: list, batch_size: int, seed: int,
                   desc: str) -> Tensor:
    """``fn(batch, generator)`` over batches of ``items``, batch ``i`` seeded ``seed + i``, concatenated on
    the CPU; shows progress."""
    return torch.cat([fn(items[i:i + batch_size], torch.Generator().manual_seed(seed + i)).cpu()
                      for i in progress(range(0, len(items), batch_size), desc=desc, unit="batch")])


def txt2img(sd: StableDiffusion, p: SdParams, seed: int, metrics: dict) -> Tensor:
    """One sample per prompt of ``sd.prompts`` (DDIM, classifier-free guidance against ``sd.negative_prompt``)."""
    prompts, negative = list(p.prompts), p.negative_prompt or ""
    return timed(metrics, "txt2img", len(prompts), lambda: seeded_batches(
        lambda b, g: sd.txt2img(b, height=p.height, width=p.width, negative=[negative] * len(b), generator=g,
                                steps=p.steps, guidance=p.guidance),
        prompts, p.batch_size, seed, "txt2img"))


def img2img(sd: StableDiffusion, p: SdParams, init: Tensor, seed: int, metrics: dict) -> Tensor:
    """SDEdit of ``init`` toward ``sd.image_prompt`` at ``sd.strength``; adds ``img2img_psnr_to_input``."""
    negative = p.negative_prompt or ""
    edited = timed(metrics, "img2img", len(init), lambda: seeded_batches(
        lambda b, g: sd.img2img(init[b], [p.image_prompt] * len(b), strength=p.strength, negative=[negative] * len(b),
                                generator=g, steps=p.steps, guidance=p.guidance),
        list(range(len(init))), p.batch_size, seed, "img2img"))
    metrics["img2img_psnr_to_input"] = round(psnr(edited, init), 3)
    return edited


def inpaint(sd: StableDiffusion, p: SdParams, init: Tensor, masks: Tensor, seed: int, metrics: dict) -> Tensor:
    """Latent inpainting of ``init`` where ``masks`` (n, 1, H, W) is 1, toward ``sd.image_prompt``; adds
    ``inpaint_known_psnr`` (the kept region after the VAE round trip) and ``inpaint_hole_fraction``."""
    negative = p.negative_prompt or ""
    filled = timed(metrics, "inpaint", len(init), lambda: seeded_batches(
        lambda b, g: sd.inpaint(init[b], masks[b], [p.image_prompt] * len(b), negative=[negative] * len(b),
                                generator=g, steps=p.steps, guidance=p.guidance),
        list(range(len(init))), p.batch_size, seed, "inpaint"))
    metrics["inpaint_known_psnr"] = round(psnr(filled, init, masks < 0.5), 3)
    metrics["inpaint_hole_fraction"] = round(float(masks.mean()), 4)
    return filled


def anagram(sd: StableDiffusion, p: SdParams, seed: int, metrics: dict) -> Tensor:
    """Two visual anagrams of ``sd.anagram_prompts`` under ``sd.anagram_flip``, in one batch."""
    a, b = p.anagram_prompts
    return timed(metrics, "anagram", 2, lambda: sd.anagram(
        [a, a], [b, b], flip=p.anagram_flip, height=p.height, width=p.width, negative=[p.negative_prompt or ""] * 2,
        generator=torch.Generator().manual_seed(seed), steps=p.steps, guidance=p.guidance).cpu())


def vae_reconstruction(sd: StableDiffusion, originals: Tensor, metrics: dict) -> Tensor:
    """D(E(x)) of ``originals`` by the SD VAE's posterior mean, (B, 3, H, W) in [-1, 1]; adds
    ``sd_vae_<metric>`` (PSNR / SSIM as cache_latents reports them for our VAE) and ``sd_vae_images``."""
    recon = ReconMetrics()
    with sd.placement.running(sd.vae), torch.no_grad():
        x = originals.to(sd.device, sd.placement.vae_dtype) * 2 - 1
        mean, _ = sd.vae.encode(x)
        x_hat = sd.vae.decode(mean).float().clamp(-1, 1).cpu()
    recon.update(to_uint8(originals), x_hat)
    metrics.update({f"sd_vae_{k}": round(v, 4) for k, v in recon.compute().items()})
    metrics["sd_vae_images"] = len(originals)
    return x_hat


def vae_leakage_scores(sd: StableDiffusion, originals: Tensor, masks: dict[str, np.ndarray], lp: LeakageParams,
                       mask_policy: str, seed: int, metrics: dict) -> VaeLeakage:
    """The SD VAE's decoder and encoder leakage over ``masks``, as stage eval_leakage measures ours;
    adds ``sd_vae_leakage/<alignment>/<scalar>``, the encoder's centre offset and the time taken.

    The alignments are those of our 8-px grid: "aligned" is aligned for SD's decoder, but its encoder
    pads right/bottom before each stride-2 conv and centres latent (i, j) on pixel (8i + 7, 8j + 7),
    3.5 px off its tile, so its ``enc_leak_mean`` under "aligned" masks is measured with offset
    masks: ``sd_vae_leakage/encoder_centre_offset_px`` says so.
    """
    k = min(lp.num_images, len(originals), *(len(v) for v in masks.values()))
    started = time.perf_counter()
    dtype = sd.placement.vae_dtype
    with sd.placement.running(sd.vae), torch.no_grad():
        leak = vae_leakage(lambda im: sd.vae.encode(im.to(dtype))[0].float(),
                           lambda z: sd.vae.decode(z.to(dtype)).float(),
                           originals[:k].to(sd.device) * 2 - 1, masks, samples=lp.samples, scale_factor=SCALE_FACTOR,
                           mask_policy=mask_policy, generator=torch.Generator().manual_seed(seed))
    metrics.update({f"sd_vae_leakage/{key}": value for key, value in leak.scalars().items()})
    metrics["sd_vae_leakage/encoder_centre_offset_px"] = sd.vae.encoder_centre_offset_px
    metrics["sd_vae_leakage_seconds"] = round(time.perf_counter() - started, 1)
    return leak


def flip_view(flip: str) -> Callable[[np.ndarray], np.ndarray]:
    """How an (H, W, C) image looks after the anagram's ``flip`` (vertical, horizontal, rot180)."""
    views: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "vertical": lambda x: x[::-1], "horizontal": lambda x: x[:, ::-1], "rot180": lambda x: x[::-1, ::-1]}
    return views[flip]

