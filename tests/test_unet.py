import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from ssm_reference import group_norm, serpentine_reference, silu
from torch import nn

from diffmodels.models.serpentine import SerpentineBlock
from diffmodels.models.unet import (
    AttentionBlock,
    ResBlock,
    UNet,
    UNetConfig,
    timestep_embedding,
)


def config(**overrides):
    base = dict(in_channels=4, latent_size=8, base_channels=16, channel_mult=(1, 2), blocks_per_level=1,
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


# ---- a float64 functional UNet, from the model's weights and the config alone ----------------


def sinusoid(t, dim):
    """Closed form: [cos(t w_0) .. cos(t w_{h-1}), sin(t w_0) .. sin(t w_{h-1})] (+ a zero if dim is
    odd), w_i = 10000^(-i / h), h = dim // 2; float64."""
    half = dim // 2
    rows = []
    for step in t.tolist():
        args = [step * 10000.0 ** (-i / half) for i in range(half)]
        rows.append([math.cos(a) for a in args] + [math.sin(a) for a in args] + [0.0] * (dim % 2))
    return torch.tensor(rows, dtype=torch.float64)


def _w(module):
    return {name: p.detach().double() for name, p in module.named_parameters()}


def _conv(h, conv, stride=1):
    w = _w(conv)
    return F.conv2d(h, w["weight"], w["bias"], stride=stride, padding=conv.padding)


def _gn(h, norm):
    w = _w(norm)
    return group_norm(h, norm.num_groups, w["weight"], w["bias"], norm.eps)


def _res_reference(block, h, emb):
    """GroupNorm, SiLU, conv; plus the projected SiLU(embedding) per channel; GroupNorm, SiLU, conv;
    plus the input (through a 1x1 conv when the width changes)."""
    assert isinstance(block, ResBlock)
    w = _w(block)
    out = _conv(silu(_gn(h, block.norm1)), block.conv1)
    out = out + (silu(emb) @ w["emb.weight"].T + w["emb.bias"])[:, :, None, None]
    out = _conv(silu(_gn(out, block.norm2)), block.conv2)
    return (h if isinstance(block.skip, nn.Identity) else _conv(h, block.skip)) + out


def _attention_reference(block, h):
    """Softmax attention over the H*W positions per head, written out; residual."""
    w = _w(block)
    b, c, height, width = h.shape
    heads, hs = block.heads, c // block.heads
    qkv = torch.einsum("oc,bcl->bol", w["qkv.weight"][:, :, 0, 0], _gn(h, block.norm).flatten(2))
    qkv = qkv + w["qkv.bias"][:, None]
    q, k, v = (qkv[:, i * c : (i + 1) * c].reshape(b, heads, hs, -1) for i in range(3))  # (b, heads, hs, L)
    weights = torch.softmax(torch.einsum("bnil,bnim->bnlm", q, k) / math.sqrt(hs), dim=-1)  # (b, heads, L, L)
    out = torch.einsum("bnlm,bnim->bnil", weights, v).reshape(b, c, height, width)
    return h + _conv(out, block.proj)


def _context_reference(block, h):
    if isinstance(block, nn.Identity):
        return h
    if isinstance(block, AttentionBlock):
        return _attention_reference(block, h)
    assert isinstance(block, SerpentineBlock)
    return serpentine_reference(block, h)


def unet_reference(model, x, t, labels=None):
    """The UNet in float64, walking the levels of the config: stem; per level its res + context
    stages (each output kept as a skip) and a stride-2 conv (kept too); middle res, context, res;
    per level, from the lowest, one more stage than going down, each on [h, last skip] concatenated,
    then nearest 2x upsampling and a conv; GroupNorm, SiLU, conv."""
    cfg, w = model.config, _w(model)
    emb = sinusoid(t, cfg.base_channels)
    emb = silu(emb @ w["time_mlp.0.weight"].T + w["time_mlp.0.bias"])
    emb = emb @ w["time_mlp.2.weight"].T + w["time_mlp.2.bias"]
    if cfg.num_classes:
        labels = torch.full_like(t, cfg.num_classes) if labels is None else labels
        emb = emb + w["label_emb.weight"][labels]
    levels = len(cfg.channel_mult)
    down, up = iter(model.down), iter(model.up)
    h = _conv(x.double(), model.stem)
    skips = [h]
    for level in range(levels):
        for _ in range(cfg.blocks_per_level):
            res, context = next(down)
            h = _context_reference(context, _res_reference(res, h, emb))
            skips.append(h)
        if level < levels - 1:
            h = _conv(h, next(down), stride=2)
            skips.append(h)
    res1, context, res2 = model.mid
    h = _res_reference(res2, _context_reference(context, _res_reference(res1, h, emb)), emb)
    for level in reversed(range(levels)):
        for _ in range(cfg.blocks_per_level + 1):
            res, context = next(up)
            h = _context_reference(context, _res_reference(res, torch.cat([h, skips.pop()], 1), emb))
        if level > 0:
            h = _conv(h.repeat_interleave(2, -2).repeat_interleave(2, -1), next(up)[1])
    assert not skips and next(down, None) is None and next(up, None) is None
    norm, _, conv = model.out
    return _conv(silu(_gn(h, norm)), conv)


@pytest.mark.parametrize("mixer, num_classes, blocks", [("serpentine", 10, 1), ("attention", 0, 1), ("none", 10, 2)])
def test_unet_equals_a_float64_functional_reference(mixer, num_classes, blocks):
    torch.manual_seed(0)
    model = randomise_output(UNet(config(mixer=mixer, num_classes=num_classes, blocks_per_level=blocks)))
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 7, 40])  # small steps: float32 sinusoid arguments stay exact to ~1e-6
    labels = torch.tensor([0, 3, 10]) if num_classes else None
    with torch.no_grad():
        out = model(x, t, labels)
    ref = unet_reference(model, x, t, labels)
    assert out.dtype == x.dtype
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    kinds = {type(m) for m in model.modules()}
    assert (SerpentineBlock in kinds) == (mixer == "serpentine")
    assert (AttentionBlock in kinds) == (mixer == "attention")


@pytest.mark.parametrize("mixer", ["serpentine", "attention", "none"])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_each_item_of_a_batch_is_the_model_on_that_item_alone(mixer, num_classes):
    torch.manual_seed(0)
    model = randomise_output(UNet(config(mixer=mixer, num_classes=num_classes)))
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 1000])
    labels = torch.tensor([0, 3, 10]) if num_classes else None
    with torch.no_grad():
        out = model(x, t, labels)
        for i in range(3):
            alone = model(x[i : i + 1], t[i : i + 1], None if labels is None else labels[i : i + 1])
            torch.testing.assert_close(out[i : i + 1], alone, rtol=1e-5, atol=1e-6)
        if num_classes:  # a new label for item 1 moves item 1 only
            relabelled = model(x, t, torch.tensor([0, 4, 10]))
            torch.testing.assert_close(relabelled[[0, 2]], out[[0, 2]], rtol=1e-5, atol=1e-6)
            assert (relabelled[1] - out[1]).abs().max() > 1e-3


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


def test_bf16_autocast_on_cpu_follows_float32_and_every_parameter_gets_a_gradient():
    model = randomise_output(UNet(config(num_classes=3)))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t, labels = torch.tensor([5, 600]), torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, labels)
    assert out.shape == x.shape
    out.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    ref = model(x, t, labels)
    ref.pow(2).mean().backward()
    ref_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert ((out.float() - ref).norm() / ref.norm()).item() < 4e-2, "bf16 keeps ~3 significant digits"
    assert ((grad - ref_grad).norm() / ref_grad.norm()).item() < 6e-2
    # The label table is the one parameter with entries no input reaches: rows 2 and 3 (the null
    # label) belong to labels absent from the batch, so they get exactly zero gradient.
    used = model.label_emb.weight.grad.abs().sum(1) > 0
    assert used.tolist() == [True, True, False, False]


def test_config_round_trip_and_timestep_embedding():
    cfg = config(num_classes=4)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    # weights files written before the fields took the ddpm params names still load
    renamed = {"channel_mult": "channel_mults", "scan_directions": "serpentine_directions",
               "scan_merge": "serpentine_merge", "ssm_state": "serpentine_state"}
    old = {renamed.get(k, k): list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}
    assert "channel_mults" in old and UNetConfig.from_dict(old.copy()) == cfg
    # and those written before the SSM widths were fields had expand 2 and heads of 32
    del old["ssm_expand"], old["ssm_headdim"]
    assert UNetConfig.from_dict(old) == dataclasses.replace(cfg, ssm_expand=2, ssm_headdim=32)
    emb = timestep_embedding(torch.tensor([0, 1, 2]), 7)
    assert emb.shape == (3, 7)
    assert torch.allclose(emb[0, :3], torch.ones(3)) and torch.allclose(emb[0, 3:6], torch.zeros(3))
    t = torch.tensor([0, 1, 2, 37, 500, 999, 1000])
    for dim in (7, 16, 33):  # float32 arguments t * w_i are exact to ~6e-5 at t = 1000
        torch.testing.assert_close(timestep_embedding(t, dim).double(), sinusoid(t, dim), rtol=0, atol=1e-4)


def test_moves_between_dtypes_and_devices():
    """.to() goes through nn.Module._apply, which a helper of the same name once shadowed."""
    model = UNet(config(mixer="attention")).to(torch.float64).to("cpu")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    out = model(torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.tensor([3]))
    assert out.dtype == torch.float64
