"""Leakage, fidelity and seam metrics (docs/metrics.md) on constructed cases with known answers."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.image import StructuralSimilarityIndexMeasure

from diffmodels.diffusion.inpaint import upsample_tiles
from diffmodels.metrics.fidelity import (
    masked_mae,
    masked_psnr,
    masked_ssim,
    preserved_fidelity,
    ssim_map,
)
from diffmodels.metrics.leakage import (
    LEVEL,
    LeakageProfile,
    _others_or_random,
    binned_mean,
    decoder_leakage,
    distance_to_hole,
    encoder_leakage,
    hole_fills,
    latent_replacements,
    leak_radius,
    leakage_scalars,
    mask_alignment,
    profile_table,
    vae_leakage,
)
from diffmodels.metrics.seam import boundary_band, seam_score
from diffmodels.models.vae import VAE, VAEConfig, decoder_halo

pytestmark = pytest.mark.usefixtures("one_thread")

NAN = math.nan


# --------------------------------------------------------------------------------------------
# Distances and binning
# --------------------------------------------------------------------------------------------


def test_profile_binning_by_integer_pixel_distance_with_a_last_catch_all_bin():
    """Hole = column 0 of a 4 x 40 image, so d(p) = column index; values = d: bin k averages k."""
    hole = torch.zeros(1, 4, 40, dtype=torch.bool)
    hole[:, :, 0] = True
    d = distance_to_hole(hole)
    assert torch.equal(d[0, 2], torch.arange(40, dtype=torch.float64))
    mean, count = binned_mean(d.masked_fill(hole, NAN), d.masked_fill(hole, NAN), 32)
    assert len(mean) == 33 and math.isnan(mean[0]) and count[0] == 0, "kept pixels have d >= 1"
    assert mean[1:32].tolist() == [float(k) for k in range(1, 32)]
    assert count[1:32].tolist() == [4.0] * 31
    assert mean[32] == np.mean(np.arange(32, 40)) and count[32] == 4 * 8, "bin 32 holds every d >= 32"


def test_non_integer_distances_go_to_the_floor_bin():
    hole = torch.zeros(1, 3, 3, dtype=torch.bool)
    hole[0, 0, 0] = True
    d = distance_to_hole(hole)[0]
    expected = torch.tensor([[0, 1, 2], [1, math.sqrt(2), math.sqrt(5)], [2, math.sqrt(5), math.sqrt(8)]], dtype=torch.float64)
    torch.testing.assert_close(d, expected)
    _, count = binned_mean(torch.ones(3, 3), d.masked_fill(hole[0], NAN), 32)
    assert count[:4].tolist() == [0, 3, 5, 0]  # 1, 1, sqrt2 | 2, 2, sqrt5, sqrt5, sqrt8
    assert torch.isinf(distance_to_hole(torch.zeros(1, 2, 2, dtype=torch.bool))).all(), "no hole: infinitely far"


def test_leak_radius_is_the_last_bin_at_or_above_one_grey_level():
    assert leak_radius([NAN, 0.1, 0.05, 0.001, 0.02, 0.0, 0.0]) == 4
    assert leak_radius([NAN, 0.1, LEVEL, 0.0]) == 2, "at the threshold counts as leaking"
    assert leak_radius([NAN, 0.9 * LEVEL, 0.0]) == 0
    assert leak_radius([NAN, 0.1, NAN, 0.0, NAN]) == 1, "empty bins are ignored"
    assert leak_radius([NAN, 0.0, 0.0, 0.5]) == 3, "the last (catch-all) bin: radius m or more"


# --------------------------------------------------------------------------------------------
# Decoder leakage with synthetic decoders
# --------------------------------------------------------------------------------------------

W_TILE = torch.tensor([[0.9, -0.5, 0.3]])  # 3 latent channels -> 1 image channel


def tile_decoder(z):
    """Identity-like decoder: each 8x8 tile is a function of its own latent only."""
    y = torch.tanh(torch.einsum("oc,bchw->bohw", W_TILE.to(z.dtype), z))  # (B, 1, h, w) in (-1, 1)
    return y.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)


def blur_decoder(z):
    """The tile decoder followed by a 7x7 box blur: every change spreads 3 px (Chebyshev)."""
    y = F.pad(tile_decoder(z), (3, 3, 3, 3), mode="replicate")
    return F.conv2d(y, torch.full((1, 1, 7, 7), 1 / 49, dtype=z.dtype))


def aligned_hole(batch=2, tiles=6):
    t = torch.zeros(batch, 1, tiles, tiles, dtype=torch.bool)
    t[:, :, 2:4, 1:3] = True
    return upsample_tiles(t)[:, 0]  # (B, 48, 48)


def latents(batch=2, tiles=6, seed=0):
    return torch.randn(batch, 3, tiles, tiles, generator=torch.Generator().manual_seed(seed))


def test_identity_like_decoder_leaks_nothing_beyond_its_tile():
    z, hole = latents(), aligned_hole()
    reps = latent_replacements(z, 4, scale_factor=0.5, generator=torch.Generator().manual_seed(1))
    prof = decoder_leakage(tile_decoder, z, hole, reps)
    assert prof.unit == "px" and prof.distance == list(range(33))
    nonempty = [v for v, n in zip(prof.value, prof.count) if n]
    assert nonempty and all(v == 0.0 for v in nonempty)
    assert leakage_scalars(prof) == {"leak_mean": 0.0, "leak_radius_px": 0}
    assert sum(prof.count) == 4 * int((~hole).sum()), "every kept pixel of every replacement is counted"
    changed = (tile_decoder(torch.where(hole[:, None, ::8, ::8], reps[0], z)) - tile_decoder(z)).abs()
    assert changed[hole[:, None]].mean() > 0.05, "the hole itself does change"


def test_misaligned_hole_changes_kept_pixels_only_inside_replaced_tiles():
    z, hole = latents(), aligned_hole()
    hole = torch.roll(hole, shifts=(3, 3), dims=(1, 2))  # edges 3 px off the grid
    reps = latent_replacements(z, 2, generator=torch.Generator().manual_seed(2))
    for policy in ("nearest", "conservative"):
        prof = decoder_leakage(tile_decoder, z, hole, reps, mask_policy=policy)
        assert all(v == 0.0 for v, n in zip(prof.value[8:], prof.count[8:]) if n), policy
        assert prof.mean > 0 and 1 <= prof.radius() <= 7, policy


def test_decoder_followed_by_a_7x7_blur_has_leak_radius_of_at_least_3_px():
    z, hole = latents(), aligned_hole()
    reps = latent_replacements(z, 4, generator=torch.Generator().manual_seed(3))
    prof = decoder_leakage(blur_decoder, z, hole, reps)
    assert prof.radius() >= 3 and leakage_scalars(prof)["leak_radius_px"] >= 3
    assert min(prof.value[1:4]) >= LEVEL
    # a change reaches Chebyshev distance 3, i.e. d <= sqrt(18) = 4.24 px: nothing from bin 5 on
    assert all(v == 0.0 for v, n in zip(prof.value[5:], prof.count[5:]) if n)
    assert prof.radius() <= 4
    assert prof.value[1] > prof.value[2] > prof.value[3], "leakage falls with distance"
    assert 0 < prof.mean < prof.value[1]


def test_replacements_are_normal_latents_and_other_images():
    z = latents(batch=3)
    reps = latent_replacements(z, 4, scale_factor=0.25, generator=torch.Generator().manual_seed(0))
    assert reps.shape == (4, *z.shape)
    assert torch.equal(reps[1], z.roll(1, 0)) and torch.equal(reps[3], z.roll(2, 0))
    assert 3.0 < float(reps[0].std()) < 5.0, "N(0, 1) / scale_factor"


def test_real_vae_decoder_leaks_nothing_beyond_its_halo():
    torch.manual_seed(0)
    cfg = VAEConfig(in_channels=1, latent_channels=3, base_channels=4, channel_mult=(1, 1, 2, 2), blocks_per_level=1,
                    se=False, se_reduction=2, decoder_kernel=3, upsample="nearest")
    vae = VAE(cfg).double().eval()
    assert decoder_halo(cfg) == 22
    z = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    hole = torch.zeros(1, 48, 48, dtype=torch.bool)
    hole[:, :8, :8] = True  # tile (0, 0)
    prof = decoder_leakage(vae.decode, z, hole, latent_replacements(z, 2, generator=torch.Generator().manual_seed(0)))
    # d >= 32 means Chebyshev distance >= 23 > halo: the catch-all bin is exactly unchanged
    assert prof.count[32] > 0 and prof.value[32] == 0.0
    assert prof.mean > 0 and prof.radius() <= 31


# --------------------------------------------------------------------------------------------
# Encoder leakage
# --------------------------------------------------------------------------------------------


def local_encoder(x):
    return F.avg_pool2d(x, 8)


def global_encoder(x):
    """Tile means plus the image mean: a stand-in for SE's global context."""
    return F.avg_pool2d(x, 8) + x.mean(dim=(2, 3), keepdim=True)


def test_encoder_leakage_known_answers():
    """x = 0.5, hole = tile (0, 0) of 32x32 filled with -0.5: the image mean falls by 1/16, so
    the global encoder moves every kept tile (value 1.0) by exactly 1/16; the local one by 0."""
    x = torch.full((1, 1, 32, 32), 0.5, dtype=torch.float64)
    hole = torch.zeros(1, 32, 32, dtype=torch.bool)
    hole[:, :8, :8] = True
    fills = torch.full((1, 1, 1, 32, 32), -0.5, dtype=torch.float64)
    prof = encoder_leakage(global_encoder, x, hole, fills)
    assert prof.unit == "tiles" and len(prof.value) == 9
    assert prof.count[:5] == [0, 3, 5, 6, 1] and sum(prof.count) == 15  # tile distances 1, sqrt2 | 2 .. | 4.24
    for k in range(1, 5):
        assert prof.value[k] == pytest.approx(1 / 16, abs=1e-12)
    assert prof.mean == pytest.approx(1 / 16, abs=1e-12)
    local = encoder_leakage(local_encoder, x, hole, fills)
    assert local.mean == 0.0 and all(v == 0.0 for v, n in zip(local.value, local.count) if n)


def test_encoder_leakage_of_real_vaes_with_and_without_se():
    """Without SE nothing beyond the receptive field (39 px) moves: tiles >= 8 tiles away are
    >= 6 tiles (40 px) clear of the hole in Chebyshev distance. With SE they move."""
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    hole = torch.zeros(2, 64, 64, dtype=torch.bool)
    hole[:, :8, :8] = True
    fills = hole_fills(x, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fills[1], x.roll(1, 0)) and fills[0].abs().max() <= 1
    profiles = {}
    for se in (False, True):
        torch.manual_seed(0)
        cfg = VAEConfig(in_channels=1, latent_channels=3, base_channels=4, channel_mult=(1, 1, 2, 2),
                        blocks_per_level=1, se=se, se_reduction=2, decoder_kernel=3, upsample="nearest")
        vae = VAE(cfg).double().eval()
        profiles[se] = encoder_leakage(lambda im: vae.encode(im)[0], x, hole, fills)  # noqa: B023 - called at once
    assert profiles[False].count[8] > 0 and profiles[False].value[8] == 0.0
    assert profiles[True].value[8] > 0.0
    assert profiles[False].value[1] > 0.0, "neighbours inside the receptive field do move"


# --------------------------------------------------------------------------------------------
# A VAE over mask sets
# --------------------------------------------------------------------------------------------


def test_vae_leakage_pools_mask_sets_per_alignment():
    """Tile encoder/decoder pair: aligned holes leak nothing at all; offset holes leak only inside
    the replaced tiles (decoder) and never into fully kept tiles (encoder)."""
    x = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    aligned = aligned_hole().numpy()
    masks = {"box_aligned": aligned, "flip_aligned": aligned[:, ::-1].copy(),
             "box_offset": np.roll(aligned, 3, axis=(1, 2))}
    assert [mask_alignment(m) for m in masks] == ["aligned", "aligned", "offset"]

    def encode(im):
        return F.avg_pool2d(im, 8).repeat(1, 3, 1, 1) * torch.tensor([1.0, 0.5, -1.0], dtype=im.dtype)[:, None, None]

    result = vae_leakage(encode, tile_decoder, x, masks, samples=2, generator=torch.Generator().manual_seed(1))
    assert list(result.decoder) == list(result.encoder) == ["aligned", "offset"]
    assert sum(result.decoder["aligned"].count) == 2 * int((~torch.from_numpy(aligned)).sum()) * 2, "2 sets x 2 samples"
    scalars = result.scalars()
    assert scalars["aligned/leak_mean"] == 0.0 and scalars["aligned/leak_radius_px"] == 0
    assert scalars["aligned/enc_leak_mean"] == 0.0 and scalars["offset/enc_leak_mean"] == 0.0
    assert scalars["offset/leak_mean"] > 0 and 1 <= scalars["offset/leak_radius_px"] <= 7


def test_profile_table_has_one_column_per_profile_and_skips_empty_bins():
    a = LeakageProfile([0, 1, 2, 3], [NAN, 0.5, NAN, 0.125], [0, 4, 0, 2], 0.375, "px")
    b = LeakageProfile([0, 1, 2, 3], [NAN, 0.25, 1e-7, NAN], [0, 4, 1, 0], 0.2, "px")
    assert profile_table({"aligned": a, "offset": b}) == (
        "distance_px\taligned\toffset\n1\t0.5\t0.25\n2\t\t1e-07\n3\t0.125\t\n")


# --------------------------------------------------------------------------------------------
# Preserved-region fidelity
# --------------------------------------------------------------------------------------------


def _image(seed=0, size=24):
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.6 - 0.8


def _box_hole(size=24):
    hole = torch.zeros(2, size, size, dtype=torch.bool)
    hole[:, 6:14, 5:17] = True
    return hole


def test_fidelity_of_an_exact_copy_and_a_known_offset():
    x, hole = _image(), _box_hole()
    out = torch.where(hole[:, None], -x, x)  # hole content is irrelevant
    assert masked_psnr(out, x, hole).tolist() == [100.0, 100.0], "a perfect match is capped at 100 dB"
    assert masked_mae(out, x, hole).tolist() == [0.0, 0.0]
    torch.testing.assert_close(masked_ssim(x, x, hole), torch.ones(2, dtype=torch.float64))
    shifted = torch.where(hole[:, None], torch.ones_like(x), x + 0.1)  # +0.05 in [0, 1] units on kept pixels
    torch.testing.assert_close(masked_mae(shifted, x, hole), torch.full((2,), 0.05, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(masked_psnr(shifted, x, hole), torch.full((2,), 10 * math.log10(1 / 0.0025), dtype=torch.float64),
                               rtol=0, atol=1e-4)
    assert (masked_ssim(shifted, x, hole) < 1).all()
    fid = preserved_fidelity(shifted, x, shifted, hole)
    assert fid["psnr_recon"].tolist() == [100.0, 100.0] and fid["mae_recon"].tolist() == [0.0, 0.0]
    torch.testing.assert_close(fid["mae_image"], masked_mae(shifted, x, hole))
    assert set(fid) == {f"{m}_{r}" for m in ("psnr", "ssim", "mae") for r in ("image", "recon")}


def test_ssim_map_interior_mean_is_torchmetrics_ssim():
    a, b = (_image(0) + 1) / 2, (_image(1) * 0.3 + _image(0) * 0.7 + 1) / 2
    ours = ssim_map(a, b).mean()  # torchmetrics averages the whole reflect-padded map
    ref = StructuralSimilarityIndexMeasure(data_range=1.0)(a.float(), b.float())
    assert float(ours) == pytest.approx(float(ref), abs=1e-5)


def test_fidelity_needs_a_kept_pixel():
    x = _image()
    with pytest.raises(ValueError, match="no kept pixels"):
        masked_mae(x, x, torch.ones(2, 24, 24, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# Seam score
# --------------------------------------------------------------------------------------------


def _smooth(size=16):
    yy, xx = torch.meshgrid(torch.linspace(-0.6, 0.6, size, dtype=torch.float64),
                            torch.linspace(-0.5, 0.7, size, dtype=torch.float64), indexing="ij")
    return (0.5 * torch.sin(3 * xx) + 0.4 * yy).expand(1, 1, size, size).clone()


def test_boundary_band_is_two_pixels_each_side():
    hole = torch.zeros(1, 16, 16, dtype=torch.bool)
    hole[:, 4:12, 4:12] = True
    band = boundary_band(hole)[0]
    # hole side: the 8x8 box minus its 4x4 core = 48; kept side: 2 rows x 8 on 4 sides + the 4 diagonal corners
    assert int((band & hole[0]).sum()) == 48 and int((band & ~hole[0]).sum()) == 64 + 4
    assert not band[0, 0] and band[2, 4] and band[3, 3] and not band[2, 2]


def test_seam_score_is_one_for_the_image_itself_and_rises_for_a_visible_patch():
    x = _smooth()
    hole = torch.zeros(1, 16, 16, dtype=torch.bool)
    hole[:, 4:12, 4:12] = True
    assert seam_score(x, x, hole).tolist() == [1.0]
    patched = torch.where(hole[:, None], torch.full_like(x, 0.9), x)
    assert float(seam_score(patched, x, hole)) > 2.0
    softer = torch.where(hole[:, None], x + 0.1, x)  # a smaller step at the edge
    assert 1.0 < float(seam_score(softer, x, hole)) < float(seam_score(patched, x, hole))
    assert math.isnan(float(seam_score(x, x, torch.zeros(1, 16, 16, dtype=torch.bool)))), "no boundary, no seam"


@pytest.mark.parametrize("num_images, num_sets", [(1, 2), (2, 2), (2, 4), (3, 2)])
def test_vae_leakage_never_replaces_an_image_by_itself(num_images, num_sets):
    """The batch holds each image once per mask set; a replacement must still be another image
    or random, for every item and every sample: the hole's latents (decoder) and pixels (encoder)
    always change. (Rolling the repeated batch by a multiple of the image count gave an item its
    own image: with 1 image half the samples, with 2 images one in four, measured zero change.)"""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(num_images, 1, 48, 48, generator=g, dtype=torch.float64) * 2 - 1
    masks = {f"set{i}_aligned": aligned_hole(batch=num_images).numpy() for i in range(num_sets)}
    decoded, encoded = [], []

    def decode(z):
        decoded.append(z)
        return tile_decoder(z)

    def encode(im):
        encoded.append(im)
        return F.avg_pool2d(im, 8).repeat(1, 3, 1, 1)

    vae_leakage(encode, decode, x, masks, samples=6, generator=torch.Generator().manual_seed(1))
    hole = torch.from_numpy(np.concatenate(list(masks.values())))  # (num_sets * B, 48, 48)
    tiles = hole[:, None, ::8, ::8]
    base_z, *replaced_z = decoded
    base_x, *replaced_x = encoded[1:]  # encoded[0]: the latents the decoder profile starts from
    assert len(replaced_z) == len(replaced_x) == 6
    for r, (z_r, x_r) in enumerate(zip(replaced_z, replaced_x)):
        dz = (z_r - base_z).abs().where(tiles, 0).flatten(1).amax(1)  # (items,)
        dx = (x_r - base_x).abs().where(hole[:, None], 0).flatten(1).amax(1)
        assert (dz > 0).all(), f"sample {r}: some item's hole latents were replaced by its own"
        assert (dx > 0).all(), f"sample {r}: some item's hole pixels were replaced by its own"


def test_replacements_follow_image_ids_and_keep_the_plain_roll_without_them():
    x = torch.arange(6.0).view(6, 1)
    draws = iter(torch.full((6, 1), -float(i)) for i in range(1, 10))
    plain = _others_or_random(x, 4, lambda: next(draws))
    assert torch.equal(plain[1], x.roll(1, 0)) and torch.equal(plain[3], x.roll(2, 0))
    ids = torch.tensor([0, 1, 2, 0, 1, 2])  # 3 images, 2 mask sets
    by_id = _others_or_random(x[[0, 1, 2, 0, 1, 2]], 6, lambda: next(draws), ids)
    assert by_id[1].flatten().tolist() == [2, 0, 1, 2, 0, 1]
    assert by_id[3].flatten().tolist() == [1, 2, 0, 1, 2, 0]
    assert by_id[5].flatten().tolist() == [2, 0, 1, 2, 0, 1], "shifts cycle over the 2 other images"
    single = _others_or_random(x[:1].repeat(3, 1), 2, lambda: torch.full((3, 1), 7.0), torch.zeros(3))
    assert (single == 7).all(), "one image: every replacement is random"
    with pytest.raises(ValueError, match="one id per item"):
        _others_or_random(x, 2, lambda: x, torch.zeros(5))


def test_leakage_report_of_a_conventional_vae_is_flagged_global():
    """eval_leakage's metrics and line: the conventional VAE gets no halo bound, the localized its 22 px."""
    from diffmodels.metrics.leakage import leakage_report, report_line
    from diffmodels.models.vae import locality

    torch.manual_seed(0)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    hole = torch.zeros(2, 32, 32, dtype=torch.bool)
    hole[:, 8:16, 8:16] = True
    for arch, flag, bound in (("conventional", "global", None), ("localized", "local", 22)):
        cfg = VAEConfig(in_channels=1, latent_channels=3, base_channels=4, channel_mult=(1, 1, 2, 2), blocks_per_level=1,
                        se=False, se_reduction=2, decoder_kernel=3, upsample="nearest", arch=arch, norm_groups=2)
        vae = VAE(cfg).eval()
        result = vae_leakage(lambda x, vae=vae: vae.encode(x)[0], vae.decode, images, {"centre_aligned": hole}, samples=2,
                             generator=torch.Generator().manual_seed(0))
        metrics = leakage_report(result, locality(cfg))
        assert metrics["receptive_field"] == flag and metrics["decoder_halo_px"] == bound
        assert metrics["aligned/leak_mean"] == result.decoder["aligned"].mean
        line = report_line(metrics, ["aligned"])
        if arch == "conventional":
            assert "receptive field global" in line and "no halo bound" in line and "halo 22" not in line
            assert metrics["aligned/enc_leak_mean"] > 0  # GroupNorm and attention: the encoder leaks too
        else:
            assert line.endswith("receptive field local: decoder halo 22 px")
