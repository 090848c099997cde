"""Progress of long loops: a live bar on a terminal, a plain line every few percent elsewhere.

Under ``dvc repro > log``, a queue worker or CI, stderr is not a terminal: tqdm's carriage-return
bar would either be suppressed (``disable=None``) or fill the log with partial lines. There
:func:`progress` prints one ordinary line each time another ``every_percent`` of the work is done
(and at the end), with the rate and the estimated time left, so a log shows a stage is alive;
at most one line per ``min_interval_s`` seconds, so a loop that finishes in a blink prints nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
MIN_INTERVAL_S = 2.0  # seconds between two log lines at the least


class LogProgress:
    """The non-terminal stand-in for a tqdm bar: same ``update``/``set_postfix``/``close`` calls."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every_percent: float = 5.0,
                 min_interval_s: float | None = None, stream: TextIO | None = None, clock=time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every = max(1, round(total * every_percent / 100))
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval_s = MIN_INTERVAL_S if min_interval_s is None else min_interval_s
        self._clock, self._started, self._start_n = clock, clock(), initial
        self._last_emit, self._emitted_n = self._started, initial
        self._next = (initial // self.every + 1) * self.every
        self._postfix = ""
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next or self.n >= self.total:
            if self._clock() - self._last_emit >= self.min_interval_s:
                self._emit()
            self._next = (self.n // self.every + 1) * self.every

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _emit(self) -> None:
        now = self._clock()
        self._last_emit, self._emitted_n = now, self.n
        elapsed = now - self._started
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        eta = f", {left:.0f}s left" if left == left else ""
        extra = f" {self._postfix}" if self._postfix else ""
        percent = 100 * self.n / self.total if self.total else 100.0
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({percent:.0f}%, {rate:.3g} {self.unit}/s{eta}){extra}",
              file=self.stream, flush=True)

    def close(self) -> None:
        """A last line for a loop that ran long enough to be reported and stopped between lines."""
        long_enough = self._clock() - self._started >= self.min_interval_s
        if not self._closed and long_enough and self.n != self._emitted_n:
            self._emit()
        self._closed = True


def progress_bar(total: int, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
                 stream: TextIO | None = None, **log_options: Any) -> tqdm | LogProgress:
    """A tqdm bar on a terminal, :class:`LogProgress` lines otherwise; silent when not ``enabled``
    (e.g. on ranks other than 0)."""
    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return tqdm(total=total, initial=initial, disable=True)
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, mininterval=1.0, file=stream)
    return LogProgress(total, desc, unit, initial=initial, stream=stream, **log_options)


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, stream: TextIO | None = None, **log_options: Any) -> Iterator[T]:
    """Iterate ``items`` while showing progress (see the module docstring)."""
    if total is None:
        total = len(items)  # type: ignore[arg-type]
    bar = progress_bar(total, desc, unit, enabled=enabled, stream=stream, **log_options)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
