"""dask.distributed: ``LocalCluster(n_workers=N, threads_per_worker=1, processes=True)``.

A LocalCluster runs its *scheduler inside the client process*. That is dask's default and is
used for the timing scenarios, but it makes the scheduler's memory inseparable from the
benchmark client's, so for the memory scenarios (``payload``, ``controller_memory``) the
adapter runs the same cluster with the scheduler in its own subprocess
(``distributed.deploy.subprocess.SubprocessCluster``). Option ``dask_scheduler``
(``auto`` | ``inprocess`` | ``subprocess``) overrides the choice; samples record which was used.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, ClassVar

from benchmarks import workloads
from benchmarks.procs import with_descendants
from benchmarks.systems.base import NO_FEDERATION, WAIT_TIMEOUT, Array, System

log = logging.getLogger(__name__)

MEMORY_SCENARIOS = frozenset({"payload", "controller_memory"})


def scheduler_mode(option: str, scenario: str) -> str:
    """``inprocess`` or ``subprocess`` for ``scenario`` given the ``dask_scheduler`` option."""
    if option in ("inprocess", "subprocess"):
        return option
    if option != "auto":
        raise ValueError(f"dask_scheduler must be auto, inprocess or subprocess, not {option!r}")
    return "subprocess" if scenario in MEMORY_SCENARIOS else "inprocess"


class DaskSystem(System):
    name: ClassVar[str] = "dask"
    module: ClassVar[str] = "distributed"
    dists: ClassVar[tuple[str, ...]] = ("distributed", "dask")
    unsupported: ClassVar[dict[str, str]] = {"restart": "n/a", **NO_FEDERATION}

    _cluster: Any = None
    _client: Any = None
    _worker0: str = ""
    _mode: str = "inprocess"

    def start(self, n_engines: int, scenario: str) -> None:
        from distributed import Client, LocalCluster

        self._mode = scheduler_mode(self.options.get("dask_scheduler", "auto"), scenario)
        self.notes["scheduler"] = self._mode
        if self._mode == "inprocess":
            self._cluster = LocalCluster(  # type: ignore[no-untyped-call]
                n_workers=n_engines,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            )
        else:
            from distributed.deploy.subprocess import SubprocessCluster

            self._cluster = SubprocessCluster(
                host="127.0.0.1",
                n_workers=n_engines,
                threads_per_worker=1,
                dashboard_address=None,  # type: ignore[arg-type]  # documented as accepted
            )
        self._client = Client(self._cluster)  # type: ignore[no-untyped-call]
        self._client.wait_for_workers(n_engines, timeout=120)
        self._worker0 = sorted(self._client.scheduler_info()["workers"])[0]

    def stop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close(timeout=30)
        if self._cluster is not None:
            try:
                self._cluster.close(timeout=30)
            except Exception:
                log.exception("dask: cluster.close failed")
        self._client = self._cluster = None

    def controller_pids(self) -> list[int]:
        if self._mode == "inprocess":
            return [os.getpid()]  # the scheduler shares the benchmark client's process
        return with_descendants([int(self._cluster.scheduler.process.pid)])

    def apply_burst(self, n: int) -> None:
        futures = [self._client.submit(workloads.noop, i, pure=False) for i in range(n)]
        self._client.gather(futures)

    def map_noop(self, n: int) -> None:
        futures = self._client.map(workloads.noop, range(n))
        self._client.gather(futures)

    def round_trip(self) -> None:
        self._client.submit(workloads.noop, pure=False).result(timeout=WAIT_TIMEOUT)

    def push_pull(self, arr: Array) -> Array:
        [future] = self._client.scatter([arr], workers=[self._worker0])
        out: Array = self._client.gather(future)
        del future
        return out

    def identity_apply(self, arr: Array) -> Array:
        future = self._client.submit(workloads.identity, arr, pure=False, workers=[self._worker0])
        out: Array = future.result(timeout=WAIT_TIMEOUT)
        del future
        return out

    def kilobyte_tasks(self, n: int, kb: int) -> None:
        futures = [self._client.submit(workloads.kilobytes, kb, pure=False) for _ in range(n)]
        self._client.gather(futures)
        del futures
