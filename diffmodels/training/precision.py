"""Mixed precision: which autocast dtype a device gets, and the GradScaler fp16 needs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Precision:
    """Autocast settings: float32 on CPU/MPS; bf16 on CUDA when supported, else fp16 + GradScaler."""

    device: torch.device
    dtype: torch.dtype | None  # None = float32, no autocast
    scaler: torch.amp.GradScaler | None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @classmethod
    def from_mode(cls, device: torch.device, mode: str) -> Precision:
        """``auto`` (bf16 where the GPU supports it, else fp16), ``bf16``, ``fp16`` or ``off``;
        autocast on CUDA only, so the CPU and MPS train in float32 whatever the mode."""
        if mode == "off" or device.type != "cuda":
            return cls(device, None, None)
        if mode == "auto":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if mode == "bf16":
            return cls(device, torch.bfloat16, None)
        if mode == "fp16":
            return cls(device, torch.float16, torch.amp.GradScaler("cuda"))
        raise ValueError(f"amp must be one of auto, bf16, fp16, off; got {mode!r}")

    @property
    def name(self) -> str:
        return {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
