"""Where models run: device selection (cuda, then mps, then cpu), an eval-mode context, peak memory."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator

import torch

from diffmodels.core.errors import DiffmodelsError


def select_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda, else mps, else cpu; an explicit device that is absent is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if name not in available:
        raise ValueError(f"device must be one of auto, cuda, mps, cpu; got {name!r}")
    if not available[name]:
        raise DiffmodelsError(f"device {name!r} is not available on this machine; use 'auto' or 'cpu'")
    return torch.device(name)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """eval() + no_grad() for the block, then back to the previous mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run in MiB: CUDA's allocator peak on a GPU, else the whole process's
    peak resident set (Linux reports ``ru_maxrss`` in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
