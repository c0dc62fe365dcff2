"""Membership views, the controller's tracker (takeovers) and the fence, without processes or clocks."""

from __future__ import annotations

import pytest

from fedpar.errors import MalformedMessage
from fedpar.federation.membership import LOST, OK, PAUSED, Fence, Tracker, View
from fedpar.federation.records import ControllerEntry, KnownController, Takeover


def entry(cid: str, epoch: int = 1, weight: float = 1.0) -> ControllerEntry:
    return ControllerEntry(cid, epoch, f"tcp://h:{epoch}1", f"tcp://h:{epoch}2", "h", 100, f"/s/{cid}", weight, 1.0)


def known(cid: str) -> KnownController:
    return KnownController(cid, "h", f"/s/{cid}", 1.0)


def test_view_round_trips_and_rejects_bad_shapes() -> None:
    v = View((entry("a"), entry("b", 2)), (known("c"),), (Takeover("c", 3, "a", 10.0, False, 1),))
    assert View.from_wire(v.to_wire()) == v
    assert v.entry("b") == entry("b", 2) and v.entry("zz") is None
    assert v.takeover("c", 3) is not None and v.takeover("c", 2) is None
    for bad in (None, {"live": "x"}, {"live": [["a", "1", "e", "e", "h", 1, "s", 1.0, 1.0]]},
                {"live": [["a"]]}, {"takeovers": [["c", 1, "a", 1.0, "no", 0]]}):
        with pytest.raises(MalformedMessage):
            View.from_wire(bad)


def test_view_place_uses_live_controllers_counts_and_exclusions() -> None:
    v = View((entry("a"), entry("b")))
    assert v.place(1) in {"a", "b"}
    assert {v.place(e, exclude=["a"]) for e in range(100)} == {"b"}
    assert {v.place(e, counts={"a": 5, "b": 0}) for e in range(100)} == {"b"}  # (a is over its quota)
    assert View().place(1) is None


def test_tracker_reports_joins_and_lapses_and_takes_over_once() -> None:
    t = Tracker("a", window=3.0)
    d = t.observe([entry("a"), entry("b"), entry("c")], [], [], now=100.0, mono=0.0)
    assert sorted(d.joined) == ["a", "b", "c"] and d.view is not None and not d.take_over
    assert t.observe([entry("a"), entry("b"), entry("c")], [], [], now=101.0, mono=1.0).view is None  # no change
    d = t.observe([entry("a"), entry("c")], [known("a"), known("b"), known("c")], [], now=102.0, mono=2.0)
    assert [e.cid for e in d.left] == ["b"] and d.take_over == [("b", 1)]
    assert d.view is not None and [k.cid for k in d.view.down] == ["b"]
    t.took_over("b", 1, Takeover("b", 1, "a", 102.0, False, 0), mono=2.0)
    d = t.observe([entry("a"), entry("c")], [], [Takeover("b", 1, "a", 102.0, False, 0)], now=103.0, mono=3.0)
    assert not d.take_over and not d.close  # the window is still open
    d = t.observe([entry("a"), entry("c")], [], [Takeover("b", 1, "a", 102.0, False, 0)], now=105.0, mono=5.1)
    assert d.close == [("b", 1)]
    t.closed("b", 1)
    d = t.observe([entry("a"), entry("c")], [], [Takeover("b", 1, "a", 102.0, False, 0)], now=106.0, mono=6.0)
    assert not d.close


def test_tracker_retries_a_takeover_that_failed_and_never_takes_over_itself() -> None:
    t = Tracker("a", window=3.0)
    t.observe([entry("a"), entry("b")], [], [], now=1.0, mono=1.0)
    d = t.observe([], [], [], now=2.0, mono=2.0)  # even our own entry lapsed: no takeover of ourselves
    assert d.take_over == [("b", 1)]
    t.failed("b", 1)
    t.view = View((entry("b"),))  # seen again, then lapsed again: attempted again
    d = t.observe([], [], [], now=3.0, mono=3.0)
    assert d.take_over == [("b", 1)]


def test_tracker_restart_is_a_lapse_of_the_old_incarnation() -> None:
    t = Tracker("a", window=3.0)
    t.observe([entry("a"), entry("b", 1)], [], [], now=1.0, mono=1.0)
    d = t.observe([entry("a"), entry("b", 2)], [], [], now=2.0, mono=2.0)
    assert [(e.cid, e.epoch) for e in d.left] == [("b", 1)] and d.joined == ["b"]
    assert not d.take_over  # b is live again: nothing to take over


def test_tracker_closes_a_takeover_whose_opener_died_after_window_and_grace() -> None:
    t = Tracker("a", window=3.0, grace=5.0)
    tk = Takeover("b", 1, "c", 100.0, False, 2)
    assert not t.observe([entry("a")], [], [tk], now=107.0, mono=0.0).close
    assert t.observe([entry("a")], [], [tk], now=108.5, mono=1.0).close == [("b", 1)]


def test_fence_states() -> None:
    f = Fence(3.0)
    assert f.state(0.0) == PAUSED  # registered controllers must prove their lease first
    f.renewed(10.0)
    assert f.state(11.0) == OK and f.state(12.5) == PAUSED  # until 10 + 3 * 0.8
    f.renewed(12.0)
    assert f.state(12.5) == OK
    f.lost()
    f.renewed(20.0)
    assert f.state(20.1) == LOST
    assert Fence(None).state(1e9) == OK
