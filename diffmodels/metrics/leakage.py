"""Leakage across a mask boundary (docs/metrics.md#decoder-leakage, #encoder-leakage): how far a change in the hole reaches out.

Notation (docs/metrics.md): ``hole`` is the pixel mask H, True = hole (as :mod:`diffmodels.data.masks`);
K = ~hole is the keep-mask; D the decoder (unscaled latents -> images in [-1, 1]); E the
encoder's posterior mean; d(p) the Euclidean distance in pixels from pixel p to the nearest
hole pixel (``scipy.ndimage.distance_transform_edt``; 1 for a kept pixel next to the hole).

Units: images are compared in [0, 1] after ``(x + 1) / 2`` and clamping to [0, 1], what the
saved PNGs hold, so 1/255 is one grey level.

Binning (shared by both profiles): a value at distance d goes to bin ``k = min(floor(d), m)``,
k = 0..m (m = ``max_distance``; 32 px for the decoder, 8 tiles for the encoder): bin k holds
k <= d < k + 1 and the last bin everything at d >= m, so leakage far away is not dropped. Kept
pixels have d >= 1, so bin 0 is empty for pixel profiles; empty bins are NaN.

Latent tiles are 8x8 pixels for our VAE and SD's; in general the stride is read off the shapes
(image side / latent side), so any VAE can be measured.

1. Decoder leakage (:func:`decoder_leakage`). z = E(x); for R replacements z'_r of the hole
   tiles (latent grid mask by the inpainting ``mask_policy``; :func:`latent_replacements`
   draws random normal latents and latents of other images):

       change_r(p) = mean_c | u(D(z'_r))_c(p) - u(D(z))_c(p) |,     u(y) = clamp((y + 1) / 2, 0, 1)
       profile[k]  = mean of change_r(p) over r, images and kept pixels p in bin k
       leak_mean   = mean of change_r(p) over r, images and all kept pixels       (0..1 units)
       leak_radius_px = the smallest k such that profile[k'] < 1/255 for every non-empty bin k' > k
                        (0 when no bin reaches 1/255; m when the last bin does: "m or more")

2. Encoder leakage (:func:`encoder_leakage`). x'_r = x with the hole pixels replaced
   (:func:`hole_fills`: uniform noise or another image), z' = E(x'_r). On the latent grid a
   tile is *kept* if all its 64 pixels are kept (a tile with hole pixels changes by
   construction), its tile distance is the Euclidean distance in tiles to the nearest tile that
   has a hole pixel, and

       profile[k] = sum ||z'_ij - z_ij||_2 / sum ||z_ij||_2      (L2 over channels; sums over r,
                                                                  images and kept tiles in bin k)
       enc_leak_mean = the same ratio over all kept tiles                    (relative, unitless)

   A ratio of sums rather than a mean of ratios, so tiles with a near-zero latent cannot blow up
   the number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from torch import Tensor

from diffmodels.diffusion.inpaint import MaskPolicy, latent_hole

LEVEL = 1.0 / 255.0  # one grey level of an 8-bit image: the leak_radius_px threshold
MAX_DISTANCE_PX = 32
MAX_DISTANCE_TILES = 8


def to_unit(x: Tensor) -> Tensor:
    """Model range [-1, 1] -> [0, 1], clamped (the values an 8-bit PNG keeps), float32."""
    return x.float().add(1.0).div(2.0).clamp(0.0, 1.0)


def as_hole(hole: Tensor) -> Tensor:
    """A boolean hole mask (True = hole) as (B, H, W); accepts (B, 1, H, W) and numpy arrays."""
    hole = torch.as_tensor(hole)
    if hole.ndim == 4:
        hole = hole[:, 0]
    if hole.dtype != torch.bool or hole.ndim != 3:
        raise ValueError(f"hole must be a boolean (B, H, W) or (B, 1, H, W) mask, got {hole.dtype} {tuple(hole.shape)}")
    return hole


def distance_to_hole(hole: Tensor) -> Tensor:
    """d(p): (B, H, W) float64 Euclidean distance in pixels from each pixel to the nearest hole
    pixel (0 on the hole); ``inf`` everywhere for an image without a hole."""
    hole = as_hole(hole).cpu().numpy()
    out = np.full(hole.shape, np.inf)
    for i, h in enumerate(hole):
        if h.any():
            out[i] = distance_transform_edt(~h)  # distance of each non-zero (kept) pixel to the nearest zero
    return torch.from_numpy(out)


def distance_bins(distance: Tensor, max_distance: int) -> Tensor:
    """Bin index min(floor(d), m) of each distance (int64, same shape); inf -> m."""
    return distance.clamp(max=max_distance).floor().long()


def binned_sums(values: Tensor, distance: Tensor, max_distance: int) -> tuple[Tensor, Tensor]:
    """Sums of ``values`` and counts per distance bin 0..m (float64, (m + 1,) each) over the
    elements of ``values`` and ``distance`` (same shape); NaN distances (excluded) are skipped."""
    values, distance = values.double().flatten().cpu(), distance.double().flatten().cpu()
    use = ~distance.isnan()
    bins = distance_bins(distance[use], max_distance)
    sums = torch.bincount(bins, weights=values[use], minlength=max_distance + 1)
    counts = torch.bincount(bins, minlength=max_distance + 1).double()
    return sums, counts


def binned_mean(values: Tensor, distance: Tensor, max_distance: int) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` per distance bin (NaN where empty) and the counts; see :func:`binned_sums`."""
    sums, counts = binned_sums(values, distance, max_distance)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, math.nan)), counts


def leak_radius(profile: list[float] | Tensor, threshold: float = LEVEL) -> int:
    """Smallest bin k with every non-empty bin beyond k below ``threshold``: the largest bin at or
    above it, 0 if none. ``profile[k]`` is the binned mean at distance k (NaN = empty bin)."""
    values = torch.as_tensor(profile, dtype=torch.float64)
    above = ((values >= threshold) & ~values.isnan()).nonzero()
    return int(above.max()) if len(above) else 0


@dataclass(frozen=True)
class LeakageProfile:
    """A binned leakage curve: ``value[k]`` over ``count[k]`` samples at distance bin k (``unit``)."""

    distance: list[int]
    value: list[float]  # NaN where the bin is empty
    count: list[int]
    mean: float  # over every counted sample, all distances
    unit: str  # "px" or "tiles"

    def radius(self, threshold: float = LEVEL) -> int:
        return leak_radius(self.value, threshold)

    def rows(self, **labels: str) -> list[dict]:
        """Plot rows ``{**labels, "distance": k, "value": v}`` for the non-empty bins (dvc plots)."""
        return [{**labels, "distance": k, "value": v} for k, v, n in zip(self.distance, self.value, self.count) if n]


# --------------------------------------------------------------------------------------------
# Decoder leakage (docs/metrics.md#decoder-leakage)
# --------------------------------------------------------------------------------------------


def _others_or_random(x: Tensor, num: int, draw: Callable[[], Tensor], image_ids: Tensor | None = None) -> Tensor:
    """(num, *x.shape) replacements for the items of ``x``: odd r the content of *another* image,
    even r (and every r when the batch holds a single image) ``draw()``, called in order so a
    seeded generator gives the same draws.

    ``image_ids`` (B,) says which image each item shows (default: all different). A batch that
    holds each image once per mask set must say so: rolling it by a multiple of the image count
    would hand an item its own image, a replacement that changes nothing. So the roll is over
    distinct images: at odd r, an item of image k gets image (k - s) mod n, s = 1, 2, ..., n - 1
    in turn, for n distinct images (with all ids different, ``x.roll(s, dims=0)``)."""
    b = x.shape[0]
    ids = torch.arange(b) if image_ids is None else torch.as_tensor(image_ids).cpu()
    if ids.shape != (b,):
        raise ValueError(f"image_ids must have one id per item, shape ({b},), got {tuple(ids.shape)}")
    distinct, index = torch.unique(ids, return_inverse=True)  # index[i] in 0..n-1
    n = len(distinct)
    first = torch.zeros(n, dtype=torch.long).scatter_reduce(0, index, torch.arange(b), "amin", include_self=False)
    out = []
    for r in range(num):
        if r % 2 == 1 and n > 1:
            shift = 1 + (r // 2) % (n - 1)
            out.append(x[first[(index - shift) % n].to(x.device)])
        else:
            out.append(draw())
    return torch.stack(out)


def latent_replacements(
    z: Tensor,
    num: int,
    *,
    scale_factor: float = 1.0,
    generator: torch.Generator | None = None,
    image_ids: Tensor | None = None,
) -> Tensor:
    """R = ``num`` replacement latents (R, B, C, h, w) for the hole tiles of unscaled latents z:
    even r random normal latents N(0, I) / scale_factor (unit variance where the denoiser works),
    odd r the latent of another image of the batch (normal if the batch holds one image;
    ``image_ids`` as :func:`_others_or_random`)."""
    return _others_or_random(
        z, num, lambda: torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device) / scale_factor, image_ids)


@torch.no_grad()
def decoder_leakage(
    decode: Callable[[Tensor], Tensor],
    z: Tensor,
    hole: Tensor,
    replacements: Tensor,
    *,
    mask_policy: MaskPolicy = "nearest",
    max_distance: int = MAX_DISTANCE_PX,
) -> LeakageProfile:
    """Decoder leakage profile (docs/metrics.md#decoder-leakage, module docstring): mean |D(z') - D(z)| in [0, 1] units
    over kept pixels, binned by d(p) in pixels. ``z`` (B, C, h, w) unscaled E(x); ``hole``
    (B, H, W) pixel mask, True = hole; ``replacements`` (R, B, C, h, w) for the hole tiles, which
    are chosen from the pixel hole by ``mask_policy`` as the inpainting methods choose them.
    ``profile.mean`` is ``leak_mean``, ``profile.radius()`` is ``leak_radius_px``."""
    hole = as_hole(hole)
    tiles = latent_hole(hole, mask_policy, grid=hole.shape[-1] // z.shape[-1]).to(z.device)  # (B, 1, h, w)
    dist = distance_to_hole(hole).masked_fill(hole.cpu(), math.nan)  # kept pixels only
    base = to_unit(decode(z))  # (B, C_img, H, W)
    sums = counts = 0
    for z_r in replacements:
        change = (to_unit(decode(torch.where(tiles, z_r, z))) - base).abs().mean(dim=1)  # (B, H, W)
        s, c = binned_sums(change, dist, max_distance)
        sums, counts = sums + s, counts + c
    value = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, math.nan))
    mean = float(sums.sum() / counts.sum()) if counts.sum() > 0 else math.nan
    return LeakageProfile(list(range(max_distance + 1)), value.tolist(), [int(c) for c in counts], mean, "px")


def leakage_scalars(profile: LeakageProfile) -> dict[str, float]:
    """``leak_mean`` (0..1 units) and ``leak_radius_px`` (px) of a decoder profile."""
    return {"leak_mean": profile.mean, "leak_radius_px": profile.radius()}


# --------------------------------------------------------------------------------------------
# Encoder leakage (docs/metrics.md#encoder-leakage)
# --------------------------------------------------------------------------------------------


def hole_fills(
    images: Tensor, num: int, generator: torch.Generator | None = None, *, image_ids: Tensor | None = None
) -> Tensor:
    """R = ``num`` hole contents (R, B, C, H, W) in [-1, 1]: even r uniform noise, odd r another
    image of the batch (noise if the batch holds one image; ``image_ids`` as :func:`_others_or_random`)."""
    return _others_or_random(
        images, num, lambda: (torch.rand(images.shape, generator=generator) * 2 - 1).to(images.device, images.dtype),
        image_ids)


@torch.no_grad()
def encoder_leakage(
    encode: Callable[[Tensor], Tensor],
    images: Tensor,
    hole: Tensor,
    fills: Tensor,
    *,
    max_distance: int = MAX_DISTANCE_TILES,
) -> LeakageProfile:
    """Encoder leakage profile (docs/metrics.md#encoder-leakage, module docstring): relative change of kept latent tiles
    when the hole's pixels are replaced by each of ``fills`` (R, B, C, H, W), binned by tile
    distance to the nearest tile with a hole pixel. ``encode``: images (B, C, H, W) in [-1, 1]
    -> posterior mean (B, C_lat, H/8, W/8). ``profile.mean`` is ``enc_leak_mean``."""
    hole = as_hole(hole)
    z = encode(images).float()  # (B, C_lat, h, w)
    hole_tiles = latent_hole(hole, "conservative", grid=hole.shape[-1] // z.shape[-1])[:, 0]  # (B, h, w): tile has a hole pixel
    dist = distance_to_hole(hole_tiles).masked_fill(hole_tiles.cpu(), math.nan)
    pixel_hole = hole[:, None].to(images.device)
    norm = z.norm(dim=1)  # (B, h, w)
    num = den = counts = 0
    for fill in fills:
        delta = (encode(torch.where(pixel_hole, fill, images)).float() - z).norm(dim=1)  # (B, h, w)
        n, c = binned_sums(delta, dist, max_distance)
        d, _ = binned_sums(norm, dist, max_distance)
        num, den, counts = num + n, den + d, counts + c
    value = torch.where(counts > 0, num / den.clamp(min=1e-30), torch.full_like(num, math.nan))
    mean = float(num.sum() / den.sum().clamp(min=1e-30)) if counts.sum() > 0 else math.nan
    return LeakageProfile(list(range(max_distance + 1)), value.tolist(), [int(c) for c in counts], mean, "tiles")



# --------------------------------------------------------------------------------------------
# A VAE over mask sets: both profiles per mask alignment (stages eval_leakage, sd_baselines)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VaeLeakage:
    """Decoder and encoder profiles of one VAE, keyed by mask alignment (``aligned``, ``offset``)."""

    decoder: dict[str, LeakageProfile]
    encoder: dict[str, LeakageProfile]

    def scalars(self) -> dict[str, float]:
        """``<alignment>/leak_mean``, ``<alignment>/leak_radius_px`` and ``<alignment>/enc_leak_mean``."""
        out: dict[str, float] = {}
        for alignment, profile in self.decoder.items():
            out.update({f"{alignment}/{k}": v for k, v in leakage_scalars(profile).items()})
            out[f"{alignment}/enc_leak_mean"] = self.encoder[alignment].mean
        return out


def mask_alignment(mask_set: str) -> str:
    """``centre_aligned`` -> ``aligned``: the alignment suffix of a mask-set name (docs/metrics.md#mask-sets)."""
    return mask_set.rsplit("_", 1)[-1]


@torch.no_grad()
def vae_leakage(
    encode: Callable[[Tensor], Tensor],
    decode: Callable[[Tensor], Tensor],
    images: Tensor,
    masks: dict[str, np.ndarray | Tensor],
    *,
    samples: int,
    scale_factor: float = 1.0,
    mask_policy: MaskPolicy = "nearest",
    generator: torch.Generator | None = None,
) -> VaeLeakage:
    """Both leakage profiles of a VAE, pooled over the mask sets of each alignment.

    ``images`` (B, C, H, W) in [-1, 1]; ``masks`` maps mask-set names to (>= B, H, W) boolean holes
    (the first B are used, one per image); ``samples`` = R replacements per image. ``encode`` gives
    the posterior mean (unscaled latents), ``decode`` takes unscaled latents; ``scale_factor`` sizes
    the random replacement latents (:func:`latent_replacements`)."""
    b = images.shape[0]
    decoder, encoder = {}, {}
    for alignment in dict.fromkeys(mask_alignment(s) for s in masks):
        sets = [s for s in masks if mask_alignment(s) == alignment]
        hole = torch.cat([torch.as_tensor(masks[s][:b]) for s in sets])
        x = images.repeat(len(sets), 1, 1, 1)  # each image once per mask set
        ids = torch.arange(b).repeat(len(sets))  # so replacements come from other images, never the same one
        z = encode(x)
        replacements = latent_replacements(z, samples, scale_factor=scale_factor, generator=generator, image_ids=ids)
        decoder[alignment] = decoder_leakage(
            decode, z, hole, replacements, mask_policy=mask_policy, max_distance=MAX_DISTANCE_PX)
        fills = hole_fills(x, samples, generator=generator, image_ids=ids)
        encoder[alignment] = encoder_leakage(encode, x, hole, fills, max_distance=MAX_DISTANCE_TILES)
    return VaeLeakage(decoder, encoder)


def leakage_report(result: VaeLeakage, reach: dict[str, object]) -> dict[str, object]:
    """eval_leakage's metrics: the measured scalars (:meth:`VaeLeakage.scalars`) beside what the
    architecture promises (``reach``, :func:`diffmodels.models.vae.locality`): ``receptive_field``
    ``local`` with a finite ``decoder_halo_px`` bound, or ``global`` with ``decoder_halo_px`` None,
    so a conventional VAE is never reported with a halo bound that does not hold. A measured
    ``leak_radius_px`` is capped at the last bin (32 px, "32 or more") whatever the architecture."""
    return {**result.scalars(), **reach}


def report_line(metrics: dict[str, object], alignments: list[str]) -> str:
    """One summary line of a :func:`leakage_report`: the measured leak per alignment, then the bound."""
    measured = "; ".join(
        f"{a}: leak_mean {metrics[f'{a}/leak_mean']:.4f}, leak_radius_px {metrics[f'{a}/leak_radius_px']}, "
        f"enc_leak_mean {metrics[f'{a}/enc_leak_mean']:.4f}" for a in alignments)
    halo = metrics.get("decoder_halo_px")
    if metrics.get("receptive_field") == "global":
        bound = "receptive field global (mid-block attention): no halo bound"
    else:
        bound = f"receptive field local: decoder halo {halo} px"
    return f"{measured}; {bound}"


def profile_table(profiles: dict[str, LeakageProfile]) -> str:
    """TSV for ``dvc plots``: ``distance_<unit>``, then one column of binned values per profile
    (named by its key); bins empty in every profile are left out, empty cells are blank."""
    names = list(profiles)
    first = profiles[names[0]]
    lines = ["\t".join([f"distance_{first.unit}", *names])]
    for i, d in enumerate(first.distance):
        cells = [profiles[n].value[i] for n in names]
        if all(math.isnan(c) for c in cells):
            continue
        lines.append("\t".join([str(d), *("" if math.isnan(c) else f"{c:.6g}" for c in cells)]))
    return "\n".join(lines) + "\n"
