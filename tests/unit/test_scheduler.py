"""Tests for the pure state machines fedpar.control.scheduler.Scheduler and fedpar.control.registry.EngineRegistry."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from fedpar.control.registry import EngineRegistry
from fedpar.control.scheduler import INITIAL_CREDIT, MAX_CREDIT, PIPELINE_SECONDS, Scheduler, Task

_ids = itertools.count()


def task(target: int | None = None, tid: str | None = None, retries: int = 0) -> Task:
    return Task(tid or f"t{next(_ids)}", "client-1", "apply", target, 2, retries, {}, [b"f", b"a"], 100.0)


def sched(engines: int = 0, prefetch: int = 0) -> Scheduler:
    s = Scheduler(prefetch=prefetch)
    for e in range(engines):
        s.add_engine(e)
    return s


def flat(assignment: list[tuple[int, list[Task]]]) -> list[tuple[int, str]]:
    return [(eid, t.task_id) for eid, batch in assignment for t in batch]


def per_engine(assignment: list[tuple[int, list[Task]]]) -> Counter[int]:
    return Counter({eid: len(batch) for eid, batch in assignment})


def run_until_credit(s: Scheduler, engine: int, runtime: float, rounds: int = 40) -> None:
    """Feed completions of ``runtime`` seconds so the engine's runtime estimate settles."""
    for _ in range(rounds):
        s.submit(task(target=engine))
        for _eid, batch in s.assign(0.0):
            for t in batch:
                assert s.complete(t.task_id, t.engine, runtime) is t


def credit_of(s: Scheduler, engine: int) -> int:
    """How many LB tasks an otherwise idle engine takes in one assign."""
    assert s.engine_load(engine) == 0
    tasks = [task() for _ in range(MAX_CREDIT * 2)]
    for t in tasks:
        s.submit(t)
    got = s.assign(0.0)
    n = sum(len(b) for e, b in got if e == engine)
    # undo: complete them without a runtime, drop the rest from the queue
    for _e, b in got:
        for t in b:
            s.complete(t.task_id, t.engine, None)
    s.cancel_queued(t.task_id for t in tasks)
    assert s.queued == 0 and s.in_flight == 0
    return n


# --------------------------------------------------------------------------- load balancing
def test_no_engines_assigns_nothing() -> None:
    s = sched()
    s.submit(task())
    assert s.assign(1.0) == []
    assert s.queued == 1 and s.in_flight == 1 and s.assigned_count == 0


def test_empty_queue_assigns_nothing() -> None:
    assert sched(3).assign(1.0) == []


def test_lb_tasks_spread_evenly() -> None:
    s = sched(3)
    for _ in range(6):
        s.submit(task())
    out = s.assign(1.0)
    assert per_engine(out) == {0: 2, 1: 2, 2: 2}
    assert s.queued == 0 and s.assigned_count == 6


def test_lb_fewer_tasks_than_engines_one_each() -> None:
    s = sched(4)
    for _ in range(3):
        s.submit(task())
    out = s.assign(1.0)
    assert sorted(per_engine(out).values()) == [1, 1, 1]
    assert len(per_engine(out)) == 3


def test_lb_uneven_count_differs_by_at_most_one() -> None:
    s = sched(3)
    for _ in range(5):
        s.submit(task())
    counts = per_engine(s.assign(1.0))
    assert sum(counts.values()) == 5
    assert max(counts.values()) - min(counts.values()) <= 1


def test_lb_limited_by_initial_credit() -> None:
    s = sched(3)
    for _ in range(20):
        s.submit(task())
    out = s.assign(1.0)
    assert per_engine(out) == {0: INITIAL_CREDIT, 1: INITIAL_CREDIT, 2: INITIAL_CREDIT}
    assert s.queued == 20 - 3 * INITIAL_CREDIT
    assert s.assigned_count == 3 * INITIAL_CREDIT
    assert s.in_flight == 20
    # nothing more until credit is freed
    assert s.assign(2.0) == []


def test_lb_prefers_engine_with_most_free_credit() -> None:
    s = sched(2)
    s.submit(task())
    (eid, [first]), = s.assign(1.0)
    s.submit(task())
    (eid2, [second]), = s.assign(1.0)
    assert eid2 != eid  # the idle engine gets it
    assert first.engine == eid and second.engine == eid2


def test_lb_fifo_order() -> None:
    s = sched(1)
    tasks = [task() for _ in range(INITIAL_CREDIT * 3)]
    for t in tasks:
        s.submit(t)
    seen: list[str] = []
    while len(seen) < len(tasks):
        out = s.assign(1.0)
        assert out
        for _eid, batch in out:
            for t in batch:
                seen.append(t.task_id)
                s.complete(t.task_id, 0, None)
    assert seen == [t.task_id for t in tasks]


def test_lb_fifo_order_across_engines() -> None:
    s = sched(3)
    tasks = [task() for _ in range(6)]
    for t in tasks:
        s.submit(t)
    out = s.assign(1.0)
    # each engine's batch is in submission order
    for _eid, batch in out:
        idx = [tasks.index(t) for t in batch]
        assert idx == sorted(idx)
    assert sorted(tid for _e, tid in flat(out)) == sorted(t.task_id for t in tasks)


def test_assign_marks_tasks() -> None:
    s = sched(1)
    t = task()
    s.submit(t)
    assert t.engine is None and t.assigned is None and t.attempts == 0
    s.assign(42.5)
    assert t.engine == 0 and t.assigned == 42.5 and t.attempts == 1
    assert s.get(t.task_id) is t


# --------------------------------------------------------------------------- credit
def test_initial_credit_before_any_runtime_known() -> None:
    s = sched(1)
    assert credit_of(s, 0) == INITIAL_CREDIT


def test_complete_without_runtime_keeps_initial_credit() -> None:
    s = sched(1)
    s.submit(task())
    [(_, [t])] = s.assign(0.0)
    s.complete(t.task_id, 0, None)
    assert credit_of(s, 0) == INITIAL_CREDIT


@pytest.mark.parametrize("prefetch", [1, 3, 10, 200])
def test_fixed_prefetch(prefetch: int) -> None:
    s = sched(1, prefetch=prefetch)
    n = 300
    for _ in range(n):
        s.submit(task())
    assert sum(len(b) for _e, b in s.assign(0.0)) == min(prefetch, n)


@pytest.mark.parametrize("runtime", [1.0, 0.0001, 1e-7])
def test_fixed_prefetch_ignores_runtime(runtime: float) -> None:
    s = sched(1, prefetch=3)
    run_until_credit(s, 0, runtime, rounds=10)
    assert credit_of(s, 0) == 3


def test_adaptive_short_tasks_credit_grows_to_max() -> None:
    s = sched(1)
    run_until_credit(s, 0, 1e-6)
    assert credit_of(s, 0) == MAX_CREDIT


def test_adaptive_zero_runtime_is_capped() -> None:
    s = sched(1)
    run_until_credit(s, 0, 0.0, rounds=3)
    assert credit_of(s, 0) == MAX_CREDIT


def test_adaptive_medium_tasks_credit_in_between() -> None:
    s = sched(1)
    runtime = PIPELINE_SECONDS / 10
    run_until_credit(s, 0, runtime, rounds=80)
    assert INITIAL_CREDIT < credit_of(s, 0) < MAX_CREDIT
    assert abs(credit_of(s, 0) - 10) <= 1


@pytest.mark.parametrize("runtime", [PIPELINE_SECONDS * 2, 0.5, 60.0])
def test_adaptive_long_tasks_credit_one(runtime: float) -> None:
    s = sched(1)
    run_until_credit(s, 0, runtime, rounds=3)
    assert credit_of(s, 0) == 1


def test_adaptive_credit_is_per_engine() -> None:
    s = sched(2)
    run_until_credit(s, 0, 10.0, rounds=3)
    run_until_credit(s, 1, 1e-6, rounds=40)
    assert credit_of(s, 0) == 1
    assert credit_of(s, 1) == MAX_CREDIT


def test_negative_runtime_is_ignored() -> None:
    s = sched(1)
    run_until_credit(s, 0, -1.0, rounds=3)
    assert credit_of(s, 0) == INITIAL_CREDIT


def test_long_tasks_spread_one_per_engine() -> None:
    s = sched(3)
    for e in range(3):
        run_until_credit(s, e, 5.0, rounds=2)
    for _ in range(10):
        s.submit(task())
    assert per_engine(s.assign(0.0)) == {0: 1, 1: 1, 2: 1}


# --------------------------------------------------------------------------- direct tasks
def test_direct_tasks_only_go_to_their_engine() -> None:
    s = sched(3)
    d = [task(target=1) for _ in range(INITIAL_CREDIT)]
    for t in d:
        s.submit(t)
    out = s.assign(1.0)
    assert flat(out) == [(1, t.task_id) for t in d]
    assert all(t.engine == 1 for t in d)


def test_direct_tasks_wait_for_their_engine_even_when_others_are_idle() -> None:
    s = sched(2)
    d = [task(target=0) for _ in range(5)]
    for t in d:
        s.submit(t)
    out = s.assign(1.0)
    assert flat(out) == [(0, t.task_id) for t in d[:INITIAL_CREDIT]]
    assert s.queued == 5 - INITIAL_CREDIT
    assert s.engine_load(0) == 5 and s.engine_load(1) == 0
    # engine 1 stays idle; engine 0 gets more as its credit frees up, in FIFO order
    s.complete(d[0].task_id, 0, None)
    assert flat(s.assign(2.0)) == [(0, d[INITIAL_CREDIT].task_id)]


def test_direct_tasks_before_lb_tasks() -> None:
    s = sched(1)
    lb = [task() for _ in range(3)]
    for t in lb:
        s.submit(t)
    d = task(target=0)
    s.submit(d)  # submitted last, dispatched first
    out = s.assign(1.0)
    ids = [tid for _e, tid in flat(out)]
    assert ids[0] == d.task_id
    assert ids == [d.task_id, lb[0].task_id][:INITIAL_CREDIT]


def test_direct_and_lb_mixed_batches() -> None:
    s = sched(2)
    d0 = task(target=0)
    lb = [task() for _ in range(3)]
    s.submit(d0)
    for t in lb:
        s.submit(t)
    out = dict(s.assign(1.0))
    assert out[0][0] is d0
    assert sum(len(b) for b in out.values()) == 4
    assert len(out[0]) == INITIAL_CREDIT and len(out[1]) == INITIAL_CREDIT
    # the LB tasks went out in order: first to the engine with more free credit (1)
    assert out[1][0] is lb[0]


def test_direct_fifo_per_engine() -> None:
    s = sched(2, prefetch=100)
    d0 = [task(target=0) for _ in range(5)]
    d1 = [task(target=1) for _ in range(5)]
    for a, b in zip(d0, d1, strict=True):
        s.submit(a)
        s.submit(b)
    out = dict(s.assign(1.0))
    assert out[0] == d0 and out[1] == d1


# --------------------------------------------------------------------------- completion
def test_complete_frees_credit_and_returns_task() -> None:
    s = sched(1)
    tasks = [task() for _ in range(INITIAL_CREDIT + 1)]
    for t in tasks:
        s.submit(t)
    s.assign(1.0)
    assert s.assign(1.0) == []
    assert s.complete(tasks[0].task_id, 0, None) is tasks[0]
    assert s.get(tasks[0].task_id) is None
    assert flat(s.assign(2.0)) == [(0, tasks[-1].task_id)]


def test_duplicate_completion_returns_none() -> None:
    s = sched(1)
    t = task()
    s.submit(t)
    s.assign(1.0)
    assert s.complete(t.task_id, 0, 0.1) is t
    assert s.complete(t.task_id, 0, 0.1) is None
    assert s.complete("never-submitted", 0, 0.1) is None
    assert s.in_flight == 0 and s.assigned_count == 0


def test_completion_after_engine_removed() -> None:
    s = sched(1)
    t = task()
    s.submit(t)
    s.assign(1.0)
    s.remove_engine(0)
    assert s.complete(t.task_id, 0, 0.1) is None


# --------------------------------------------------------------------------- engines
def test_remove_engine_returns_running_and_waiting() -> None:
    s = sched(2)
    lb = [task() for _ in range(2)]
    direct = [task(target=0) for _ in range(INITIAL_CREDIT + 2)]
    for t in direct + lb:
        s.submit(t)
    s.assign(1.0)
    running_on_0 = {t.task_id for t in direct + lb if t.engine == 0}
    running, waiting = s.remove_engine(0)
    assert {t.task_id for t in running} == running_on_0
    assert len(running) == INITIAL_CREDIT
    assert waiting == direct[INITIAL_CREDIT:]
    assert not s.has_engine(0)
    assert s.engine_ids() == [1]
    for t in running + waiting:
        assert s.get(t.task_id) is None
    assert s.queued == 0
    assert s.assigned_count == sum(1 for t in lb if t.engine == 1)
    assert s.in_flight == s.assigned_count


def test_remove_unknown_engine() -> None:
    assert sched(1).remove_engine(7) == ([], [])


def test_add_engine_twice_keeps_state() -> None:
    s = sched(1)
    t = task()
    s.submit(t)
    s.assign(0.0)
    s.add_engine(0)
    assert s.engine_load(0) == 1
    assert s.engine_ids() == [0]


def test_engine_helpers() -> None:
    s = sched(0)
    s.add_engine(5)
    s.add_engine(2)
    assert s.engine_ids() == [2, 5]
    assert s.has_engine(2) and not s.has_engine(3)
    assert s.engine_load(3) == 0


# --------------------------------------------------------------------------- requeue / cancel
def test_requeue_puts_task_at_front() -> None:
    s = sched(1)
    a, b, c = task(), task(), task()
    for t in (a, b, c):
        s.submit(t)
    s.assign(1.0)  # a, b assigned
    running, _ = s.remove_engine(0)
    assert running == [a, b]
    s.add_engine(1)
    for t in reversed(running):
        s.requeue(t)
    assert b.engine is None and b.assigned is None
    assert s.in_flight == 3 and s.queued == 3
    out = s.assign(2.0)
    assert flat(out) == [(1, a.task_id), (1, b.task_id)]
    assert a.attempts == 2 and b.attempts == 2 and c.attempts == 0


def test_requeue_single_task_goes_before_older_queue() -> None:
    s = sched(1, prefetch=1)
    first, queued = task(), task()
    s.submit(first)
    s.assign(0.0)
    s.submit(queued)
    running, _ = s.remove_engine(0)
    s.add_engine(1)
    s.requeue(running[0])
    assert flat(s.assign(1.0)) == [(1, first.task_id)]


def test_late_result_for_requeued_task_is_not_dispatched_again() -> None:
    s = sched(1)
    t = task(retries=1)
    s.submit(t)
    s.assign(0.0)
    running, _ = s.remove_engine(0)  # engine 0 declared dead...
    s.requeue(running[0])
    assert s.complete(t.task_id, 0, 1.0) is t  # ...but its result arrives after all
    assert s.in_flight == 0
    assert s.queued == 0
    s.add_engine(1)
    assert s.assign(1.0) == []


def test_attempts_increment_per_assignment() -> None:
    s = sched(1)
    t = task(retries=3)
    s.submit(t)
    for attempt in range(1, 4):
        s.assign(float(attempt))
        assert t.attempts == attempt
        running, _ = s.remove_engine(0)
        assert running == [t]
        s.add_engine(0)
        s.requeue(t)


def test_cancel_queued() -> None:
    s = sched(1)
    a, b = task(), task()
    s.submit(a)
    s.submit(b)
    s.assign(0.0)  # both assigned (credit 2)
    c, d, e = task(), task(target=0), task()
    for t in (c, d, e):
        s.submit(t)
    removed = s.cancel_queued([a.task_id, c.task_id, d.task_id, "unknown"])
    # a is assigned (not queued): it stays
    assert {t.task_id for t in removed} == {c.task_id, d.task_id}
    assert s.get(c.task_id) is None and s.get(d.task_id) is None and s.get(a.task_id) is a
    assert s.queued == 1
    assert s.in_flight == 3
    s.complete(a.task_id, 0, None)
    assert flat(s.assign(1.0)) == [(0, e.task_id)]


def test_cancel_queued_keeps_order_of_the_rest() -> None:
    s = sched(0)
    tasks = [task() for _ in range(6)]
    for t in tasks:
        s.submit(t)
    s.cancel_queued([tasks[1].task_id, tasks[4].task_id])
    s.add_engine(0)
    seen = []
    while s.queued:
        for _e, b in s.assign(0.0):
            for t in b:
                seen.append(t)
                s.complete(t.task_id, 0, None)
    assert seen == [tasks[i] for i in (0, 2, 3, 5)]


def test_cancel_nothing() -> None:
    s = sched(1)
    s.submit(task())
    assert s.cancel_queued([]) == []
    assert s.queued == 1


# --------------------------------------------------------------------------- counters
def test_counters_through_a_lifecycle() -> None:
    s = sched(2)
    tasks = [task() for _ in range(6)] + [task(target=1)]
    for t in tasks:
        s.submit(t)
    assert (s.queued, s.in_flight, s.assigned_count) == (7, 7, 0)
    s.assign(0.0)
    assigned = 2 * INITIAL_CREDIT
    assert (s.queued, s.in_flight, s.assigned_count) == (7 - assigned, 7, assigned)
    for t in [t for t in tasks if t.engine is not None]:
        s.complete(t.task_id, t.engine, None)
    assert (s.queued, s.in_flight, s.assigned_count) == (7 - assigned, 7 - assigned, 0)
    while s.in_flight:
        for _e, b in s.assign(1.0):
            for t in b:
                s.complete(t.task_id, t.engine, None)
    assert (s.queued, s.in_flight, s.assigned_count) == (0, 0, 0)
    assert all(t.attempts == 1 for t in tasks)


def test_engine_load_counts_outstanding_and_direct() -> None:
    s = sched(1)
    for _ in range(INITIAL_CREDIT + 3):
        s.submit(task(target=0))
    s.submit(task())  # LB tasks do not count until assigned
    s.assign(0.0)
    assert s.engine_load(0) == INITIAL_CREDIT + 3


# =========================================================================== registry
def reg(timeout: float = 10.0, next_id: int = 0) -> EngineRegistry:
    return EngineRegistry(timeout, next_id)


def test_register_assigns_increasing_ids() -> None:
    r = reg()
    a = r.register("uuid-a", "host1", 100, b"ident-a", now=1.0)
    b = r.register("uuid-b", "host2", 200, b"ident-b", now=2.0)
    assert (a.engine_id, b.engine_id) == (0, 1)
    assert a.uuid == "uuid-a" and a.hostname == "host1" and a.pid == 100 and a.state == "up"
    assert r.ids() == [0, 1]
    assert [e.uuid for e in r.engines()] == ["uuid-a", "uuid-b"]
    assert len(r) == 2


def test_next_id_continues_after_recorded_ids() -> None:
    r = reg(next_id=17)
    assert r.register("u", "h", 1, b"i", 0.0).engine_id == 17


def test_reregister_same_uuid_keeps_id() -> None:
    r = reg()
    first = r.register("uuid-a", "host1", 100, b"ident-a", now=1.0)
    r.register("uuid-b", "host1", 101, b"ident-b", now=1.0)
    again = r.register("uuid-a", "host1", 102, b"ident-a2", now=5.0)
    assert again.engine_id == first.engine_id
    assert again.pid == 102
    assert len(r) == 2
    assert r.task_identity(first.engine_id) == b"ident-a2"
    assert r.by_task_identity(b"ident-a2") == first.engine_id


def test_reregister_drops_old_task_identity() -> None:
    r = reg()
    eid = r.register("uuid-a", "host1", 100, b"ident-old", now=1.0).engine_id
    r.register("uuid-a", "host1", 100, b"ident-new", now=2.0)
    assert r.by_task_identity(b"ident-old") is None
    r.unregister(eid)
    assert r.by_task_identity(b"ident-new") is None


def test_ids_never_reused_after_unregister() -> None:
    r = reg()
    ids = [r.register(f"u{i}", "h", i, b"i%d" % i, 0.0).engine_id for i in range(3)]
    rec = r.unregister(ids[2])
    assert rec is not None and rec.engine_id == 2 and rec.state == "stopped"
    assert r.unregister(ids[2]) is None
    r.unregister(ids[0])
    new = r.register("u-new", "h", 9, b"i-new", 1.0)
    assert new.engine_id == 3
    # the same uuid coming back after unregister also gets a new id
    assert r.register("u0", "h", 0, b"i0", 2.0).engine_id == 4
    assert r.ids() == [1, 3, 4]


def test_unregister_state_and_lookups_cleared() -> None:
    r = reg()
    eid = r.register("u", "h", 1, b"task-ident", 0.0).engine_id
    r.seen(eid, 1.0, control_identity=b"ctl-ident")
    rec = r.unregister(eid, state="dead")
    assert rec is not None and rec.state == "dead"
    assert r.task_identity(eid) is None
    assert r.control_identity(eid) is None
    assert r.by_task_identity(b"task-ident") is None
    assert r.seen(eid, 2.0) is False
    assert r.expired(1e9) == []
    assert len(r) == 0


def test_seen_unknown_is_false() -> None:
    r = reg()
    assert r.seen(0, 1.0) is False
    assert r.seen(-1, 1.0) is False
    assert r.control_identity(0) is None


def test_seen_records_control_identity() -> None:
    r = reg()
    eid = r.register("u", "h", 1, b"t", 0.0).engine_id
    assert r.control_identity(eid) is None
    assert r.seen(eid, 1.0, control_identity=b"ctl") is True
    assert r.control_identity(eid) == b"ctl"
    assert r.seen(eid, 2.0) is True  # no identity given: the old one stays
    assert r.control_identity(eid) == b"ctl"


def test_expired_by_timeout() -> None:
    r = reg(timeout=10.0)
    a = r.register("a", "h", 1, b"a", now=0.0).engine_id
    b = r.register("b", "h", 2, b"b", now=5.0).engine_id
    assert r.expired(10.0) == []  # exactly at the limit: not yet
    assert r.expired(10.5) == [a]
    r.seen(a, 9.0)
    assert r.expired(16.0) == [b]
    assert sorted(r.expired(100.0)) == [a, b]
    # expired() only reports: the engines stay registered until unregistered
    assert r.ids() == [a, b]


def test_reregister_refreshes_last_seen() -> None:
    r = reg(timeout=10.0)
    eid = r.register("a", "h", 1, b"a", now=0.0).engine_id
    r.register("a", "h", 1, b"a", now=50.0)
    assert r.expired(55.0) == []
    assert r.expired(61.0) == [eid]


def test_identity_lookups() -> None:
    r = reg()
    a = r.register("a", "h", 1, b"\x00ta", 0.0).engine_id
    b = r.register("b", "h", 2, b"\x00tb", 0.0).engine_id
    assert r.task_identity(a) == b"\x00ta" and r.task_identity(b) == b"\x00tb"
    assert r.by_task_identity(b"\x00ta") == a and r.by_task_identity(b"\x00tb") == b
    assert r.by_task_identity(b"nope") is None
    assert r.task_identity(99) is None


def test_burst_table_is_dropped_when_all_tasks_finished() -> None:
    """A dict never shrinks: the scheduler must not keep the table a 10k-task burst grew."""
    import sys

    s = sched(engines=1, prefetch=10_000)
    empty = sys.getsizeof(s._in_flight)
    for _ in range(10_000):
        s.submit(task())
    grown = sys.getsizeof(s._in_flight)
    for _eid, batch in s.assign(0.0):
        for t in batch:
            assert s.complete(t.task_id, t.engine, 0.001) is t
    assert s.in_flight == 0
    assert grown > 100_000 and sys.getsizeof(s._in_flight) <= empty


# --------------------------------------------------------------------------- federation: drain, capacity, ids
def test_draining_engine_gets_direct_but_no_load_balanced_work() -> None:
    s = Scheduler()
    s.add_engine(0)
    s.add_engine(1)
    s.drain(0)
    s.submit(Task("d", "c", "apply", 0, 0, 0, {}, [], 0.0))
    for i in range(4):
        s.submit(Task(f"lb{i}", "c", "apply", None, 0, 0, {}, [], 0.0))
    got = dict(s.assign(1.0))
    assert [t.task_id for t in got[0]] == ["d"]
    assert all(t.target is None for t in got[1])
    assert s.draining(0) and not s.idle(0)
    s.complete("d", 0, 0.01)
    assert s.idle(0)
    s.drain(0, False)
    assert not s.draining(0)


def test_capacity_follows_engine_speed() -> None:
    s = Scheduler()
    assert s.capacity() == 0
    s.add_engine(0)
    assert s.capacity() == 2 + 16  # initial credit + the queue of an engine not measured yet
    s.submit(Task("t", "c", "apply", None, 0, 0, {}, [], 0.0))
    s.assign(0.0)
    s.complete("t", 0, 1e-5)  # very short tasks: full credit, long queue
    assert s.capacity() == 64 + 1024
    for i in range(60):  # long tasks: one at a time, two queued
        s.submit(Task(f"u{i}", "c", "apply", None, 0, 0, {}, [], 0.0))
        s.assign(0.0)
        s.complete(f"u{i}", 0, 2.0)
    assert s.capacity() == 1 + 2
    s.drain(0)
    assert s.capacity() == 0


def test_register_with_a_global_id() -> None:
    r = reg()
    assert r.register("u", "h", 1, b"i", 0.0, engine_id=40).engine_id == 40
    assert r.register("v", "h", 2, b"j", 0.0).engine_id == 41  # local ids continue after it
    assert r.holder(40) == "u" and r.holder(7) is None


def test_many_idle_engines_cost_nothing_per_pass_and_capacity_stays_exact() -> None:
    s = Scheduler()
    for e in range(3000):
        s.add_engine(e)
    assert s.assign(0.0) == []  # nothing waits: nothing to walk
    assert s.capacity() == 3000 * (2 + 16)
    s.submit(Task("d", "c", "apply", 7, 0, 0, {}, [], 0.0))
    assert s.assign(0.0) == [(7, [s.get("d")])]
    s.complete("d", 7, 1e-5)
    s.drain(8)
    s.remove_engine(9)
    assert s.capacity() == sum(e.wanted() for e in s._engines.values())
