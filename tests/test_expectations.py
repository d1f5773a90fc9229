"""Expected orderings between entries: the verdict rule on hand-made cells, filtering, and clear errors."""

from __future__ import annotations

import pytest
from helpers import one_line

from ssdd.errors import ConfigError
from ssdd.evaluation import Cell
from ssdd.evaluation.expectations import FAILS, HOLDS, WITHIN_NOISE, Expectation, Ordering, judge, summary


def cell(entry: str, accuracies: list[float], fraction: float = 0.01, target: str = "cifar10",
         arch: str = "convnet3") -> Cell:
    return Cell(entry, "linear", arch, target, fraction, list(range(len(accuracies))), accuracies, 1.0)


# each std is 1 (three seeds one point apart), so every comparison's noise is sqrt(2) = 1.414
@pytest.mark.parametrize(("ordering", "above", "expected"), [
    ("a > b", 40.0, HOLDS),          # +3.0 > 1.414
    ("a > b", 38.0, WITHIN_NOISE),   # +1.0
    ("a > b", 36.0, WITHIN_NOISE),   # -1.0
    ("a > b", 35.0, FAILS),          # -2.0 < -1.414
    ("a >= b", 36.0, HOLDS),         # -1.0: not below by more than the noise
    ("a >= b", 35.0, FAILS),
])
def test_the_verdict_compares_the_difference_of_means_with_the_noise(ordering: str, above: float,
                                                                     expected: str) -> None:
    cells = [cell("a", [above - 1, above, above + 1]), cell("b", [36.0, 37.0, 38.0])]
    (verdict,) = judge(Expectation([ordering]), cells)
    assert verdict.difference == pytest.approx(above - 37.0)
    assert verdict.noise == pytest.approx(2 ** 0.5)
    assert verdict.outcome == expected


def test_orderings_are_judged_per_place_on_the_chosen_targets_and_fractions_only() -> None:
    cells = [cell(e, [m], fraction=f, target=t, arch=a)
             for e, m in (("paa", 40.0), ("random", 38.0), ("none", 39.0))
             for f in (0.01, 0.05, 1.0) for t in ("cifar10", "mnist") for a in ("convnet3", "resnet10")]
    cells = [c for c in cells if not (c.entry == "none" and c.arch == "resnet10")]  # one entry missing somewhere
    verdicts = judge(Expectation(["paa > random", "random > none", "paa > mkdt"], targets=["cifar10"],
                                 fractions=[0.01, 0.05]), cells)
    places = {(str(v.ordering), v.arch, v.target, v.fraction) for v in verdicts}
    assert places == {(o, a, "cifar10", f) for f in (0.01, 0.05) for o, a in
                      (("paa > random", "convnet3"), ("paa > random", "resnet10"), ("random > none", "convnet3"))}
    # one seed: no noise, so the sign of the difference decides
    assert {v.outcome for v in verdicts if str(v.ordering) == "paa > random"} == {HOLDS}
    assert {v.outcome for v in verdicts if str(v.ordering) == "random > none"} == {FAILS}
    assert summary(verdicts) == "6 comparisons: 4 hold, 0 within noise, 2 fail"


@pytest.mark.parametrize("text", ["paa < random", "paa", "paa > paa", "paa >> random", "> random"])
def test_a_malformed_ordering_is_a_clear_error(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        Ordering.parse(text, "expect.orderings[0]")
    message = one_line(info.value)
    assert "expect.orderings[0]" in message and repr(text) in message and "'paa > random'" in message


def test_ordering_round_trips_through_its_text() -> None:
    assert str(Ordering.parse("  paa>=krr-st ")) == "paa >= krr-st"
    assert Ordering.parse("dm-ssl > random") == Ordering("dm-ssl", ">", "random")
