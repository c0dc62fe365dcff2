"""The small interface every benchmarked system implements.

An adapter starts a local cluster (one controller/scheduler, ``n`` engines/workers, loopback
only, all as subprocesses managed from this process), exposes the pids whose memory is the
"controller's", and offers one untimed workload method per scenario. Timing, memory sampling
and statistics live in :mod:`benchmarks.scenarios` so that every system is measured alike.
"""

from __future__ import annotations

import abc
import importlib.metadata
import importlib.util
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from benchmarks.simengines import SimTarget

    Array = NDArray[Any]
else:
    Array = Any

#: Seconds any single blocking wait inside an adapter may take before it is an error.
WAIT_TIMEOUT = 900.0
#: The scenarios that need several controllers federated into one (fedpar only: the peers have no federation).
NO_FEDERATION: dict[str, str] = {
    name: "n/a (no federation)" for name in ("federation", "engines_10k", "failover")
}


class NotApplicable(Exception):
    """The scenario has no equivalent on this system (reported as "n/a", not as an error)."""


@dataclass
class Probe:
    """Whether a system can be benchmarked here, and the versions involved."""

    name: str
    available: bool
    status: str  # "available", "not installed" or "unavailable: <why>"
    versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ControllerState:
    """One live controller of a federation, as a status request saw it."""

    number: int | None  # the controller's number in its cluster (for restarting it); None if unknown
    pid: int
    cid: str
    engines: tuple[int, ...]  # ids of the engines it owns
    done: int  # tasks finished and recorded by this controller since its store was created


def dist_version(dist: str) -> str | None:
    """Installed version of a distribution, without importing it."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class System(abc.ABC):
    """One benchmarked system. Constructed, started, used for one scenario, stopped."""

    name: ClassVar[str]
    #: The module that must be importable for the system to be "installed".
    module: ClassVar[str]
    #: Distributions whose versions go into the results metadata.
    dists: ClassVar[tuple[str, ...]]
    #: Scenario name -> why it is not run on this system ("n/a", "not available yet").
    unsupported: ClassVar[dict[str, str]] = {}

    def __init__(self, options: Mapping[str, str] | None = None) -> None:
        self.options: dict[str, str] = dict(options or {})
        #: Free-form facts about how the system was run, copied into each sample.
        self.notes: dict[str, Any] = {}

    @classmethod
    def probe(cls) -> Probe:
        versions = {d: v for d in cls.dists if (v := dist_version(d)) is not None}
        if importlib.util.find_spec(cls.module) is None:
            return Probe(cls.name, False, "not installed", versions)
        return Probe(cls.name, True, "available", versions)

    # -- lifecycle ---------------------------------------------------------------------------
    @abc.abstractmethod
    def start(self, n_engines: int, scenario: str) -> None:
        """Start a cluster with ``n_engines`` engines and connect a client; block until ready."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop everything :meth:`start` started. Must be safe after a failed/partial start."""

    @abc.abstractmethod
    def controller_pids(self) -> list[int]:
        """Pids of the controller/scheduler process(es), whose RssAnon is measured."""

    def engine_pids(self) -> list[int]:
        """Pids of the engine/worker processes, where the system tells them (else empty)."""
        return []

    # -- workloads (untimed; the scenarios time them) ----------------------------------------
    @abc.abstractmethod
    def apply_burst(self, n: int) -> None:
        """Submit ``n`` no-op tasks one by one through the load-balanced interface; await all."""

    @abc.abstractmethod
    def map_noop(self, n: int) -> None:
        """Map the no-op over ``range(n)`` with the system's default chunking; gather."""

    @abc.abstractmethod
    def round_trip(self) -> None:
        """One synchronous no-op round trip."""

    @abc.abstractmethod
    def push_pull(self, arr: Array) -> Array:
        """Send ``arr`` to one engine and fetch it back."""

    @abc.abstractmethod
    def identity_apply(self, arr: Array) -> Array:
        """Run ``identity(arr)`` on one engine and return the result."""

    @abc.abstractmethod
    def kilobyte_tasks(self, n: int, kb: int) -> None:
        """Run ``n`` tasks each returning ``kb`` KB; await all, then drop the results."""

    # -- restart (fedpar only by default) ------------------------------------------------------
    def fill_results(self, n: int) -> tuple[str, Any]:
        """Store ``n`` results; return the id of one of them and the value it must have."""
        raise NotApplicable(f"{self.name} has no restartable result store")

    def restart_controller(self) -> None:
        """Restart the controller (keeping its stored results); return once it is up."""
        raise NotApplicable(f"{self.name} has no restartable result store")

    def fetch_result(self, task_id: str) -> Any:
        """Fetch a stored result by task id."""
        raise NotApplicable(f"{self.name} has no restartable result store")

    # -- federation (fedpar only by default) -----------------------------------------------------
    def start_federation(self, controllers: int, engines: int, heartbeat: float | None = None) -> None:
        """(Re)start as ``controllers`` federated controllers with ``engines`` engines (``heartbeat``: the
        controllers' heartbeat period in seconds, None for the default); connect; wait for the engines."""
        raise NotApplicable(f"{self.name} has no federation")

    def federation_status(self, timeout: float = 10.0) -> list[ControllerState]:
        """The live controllers (those that answered within ``timeout``), with the engines each owns."""
        raise NotApplicable(f"{self.name} has no federation")

    def engine_count(self) -> int:
        """How many engines the client sees registered now."""
        raise NotApplicable(f"{self.name} has no federation")

    def sim_target(self) -> SimTarget:
        """What simulated engines (``benchmarks.simengines``) need to join the running cluster."""
        raise NotApplicable(f"{self.name} has no engine protocol to simulate")

    def kill_controller(self, number: int) -> int:
        """SIGKILL controller ``number``; returns the pid killed."""
        raise NotApplicable(f"{self.name} has no federation")

    def restart_controller_number(self, number: int) -> int:
        """Start controller ``number`` again on its state directory; returns its new pid."""
        raise NotApplicable(f"{self.name} has no federation")

    def submit_sleeps(self, n: int, seconds: float) -> list[Future[Any]]:
        """Submit ``n`` load-balanced tasks sleeping ``seconds`` each; their futures (not awaited)."""
        raise NotApplicable(f"{self.name} has no federation")

    def sleep_burst(self, n: int, seconds: float) -> None:
        """Run ``n`` load-balanced tasks sleeping ``seconds`` each and wait for them all."""
        for f in self.submit_sleeps(n, seconds):
            f.result(timeout=WAIT_TIMEOUT)
