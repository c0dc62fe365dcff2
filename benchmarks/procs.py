"""Process hygiene: every process a benchmark sample starts is tagged and killed afterwards.

Each sample runs with ``FEDPAR_BENCH_TAG=<unique tag>`` in its environment; every process it
starts (controllers, engines, nannies, Ray's raylet and workers, which change their process
group) inherits it. After the sample the harness kills, by pid, each process that carries that
exact tag, so nothing outlives a sample even if a system's own shutdown fails.
"""

from __future__ import annotations

import contextlib
import os
import signal

import psutil

TAG_VAR = "FEDPAR_BENCH_TAG"


def descendants(pid: int | None = None) -> list[psutil.Process]:
    """All live descendants of ``pid`` (default: this process)."""
    try:
        kids: list[psutil.Process] = psutil.Process(pid if pid is not None else os.getpid()).children(recursive=True)
    except psutil.Error:
        return []
    return kids


def with_descendants(pids: list[int]) -> list[int]:
    """``pids`` followed by all their live descendants, without duplicates."""
    out: list[int] = []
    for pid in pids:
        for p in [pid, *(c.pid for c in descendants(pid))]:
            if p not in out:
                out.append(p)
    return out


def find_tagged(tag: str) -> list[psutil.Process]:
    """Processes (other than this one) whose environment has ``FEDPAR_BENCH_TAG == tag``."""
    me = os.getpid()
    found: list[psutil.Process] = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(TAG_VAR) == tag:
                found.append(proc)
        except psutil.Error:
            continue
    return found


#: Interpreter helpers that die on their own when their parent exits; killed but not reported.
RUNTIME_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def describe(proc: psutil.Process) -> str:
    """``"PID cmdline"`` (shortened) for reports."""
    try:
        cmd = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        cmd = "?"
    return f"{proc.pid} {cmd[:160]}"


def is_runtime_helper(proc: psutil.Process) -> bool:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(h in cmd for h in RUNTIME_HELPERS)


def kill_processes(procs: list[psutil.Process], grace: float = 3.0) -> list[str]:
    """SIGTERM ``procs``, wait ``grace`` seconds, SIGKILL survivors.

    Returns a description of each process signalled, leaving out interpreter helpers
    (:data:`RUNTIME_HELPERS`), which are expected to outlive a cluster's stop by a moment.
    """
    alive = [p for p in procs if _running(p)]
    report = [describe(p) for p in alive if not is_runtime_helper(p)]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _gone, still = psutil.wait_procs(alive, timeout=grace)
    for p in still:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(still, timeout=grace)
    return report


def kill_tagged(tag: str, grace: float = 3.0) -> list[str]:
    """Kill every process carrying ``tag``; describe them (see :func:`kill_processes`)."""
    return kill_processes(find_tagged(tag), grace=grace)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process group, ignoring it being gone already."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _running(p: psutil.Process) -> bool:
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def reap(procs: list[psutil.Process], wait: float = 5.0) -> list[str]:
    """Give ``procs`` ``wait`` seconds to exit on their own, then kill the rest (described)."""
    alive = [p for p in procs if _running(p)]
    _gone, still = psutil.wait_procs(alive, timeout=wait)
    still = [p for p in still if _running(p)]
    return kill_processes(still) if still else []
