"""Process helpers for the integration tests: find, wait for and kill processes by pid."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

import fedpar
from fedpar.config import Config

# ------------------------------------------------------------------------------------------ helpers


def _proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``None`` when there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?"
    # "pid (comm) S ...": comm may itself contain ')' and spaces.
    return data.rsplit(")", 1)[1].split()[0]


def pid_gone(pid: int) -> bool:
    """True when ``pid`` does not exist or is a zombie (dead, only waiting to be reaped)."""
    return _proc_state(pid) in (None, "Z", "X")


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def kill_pids(pids: Iterable[int | None]) -> list[int]:
    """SIGKILL every live (non-zombie) pid of ``pids``; returns the ones that had to be killed."""
    killed = []
    for pid in pids:
        if pid is None or pid <= 1 or pid == os.getpid() or pid_gone(pid):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def wait_gone(pids: Iterable[int | None], timeout: float) -> list[int]:
    """Wait until every pid is gone; returns those still alive at the deadline."""
    todo = [p for p in pids if p is not None]
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in todo if not pid_gone(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def assert_no_procs(pids: Iterable[int | None], timeout: float = 10) -> None:
    """Assert every pid of ``pids`` is gone within ``timeout`` s; SIGKILL and fail otherwise."""
    pids = [p for p in pids if p is not None]
    alive = wait_gone(pids, timeout)
    if alive:
        described = [f"{p}: {cmdline(p)!r}" for p in alive]
        kill_pids(alive)
        wait_gone(alive, 5)
        pytest.fail(f"processes still alive {timeout}s after they should have stopped (killed now): "
                    f"{described}")


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One line of ``proc``'s stdout, or fail after ``timeout`` seconds (never blocks forever)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no line from pid {proc.pid} within {timeout}s (got {buf!r})")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 1)
            if not chunk:
                pytest.fail(f"pid {proc.pid} closed its stdout (exit code {proc.poll()}); got {buf!r}")
            buf += chunk
    return buf


def read_json_line(proc: subprocess.Popen[bytes], timeout: float) -> object:
    return json.loads(read_line(proc, timeout))


# ------------------------------------------------------------------------------------------ clusters


def cluster_pids(c: fedpar.Cluster) -> list[int]:
    """The controller and engine pids of a ``Cluster`` (those known now)."""
    return [p for p in [c.controller_pid, *c.engine_pids] if p is not None]


def running_cluster(log_dir: Path, config: Config | None = None, n: int = 2) -> Iterator[fedpar.Cluster]:
    """For fixtures (``yield from``): a started ``Cluster(n)`` with every engine registered; at teardown it is
    stopped and none of its processes (engines added by a test included) may be left."""
    c = fedpar.Cluster(n=n, config=config, log_dir=log_dir)
    pids: list[int] = []
    try:
        c.start()
        pids = cluster_pids(c)
        c.wait_for_engines(n, timeout=60)
        yield c
        pids = sorted(set(pids) | set(cluster_pids(c)))
    finally:
        try:
            c.stop()
        finally:
            assert_no_procs(pids, timeout=10)


def connected_client(cluster: fedpar.Cluster, n: int = 2) -> Iterator[fedpar.Client]:
    """For fixtures (``yield from``): a client of ``cluster`` that has seen its ``n`` engines; closed after."""
    cl = cluster.connect_client()
    try:
        cl.wait_for_engines(n, timeout=30)
        yield cl
    finally:
        cl.close()
