"""Tiny random SD v1 components in diffusers / transformers, and their weights in the ORIGINAL
single-file key layout, for testing the converter against independent implementations.

The diffusers -> original mapping here is written independently of ``diffmodels.sd.convert``
(regex rewrites from the table in shared/reference/sd15.md), so a wrong row on either side
shows up as a conversion error or an output mismatch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig as HFCLIPConfig  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from diffmodels.sd.clip import CLIPTextConfig  # noqa: E402
from diffmodels.sd.convert import SDModels, convert_checkpoint  # noqa: E402
from diffmodels.sd.tokenizer import CLIPTokenizer  # noqa: E402
from diffmodels.sd.unet import SDUNetConfig  # noqa: E402
from diffmodels.sd.vae import VAEConfig  # noqa: E402

UNET_CONFIG = SDUNetConfig.tiny()  # 32/64 channels, attention at level 0, 2 heads, 32-d context
VAE_CONFIG = VAEConfig.tiny()  # 32/64 channels
CLIP_CONFIG = CLIPTextConfig.tiny()  # width 32, 2 layers, 4 heads
CONFIGS = dict(unet_config=UNET_CONFIG, vae_config=VAE_CONFIG, clip_config=CLIP_CONFIG)




@dataclass
class Reference:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel


def build_reference(seed: int = 0) -> Reference:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,  # diffusers' legacy name: the number of heads in SD v1
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    )
    text = CLIPTextModel(
        HFCLIPConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    # Zero-initialised layers (conv_out, proj_out, ...) would hide mapping mistakes: perturb all.
    with torch.no_grad():
        for model in (unet, vae, text):
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return Reference(unet.eval(), vae.eval(), text.eval())


_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def unet_to_original(key: str, L: int = 2, up_attention: tuple[bool, ...] = (False, True)) -> str:
    """A diffusers UNet2DConditionModel key -> its CompVis name (without the model prefix)."""

    def res(sub: str) -> str:
        head, rest = sub.split(".", 1)
        return f"{_RES[head]}.{rest}"

    simple = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
              "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}  # fmt: skip
    for a, b in simple.items():
        if key.startswith(a):
            return b + key[len(a) :]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.0.{res(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{res(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.0.{res(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        b = int(m[1])
        return f"output_blocks.{b * (L + 1) + L}.{2 if up_attention[b] else 1}.conv.{m[2]}"
    raise KeyError(key)


def vae_to_original(key: str, levels: int = 2) -> str:
    """A diffusers AutoencoderKL key -> its CompVis name (decoder levels reversed)."""
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    key = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", key)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    key = re.sub(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)", lambda m: "mid.attn_1." + attn[m[1]], key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample", key)
    return key


def original_state_dict(ref: Reference, text_model_level: bool = True) -> dict[str, Tensor]:
    """All three components under their single-file prefixes, as a CompVis checkpoint stores them."""
    L = ref.unet.config.layers_per_block
    up_attention = tuple("CrossAttn" in t for t in ref.unet.config.up_block_types)
    sd = {"model.diffusion_model." + unet_to_original(k, L, up_attention): v.clone() for k, v in ref.unet.state_dict().items()}
    for k, v in ref.vae.state_dict().items():
        k = vae_to_original(k, len(ref.vae.config.block_out_channels))
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", k):
            v = v[:, :, None, None]  # the original stores these projections as 1x1 convolutions
        sd["first_stage_model." + k] = v.clone()
    for k, v in ref.text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k
        if not text_model_level:
            k = k[len("text_model.") :]
        sd["cond_stage_model.transformer." + k] = v.clone()
    return sd


def convert_reference(ref: Reference, folder: Path) -> SDModels:
    """Save ``ref`` as an original single-file checkpoint in ``folder`` and convert it back."""
    path = folder / "tiny.safetensors"
    save_file(original_state_dict(ref), str(path))
    return convert_checkpoint(path, **CONFIGS)


def write_tokenizer_folder(tokenizer: CLIPTokenizer, folder: Path) -> Path:
    """``tokenizer``'s vocabulary as a diffusers ``tokenizer/`` folder (vocab.json + merges.txt)."""
    (folder / "vocab.json").write_text(json.dumps(tokenizer.encoder), encoding="utf-8")
    merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return folder
