"""Progress bars that fit where they go: the one helper every loop of ssdd shows its progress through.

On a terminal a bar is tqdm's, redrawn in place. On a pipe or a file (a log, CI) redrawing would write one
ever-growing line of carriage returns, so a bar writes whole lines instead: its status (step, rate, ETA) every
``SSDD_PROGRESS_SECONDS`` seconds (default 30) while it runs, and one line with the totals when a stage's bar ends
(bars inside a stage, ``leave=False``, end silently).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm
from tqdm.std import tqdm as plain_tqdm

from ssdd.errors import ConfigError, check_finite
from ssdd.values import POSITIVE

DEFAULT_SECONDS = 30.0
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f} %) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def line_seconds() -> float:
    """Seconds between two status lines on a pipe or file: ``$SSDD_PROGRESS_SECONDS``, default 30."""
    text = os.environ.get("SSDD_PROGRESS_SECONDS")
    if text is None:
        return DEFAULT_SECONDS
    try:
        return POSITIVE.check(float(text), "SSDD_PROGRESS_SECONDS")
    except ValueError:
        raise ConfigError(f"SSDD_PROGRESS_SECONDS must be {POSITIVE.describe()}, got {text!r}") from None


def progress_bar(iterable: Any = None, **options: Any) -> tqdm:
    """A tqdm bar (same arguments) on stderr: redrawn on a terminal, written as lines anywhere else (where the
    line interval and format are this module's, and the rates whole-run averages unless ``smoothing`` is given)."""
    stream = options.get("file") or sys.stderr
    if stream.isatty():
        return tqdm(iterable, **{"dynamic_ncols": True, **options})
    seconds = line_seconds()
    known = options.get("total") is not None or hasattr(iterable, "__len__")
    options.pop("dynamic_ncols", None)  # a line has no columns to fit
    return _Lines(iterable, **{"smoothing": 0, **options, "mininterval": seconds, "maxinterval": seconds,
                               "bar_format": LINE_FORMAT if known else None})


class _Lines(plain_tqdm):
    """A tqdm bar that writes whole lines: no carriage return, no cursor movement, at most one status line per
    ``mininterval`` seconds, and the final status when a bar that ``leave``s is closed. Rates are whole-run
    averages (``smoothing=0``)."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        now = time.monotonic()
        if msg is not None:  # tqdm clearing the bar (msg ''): nothing to clear
            return False
        if not hasattr(self, "_line_at"):  # the bar's creation: its stage has only begun
            self._line_at = now
        elif now - self._line_at >= self.mininterval:
            self._write_line(now)
        return True

    def _write_line(self, now: float) -> None:
        self._line_at = now
        line = str(self).strip()
        if line != getattr(self, "_line", None):  # the final status may be the last periodic one
            self._line = line
            self.fp.write(line + "\n")
            self.fp.flush()

    def close(self) -> None:
        if not self.disable and (self.leave is None or self.leave):
            with self._lock:
                self._write_line(time.monotonic())
        self.leave = False  # tqdm's own close then clears nothing (see display)
        super().close()

    def clear(self, nolock: bool = False) -> None:
        """Nothing to clear: a written line stays."""

    def moveto(self, n: int) -> None:
        """No cursor movement: nested bars each write their own lines."""


class LongRun:
    """The outer loop of a long run (teacher training, distillation): its progress bar, its clock (resumed parts
    included), the timer of its periodic checkpoints and its divergence guard."""

    def __init__(self, total: int, initial: int, desc: str, checkpoint_minutes: float, show: bool,
                 elapsed: float = 0.0):
        self.bar = progress_bar(total=total, initial=initial, desc=desc, unit="step", disable=not show)
        self.checkpoint_minutes = checkpoint_minutes
        self.started = time.monotonic() - elapsed
        self.last_checkpoint = time.monotonic()

    @property
    def seconds(self) -> float:
        """Seconds of the loop so far, the parts before a resume included."""
        return time.monotonic() - self.started

    def guard(self, value: float, what: str, advice: str) -> None:
        """Stop the run with a :class:`~ssdd.errors.NumericalError` when ``value`` is not finite."""
        check_finite(value, what, advice)

    def advance(self, postfix: dict[str, Any]) -> None:
        """One step done; ``postfix`` is shown beside the bar."""
        self.bar.update(1)
        self.bar.set_postfix(postfix)

    def checkpoint_due(self) -> bool:
        """Whether ``checkpoint_minutes`` have passed since the last checkpoint (or the start)."""
        return time.monotonic() - self.last_checkpoint > self.checkpoint_minutes * 60

    def checkpointed(self) -> None:
        """A checkpoint was written: the timer starts again."""
        self.last_checkpoint = time.monotonic()

    def close(self) -> None:
        self.bar.close()
