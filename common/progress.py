"""The progress of a long loop, for a person at a terminal and for one reading a log file.

On a terminal (stderr is a tty) a tqdm bar. Otherwise (output piped to a file, a batch job, CI)
a log line at most every ``$GENIUS_PROGRESS_SECONDS`` seconds (default 30) and one at the end:

    train-gen: epoch 3 step 120/500 (24%), 5.21 step/s, ETA 01:13, loss 0.8123

tqdm alone is no help in a file (its carriage-return redraws are one unreadable line), and a
bar switched off leaves a multi-minute stage silent. Only the main process reports. The values
after the rate (:meth:`Progress.set_postfix`) are numbers the caller already holds on the host,
or callables evaluated only when a line is written: following a run adds no device
synchronisation to its steps.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

from genius.common.distributed import group_rank

T = TypeVar("T")
log = logging.getLogger("genius.progress")

INTERVAL_ENV = "GENIUS_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0
# Under tqdm, how often the postfix callables are evaluated (tqdm itself redraws 10 times a second).
TERMINAL_POSTFIX_SECONDS = 1.0


def on_terminal() -> bool:
    """Bars only on an interactive terminal, so log files and CI output stay readable."""
    return sys.stderr.isatty()


def interval_seconds() -> float:
    """Seconds between two progress lines in a log: ``$GENIUS_PROGRESS_SECONDS``, default 30."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: not a number of seconds >= 0; set it to e.g. 30, or unset it "
                         f"for the default {DEFAULT_INTERVAL:g}")
    return seconds


def clock_time(seconds: float) -> str:
    """``mm:ss``, or ``h:mm:ss`` from an hour on."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _figure(x: float) -> str:
    """Three significant digits, without an exponent."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _shown(value: Any) -> str:
    value = value() if callable(value) else value
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """``total`` units of work named ``label`` (e.g. ``"train-gen: epoch 3"``), ``done`` of them
    already done (a resumed epoch). Advance with :meth:`update` or iterate :meth:`wrap`.

    ``end_line``: log a line when the loop ends, and leave the bar on a terminal (off where the
    caller logs its own summary, such as a trainer's epoch line). ``enabled``: report at all
    (default: on the main process only). ``clock``: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, total: int, label: str, *, unit: str = "step", done: int = 0, logger: logging.Logger = log,
                 end_line: bool = True, enabled: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.total, self.label, self.unit, self.done = total, label, unit, done
        self.logger, self.end_line, self.clock = logger, end_line, clock
        self.enabled = group_rank()[0] == 0 if enabled is None else enabled
        self.interval = interval_seconds()
        self._first, self._postfix, self._closed = done, {}, False
        self._started = self._last = clock()
        # A bar whose caller logs its own summary line (a trainer's epoch) goes once done.
        self._bar = tqdm(total=total, initial=done, desc=label, unit=unit, dynamic_ncols=True, leave=end_line) \
            if self.enabled and on_terminal() else None

    def set_postfix(self, **values: float | int | str | Callable[[], Any]) -> None:
        """Values shown after the rate from now on (a callable is evaluated only when shown)."""
        self._postfix.update(values)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = self.clock()
        if self._bar is not None:
            if self._postfix and now - self._last >= TERMINAL_POSTFIX_SECONDS:
                self._last = now
                self._bar.set_postfix({k: _shown(v) for k, v in self._postfix.items()}, refresh=False)
            self._bar.update(n)
        elif now - self._last >= self.interval and not (self.end_line and self.done >= self.total):
            self._last = now
            self.logger.info("%s", self.line(now))

    def line(self, now: float, finished: bool = False) -> str:
        elapsed = now - self._started
        rate = (self.done - self._first) / elapsed if elapsed > 0 else 0.0
        share = 100 * self.done / self.total if self.total else 100.0
        parts = [f"{self.label} {self.unit} {self.done}/{self.total} ({share:.0f}%)"]
        if rate > 0:
            parts.append(f"{_figure(rate)} {self.unit}/s" if rate >= 1 else f"{_figure(1 / rate)} s/{self.unit}")
        if finished:
            parts.append(f"done in {clock_time(elapsed)}")
        else:
            parts.append(f"ETA {clock_time(max(self.total - self.done, 0) / rate)}" if rate > 0 else "ETA ?")
        parts += [f"{key} {_shown(value)}" for key, value in self._postfix.items()]
        return ", ".join(parts)

    def close(self, finished: bool = True) -> None:
        """End the bar, or log the end line (a loop left early by an error or ``break`` logs none)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and finished and self.end_line:
            self.logger.info("%s", self.line(self.clock(), finished=True))

    def wrap(self, iterable: Iterable[T]) -> Iterator[T]:
        """The items of ``iterable``, one unit of progress each once the loop body is done with it."""
        finished = False
        try:
            for item in iterable:
                yield item
                self.update()
            finished = True
        finally:
            self.close(finished)
