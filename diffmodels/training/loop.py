"""The training loop both training stages run: resume, steps, bookkeeping, stops and final outputs.

A stage builds its model and data and hands :class:`Trainer` four things: the model, a *loss
step* (draw this step's global batch, run the forward pass on this process's rows, return the
losses), *hooks* (validation, sample strips: every N steps on rank 0) and an *outputs* callback
(weights, figures, metrics.json once the last step is done). The trainer does the rest, the same
way for every stage:

- resume: a fingerprint of the params the stage reads, its data identity, its code (the ``.py``
  deps of the stage in ``dvc.yaml``) and the precision decides whether ``last.safetensors``
  continues the run (:func:`diffmodels.training.state.resume`);
- each step: the losses averaged over ranks (:class:`~diffmodels.training.distributed.World`),
  the finite-loss guard, backward + clip + optimizer + LR schedule under the chosen precision
  (:func:`~diffmodels.training.optim.backward_and_step`), the EMA update when there is one;
- bookkeeping: one loss.tsv row per step, MLflow metrics every ``log_every`` steps, progress on
  rank 0 (:func:`diffmodels.core.progress.progress_bar`), a checkpoint every
  ``checkpoint_every`` steps and at ``--stop-after``;
- stops: Ctrl-C / SIGTERM finish the step, save and end the run KILLED
  (:class:`diffmodels.core.interrupt.StopAtStepEnd`), on every rank after the same step.

Order of work in a step, and so of random draws, is fixed here: a stage's loss step draws from
``state.sampler`` and ``state.generator`` only, so k steps + resume + (N - k) steps take the
same draws as N steps straight.
"""

from __future__ import annotations

import contextlib
import csv
import io
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffmodels.core import tracking
from diffmodels.core.config import flatten
from diffmodels.core.interrupt import StopAtStepEnd
from diffmodels.core.io import write_text
from diffmodels.core.progress import progress_bar
from diffmodels.data.images import save_png
from diffmodels.training.distributed import World
from diffmodels.training.optim import backward_and_step, check_finite, make_scheduler
from diffmodels.training.precision import Precision
from diffmodels.training.state import (
    EpochSampler,
    TrainState,
    code_files,
    file_digest,
    fingerprint,
    resume,
)

# (forward, rows) -> {name: 0-d loss tensor}: ``forward`` is the model to call (DDP-wrapped with
# several processes), ``rows`` this process's rows of the global batch. ``"loss"`` is minimised.
LossStep = Callable[[nn.Module, slice], Mapping[str, Tensor]]


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs to know of a training stage: its name, length, optimiser and cadences."""

    stage: str  # the dvc.yaml stage: progress label, message prefix, MLflow run, code deps
    project: Path  # the directory holding dvc.yaml
    steps: int
    lr: float  # AdamW peak learning rate, warm-up then cosine (diffmodels.training.optim)
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    checkpoint_every: int
    log_every: int
    checkpoints: Path  # folder of last.safetensors
    reports: Path  # folder of loss.tsv
    losses: tuple[str, ...] = ("loss",)  # what the loss step returns, in loss.tsv's column order
    stop_after: int | None = None  # stop after this step leaving a checkpoint, as a kill would (tests)

    @classmethod
    def from_params(cls, p: Any, *, stage: str, project: Path, checkpoints: Path, reports: Path,
                    losses: tuple[str, ...] = ("loss",), stop_after: int | None = None) -> LoopSettings:
        """From a stage's params group (``params.vae``, ``params.ddpm``: the same optimisation keys)."""
        return cls(stage, project, p.steps, p.lr, p.weight_decay, p.warmup_steps, p.grad_clip, p.checkpoint_every,
                   p.log_every, checkpoints, reports, tuple(losses), stop_after)

    @property
    def checkpoint(self) -> Path:
        return self.checkpoints / "last.safetensors"

    @property
    def columns(self) -> tuple[str, ...]:
        """loss.tsv's header: the step, the losses, then the learning rate and gradient norm."""
        return ("step", *self.losses, "lr", "grad_norm")


@dataclass(frozen=True)
class Every:
    """A hook: ``fn(step)`` on rank 0 after every ``steps``-th step but the last one (whose
    results the final outputs give). It must not use collectives: the other ranks do not run it."""

    steps: int
    fn: Callable[[int], None]


@dataclass(frozen=True)
class Finished:
    """The run as the outputs callback sees it, on rank 0 after the last step."""

    start_step: int  # the step this process started (resumed) from
    history: list[list[float]]  # loss.tsv's rows: step, losses, lr, grad_norm
    columns: tuple[str, ...]
    steps_per_second: float  # steps of this process over the loop's wall time

    def tail_mean(self, column: str, n: int) -> float | None:
        """Mean of ``column`` over the last ``n`` steps; None without steps."""
        i = self.columns.index(column)
        tail = np.asarray([row[i] for row in self.history[-n:]])
        return float(tail.mean()) if len(tail) else None


@dataclass(frozen=True)
class Outputs:
    """What the outputs callback wrote: files for the MLflow run and the end of the summary line."""

    artifacts: Sequence[Path]
    summary: str  # e.g. "7,439 params, val PSNR 25.30 dB SSIM 0.8700 (412s)"


class Trainer:
    """One training run of a stage in this process (alone, or one rank of a torchrun group).

    Builds the resumable :class:`~diffmodels.training.state.TrainState` (AdamW, warm-up + cosine
    schedule, GradScaler for fp16) around the stage's model, sampler and generator. Call
    :meth:`resume` (the stage may build more after it, e.g. load a frozen VAE), then :meth:`fit`.
    """

    def __init__(self, settings: LoopSettings, world: World, model: nn.Module, *, params: Any,
                 groups: Iterable[str], identity: Mapping[str, Any], config: dict[str, Any],
                 sampler: EpochSampler, generator: torch.Generator, precision: Precision, ema: Any = None,
                 extra: dict[str, Any] | None = None, parts: dict[str, Any] | None = None):
        """``params``/``groups``: the params file and the groups the stage reads (fingerprint and
        MLflow run); ``identity``: what identifies its data (a manifest sha, a latent scale);
        ``config``: the model config stored in checkpoints; ``extra``: JSON-able state the stage's
        hooks keep across a resume, beside the loss history; ``parts``: more state the loss step
        trains itself (a discriminator and its optimizer), checkpointed and restored with the rest."""
        self.settings, self.world, self.precision = settings, world, precision
        self.params, self.groups = params, tuple(groups)
        self.config = config
        self.forward = world.wrap(model)  # DDP when several processes; EMA and checkpoints use `model`
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.state = TrainState(
            model=model,
            optimizer=optimizer,
            scheduler=make_scheduler(optimizer, settings.warmup_steps, settings.steps),
            sampler=sampler,
            generator=generator,
            scaler=precision.scaler,
            ema=ema,
            extra={"history": [], **(extra or {})},
            parts=dict(parts or {}),
        )
        code = file_digest(code_files(settings.stage, settings.project))
        self.fingerprint = fingerprint({
            "params": flatten(params, self.groups),
            **identity,
            "code": {str(Path(f).relative_to(settings.project)): digest for f, digest in code.items()},
            "precision": precision.name,
        })
        self.start_step: int | None = None

    def resume(self) -> int:
        """Continue from the stage's checkpoint when it was written from the same inputs; say so
        on rank 0 and return the step to start from (0 for a fresh start)."""
        message = resume(self.state, self.settings.checkpoint, self.fingerprint)
        self.world.check_same(self.state.step, "the step to resume from")
        if self.world.main:
            print(f"{self.settings.stage}: {message}")
        self.start_step = self.state.step
        return self.start_step

    def save_checkpoint(self) -> str:
        """Write the training state (rank 0); the rest of the one-line stop message."""
        if self.world.main:
            self.state.save(self.settings.checkpoint, self.fingerprint, self.config)
        return f"at step {self.state.step}: checkpoint saved to {self.settings.checkpoint}; rerun the stage to resume"

    def fit(self, loss_step: LossStep, outputs: Callable[[Finished], Outputs], hooks: Sequence[Every] = (),
            run_params: Mapping[str, Any] | None = None) -> None:
        """Train from the resumed step to ``settings.steps``, then (rank 0) write the outputs.

        Rank 0 opens the stage's MLflow run (``run_params``: what the stage adds to its params,
        e.g. the parameter count), writes loss.tsv, logs it and the outputs' files, removes the
        checkpoint and prints the summary line. ``--stop-after`` returns after its step.
        """
        if self.start_step is None:
            self.resume()
        s, world, state = self.settings, self.world, self.state
        stop = StopAtStepEnd(self.save_checkpoint)  # Ctrl-C / SIGTERM: save at the end of the step, then stop
        run = tracking.stage_run(s.stage, self.params, self.groups) if world.main else contextlib.nullcontext()
        with run, stop:
            if world.main:
                tracking.set_tags({"resumed_from_step": self.start_step, "device": str(world.device),
                                 "precision": self.precision.name, "world_size": world.size})
                tracking.log_params({**(run_params or {}), **flatten(self.params, ["distributed"])})
            started = time.perf_counter()
            bar = progress_bar(s.steps, s.stage, unit="step", initial=self.start_step, enabled=world.main)
            rows = world.rows(state.sampler.batch_size)
            for step in range(self.start_step, s.steps):
                row = self._step(loss_step, rows, step)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", refresh=False)
                bar.update(1)
                if world.main and state.step % s.log_every == 0:
                    tracking.log_metrics(row, step=state.step)
                for hook in hooks:
                    if world.main and state.step % hook.steps == 0 and state.step < s.steps:
                        hook.fn(state.step)
                if state.step % s.checkpoint_every == 0 or state.step == s.stop_after:
                    self.save_checkpoint()
                if s.stop_after is not None and state.step >= s.stop_after:
                    bar.close()
                    if world.main:
                        print(f"{s.stage}: stopped after step {state.step} as asked; rerun to resume")
                    return
                stop.step_done(agree=world.any)
            bar.close()
            stop.loop_done(agree=world.any)
            if not world.main:
                return
            steps_per_second = (s.steps - self.start_step) / max(time.perf_counter() - started, 1e-9)
            done = Finished(self.start_step, state.extra["history"], s.columns, steps_per_second)
            result = self._finish(outputs(done))
        print(f"{s.stage}: {s.steps} steps ({self.start_step} resumed) on {world.device} {self.precision.name}"
              f"{world.label}, {result.summary}")

    def _step(self, loss_step: LossStep, rows: slice, step: int) -> dict[str, float]:
        """One optimisation step; returns its loss.tsv row as a dict (losses over the global batch)."""
        s, state = self.settings, self.state
        losses = loss_step(self.forward, rows)
        if tuple(losses) != s.losses:
            raise ValueError(f"the loss step returned {tuple(losses)}; LoopSettings.losses says {s.losses}")
        # The global batch's losses: this rank's means averaged over ranks (equal shards).
        global_losses = dict(zip(losses, self.world.mean(torch.stack(list(losses.values())).detach())))
        check_finite(global_losses, step + 1, s.checkpoint)
        lr = state.scheduler.get_last_lr()[0]
        grad_norm = backward_and_step(losses["loss"], state.model, state.optimizer, state.scheduler, s.grad_clip,
                                      self.precision.scaler)  # DDP averages the gradients over ranks
        if state.ema is not None:
            state.ema.update(state.model)
        state.step = step + 1
        row = {k: v.item() for k, v in global_losses.items()} | {"lr": lr, "grad_norm": grad_norm}
        state.extra["history"].append([state.step] + [row[c] for c in s.columns[1:]])
        return row

    def _finish(self, result: Outputs) -> Outputs:
        loss_tsv = self.settings.reports / "loss.tsv"
        write_table(loss_tsv, self.settings.columns, self.state.extra["history"])
        for path in (loss_tsv, *result.artifacts):
            tracking.log_artifact(str(path))
        self.settings.checkpoint.unlink(missing_ok=True)  # finished: the weights are the out now
        return result


def write_table(path: Path, columns: Sequence[str], rows: Iterable[Sequence[float]]) -> None:
    """A tab-separated table with a header (DVC plots read it): the first column (the step) as an
    integer, the others with ``%.6g``. Written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([str(int(row[0]))] + [f"{v:.6g}" for v in row[1:]] for row in rows)
    write_text(path, buffer.getvalue())


def log_png(image: np.ndarray, artifact: str) -> None:
    """Log an (H, W, C) uint8 image to the active MLflow run as ``artifact`` (``dir/name.png``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact).name
        save_png(path, image)
        tracking.log_artifact(str(path), artifact_path=str(Path(artifact).parent))

