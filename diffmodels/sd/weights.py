"""Converted SD weights: convert once from whatever the user has, save in our own layout, load back.

    models = convert_source("v1-5-pruned-emaonly.safetensors", "v1-5", use_ema=True)
    report = verify(models)                       # parameter counts, finite outputs of each network
    save_models("data/models/sd/sd.safetensors", models, "v1-5", info)
    sd = load_pipeline("data/models/sd/sd.safetensors", placement)

The saved file is a diffmodels checkpoint (:mod:`diffmodels.core.checkpoint`): tensors ``unet/...``,
``vae/...``, ``text_encoder/...`` in our module names, with the three configs embedded, so it
rebuilds the models alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from diffmodels.core.checkpoint import (
    load_checkpoint,
    load_module_state,
    save_checkpoint,
)
from diffmodels.core.errors import CheckpointError
from diffmodels.sd.clip import CLIPTextConfig, CLIPTextEncoder
from diffmodels.sd.convert import SDModels, convert_checkpoint, convert_diffusers_folder
from diffmodels.sd.device import Placement
from diffmodels.sd.pipeline import StableDiffusion
from diffmodels.sd.tokenizer import CLIPTokenizer
from diffmodels.sd.unet import SDUNet, SDUNetConfig
from diffmodels.sd.vae import AutoencoderKL, VAEConfig

KIND = "sd_v1"
ARCHITECTURES = {
    "v1-5": dict(unet_config=SDUNetConfig.full(), vae_config=VAEConfig.full(), clip_config=CLIPTextConfig.full()),
    "tiny": dict(unet_config=SDUNetConfig.tiny(), vae_config=VAEConfig.tiny(), clip_config=CLIPTextConfig.tiny()),
}
COMPONENTS = {
    "unet": (SDUNet, SDUNetConfig),
    "vae": (AutoencoderKL, VAEConfig),
    "text_encoder": (CLIPTextEncoder, CLIPTextConfig),
}
HOW_TO = (
    "set sd.checkpoint to a local Stable Diffusion v1.x checkpoint, e.g. "
    "`dvc exp run -S sd.checkpoint=/models/v1-5-pruned-emaonly.safetensors`: an original single file "
    "(.safetensors preferred; .ckpt is read with torch.load(weights_only=True)) or a diffusers folder "
    "(unet/, vae/, text_encoder/ with safetensors). Nothing is downloaded."
)


def checkpoint_status(checkpoint: str | None) -> str | None:
    """Why there is nothing to convert (``None`` when ``checkpoint`` names an existing path)."""
    if not checkpoint:
        return "sd.checkpoint is not set"
    if not Path(checkpoint).exists():
        return f"sd.checkpoint {checkpoint} does not exist"
    return None


def convert_source(path: str | Path, architecture: str, use_ema: bool = True) -> SDModels:
    """A single-file checkpoint or a diffusers folder -> our modules (:class:`CheckpointError` if not)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    path = Path(path)
    configs = ARCHITECTURES[architecture]
    if path.is_dir():
        return convert_diffusers_folder(path, **configs)
    models = convert_checkpoint(path, use_ema=use_ema, **configs)
    if models.unet is None or models.text_encoder is None:
        raise CheckpointError(f"{path}: a VAE-only file; the SD stages need a full checkpoint (UNet, VAE, text encoder)")
    return models


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def verify(models: SDModels) -> dict[str, Any]:
    """Parameter counts, and one finite forward of each network at the smallest size (a converted
    model that loads strictly can still hold NaN/inf weights from a damaged file)."""
    unet, vae, text = models.unet.eval(), models.vae.eval(), models.text_encoder.eval()
    report: dict[str, Any] = {f"params_{name}": num_parameters(getattr(models, name)) for name in COMPONENTS}
    side = 2 ** len(unet.config.channel_mult)  # 2 x 2 at the UNet's deepest level
    z = torch.randn(1, unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    context = text(torch.full((1, text.config.max_length), 49407, dtype=torch.long))
    eps = unet(z, torch.tensor([500]), context)
    image = vae.decode(z[:, : vae.config.z_channels])
    report.update(finite_text_encoder=bool(torch.isfinite(context).all()), finite_unet=bool(torch.isfinite(eps).all()),
                  finite_vae=bool(torch.isfinite(image).all()))  # fmt: skip
    bad = [k for k in ("finite_text_encoder", "finite_unet", "finite_vae") if not report[k]]
    if bad:
        parts = ", ".join(b[len("finite_") :] for b in bad)
        raise CheckpointError(f"converted weights give non-finite outputs ({parts}); is the file damaged?")
    return report


def save_models(path: str | Path, models: SDModels, architecture: str, info: dict[str, Any] | None = None) -> None:
    """Our three modules and their configs in one diffmodels checkpoint, atomically."""
    tensors, configs = {}, {}
    for name in COMPONENTS:
        module = getattr(models, name)
        tensors.update({f"{name}/{k}": v for k, v in module.state_dict().items()})
        configs[name] = dataclasses.asdict(module.config)
    meta = {"kind": KIND, "architecture": architecture, "configs": configs, "used_ema": models.used_ema, **(info or {})}
    save_checkpoint(path, tensors, meta)


def load_models(path: str | Path) -> tuple[SDModels, dict[str, Any]]:
    """Rebuild the modules of a :func:`save_models` file (eval mode, CPU, float32) and its meta."""
    ckpt = load_checkpoint(path)
    if ckpt.meta.get("kind") != KIND:
        raise CheckpointError(f"{path}: not converted SD weights (kind {ckpt.meta.get('kind')!r}); run the convert_sd stage")
    out = SDModels(used_ema=bool(ckpt.meta.get("used_ema")))
    for name, (cls, config_cls) in COMPONENTS.items():
        raw = ckpt.meta["configs"][name]
        config = config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        module = cls(config)
        prefix = name + "/"
        load_module_state(module, {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}, path)
        setattr(out, name, module.eval())
    return out, ckpt.meta


def load_pipeline(path: str | Path, placement: Placement | None = None) -> tuple[StableDiffusion, dict[str, Any]]:
    """A ready :class:`StableDiffusion` (with the shipped CLIP vocabulary) from a :func:`save_models` file."""
    models, meta = load_models(path)
    sd = StableDiffusion(models.unet, models.vae, models.text_encoder, CLIPTokenizer.default())
    return sd.place(placement or Placement()), meta
