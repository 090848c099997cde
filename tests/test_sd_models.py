"""SD v1 modules converted from an original-layout checkpoint equal diffusers / transformers on
the same weights (float32, max abs diff < 1e-4), and full-size configs have v1-5's exact sizes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffmodels.sd.clip import CLIPTextConfig, CLIPTextEncoder
from diffmodels.sd.convert import convert_checkpoint
from diffmodels.sd.tokenizer import CLIPTokenizer
from diffmodels.sd.unet import SDUNet, SDUNetConfig
from diffmodels.sd.vae import AutoencoderKL, VAEConfig

sd_reference = pytest.importorskip("sd_reference")

TOL = 1e-4


@pytest.fixture(scope="module")
def ref(sd_ref):
    return sd_ref


@pytest.fixture(scope="module")
def ours(ref, tmp_path_factory):
    return sd_reference.convert_reference(ref, tmp_path_factory.mktemp("sd"))


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def test_unet_matches_diffusers(ref, ours):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([3, 917])
    context = torch.randn(2, 7, 32, generator=g)
    expected = ref.unet(x, t, encoder_hidden_states=context).sample
    got = ours.unet(x, t, context)
    assert got.shape == expected.shape == (2, 4, 8, 8)
    assert expected.abs().max() > 1e-2  # a real signal, not two zero outputs
    assert _max_diff(got, expected) < TOL


@torch.no_grad()
def test_vae_matches_diffusers(ref, ours):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    posterior = ref.vae.encode(x).latent_dist
    mean, logvar = ours.vae.encode(x)
    assert mean.shape == (2, 4, 8, 8)
    assert _max_diff(mean, posterior.mean) < TOL
    assert _max_diff(logvar, posterior.logvar) < TOL
    z = torch.randn(2, 4, 8, 8, generator=g)
    expected = ref.vae.decode(z).sample
    assert _max_diff(ours.vae.decode(z), expected) < TOL


@torch.no_grad()
def test_text_encoder_matches_transformers(ref, ours):
    ids = CLIPTokenizer.default()(["a photo of a cat", "an astronaut riding a horse on mars, 4k!"])
    expected = ref.text_encoder(input_ids=ids).last_hidden_state
    got = ours.text_encoder(ids)
    assert got.shape == (2, 77, 32)
    assert _max_diff(got, expected) < TOL


def test_clip_keys_without_text_model_level(ref, tmp_path):
    path = tmp_path / "flat.safetensors"
    sd = sd_reference.original_state_dict(ref, text_model_level=False)
    sd["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, str(path))
    models = convert_checkpoint(path, **sd_reference.CONFIGS)
    w = ref.text_encoder.state_dict()
    key = "text_model.final_layer_norm.weight" if "text_model.final_layer_norm.weight" in w else "final_layer_norm.weight"
    assert torch.equal(models.text_encoder.final_layer_norm.weight, w[key])


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_full_size_original_layout_converts():
    """diffusers' and transformers' own full-size v1-5 architectures, on the meta device (shapes
    only), saved in the original layout with EMA copies and schedule buffers, fill ours exactly."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig as HFCLIPConfig
    from transformers import CLIPTextModel

    from diffmodels.sd.convert import convert_state_dict

    with torch.device("meta"):
        ref = sd_reference.Reference(
            UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8),  # defaults are v1's otherwise
            DiffusersVAE(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4),
            CLIPTextModel(HFCLIPConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")),
        )  # fmt: skip
    sd = sd_reference.original_state_dict(ref)
    for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
        sd["model_ema." + k[len("model.") :].replace(".", "")] = sd[k]
    sd["alphas_cumprod"] = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    assert len(sd) == 686 * 2 + 248 + 196 + 1
    with torch.device("meta"):
        models = convert_state_dict(sd)
    assert models.used_ema
    assert _count(models.unet) == 859_520_964
    assert _count(models.vae) == 83_653_863
    assert _count(models.text_encoder) == 123_060_480


def test_full_size_parameter_counts():
    with torch.device("meta"):  # shapes only: no memory, no init time
        unet, vae, text = SDUNet(SDUNetConfig.full()), AutoencoderKL(VAEConfig.full()), CLIPTextEncoder(CLIPTextConfig.full())
    assert _count(unet) == 859_520_964 and len(unet.state_dict()) == 686
    assert _count(vae) == 83_653_863 and len(vae.state_dict()) == 248
    assert _count(text) == 123_060_480


def test_encoder_centre_offset_is_where_the_downsampling_chain_centres_each_latent():
    """Three SD Downsamples with a uniform kernel: d out(i, j) / d x is a box whose centre is the
    latent's centre, pixel (8i + 7, 8j + 7), i.e. the tile's middle (8i + 3.5) + 3.5 px."""
    from diffmodels.sd.vae import Downsample

    chain = torch.nn.Sequential(*(Downsample(1) for _ in range(3))).double()
    for down in chain:
        torch.nn.init.constant_(down.conv.weight, 1.0 / 9)
        torch.nn.init.zeros_(down.conv.bias)
    x = torch.zeros(1, 1, 64, 64, dtype=torch.float64, requires_grad=True)
    out = chain(x)
    vae = AutoencoderKL(VAEConfig(base_channels=8, channel_mult=(1, 2, 2, 2), norm_groups=4))
    for i, j in ((1, 2), (3, 3), (5, 0)):
        (grad,) = torch.autograd.grad(out[0, 0, i, j], x, retain_graph=True)
        w = grad[0, 0]
        rows, cols = torch.arange(64, dtype=torch.float64)[:, None], torch.arange(64, dtype=torch.float64)[None]
        centre = (float((w * rows).sum() / w.sum()), float((w * cols).sum() / w.sum()))
        assert centre == pytest.approx((8 * i + 3.5 + vae.encoder_centre_offset_px, 8 * j + 3.5 + vae.encoder_centre_offset_px))
    assert vae.encoder_centre_offset_px == 3.5
