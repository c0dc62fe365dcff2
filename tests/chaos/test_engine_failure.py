"""Engines killed (SIGKILL) or paused (SIGSTOP) while they run a task.

Heartbeat 0.2 s x 5 misses: an engine silent for 1 s is declared dead. Each task notes its start in its
engine's own file (O_APPEND), which tells the test which engine (pid) runs it and how often it ran.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from chaosutil import Proc, count_executions

import fedpar


def slow(key: str, exec_dir: str, seconds: float) -> int:
    """Note the start in this engine's file, sleep, return the engine's pid."""
    fd = os.open(f"{exec_dir}/exec-{os.getpid()}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{key} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)
    time.sleep(seconds)
    return os.getpid()


def suicide(key: str, exec_dir: str) -> None:
    """Note the start, then SIGKILL the engine running it (every time)."""
    slow(key, exec_dir, 0.0)
    os.kill(os.getpid(), signal.SIGKILL)


def started_on(procs: Proc, key: str, n: int = 1, timeout: float = 30.0) -> list[int]:
    """Pids of the engines that started task ``key`` (waits for ``n`` starts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [int(f.stem.split("-")[1]) for f in procs.exec_dir.glob("exec-*.log")
                for line in f.read_text().splitlines() if line.split(" ")[0] == key]
        if len(pids) >= n:
            return pids
        time.sleep(0.01)
    raise AssertionError(f"task {key!r} did not start {n} time(s) within {timeout}s")


def engine_lost_lines(procs: Proc) -> list[str]:
    return [ln for ln in procs.log_text().splitlines() if "stopped answering heartbeats" in ln]


@pytest.mark.timeout(120)
def test_engine_killed_mid_task_without_retries(procs: Proc) -> None:
    client = procs.cluster(2)
    ids = procs.engine_pid_map(client)
    view = client.load_balanced_view(retries=0)
    ar = view.apply_async(slow, "k0", str(procs.exec_dir), 3.0)
    (pid,) = started_on(procs, "k0")
    eid = next(e for e, p in ids.items() if p == pid)
    time.sleep(0.2)
    procs.signal(procs.engine_by_pid(pid), signal.SIGKILL)
    t_kill = time.monotonic()
    assert ar.wait(30)
    detection = time.monotonic() - t_kill
    with pytest.raises(fedpar.EngineError) as info:
        ar.get(0)
    exc = info.value
    print(f"\n[engine SIGKILL, retries=0] detection {detection:.2f}s (threshold {procs.threshold:.1f}s): {exc}")
    assert f"engine {eid}" in str(exc)
    assert exc.engine_id == eid
    assert detection < procs.threshold + 1.0
    deadline = time.monotonic() + 10  # the client hears of the lost engine (EngineEvent) right after the result
    while client.ids != [e for e in ids if e != eid] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.ids == [e for e in ids if e != eid]
    st = client.status()
    assert [e["id"] for e in st["engines"]] == [e for e in ids if e != eid]
    # the cluster keeps working on the other engine, and the failure is a stored result
    (other,) = [p for e, p in ids.items() if e != eid]
    assert view.apply_async(slow, "k1", str(procs.exec_dir), 0.0).get(30) == other
    with pytest.raises(fedpar.EngineError):
        client.get_result(ar.task_ids[0], block=True, timeout=30)


@pytest.mark.timeout(120)
def test_engine_killed_mid_task_is_retried_elsewhere(procs: Proc) -> None:
    client = procs.cluster(2)
    view = client.load_balanced_view(retries=1)
    ar = view.apply_async(slow, "r0", str(procs.exec_dir), 3.0)
    (pid,) = started_on(procs, "r0")
    time.sleep(0.2)
    procs.signal(procs.engine_by_pid(pid), signal.SIGKILL)
    t_kill = time.monotonic()
    pids = started_on(procs, "r0", n=2)
    detection = time.monotonic() - t_kill
    survivor = next(p.pid for p in procs.engines if p.pid != pid)
    assert sorted(pids) == sorted([pid, survivor])
    assert ar.get(30) == survivor
    (rec,) = [r for r in client.query_tasks(states=["done"]) if r.task_id == ar.task_ids[0]]
    assert rec.attempts == 2 and rec.retries == 1
    assert count_executions(procs.exec_dir)["r0"] == 2
    print(f"\n[engine SIGKILL, retries=1] re-dispatched to the other engine {detection:.2f}s after the kill")
    assert detection < procs.threshold + 1.0


@pytest.mark.timeout(120)
def test_task_that_kills_every_engine_stops_after_its_attempts(procs: Proc) -> None:
    """retries=2: three attempts, three dead engines, then EngineError; the fourth engine keeps serving."""
    client = procs.cluster(4)
    view = client.load_balanced_view(retries=2)
    others = [view.apply_async(slow, f"o{i}", str(procs.exec_dir), 0.05) for i in range(40)]
    t0 = time.monotonic()
    ar = view.apply_async(suicide, "x", str(procs.exec_dir))
    with pytest.raises(fedpar.EngineError) as info:
        ar.get(60)
    took = time.monotonic() - t0
    msg = str(info.value)
    print(f"\n[poison task, retries=2] failed after {took:.2f}s: {msg}")
    assert "after 3 attempt(s) with retries=2" in msg
    assert count_executions(procs.exec_dir)["x"] == 3
    assert len(set(started_on(procs, "x", n=3))) == 3  # three different engines
    assert sum(p.poll() is not None for p in procs.engines) == 3
    # every other task completes (retried when its engine died under it) and the survivor keeps serving
    survivor = next(p.pid for p in procs.engines if p.poll() is None)
    for o in others:
        assert o.get(60) in {p.pid for p in procs.engines}
    assert [e["pid"] for e in client.status()["engines"]] == [survivor]
    more = view.map_async(slow, [f"m{i}" for i in range(10)], [str(procs.exec_dir)] * 10, [0.0] * 10)
    assert more.get(30) == [survivor] * 10
    (rec,) = [r for r in client.query_tasks(states=["failed"]) if r.task_id == ar.task_ids[0]]
    assert rec.attempts == 3


@pytest.mark.timeout(120)
def test_engine_paused_past_threshold(procs: Proc) -> None:
    """SIGSTOP longer than the threshold: the task is retried on the other engine; one result only; the
    paused engine, once continued, registers again."""
    client = procs.cluster(2)
    view = client.load_balanced_view(retries=1)
    done_before = client.status()["done"]
    ar = view.apply_async(slow, "p0", str(procs.exec_dir), 1.5)
    (pid,) = started_on(procs, "p0")
    paused = procs.engine_by_pid(pid)
    other = next(p.pid for p in procs.engines if p.pid != pid)
    procs.signal(paused, signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        started_on(procs, "p0", n=2)
        detection = time.monotonic() - t_stop
        time.sleep(0.3)
    finally:
        procs.signal(paused, signal.SIGCONT)
    value = ar.get(30)
    assert value in (pid, other)  # whichever result came first stands
    time.sleep(2.5)  # the paused engine finishes its copy and sends a (late) result
    st = client.status()
    assert st["done"] - done_before == 1, f"task counted {st['done'] - done_before} times"
    assert client.get_result(ar.task_ids[0], block=True, timeout=30) == value
    recs = [r for r in client.query_tasks() if r.task_id == ar.task_ids[0]]
    assert len(recs) == 1 and recs[0].state == "done"
    assert len(engine_lost_lines(procs)) == 1
    # the continued engine registers again (with a new id) and takes work
    deadline = time.monotonic() + 20
    while pid not in [e["pid"] for e in client.status()["engines"]] and time.monotonic() < deadline:
        time.sleep(0.1)
    engines = client.status()["engines"]
    print(f"\n[engine SIGSTOP past threshold] retried on the other engine {detection:.2f}s after SIGSTOP; "
          f"result from {'the paused' if value == pid else 'the other'} engine; executions "
          f"{count_executions(procs.exec_dir)['p0']}; duplicates dropped {st['dropped'].get('DuplicateResult', 0)}; "
          f"engines now {[(e['id'], e['pid']) for e in engines]}")
    assert sorted(e["pid"] for e in engines) == sorted([pid, other])
    assert detection < procs.threshold + 1.0
    out = view.map_async(slow, [f"q{i}" for i in range(20)], [str(procs.exec_dir)] * 20, [0.05] * 20).get(30)
    assert set(out) <= {pid, other}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pause", [0.3, 0.6])
def test_engine_paused_below_threshold(procs: Proc, pause: float) -> None:
    """SIGSTOP shorter than the threshold: no engine lost, the task completes once, on the same engine."""
    client = procs.cluster(2)
    ids_before = procs.engine_pid_map(client)
    view = client.load_balanced_view(retries=1)
    ar = view.apply_async(slow, "s0", str(procs.exec_dir), 1.0)
    (pid,) = started_on(procs, "s0")
    paused = procs.engine_by_pid(pid)
    procs.signal(paused, signal.SIGSTOP)
    try:
        time.sleep(pause)
    finally:
        procs.signal(paused, signal.SIGCONT)
    assert ar.get(30) == pid
    time.sleep(procs.threshold)
    assert count_executions(procs.exec_dir)["s0"] == 1
    assert procs.engine_pid_map(client) == ids_before
    assert client.ids == sorted(ids_before)
    assert not engine_lost_lines(procs), engine_lost_lines(procs)
    (rec,) = [r for r in client.query_tasks(states=["done"]) if r.task_id == ar.task_ids[0]]
    assert rec.attempts == 1
    print(f"\n[engine SIGSTOP {pause}s < threshold {procs.threshold:.1f}s] no engine lost, 1 execution")


@pytest.mark.timeout(120)
def test_engine_paused_past_threshold_without_retries(procs: Proc) -> None:
    """retries=0: EngineError naming the paused engine; its late result (after SIGCONT) is dropped, not
    delivered or stored over the failure."""
    client = procs.cluster(2)
    ids = procs.engine_pid_map(client)
    view = client.load_balanced_view(retries=0)
    ar = view.apply_async(slow, "z0", str(procs.exec_dir), 1.5)
    (pid,) = started_on(procs, "z0")
    eid = next(e for e, p in ids.items() if p == pid)
    paused = procs.engine_by_pid(pid)
    procs.signal(paused, signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        assert ar.wait(30)
        detection = time.monotonic() - t_stop
    finally:
        procs.signal(paused, signal.SIGCONT)
    with pytest.raises(fedpar.EngineError, match=f"engine {eid} stopped answering heartbeats"):
        ar.get(0)
    deadline = time.monotonic() + 10  # the continued engine sends its late result
    while client.status()["dropped"].get("DuplicateResult", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    st = client.status()
    print(f"\n[engine SIGSTOP past threshold, retries=0] EngineError {detection:.2f}s after SIGSTOP; late results "
          f"dropped: {st['dropped'].get('DuplicateResult', 0)}")
    assert st["dropped"].get("DuplicateResult", 0) == 1
    assert count_executions(procs.exec_dir)["z0"] == 1
    with pytest.raises(fedpar.EngineError):
        client.get_result(ar.task_ids[0], block=True, timeout=30)
    assert st["done"] == 0 and st["failed"] == 1
    assert detection < procs.threshold + 1.0
