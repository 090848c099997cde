"""Where and in which precision the SD components run (docs/maths.md#stable-diffusion-v1-5: CPU / CUDA / MPS, fp16, offload).

    placement = choose_placement("auto")          # cuda > mps > cpu; fp16 on a GPU, VAE in float32
    sd = StableDiffusion(...).place(placement)

Precision: on a GPU the UNet and the text encoder run in float16 (half the memory and several
times the speed of float32 on tensor cores); the VAE stays in float32 by default, because v1's
decoder overflows float16 in its last up-blocks and decodes black or NaN images (the reason
diffusers ships ``force_upcast`` in the VAE config). The CPU runs float32: float16 convolutions
there are slow and partly unimplemented; bfloat16 may be asked for explicitly.

Sequential offload keeps every component on the CPU and moves each to the accelerator only while
it runs (text encoder, then UNet for the whole denoising loop, then VAE), so peak accelerator
memory is the largest component (the UNet: 1.7 GB in float16) instead of all three.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from diffmodels.core.device import select_device
from diffmodels.core.errors import DiffmodelsError

DtypeName = Literal["auto", "float32", "float16", "bfloat16"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    """``device`` runs the components; UNet and text encoder in ``dtype``, the VAE in ``vae_dtype``.
    With ``offload`` the components live on the CPU and visit ``device`` one at a time."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    vae_dtype: torch.dtype = torch.float32
    offload: bool = False

    @property
    def home(self) -> torch.device:
        """Where a component waits while another one runs."""
        return torch.device("cpu") if self.offload else self.device

    @contextlib.contextmanager
    def running(self, module: nn.Module) -> Iterator[nn.Module]:
        """Bring ``module`` to the execution device for the block, then back home (offload only)."""
        if self.offload:
            module.to(self.device)
        try:
            yield module
        finally:
            if self.offload:
                module.to(self.home)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()


def resolve_dtype(name: DtypeName, device: torch.device) -> torch.dtype:
    """``auto`` -> float16 on CUDA and MPS, float32 on the CPU; float16 on the CPU is refused."""
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    if name == "float16" and device.type == "cpu":
        raise DiffmodelsError(
            "float16 needs a GPU (CPU float16 convolutions are slow or missing); use float32 or bfloat16 on the CPU"
        )
    return DTYPES[name]


def choose_placement(
    device: str = "auto", dtype: DtypeName = "auto", vae_dtype: DtypeName = "float32", offload: bool = False
) -> Placement:
    """A :class:`Placement` from parameter names (``sd.device``, ``sd.dtype``, ``sd.vae_dtype``,
    ``sd.offload``). Offloading to the CPU itself changes nothing and is accepted as a no-op."""
    where = select_device(device)
    return Placement(where, resolve_dtype(dtype, where), resolve_dtype(vae_dtype, where), offload)
