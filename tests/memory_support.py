"""What autograd keeps for backward: the memory claims of the recomputing scan and block."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def saved_bytes(fn: Callable[[], object], *, ignore: tuple[Tensor, ...] = (), min_numel: int = 0) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs, leaving out
    the storages of ``ignore`` and tensors of fewer than ``min_numel`` elements."""
    ignored = {t.untyped_storage().data_ptr() for t in ignore}
    storages = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if t.numel() >= min_numel and ptr not in ignored:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())
