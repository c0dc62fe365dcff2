"""The scenarios: sizes, the figures each reports, and how each is measured on a system."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from benchmarks.memory import RssSampler, rss_anon
from benchmarks.systems.base import NotApplicable, System

MB = 1e6
GB = 1e9

#: Seconds the memory scenario lets a controller settle before and after its workload.
SETTLE_BEFORE_S = 0.5
SETTLE_AFTER_S = 1.0


@dataclass(frozen=True)
class Sizes:
    """Workload sizes. :meth:`full` is the issue's definition; :meth:`quick` is for CI."""

    apply_tasks: int = 10_000
    map_elements: int = 100_000
    latency_round_trips: int = 1_000
    payload_bytes: int = 100_000_000
    large_payload_bytes: int = 1_000_000_000
    memory_tasks: int = 100_000
    memory_result_kb: int = 1
    restart_results: int = 100_000
    batch: int = 10_000  # tasks submitted per batch in the memory and restart scenarios
    federation_tasks: int = 50_000  # no-op tasks per controller count (1, 2, 4) in ``federation``
    federation_engines: int = 4  # engines of each of those clusters
    sim_engines: int = 10_000  # simulated engines in ``engines_10k``
    sim_per_process: int = 2_500  # simulated engines per simulator process (fewer if the fd limit says so)
    sim_controllers: int = 4
    sim_window_s: int = 10  # seconds of heartbeats over which the controllers' CPU is measured
    sim_heartbeat_ms: int = 0  # the controllers' heartbeat period; 0: fedpar's default ([controller] heartbeat)
    sim_register_timeout_s: int = 120  # give up waiting for every engine to be seen after this long
    failover_kills: int = 10

    @classmethod
    def full(cls) -> Sizes:
        return cls()

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            apply_tasks=200,
            map_elements=2_000,
            latency_round_trips=100,
            payload_bytes=4_000_000,
            large_payload_bytes=12_000_000,
            memory_tasks=2_000,
            restart_results=2_000,
            batch=1_000,
            federation_tasks=1_000,
            federation_engines=2,
            sim_engines=400,
            sim_per_process=200,
            sim_window_s=3,
            sim_register_timeout_s=60,
            failover_kills=3,
        )

    def with_overrides(self, overrides: Mapping[str, int]) -> Sizes:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown size(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **dict(overrides))


@dataclass(frozen=True)
class Figure:
    """One reported number: ``key`` in the samples, a label with unit, and which way is better."""

    key: str
    label: str
    higher_is_better: bool

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    figures: tuple[Figure, ...]
    describe: Callable[[Sizes], str]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "throughput_apply",
            "Task throughput, one by one",
            (Figure("tasks_per_s", "tasks/s", True),),
            lambda z: (
                f"{z.apply_tasks:,} no-op tasks submitted one by one through the load-balanced "
                "interface, then all awaited."
            ),
        ),
        Scenario(
            "throughput_map",
            "Map throughput",
            (Figure("elements_per_s", "elements/s", True),),
            lambda z: f"A {z.map_elements:,}-element no-op map with each system's default chunking, gathered.",
        ),
        Scenario(
            "latency",
            "Round-trip latency",
            (Figure("median_us", "median µs", False), Figure("p99_us", "p99 µs", False)),
            lambda z: f"{z.latency_round_trips:,} sequential synchronous no-op round trips.",
        ),
        Scenario(
            "payload",
            "Large payload",
            (
                Figure("push_pull_gbps", "push+pull GB/s", True),
                Figure("apply_gbps", "identity apply GB/s", True),
                Figure("push_pull_mem_x", "push+pull ctrl mem x payload", False),
                Figure("apply_mem_x", "apply ctrl mem x payload", False),
            ),
            lambda z: (
                f"A {z.payload_bytes / MB:,.0f} MB float64 array to one engine and back. GB/s = "
                "2 x payload bytes / wall time (there and back). Memory = peak RssAnon of the "
                "controller/scheduler process(es) during the transfer minus their RssAnon just "
                "before it, as a multiple of the payload (sampled every ~5 ms)."
            ),
        ),
        Scenario(
            "payload_1gb",
            "Very large payload, bounded memory",
            (
                Figure("push_pull_gbps", "push+pull GB/s", True),
                Figure("ctrl_peak_mb", "ctrl peak growth MB", False),
                Figure("client_x", "client growth x payload", False),
                Figure("engine_x", "engine growth x payload", False),
            ),
            lambda z: (
                f"A {z.large_payload_bytes / MB:,.0f} MB uint8 array pushed to one engine and pulled back. "
                "Controller: peak RssAnon growth in MB during the transfer (the stream window bounds it, not "
                "the object). Client and engine: peak RssAnon growth as a multiple of the payload (the pulled "
                "copy on the client and the pushed copy on the engine are 1.0 each; more means extra copies). "
                "Engine figure only where the system tells its worker pids."
            ),
        ),
        Scenario(
            "controller_memory",
            "Controller memory growth",
            (
                Figure("growth_mb_per_100k", "MB growth per 100k tasks", False),
                Figure("second_half_mb_per_100k", "2nd-half MB growth per 100k tasks", False),
            ),
            lambda z: (
                f"Controller/scheduler RssAnon before and after {z.memory_tasks:,} tasks each "
                f"returning {z.memory_result_kb} KB (submitted in batches of {z.batch:,}, results "
                "fetched and dropped), scaled to 100,000 tasks. The second figure counts only the growth "
                "over the second half of the batches: near 0 when the first figure is a one-time working "
                "set (caches sized by the largest batch), not a cost per task."
            ),
        ),
        Scenario(
            "restart",
            "Controller restart",
            (Figure("restart_s", "restart s", False),),
            lambda z: (
                f"Time for a controller holding {z.restart_results:,} stored results to "
                "restart and answer get_result for one of them (fedpar only)."
            ),
        ),
        Scenario(
            "federation",
            "Federation: one logical controller made of 1, 2 and 4",
            (
                *(Figure(f"tasks_per_s_{k}c", f"{k} ctrl: tasks/s", True) for k in (1, 2, 4)),
                *(Figure(f"ctrl_cpu_us_per_task_{k}c", f"{k} ctrl: ctrl CPU µs/task", False) for k in (1, 2, 4)),
                *(Figure(f"share_dev_pct_{k}c", f"{k} ctrl: max share deviation %", False) for k in (2, 4)),
                *(Figure(f"share_dev_busy_pct_{k}c", f"{k} ctrl: max share deviation %, 5 ms tasks", False)
                  for k in (2, 4)),
            ),
            lambda z: (
                f"fedpar only (the peers have no federation). {z.federation_tasks:,} no-op tasks submitted one by "
                f"one through the load-balanced view, then all awaited, on a cluster of {z.federation_engines} "
                "engines and 1, 2 or 4 federated controllers (a fresh cluster each, engines spread evenly first). "
                "Per controller: the tasks it ran (`done` deltas) against the share its engine count implies (max "
                "deviation, % of that share; again with 200 tasks per engine that sleep 5 ms, where the engines "
                "bound the rate) and its CPU-seconds (user+system, psutil) per task it ran; the figure "
                "weighs the controllers by the tasks they ran (their CPU over their tasks). On a 2-core host "
                "aggregate throughput cannot grow with controllers (the client and the controllers share the "
                "cores); a per-controller CPU cost per task that stays flat is what shows that it would, given the "
                "cores."
            ),
        ),
        Scenario(
            "engines_10k",
            "Many engines: simulated engines on 4 controllers",
            (
                Figure("register_s", "registration s", False),
                Figure("engines_registered", "engines seen by the client", True),
                Figure("ctrl_cpu_pct_sum", "ctrl CPU % of a core, sum", False),
                Figure("ctrl_cpu_pct_max", "busiest ctrl CPU %", False),
                Figure("heartbeats_per_s", "heartbeats answered/s", True),
                Figure("ctrl_cpu_us_per_heartbeat", "ctrl CPU µs/heartbeat", False),
            ),
            lambda z: (
                f"fedpar only. {z.sim_engines:,} simulated engines (`benchmarks/simengines.py`: one DEALER socket "
                f"each, up to {z.sim_per_process:,} per process) register with {z.sim_controllers} federated "
                "controllers: seconds from starting the simulators until the client lists them all (goal: 10 s or "
                "less; not shown if it never happens within the timeout, then 'engines seen' is the most it saw). "
                f"Then, over {z.sim_window_s} s while every engine heartbeats ("
                + (f"every {z.sim_heartbeat_ms} ms" if z.sim_heartbeat_ms > 0 else "fedpar's default period, 1 s")
                + "), the controllers' CPU as percent of one core (summed, and the busiest), the heartbeats answered "
                "per second and the controllers' CPU per heartbeat. A small map through the load-balanced view "
                "checks that the simulated engines run tasks."
            ),
        ),
        Scenario(
            "failover",
            "Failover: a controller killed",
            (
                Figure("rehome_p50_s", "re-homed p50 s", False),
                Figure("rehome_max_s", "re-homed max s", False),
                Figure("results_p50_s", "waiting results p50 s", False),
                Figure("results_max_s", "waiting results max s", False),
            ),
            lambda z: (
                f"fedpar only. 3 federated controllers, 6 engines; {z.failover_kills} times: SIGKILL a controller "
                "that owns engines (round robin), poll `client.status()` every 0.1 s until every engine it owned is "
                "listed by a live controller (re-homed), then restart it and wait until it is back (and, before "
                "the next kill, until the engines are spread evenly again). Also timed from the kill: until the "
                "results of 12 tasks of 0.5 s submitted just before it all arrived (those of the killed controller "
                "are adopted or resubmitted). fedpar's defaults: a registration lapses after 3 s ([discovery] ttl), "
                "takeovers stay open 3 s ([discovery] window)."
            ),
        ),
    )
}


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def batches(n: int, size: int) -> list[int]:
    """Split ``n`` into batch lengths of at most ``size``."""
    size = max(1, size)
    return [min(size, n - i) for i in range(0, n, size)]


# -- measurement ---------------------------------------------------------------------------------

Measured = tuple[dict[str, float], dict[str, Any]]


def run_scenario(system: System, scenario: str, sizes: Sizes) -> Measured:
    """Measure ``scenario`` on a started ``system``: (figures, extra raw data)."""
    if scenario in system.unsupported:
        raise NotApplicable(system.unsupported[scenario])
    runner = _RUNNERS.get(scenario)
    if runner is None:
        from benchmarks.federation import RUNNERS as federation_runners

        runner = federation_runners.get(scenario)
    if runner is None:
        raise NotApplicable("not available yet")
    return runner(system, sizes)


def _throughput_apply(system: System, sizes: Sizes) -> Measured:
    n = sizes.apply_tasks
    system.apply_burst(min(100, n))  # warm-up
    t0 = time.perf_counter()
    system.apply_burst(n)
    dt = time.perf_counter() - t0
    return {"tasks_per_s": n / dt}, {"n": n, "seconds": dt}


def _throughput_map(system: System, sizes: Sizes) -> Measured:
    n = sizes.map_elements
    system.map_noop(min(200, n))  # warm-up (also creates any pool)
    t0 = time.perf_counter()
    system.map_noop(n)
    dt = time.perf_counter() - t0
    return {"elements_per_s": n / dt}, {"n": n, "seconds": dt}


def _latency(system: System, sizes: Sizes) -> Measured:
    for _ in range(10):  # warm-up
        system.round_trip()
    samples: list[float] = []
    clock = time.perf_counter
    for _ in range(sizes.latency_round_trips):
        t0 = clock()
        system.round_trip()
        samples.append((clock() - t0) * 1e6)
    figures = {"median_us": statistics.median(samples), "p99_us": percentile(samples, 99)}
    extra = {"n": len(samples), "mean_us": statistics.fmean(samples), "samples_us": samples}
    return figures, extra


def _warm_up_array(payload_bytes: int) -> Any:
    """A tenth of the payload, at most 10 MB: big enough to take every system's large-message path (fedpar
    streams above 4 MiB), so that the path's one-time set-up (connections, buffers) is not in the timed sample."""
    import numpy as np

    return np.zeros(max(16, min(payload_bytes // 10, 10_000_000) // 8))


def _payload(system: System, sizes: Sizes) -> Measured:
    import numpy as np

    arr = np.random.default_rng(0).random(max(1, sizes.payload_bytes // 8))
    nbytes = int(arr.nbytes)
    warm = _warm_up_array(nbytes)
    system.push_pull(warm)  # warm-up both paths
    system.identity_apply(warm)
    del warm
    figures: dict[str, float] = {}
    extra: dict[str, Any] = {"payload_bytes": nbytes}
    ops: list[tuple[str, Callable[[Any], Any]]] = [
        ("push_pull", system.push_pull),
        ("apply", system.identity_apply),
    ]
    for label, op in ops:
        gc.collect()
        pids = system.controller_pids()
        with RssSampler(pids) as sampler:
            t0 = time.perf_counter()
            out = op(arr)
            dt = time.perf_counter() - t0
        trace = sampler.trace
        if not np.array_equal(out, arr):
            raise AssertionError(f"{label}: the array came back different")
        del out
        figures[f"{label}_gbps"] = 2 * nbytes / dt / GB
        figures[f"{label}_mem_x"] = trace.growth / nbytes
        extra[label] = {
            "seconds": dt,
            "controller_pids": pids,
            "baseline_mb": trace.baseline / MB,
            "peak_mb": trace.peak / MB,
            "peak_shmem_mb": trace.peak_shmem / MB,
            "memory_samples": trace.samples,
        }
    return figures, extra


def _payload_1gb(system: System, sizes: Sizes) -> Measured:
    import os

    import numpy as np

    arr = np.full(max(1, sizes.large_payload_bytes), 7, dtype=np.uint8)
    arr[:: 1 << 20] = np.arange(len(arr[:: 1 << 20]), dtype=np.uint64).astype(np.uint8)
    nbytes = int(arr.nbytes)
    system.push_pull(_warm_up_array(nbytes))  # warm-up
    gc.collect()
    time.sleep(SETTLE_BEFORE_S)
    ctrl, client, engines = system.controller_pids(), [os.getpid()], system.engine_pids()
    with RssSampler(ctrl) as cs, RssSampler(client) as us, RssSampler(engines or [os.getpid()]) as es:
        t0 = time.perf_counter()
        out = system.push_pull(arr)
        dt = time.perf_counter() - t0
    if out.shape != arr.shape or not np.array_equal(out[:: 1 << 16], arr[:: 1 << 16]) or int(out.sum()) != int(
            arr.sum()):
        raise AssertionError("payload_1gb: the array came back different")
    del out
    figures = {
        "push_pull_gbps": 2 * nbytes / dt / GB,
        "ctrl_peak_mb": cs.trace.growth / MB,
        "client_x": us.trace.growth / nbytes,
    }
    if engines:
        figures["engine_x"] = es.trace.growth / nbytes
    extra: dict[str, Any] = {"payload_bytes": nbytes, "seconds": dt, "controller_pids": ctrl,
                             "engine_pids": engines, "ctrl_baseline_mb": cs.trace.baseline / MB}
    return figures, extra


def _controller_memory(system: System, sizes: Sizes) -> Measured:
    n, kb = sizes.memory_tasks, sizes.memory_result_kb
    system.kilobyte_tasks(min(100, n), kb)  # warm-up
    gc.collect()
    time.sleep(SETTLE_BEFORE_S)
    pids = system.controller_pids()
    before = rss_anon(pids)
    parts = batches(n, sizes.batch)
    half = len(parts) // 2
    mid, n_mid, dt = before, 0, 0.0
    with RssSampler(pids, interval=0.05) as sampler:
        for i, size in enumerate(parts):
            t0 = time.perf_counter()
            system.kilobyte_tasks(size, kb)
            dt += time.perf_counter() - t0
            if i + 1 == half:  # the second half shows whether the growth goes on per task or was a one-time cost
                gc.collect()
                time.sleep(SETTLE_AFTER_S)
                mid, n_mid = rss_anon(pids), sum(parts[:half])
        gc.collect()
        time.sleep(SETTLE_AFTER_S)  # let the controller release what it will release
    after = rss_anon(pids)
    growth = (after - before) / MB
    figures = {"growth_mb_per_100k": growth * 100_000 / n}
    if half:
        figures["second_half_mb_per_100k"] = (after - mid) / MB * 100_000 / (n - n_mid)
    extra = {
        "n": n,
        "result_kb": kb,
        "controller_pids": pids,
        "before_mb": before / MB,
        "mid_mb": mid / MB,
        "after_mb": after / MB,
        "peak_mb": sampler.trace.peak / MB,
        "seconds": dt,
        "tasks_per_s": n / dt,
    }
    return figures, extra


def _restart(system: System, sizes: Sizes) -> Measured:
    t0 = time.perf_counter()
    task_id, expected = system.fill_results(sizes.restart_results)
    fill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    system.restart_controller()
    value = system.fetch_result(task_id)
    dt = time.perf_counter() - t0
    if value != expected:
        raise AssertionError(f"get_result({task_id!r}) after restart gave {value!r}, not {expected!r}")
    return {"restart_s": dt}, {"stored_results": sizes.restart_results, "fill_seconds": fill_s}


_RUNNERS: dict[str, Callable[[System, Sizes], Measured]] = {
    "throughput_apply": _throughput_apply,
    "throughput_map": _throughput_map,
    "latency": _latency,
    "payload": _payload,
    "payload_1gb": _payload_1gb,
    "controller_memory": _controller_memory,
    "restart": _restart,
}
