"""Real-image selection: herding, k-center, random, top-loss and per-image MSE.

Every expected order below was worked out by hand (the working is in the comments) or by brute force over all
subsets of a small set; no expected value comes from the ssdd function under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
from helpers import one_line

from ssdd.errors import ConfigError
from ssdd.selection import (
    per_image_mse,
    select,
    select_herding,
    select_kcenter,
    select_per_class,
    select_random,
    select_top_loss,
)

# ---- herding ------------------------------------------------------------------------------------------------


def test_herding_hand_worked_1d_order() -> None:
    # Points (index: value) 0: 10, 1: 1, 2: 3, 3: 0, 4: 2.  Data mean = 16 / 5 = 3.2.
    # k=1: |x - 3.2| smallest at x=3 (0.2)                                   -> index 2, running sum 3
    # k=2: (3 + x) / 2 vs 3.2: x=10 -> 6.5 (3.3), x=1 -> 2 (1.2), x=0 -> 1.5 (1.7), x=2 -> 2.5 (0.7)
    #                                                                        -> index 4, running sum 5
    # k=3: (5 + x) / 3 vs 3.2: x=10 -> 5 (1.8), x=1 -> 2 (1.2), x=0 -> 1.667 (1.533)
    #                                                                        -> index 1, running sum 6
    # k=4: (6 + x) / 4 vs 3.2: x=10 -> 4 (0.8), x=0 -> 1.5 (1.7)              -> index 0, running sum 16
    # k=5: the last one                                                      -> index 3
    x = torch.tensor([[10.0], [1.0], [3.0], [0.0], [2.0]])
    assert select_herding(x, 5).tolist() == [2, 4, 1, 0, 3]
    # A prefix of the greedy order for smaller n.
    assert select_herding(x, 2).tolist() == [2, 4]


def test_herding_hand_worked_2d_order() -> None:
    # Points 0: (4, 0), 1: (0, 5), 2: (1, 1), 3: (-1, -1), 4: (0, 0); mean = (4, 5) / 5 = (0.8, 1.0).
    # k=1: squared distances to (0.8, 1): (4,0): 10.24 + 1 = 11.24; (0,5): 0.64 + 16 = 16.64; (1,1): 0.04;
    #      (-1,-1): 3.24 + 4 = 7.24; (0,0): 0.64 + 1 = 1.64                    -> index 2, running (1, 1)
    # k=2: ((1,1) + p) / 2: (4,0) -> (2.5, .5): 2.89 + .25 = 3.14; (0,5) -> (.5, 3): .09 + 4 = 4.09;
    #      (-1,-1) -> (0, 0): 1.64; (0,0) -> (.5, .5): .09 + .25 = .34         -> index 4, running (1, 1)
    # k=3: ((1,1) + p) / 3: (4,0) -> (5/3, 1/3): .7511 + .4444 = 1.1956; (0,5) -> (1/3, 2): .2178 + 1 = 1.2178;
    #      (-1,-1) -> (0, 0): 1.64                                             -> index 0, running (5, 1)
    # k=4: ((5,1) + p) / 4: (0,5) -> (1.25, 1.5): .2025 + .25 = .4525; (-1,-1) -> (1, 0): .04 + 1 = 1.04
    #                                                                          -> index 1, then index 3
    x = torch.tensor([[4.0, 0.0], [0.0, 5.0], [1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]])
    assert select_herding(x, 5).tolist() == [2, 4, 0, 1, 3]


def test_herding_selected_mean_approaches_the_data_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=gen) * torch.tensor([3.0, 1.0]) + torch.tensor([5.0, -2.0])
    mean = x.mean(0)
    errors = {n: float((x[select_herding(x, n)].mean(0) - mean).norm()) for n in (1, 4, 16, 64)}
    # Herding's error falls like 1/n (Welling 2009); random subsets only like 1/sqrt(n).
    assert errors[64] < errors[16] < errors[4]
    assert errors[64] < 0.02, errors
    random_errors = []
    for seed in range(20):
        idx = torch.randperm(400, generator=torch.Generator().manual_seed(seed))[:64]
        random_errors.append(float((x[idx].mean(0) - mean).norm()))
    assert errors[64] < 0.25 * (sum(random_errors) / len(random_errors)), (errors, random_errors)


def test_herding_returns_distinct_indices_even_with_duplicate_points() -> None:
    x = torch.tensor([[1.0], [1.0], [1.0], [-3.0]])
    idx = select_herding(x, 4)
    assert sorted(idx.tolist()) == [0, 1, 2, 3]
    assert idx.dtype == torch.long


# ---- k-center -----------------------------------------------------------------------------------------------

# Points on a line: 0, 1, 3, 7, 15 (indices 0..4).  Farthest-first order from each possible first center:
#   from 0:  farthest 15; then distances to {0,15}: 1->1, 3->3, 7->7        -> 7; then 1->1, 3->3 -> 3; then 1
#   from 1:  farthest 15; then to {1,15}: 0->1, 3->2, 7->6                  -> 7; then 0->1, 3->2 -> 3; then 0
#   from 3:  farthest 15; then to {3,15}: 0->3, 1->2, 7->4                  -> 7; then 0->3, 1->2 -> 0; then 1
#   from 7:  farthest 15 (8 > 7); then to {7,15}: 0->7, 1->6, 3->4          -> 0; then 1->1, 3->3 -> 3; then 1
#   from 15: farthest 0; then to {15,0}: 1->1, 3->3, 7->7                   -> 7; then 1->1, 3->3 -> 3; then 1
LINE = torch.tensor([[0.0], [1.0], [3.0], [7.0], [15.0]])
FARTHEST_FIRST = {0: [0, 4, 3, 2, 1], 1: [1, 4, 3, 2, 0], 2: [2, 4, 3, 0, 1], 3: [3, 4, 0, 2, 1], 4: [4, 0, 3, 2, 1]}


def test_kcenter_farthest_first_order_from_every_start() -> None:
    starts = set()
    for seed in range(40):
        order = select_kcenter(LINE, 5, seed=seed).tolist()
        assert order[0] in FARTHEST_FIRST, order
        assert order == FARTHEST_FIRST[order[0]], (seed, order)
        starts.add(order[0])
        # the same seed gives the same first center and so the same order
        assert select_kcenter(LINE, 5, seed=seed).tolist() == order
        # fewer centers: a prefix of the same traversal
        assert select_kcenter(LINE, 3, seed=seed).tolist() == order[:3]
    assert len(starts) >= 3, starts  # the first center really depends on the seed


def covering_radius(x: torch.Tensor, centers: list[int]) -> float:
    return max(min(math.dist(x[i].tolist(), x[c].tolist()) for c in centers) for i in range(x.shape[0]))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_kcenter_covering_radius_within_twice_optimal(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    centres = ([0.0, 0.0], [5.0, 1.0], [2.0, 6.0])
    x = torch.cat([torch.randn(4, 2, generator=gen) * 0.3 + torch.tensor(c) for c in centres])
    optimal = min(covering_radius(x, list(s)) for s in itertools.combinations(range(x.shape[0]), k))
    for seed in range(6):
        centers = select_kcenter(x, k, seed=seed).tolist()
        assert len(set(centers)) == k
        assert covering_radius(x, centers) <= 2 * optimal + 1e-6, (seed, centers, optimal)


# ---- random and top-loss ------------------------------------------------------------------------------------


def test_random_selection_is_seeded_distinct_and_in_range() -> None:
    a = select_random(30, 100, seed=3)
    assert a.dtype == torch.long and a.shape == (30,)
    assert len(set(a.tolist())) == 30
    assert all(0 <= i < 100 for i in a.tolist())
    assert torch.equal(a, select_random(30, 100, seed=3))
    assert not torch.equal(a, select_random(30, 100, seed=4))
    # not simply the first indices
    assert sorted(a.tolist()) != list(range(30))
    # n == available: a permutation of everything
    assert sorted(select_random(10, 10, seed=0).tolist()) == list(range(10))


def test_random_selection_does_not_touch_the_global_rng() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        select_random(5, 50, seed=1)
        after = torch.rand(3)
        torch.manual_seed(123)
        expected = torch.rand(3)
    assert torch.equal(after, expected)


def test_top_loss_picks_the_largest_losses() -> None:
    losses = torch.tensor([0.3, 2.5, -1.0, 7.0, 0.9, 2.4, 0.0])
    # sorted descending: 7.0 (3), 2.5 (1), 2.4 (5), 0.9 (4), 0.3 (0), ...
    assert sorted(select_top_loss(losses, 3).tolist()) == [1, 3, 5]
    assert sorted(select_top_loss(losses, 5).tolist()) == [0, 1, 3, 4, 5]
    assert select_top_loss(losses, 1).tolist() == [3]


@pytest.mark.parametrize("n", [0, -1, 6])
def test_selectors_reject_impossible_counts(n: int) -> None:
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    for call in (lambda: select_random(n, 5, seed=0), lambda: select_herding(x, n),
                 lambda: select_kcenter(x, n, seed=0), lambda: select_top_loss(x[:, 0], n)):
        with pytest.raises(ConfigError) as excinfo:
            call()
        assert str(n) in str(excinfo.value) and "5" in str(excinfo.value)


# ---- per-image MSE ------------------------------------------------------------------------------------------


class Doubler(nn.Module):
    """out = 2 * (sum of the pixels of each channel): a fixed model whose outputs are easy to write down."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x.sum(dim=(2, 3))


def test_per_image_mse_matches_a_loop_across_batches() -> None:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(7, 2, 3, 3, generator=gen)
    targets = torch.randn(7, 2, generator=gen)
    got = per_image_mse(Doubler(), images, targets, "cpu", batch_size=3)  # batches of 3, 3, 1
    expected = []
    for i in range(7):
        diffs = [2 * float(images[i, c].sum()) - float(targets[i, c]) for c in range(2)]
        expected.append(sum(d * d for d in diffs) / 2)
    assert got.shape == (7,)
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ---- the shared dispatch and the class-by-class selection -----------------------------------------------------


def test_select_dispatches_to_each_selection_and_names_the_known_ones() -> None:
    rows = torch.tensor([[10.0], [1.0], [3.0], [0.0], [2.0]])
    assert select("herding", rows, 2, 0).tolist() == [2, 4]  # the hand-worked herding order above
    assert torch.equal(select("random", rows, 3, 7), torch.randperm(5, generator=torch.Generator().manual_seed(7))[:3])
    assert select("kcenter", rows, 2, 0).tolist() == select_kcenter(rows, 2, 0).tolist()
    with pytest.raises(ConfigError) as info:
        select("nearest", rows, 2, 0)
    assert one_line(info.value) == "selection must be one of random, herding, kcenter, got 'nearest'"


def test_select_per_class_takes_the_classes_in_turn_and_names_a_class_too_small() -> None:
    labels = torch.tensor([1, 0, 1, 0, 1])  # class 0: indices 1, 3; class 1: indices 0, 2, 4
    seen = []

    def pick(members: torch.Tensor, c: int) -> torch.Tensor:
        seen.append((c, members.tolist()))
        return torch.tensor([1, 0])  # the second member, then the first

    assert select_per_class(labels, 2, 2, pick, "toy").tolist() == [3, 1, 2, 0]
    assert seen == [(0, [1, 3]), (1, [0, 2, 4])]
    with pytest.raises(ConfigError) as info:
        select_per_class(labels, 2, 3, pick, "toy")
    assert one_line(info.value) == "class 0 of toy has 2 images, fewer than the 3 per class asked"
