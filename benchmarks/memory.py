"""Anonymous-memory (RssAnon) readings of controller processes, and a sampler thread.

RssAnon (from ``/proc/PID/status``) is the process's private heap/stack memory: it excludes
mapped files and shared memory, so it measures what a controller really holds on to. Ray's
object store lives in shared memory, so ``RssShmem`` is sampled too and kept as an extra.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

_FIELDS = ("RssAnon", "RssShmem", "VmHWM")


def parse_status(text: str) -> dict[str, int]:
    """Parse the ``kB`` fields of a ``/proc/PID/status`` text into bytes (``{"RssAnon": ...}``)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep or key not in _FIELDS:
            continue
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024
    return out


def read_status(pid: int) -> dict[str, int] | None:
    """The parsed status of ``pid``, or ``None`` if the process is gone (or not on Linux)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            return parse_status(fh.read())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def rss_anon(pids: Iterable[int], key: str = "RssAnon") -> int:
    """Sum of ``key`` (bytes) over the live processes of ``pids``."""
    total = 0
    for pid in pids:
        status = read_status(pid)
        if status is not None:
            total += status.get(key, 0)
    return total


@dataclass
class MemoryTrace:
    """What a :class:`RssSampler` saw: bytes summed over the sampled processes."""

    baseline: int = 0
    peak: int = 0
    last: int = 0
    peak_shmem: int = 0
    samples: int = 0
    started: float = 0.0
    stopped: float = 0.0
    pids: list[int] = field(default_factory=list)

    @property
    def growth(self) -> int:
        """Peak minus the reading taken when sampling started (bytes, never negative)."""
        return max(0, self.peak - self.baseline)


class RssSampler:
    """Sample the summed RssAnon of ``pids`` every ``interval`` seconds in a daemon thread.

    Use as a context manager; ``trace`` holds baseline (first reading), peak and last reading.
    """

    def __init__(self, pids: Sequence[int], interval: float = 0.005) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.trace = MemoryTrace(pids=list(pids))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        anon = 0
        shmem = 0
        for pid in self.pids:
            status = read_status(pid)
            if status is not None:
                anon += status.get("RssAnon", 0)
                shmem += status.get("RssShmem", 0)
        trace = self.trace
        if trace.samples == 0:
            trace.baseline = anon
        trace.samples += 1
        trace.last = anon
        trace.peak = max(trace.peak, anon)
        trace.peak_shmem = max(trace.peak_shmem, shmem)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> RssSampler:
        self.trace.started = time.perf_counter()
        self._sample()  # the baseline, taken synchronously before the workload starts
        self._thread.start()
        return self

    def stop(self) -> MemoryTrace:
        self._stop.set()
        self._thread.join()
        self._sample()  # a last reading after the workload
        self.trace.stopped = time.perf_counter()
        return self.trace

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
