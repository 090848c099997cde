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


def changed_extent(diff: torch.Tensor) -> tuple[int, int, int, int]:
    """(row min, row max, col min, col max) of the non-zero entries of an (H, W) map."""
    rows, cols = torch.nonzero(diff, as_tuple=True)
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


@pytest.mark.parametrize("kernel,upsample", [(3, "nearest"), (7, "nearest"), (3, "pixel_shuffle")])
def test_decoder_changes_stay_inside_tile_plus_halo_and_reach_it(kernel, upsample):
    torch.manual_seed(0)
    cfg = tiny(decoder_kernel=kernel, upsample=upsample)
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
