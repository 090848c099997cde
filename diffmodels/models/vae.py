"""Localized VAE: a stride-8 convolutional autoencoder whose decoder is local.

Geometry (G = 8, exact)
    Three 2x downsamples, each a 2x2 convolution with stride 2 and no padding, so latent (i, j)
    is computed from the pixel block [8i, 8i+8) x [8j, 8j+8) plus the symmetric reach of the
    3x3 convolutions around it, and decodes to that same block plus a halo. Images must have
    sides that are multiples of 8 (anything else raises a one-line :class:`ValueError`).

Encoder
    conv_in 3x3 -> per level l = 0..3 (pixel scale 2^l): ``blocks_per_level`` residual blocks,
    then a 2x2/stride-2 downsample after levels 0..2 -> norm, SiLU, conv 3x3 -> (mean, logvar),
    each ``latent_channels`` deep. With ``se=True`` every encoder block ends in
    Squeeze-and-Excitation (Hu et al. 2018): a *global* average pool rescales channels, so
    pixels anywhere in the image can change a tile's encoding (global channel context, no
    spatial mixing). With ``se=False`` nothing outside the encoder's receptive field
    (:attr:`Encoder.receptive_radius` pixels beyond the tile) can: that is why the encoder also
    uses :class:`ChannelNorm` instead of the GroupNorm of SD's VAE, whose statistics are
    computed over the whole image and would leak globally.

Decoder
    conv_in 1x1 -> ``blocks_per_level`` pointwise (1x1) residual blocks at the latent grid
    ("tile MLPs": no spatial reach at stride 8, where one step is 8 pixels) -> three times:
    upsample 2x then ``blocks_per_level`` residual blocks with k x k convolutions
    (k = ``decoder_kernel``, 3 by default) -> norm, SiLU, conv_out k x k. Upsampling is
    ``nearest`` (repeat, then a k x k conv at the new scale) or ``pixel_shuffle`` (a k x k conv
    to 4x channels at the old scale, then PixelShuffle). ``decoder_kernel_scales`` lists the
    pixel scales (4, 2, 1) whose convs are k x k (default all three); at a scale left out, the
    upsample into it, its blocks (and at scale 1 conv_out) use 1x1 convs: a smaller halo for
    less spatial smoothing. No attention and only :class:`ChannelNorm` (per-pixel LayerNorm
    over channels): nothing mixes positions globally.

Halo (:attr:`Decoder.halo`, :func:`decoder_halo`)
    A k x k convolution (r = k // 2) applied where one position spans s pixels widens the set of
    affected pixels by r * s on each side; nearest/pixel-shuffle upsampling maps position p to
    pixels [2p, 2p + 1] exactly and adds nothing; 1x1 convs add nothing. So a change in latent
    tile (i, j) can reach exactly the pixels within ``halo = r * sum(s over k x k convs)`` of
    the tile [8i, 8i+8) x [8j, 8j+8) (Chebyshev distance) and no further. With one block per
    level (two convs per block):

    =============  ==============================================  ===========
    upsample       k x k convs at scale s                          halo (r=1)
    =============  ==============================================  ===========
    nearest        up+2 convs at s=4, 2, 1; conv_out at 1          r*(3*4+3*2+3*1+1) = 22
    pixel_shuffle  up at 8, 4, 2; 2 convs at 4, 2, 1; conv_out 1   r*(8+4+2+2*(4+2+1)+1) = 29
    =============  ==============================================  ===========

    k = 7 (r = 3) triples it. A scale left out of ``decoder_kernel_scales`` drops its terms:
    nearest with scales (2, 1) gives r*(3*2+3*1+1) = 10, with (1,) r*(3+1) = 4. Tests check both
    that nothing leaks past the halo and that the outermost halo ring is reached (the bound is
    tight).

Loss (:func:`vae_loss`)
    reconstruction (L1 or MSE, mean over pixels) + beta * KL, where KL is the closed form of
    KL(N(mean, exp(logvar)) || N(0, 1)), *averaged* over latent elements and over the batch.
    Both terms are per-element means, so ``beta_kl`` does not depend on the resolution.

Tensors: images (B, C, H, W) float in [-1, 1]; latents (B, latent_channels, H/8, W/8).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffmodels.core.checkpoint import (
    load_checkpoint,
    load_module_state,
    save_checkpoint,
)
from diffmodels.core.errors import CheckpointError

GRID = 8  # pixels per latent tile side: three 2x downsamples
LEVELS = 4  # pixel scales 1, 2, 4, 8
LOGVAR_RANGE = (-30.0, 20.0)  # clamp as SD's DiagonalGaussianDistribution does
ARCHS = ("localized", "conventional")
DECODER_SCALES = (4, 2, 1)  # pixel scales of the decoder's levels after each upsample


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of a :class:`VAE`; embedded in its checkpoints (``dataclasses.asdict``)."""

    in_channels: int
    latent_channels: int
    base_channels: int
    channel_mult: tuple[int, ...]  # one per level, pixel scales 1, 2, 4, 8
    blocks_per_level: int
    se: bool
    se_reduction: int
    decoder_kernel: int
    upsample: Literal["nearest", "pixel_shuffle"]
    # Defaults so weights files written before these fields existed still load (as localized).
    arch: Literal["localized", "conventional"] = "localized"
    norm_groups: int = 8  # GroupNorm groups of the conventional arch (must divide every width)
    decoder_kernel_scales: tuple[int, ...] = DECODER_SCALES  # scales with k x k decoder convs

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.arch == "conventional" and any(w % self.norm_groups for w in self.widths):
            raise ValueError(f"norm_groups {self.norm_groups} must divide every width {self.widths}")
        if len(self.channel_mult) != LEVELS:
            raise ValueError(f"channel_mult needs {LEVELS} entries (scales 1, 2, 4, 8), got {self.channel_mult}")
        if self.decoder_kernel % 2 != 1:
            raise ValueError(f"decoder_kernel must be odd, got {self.decoder_kernel}")
        if self.upsample not in ("nearest", "pixel_shuffle"):
            raise ValueError(f"upsample must be 'nearest' or 'pixel_shuffle', got {self.upsample!r}")
        scales = self.decoder_kernel_scales
        if not set(scales) <= set(DECODER_SCALES) or len(set(scales)) != len(scales):
            raise ValueError(f"decoder_kernel_scales must be distinct values of {DECODER_SCALES}, got {scales}")

    @property
    def widths(self) -> list[int]:
        return [self.base_channels * m for m in self.channel_mult]

    @classmethod
    def from_params(cls, vae: Any, in_channels: int, latent_channels: int) -> VAEConfig:
        """From the ``vae`` params group (:class:`diffmodels.core.config.VaeParams`) and the data's
        channels. Every other field is the params key of the same name (missing: AttributeError)."""
        given = {"in_channels": in_channels, "latent_channels": latent_channels}
        copied = {f.name: getattr(vae, f.name) for f in dataclasses.fields(cls) if f.name not in given}
        return cls(**{**{k: tuple(v) if isinstance(v, list) else v for k, v in copied.items()}, **given})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each pixel: (B, C, H, W) -> same. No spatial statistics."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, H, W, C) for LayerNorm


class SqueezeExcite(nn.Module):
    """Channel gates from the global average of the feature map (Hu et al., SENet, 2018)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1): the only global operation in the VAE
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


class ResBlock(nn.Module):
    """norm-SiLU-conv twice plus a (1x1 if widths differ) skip; optional SE before the add."""

    def __init__(self, c_in: int, c_out: int, kernel: int, se_reduction: int | None = None):
        super().__init__()
        self.norm1 = ChannelNorm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
        self.norm2 = ChannelNorm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel, padding=kernel // 2)
        self.se = SqueezeExcite(c_out, se_reduction) if se_reduction else nn.Identity()
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + self.se(h)


class Downsample(nn.Module):
    """2x2 conv, stride 2, no padding: output p sees exactly input [2p, 2p+1] (grid-aligned)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """2x upsampling: nearest repeat + k x k conv, or k x k conv to 4C + PixelShuffle."""

    def __init__(self, channels: int, kernel: int, mode: str):
        super().__init__()
        self.mode = mode
        c_out = channels * 4 if mode == "pixel_shuffle" else channels
        self.conv = nn.Conv2d(channels, c_out, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "pixel_shuffle":
            return F.pixel_shuffle(self.conv(x), 2)  # (B, 4C, h, w) -> (B, C, 2h, 2w)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def check_resolution(height: int, width: int) -> None:
    if height % GRID or width % GRID or height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} is not a multiple of {GRID} (the VAE's stride); resize or crop it")


# --------------------------------------------------------------------------------------------
# Encoder and decoder
# --------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """(B, C, H, W) in [-1, 1] -> mean, logvar, each (B, latent_channels, H/8, W/8)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = cfg.widths
        se = cfg.se_reduction if cfg.se else None
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        radius = 1  # pixels; conv_in at scale 1 (see receptive_radius)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        c = widths[0]
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.blocks_per_level):
                blocks.append(ResBlock(c, width, 3, se))
                radius += 2 * 2**level  # two 3x3 convs at pixel scale 2^level
                c = width
            self.blocks.append(nn.Sequential(*blocks))
            if level < LEVELS - 1:
                self.downs.append(Downsample(c))
        self.norm_out = ChannelNorm(c)
        self.conv_out = nn.Conv2d(c, 2 * cfg.latent_channels, 3, padding=1)
        radius += GRID
        self.receptive_radius = radius
        """Pixels beyond its 8x8 tile that can influence a latent when ``se=False``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_resolution(x.shape[-2], x.shape[-1])
        h = self.conv_in(x)  # (B, w0, H, W)
        for level, blocks in enumerate(self.blocks):
            h = blocks(h)
            if level < LEVELS - 1:
                h = self.downs[level](h)  # (B, c, H / 2^(level+1), W / 2^(level+1))
        moments = self.conv_out(F.silu(self.norm_out(h)))  # (B, 2 * latent_channels, H/8, W/8)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, C, 8h, 8w), unbounded (about [-1, 1] once trained)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = cfg.widths
        reach = 0  # sum of pixel scales of the k x k convs, see the module docstring

        def kernel(scale: int) -> int:  # the conv size at a pixel scale
            return cfg.decoder_kernel if scale in cfg.decoder_kernel_scales else 1

        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, c, 1)
        self.tile_blocks = nn.Sequential(*[ResBlock(c, c, 1) for _ in range(cfg.blocks_per_level)])
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for level in reversed(range(LEVELS - 1)):  # pixel scales 4, 2, 1 after upsampling
            scale, k = 2**level, kernel(2**level)
            spatial = k > 1  # a 1x1 conv adds no reach
            self.ups.append(Upsample(c, k, cfg.upsample))
            reach += spatial * (2 * scale if cfg.upsample == "pixel_shuffle" else scale)
            blocks = []
            for _ in range(cfg.blocks_per_level):
                blocks.append(ResBlock(c, widths[level], k))
                reach += spatial * 2 * scale
                c = widths[level]
            self.blocks.append(nn.Sequential(*blocks))
        self.norm_out = ChannelNorm(c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, kernel(1), padding=kernel(1) // 2)
        reach += kernel(1) > 1
        self.halo = (cfg.decoder_kernel // 2) * reach
        """Pixels beyond a latent's 8x8 tile that a change of that latent can reach (tight)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.tile_blocks(self.conv_in(z))  # (B, c, h, w): per-tile, no spatial reach
        for up, blocks in zip(self.ups, self.blocks):
            h = blocks(up(h))  # (B, c', 2h, 2w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, 8h, 8w)


# --------------------------------------------------------------------------------------------
# Conventional arch: the LDM / Stable Diffusion autoencoder at our widths (the baseline)
# --------------------------------------------------------------------------------------------


def group_norm(groups: int, channels: int) -> nn.GroupNorm:
    """GroupNorm as LDM uses it (eps 1e-6, affine): statistics over a group of channels *and all
    pixels of the image*, so it mixes information globally."""
    return nn.GroupNorm(groups, channels, eps=1e-6)


class GroupResBlock(nn.Module):
    """LDM's ResnetBlock: GroupNorm-SiLU-conv3x3 twice plus a (1x1 if widths differ) skip."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """LDM's AttnBlock: single-head self-attention over all h*w positions, residual.

    out = x + W_o softmax(Q K^T / sqrt(C)) V with Q, K, V = 1x1 convs of GroupNorm(x), each
    position a token of C channels: every output position sees every input position."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (f(n).flatten(2).transpose(1, 2) for f in (self.q, self.k, self.v))  # (B, h*w, C) each
        y = F.scaled_dot_product_attention(q, k, v)  # (B, h*w, C), scale 1/sqrt(C)
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class MidBlock(nn.Module):
    """ResNet block, self-attention, ResNet block: the middle of LDM's encoder and decoder."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = GroupResBlock(channels, channels, groups)
        self.attn_1 = SelfAttention(channels, groups)
        self.block_2 = GroupResBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class StridedDownsample(nn.Module):
    """LDM's downsample: pad one pixel right and bottom, then a 3x3 conv with stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class ConventionalEncoder(nn.Module):
    """(B, C, H, W) -> mean, logvar (B, latent_channels, H/8, W/8), as LDM's encoder:
    conv_in 3x3 -> per level ``blocks_per_level`` GroupNorm ResNet blocks, a strided downsample
    after levels 0..2 -> mid block (ResNet, attention, ResNet) -> GroupNorm, SiLU, conv 3x3 ->
    2 * latent_channels -> 1x1 ``quant_conv``. GroupNorm and attention see the whole image."""

    receptive_radius = None  # global: no finite radius

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, g = cfg.widths, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        c = widths[0]
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.blocks_per_level):
                blocks.append(GroupResBlock(c, width, g))
                c = width
            self.blocks.append(nn.Sequential(*blocks))
            if level < LEVELS - 1:
                self.downs.append(StridedDownsample(c))
        self.mid = MidBlock(c, g)
        self.norm_out = group_norm(g, c)
        self.conv_out = nn.Conv2d(c, 2 * cfg.latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_resolution(x.shape[-2], x.shape[-1])
        h = self.conv_in(x)
        for level, blocks in enumerate(self.blocks):
            h = blocks(h)
            if level < LEVELS - 1:
                h = self.downs[level](h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)


class ConventionalDecoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, C, 8h, 8w), as LDM's decoder: 1x1 ``post_quant_conv``
    -> conv_in 3x3 -> mid block -> per level from the coarsest ``blocks_per_level + 1`` GroupNorm
    ResNet blocks (LDM's ``num_res_blocks + 1``), nearest 2x upsample + conv 3x3 after levels
    3..1 -> GroupNorm, SiLU, conv_out 3x3. The mid-block attention makes every output pixel
    depend on every latent: there is no halo."""

    halo = None  # global: no finite halo

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, g = cfg.widths, cfg.norm_groups
        c = widths[-1]
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.conv_in = nn.Conv2d(cfg.latent_channels, c, 3, padding=1)
        self.mid = MidBlock(c, g)
        self.blocks = nn.ModuleList()
        self.ups = nn.ModuleList()
        for level in reversed(range(LEVELS)):  # pixel scales 8, 4, 2, 1
            blocks = []
            for _ in range(cfg.blocks_per_level + 1):
                blocks.append(GroupResBlock(c, widths[level], g))
                c = widths[level]
            self.blocks.append(nn.Sequential(*blocks))
            if level > 0:
                self.ups.append(Upsample(c, 3, "nearest"))
        self.norm_out = group_norm(g, c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))  # (B, c, h, w)
        for i, blocks in enumerate(self.blocks):
            h = blocks(h)
            if i < len(self.ups):
                h = self.ups[i](h)  # (B, c', 2h, 2w)
        return self.conv_out(F.silu(self.norm_out(h)))


ENCODERS = {"localized": Encoder, "conventional": ConventionalEncoder}
DECODERS = {"localized": Decoder, "conventional": ConventionalDecoder}


def decoder_halo(cfg: VAEConfig) -> int | None:
    """The decoder's halo in pixels for ``cfg`` (see the module docstring), without building
    weights; None for the conventional arch, whose receptive field is global."""
    with torch.device("meta"):
        return DECODERS[cfg.arch](cfg).halo


def locality(cfg: VAEConfig) -> dict[str, Any]:
    """How far a VAE of ``cfg`` can carry information, for reports (train_vae, eval_leakage):

    ``receptive_field`` (the decoder's): ``local`` with a finite ``decoder_halo_px`` (a bound
    that holds, tested to be tight), or ``global`` with ``decoder_halo_px`` None (conventional:
    mid-block attention and GroupNorm reach every pixel). ``encoder_receptive_field`` is
    ``global`` for the conventional arch and for the localized one with SE (its channel gates pool
    the whole image); ``encoder_receptive_radius_px`` is the localized encoder's convolutional
    reach (what bounds it without SE), None for the conventional arch."""
    with torch.device("meta"):
        encoder = ENCODERS[cfg.arch](cfg)
    halo = decoder_halo(cfg)
    return {
        "receptive_field": "local" if halo is not None else "global",
        "decoder_halo_px": halo,
        "encoder_receptive_field": "local" if encoder.receptive_radius is not None and not cfg.se else "global",
        "encoder_receptive_radius_px": encoder.receptive_radius,
    }


class VAE(nn.Module):
    """Encoder + decoder (``cfg.arch``: localized or conventional) with a diagonal-Gaussian
    posterior q(z|x) = N(mean, exp(logvar))."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = ENCODERS[cfg.arch](cfg)
        self.decoder = DECODERS[cfg.arch](cfg)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: where the GAN's adaptive weight compares gradients."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [-1, 1] -> posterior mean, logvar (B, latent_channels, H/8, W/8)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_channels, h, w), *unscaled* -> x_hat (B, C, 8h, 8w)."""
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reparameterised pass: returns (x_hat, mean, logvar); noise ``eps`` (B, latent_channels,
        H/8, W/8) given, or drawn from ``generator``."""
        mean, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * eps  # z ~ q(z|x)
        return self.decode(z), mean, logvar


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean, exp(logvar)) || N(0, 1)) = 0.5 (mean^2 + var - 1 - logvar)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def vae_loss(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    recon: Literal["l1", "mse"],
    beta_kl: float,
) -> dict[str, torch.Tensor]:
    """{"loss", "recon", "kl"}: recon is a mean over pixels, KL a mean over latent elements."""
    if recon == "l1":
        rec = F.l1_loss(x_hat.float(), x.float())
    elif recon == "mse":
        rec = F.mse_loss(x_hat.float(), x.float())
    else:
        raise ValueError(f"recon loss must be 'l1' or 'mse', got {recon!r}")
    kl = kl_standard_normal(mean.float(), logvar.float()).mean()
    return {"loss": rec + beta_kl * kl, "recon": rec, "kl": kl}


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Weights file: state dict + config, so the model rebuilds from the file alone
# --------------------------------------------------------------------------------------------

WEIGHTS_KIND = "vae"
DISCRIMINATOR_PREFIX = "discriminator/"  # tensors of the GAN's discriminator, when trained with one


def save_vae(path: str | Path, model: VAE, info: dict[str, Any] | None = None,
             discriminator: nn.Module | None = None) -> None:
    """Atomically write float32 weights with ``{"kind": "vae", "config": ..., **info}`` in the header;
    a ``discriminator`` (with a ``config``) goes in too, under ``discriminator/`` keys and the
    header's ``"discriminator"`` config (:func:`diffmodels.models.discriminator.load_discriminator`)."""
    state = {k: v.float() for k, v in model.state_dict().items()}
    meta = {"kind": WEIGHTS_KIND, "config": model.config.to_dict(), **(info or {})}
    if discriminator is not None:
        state.update({DISCRIMINATOR_PREFIX + k: v.float() for k, v in discriminator.state_dict().items()})
        meta["discriminator"] = discriminator.config.to_dict()
    save_checkpoint(path, state, meta)


def load_vae(path: str | Path, device: str | torch.device = "cpu") -> tuple[VAE, dict[str, Any]]:
    """Rebuild a :class:`VAE` (either arch) from a file written by :func:`save_vae`; returns
    (model in eval mode, meta). A discriminator in the file is left out."""
    ckpt = load_checkpoint(path)
    if ckpt.meta.get("kind") != WEIGHTS_KIND or "config" not in ckpt.meta:
        raise CheckpointError(f"{path}: not VAE weights (kind {ckpt.meta.get('kind')!r}); run `dvc repro train_vae`")
    try:
        cfg = VAEConfig.from_dict(ckpt.meta["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: VAE config in the header is invalid ({exc})") from None
    model = VAE(cfg)
    state = {k: v for k, v in ckpt.tensors.items() if not k.startswith(DISCRIMINATOR_PREFIX)}
    load_module_state(model, state, path)
    return model.to(device).eval(), ckpt.meta
