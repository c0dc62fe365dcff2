"""ipyparallel: ``ipp.Cluster(n=N).start_and_connect_sync()`` (controller + N engines)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, ClassVar

from benchmarks import workloads
from benchmarks.procs import with_descendants
from benchmarks.systems.base import NO_FEDERATION, WAIT_TIMEOUT, Array, System

log = logging.getLogger(__name__)


class IpyparallelSystem(System):
    name: ClassVar[str] = "ipyparallel"
    module: ClassVar[str] = "ipyparallel"
    dists: ClassVar[tuple[str, ...]] = ("ipyparallel", "pyzmq")
    unsupported: ClassVar[dict[str, str]] = {"restart": "n/a", **NO_FEDERATION}

    _cluster: Any = None
    _client: Any = None
    _lview: Any = None
    _direct: Any = None

    def start(self, n_engines: int, scenario: str) -> None:
        import ipyparallel as ipp

        self._cluster = ipp.Cluster(n=n_engines, log_level=logging.WARNING)
        self._client = self._cluster.start_and_connect_sync()
        self._client.wait_for_engines(n_engines, timeout=120)
        self._lview = self._client.load_balanced_view()
        self._direct = self._client[self._client.ids[0]]  # DirectView of one engine
        self.notes["controller_processes"] = len(self.controller_pids())

    def stop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        if self._cluster is not None:
            try:
                self._cluster.stop_cluster_sync()
            except Exception:
                log.exception("ipyparallel: stop_cluster_sync failed")
        self._client = self._cluster = self._lview = self._direct = None

    def controller_pids(self) -> list[int]:
        # The hub plus the scheduler processes it forks.
        return with_descendants([int(self._cluster.controller.pid)])

    def apply_burst(self, n: int) -> None:
        ars = [self._lview.apply_async(workloads.noop, i) for i in range(n)]
        for ar in ars:
            ar.get(timeout=WAIT_TIMEOUT)

    def map_noop(self, n: int) -> None:
        self._lview.map_async(workloads.noop, range(n)).get(timeout=WAIT_TIMEOUT)

    def round_trip(self) -> None:
        self._lview.apply_sync(workloads.noop)

    def push_pull(self, arr: Array) -> Array:
        self._direct.push({"a": arr}, block=True)
        out: Array = self._direct.pull("a", block=True)
        self._direct.push({"a": None}, block=True)
        return out

    def identity_apply(self, arr: Array) -> Array:
        out: Array = self._direct.apply_sync(workloads.identity, arr)
        return out

    def kilobyte_tasks(self, n: int, kb: int) -> None:
        ars = [self._lview.apply_async(workloads.kilobytes, kb) for _ in range(n)]
        for ar in ars:
            ar.get(timeout=WAIT_TIMEOUT)
