"""Weighted rendezvous placement: deterministic, proportional to weight, minimal movement."""

from __future__ import annotations

import collections

import pytest

from fedpar.federation.placement import assignment, owner, score

ENGINES = range(20_000)


def test_deterministic_and_order_independent() -> None:
    ctl = [("a", 1.0), ("b", 1.0), ("c", 1.0)]
    first = assignment(ENGINES, ctl)
    assert first == assignment(ENGINES, list(reversed(ctl)))
    assert owner(5, []) is None


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (1.0, 2.0, 3.0), (5.0, 1.0)])
def test_share_follows_weight(weights: tuple[float, ...]) -> None:
    ctl = [(f"c{i}", w) for i, w in enumerate(weights)]
    counts = collections.Counter(assignment(ENGINES, ctl).values())
    total = sum(weights)
    for cid, w in ctl:
        expected = len(ENGINES) * w / total
        assert abs(counts[cid] - expected) < 0.05 * expected + 50, (cid, counts[cid], expected)


def test_joining_controller_takes_its_share_only_from_others() -> None:
    before = assignment(ENGINES, [("a", 1.0), ("b", 1.0), ("c", 1.0)])
    after = assignment(ENGINES, [("a", 1.0), ("b", 1.0), ("c", 1.0), ("d", 1.0)])
    moved = [e for e in ENGINES if before[e] != after[e]]
    assert all(after[e] == "d" for e in moved)  # nobody moves between the old controllers
    assert abs(len(moved) - len(ENGINES) / 4) < 0.05 * len(ENGINES) / 4


def test_leaving_controller_engines_spread_over_survivors() -> None:
    before = assignment(ENGINES, [("a", 1.0), ("b", 1.0), ("c", 1.0)])
    after = assignment(ENGINES, [("a", 1.0), ("c", 1.0)])
    stayed = [e for e in ENGINES if before[e] != "b"]
    assert all(before[e] == after[e] for e in stayed)  # only b's engines move
    spread = collections.Counter(after[e] for e in ENGINES if before[e] == "b")
    assert abs(spread["a"] - spread["c"]) < 0.1 * sum(spread.values())


def test_zero_weight_never_wins_unless_alone() -> None:
    assert all(owner(e, [("a", 0.0), ("b", 1.0)]) == "b" for e in range(200))
    assert score(1, "a", 0.0) == float("-inf")
