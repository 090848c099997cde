"""Localized VAE: geometry, decoder halo, SE context, KL, learning, weights file."""

import math

import pytest
import torch

from diffmodels.core.errors import CheckpointError
from diffmodels.models.vae import (
    GRID,
    VAE,
    Decoder,
    Encoder,
    VAEConfig,
    decoder_halo,
    kl_standard_normal,
    load_vae,
    save_vae,
    vae_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> VAEConfig:
    cfg = dict(in_channels=1, latent_channels=3, base_channels=4, channel_mult=(1, 1, 2, 2), blocks_per_level=1,
               se=True, se_reduction=2, decoder_kernel=3, upsample="nearest")
    return VAEConfig(**{**cfg, **overrides})


@pytest.mark.parametrize("height,width", [(8, 8), (16, 16), (24, 40), (64, 32)])
def test_shapes_follow_stride_8(height, width):
    torch.manual_seed(0)
    vae = VAE(tiny()).eval()
    x = torch.rand(2, 1, height, width) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        x_hat, mean2, _ = vae(x, torch.Generator().manual_seed(0))
    assert mean.shape == logvar.shape == (2, 3, height // GRID, width // GRID)
    assert x_hat.shape == x.shape
    assert torch.equal(mean, mean2)


@pytest.mark.parametrize("height,width", [(20, 16), (16, 12), (7, 8)])
def test_size_not_multiple_of_8_is_a_one_line_error(height, width):
    vae = VAE(tiny())
    with pytest.raises(ValueError, match=r"not a multiple of 8") as info:
        vae.encode(torch.zeros(1, 1, height, width))
    assert "\n" not in str(info.value) and f"{height}x{width}" in str(info.value)


def test_halo_values_follow_the_documented_formula():
    # r * (sum of pixel scales of the k x k convs), see the table in diffmodels/models/vae.py
    assert decoder_halo(tiny()) == 22
    assert decoder_halo(tiny(decoder_kernel=7)) == 3 * 22
    assert decoder_halo(tiny(decoder_kernel=5)) == 2 * 22
    assert decoder_halo(tiny(upsample="pixel_shuffle")) == 29
    assert decoder_halo(tiny(blocks_per_level=2)) == 22 + 2 * (4 + 2 + 1)
    assert Decoder(tiny(decoder_kernel=7)).halo == 66
    assert decoder_halo(tiny(decoder_kernel_scales=(2, 1))) == 3 * 2 + 3 * 1 + 1
    assert decoder_halo(tiny(decoder_kernel_scales=(1,))) == 4
    assert decoder_halo(tiny(decoder_kernel_scales=(4, 2))) == 3 * 4 + 3 * 2
    assert decoder_halo(tiny(decoder_kernel=5, decoder_kernel_scales=(), upsample="pixel_shuffle")) == 0
    assert decoder_halo(tiny(upsample="pixel_shuffle", decoder_kernel_scales=(2, 1))) == 4 + 2 + 2 * (2 + 1) + 1


@pytest.mark.parametrize("scales", [(4, 4), (3,), (8, 2)])
def test_bad_decoder_kernel_scales_are_a_one_line_error(scales):
    with pytest.raises(ValueError, match="decoder_kernel_scales") as info:
        tiny(decoder_kernel_scales=scales)
    assert "\n" not in str(info.value)


def changed_extent(diff: torch.Tensor) -> tuple[int, int, int, int]:
    """(row min, row max, col min, col max) of the non-zero entries of an (H, W) map."""
    rows, cols = torch.nonzero(diff, as_tuple=True)
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


@pytest.mark.parametrize("kernel,upsample,scales", [(3, "nearest", (4, 2, 1)), (7, "nearest", (4, 2, 1)),
                                                    (3, "pixel_shuffle", (4, 2, 1)), (3, "nearest", (2, 1)),
                                                    (5, "nearest", (1,)), (3, "pixel_shuffle", (4, 1))])
def test_decoder_changes_stay_inside_tile_plus_halo_and_reach_it(kernel, upsample, scales):
    torch.manual_seed(0)
    cfg = tiny(decoder_kernel=kernel, upsample=upsample, decoder_kernel_scales=scales)
    decoder = Decoder(cfg).double().eval()
    halo = decoder.halo
    i = math.ceil(halo / GRID) + 1  # the tile, with its halo clear of the image border
    side = 2 * i + 1
    z = torch.randn(1, 3, side, side, dtype=torch.float64)
    z2 = z.clone()
    z2[:, :, i, i] += torch.randn(3, dtype=torch.float64)
    with torch.no_grad():
        diff = (decoder(z2) - decoder(z)).abs()[0].amax(0)  # (H, W)
    lo, hi = GRID * i - halo, GRID * i + GRID - 1 + halo
    assert changed_extent(diff) == (lo, hi, lo, hi)  # exactly the tile plus the halo, all 4 sides


def test_encoder_receptive_field_without_se_and_global_context_with_se():
    torch.manual_seed(0)
    radius = Encoder(tiny(se=False)).receptive_radius
    assert radius == 1 + 2 * (1 + 2 + 4 + 8) + 8
    i = math.ceil(radius / GRID) + 1
    size = GRID * (2 * i + 1)
    x = torch.rand(1, 1, size, size, dtype=torch.float64) * 2 - 1

    def tile_change(encoder: Encoder, row: int, col: int) -> float:
        x2 = x.clone()
        x2[0, 0, row, col] += 0.5
        with torch.no_grad():
            return float((encoder(x2)[0] - encoder(x)[0])[0, :, i, i].abs().max())

    edge = GRID * i - radius  # first pixel row inside the receptive field of tile (i, i)
    local = Encoder(tiny(se=False)).double().eval()
    assert tile_change(local, edge - 1, GRID * i) == 0.0  # just outside: nothing
    assert tile_change(local, 0, 0) == 0.0  # far away: nothing
    assert tile_change(local, edge, GRID * i) > 0.0  # the outermost ring inside: reached

    torch.manual_seed(0)
    global_ctx = Encoder(tiny(se=True)).double().eval()
    assert tile_change(global_ctx, 0, 0) > 0.0  # SE's global pool carries far pixels in


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean = torch.randn(4, 3, 5, 6, dtype=torch.float64) * 2
    logvar = torch.randn(4, 3, 5, 6, dtype=torch.float64) * 3
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(kl_standard_normal(mean, logvar), reference, rtol=1e-10, atol=1e-12)
    x = torch.zeros(4, 1, 40, 48)
    losses = vae_loss(x, x + 0.5, mean.float(), logvar.float(), "l1", beta_kl=0.1)
    assert losses["recon"].item() == pytest.approx(0.5)
    assert losses["kl"].item() == pytest.approx(reference.mean().item(), rel=1e-5)  # mean over elements
    assert losses["loss"].item() == pytest.approx(0.5 + 0.1 * reference.mean().item(), rel=1e-5)


def blobs(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 1, size, size) images in [-1, 1]: one soft Gaussian blob each."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * size
    width = 2 + torch.rand(n, generator=g) * size / 4
    d2 = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
    return (2 * torch.exp(-d2 / (2 * width[:, None, None] ** 2)) - 1).unsqueeze(1)


def test_short_run_overfits_16_images():
    torch.manual_seed(0)
    vae = VAE(tiny(base_channels=8))
    x = blobs(16, 16, seed=1)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(100):
        x_hat, mean, logvar = vae(x, gen)
        loss = vae_loss(x, x_hat, mean, logvar, "l1", beta_kl=1e-4)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < first / 4, (first, last)  # falls by a factor of 4 or more


def test_weights_round_trip_rebuilds_from_the_file_alone(tmp_path):
    torch.manual_seed(0)
    vae = VAE(tiny(decoder_kernel=5, upsample="pixel_shuffle", se=False)).eval()
    save_vae(tmp_path / "vae.safetensors", vae, {"step": 7})
    loaded, meta = load_vae(tmp_path / "vae.safetensors")
    assert loaded.config == vae.config and meta["step"] == 7 and not loaded.training
    x = torch.rand(2, 1, 16, 24) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x)[0]), vae.decode(vae.encode(x)[0]))


def test_weights_from_another_config_or_kind_are_clear_errors(tmp_path):
    from diffmodels.core.checkpoint import save_checkpoint

    vae = VAE(tiny())
    save_checkpoint(tmp_path / "other.safetensors", vae.state_dict(), {"kind": "ddpm"})
    with pytest.raises(CheckpointError, match="not VAE weights"):
        load_vae(tmp_path / "other.safetensors")
    wrong = VAE(tiny(base_channels=8)).config.to_dict()
    save_checkpoint(tmp_path / "wrong.safetensors", vae.state_dict(), {"kind": "vae", "config": wrong})
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_vae(tmp_path / "wrong.safetensors")


# --------------------------------------------------------------------------------------------
# Conventional arch (the LDM / SD autoencoder at our widths)
# --------------------------------------------------------------------------------------------


def conventional(**overrides) -> VAEConfig:
    return tiny(**{"arch": "conventional", "norm_groups": 2, **overrides})


@pytest.mark.parametrize("height,width", [(8, 8), (16, 24), (64, 32)])
def test_conventional_shapes_follow_stride_8(height, width):
    torch.manual_seed(0)
    vae = VAE(conventional()).eval()
    x = torch.rand(2, 1, height, width) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        x_hat, mean2, _ = vae(x, torch.Generator().manual_seed(0))
    assert mean.shape == logvar.shape == (2, 3, height // GRID, width // GRID)
    assert x_hat.shape == x.shape and torch.equal(mean, mean2)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        vae.encode(torch.zeros(1, 1, 12, 16))


def test_conventional_attention_is_softmax_attention_over_all_positions():
    """The mid-block attention against a float64 softmax written out."""
    from diffmodels.models.vae import SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(8, 2).double()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    n = attn.norm(x).flatten(2)  # (B, C, N)
    q, k, v = (torch.einsum("oc,bcn->bno", f.weight[:, :, 0, 0], n) + f.bias for f in (attn.q, attn.k, attn.v))
    w = torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1)  # (B, N, N)
    y = torch.einsum("oc,bnc->bon", attn.proj_out.weight[:, :, 0, 0], w @ v) + attn.proj_out.bias[:, None]
    torch.testing.assert_close(attn(x), x + y.reshape(2, 8, 3, 5), rtol=1e-10, atol=1e-10)


def test_conventional_decoder_is_global_and_localized_is_not():
    """One latent tile changed: the conventional decoder changes the far corner of the image (mid-
    block attention, GroupNorm), the localized one leaves everything beyond its halo alone."""
    torch.manual_seed(0)
    z = torch.randn(1, 3, 6, 6)
    z2 = z.clone()
    z2[:, :, 0, 0] += 3.0
    for cfg, far_changes in ((conventional(), True), (tiny(), False)):
        vae = VAE(cfg).eval()
        with torch.no_grad():
            delta = (vae.decode(z2) - vae.decode(z)).abs()[0, 0]  # (48, 48)
        assert (delta[-8:, -8:].min() > 1e-7) == far_changes  # tile (5, 5): 40 px beyond tile (0, 0)
    assert decoder_halo(conventional()) is None and decoder_halo(tiny()) == 22


def test_conventional_encoder_is_global():
    torch.manual_seed(0)
    vae = VAE(conventional()).eval()
    x = torch.rand(1, 1, 48, 48) * 2 - 1
    x2 = x.clone()
    x2[..., :8, :8] = -1.0
    with torch.no_grad():
        change = (vae.encode(x2)[0] - vae.encode(x)[0]).abs()[0].amax(0)  # (6, 6)
    assert change[-1, -1] > 1e-6


def test_locality_report_per_arch():
    from diffmodels.models.vae import locality

    assert locality(conventional()) == {"receptive_field": "global", "decoder_halo_px": None,
                                        "encoder_receptive_field": "global", "encoder_receptive_radius_px": None}
    local = locality(tiny(se=False))
    assert local["receptive_field"] == "local" and local["decoder_halo_px"] == 22
    assert local["encoder_receptive_field"] == "local" and local["encoder_receptive_radius_px"] == Encoder(
        tiny(se=False)).receptive_radius
    assert locality(tiny(se=True))["encoder_receptive_field"] == "global"  # SE's global pool


def test_conventional_group_count_must_divide_the_widths():
    with pytest.raises(ValueError, match="norm_groups 3 must divide"):
        conventional(norm_groups=3)
    tiny(norm_groups=3)  # the localized arch has no GroupNorm: ignored
    with pytest.raises(ValueError, match="arch must be one of"):
        tiny(arch="unet")


def test_conventional_weights_round_trip_and_old_files_load_as_localized(tmp_path):
    from diffmodels.core.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    vae = VAE(conventional()).eval()
    save_vae(tmp_path / "vae.safetensors", vae, {"step": 3})
    loaded, meta = load_vae(tmp_path / "vae.safetensors")
    assert loaded.config == vae.config and loaded.config.arch == "conventional" and meta["step"] == 3
    x = torch.rand(2, 1, 16, 24) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x)[0]), vae.decode(vae.encode(x)[0]))
    # a file written before arch / norm_groups existed
    old = VAE(tiny())
    config = {k: v for k, v in old.config.to_dict().items() if k not in ("arch", "norm_groups")}
    save_checkpoint(tmp_path / "old.safetensors", old.state_dict(), {"kind": "vae", "config": config})
    assert load_vae(tmp_path / "old.safetensors")[0].config.arch == "localized"
    # a conventional file read with the localized key names fails clearly
    ckpt = load_checkpoint(tmp_path / "vae.safetensors")
    save_checkpoint(tmp_path / "mixed.safetensors", ckpt.tensors,
                    {"kind": "vae", "config": {**ckpt.meta["config"], "arch": "localized"}})
    with pytest.raises(CheckpointError, match="missing"):
        load_vae(tmp_path / "mixed.safetensors")


def test_discriminator_rides_in_the_weights_file_and_load_vae_ignores_it(tmp_path):
    from diffmodels.models.discriminator import DiscriminatorConfig, PatchDiscriminator, load_discriminator

    torch.manual_seed(0)
    vae = VAE(tiny()).eval()
    disc = PatchDiscriminator(DiscriminatorConfig(1, 4, 2)).eval()
    save_vae(tmp_path / "vae.safetensors", vae, discriminator=disc)
    loaded, meta = load_vae(tmp_path / "vae.safetensors")
    assert meta["discriminator"] == {"in_channels": 1, "channels": 4, "layers": 2}
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    d2 = load_discriminator(tmp_path / "vae.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded.encode(x)[0], vae.encode(x)[0])
        assert torch.equal(d2(x), disc(x))
    save_vae(tmp_path / "plain.safetensors", vae)
    with pytest.raises(CheckpointError, match="no discriminator"):
        load_discriminator(tmp_path / "plain.safetensors")
