"""Stable Diffusion v1 pipelines, written out step by step: text-to-image, image-to-image
(SDEdit), latent inpainting and visual anagrams.

    sd = StableDiffusion(unet, vae, text_encoder, tokenizer).place(choose_placement("auto"))
    images = sd.txt2img(["a photo of a cat"], steps=50, guidance=7.5, generator=g)   # (B, 3, H, W) in [0, 1]
    images = sd.img2img(init, ["a watercolour"], strength=0.6, generator=g)
    images = sd.inpaint(init, holes, ["a red door"], generator=g)
    images = sd.anagram(["an old man"], ["a campfire"], flip="vertical", generator=g)

The networks, the schedule and the sampler meet only here (docs/design.md#layers): the UNet is wrapped as
``denoise_fn(x, t)`` for the shared samplers (:mod:`diffmodels.diffusion.samplers`), whose t runs 1..T
while the UNet was trained on the 0-based index t - 1. Latents are scaled by 0.18215 before
diffusion and unscaled before decoding. Every path's last DDIM step lands on alpha_bar_1 =
1 - beta_1, not on 1, as in LDM's sampler and v1-5's scheduler config (``set_alpha_to_one=False``).
Random numbers are drawn in diffusers' order (initial latents; for img2img the VAE posterior
sample, then the forward-process noise), so a seeded generator reproduces diffusers'
``StableDiffusionPipeline`` on the same weights. Noise is always drawn on the generator's device
(the CPU by default) and moved, so a seed means the same noise on CPU, CUDA and MPS.

Placement (:mod:`diffmodels.sd.device`): the UNet and text encoder run in ``placement.dtype``, the
VAE in ``placement.vae_dtype``; the sampler's own arithmetic stays in float32 whatever the
network precision, and with ``placement.offload`` each component visits the accelerator only
while it runs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffmodels.diffusion.samplers import (
    DenoiseFn,
    FinalAlphaBar,
    Step,
    ddim_steps,
    ddim_timesteps,
    run,
    visual_anagram,
)
from diffmodels.diffusion.schedule import NoiseSchedule
from diffmodels.sd.clip import CLIPTextEncoder
from diffmodels.sd.device import Placement
from diffmodels.sd.tokenizer import CLIPTokenizer
from diffmodels.sd.unet import SDUNet
from diffmodels.sd.vae import SCALE_FACTOR, AutoencoderKL

Spacing = Literal["leading", "trailing"]
EpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (z_t, 0-based timestep, context) -> eps

# Anagram views: orthogonal pixel permutations that are their own inverse (Geng et al. 2024, sec. 3.2),
# applied to latents (B, C, h, w).
FLIPS: dict[str, Callable[[Tensor], Tensor]] = {
    "vertical": lambda z: z.flip(-2),  # upside down
    "horizontal": lambda z: z.flip(-1),  # mirror
    "rot180": lambda z: z.flip(-2, -1),
}


def sd_schedule() -> NoiseSchedule:
    """SD v1's training schedule: betas = linspace(sqrt 0.00085, sqrt 0.012, 1000)^2."""
    return NoiseSchedule.from_kind("scaled_linear", 1000, 0.00085, 0.012)


def sd_timesteps(steps: int, num_train_steps: int = 1000, spacing: Spacing = "leading") -> list[int]:
    """DDIM steps in our 1-based t, descending. "leading" is LDM's: 0-based i * (T // steps) + 1
    for i < steps, i.e. 982, 962, ..., 2 for 50 steps (diffusers: leading with steps_offset=1); "trailing"
    starts at t = T (:func:`diffmodels.diffusion.samplers.ddim_timesteps`)."""
    if spacing == "trailing":
        return ddim_timesteps(steps, num_train_steps)
    if spacing != "leading":
        raise ValueError(f"spacing must be 'leading' or 'trailing', got {spacing!r}")
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"DDIM steps must be in 1..{num_train_steps}, got {steps}")
    ratio = num_train_steps // steps
    return [i * ratio + 2 for i in reversed(range(steps))]


def text_guidance(unet: EpsFn, cond: Tensor, uncond: Tensor, scale: float) -> DenoiseFn:
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


def schedule_on(schedule: NoiseSchedule, device: torch.device) -> NoiseSchedule:
    """A copy of ``schedule`` with its arrays on ``device`` (float32 on MPS, which lacks float64)."""
    out = copy.copy(schedule)
    for name, value in vars(out).items():
        if isinstance(value, Tensor):
            setattr(out, name, value.to(device, torch.float32 if device.type == "mps" else value.dtype))
    return out


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """N(0, I) float32 drawn on the generator's device (the CPU without one), then moved to ``device``."""
    source = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=source).to(device)


@dataclass
class StableDiffusion:
    unet: SDUNet
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule = field(default_factory=sd_schedule)
    placement: Placement | None = None  # None: where and in which dtype the modules already are
    # v1-5's scheduler_config.json has set_alpha_to_one=False: the last DDIM step stops at
    # alphas_cumprod[0] (our alpha_bar_1), the least noisy step SD was trained on; "one" lands on 1.
    final_alpha_bar: FinalAlphaBar = "first"

    def __post_init__(self) -> None:
        if self.placement is None:
            first = next(self.unet.parameters())
            self.placement = Placement(first.device, first.dtype, next(self.vae.parameters()).dtype)

    def place(self, placement: Placement) -> StableDiffusion:
        """Cast and move the components for ``placement`` (modules change in place; returns self).
        With offload they wait on the CPU, already cast, until :meth:`Placement.running`."""
        self.placement = placement
        self.text_encoder.to(placement.home, placement.dtype)
        self.unet.to(placement.home, placement.dtype)
        self.vae.to(placement.home, placement.vae_dtype)
        return self

    @property
    def device(self) -> torch.device:
        """Where the networks run (and where returned images are)."""
        return self.placement.device

    @property
    def vae_factor(self) -> int:
        """Image pixels per latent pixel (8 for v1's VAE)."""
        return 2 ** (len(self.vae.config.channel_mult) - 1)

    # -- the three networks, each run on the execution device in its dtype ----------------------

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """Texts -> CLIP contexts (N, 77, D) in the UNet's dtype, on the execution device."""
        with self.placement.running(self.text_encoder):
            return self.text_encoder(self.tokenizer(list(texts)).to(self.device))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative: list[str] | None = None) -> tuple[Tensor, Tensor]:
        """Prompts -> (cond, uncond) contexts, each (B, 77, D); the negative prompt defaults to ""."""
        negative = negative or [""] * len(prompts)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        cond, uncond = self.encode_text(list(prompts) + list(negative)).chunk(2)
        return cond, uncond

    def _eps(self, x: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        """The UNet in its dtype; float32 latents in and eps out (the sampler's arithmetic)."""
        dtype = self.placement.dtype
        return self.unet(x.to(dtype), timesteps, context.to(dtype)).float()

    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> scaled posterior samples z_0 (B, 4, H/f, W/f), float32."""
        with self.placement.running(self.vae):
            x = images.to(self.device, self.placement.vae_dtype) * 2 - 1
            return self.vae.sample(x, generator).float() * SCALE_FACTOR

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, h f, w f) float32 in [0, 1]."""
        with self.placement.running(self.vae):
            z = (latents.to(self.device) / SCALE_FACTOR).to(self.placement.vae_dtype)
            return (self.vae.decode(z).float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def denoise(
        self,
        denoise_fn: DenoiseFn,
        latents: Tensor,
        timesteps: list[int],
        callback: Callable[[Step], None] | None = None,
    ) -> Tensor:
        """Deterministic DDIM (eta = 0) from ``latents`` z_t at ``timesteps[0]`` down to
        ``final_alpha_bar`` (alpha_bar_1 for v1-5), the UNet on the execution device for the whole
        loop. A ``callback`` may edit ``step.x`` in place: the sampler continues from it (the
        inpainting blend does)."""
        schedule = schedule_on(self.schedule, self.device)
        x = latents.to(self.device, torch.float32)
        with self.placement.running(self.unet):
            return run(ddim_steps(denoise_fn, x, schedule, timesteps=timesteps, final_alpha_bar=self.final_alpha_bar), callback)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's stride times the UNet's (64 for v1)."""
        return self.vae_factor * 2 ** (len(self.unet.config.channel_mult) - 1)

    def _check_size(self, height: int, width: int) -> tuple[int, int]:
        f, m = self.vae_factor, self.size_multiple
        if height % m or width % m:
            raise ValueError(f"height and width must be multiples of {m}, got {height}x{width}")
        return height // f, width // f

    def _guided(self, cond: Tensor, uncond: Tensor, guidance: float) -> DenoiseFn:
        return text_guidance(self._eps, cond, uncond, guidance)

    # -- pipelines -------------------------------------------------------------------------------

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
        h, w = self._check_size(height, width)
        # 1. text contexts
        cond, uncond = self.encode_prompts(prompts, negative)
        # 2. initial latents z_T ~ N(0, I)
        if latents is None:
            latents = randn((len(prompts), self.unet.config.in_channels, h, w), generator, self.device)
        # 3. denoise
        ts = sd_timesteps(steps, self.schedule.num_steps, spacing)
        z0 = self.denoise(self._guided(cond, uncond, guidance), latents, ts, callback)
        # 4. decode
        return self.decode(z0)

    @torch.no_grad()
    def anagram(
        self,
        upright: list[str],
        flipped: list[str],
        *,
        flip: str | Callable[[Tensor], Tensor] = "vertical",
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
        """Visual anagrams (Geng et al. 2024): images (B, 3, height, width) in [0, 1] that read as
        ``upright[i]`` as they are and as ``flipped[i]`` after ``flip`` (a name in :data:`FLIPS`,
        or any self-inverse pixel permutation of latents). Each step averages the guided eps of
        the upright latent under prompt A with the un-flipped guided eps of the flipped latent
        under prompt B (:func:`diffmodels.diffusion.samplers.visual_anagram`); the flip acts on the latent
        grid, which the VAE maps to (nearly) the flipped image."""
        if len(upright) != len(flipped):
            raise ValueError(f"{len(upright)} upright prompts for {len(flipped)} flipped prompts")
        if isinstance(flip, str):
            if flip not in FLIPS:
                raise ValueError(f"flip must be one of {', '.join(FLIPS)}, got {flip!r}")
            flip = FLIPS[flip]
        h, w = self._check_size(height, width)
        n = len(upright)
        # 1. text contexts: A, B and the shared negative in one encoder call
        negative = negative or [""] * n
        if len(negative) != n:
            raise ValueError(f"{len(negative)} negative prompts for {n} prompts")
        cond_a, cond_b, uncond = self.encode_text(list(upright) + list(flipped) + list(negative)).split(n)
        # 2. initial latents
        if latents is None:
            latents = randn((n, self.unet.config.in_channels, h, w), generator, self.device)
        # 3. denoise with the averaged predictions, then decode
        fn = visual_anagram(self._guided(cond_a, uncond, guidance), self._guided(cond_b, uncond, guidance), flip)
        ts = sd_timesteps(steps, self.schedule.num_steps, spacing)
        return self.decode(self.denoise(fn, latents, ts, callback))

    def _strength_timesteps(self, steps: int, strength: float, spacing: Spacing) -> list[int]:
        """The last int(steps * strength) DDIM steps, as diffusers and LDM's img2img script."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        ts = sd_timesteps(steps, self.schedule.num_steps, spacing)
        ts = ts[steps - min(int(steps * strength), steps) :]
        if not ts:
            raise ValueError(f"strength {strength} leaves no DDIM step out of {steps}")
        return ts

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
        ts = self._strength_timesteps(steps, strength, spacing)
        # 1. text contexts
        cond, uncond = self.encode_prompts(prompts, negative)
        # 2. z_t = q_sample(scaled posterior sample, t_start)
        z0 = self.encode_images(images, generator)
        noise = randn(tuple(z0.shape), generator, self.device)
        t0 = torch.full((z0.shape[0],), ts[0], device=self.device, dtype=torch.long)
        zt = schedule_on(self.schedule, self.device).q_sample(z0, t0, noise)
        # 3. denoise and decode
        return self.decode(self.denoise(self._guided(cond, uncond, guidance), zt, ts, callback))

    @torch.no_grad()
    def inpaint(
        self,
        images: Tensor,
        masks: Tensor,
        prompts: list[str],
        *,
        strength: float = 1.0,
        steps: int = 50,
        guidance: float = 7.5,
        negative: list[str] | None = None,
        spacing: Spacing = "leading",
        generator: torch.Generator | None = None,
        callback: Callable[[Step], None] | None = None,
    ) -> Tensor:
        """Latent inpainting with the text-to-image UNet by blending (Avrahami et al. 2023,
        "Blended Latent Diffusion"; diffusers' StableDiffusionInpaintPipeline with a 4-channel UNet):
        after every DDIM step the known region is replaced by the image latents noised to the new
        step, and by the clean latents after the last one,

            z_{t'} <- (1 - m) q_sample(z_0^img, t', n) + m z_{t'}

        with m the hole mask at latent resolution (nearest downsampling of the binarised mask).
        ``images`` (B, 3, H, W) in [0, 1]; ``masks`` (B, 1, H, W) or (B, H, W), 1 / True = hole.
        strength 1 starts from pure noise, lower strength from the noised image (as img2img).
        Returns the decoded images (B, 3, H, W) in [0, 1]; the known pixels go through the VAE."""
        ts = self._strength_timesteps(steps, strength, spacing)
        if masks.ndim == 3:
            masks = masks[:, None]
        if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:] or masks.shape[1] != 1:
            raise ValueError(f"masks must be (B, 1, H, W) matching images {tuple(images.shape)}, got {tuple(masks.shape)}")
        self._check_size(*images.shape[-2:])
        # 1. text contexts
        cond, uncond = self.encode_prompts(prompts, negative)
        # 2. image latents, then the noise (diffusers' random-number order), and z at the first step
        z0 = self.encode_images(images, generator)
        noise = randn(tuple(z0.shape), generator, self.device)
        schedule = schedule_on(self.schedule, self.device)
        b = z0.shape[0]
        if strength == 1.0:
            zt = noise
        else:
            zt = schedule.q_sample(z0, torch.full((b,), ts[0], device=self.device, dtype=torch.long), noise)
        # 3. the hole at latent resolution
        m = F.interpolate((masks.float() >= 0.5).float().to(self.device), size=z0.shape[-2:])

        def blend(step: Step) -> None:
            if step.t == ts[-1]:
                # after the last step the known region is the clean latents, whatever alpha_bar the
                # step landed on (alpha_bar_1 for v1-5), as in diffusers' blend
                known = z0
            else:
                known = schedule.q_sample(z0, torch.full((b,), step.t_prev, device=self.device, dtype=torch.long), noise)
            step.x.copy_((1 - m) * known + m * step.x)  # in place: the sampler continues from step.x
            if callback is not None:
                callback(step)

        # 4. denoise with the blend, and decode
        return self.decode(self.denoise(self._guided(cond, uncond, guidance), zt, ts, blend))
