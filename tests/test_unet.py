import pytest
import torch

from diffmodels.serpentine import SerpentineBlock
from diffmodels.unet import AttentionBlock, UNet, UNetConfig, timestep_embedding


def config(**overrides):
    base = dict(in_channels=4, latent_size=8, base_channels=16, channel_mults=(1, 2), blocks_per_level=1,
                mixer="serpentine", mixer_downsample=(1, 2), num_classes=0, norm_groups=4)
    return UNetConfig(**{**base, **overrides})


def randomise_output(model):
    """Residual branches and the output conv start at zero (each block is the identity at init);
    perturb every weight as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("mixer", ["serpentine", "attention", "none"])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_shapes_for_each_mixer_with_and_without_labels(mixer, num_classes):
    torch.manual_seed(0)
    model = randomise_output(UNet(config(mixer=mixer, num_classes=num_classes)))
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 1000])
    labels = torch.tensor([0, 3, 10]) if num_classes else None
    out = model(x, t, labels)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    kinds = {type(m) for m in model.modules()}
    assert (SerpentineBlock in kinds) == (mixer == "serpentine")
    assert (AttentionBlock in kinds) == (mixer == "attention")


def test_fresh_model_outputs_zero_and_conditioning_matters():
    model = UNet(config(num_classes=5))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    assert torch.equal(model(x, t), torch.zeros_like(x)), "zero-initialised output layer"
    randomise_output(model)
    with torch.no_grad():
        a = model(x, t, torch.tensor([0, 0]))
        b = model(x, t, torch.tensor([1, 1]))
        c = model(x, torch.tensor([900, 900]), torch.tensor([0, 0]))
    assert (a - b).abs().max() > 1e-4, "labels change the output"
    assert (a - c).abs().max() > 1e-4, "timesteps change the output"
    assert torch.equal(model(x, t), model(x, t, torch.full((2,), model.null_label))), "no labels = null label"


def test_serpentine_context_blocks_alternate_families_and_sit_at_listed_resolutions():
    model = UNet(config(mixer_downsample=(2,)))
    blocks = [m for m in model.modules() if isinstance(m, SerpentineBlock)]
    # 4x4 level: 1 down + 2 up stages, plus the middle block.
    assert len(blocks) == 4
    families = [b.orders[0].split("_")[0] for b in blocks]
    assert families[:2] == ["rows", "cols"] and len(set(families)) == 2


def test_invalid_geometry_is_a_clear_error():
    with pytest.raises(ValueError, match="latent size 7 must be divisible by 2"):
        UNet(config(latent_size=7))
    with pytest.raises(ValueError, match=r"ddpm.mixer_downsample lists \[4\]; the UNet's 2 levels have factors \[1, 2\]"):
        UNet(config(mixer_downsample=(4,)))


def test_bf16_autocast_on_cpu_runs():
    model = randomise_output(UNet(config(num_classes=3)))
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.tensor([5, 6]), torch.tensor([0, 1]))
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.grad is not None)


def test_config_round_trip_and_timestep_embedding():
    cfg = config(num_classes=4)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    emb = timestep_embedding(torch.tensor([0, 1, 2]), 7)
    assert emb.shape == (3, 7)
    assert torch.allclose(emb[0, :3], torch.ones(3)) and torch.allclose(emb[0, 3:6], torch.zeros(3))


def test_moves_between_dtypes_and_devices():
    """.to() goes through nn.Module._apply, which a helper of the same name once shadowed."""
    model = UNet(config(mixer="attention")).to(torch.float64).to("cpu")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    out = model(torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.tensor([3]))
    assert out.dtype == torch.float64
