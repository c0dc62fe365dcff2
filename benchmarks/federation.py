"""The federation scenarios (fedpar only): ``federation``, ``engines_10k`` and ``failover``.

Each starts its own clusters through the adapter (``System.start_federation``), several per sample for
``federation``; the harness still gives every sample a fresh worker and stops the system afterwards.

* ``federation``: the same no-op burst as ``throughput_apply`` through 1, 2 and 4 controllers with the same
  engines; per controller, the tasks it ran (``done`` deltas) against the share its engine count implies, and
  its CPU-seconds per task. On a 2-core host aggregate throughput cannot grow with controllers; a per-
  controller CPU cost per task that stays flat is what says it would, given the cores.
* ``engines_10k``: simulated engines (``benchmarks.simengines``) register with 4 controllers; time until the
  client sees them all, then the controllers' CPU while every engine heartbeats.
* ``failover``: SIGKILL a controller that owns engines, time until every one of its engines is listed by a
  live controller (and until the client's tasks waiting there have their results), restart it, repeat.

Pure helpers (shares, splits, percent, victims) are separate from the runners and unit-tested.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, Any

from benchmarks.simengines import STATUS_EVERY_S, SimFleet, bucket_percentile, diff_counters, rate, sum_statuses
from benchmarks.systems.base import ControllerState, System

if TYPE_CHECKING:
    from benchmarks.scenarios import Measured, Sizes

#: Controller counts of the ``federation`` scenario (the figures are named after them).
FEDERATION_CONTROLLERS: tuple[int, ...] = (1, 2, 4)
FAILOVER_CONTROLLERS = 3
FAILOVER_ENGINES = 6
#: Seconds to wait for the engines to be spread as placement wants (and to stay so for ``STABLE_S``).
BALANCE_TIMEOUT_S = 20.0
STABLE_S = 1.0
BALANCE_POLL_S = 0.2
#: ``failover``: poll period, the status timeout of one poll, and how long a re-homing may take.
POLL_S = 0.1
POLL_TIMEOUT_S = 0.2
REHOME_TIMEOUT_S = 60.0
#: ``failover``: tasks per engine submitted just before each kill, and how long each sleeps.
SLEEPS_PER_ENGINE = 2
SLEEP_S = 0.5
DISPATCH_S = 0.2  # seconds between submitting them and the kill
#: ``federation``: engine-bound tasks per engine (each sleeping ``BUSY_SLEEP_S``) for the busy-share figure.
BUSY_TASKS_PER_ENGINE = 200
BUSY_SLEEP_S = 0.005
#: ``engines_10k``: seconds between registration and the wait for an even spread that precedes the CPU window.
SETTLE_S = 1.0
#: ``engines_10k``: how long the engines may take to be spread evenly before the CPU window starts anyway.
BALANCE_10K_TIMEOUT_S = 30.0


# -- pure helpers ------------------------------------------------------------------------------------


def even_split(total: int, parts: int) -> list[int]:
    """``total`` split over ``parts`` as evenly as integers allow, largest first (placement's equal-weight quotas,
    sorted)."""
    if parts <= 0:
        return []
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def is_balanced(engine_counts: Sequence[int], total: int) -> bool:
    """True when the controllers own ``total`` engines between them, spread as evenly as possible."""
    return sum(engine_counts) == total and sorted(engine_counts, reverse=True) == even_split(total, len(engine_counts))


def expected_shares(engine_counts: Sequence[int], tasks: int) -> list[float]:
    """Tasks each controller should run if tasks follow engines: ``tasks * engines_c / engines``."""
    total = sum(engine_counts)
    if total <= 0:
        return [0.0 for _ in engine_counts]
    return [tasks * n / total for n in engine_counts]


def share_deviation(done: Sequence[int], engine_counts: Sequence[int]) -> float:
    """The largest relative deviation of a controller's task count from its expected share (0.1 = 10%).

    The expected share follows the controller's engines (``expected_shares`` of the tasks counted); a
    controller without engines is expected to run nothing, and one that ran tasks anyway counts against the
    share a controller with engines has on average (it cannot be divided by zero)."""
    if len(done) != len(engine_counts):
        raise ValueError("one task count per controller's engine count")
    tasks = sum(done)
    if tasks <= 0:
        return 0.0
    expected = expected_shares(engine_counts, tasks)
    owners = [e for e, n in zip(expected, engine_counts, strict=True) if n > 0]
    mean_share = statistics.fmean(owners) if owners else float(tasks)
    worst = 0.0
    for got, want in zip(done, expected, strict=True):
        worst = max(worst, abs(got - want) / (want if want > 0 else mean_share))
    return worst


def per_task_us(cpu_s: float, tasks: int) -> float | None:
    """CPU microseconds per task (None when no task ran)."""
    return cpu_s / tasks * 1e6 if tasks > 0 else None


def weighted_per_task_us(cpu_s: Sequence[float], tasks: Sequence[int]) -> float | None:
    """CPU microseconds per task over several controllers, each weighted by the tasks it ran: their CPU over
    their tasks (controllers that ran nothing are left out by the caller). None when no task ran."""
    n = sum(tasks)
    return sum(cpu_s) / n * 1e6 if n > 0 else None


def cpu_percent(cpu_s: float, wall_s: float) -> float:
    """CPU-seconds over a wall-clock interval as percent of one core."""
    return cpu_s / wall_s * 100.0 if wall_s > 0 else 0.0


def pick_victim(states: Sequence[ControllerState], turn: int) -> ControllerState | None:
    """The controller to kill on ``turn``: round robin over the controller numbers, skipping controllers that
    own no engine (or whose number is unknown); None when no controller owns an engine."""
    able = sorted((s for s in states if s.engines and s.number is not None), key=lambda s: s.number or 0)
    if not able:
        return None
    numbers = sorted({s.number for s in states if s.number is not None})
    for step in range(len(numbers)):
        want = numbers[(turn + step) % len(numbers)]
        for s in able:
            if s.number == want:
                return s
    return able[0]


def rehomed(owned: Iterable[int], states: Sequence[ControllerState], dead_pid: int) -> bool:
    """True when every engine id of ``owned`` is listed by a live controller other than ``dead_pid``."""
    listed = {e for s in states if s.pid != dead_pid for e in s.engines}
    return set(owned) <= listed


def milestones(progress: Sequence[tuple[float, int]], total: int,
               fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0)) -> dict[str, float | None]:
    """First time (s) the count in ``progress`` ((seconds, count) samples) reached each fraction of ``total``."""
    out: dict[str, float | None] = {}
    for f in fractions:
        need = math.ceil(total * f)
        out[f"{round(f * 100)}%"] = next((t for t, n in progress if n >= need), None)
    return out


def p50(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# -- measuring -----------------------------------------------------------------------------------


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """User + system CPU-seconds of each live process of ``pids`` (gone ones are left out)."""
    import psutil

    out: dict[int, float] = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[pid] = float(t.user + t.system)
    return out


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_balanced(system: System, engines: int, controllers: int, timeout: float | None = None,
                  stable: float | None = None, status_timeout: float = 2.0,
                  ) -> tuple[bool, float, list[ControllerState]]:
    """Wait until ``controllers`` live controllers own ``engines`` engines evenly, unchanged for ``stable``
    seconds (default ``STABLE_S``), at most ``timeout`` seconds (default ``BALANCE_TIMEOUT_S``); each status
    request waits ``status_timeout`` seconds for the controllers' answers. Returns (balanced, seconds waited,
    last states)."""
    timeout = BALANCE_TIMEOUT_S if timeout is None else timeout
    stable = STABLE_S if stable is None else stable
    t0 = time.monotonic()
    since: float | None = None
    seen: tuple[tuple[int, tuple[int, ...]], ...] = ()
    states: list[ControllerState] = []
    while time.monotonic() - t0 < timeout:
        try:
            states = system.federation_status(timeout=status_timeout)
        except Exception:
            states = []
        key = tuple(sorted((s.pid, s.engines) for s in states))
        if len(states) == controllers and is_balanced([len(s.engines) for s in states], engines):
            if key != seen or since is None:
                seen, since = key, time.monotonic()
            elif time.monotonic() - since >= stable:
                return True, time.monotonic() - t0, states
        else:
            since = None
        time.sleep(BALANCE_POLL_S)
    return False, time.monotonic() - t0, states


def _states_json(states: Sequence[ControllerState]) -> list[dict[str, Any]]:
    return [{"number": s.number, "pid": s.pid, "id": s.cid, "engines": list(s.engines), "done": s.done}
            for s in states]


# -- federation ------------------------------------------------------------------------------------


def run_federation(system: System, sizes: Sizes) -> Measured:
    n_engines, n_tasks = sizes.federation_engines, sizes.federation_tasks
    figures: dict[str, float] = {}
    runs: dict[str, Any] = {}
    me = os.getpid()
    for k in FEDERATION_CONTROLLERS:
        t0 = time.perf_counter()
        system.start_federation(k, n_engines)
        start_s = time.perf_counter() - t0
        balanced, settle_s, _ = wait_balanced(system, n_engines, k)
        system.apply_burst(min(100, n_tasks))  # warm-up (every controller's path to its engines)
        before = system.federation_status()
        pids = [s.pid for s in before]
        cpu0 = cpu_seconds([*pids, me])
        t0 = time.perf_counter()
        system.apply_burst(n_tasks)
        dt = time.perf_counter() - t0
        cpu1 = cpu_seconds([*pids, me])
        after = {s.pid: s for s in system.federation_status()}
        rows: list[dict[str, Any]] = []
        for s in before:
            a = after.get(s.pid)
            tasks = (a.done - s.done) if a is not None else 0
            cpu = cpu1.get(s.pid, math.nan) - cpu0.get(s.pid, math.nan)
            rows.append({"controller": s.number, "pid": s.pid, "engines": len(s.engines),
                         "engines_after": len(a.engines) if a is not None else None, "tasks": tasks,
                         "cpu_s": cpu, "cpu_us_per_task": per_task_us(cpu, tasks)})
        counted = sum(r["tasks"] for r in rows)
        expected = expected_shares([r["engines"] for r in rows], counted)
        for r, e in zip(rows, expected, strict=True):
            r["expected_tasks"] = e
        ran = [r for r in rows if r["tasks"] > 0 and not math.isnan(r["cpu_s"])]
        per_ctrl = [r["cpu_us_per_task"] for r in ran]
        ctrl_cpu = sum(r["cpu_s"] for r in rows if not math.isnan(r["cpu_s"]))
        figures[f"tasks_per_s_{k}c"] = n_tasks / dt
        weighted = weighted_per_task_us([r["cpu_s"] for r in ran], [r["tasks"] for r in ran])
        if weighted is not None:
            figures[f"ctrl_cpu_us_per_task_{k}c"] = weighted
        deviation = share_deviation([r["tasks"] for r in rows], [r["engines"] for r in rows])
        # The same share when the engines, not the controllers, bound the rate (tasks that sleep): no-op shares
        # follow how much CPU each controller gets from a 2-core host; these show how work is spread.
        mid = system.federation_status()
        system.sleep_burst(BUSY_TASKS_PER_ENGINE * n_engines, BUSY_SLEEP_S)
        end = {s.pid: s for s in system.federation_status()}
        busy = [(end[s.pid].done - s.done) if s.pid in end else 0 for s in mid]
        busy_deviation = share_deviation(busy, [len(s.engines) for s in mid])
        if k > 1:
            figures[f"share_dev_pct_{k}c"] = deviation * 100.0
            figures[f"share_dev_busy_pct_{k}c"] = busy_deviation * 100.0
        runs[str(k)] = {
            "controllers": k, "start_s": start_s, "balanced": balanced, "settle_s": settle_s, "seconds": dt,
            "tasks_counted": counted, "share_deviation": deviation, "per_controller": rows,
            "busy_tasks": busy, "busy_share_deviation": busy_deviation,
            "engines_moved_during_burst": any(r["engines_after"] != r["engines"] for r in rows),
            "ctrl_cpu_us_per_task_all": per_task_us(ctrl_cpu, n_tasks),
            "ctrl_cpu_us_per_task_max": max(per_ctrl) if per_ctrl else None,
            # what the controllers could sustain if each had a core to itself (the client is not counted)
            "ctrl_bound_tasks_per_s": sum(1e6 / u for u in per_ctrl) if per_ctrl and min(per_ctrl) > 0 else None,
            "client_cpu_us_per_task": per_task_us(cpu1.get(me, 0.0) - cpu0.get(me, 0.0), n_tasks),
        }
    return figures, {"engines": n_engines, "tasks": n_tasks, "runs": runs}


# -- engines_10k -----------------------------------------------------------------------------------


def run_engines_10k(system: System, sizes: Sizes) -> Measured:
    n = sizes.sim_engines
    heartbeat = sizes.sim_heartbeat_ms / 1000.0 if sizes.sim_heartbeat_ms > 0 else None
    t0 = time.perf_counter()
    system.start_federation(sizes.sim_controllers, 0, heartbeat=heartbeat)
    start_s = time.perf_counter() - t0
    target = system.sim_target()
    figures: dict[str, float] = {}
    extra: dict[str, Any] = {"engines": n, "controllers": sizes.sim_controllers, "heartbeat_s": target.heartbeat,
                             "cluster_start_s": start_s}
    with SimFleet(target, n, sizes.sim_per_process) as fleet:
        extra.update(processes=len(fleet.plan), per_process=fleet.plan, fd_limit=fleet.fd_limit)
        fleet.start()
        t0 = time.monotonic()
        progress: list[tuple[float, int]] = []
        register_s: float | None = None
        peak = 0
        while (el := time.monotonic() - t0) < sizes.sim_register_timeout_s:
            seen = system.engine_count()
            peak = max(peak, seen)
            progress.append((round(el, 2), seen))
            if seen >= n:
                register_s = el
                break
            if fleet.dead():
                raise RuntimeError(f"simulator process(es) exited during registration: {fleet.dead()}")
            time.sleep(0.1)
        extra.update(registered_all=register_s is not None, peak_seen=peak, progress=progress[::5] + progress[-1:],
                     milestones=milestones(progress, n))
        figures["engines_registered"] = float(n if register_s is not None else peak)
        if register_s is not None:
            figures["register_s"] = register_s
        time.sleep(SETTLE_S)
        balanced, settle_s, _ = wait_balanced(system, n, sizes.sim_controllers, timeout=BALANCE_10K_TIMEOUT_S,
                                              status_timeout=10.0)  # (10,000 engines' status, on a busy host)
        extra.update(balanced=balanced, settle_s=SETTLE_S + settle_s, registration_counters={
            k: v for k, v in fleet.totals().items() if not isinstance(v, list)})
        states = system.federation_status(timeout=30.0)
        ctrl = [s.pid for s in states]
        sims = fleet.pids
        st0 = fleet.statuses()
        c0, tot0, w0 = cpu_seconds([*ctrl, *sims]), sum_statuses(st0), time.monotonic()
        seen_min, seen_max = n, 0
        while time.monotonic() - w0 < sizes.sim_window_s:
            seen = system.engine_count()
            seen_min, seen_max = min(seen_min, seen), max(seen_max, seen)
            time.sleep(0.25)
        st1 = fleet.statuses()
        c1, tot1, wall = cpu_seconds([*ctrl, *sims]), sum_statuses(st1), time.monotonic() - w0
        d = diff_counters(tot0, tot1)
        answered = rate(st0, st1, "heartbeat_acks")  # (per second of the simulators' own clocks)
        ctrl_cpu = {p: c1[p] - c0[p] for p in ctrl if p in c0 and p in c1}
        sim_cpu = {p: c1[p] - c0[p] for p in sims if p in c0 and p in c1}
        pct = [cpu_percent(v, wall) for v in ctrl_cpu.values()]
        figures["ctrl_cpu_pct_sum"] = sum(pct)
        if pct:
            figures["ctrl_cpu_pct_max"] = max(pct)
        if answered is not None:
            figures["heartbeats_per_s"] = answered
            if answered > 0:
                figures["ctrl_cpu_us_per_heartbeat"] = sum(ctrl_cpu.values()) / wall / answered * 1e6
        after = {s.pid: s for s in system.federation_status(timeout=30.0)}
        extra["window"] = {
            "seconds": wall, "nominal_heartbeats_per_s": n / target.heartbeat,
            "per_controller": [{"controller": s.number, "pid": s.pid, "engines": len(s.engines),
                                "engines_after": len(after[s.pid].engines) if s.pid in after else None,
                                "cpu_pct": cpu_percent(ctrl_cpu.get(s.pid, 0.0), wall)} for s in states],
            "sim_cpu_pct": [cpu_percent(v, wall) for v in sim_cpu.values()],
            "client_saw_min": seen_min, "client_saw_max": seen_max,
            "heartbeat_rtt_ms_p50": bucket_percentile(d.get("latency_ms", []), 50),
            "heartbeat_rtt_ms_p99": bucket_percentile(d.get("latency_ms", []), 99),
            "sim_loop_ms_p99": bucket_percentile(d.get("loop_ms", []), 99),
            "counters": {k: v for k, v in d.items() if v and not isinstance(v, list)},
            "loadavg": list(os.getloadavg()),
        }
        # Proof that the simulated engines work: a small map through the load-balanced view.
        m = min(1000, n)
        t1 = time.perf_counter()
        tasks0 = int(fleet.totals().get("tasks", 0))
        try:
            system.map_noop(m)
            extra["map"] = {"elements": m, "seconds": time.perf_counter() - t1}
        except Exception as exc:  # (recorded: the CPU figures above stand on their own)
            extra["map"] = {"elements": m, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        time.sleep(2 * STATUS_EVERY_S)  # (the simulators' status files catch up)
        extra["map"]["tasks_answered"] = int(fleet.totals().get("tasks", 0)) - tasks0
        extra["sims"] = [{k: st.get(k) for k in ("pid", "count", "registered", "all_registered_s", "fds", "states")}
                         for st in fleet.statuses()]
        extra["totals"] = {k: v for k, v in fleet.totals().items() if not isinstance(v, list)}
    return figures, extra


# -- failover --------------------------------------------------------------------------------------


def _futures_done_at(futures: Sequence[Future[Any]]) -> list[float]:
    """A list that receives the monotonic time at which each future completes."""
    done: list[float] = []
    for f in futures:
        f.add_done_callback(lambda _f: done.append(time.monotonic()))
    return done


def run_failover(system: System, sizes: Sizes) -> Measured:
    t0 = time.perf_counter()
    system.start_federation(FAILOVER_CONTROLLERS, FAILOVER_ENGINES)
    start_s = time.perf_counter() - t0
    balanced, settle_s, _ = wait_balanced(system, FAILOVER_ENGINES, FAILOVER_CONTROLLERS)
    kills: list[dict[str, Any]] = []
    for turn in range(sizes.failover_kills):
        states = system.federation_status()
        victim = pick_victim(states, turn)
        if victim is None or victim.number is None:
            raise RuntimeError(f"no controller owns an engine to kill: {_states_json(states)}")
        futures = system.submit_sleeps(SLEEPS_PER_ENGINE * FAILOVER_ENGINES, SLEEP_S)
        done_at = _futures_done_at(futures)
        time.sleep(DISPATCH_S)  # (the tasks reach their engines)
        t_kill = time.monotonic()
        system.kill_controller(victim.number)
        rehome_s: float | None = None
        polls = 0
        while time.monotonic() - t_kill < REHOME_TIMEOUT_S:
            t_poll = time.monotonic()
            polls += 1
            try:
                now_states = system.federation_status(timeout=POLL_TIMEOUT_S)
            except Exception:
                now_states = []  # (no controller answered in time)
            if rehomed(victim.engines, now_states, victim.pid):
                rehome_s = t_poll - t_kill  # (the state the answers describe is that of when the poll went out)
                break
            time.sleep(max(0.0, POLL_S - (time.monotonic() - t_poll)))
        left = max(1.0, REHOME_TIMEOUT_S - (time.monotonic() - t_kill))
        wait_futures(futures, timeout=left)
        failed = sum(1 for f in futures if f.done() and f.exception() is not None)
        results_s = max(done_at) - t_kill if len(done_at) == len(futures) else None
        t_restart = time.monotonic()
        new_pid = system.restart_controller_number(victim.number)
        back = wait_until(functools.partial(_listed, system, new_pid), 30.0, 0.1)
        back_s = time.monotonic() - t_restart
        rebalanced, rebalance_s = False, None
        if turn + 1 < sizes.failover_kills:  # (the next kill wants the engines spread evenly again)
            rebalanced, rebalance_s, _ = wait_balanced(system, FAILOVER_ENGINES, FAILOVER_CONTROLLERS)
        kills.append({"turn": turn, "controller": victim.number, "pid": victim.pid, "engines": list(victim.engines),
                      "rehome_s": rehome_s, "polls": polls, "results_s": results_s,
                      "tasks": len(futures), "tasks_failed": failed, "restart_back_s": back_s if back else None,
                      "rebalanced": rebalanced, "rebalance_s": rebalance_s})
    rehome = [k["rehome_s"] for k in kills if k["rehome_s"] is not None]
    results = [k["results_s"] for k in kills if k["results_s"] is not None]
    if not rehome:
        raise RuntimeError(f"no kill was followed by its engines re-homing within {REHOME_TIMEOUT_S:.0f}s: {kills}")
    figures = {"rehome_p50_s": statistics.median(rehome), "rehome_max_s": max(rehome)}
    if results:
        figures["results_p50_s"] = statistics.median(results)
        figures["results_max_s"] = max(results)
    extra = {"controllers": FAILOVER_CONTROLLERS, "engines": FAILOVER_ENGINES, "start_s": start_s,
             "balanced_at_start": balanced, "settle_s": settle_s, "kills": kills,
             "not_rehomed": sum(1 for k in kills if k["rehome_s"] is None),
             "tasks_failed": sum(k["tasks_failed"] for k in kills)}
    return figures, extra


def _listed(system: System, pid: int) -> bool:
    """True when the controller with ``pid`` answers a status request."""
    try:
        return any(s.pid == pid for s in system.federation_status(timeout=1.0))
    except Exception:
        return False


RUNNERS: Mapping[str, Callable[[System, Sizes], Measured]] = {
    "federation": run_federation,
    "engines_10k": run_engines_10k,
    "failover": run_failover,
}


# -- markdown details (rendered under each scenario's table from a fedpar sample's extras) --------------


def _num(v: Any, unit: str = "") -> str:
    from benchmarks.report import fmt

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return (f"{v:,}" if isinstance(v, int) else fmt(float(v))) + unit


def details_federation(extra: Mapping[str, Any]) -> list[str]:
    lines = ["| controllers | tasks/s | controllers' CPU µs/task (all) | client CPU µs/task | tasks/s if each "
             "controller had a core | engines spread evenly |", "|---|---|---|---|---|---|"]
    runs = extra["runs"]
    for k, r in runs.items():
        lines.append(f"| {k} | {_num(r['tasks_counted'] / r['seconds'] if r['seconds'] else None)} | "
                     f"{_num(r['ctrl_cpu_us_per_task_all'])} | {_num(r['client_cpu_us_per_task'])} | "
                     f"{_num(r['ctrl_bound_tasks_per_s'])} | {'yes' if r['balanced'] else 'no'} |")
    lines += ["", "| controllers | controller | engines | tasks run | expected share | CPU µs/task |",
              "|---|---|---|---|---|---|"]
    for k, r in runs.items():
        for row in sorted(r["per_controller"], key=lambda x: (x["controller"] is None, x["controller"] or 0)):
            lines.append(f"| {k} | {row['controller']} | {row['engines']} | {row['tasks']:,} | "
                         f"{_num(row['expected_tasks'])} | {_num(row['cpu_us_per_task'])} |")
    return lines


def details_engines(extra: Mapping[str, Any]) -> list[str]:
    ms = extra.get("milestones", {})
    w = extra["window"]
    tot = extra.get("registration_counters", {})
    sims = extra.get("sims", [])
    fds = [s.get("fds") for s in sims if s.get("fds") is not None]
    split = ", ".join(map(str, extra["per_process"]))
    out = [
        f"- {extra['engines']:,} simulated engines in {extra['processes']} processes ({split}"
        f"; fd limit {extra['fd_limit']:,}, fds per process {', '.join(f'{f:,}' for f in fds) or '?'}), "
        f"{extra['controllers']} controllers, heartbeat every {extra['heartbeat_s']:g} s.",
        "- registration: the client saw " + ", ".join(f"{k} at {_num(v, ' s')}" for k, v in ms.items())
        + f" (most seen: {extra.get('peak_seen', 0):,}); by then {tot.get('redirects', 0):,} placement redirects, "
        f"{tot.get('moves', 0):,} moves, {tot.get('unknown_acks', 0):,} heartbeats answered 'unknown engine' "
        f"(declared dead, registered again); engines spread evenly before the window: "
        f"{'yes' if extra.get('balanced') else 'no'}.",
        f"- heartbeat window ({_num(w['seconds'], ' s')}): nominal {_num(w['nominal_heartbeats_per_s'])}/s; "
        f"round trip p50 ≤ {_num(w['heartbeat_rtt_ms_p50'], ' ms')}, p99 ≤ {_num(w['heartbeat_rtt_ms_p99'], ' ms')}; "
        f"the client saw {w['client_saw_min']:,}-{w['client_saw_max']:,} engines; simulators' CPU "
        + ", ".join(_num(v, "%") for v in w["sim_cpu_pct"]) + f"; load average {_num(w['loadavg'][0])}.",
    ]
    m = extra.get("map", {})
    outcome = (f"error {m['error']}" if "error" in m else
               f"{_num(m.get('seconds'), ' s')}, {m.get('tasks_answered', 0):,} tasks answered by simulated engines")
    out.append(f"- map of {m.get('elements', 0):,} no-ops: {outcome}.")
    out += ["", "| controller | engines | engines after | CPU % of a core |", "|---|---|---|---|"]
    for row in sorted(w["per_controller"], key=lambda r: (r["controller"] is None, r["controller"] or 0)):
        out.append(f"| {row['controller']} | {row['engines']:,} | {_num(row['engines_after'])} | "
                   f"{_num(row['cpu_pct'])} |")
    return out


def details_failover(extra: Mapping[str, Any]) -> list[str]:
    out = ["| kill | controller | its engines | re-homed s | waiting results s | tasks failed | back after restart s "
           "| spread evenly again s |", "|---|---|---|---|---|---|---|---|"]
    for k in extra["kills"]:
        out.append(f"| {k['turn'] + 1} | {k['controller']} | {', '.join(map(str, k['engines']))} | "
                   f"{_num(k['rehome_s'])} | {_num(k['results_s'])} | {k['tasks_failed']}/{k['tasks']} | "
                   f"{_num(k['restart_back_s'])} | {_rebalanced(k)} |")
    return out


def _rebalanced(kill: Mapping[str, Any]) -> str:
    if kill.get("rebalance_s") is None:
        return "not waited for"
    return _num(kill["rebalance_s"]) if kill.get("rebalanced") else "no"


DETAILS: Mapping[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "federation": details_federation,
    "engines_10k": details_engines,
    "failover": details_failover,
}
