"""Fixtures for integration tests: real controller and engine processes on loopback.

Every process a test starts is killed by pid in a finalizer, whatever happens; the module-scoped
``cluster`` fixture also asserts on teardown that ``Cluster.stop()`` left none of its pids behind.
As a last line of defence, the session finalizer SIGKILLs any process whose command line mentions this
session's temporary directory (every connection file, state directory and child script lives there),
and fails loudly if it had to.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from procutil import assert_no_procs, cmdline, connected_client, kill_pids, pid_gone, running_cluster, wait_gone

import fedpar

__all__ = ["assert_no_procs", "kill_pids", "pid_gone", "wait_gone"]

# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session", autouse=True)
def fedpar_env(tmp_path_factory: pytest.TempPathFactory, session_tmp: Path) -> Iterator[Path]:
    """Runtime, state and temporary directories inside this session's tmp dir (never ~/.fedpar)."""
    runtime = tmp_path_factory.mktemp("runtime")
    tmp = tmp_path_factory.mktemp("tmp")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDPAR_RUNTIME_DIR", str(runtime))
    mp.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    mp.setenv("TMPDIR", str(tmp))  # Cluster's own state dirs (tempfile.mkdtemp) land here too
    mp.delenv("FEDPAR_CONFIG", raising=False)
    mp.delenv("FEDPAR_CONNECTION_FILE", raising=False)
    old_tempdir = tempfile.tempdir
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        yield runtime
    finally:
        tempfile.tempdir = old_tempdir
        mp.undo()
        _kill_strays(session_tmp)


def _kill_strays(marker: Path) -> None:
    """SIGKILL fedpar processes whose command line mentions this session's tmp dir; fail if any."""
    mark = str(marker)
    me = os.getpid()
    strays = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        line = cmdline(int(entry))
        if mark in line and "fedpar" in line and not pid_gone(int(entry)):
            strays.append((int(entry), line))
    if strays:
        kill_pids(p for p, _ in strays)
        pytest.fail(f"stray fedpar processes were left behind (killed now): {strays}")


class ProcTracker:
    """Remembers pids a test started; ``kill_all`` SIGKILLs whatever is still alive."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def add(self, *pids: int | None) -> None:
        self.pids.extend(p for p in pids if p is not None)

    def popen(self, cmd: list[str], **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        self.add(proc.pid)
        return proc

    def kill_all(self) -> None:
        kill_pids(self.pids)
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.wait(5)
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()
        wait_gone(self.pids, 5)


@pytest.fixture
def procs() -> Iterator[ProcTracker]:
    """Register pids here; they are SIGKILLed at teardown no matter how the test ended."""
    tracker = ProcTracker()
    try:
        yield tracker
    finally:
        tracker.kill_all()


@pytest.fixture(scope="module")
def cluster(fedpar_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[fedpar.Cluster]:
    """A started ``Cluster(n=2)`` with both engines registered, shared by one test module."""
    yield from running_cluster(tmp_path_factory.mktemp("logs"))


@pytest.fixture(scope="module")
def client(cluster: fedpar.Cluster) -> Iterator[fedpar.Client]:
    yield from connected_client(cluster)


PYTHON = sys.executable


@pytest.fixture
def zctx() -> Iterator[zmq.Context[Any]]:
    """A zmq context for hand-driven sockets, destroyed (linger 0) after the test."""
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)
