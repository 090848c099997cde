"""Resumable training state: the data order, the checkpointed state and the fingerprint that guards it.

Resume contract
    :class:`TrainState` bundles everything that determines the next step: model, optimizer,
    LR scheduler, GradScaler (fp16 only), the data sampler's position, the noise generator and
    the global torch RNG. :meth:`TrainState.save` writes it atomically into one safetensors
    checkpoint (:mod:`diffmodels.core.checkpoint`) together with a *fingerprint* of the inputs (the
    params the stage reads, the data and the code); :func:`resume` restores it only when the
    fingerprint matches, otherwise it says why and the caller starts fresh. On CPU in float32,
    k steps + resume + (N - k) steps gives the same weights as N steps straight.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from diffmodels.core.checkpoint import (
    Checkpoint,
    join_tensors,
    load_checkpoint,
    save_checkpoint,
    split_tensors,
)
from diffmodels.core.errors import CheckpointError, DiffmodelsError

# --------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------


def derived_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit seed for one use (``purpose``, e.g. "data order", and integer ``keys``) of the run's
    ``seed``: numpy's SeedSequence hash of (seed, crc32(purpose), keys). Distinct uses and distinct
    seeds get unrelated streams, where ``seed + k`` offsets would overlap (seed 1, use 0 = seed 0,
    use 1) and one seed shared by two generators would hand both the same random bits."""
    words = [int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, zlib.crc32(purpose.encode()), *map(int, keys)]
    hi, lo = np.random.SeedSequence(words).generate_state(2, np.uint32)
    return (int(hi) << 32 | int(lo)) & 0x7FFF_FFFF_FFFF_FFFF


class EpochSampler:
    """Batches of indices from a fresh seeded permutation each epoch (last short batch dropped).

    The permutation of epoch e is ``randperm(n)`` from a generator seeded with
    ``derived_seed(seed, "data order", e)``, so the state is just (epoch, position) and the order
    after a resume is the same. (Seeding with ``seed + e`` would make seed s + 1's epochs seed s's
    shifted by one: a seed study's runs would see nearly the same data order.)
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise DiffmodelsError("the training split is empty")
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.epoch, self.position = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(derived_seed(self.seed, "data order", self.epoch)))

    def next_batch(self) -> torch.Tensor:
        if self.position + self.batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return idx

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["n"], state["batch_size"], state["seed"]) != (self.n, self.batch_size, self.seed):
            raise CheckpointError("sampler state is for another dataset size, batch size or seed")
        self.epoch, self.position = state["epoch"], state["position"]
        self._perm = self._permutation()


# --------------------------------------------------------------------------------------------
# Resumable state
# --------------------------------------------------------------------------------------------


def fingerprint(inputs: Any) -> str:
    """SHA-256 of a JSON-serialisable description of a run's inputs (params, data, code)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(paths: list[str | Path]) -> dict[str, str]:
    """``{path: sha256}`` of files (code identities for :func:`fingerprint`).

    A missing file is an error, not a silent skip: a fingerprint without it would let a
    checkpoint resume under code it was not written with.
    """
    out = {}
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise DiffmodelsError(f"{p}: no such file, but the resume fingerprint needs it; fix the path")
        out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def code_files(stage: str, project: str | Path) -> list[Path]:
    """The Python files ``dvc.yaml`` (in ``project``) lists as deps of ``stage``: its code.

    The code part of a training stage's fingerprint is the code DVC reruns the stage for, so the
    two cannot drift apart. Data deps (folders, weights) are left out: the stage puts its data's
    identity (a manifest sha, a latent scale) into the fingerprint itself. A listed file that is
    missing is an error naming it.
    """
    project = Path(project)
    pipeline = project / "dvc.yaml"
    try:
        stages = yaml.safe_load(pipeline.read_text())["stages"]
        deps = stages[stage].get("deps", [])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise DiffmodelsError(f"{pipeline}: cannot read the deps of stage {stage} ({exc}); "
                              "run the stage from the project checkout") from None
    files = [project / dep for dep in deps if str(dep).endswith(".py")]
    missing = [str(f.relative_to(project)) for f in files if not f.is_file()]
    if missing:
        raise DiffmodelsError(f"{pipeline}: stage {stage} lists missing code deps {', '.join(missing)}; "
                              "fix its deps list")
    return files


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: EpochSampler
    generator: torch.Generator  # noise for the reparameterisation (or diffusion) draws
    scaler: torch.amp.GradScaler | None = None
    ema: Any = None  # anything with state_dict() -> {name: tensor} and load_state_dict() (diffmodels.training.ema.EMA)
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable (e.g. loss history)
    # More trained objects, e.g. a GAN's discriminator and its optimizer: anything with
    # state_dict() (nested, with tensors) and load_state_dict(); saved under "parts/<name>/".
    parts: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path, fingerprint: str, config: dict[str, Any]) -> None:
        """Atomically write everything needed to continue at ``self.step``."""
        opt_skeleton, opt_tensors = split_tensors(self.optimizer.state_dict(), "optimizer")
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        tensors.update(opt_tensors)
        if self.ema is not None:
            tensors.update({f"ema/{k}": v for k, v in self.ema.state_dict().items()})
        part_skeletons = {}
        for name, part in self.parts.items():
            part_skeletons[name], part_tensors = split_tensors(part.state_dict(), f"parts/{name}")
            tensors.update(part_tensors)
        tensors["rng/torch"] = torch.get_rng_state()
        tensors["rng/generator"] = self.generator.get_state()
        if torch.cuda.is_available():
            tensors["rng/cuda"] = torch.cuda.get_rng_state()
        meta = {
            "kind": "train_state",
            "fingerprint": fingerprint,
            "config": config,
            "step": self.step,
            "optimizer": opt_skeleton,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "sampler": self.sampler.state_dict(),
            "extra": self.extra,
            "parts": part_skeletons,
        }
        save_checkpoint(path, tensors, meta)

    def restore(self, ckpt: Checkpoint) -> None:
        """Load a checkpoint written by :meth:`save` into this (freshly built) state."""
        meta, tensors = ckpt.meta, ckpt.tensors
        device = next(self.model.parameters()).device
        model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        self.model.load_state_dict(model_state, strict=True)
        self.optimizer.load_state_dict(join_tensors(meta["optimizer"], tensors))
        self.scheduler.load_state_dict(meta["scheduler"])
        if self.scaler is not None and meta["scaler"] is not None:
            self.scaler.load_state_dict(meta["scaler"])
        self.sampler.load_state_dict(meta["sampler"])
        saved_parts = meta.get("parts") or {}
        if set(saved_parts) != set(self.parts):
            raise CheckpointError(f"checkpoint holds parts {sorted(saved_parts)}, the run has {sorted(self.parts)}")
        for name, part in self.parts.items():
            part.load_state_dict(join_tensors(saved_parts[name], tensors))
        if self.ema is not None:
            self.ema.load_state_dict({k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")})
        torch.set_rng_state(tensors["rng/torch"])
        self.generator.set_state(tensors["rng/generator"])
        if "rng/cuda" in tensors and device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng/cuda"])
        self.step, self.extra = int(meta["step"]), meta["extra"]


def resume(state: TrainState, path: str | Path, fingerprint: str) -> str:
    """Restore ``state`` from ``path`` when its fingerprint matches; return a one-line account.

    A missing or unreadable checkpoint, or one written from other inputs, leaves ``state``
    untouched (a fresh start) and the message says which. A matching checkpoint that fails to
    load midway is a :class:`CheckpointError` (``state`` may be half-restored).
    """
    path = Path(path)
    # A save killed mid-write (SIGKILL, power loss) leaves its temporary file (diffmodels.core.io
    # names it ".<name>.<random>.tmp"), never a half-written checkpoint; clear it away.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    if not path.exists():
        return "no checkpoint: starting from step 0"
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        return f"{exc}: starting fresh from step 0"
    if ckpt.meta.get("kind") != "train_state" or ckpt.meta.get("fingerprint") != fingerprint:
        return f"checkpoint {path} was written with other params, data or code: starting fresh from step 0"
    try:
        state.restore(ckpt)
    except (CheckpointError, KeyError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot restore training state ({reason}); delete it to start fresh") from None
    return f"resumed from {path} at step {state.step}"


