"""Ray: ``ray.init(num_cpus=N, include_dashboard=False)`` (gcs_server + raylet + N workers).

Ray has no engine namespace, so ``push_pull`` is ``ray.put(arr)`` followed by a task that
receives the object on a worker and returns it, then ``ray.get``; ``identity_apply`` is
``ray.get(identity.remote(arr))``. The "controller" is gcs_server + raylet. Ray keeps objects in
a shared-memory store, which RssAnon does not count (``RssShmem`` is kept as an extra).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, ClassVar

from benchmarks import workloads
from benchmarks.procs import descendants
from benchmarks.systems.base import NO_FEDERATION, Array, System

log = logging.getLogger(__name__)

CONTROLLER_NAMES = frozenset({"gcs_server", "raylet"})


class RaySystem(System):
    name: ClassVar[str] = "ray"
    module: ClassVar[str] = "ray"
    dists: ClassVar[tuple[str, ...]] = ("ray",)
    unsupported: ClassVar[dict[str, str]] = {"restart": "n/a", **NO_FEDERATION}

    _ray: Any = None
    _noop: Any = None
    _identity: Any = None
    _kilobytes: Any = None
    _pool: Any = None
    _n: int = 0

    def start(self, n_engines: int, scenario: str) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home
        import ray

        self._ray = ray
        self._n = n_engines
        ray.init(
            num_cpus=n_engines,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        self._noop = ray.remote(workloads.noop)
        self._identity = ray.remote(workloads.identity)
        self._kilobytes = ray.remote(workloads.kilobytes)

    def stop(self) -> None:
        if self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.terminate()
            self._pool = None
        if self._ray is not None:
            try:
                self._ray.shutdown()
            except Exception:
                log.exception("ray: shutdown failed")
        self._ray = None

    def controller_pids(self) -> list[int]:
        pids: list[int] = []
        for proc in descendants():
            with contextlib.suppress(Exception):
                if proc.name() in CONTROLLER_NAMES:
                    pids.append(proc.pid)
        return pids

    def apply_burst(self, n: int) -> None:
        refs = [self._noop.remote(i) for i in range(n)]
        self._ray.get(refs)

    def map_noop(self, n: int) -> None:
        try:
            from ray.util.multiprocessing import Pool
        except ImportError:
            self.notes["map"] = "remote calls"
            self._ray.get([self._noop.remote(i) for i in range(n)])
            return
        self.notes["map"] = "ray.util.multiprocessing.Pool.map"
        if self._pool is None:
            self._pool = Pool(processes=self._n)
        self._pool.map(workloads.noop, range(n))

    def round_trip(self) -> None:
        self._ray.get(self._noop.remote())

    def push_pull(self, arr: Array) -> Array:
        ref = self._ray.put(arr)
        out: Array = self._ray.get(self._identity.remote(ref))
        del ref
        return out

    def identity_apply(self, arr: Array) -> Array:
        out: Array = self._ray.get(self._identity.remote(arr))
        return out

    def kilobyte_tasks(self, n: int, kb: int) -> None:
        refs = [self._kilobytes.remote(kb) for _ in range(n)]
        self._ray.get(refs)
        del refs
