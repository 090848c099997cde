"""The Stable Diffusion v1 denoiser: a UNet with text cross-attention (Rombach et al. 2022).

    eps_hat = SDUNet(z_t, timesteps, context)
        z_t (B, 4, h, w) scaled latents; timesteps (B,) int in 0..999 (the original 0-based
        index, i.e. our 1-based t minus 1); context (B, 77, 768) CLIP hidden states

Layout (level b has ``model_channels * channel_mult[b]`` channels, resolution / 2^b):

    input_blocks.0              conv_in
    input_blocks.k              ResBlock [+ SpatialTransformer]  (num_res_blocks per level)
                                or Downsample after each level but the last
    middle_block                ResBlock, SpatialTransformer, ResBlock
    output_blocks.k             ResBlock on cat(h, skip) [+ SpatialTransformer] [+ Upsample]
                                (num_res_blocks + 1 per level, deepest level first)
    out                         GroupNorm, SiLU, conv

Module names follow the original CompVis ``openaimodel.py`` (``in_layers.0``, ``emb_layers.1``,
``transformer_blocks.0.attn2.to_k``, ...), so converting an original checkpoint is a prefix strip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmodels.models.unet import timestep_embedding


@dataclass(frozen=True)
class SDUNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with a SpatialTransformer
    num_heads: int = 8  # on every level (v1 fixes heads, not head width)
    transformer_depth: int = 1
    context_dim: int = 768
    norm_groups: int = 32

    @classmethod
    def full(cls) -> SDUNetConfig:
        """SD v1-5: 859,520,964 parameters."""
        return cls()

    @classmethod
    def tiny(cls) -> SDUNetConfig:
        return cls(model_channels=32, channel_mult=(1, 2), attention_levels=(0,), num_heads=2, context_dim=32)

    @property
    def emb_dim(self) -> int:
        return 4 * self.model_channels


def _norm(groups: int, channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps)


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))) + W emb; out = skip(x) + conv(dropout(SiLU(GN(h))))."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(groups, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.out_layers = nn.Sequential(
            _norm(groups, c_out), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]  # (B, C_out, H, W)
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention from x (B, N, C) to context (B, M, D) (self-attention if None)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        B, N, C = x.shape
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, nh, N, hs)
        k = self.to_k(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)  # (B, nh, M, hs)
        v = self.to_v(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hs)
        return self.to_out(y.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): a * GELU(g) with [a, g] = proj(x)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN: self-attention, cross-attention on the text, GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features (B, C, H, W) as H*W tokens through transformer blocks; residual.

    v1 projects in and out with 1x1 convolutions (SD 2.x uses linear layers instead)."""

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, groups: int):
        super().__init__()
        self.norm = _norm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, H*W, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """A sequence of layers, each given what it needs: emb (ResBlock), context (transformer)."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class SDUNet(nn.Module):
    def __init__(self, config: SDUNetConfig):
        super().__init__()
        self.config = c = config
        mc, groups = c.model_channels, c.norm_groups

        def transformer(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, c.num_heads, c.context_dim, c.transformer_depth, groups)

        self.time_embed = nn.Sequential(nn.Linear(mc, c.emb_dim), nn.SiLU(), nn.Linear(c.emb_dim, c.emb_dim))

        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))])
        skip_channels, ch = [mc], mc
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, mult * mc, c.emb_dim, groups)]
                ch = mult * mc
                if level in c.attention_levels:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level < len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepSequential(
            ResBlock(ch, ch, c.emb_dim, groups), transformer(ch), ResBlock(ch, ch, c.emb_dim, groups)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mult * mc, c.emb_dim, groups)]
                ch = mult * mc
                if level in c.attention_levels:
                    layers.append(transformer(ch))
                if level > 0 and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(_norm(groups, ch), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1))

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        """x (B, 4, h, w), timesteps (B,) in 0..999, context (B, M, context_dim) -> eps (B, 4, h, w)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
