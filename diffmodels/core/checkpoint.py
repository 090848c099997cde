"""Checkpoints: one safetensors file holding tensors plus a JSON header (config and state).

Layout of a checkpoint written by :func:`save_checkpoint`:

- tensors: flat ``{name: tensor}``; nested states (an optimizer's) are flattened to
  ``"optimizer/state/0/exp_avg"`` style names by :func:`split_tensors`;
- metadata ``{"diffmodels": <JSON {"format": "diffmodels/1", "meta": {...}}>}``: the model config
  (so a checkpoint rebuilds its model alone, as nanoGPT's do), the training step, RNG states and
  whatever the caller adds, with tensors inside it replaced by references. One key, so the file
  is byte-identical for identical contents (safetensors orders several keys differently from
  process to process). Files with the earlier ``{"format", "meta"}`` keys still load.

No pickle is involved, so loading an untrusted file cannot run code. Writes are atomic
(:mod:`diffmodels.core.io`), so a kill mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from diffmodels.core.errors import CheckpointError
from diffmodels.core.io import atomic_path

FORMAT = "diffmodels/1"
HEADER_KEY = "diffmodels"  # safetensors metadata key holding {"format": FORMAT, "meta": {...}} as JSON


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def save_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Atomically write ``tensors`` and the JSON-serialisable ``meta`` to ``path``.

    A failed write (disk full, file size limit, permissions) is a one-line :class:`CheckpointError`
    and leaves the previous file at ``path``, if any, untouched.
    """
    # clone(): safetensors refuses tensors that share storage (tied weights, views).
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    # One metadata key: safetensors stores the metadata map in a hash order that changes from
    # process to process, so two keys would make identical weights hash differently (DVC reruns).
    header = {HEADER_KEY: json.dumps({"format": FORMAT, "meta": meta}, allow_nan=False)}
    try:
        with atomic_path(path) as tmp:
            save_file(flat, str(tmp), metadata=header)
    except (SafetensorError, OSError) as exc:
        # safetensors: "Error while serializing: I/O error: No space left on device (os error 28)"
        reason = getattr(exc, "strerror", None) or str(exc).removeprefix("Error while serializing: ")
        raise CheckpointError(
            f"{path}: cannot write ({reason}); the previous file, if any, is unchanged. "
            "Free disk space or fix permissions, then rerun"
        ) from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; :class:`CheckpointError` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable safetensors checkpoint ({reason}); delete it and rerun the stage"
        ) from None
    if HEADER_KEY in header:  # current layout; files written before it have "format" and "meta" keys
        try:
            header = {k: json.dumps(v) if k == "meta" else v for k, v in json.loads(header[HEADER_KEY]).items()}
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError(f"{path}: checkpoint header is damaged; delete it and rerun the stage") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a diffmodels checkpoint (format {header.get('format')!r}, expected {FORMAT!r})"
        )
    try:
        meta = json.loads(header["meta"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: checkpoint header is damaged; delete it and rerun the stage") from None
    return Checkpoint(tensors=tensors, meta=meta)


def split_tensors(obj: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure into a JSON skeleton and a flat tensor dict.

    Tensors become ``{"__tensor__": name}``; dicts with non-string keys (optimizer state is keyed
    by parameter index) and tuples are tagged so :func:`join_tensors` restores them exactly.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, name: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[name] = node
            return {"__tensor__": name}
        if isinstance(node, Mapping):
            if all(isinstance(k, str) for k in node):
                return {k: walk(v, f"{name}/{k}") for k, v in node.items()}
            return {"__items__": [[k, walk(v, f"{name}/{k}")] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {"__tuple__": [walk(v, f"{name}/{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{name}/{i}") for i, v in enumerate(node)]
        return node

    return walk(obj, prefix), tensors


def join_tensors(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"__tensor__"}:
                return tensors[node["__tensor__"]]
            if set(node) == {"__items__"}:
                return {k: walk(v) for k, v in node["__items__"]}
            if set(node) == {"__tuple__"}:
                return tuple(walk(v) for v in node["__tuple__"])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(skeleton)


def load_module_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """``load_state_dict(strict=True)`` with one readable error naming missing, unexpected and
    mis-shaped keys instead of PyTorch's multi-line dump."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {label} ({shown})")
    if problems:
        raise CheckpointError(
            f"{source}: weights do not fit {type(module).__name__}: " + "; ".join(problems)
            + " (was it written with other model params?)"
        )
    module.load_state_dict(state, strict=True)
