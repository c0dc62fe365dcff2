"""Helpers for the chaos tests: :class:`Proc` runs real controller and engine processes, to kill and pause.

A :class:`Proc` starts a restartable controller (``python -m fedpar controller`` on a state
directory of its own) and engines as subprocesses, logs in the test's tmp dir, and can SIGKILL, SIGSTOP,
SIGCONT and restart them. At teardown it closes its clients, SIGKILLs every process it ever started (by
pid, nothing else), reaps them and asserts that none of them is left (``pgrep -f "fedpar (controller|
engine)"`` filtered to these pids).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import fedpar
from fedpar.errors import ConnectionFileError
from fedpar.runtime import read_connection_file

PYTHON = sys.executable
ENGINE_RE = "fedpar (controller|engine)"


# ------------------------------------------------------------------------------------------ helpers


def proc_state(pid: int) -> str | None:
    """One-letter state of ``pid`` from /proc (None when there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            data = fh.read()
    except OSError:
        return None
    return data.rsplit(")", 1)[1].split()[0]


def pid_gone(pid: int) -> bool:
    return proc_state(pid) in (None, "Z", "X")


def fedpar_pids() -> set[int]:
    """Pids of every ``fedpar controller`` / ``fedpar engine`` process on the machine (pgrep)."""
    out = subprocess.run(["pgrep", "-f", ENGINE_RE], capture_output=True, text=True, check=False).stdout
    return {int(x) for x in out.split()}


def write_ini(path: Path, *, heartbeat: float = 0.2, misses: int = 5, map_size: str | None = None,
              max_map_size: str | None = None, controller_timeout: float = 60.0, extra: str = "") -> Path:
    lines = ["[controller]", f"heartbeat = {heartbeat}", f"heartbeat_misses = {misses}", "",
             "[engines]", f"controller_timeout = {controller_timeout}", ""]
    if map_size or max_map_size:
        lines.append("[store]")
        if map_size:
            lines.append(f"map_size = {map_size}")
        if max_map_size:
            lines.append(f"max_map_size = {max_map_size}")
        lines.append("")
    path.write_text("\n".join(lines) + extra)
    return path


def read_executions(exec_dir: Path) -> dict[str, list[float]]:
    """What ``record``-style tasks wrote to their per-engine files (one ``"<key> <time>"`` line per
    execution, O_APPEND): the execution times of each key."""
    out: dict[str, list[float]] = {}
    for f in exec_dir.glob("exec-*.log"):
        for line in f.read_text().splitlines():
            if line:
                key, _, ts = line.partition(" ")
                out.setdefault(key, []).append(float(ts) if ts else 0.0)
    return out


def count_executions(exec_dir: Path) -> Counter[str]:
    """How often each key ran, from the per-engine files."""
    return Counter({k: len(v) for k, v in read_executions(exec_dir).items()})


def recovered_counts(procs: Proc) -> list[int]:
    """Unfinished tasks each restarted controller found in its store (from its log)."""
    return [int(m) for m in re.findall(r"recovered (\d+) unfinished task", procs.log_text())]


# ------------------------------------------------------------------------------------------ Proc


class Proc:
    """Controller and engines of one test, as subprocesses with logs under ``root/logs``."""

    def __init__(self, root: Path, *, heartbeat: float = 0.2, misses: int = 5, map_size: str | None = None,
                 max_map_size: str | None = None, log_level: str = "INFO"):
        self.root = root
        self.conn = root / "conn.json"
        self.state = root / "state"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.exec_dir = root / "exec"
        self.exec_dir.mkdir(exist_ok=True)
        self.heartbeat = heartbeat
        self.misses = misses
        self.ini = write_ini(root / "fedpar.ini", heartbeat=heartbeat, misses=misses, map_size=map_size,
                             max_map_size=max_map_size)
        runtime = root / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        self.env = {**os.environ, "FEDPAR_RUNTIME_DIR": str(runtime)}
        self.env.pop("FEDPAR_CONFIG", None)
        self.env.pop("FEDPAR_CONNECTION_FILE", None)
        self.log_level = log_level
        self.controller: subprocess.Popen[bytes] | None = None
        self.engines: list[subprocess.Popen[bytes]] = []
        self.started: list[subprocess.Popen[bytes]] = []  # every process ever started (for teardown)
        self.clients: list[fedpar.Client] = []
        self.controller_starts = 0
        self.kills = 0

    @property
    def threshold(self) -> float:
        """Seconds of silence after which the controller declares an engine dead."""
        return self.heartbeat * self.misses

    # -------------------------------------------------------------- processes
    def _spawn(self, role: str, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        cmd = [PYTHON, "-m", "fedpar", "--log-level", self.log_level, role, "--connection-file", str(self.conn),
               "--config", str(self.ini), *args]
        with open(self.logs / f"{log_name}.log", "ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env, start_new_session=True)
        self.started.append(proc)
        return proc

    def start_controller(self, wait: float = 30.0) -> subprocess.Popen[bytes]:
        """Start (or restart: same state dir, so same ports and key) the controller; waits until it has
        published its connection file."""
        assert self.controller is None or self.controller.poll() is not None, "controller still running"
        self.controller_starts += 1
        # --parent-pid: the controller stops by itself should this test process die without its teardown
        proc = self._spawn("controller", ["--state-dir", str(self.state), "--parent-pid", str(os.getpid())],
                           "controller")
        self.controller = proc
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"controller exited with {proc.returncode} while starting; log:\n{self.log_tail()}")
            with contextlib.suppress(ConnectionFileError, OSError):
                if read_connection_file(self.conn).controller_pid == proc.pid:
                    return proc
            time.sleep(0.01)
        pytest.fail(f"controller did not publish {self.conn} within {wait}s; log:\n{self.log_tail()}")

    def kill_controller(self, sig: int = signal.SIGKILL) -> None:
        assert self.controller is not None
        os.kill(self.controller.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.controller.wait(10)
            self.kills += sig == signal.SIGKILL

    def restart_controller(self, wait: float = 30.0) -> float:
        """SIGKILL the controller and start it again on the same state dir; returns the seconds taken."""
        t0 = time.monotonic()
        self.kill_controller()
        self.start_controller(wait)
        return time.monotonic() - t0

    def start_engines(self, n: int) -> list[subprocess.Popen[bytes]]:
        new = [self._spawn("engine", [], f"engine-{len(self.engines) + i}") for i in range(n)]
        self.engines.extend(new)
        return new

    @staticmethod
    def signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        if sig == signal.SIGKILL:
            proc.wait(10)

    def engine_by_pid(self, pid: int) -> subprocess.Popen[bytes]:
        for p in self.engines:
            if p.pid == pid:
                return p
        raise KeyError(pid)

    # -------------------------------------------------------------- clients
    def client(self, timeout: float = 30.0) -> fedpar.Client:
        c = fedpar.Client(self.conn, timeout=timeout)
        self.clients.append(c)
        return c

    def cluster(self, n_engines: int, timeout: float = 60.0) -> fedpar.Client:
        """Controller + ``n_engines`` engines, and a client that has seen them all register."""
        self.start_controller()
        self.start_engines(n_engines)
        c = self.client()
        c.wait_for_engines(n_engines, timeout=timeout)
        return c

    def engine_pid_map(self, client: fedpar.Client) -> dict[int, int]:
        """Engine id -> pid of the engines registered now."""
        return {e["id"]: e["pid"] for e in client.status()["engines"]}

    # -------------------------------------------------------------- logs, teardown
    def log_tail(self, name: str = "controller", lines: int = 40) -> str:
        try:
            return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def log_text(self, name: str = "controller") -> str:
        try:
            return (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def pids(self) -> list[int]:
        return [p.pid for p in self.started]

    def cleanup(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.close()
        for p in self.started:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)  # a stopped process dies on SIGKILL anyway; be explicit
                    os.kill(p.pid, signal.SIGKILL)
        for p in self.started:
            with contextlib.suppress(Exception):
                p.wait(10)
        mine = set(self.pids())
        deadline = time.monotonic() + 10
        left = mine & fedpar_pids()
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = {p for p in mine & fedpar_pids() if not pid_gone(p)}
        assert not left, f"fedpar processes of this test still alive after teardown: {sorted(left)}"
