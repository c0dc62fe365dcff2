"""Losing a controller of a federation loses nothing: kill -9 and SIGSTOP past the TTL, with real processes.

3 controllers and 6 engines (embedded registry, default timings: TTL 3 s, adoption window 3 s). Every task
notes each of its executions in its engine's file (``record``), so the tests count how often each ran.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaosutil import count_executions, pid_gone

import fedpar
from fedpar.engine.engine import RECENT_RESULTS

RETRIES = 1


def record(i: int, exec_dir: str, sleep: float = 0.0) -> tuple[int, int]:
    """The task: note this execution in the engine's own file (O_APPEND), return (i, 7 i)."""
    if sleep:
        time.sleep(sleep)
    fd = os.open(f"{exec_dir}/exec-{os.getpid()}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{i} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)
    return (i, i * 7)


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[fedpar.Cluster]:
    """A federation of 3 controllers and 6 engines; at teardown every process it ever had is SIGKILLed."""
    c = fedpar.Cluster(n=6, controllers=3, log_dir=tmp_path / "logs")
    seen: set[int] = set()
    try:
        c.start()
        seen |= set(c.pids())
        c.wait_for_engines(6, timeout=60)
        yield c
    finally:
        launcher = c._launcher
        if launcher is not None:
            seen |= {p.pid for p in (*launcher.controllers, *launcher.engines)}
        for pid in seen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        c.stop(grace=2.0)
        for pid in seen:
            if not pid_gone(pid):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(not pid_gone(p) for p in seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(pid_gone(p) for p in seen), "processes of the federation left behind"


def owners(client: fedpar.Client) -> dict[str, list[int]]:
    return {c["id"]: c["engines"] for c in client.status()["controllers"]}


def victim(client: fedpar.Client, fed: fedpar.Cluster) -> tuple[int, str, list[int], int]:
    """A controller with engines: (its number in the cluster, its id, its engines, its pid)."""
    for c in client.status()["controllers"]:
        if c["engines"]:
            return fed.controller_pids.index(c["pid"]), c["id"], c["engines"], c["pid"]
    raise AssertionError("no controller has engines")


def wait_rehomed(client: fedpar.Client, engines: list[int], dead: str, timeout: float = 30.0) -> float:
    """Seconds until every engine of ``engines`` belongs to a live controller other than ``dead``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        own = owners(client)
        homed = {e for cid, es in own.items() if cid != dead for e in es}
        if set(engines) <= homed:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"engines {engines} not re-homed within {timeout}s: {owners(client)}")


def check_no_double_ownership(client: fedpar.Client) -> None:
    owned = [e for es in owners(client).values() for e in es]
    assert len(owned) == len(set(owned)), f"an engine is owned by two controllers: {owners(client)}"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kill_a_controller_mid_run(fed: fedpar.Cluster, tmp_path: Path) -> None:
    exec_dir = tmp_path / "exec"
    exec_dir.mkdir()
    ex = str(exec_dir)
    client = fed.connect_client()
    try:
        index, dead, engines, pid = victim(client, fed)
        stored = client[engines[0]].apply_async(record, -1, ex)
        assert stored.get(30) == (-1, -7)
        # An engine keeps its last results to send again to a new controller (they may not have been stored):
        # push this one out of that window, so that only the victim's store holds it.
        pushed = [client[engines[0]].apply_async(os.getpid) for _ in range(RECENT_RESULTS + 16)]
        assert all(a.get(30) for a in pushed)
        lv = client.load_balanced_view(retries=RETRIES)
        ars = [lv.apply_async(record, i, ex, 0.002) for i in range(3000)]
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        rehome = wait_rehomed(client, engines, dead)
        assert rehome <= 10.0, f"re-homed after {rehome:.1f}s"
        assert [a.get(timeout=120) for a in ars] == [(i, i * 7) for i in range(3000)]
        runs = count_executions(exec_dir)
        assert max(runs[str(i)] for i in range(3000)) <= 1 + RETRIES, runs.most_common(3)
        check_no_double_ownership(client)
        pids = client[:].apply_sync(os.getpid)
        assert sorted(pids) == sorted(fed.engine_pids) and len(client.ids) == 6  # every engine, by its old id
        with fed.connect_client() as other, pytest.raises(fedpar.ResultUnavailable, match=dead):
            other.get_result(stored.task_ids[0], block=True, timeout=30)
        fed.restart_controller(index)  # its state directory again: what it stored is back
        with fed.connect_client() as other:
            assert other.get_result(stored.task_ids[0], block=True, timeout=30) == (-1, -7)
            assert other.load_balanced_view().apply_sync(record, -2, ex) == (-2, -14)
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_paused_controller_steps_down(fed: fedpar.Cluster, tmp_path: Path) -> None:
    exec_dir = tmp_path / "exec"
    exec_dir.mkdir()
    ex = str(exec_dir)
    client = fed.connect_client()
    try:
        index, dead, engines, pid = victim(client, fed)
        lv = client.load_balanced_view(retries=RETRIES)
        ars = [lv.apply_async(record, i, ex, 0.002) for i in range(2000)]
        time.sleep(0.5)
        os.kill(pid, signal.SIGSTOP)
        wait_rehomed(client, engines, dead)
        check_no_double_ownership(client)
        time.sleep(4.0)  # well past its TTL and the adoption window: its work was taken over
        os.kill(pid, signal.SIGCONT)
        proc = fed._launcher.controllers[index]  # type: ignore[union-attr]
        assert proc.wait(15) == 4, "a controller whose registration was taken over must step down (exit 4)"
        check_no_double_ownership(client)
        assert [a.get(timeout=120) for a in ars] == [(i, i * 7) for i in range(2000)]
        runs = count_executions(exec_dir)
        assert max(runs[str(i)] for i in range(2000)) <= 1 + RETRIES, runs.most_common(3)
        assert len(client.ids) == 6 and sorted(client[:].apply_sync(os.getpid)) == sorted(fed.engine_pids)
    finally:
        client.close()
