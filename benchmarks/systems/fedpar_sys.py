"""fedpar: ``fedpar.Cluster(n=N)`` (controller + N engines as local subprocesses).

Every use of the fedpar API by the benchmarks is in this file, so that a mismatch with the API
is fixed here and nowhere else. The calls used:

    fedpar.Cluster(n=N[, state_dir=DIR]); cluster.start(); cluster.connect_client()
    client.wait_for_engines(N, timeout=); client.ids; cluster.controller_pid; cluster.stop()
    cluster.stop_controller(0); cluster.restart_controller(0)   # else stop + Cluster(n=0, state_dir=DIR)
    client.load_balanced_view(); client[client.ids[0]]; client.get_result(task_id); client.close()
    lview.apply_async(f, *a) -> AsyncResult (.get(timeout=), .task_ids); lview.apply_sync
    lview.map_async(f, seq).get(); e0.push({...}, block=True); e0.pull(k, block=True)
    e0.apply_sync(f, *a)

Federation (scenarios ``federation``, ``engines_10k``, ``failover``):

    fedpar.Cluster(n=N, controllers=K, config=fedpar.config.load_config(None, {"controller": {...}}))
    cluster.controller_pids (live, in controller-number order); cluster.restart_controller(i)
    cluster.info.key, cluster.info.controllers ((client, engine) endpoints); cluster.config.controller.heartbeat
    client.status(timeout=)["controllers"] (id, pid, engines, done); len(client.ids)
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import signal
import tempfile
from concurrent.futures import Future
from typing import Any, ClassVar

from benchmarks import workloads
from benchmarks.procs import with_descendants
from benchmarks.simengines import SimTarget
from benchmarks.systems.base import WAIT_TIMEOUT, Array, ControllerState, Probe, System, dist_version

log = logging.getLogger(__name__)

#: How long to wait for engines to register (seconds).
ENGINE_TIMEOUT = 60.0
#: Scenarios that start their clusters themselves (``start_federation``), several per sample.
FEDERATION_SCENARIOS = frozenset({"federation", "engines_10k", "failover"})


class FedparSystem(System):
    name: ClassVar[str] = "fedpar"
    module: ClassVar[str] = "fedpar"
    dists: ClassVar[tuple[str, ...]] = ("fedpar", "pyzmq")

    _fedpar: Any = None
    _cluster: Any = None
    _client: Any = None
    _lview: Any = None
    _e0: Any = None
    _state_dir: str | None = None
    _numbers: dict[int, int] | None = None  # federation: controller pid -> its number in the cluster

    @classmethod
    def probe(cls) -> Probe:
        probe = super().probe()
        if not probe.available:
            return probe
        try:
            fedpar = importlib.import_module("fedpar")
        except Exception as exc:
            return Probe(cls.name, False, f"unavailable: import fedpar: {exc}", probe.versions)
        if not hasattr(fedpar, "Cluster"):
            return Probe(cls.name, False, "unavailable: fedpar.Cluster does not exist yet", probe.versions)
        version = getattr(fedpar, "__version__", None) or dist_version("fedpar")
        if version:
            probe.versions["fedpar"] = str(version)
        return probe

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, n_engines: int, scenario: str) -> None:
        self._fedpar = importlib.import_module("fedpar")
        if scenario in FEDERATION_SCENARIOS:
            return  # (each measurement starts its own cluster: ``start_federation``)
        kwargs: dict[str, Any] = {}
        if scenario == "restart":
            self._state_dir = tempfile.mkdtemp(prefix="fedpar-bench-state-")
            kwargs["state_dir"] = self._state_dir
        self._connect(self._fedpar.Cluster(n=n_engines, **kwargs), n_engines)

    def _connect(self, cluster: Any, n_engines: int) -> None:
        self._cluster = cluster
        cluster.start()
        self._client = cluster.connect_client()
        if n_engines:
            # The client that will be used must itself have seen the engines register.
            ids = self._client.wait_for_engines(n_engines, timeout=ENGINE_TIMEOUT)
            self._lview = self._client.load_balanced_view()
            self._e0 = self._client[sorted(ids)[0]]  # DirectView of one engine

    def stop(self) -> None:
        self._close()
        if self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            self._state_dir = None

    def _close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        if self._cluster is not None:
            try:
                self._cluster.stop()
            except Exception:
                log.exception("fedpar: cluster.stop failed")
        self._client = self._cluster = self._lview = self._e0 = None
        self._numbers = None

    def controller_pids(self) -> list[int]:
        return with_descendants([int(p) for p in self._cluster.controller_pids])

    def engine_pids(self) -> list[int]:
        engines = self._client.status()["engines"]
        first = min(int(e["id"]) for e in engines)
        return [int(e["pid"]) for e in engines if int(e["id"]) == first]  # the engine payloads go to (``_e0``)

    # -- workloads ---------------------------------------------------------------------------
    def apply_burst(self, n: int) -> None:
        ars = [self._lview.apply_async(workloads.noop, i) for i in range(n)]
        for ar in ars:
            ar.get(timeout=WAIT_TIMEOUT)

    def map_noop(self, n: int) -> None:
        self._lview.map_async(workloads.noop, range(n)).get(timeout=WAIT_TIMEOUT)

    def round_trip(self) -> None:
        self._lview.apply_sync(workloads.noop)

    def push_pull(self, arr: Array) -> Array:
        self._e0.push({"a": arr}, block=True)
        out: Array = self._e0.pull("a", block=True)
        self._e0.push({"a": None}, block=True)
        return out

    def identity_apply(self, arr: Array) -> Array:
        out: Array = self._e0.apply_sync(workloads.identity, arr)
        return out

    def kilobyte_tasks(self, n: int, kb: int) -> None:
        ars = [self._lview.apply_async(workloads.kilobytes, kb) for _ in range(n)]
        for ar in ars:
            ar.get(timeout=WAIT_TIMEOUT)

    # -- restart -----------------------------------------------------------------------------
    def fill_results(self, n: int) -> tuple[str, Any]:
        ars = [self._lview.apply_async(workloads.echo, i) for i in range(n)]
        for ar in ars:
            ar.get(timeout=WAIT_TIMEOUT)
        keep = n // 2
        return str(ars[keep].task_ids[0]), keep

    def restart_controller(self) -> None:
        restart = getattr(self._cluster, "restart_controller", None)
        stop = getattr(self._cluster, "stop_controller", None)
        if callable(restart) and callable(stop):  # (controller number 0: the only one here)
            self.notes["restart"] = "cluster.stop_controller(0) + cluster.restart_controller(0)"
            stop(0)
            restart(0)
            return
        # Fallback: stop the whole cluster, start a controller alone on the same state_dir.
        self.notes["restart"] = "cluster.stop() + Cluster(n=0, state_dir).start()"
        self._close()
        self._connect(self._fedpar.Cluster(n=0, state_dir=self._state_dir), 0)

    def fetch_result(self, task_id: str) -> Any:
        return self._client.get_result(task_id).get(timeout=WAIT_TIMEOUT)

    # -- federation --------------------------------------------------------------------------
    def start_federation(self, controllers: int, engines: int, heartbeat: float | None = None) -> None:
        self._close()
        if self._fedpar is None:
            self._fedpar = importlib.import_module("fedpar")
        overrides = {"controller": {"heartbeat": heartbeat}} if heartbeat else None
        config = importlib.import_module("fedpar.config").load_config(None, overrides)
        cluster = self._fedpar.Cluster(n=engines, controllers=controllers, config=config)
        self._cluster = cluster
        cluster.start()
        self._numbers = {int(pid): i for i, pid in enumerate(cluster.controller_pids)}  # (all alive: in order)
        self._client = cluster.connect_client()
        self._lview = self._client.load_balanced_view()
        if engines:
            self._client.wait_for_engines(engines, timeout=ENGINE_TIMEOUT)

    def federation_status(self, timeout: float = 10.0) -> list[ControllerState]:
        numbers = self._numbers or {}
        return [ControllerState(numbers.get(int(c["pid"])), int(c["pid"]), str(c["id"]),
                                tuple(int(e) for e in c["engines"]), int(c["done"]))
                for c in self._client.status(timeout=timeout)["controllers"]]

    def engine_count(self) -> int:
        return len(self._client.ids)

    def sim_target(self) -> SimTarget:
        info = self._cluster.info
        return SimTarget(bytes(info.key), tuple(str(c[1]) for c in info.controllers),
                         float(self._cluster.config.controller.heartbeat))

    def kill_controller(self, number: int) -> int:
        pid = next(p for p, i in (self._numbers or {}).items() if i == number)
        os.kill(pid, signal.SIGKILL)
        return pid

    def restart_controller_number(self, number: int) -> int:
        before = set(self._cluster.controller_pids)
        self._cluster.restart_controller(number)
        new = set(self._cluster.controller_pids) - before
        if not new:
            raise RuntimeError(f"controller {number} was restarted but no new controller process is alive")
        pid = int(new.pop())
        numbers = self._numbers = {p: i for p, i in (self._numbers or {}).items() if i != number}
        numbers[pid] = number
        return pid

    def submit_sleeps(self, n: int, seconds: float) -> list[Future[Any]]:
        return [self._lview.apply_async(workloads.sleep_for, seconds) for _ in range(n)]
