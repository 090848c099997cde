"""Data-parallel training on PyTorch's own engine: ``torch.distributed`` + DDP under torchrun.

Launch
    The training stages run under ``torchrun`` like any PyTorch script (the launcher sets
    ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``). A stage started without it while
    ``distributed.nproc_per_node`` > 1 re-runs itself under the same launcher,
    :func:`launch`, so the command in ``dvc.yaml`` never changes. Workers join one process
    group: gloo on the CPU, NCCL on CUDA (``distributed.backend: auto``), one GPU per local rank.

Same global batch, same trajectory
    Every rank keeps the *whole* training state: the same seeded data order over global
    batches (:class:`diffmodels.training.state.EpochSampler`) and the same noise generator, drawing the
    noise of the whole global batch. Each rank then keeps its rows (:meth:`World.rows`) and
    computes the mean loss over them; DDP averages the gradients, which equals the gradient of
    the mean over the global batch because the shards are equal. So N processes take the steps
    one process takes with the same ``batch_size``, up to float summation order, and the
    resume state (data position, generator) is the same on every rank: rank 0's checkpoint
    resumes at any world size.

    Not covered: dropout (``ddpm.dropout``, 0 by default) draws its masks from the global torch
    RNG, seeded alike on every rank, so with dropout the ranks' masks repeat across shards and
    differ from the one-process run's.

Rank 0 alone writes outputs, checkpoints and metrics and logs to MLflow; the others wait for it
at the next collective (validation, sample strips and checkpoints run on rank 0 alone, so no
collective may hide in them: see :class:`diffmodels.data.latent_cache.ReconMetrics`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from diffmodels.core.errors import DiffmodelsError

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def under_launcher() -> bool:
    """True inside a process started by torchrun (or anything setting its variables)."""
    return all(v in os.environ for v in LAUNCHER_VARS)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    @property
    def label(self) -> str:
        """`` x N processes`` for summary lines; empty for one process."""
        return f" x {self.size} processes" if self.size > 1 else ""

    def check_batch(self, batch_size: int, key: str) -> None:
        """A global batch must split into equal shards (unequal ones would weight rows unequally)."""
        if batch_size % self.size:
            raise DiffmodelsError(
                f"{key} {batch_size} does not split over {self.size} training processes; "
                f"make it a multiple of {self.size} or change the number of processes"
            )

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size``: a contiguous 1/size slice."""
        assert batch_size % self.size == 0, "call check_batch first"
        per_rank = batch_size // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def mean(self, values: Tensor) -> Tensor:
        """Average of ``values`` over ranks (e.g. per-shard losses -> the global batch's loss)."""
        if self.size == 1:
            return values
        total = values.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.size

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any (e.g. "a stop signal is pending")."""
        if self.size == 1:
            return flag
        local = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        return bool(local.item())

    def check_same(self, value: int, what: str) -> None:
        """Raise on every rank unless all ranks hold the same integer (e.g. the resumed step)."""
        if self.size == 1:
            return
        local = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)  # (max, -min)
        if local[0] != -local[1]:
            raise DiffmodelsError(
                f"training processes disagree on {what} ({-int(local[1])} .. {int(local[0])}); "
                "with several machines the checkpoints folder must be shared by all of them"
            )

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around ``model`` for the forward and backward passes; ``model`` itself when alone.

        Keep using the unwrapped module for everything else (EMA, checkpoints, sampling), so
        saved weights carry no ``module.`` prefix and load at any world size.
        """
        if self.size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # DDP copies a gradient into its bucket when their strides differ; for a dimension of
        # size 1 (the VAE's 1-channel conv_in on grayscale data) that is a false alarm, once per run.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def backend_for(device: torch.device, backend: str) -> str:
    """``auto`` -> NCCL for CUDA, gloo for the CPU; refuse combinations that cannot work."""
    if device.type not in ("cpu", "cuda"):
        raise DiffmodelsError(
            f"distributed training runs on CUDA or the CPU, not {device.type}; set the stage's device to cuda or cpu"
        )
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DiffmodelsError("distributed.backend nccl needs CUDA devices; use auto or gloo on the CPU")
    return backend


@contextlib.contextmanager
def initialized(device: torch.device, backend: str = "auto") -> Iterator[World]:
    """Join the process group torchrun set up (if any) and yield this process's :class:`World`.

    ``device`` is the device the stage chose (``cuda`` means one GPU per local rank). Outside
    torchrun, or with a world of one, nothing is initialised. The group is destroyed on exit.
    """
    size = int(os.environ.get("WORLD_SIZE", "1")) if under_launcher() else 1
    if size == 1:
        yield World(device=device)
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    name = backend_for(device, backend)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DiffmodelsError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(name, device_id=device if device.type == "cuda" else None)
    try:
        yield World(rank=rank, size=size, device=device)
    finally:
        dist.destroy_process_group()


def check_launch(device: torch.device, nproc: int, backend: str) -> None:
    """Fail before starting workers when ``nproc`` processes cannot run on ``device``."""
    backend_for(device, backend)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise DiffmodelsError(
            f"distributed.nproc_per_node {nproc} is more than the {torch.cuda.device_count()} visible GPUs; "
            "lower it (one process per GPU)"
        )


def run_training(module: str, argv: Sequence[str], device: torch.device, nproc: int, backend: str,
                 train: Callable[[World], None]) -> None:
    """A training stage's entry: with ``nproc`` > 1 and no launcher yet, re-run ``module`` under
    torchrun (:func:`launch`); otherwise ``train(world)`` in this process, alone or as one rank."""
    if nproc > 1 and not under_launcher():
        check_launch(device, nproc, backend)
        launch(module, argv, nproc)
        return
    with initialized(device, backend) as world:
        train(world)


def launch(module: str, argv: Sequence[str], nproc: int) -> None:
    """Run ``python -m module *argv`` in ``nproc`` local worker processes under torchrun's
    launcher (``torch.distributed.run``, standalone rendezvous on this machine); block until
    they finish.

    Workers inherit the environment; ``OMP_NUM_THREADS`` defaults to the cores divided
    among them, and the package holding ``module`` goes first on ``PYTHONPATH`` so workers
    import the same code as this process. A failed worker is a :class:`DiffmodelsError`
    naming its rank and exit code (the worker printed its own error above it).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    package_root = Path(sys.modules[module.split(".")[0]].__file__).resolve().parents[1]
    env = {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc)),
        "PYTHONPATH": os.pathsep.join(filter(None, (str(package_root), os.environ.get("PYTHONPATH")))),
    }
    launcher_args = parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", module, *argv]
    )
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    # Its per-worker failure lines say what the one-line error below says.
    process_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    level = process_log.level
    process_log.setLevel(logging.CRITICAL)
    with _environ(env):
        try:
            run(launcher_args)
        except ChildFailedError as exc:
            failed = sorted(exc.failures.items())  # {global rank: ProcessFailure}
            shown = ", ".join(
                f"rank {rank} " + (f"exit code {f.exitcode}" if f.exitcode >= 0 else f"killed by signal {-f.exitcode}")
                for rank, f in failed
            )
            raise DiffmodelsError(
                f"{module}: {len(failed)} of {nproc} training processes failed ({shown}); see their errors above"
            ) from None
        except SignalException as exc:  # the launcher stopped the workers; exit as the signal asks
            raise SystemExit(128 + int(exc.sigval)) from None
        finally:
            process_log.setLevel(level)
            for sig, handler in handlers.items():  # the launcher installs its own, never removed
                signal.signal(sig, handler)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
