"""fedpar.control.recovery: what a restarted controller does with the unfinished tasks in its store."""

from __future__ import annotations

from fedpar.control.recovery import Recovery, task_from_record
from fedpar.store.records import ASSIGNED, QUEUED, RUNNING, TaskRecord


def rec(tid: str, state: str, *, target: int | None = None, engine: int | None = None, attempts: int = 0,
        retries: int = 0) -> TaskRecord:
    return TaskRecord(tid, "client:c", "apply", target, state, engine, 1.0, 2.0 if engine is not None else None,
                      None, attempts, retries, {"k": 1})


def test_task_from_record_keeps_what_scheduling_needs() -> None:
    t = task_from_record(rec("t1", ASSIGNED, engine=3, attempts=2, retries=1))
    assert (t.task_id, t.engine, t.assigned, t.attempts, t.retries, t.spec) == ("t1", 3, 2.0, 2, 1, {"k": 1})
    assert t.frames is None  # the payload stays in the store until dispatch


def test_records_are_sorted_into_queued_held_and_limbo() -> None:
    r = Recovery([rec("lb", QUEUED), rec("direct", QUEUED, target=2), rec("a", ASSIGNED, engine=1),
                  rec("r", RUNNING, engine=1), rec("b", ASSIGNED, engine=2)], deadline=100.0)
    assert [t.task_id for t in r.queued] == ["lb"]
    assert [t.task_id for t in r.held[2]] == ["direct"]
    assert sorted(r.limbo[1]) == ["a", "r"] and sorted(r.limbo[2]) == ["b"]
    assert r.active
    assert r.find("lb") is None  # re-queued at once: the scheduler owns it
    assert r.find("direct") is not None and r.find("r") is not None


def test_returning_engine_keeps_what_it_holds_and_loses_the_rest() -> None:
    r = Recovery([rec("a", ASSIGNED, engine=1), rec("b", RUNNING, engine=1), rec("d", QUEUED, target=1),
                  rec("x", ASSIGNED, engine=2)], deadline=100.0)
    adopt, lost, held = r.engine_returned(1, ["b", "unrelated"])
    assert [t.task_id for t in adopt] == ["b"]
    assert [t.task_id for t in lost] == ["a"]
    assert [t.task_id for t in held] == ["d"]
    assert r.find("a") is None and r.find("b") is None and r.find("d") is None
    assert r.find("x") is not None and r.active


def test_take_removes_a_task_whose_result_arrived() -> None:
    r = Recovery([rec("a", ASSIGNED, engine=1), rec("d", QUEUED, target=4)], deadline=100.0)
    assert r.take("a") is not None and r.take("a") is None
    assert r.take("d") is not None and r.held[4] == []
    assert r.take("nope") is None
    adopt, lost, _ = r.engine_returned(1, ["a"])
    assert adopt == [] and lost == []


def test_expire_only_after_the_deadline_and_then_everything() -> None:
    r = Recovery([rec("a", ASSIGNED, engine=1), rec("d", QUEUED, target=5)], deadline=100.0)
    assert r.expire(99.0) == ([], [])
    lost, held = r.expire(100.0)
    assert [t.task_id for t in lost] == ["a"] and [t.task_id for t in held] == ["d"]
    assert not r.active and r.find("a") is None
    assert r.expire(200.0) == ([], [])
