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


# --------------------------------------------------------------------------- bounded loads
from fedpar.federation.placement import place, quotas, rebalance  # noqa: E402

EQUAL3 = [("a", 1.0), ("b", 1.0), ("c", 1.0)]


def test_quotas_add_up_and_follow_weights() -> None:
    assert quotas(6, EQUAL3) == {"a": 2, "b": 2, "c": 2}
    assert sum(quotas(7, EQUAL3).values()) == 7 and sorted(quotas(7, EQUAL3).values()) == [2, 2, 3]
    assert quotas(10, [("a", 3.0), ("b", 1.0)]) == {"a": 8, "b": 2}  # 7.5 / 2.5: remainders tie, by id
    assert quotas(5, []) == {}


def test_new_engines_fill_controllers_evenly() -> None:
    counts = {"a": 0, "b": 0, "c": 0}
    for eid in range(6):  # the unbounded hash can leave a controller empty; bounded placement never does
        counts[place(eid, EQUAL3, counts) or ""] += 1
    assert counts == {"a": 2, "b": 2, "c": 2}
    assert place(1, [], {}) is None


def test_over_quota_controller_sheds_to_the_empty_one_only() -> None:
    ctl = [*EQUAL3, ("d", 1.0)]
    counts = {"a": 2, "b": 2, "c": 2, "d": 0}  # d just joined: a, b and c each owe it half an engine
    moves = {c: rebalance(c, list(range(i * 2, i * 2 + 2)), ctl, counts) for i, c in enumerate("abc")}
    assert all(t == "d" for m in moves.values() for t in m.values())
    assert 1 <= sum(len(m) for m in moves.values()) <= 3
    assert rebalance("d", [], ctl, counts) == {}
    assert rebalance("a", [0, 1], EQUAL3, {"a": 2, "b": 2, "c": 2}) == {}  # balanced: nothing moves


def test_rebalance_converges_without_overshooting() -> None:
    ctl = [*EQUAL3, ("d", 1.0)]
    owned = {"a": list(range(0, 12)), "b": list(range(12, 24)), "c": list(range(24, 36)), "d": []}
    for _ in range(10):
        counts = {c: len(v) for c, v in owned.items()}
        moves = {c: rebalance(c, v, ctl, counts) for c, v in owned.items()}
        if not any(moves.values()):
            break
        for src, m in moves.items():
            for eid, dst in m.items():
                owned[src].remove(eid)
                owned[dst].append(eid)
    assert {c: len(v) for c, v in owned.items()} == {"a": 9, "b": 9, "c": 9, "d": 9}
