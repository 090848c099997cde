"""The Stable Diffusion v1 autoencoder (AutoencoderKL, Rombach et al. 2022, section 3).

    mean, logvar = vae.encode(x)      x (B, 3, H, W) in [-1, 1] -> each (B, 4, H/8, W/8)
    x_hat = vae.decode(z)             z (B, 4, H/8, W/8), unscaled -> (B, 3, H, W), ~[-1, 1]

The diffusion model sees ``SCALE_FACTOR * z`` (0.18215, from the v1 config, never from a
checkpoint). Attention appears only in the middle blocks (one head over all positions).
Module names follow the original CompVis ``model.py`` (``encoder.down.0.block.1.norm1``,
``decoder.up.3.upsample.conv``, ``mid.attn_1.q``), so an original checkpoint converts by
stripping its prefix; only the attention projections change shape (1x1 conv -> linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmodels.sd.unet import (
    Upsample,  # nearest x2 then a 3x3 conv, the same in both networks
)

SCALE_FACTOR = 0.18215


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32

    @classmethod
    def full(cls) -> VAEConfig:
        """SD v1-5 (``kl-f8``): 83,653,863 parameters."""
        return cls()

    @classmethod
    def tiny(cls) -> VAEConfig:
        return cls(base_channels=32, channel_mult=(1, 2))


def _norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _norm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(groups, c_out)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(groups, channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        y = F.scaled_dot_product_attention(self.q(h)[:, None], self.k(h)[:, None], self.v(h)[:, None])[:, 0]
        return x + self.proj_out(y).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Asymmetric pad (right, bottom) then a stride-2 conv without padding, as the original."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Mid(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: res blocks, then an optional down- or upsample."""

    def __init__(self, channels: list[int], groups: int, resample: type[nn.Module] | None, attr: str):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in zip(channels, channels[1:]))
        self.attr = attr
        if resample is not None:
            setattr(self, attr, resample(channels[-1]))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.attr, None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    """(B, 3, H, W) -> moments (B, 2 z, H/2^(L-1), W/2^(L-1)): mean and log-variance."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        chans = [c.base_channels * m for m in c.channel_mult]
        self.conv_in = nn.Conv2d(c.in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        ch = chans[0]
        for level, out in enumerate(chans):
            last = level == len(chans) - 1
            self.down.append(Level([ch] + [out] * c.num_res_blocks, c.norm_groups, None if last else Downsample, "downsample"))
            ch = out
        self.mid = Mid(ch, c.norm_groups)
        self.norm_out = _norm(c.norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, 2 * c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """z (B, z, h, w) -> image (B, 3, h 2^(L-1), w 2^(L-1)). ``up[0]`` is the finest level,
    built and run last, as in the original (so its keys count up from the output side)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        chans = [c.base_channels * m for m in c.channel_mult]
        ch = chans[-1]
        self.conv_in = nn.Conv2d(c.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch, c.norm_groups)
        levels = []
        for level in reversed(range(len(chans))):
            out = chans[level]
            upsample = Upsample if level > 0 else None
            levels.insert(0, Level([ch] + [out] * (c.num_res_blocks + 1), c.norm_groups, upsample, "upsample"))
            ch = out
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c.norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, c.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    @property
    def encoder_centre_offset_px(self) -> float:
        """How far (pixels, right and down) the encoder centres latent (i, j) from the middle of
        the tile [f i, f i + f) x [f j, f j + f) that the decoder paints it into (f = 8).

        Each :class:`Downsample` pads right/bottom and convolves 3x3 at stride 2 without padding,
        so its output i is centred on input 2i + 1 where an exact 2x2 tiling (our VAE) centres on
        2i + 0.5: half an input step, 2^k pixels at level k. Over L downsamples the offset is
        sum_k 2^k / 2 = (2^L - 1) / 2: 3.5 px for v1's three, latent centres on pixel 8i + 7. Mask
        sets aligned to the 8-px grid are therefore aligned for this decoder, 3.5 px off for this
        encoder (whose mid-block attention reaches every pixel anyway)."""
        levels = len(self.config.channel_mult) - 1
        return (2**levels - 1) / 2

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> posterior mean, log-variance (B, z, H/f, W/f), unscaled."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A posterior sample z = mean + std * n (unscaled). n is drawn on the generator's device
        (the CPU without one) and moved, so a seed gives the same sample on every device."""
        mean, logvar = self.encode(x)
        source = generator.device if generator is not None else torch.device("cpu")
        n = torch.randn(mean.shape, generator=generator, device=source, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * n

    def decode(self, z: Tensor) -> Tensor:
        """z (B, z, h, w), unscaled -> image (B, 3, H, W), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
