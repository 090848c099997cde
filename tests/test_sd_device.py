"""SD placement: device and dtype choice, float32 sampler state under a lower-precision UNet, and
sequential offload (each component moved to the execution device only while it runs)."""

from __future__ import annotations

import pytest
import torch

from diffmodels.core.errors import DiffmodelsError
from diffmodels.sd.clip import CLIPTextConfig, CLIPTextEncoder
from diffmodels.sd.device import Placement, choose_placement, resolve_dtype
from diffmodels.sd.pipeline import StableDiffusion
from diffmodels.sd.tokenizer import CLIPTokenizer
from diffmodels.sd.unet import SDUNet, SDUNetConfig
from diffmodels.sd.vae import AutoencoderKL, VAEConfig

CPU = torch.device("cpu")
PROMPTS = ["a photo of a cat", "a lighthouse"]


@pytest.fixture
def tiny_sd():
    """Our tiny random components (no diffusers needed), every weight perturbed off its init."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny())
    parts = [SDUNet(SDUNetConfig.tiny()), vae, CLIPTextEncoder(CLIPTextConfig.tiny())]
    with torch.no_grad():
        for model in parts:
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    unet, vae, text = (m.eval() for m in parts)
    yield lambda: StableDiffusion(unet, vae, text, CLIPTokenizer.default())
    torch.set_num_threads(before)


def test_cpu_defaults_to_float32_and_refuses_float16():
    p = choose_placement("cpu")
    assert p == Placement(CPU, torch.float32, torch.float32, False)
    assert choose_placement("auto", "bfloat16").dtype == torch.bfloat16
    with pytest.raises(DiffmodelsError, match="float16 needs a GPU"):
        choose_placement("cpu", "float16")
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, float16, bfloat16"):
        resolve_dtype("half", CPU)


def test_gpu_defaults_to_float16_with_a_float32_vae(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    p = choose_placement("auto", offload=True)
    assert p.device == torch.device("cuda") and p.dtype == torch.float16 and p.vae_dtype == torch.float32
    assert p.home == CPU  # offloaded components wait on the CPU
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    assert choose_placement("auto", vae_dtype="float16").vae_dtype == torch.float16  # asked for explicitly


def test_absent_accelerator_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DiffmodelsError, match="device 'cuda' is not available"):
        choose_placement("cuda")


@torch.no_grad()
def test_offload_runs_each_component_in_turn_with_identical_output(tiny_sd, monkeypatch):
    kwargs = dict(height=8, width=8, steps=3, guidance=5.0)
    plain = tiny_sd().place(choose_placement("cpu")).txt2img(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    sd = tiny_sd().place(choose_placement("cpu", offload=True))
    moves = []
    for name in ("text_encoder", "unet", "vae"):
        module = getattr(sd, name)
        monkeypatch.setattr(module, "to", lambda *a, _to=module.to, _n=name, **k: (moves.append(_n), _to(*a, **k))[1])
    offloaded = sd.txt2img(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(plain, offloaded)
    # there and back, one component at a time, in the order they run
    assert moves == ["text_encoder"] * 2 + ["unet"] * 2 + ["vae"] * 2
    moves.clear()
    sd.img2img(plain, PROMPTS, strength=0.5, steps=4, guidance=5.0, generator=torch.Generator().manual_seed(0))
    assert moves == ["text_encoder"] * 2 + ["vae"] * 2 + ["unet"] * 2 + ["vae"] * 2


@torch.no_grad()
def test_lower_precision_unet_keeps_float32_sampler_state_and_vae(tiny_sd):
    ref = tiny_sd().place(choose_placement("cpu")).txt2img(
        PROMPTS, height=8, width=8, steps=3, generator=torch.Generator().manual_seed(0)
    )
    sd = tiny_sd().place(choose_placement("cpu", dtype="bfloat16"))
    assert next(sd.unet.parameters()).dtype == next(sd.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(sd.vae.parameters()).dtype == torch.float32
    steps = []
    got = sd.txt2img(PROMPTS, height=8, width=8, steps=3, generator=torch.Generator().manual_seed(0), callback=steps.append)
    assert all(s.x.dtype == torch.float32 for s in steps) and got.dtype == torch.float32
    assert torch.isfinite(got).all() and 0 < (got - ref).abs().max() < 0.1  # bf16 UNet: close, not equal


def test_default_placement_follows_the_modules(tiny_sd):
    sd = tiny_sd()
    assert sd.placement == Placement(CPU, torch.float32, torch.float32, False) and sd.device == CPU
