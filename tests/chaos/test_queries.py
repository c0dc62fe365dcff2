"""Task-database queries and purges from the client, and per-call retry flags (``view.temp_flags``)."""

from __future__ import annotations

import os
import time

import pytest
from chaosutil import Proc

import fedpar


def pid_of(x: int) -> tuple[int, int]:
    return (x, os.getpid())


def boom(x: int) -> None:
    raise ValueError(f"boom {x}")


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def submit(view: fedpar.LoadBalancedView, n: int, start: int = 0) -> list[fedpar.AsyncResult]:
    return [view.apply_async(pid_of, start + i) for i in range(n)]


def tid(ar: fedpar.AsyncResult) -> str:
    (t,) = ar.task_ids
    return t


@pytest.mark.timeout(120)
def test_query_tasks(procs: Proc) -> None:
    client = procs.cluster(2)
    pids = procs.engine_pid_map(client)  # engine id -> pid
    view = client.load_balanced_view()
    t0 = time.time()
    batch_a = submit(view, 20)
    values_a = [ar.get(30) for ar in batch_a]
    time.sleep(0.05)
    t_mid = time.time()
    time.sleep(0.05)
    batch_b = submit(view, 10, start=100)
    values_b = [ar.get(30) for ar in batch_b]
    bad = view.apply_async(boom, 1)
    with pytest.raises(fedpar.RemoteError):
        bad.get(30)
    ids_a, ids_b = [tid(a) for a in batch_a], [tid(a) for a in batch_b]

    # by state
    done = client.query_tasks(states=["done"])
    assert {r.task_id for r in done} == set(ids_a + ids_b)
    assert all(r.state == "done" and r.completed is not None and r.attempts == 1 and r.retries == 0 for r in done)
    assert all(r.client == client.sender and r.op == "apply" and r.target is None for r in done)
    assert [r.submitted for r in done] == sorted(r.submitted for r in done)  # oldest first
    failed = client.query_tasks(states=["failed"])
    assert [r.task_id for r in failed] == [tid(bad)]
    assert {r.task_id for r in client.query_tasks(states=["done", "failed"])} == set(ids_a + ids_b + [tid(bad)])
    assert client.query_tasks(states=["queued", "assigned"]) == []
    assert len(client.query_tasks()) == 31

    # by engine: each record names the engine that ran it (the task returned that engine's pid)
    ran_on = {t: v[1] for t, v in zip(ids_a + ids_b, values_a + values_b, strict=True)}
    seen: set[str] = set()
    for eid, pid in pids.items():
        recs = client.query_tasks(engine=eid)
        assert all(r.engine == eid for r in recs)
        assert all(ran_on[r.task_id] == pid for r in recs if r.task_id in ran_on)
        seen |= {r.task_id for r in recs}
    assert seen == set(ids_a + ids_b + [tid(bad)])
    assert client.query_tasks(engine=max(pids) + 100) == []

    # by submission time window: since <= submitted < until
    assert {r.task_id for r in client.query_tasks(since=t_mid)} == {*ids_b, tid(bad)}
    assert {r.task_id for r in client.query_tasks(until=t_mid)} == set(ids_a)
    assert {r.task_id for r in client.query_tasks(since=t0, until=t_mid)} == set(ids_a)
    assert client.query_tasks(since=time.time() + 60) == []
    assert client.query_tasks(until=t0 - 60) == []

    # limit keeps the oldest matches
    everything = client.query_tasks()
    assert client.query_tasks(limit=5) == everything[:5]
    assert client.query_tasks(limit=0) == []
    limited = client.query_tasks(states=["done"], since=t_mid, limit=3)
    assert len(limited) == 3 and {r.task_id for r in limited} <= set(ids_b)
    eid = next(iter(pids))
    assert len(client.query_tasks(engine=eid, states=["done"], limit=2)) == min(
        2, len(client.query_tasks(engine=eid, states=["done"])))


@pytest.mark.timeout(120)
def test_purge_results(procs: Proc) -> None:
    client = procs.cluster(2)
    view = client.load_balanced_view()
    ars = submit(view, 30)
    values = {tid(a): a.get(30) for a in ars}
    ids = list(values)

    # by ids (a list, one id, an AsyncResult); unknown ids count for nothing
    assert client.purge_results(ids[:2]) == 2
    assert client.purge_results(ids[2]) == 1
    assert client.purge_results(ars[3]) == 1
    assert client.purge_results(["no-such-task", ids[0]]) == 0
    for t in ids[:4]:
        with pytest.raises(fedpar.ResultNotFound):
            client.get_result(t, block=True, timeout=30)
    assert client.get_result(ids[4:], block=True, timeout=30) == [values[t] for t in ids[4:]]
    assert {r.task_id for r in client.query_tasks()} == set(ids[4:])  # records go too

    # by age, with a task in flight: it is not purged, and completes normally
    slow = view.apply_async(nap, 1.5)
    time.sleep(0.3)
    assert client.status()["in_flight"] == 1
    cutoff = time.time()
    late = submit(view, 5, start=100)
    late_values = {tid(a): a.get(30) for a in late}  # completed after the cutoff
    assert client.purge_results(before=cutoff) == len(ids) - 4
    for t in ids[4:]:
        with pytest.raises(fedpar.ResultNotFound):
            client.get_result(t, block=True, timeout=30)
    assert client.get_result(list(late_values), block=True, timeout=30) == list(late_values.values())
    assert slow.get(30) == 1.5
    assert client.get_result(tid(slow), block=True, timeout=30) == 1.5

    # everything, with another task in flight: only finished tasks go
    slow2 = view.apply_async(nap, 1.5)
    time.sleep(0.3)
    (running,) = client.query_tasks(states=["assigned", "running"])
    assert running.task_id == tid(slow2)
    assert client.purge_results(everything=True) == len(late_values) + 1
    assert client.purge_results(tid(slow2)) == 0  # in flight: nothing to purge yet
    for t in [*late_values, tid(slow)]:
        with pytest.raises(fedpar.ResultNotFound):
            client.get_result(t, block=True, timeout=30)
    assert slow2.get(30) == 1.5
    assert client.get_result(tid(slow2), block=True, timeout=30) == 1.5
    assert [r.task_id for r in client.query_tasks()] == [tid(slow2)]
    assert client.purge_results(everything=True) == 1
    assert client.query_tasks() == []
    with pytest.raises(ValueError):
        client.purge_results()


@pytest.mark.timeout(120)
def test_temp_flags_set_retries_for_the_calls_inside_only(procs: Proc) -> None:
    client = procs.cluster(1)
    view = client.load_balanced_view()
    assert view.retries == 0
    before = view.apply_async(pid_of, 0)
    with view.temp_flags(retries=2) as v:
        assert v is view and view.retries == 2
        inside = view.apply_async(pid_of, 1)
        inside_map = view.map_async(pid_of, range(4), chunksize=2)
    after = view.apply_async(pid_of, 2)
    assert view.retries == 0
    with pytest.raises(RuntimeError), view.temp_flags(retries=3, block=True):
        assert view.block and view.retries == 3
        raise RuntimeError("restored anyway")
    assert view.retries == 0 and view.block is False
    view.set_flags(retries=1)
    persistent = view.apply_async(pid_of, 3)
    with pytest.raises(ValueError):
        view.set_flags(retries=-1)
    for ar in (before, inside, inside_map, after, persistent):
        ar.get(30)

    retries = {r.task_id: r.retries for r in client.query_tasks()}
    assert retries[tid(before)] == 0
    assert retries[tid(inside)] == 2
    assert [retries[t] for t in inside_map.task_ids] == [2, 2]
    assert retries[tid(after)] == 0
    assert retries[tid(persistent)] == 1
