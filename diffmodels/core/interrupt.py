"""Clean stops: Ctrl-C (SIGINT) and SIGTERM end a stage with a checkpoint and a KILLED MLflow run.

Who sends what
    Ctrl-C in a terminal and ``dvc queue kill`` send SIGINT; ``kill``, ``timeout``, batch
    schedulers (Slurm on pre-emption) and container runtimes send SIGTERM, then SIGKILL after a
    grace period.
    SIGKILL cannot be caught: atomic checkpoint writes (:mod:`diffmodels.core.io`) and resume
    (:func:`diffmodels.training.state.resume`) cover it.

Two layers
    :func:`signals_raise` (every stage entry point, ``stages/_cli.py``): SIGTERM raises
    :class:`Interrupted` wherever the program is, as Ctrl-C raises ``KeyboardInterrupt``, so
    ``with`` blocks unwind: temporary files are removed and
    :func:`diffmodels.core.tracking.stage_run` marks the MLflow run KILLED.

    :class:`StopAtStepEnd` (around a training loop): both signals only set a flag; the loop
    calls :meth:`StopAtStepEnd.step_done` after each step, which saves a checkpoint and raises
    :class:`Interrupted`. Saving at a step boundary keeps resume exact: a checkpoint taken in
    the middle of a step (after the optimizer, before the EMA update) would mix two steps.
    A second signal stops at once, keeping the last periodic checkpoint.

Signals that the parent ignores (``SIG_IGN``, e.g. SIGINT of a background job) stay ignored.
Handlers can only be set in the main thread; elsewhere both helpers do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal. ``exit_code`` is the shell's convention, 128 + signal number
    (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}" + (f" {detail}" if detail else ""))


def _catchable(signum: int) -> bool:
    """True when this process handles ``signum`` itself (not ignored, not a foreign handler)."""
    current = signal.getsignal(signum)
    return current in (signal.SIG_DFL, signal.default_int_handler)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` for the duration of the block."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if _catchable(signum):
                previous[signum] = signal.signal(signum, _raise_interrupted)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class StopAtStepEnd:
    """Defer SIGINT/SIGTERM to the end of the current training step, then save and stop.

    ``save()`` writes the checkpoint and returns the rest of the one-line message, e.g.
    ``"at step 7: checkpoint saved to ...; rerun to resume"``. Use::

        stop = StopAtStepEnd(save)
        with stop:
            for step in ...:
                ...one step...
                stop.step_done()   # a pending signal: save(), raise Interrupted
            stop.loop_done()       # the final phase (outs, evaluation) stops at once again
    """

    def __init__(self, save: Callable[[], str]):
        self.save = save
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopAtStepEnd:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                current = signal.getsignal(signum)
                if current not in (signal.SIG_IGN, None):
                    self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise Interrupted(signum, "again: stopped at once; the last periodic checkpoint is kept")
        self.signum = signum

    def step_done(self, agree: Callable[[bool], bool] | None = None) -> None:
        """Call at a step boundary: with a signal pending, save and raise :class:`Interrupted`.

        ``agree`` (several training processes, e.g. :meth:`diffmodels.training.distributed.World.any`)
        turns this process's "a signal is pending" into "any process has one", so every process
        stops after the same step; ``save`` then writes on rank 0 only."""
        pending = self.signum is not None
        if agree is not None:
            pending = agree(pending)
        if pending:
            signum = self.signum if self.signum is not None else signal.SIGTERM
            self._restore()  # a signal during the save now stops at once
            raise Interrupted(signum, self.save())

    def loop_done(self, agree: Callable[[bool], bool] | None = None) -> None:
        """The loop has ended: honour a pending signal, then let signals act at once again."""
        self.step_done(agree)
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()
        if exc_type is None and self.signum is not None:
            # Left the block without a step_done() (an early return): deliver the signal now.
            raise Interrupted(self.signum)
