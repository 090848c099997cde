"""Stable Diffusion v1 text-to-image and image-to-image (SDEdit), written out step by step.

    sd = StableDiffusion(unet, vae, text_encoder, tokenizer)
    images = sd.txt2img(["a photo of a cat"], steps=50, guidance=7.5, generator=g)   # (B, 3, H, W) in [0, 1]
    images = sd.img2img(init, ["a watercolour"], strength=0.6, generator=g)

The networks, the schedule and the sampler meet only here (STYLE rule 3): the UNet is wrapped as
``denoise_fn(x, t)`` for the shared samplers (:mod:`diffmodels.samplers`), whose t runs 1..T
while the UNet was trained on the 0-based index t - 1. Latents are scaled by 0.18215 before
diffusion and unscaled before decoding. Random numbers are drawn in diffusers' order (initial
latents; for img2img the VAE posterior sample, then the forward-process noise), so a seeded
generator reproduces diffusers' ``StableDiffusionPipeline`` on the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from diffmodels.samplers import DenoiseFn, Step, ddim_steps, ddim_timesteps, run
from diffmodels.schedule import NoiseSchedule
from diffmodels.sd.clip import CLIPTextEncoder
from diffmodels.sd.tokenizer import CLIPTokenizer
from diffmodels.sd.unet import SDUNet
from diffmodels.sd.vae import SCALE_FACTOR, AutoencoderKL

Spacing = Literal["leading", "trailing"]


def sd_schedule() -> NoiseSchedule:
    """SD v1's training schedule: betas = linspace(sqrt 0.00085, sqrt 0.012, 1000)^2."""
    return NoiseSchedule.from_kind("scaled_linear", 1000, 0.00085, 0.012)


def sd_timesteps(steps: int, num_train_steps: int = 1000, spacing: Spacing = "leading") -> list[int]:
    """DDIM steps in our 1-based t, descending. "leading" is LDM's: 0-based i * (T // steps) + 1
    for i < steps, i.e. 982, 962, ..., 2 for 50 steps (diffusers: leading with steps_offset=1); "trailing"
    starts at t = T (:func:`diffmodels.samplers.ddim_timesteps`)."""
    if spacing == "trailing":
        return ddim_timesteps(steps, num_train_steps)
    if spacing != "leading":
        raise ValueError(f"spacing must be 'leading' or 'trailing', got {spacing!r}")
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"DDIM steps must be in 1..{num_train_steps}, got {steps}")
    ratio = num_train_steps // steps
    return [i * ratio + 2 for i in reversed(range(steps))]


def text_guidance(unet: SDUNet, cond: Tensor, uncond: Tensor, scale: float) -> DenoiseFn:
    """``denoise_fn(x, t)`` with classifier-free guidance on text (Ho & Salimans 2022, eq. 6):

        eps = eps(x, t, uncond) + w (eps(x, t, cond) - eps(x, t, uncond))

    in one batched UNet call ordered [uncond, cond]; ``cond``/``uncond`` are (B, 77, D) contexts.
    t (B,) is our 1-based step; the UNet gets t - 1."""

    def denoise_fn(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1.0:
            return unet(x, t - 1, cond)
        eps_u, eps_c = unet(torch.cat([x, x]), torch.cat([t, t]) - 1, torch.cat([uncond, cond])).chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return denoise_fn


@dataclass
class StableDiffusion:
    unet: SDUNet
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule = field(default_factory=sd_schedule)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_factor(self) -> int:
        """Image pixels per latent pixel (8 for v1's VAE)."""
        return 2 ** (len(self.vae.config.channel_mult) - 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative: list[str] | None = None) -> tuple[Tensor, Tensor]:
        """Prompts -> (cond, uncond) contexts, each (B, 77, D); the negative prompt defaults to ""."""
        negative = negative or [""] * len(prompts)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        ids = self.tokenizer(list(prompts) + list(negative)).to(self.device)
        cond, uncond = self.text_encoder(ids).chunk(2)
        return cond, uncond

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, h f, w f) in [0, 1]."""
        return (self.vae.decode(latents / SCALE_FACTOR) / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def txt2img(
        self,
        prompts: list[str],
        *,
        height: int = 512,
        width: int = 512,
        steps: int = 50,
        guidance: float = 7.5,
        negative: list[str] | None = None,
        spacing: Spacing = "leading",
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        callback: Callable[[Step], None] | None = None,
    ) -> Tensor:
        """Text -> images (B, 3, height, width) in [0, 1] by deterministic DDIM (eta = 0)."""
        f = self.vae_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        # 1. text contexts
        cond, uncond = self.encode_prompts(prompts, negative)
        # 2. initial latents z_T ~ N(0, I)
        shape = (len(prompts), self.unet.config.in_channels, height // f, width // f)
        if latents is None:
            latents = torch.randn(shape, generator=generator, device=self.device)
        # 3. denoise
        denoise_fn = text_guidance(self.unet, cond, uncond, guidance)
        ts = sd_timesteps(steps, self.schedule.num_steps, spacing)
        z0 = run(ddim_steps(denoise_fn, latents, self.schedule, timesteps=ts), callback)
        # 4. decode
        return self.decode(z0)

    @torch.no_grad()
    def img2img(
        self,
        images: Tensor,
        prompts: list[str],
        *,
        strength: float = 0.8,
        steps: int = 50,
        guidance: float = 7.5,
        negative: list[str] | None = None,
        spacing: Spacing = "leading",
        generator: torch.Generator | None = None,
        callback: Callable[[Step], None] | None = None,
    ) -> Tensor:
        """SDEdit (Meng et al. 2022): noise the encoded ``images`` (B, 3, H, W) in [0, 1] to the
        step ``strength`` of the way up the DDIM schedule, then denoise from there. Returns
        (B, 3, H, W) in [0, 1]; strength 1 ignores the input image, small strength keeps it."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        # 1. text contexts
        cond, uncond = self.encode_prompts(prompts, negative)
        # 2. the last int(steps * strength) DDIM steps, as diffusers and LDM's img2img script
        ts = sd_timesteps(steps, self.schedule.num_steps, spacing)
        ts = ts[steps - min(int(steps * strength), steps) :]
        if not ts:
            raise ValueError(f"strength {strength} leaves no DDIM step out of {steps}")
        # 3. z_t = q_sample(scaled posterior sample, t_start)
        z0 = self.vae.sample(images.to(self.device) * 2 - 1, generator) * SCALE_FACTOR
        noise = torch.randn(z0.shape, generator=generator, device=z0.device)
        t0 = torch.full((z0.shape[0],), ts[0], device=z0.device, dtype=torch.long)
        zt = self.schedule.q_sample(z0, t0, noise)
        # 4. denoise and decode
        denoise_fn = text_guidance(self.unet, cond, uncond, guidance)
        return self.decode(run(ddim_steps(denoise_fn, zt, self.schedule, timesteps=ts), callback))
