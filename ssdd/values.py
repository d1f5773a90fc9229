"""The ranges of the numbers a user gives, in one place: the command line's argument types and the configuration
dataclasses check their values with the same :class:`Range`."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ssdd.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Finite numbers from ``low`` to ``high`` (``None``: unbounded), ``low`` itself excluded when ``open_low``;
    integers only when ``integer``."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    integer: bool = False

    def describe(self) -> str:
        """The range in words, e.g. "an integer from 0 to 4294967295" or "a finite number > 0"."""
        kind = "an integer" if self.integer else "a finite number"
        low, high = _number(self.low), _number(self.high)
        if low is not None and high is not None:
            return f"{kind} from {low} to {high}" + (f" ({low} excluded)" if self.open_low else "")
        if low is not None:
            return f"{kind} {'>' if self.open_low else '>='} {low}"
        return kind if high is None else f"{kind} <= {high}"

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a number (not a bool) of the right kind inside the range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def check(self, value: Any, where: str) -> Any:
        """``value`` if it lies in the range, else a :class:`ConfigError` naming the setting ``where``."""
        if not self.contains(value):
            raise ConfigError(f"{where} must be {self.describe()}, got {value!r}")
        return value

    def argument(self, text: str) -> int | float:
        """An argparse ``type``: ``text`` read as a number in the range, or an argparse error saying the range."""
        try:
            value = int(text) if self.integer else float(text)
        except ValueError:
            value = None
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}")
        return value

    def arguments(self) -> Callable[[str], list[int | float]]:
        """An argparse ``type`` for a comma-separated list of numbers in the range (e.g. ``--seeds 0,1,2``)."""

        def parse(text: str) -> list[int | float]:
            values = [self.argument(item.strip()) for item in text.split(",") if item.strip()]
            if not values:
                raise argparse.ArgumentTypeError(f"expected a comma-separated list, each {self.describe()}; "
                                                 f"got {text!r}")
            return values

        return parse


def _number(value: float | None) -> str | None:
    """``value`` in words: whole numbers without a decimal point or exponent."""
    if value is None:
        return None
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


SEED_MAX = 2**32 - 1  # numpy's legacy seed range; derived seeds (seed * 100_003 + i) stay within torch's int64
SEED = Range(0, SEED_MAX, integer=True)
POSITIVE_INT = Range(1, integer=True)
POSITIVE = Range(0, open_low=True)
FRACTION = Range(0, 1, open_low=True)
