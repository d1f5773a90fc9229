"""Expected orderings between an evaluation's entries (``"paa >= krr-st"``, ``"random > none"``), checked against
its cells: the test of an implementation that a benchmark suite states (benchmarks.md).

Each ordering is judged per architecture, target and label fraction from the means and standard deviations over
seeds. The noise of a comparison is the root sum of squares of the two standard deviations. ``a > b`` **holds** when
``a``'s mean exceeds ``b``'s by more than the noise, is **within noise** when the difference is no larger than the
noise either way, and **fails** when ``a`` is below ``b`` by more than the noise. ``a >= b`` holds unless ``a`` is
below ``b`` by more than the noise.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ssdd.errors import ConfigError
from ssdd.evaluation.evaluate import Cell
from ssdd.page import Block, Paragraph, Table

HOLDS, WITHIN_NOISE, FAILS = "holds", "within noise", "fails"
_ORDERING = re.compile(r"^\s*([\w.-]+)\s*(>=|>)\s*([\w.-]+)\s*$")


@dataclass(frozen=True)
class Ordering:
    """``above op below``: ``above``'s accuracy exceeds (``>``) or is not below (``>=``) ``below``'s."""

    above: str
    op: str
    below: str

    @classmethod
    def parse(cls, text: str, where: str = "ordering") -> Ordering:
        match = _ORDERING.match(text)
        if not match or match[1] == match[3]:
            raise ConfigError(f"{where}: {text!r} is not an ordering of two entries; write e.g. 'paa > random' or "
                              "'paa >= krr-st'")
        return cls(match[1], match[2], match[3])

    def __str__(self) -> str:
        return f"{self.above} {self.op} {self.below}"


@dataclass
class Expectation:
    """Orderings expected of one evaluation's entries on ``targets`` at label ``fractions`` (every one when unset),
    for every architecture."""

    orderings: list[str] = field(default_factory=list)
    targets: list[str] | None = None
    fractions: list[float] | None = None

    def parsed(self, where: str = "expect") -> list[Ordering]:
        return [Ordering.parse(text, f"{where}.orderings[{i}]") for i, text in enumerate(self.orderings)]


@dataclass
class Verdict:
    """One ordering judged on one (architecture, target, fraction)."""

    ordering: Ordering
    arch: str
    target: str
    fraction: float
    above: Cell
    below: Cell

    @property
    def difference(self) -> float:
        return self.above.mean - self.below.mean

    @property
    def noise(self) -> float:
        return math.hypot(self.above.std, self.below.std)

    @property
    def outcome(self) -> str:
        if self.difference < -self.noise:
            return FAILS
        if self.ordering.op == ">=" or self.difference > self.noise:
            return HOLDS
        return WITHIN_NOISE

    def to_dict(self) -> dict:
        return {"ordering": str(self.ordering), "arch": self.arch, "target": self.target, "fraction": self.fraction,
                "left": self.above.mean, "right": self.below.mean, "difference": self.difference,
                "noise": self.noise, "outcome": self.outcome}


def judge(expectation: Expectation, cells: list[Cell]) -> list[Verdict]:
    """Every ordering of ``expectation`` on every (architecture, target, fraction) where both of its entries have a
    cell; orderings naming an entry without cells (e.g. left out by ``--methods``) are skipped."""
    index = {(c.entry, c.arch, c.target, c.fraction): c for c in cells}
    places = dict.fromkeys((c.arch, c.target, c.fraction) for c in cells
                           if (expectation.targets is None or c.target in expectation.targets)
                           and (expectation.fractions is None
                                or any(math.isclose(c.fraction, f) for f in expectation.fractions)))
    verdicts = []
    for ordering in expectation.parsed():
        for arch, target, fraction in places:
            above, below = (index.get((e, arch, target, fraction)) for e in (ordering.above, ordering.below))
            if above is not None and below is not None:
                verdicts.append(Verdict(ordering, arch, target, fraction, above, below))
    return verdicts


def summary(verdicts: list[Verdict]) -> str:
    """``"12 comparisons: 7 hold, 3 within noise, 2 fail"``."""
    said = {HOLDS: "hold", WITHIN_NOISE: "within noise", FAILS: "fail"}
    return f"{len(verdicts)} comparisons: " + ", ".join(
        f"{sum(v.outcome == outcome for v in verdicts)} {word}" for outcome, word in said.items())


RULE = ("Each ordering per architecture, target and label fraction; noise: the root sum of squares of the two "
        "standard deviations over seeds. `a > b` holds when `a` is above `b` by more than the noise, fails when it is "
        "below by more than the noise, and is within noise otherwise; `a >= b` holds unless `a` is below by more than "
        "the noise.")


def verdict_blocks(verdicts: list[Verdict]) -> list[Block]:
    """The rule, a line counting the verdicts, and their table (a failure in bold)."""
    table = Table(["ordering", "architecture", "target", "labels", "left", "right", "difference", "noise", "verdict"],
                  [])
    for r, v in enumerate(verdicts):
        labels = f"{v.fraction * 100:g} %" if v.above.protocol == "linear" else "-"
        table.rows.append([str(v.ordering), v.arch, v.target, labels, f"{v.above.mean:.1f}", f"{v.below.mean:.1f}",
                           f"{v.difference:+.1f}", f"{v.noise:.1f}", v.outcome])
        if v.outcome == FAILS:
            table.strong.add((r, 8))
    return [Paragraph(RULE), Paragraph(summary(verdicts) + "."), table]

