"""CLIP ViT-L/14 text encoder, the text tower Stable Diffusion v1 conditions on.

    context = CLIPTextEncoder(ids)        ids (B, 77) int64 -> context (B, 77, 768) float

Token + learned position embeddings, 12 pre-LayerNorm transformer layers with a causal mask
(each token sees itself and the tokens before it) and quick-GELU MLPs, then a final LayerNorm.
SD v1 uses the whole last hidden state (all 77 positions, padding included, no attention mask).
Module names follow the Hugging Face ``CLIPTextModel`` (without its ``text_model.`` level), so
the converter's rows for the text encoder are plain renames of the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    max_length: int = 77  # context length: position embeddings
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    eps: float = 1e-5  # LayerNorm epsilon

    @classmethod
    def full(cls) -> CLIPTextConfig:
        """The SD v1-5 text encoder (OpenAI CLIP ViT-L/14): 123,060,480 parameters."""
        return cls()

    @classmethod
    def tiny(cls) -> CLIPTextConfig:
        """A few-kilobyte model for tests (vocabulary kept so real token ids fit)."""
        return cls(width=32, layers=2, heads=4)


def quick_gelu(x: Tensor) -> Tensor:
    """GELU approximated as x * sigmoid(1.702 x), as OpenAI trained CLIP with."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention with biased q/k/v/out projections."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.eps)
        self.self_attn = CLIPAttention(config.width, config.heads)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = CLIPMLP(config.width, config.mlp_ratio * config.width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_length, config.width)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)  # (B, T, C)


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(config) for _ in range(config.layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextEncoder(nn.Module):
    """Token ids (B, T <= max_length) int64 -> last hidden state (B, T, width), float."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.eps)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.config.max_length:
            raise ValueError(f"at most {self.config.max_length} tokens, got {ids.shape[1]}")
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))
