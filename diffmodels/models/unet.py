"""Time-conditioned denoiser UNet for latents (Ho et al. 2020; LDM, Rombach et al. 2022).

    eps_hat = UNet(z_t, t, labels)        z_t (B, C, H, W), t (B,) int in 1..T, labels (B,) int

Levels run from the latent resolution (level 0) down by 2x per level. Each level has
``blocks_per_level`` residual blocks (GroupNorm + SiLU, timestep embedding added between the two
convolutions); a *context block* follows each residual block of the levels whose downsampling
factor (1 = the latent grid, 2 = half its side, ...) is listed in ``mixer_downsample`` (the
convention of LDM's ``attention_resolutions``, so one list fits any data.resolution), chosen by
``mixer``:

    serpentine  multi-direction snake-scan state-space block (diffmodels.models.serpentine); path
                families alternate rows / cols from one context block to the next
    attention   multi-head self-attention over all H*W positions (the standard baseline)
    none        nothing: a pure convolutional UNet

The middle (lowest resolution) is res -> context -> res, with context whenever the mixer is
not 'none'. Class conditioning adds a label embedding to the timestep embedding; label
``num_classes`` is the null label used for classifier-free guidance.

The network knows nothing of the noise schedule (that lives in diffmodels.diffusion): it maps
(z_t, t) to an output.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmodels.models.serpentine import SerpentineBlock, default_family

Mixer = Literal["serpentine", "attention", "none"]


# Field names of configs written before the names were made those of the ``ddpm`` params group.
_RENAMED = {"channel_mults": "channel_mult", "serpentine_directions": "scan_directions",
            "serpentine_merge": "scan_merge", "serpentine_state": "ssm_state"}


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet`; embedded in the denoiser's weights file (:meth:`to_dict`).

    Every field but ``in_channels``, ``latent_size`` and ``num_classes`` (which the data decides)
    is the ``ddpm`` params key of the same name, so :meth:`from_params` copies by name."""

    in_channels: int  # latent channels
    latent_size: int  # latent side (H = W) the network is built for
    base_channels: int
    channel_mult: tuple[int, ...]  # one per level; level l has base_channels * channel_mult[l] channels
    blocks_per_level: int
    mixer: Mixer
    mixer_downsample: tuple[int, ...]  # factors 2^level whose levels get context blocks (the middle always)
    num_classes: int  # 0 = unconditional
    dropout: float = 0.0
    norm_groups: int = 8
    attention_heads: int = 4
    scan_directions: int = 2  # serpentine scan paths per context block (diffmodels.models.serpentine)
    scan_merge: str = "mean"  # how the directions' outputs combine: sum or mean
    ssm_state: int = 16  # state size N of the selective SSM
    ssm_expand: int = 1  # SSM channels per block channel (Mamba's expand)
    ssm_headdim: int = 64  # SSM head size P (one decay per head); narrow blocks use one head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """From :meth:`to_dict` output, including that of weights files written under the old field
        names (``channel_mults``, ``serpentine_directions``, ...)."""
        d = {_RENAMED.get(k, k): v for k, v in d.items()}
        # weights written before the SSM's widths were fields had expand 2 and heads of 32
        d.setdefault("ssm_expand", 2)
        d.setdefault("ssm_headdim", 32)
        d["channel_mult"] = tuple(d["channel_mult"])
        d["mixer_downsample"] = tuple(d["mixer_downsample"])
        return cls(**d)

    @classmethod
    def from_params(cls, p: Any, *, in_channels: int, latent_size: int, num_classes: int,
                    **overrides: Any) -> UNetConfig:
        """The UNet that ``params.yaml``'s ``ddpm`` group describes (``p``: its typed params), for
        latents (``in_channels``, ``latent_size`` x ``latent_size``); ``overrides`` replace fields
        (a benchmark's mixer, say). Every other field is read from ``p`` under its own name: a
        field missing there is an AttributeError, never a silent default."""
        given = {"in_channels": in_channels, "latent_size": latent_size, "num_classes": num_classes, **overrides}
        copied = {f.name: getattr(p, f.name) for f in fields(cls) if f.name not in given}
        merged = {**copied, **given}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()})

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(self.latent_size // 2**i for i in range(len(self.channel_mult)))

    def context_widths(self) -> list[int]:
        """Channel widths of the levels that get context blocks: those in ``mixer_downsample``,
        and the middle (the last level) always; empty for ``mixer='none'``."""
        if self.mixer == "none":
            return []
        levels = range(len(self.channel_mult))
        picked = [i for i in levels if self.has_context(2**i)] + [len(self.channel_mult) - 1]
        return sorted({self.base_channels * self.channel_mult[i] for i in picked})

    def has_context(self, factor: int) -> bool:
        """Whether the level downsampled by ``factor`` (2^level) gets context blocks after its
        residual blocks (the middle always has one unless ``mixer='none'``)."""
        return self.mixer != "none" and factor in self.mixer_downsample

    def problems(self) -> list[str]:
        """Every constraint this network puts on its config, broken, as one line each naming the
        ``ddpm`` key to change (empty when it can be built). Params validation asks this too, so
        a width the scan cannot split into heads fails at load, not deep inside the SSM."""
        errors = []
        levels = len(self.channel_mult)
        if self.latent_size % 2 ** (levels - 1):
            errors.append(f"latent size {self.latent_size} must be divisible by 2^{levels - 1} = {2 ** (levels - 1)} "
                          f"for {levels} UNet levels (change ddpm.channel_mult or data.resolution)")
        factors = [2**level for level in range(levels)]
        unknown = sorted(set(self.mixer_downsample) - set(factors))
        if unknown:
            errors.append(f"ddpm.mixer_downsample lists {unknown}; the UNet's {levels} levels have factors {factors}")
        widths = [self.base_channels * m for m in self.channel_mult]
        bad = [c for c in widths if c % self.norm_groups]
        if bad:
            errors.append(f"ddpm.norm_groups {self.norm_groups} must divide every level's width "
                          f"(ddpm.base_channels x ddpm.channel_mult: {bad[0]} is not a multiple)")
        if unknown:  # the context levels are not defined
            return errors
        if self.mixer == "attention":
            bad = [c for c in self.context_widths() if c % self.attention_heads]
            if bad:
                errors.append(f"ddpm.attention_heads {self.attention_heads} must divide the width of every level "
                              f"with attention ({bad[0]} is not a multiple); change ddpm.attention_heads or ddpm.base_channels")
        if self.mixer == "serpentine":
            bad = [c for c in self.context_widths() if (self.ssm_expand * c) % self.serpentine_headdim(c)]
            if bad:
                c = bad[0]
                errors.append(f"ddpm.ssm_headdim {self.ssm_headdim}: the serpentine block at width {c} has "
                              f"{self.ssm_expand * c} SSM channels (ddpm.ssm_expand x width), not a multiple of the "
                              f"head size {self.serpentine_headdim(c)}; make every context width a multiple of "
                              f"ddpm.ssm_headdim / ddpm.ssm_expand or change ddpm.ssm_headdim (e.g. a power of 2)")
        return errors

    def serpentine_headdim(self, channels: int) -> int:
        """Head size of the SSM in a serpentine block of ``channels`` width: ``ssm_headdim``, or one
        head over all the SSM channels when the block is narrower than that."""
        return min(self.ssm_headdim, self.ssm_expand * channels)

    def check(self) -> None:
        """Raise ValueError with every broken constraint (:meth:`problems`)."""
        errors = self.problems()
        if errors:
            raise ValueError("; ".join(errors))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (B,) steps -> (B, dim) (Vaswani et al. 2017; DDPM appendix B)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a residual branch's last layer so each block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual (PyTorch's fused SDPA)."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels {channels} must be a multiple of attention heads {heads}")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        # (B, nh, hs, L) -> (B, nh, L, hs)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        config.check()
        self.config = cfg = config
        ch = [cfg.base_channels * m for m in cfg.channel_mult]
        emb_dim = 4 * cfg.base_channels
        self.time_mlp = nn.Sequential(nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes > 0 else None
        self._n_context = 0

        self.stem = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips = [ch[0]]
        c = ch[0]
        for level, (c_out, res) in enumerate(zip(ch, cfg.resolutions)):
            for _ in range(cfg.blocks_per_level):
                self.down.append(self._stage(c, c_out, res, emb_dim))
                c = c_out
                skips.append(c)
            if level < len(ch) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)

        self.mid = nn.ModuleList([
            ResBlock(c, c, emb_dim, cfg.norm_groups, cfg.dropout),
            self._context(c, force=True),
            ResBlock(c, c, emb_dim, cfg.norm_groups, cfg.dropout),
        ])

        self.up = nn.ModuleList()
        for level in reversed(range(len(ch))):
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(self._stage(c + skips.pop(), ch[level], cfg.resolutions[level], emb_dim))
                c = ch[level]
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)))
        assert not skips

        self.out = nn.Sequential(nn.GroupNorm(cfg.norm_groups, c), nn.SiLU(), _zero(nn.Conv2d(c, cfg.in_channels, 3, padding=1)))

    def _context(self, channels: int, force: bool = False, resolution: int | None = None) -> nn.Module:
        cfg = self.config
        if cfg.mixer == "none" or not (force or cfg.has_context(cfg.latent_size // resolution)):
            return nn.Identity()
        if cfg.mixer == "attention":
            return AttentionBlock(channels, cfg.attention_heads, cfg.norm_groups)
        block = SerpentineBlock(
            channels,
            directions=cfg.scan_directions,
            family=default_family(self._n_context),
            merge=cfg.scan_merge,
            d_state=cfg.ssm_state,
            headdim=cfg.serpentine_headdim(channels),
            expand=cfg.ssm_expand,
            norm_groups=cfg.norm_groups,
        )
        self._n_context += 1
        return block

    def _stage(self, c_in: int, c_out: int, resolution: int, emb_dim: int) -> nn.ModuleList:
        cfg = self.config
        return nn.ModuleList([
            ResBlock(c_in, c_out, emb_dim, cfg.norm_groups, cfg.dropout),
            self._context(c_out, resolution=resolution),
        ])

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """x (B, C, H, W) noisy latents, t (B,) steps, labels (B,) in 0..num_classes (the last is null)."""
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(self.stem.weight.dtype))
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), self.null_label, device=x.device, dtype=torch.long)
            emb = emb + self.label_emb(labels)

        h = self.stem(x)
        skips = [h]
        for block in self.down:
            h = self._run_block(block, h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        for block in self.up:
            if isinstance(block, nn.ModuleList):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run_block(block, h, emb)
        return self.out(h)

    @staticmethod
    def _run_block(block: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if isinstance(block, nn.ModuleList):  # (ResBlock, context)
            res, context = block
            return context(res(h, emb))
        return block(h)  # down- or up-sampling
