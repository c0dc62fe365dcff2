"""Scheduling (systems alternate within each repeat), sample execution, and statistics.

Every sample (one scenario, one repeat, one system) gets a fresh cluster. By default it runs in
its own worker subprocess (``python -m benchmarks.worker``), in a new session and with a unique
``FEDPAR_BENCH_TAG`` in its environment, so that a hung or leaking system can be timed out and
everything it started killed by pid, without touching anything else on the machine.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.procs import TAG_VAR, descendants, is_runtime_helper, kill_group, kill_tagged, reap
from benchmarks.scenarios import SCENARIOS, Sizes, run_scenario
from benchmarks.systems import NotApplicable, Probe, load_system, probe_system

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent  # the repository root (holds benchmarks/)

OK = "ok"
FAILED = frozenset({"error", "timeout"})

Sample = dict[str, Any]
SampleView = Mapping[str, Any]  # a sample as read back (e.g. from results.json)


# -- configuration -------------------------------------------------------------------------------


@dataclass
class RunConfig:
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    peers: list[str] = field(default_factory=lambda: ["ipyparallel", "dask", "ray"])
    engines: int = 2
    out_dir: Path = Path("bench-out")
    quick: bool = False
    repeat: int = 3
    sizes: Sizes = field(default_factory=Sizes.full)
    timeout: float = 1800.0  # per sample, isolated mode only
    isolate: bool = True
    cooldown: float = 1.0  # seconds between samples, to let the machine settle
    options: dict[str, str] = field(default_factory=dict)  # adapter options, e.g. dask_scheduler

    @property
    def systems(self) -> list[str]:
        return ["fedpar", *self.peers]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["systems"] = self.systems
        return d


# -- scheduling and statistics (pure) ------------------------------------------------------------


def schedule(scenarios: Sequence[str], systems: Sequence[str], repeat: int) -> list[tuple[str, int, str]]:
    """(scenario, repeat index, system) in run order: per scenario, systems alternate each repeat.

    For systems A, B, C and 2 repeats: A0 B0 C0 A1 B1 C1, so that drift of the machine over time
    hits every system alike rather than all of one system's samples at once.
    """
    return [(sc, k, sy) for sc in scenarios for k in range(repeat) for sy in systems]


@dataclass(frozen=True)
class Stats:
    median: float
    min: float
    max: float
    n: int

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(values: Iterable[float]) -> Stats | None:
    """Median, min and max of ``values``; ``None`` when there are none."""
    vals = [float(v) for v in values]
    if not vals:
        return None
    return Stats(statistics.median(vals), min(vals), max(vals), len(vals))


def ratio(fedpar: float | None, peer: float | None) -> float | None:
    """fedpar median / peer median; ``None`` when either is missing or the ratio is meaningless.

    Meaningless: a peer value of zero or below, or a negative fedpar value (e.g. memory that
    shrank), where a quotient would not say which system did better.
    """
    if fedpar is None or peer is None or peer <= 0 or fedpar < 0:
        return None
    return fedpar / peer


def summary(samples: Sequence[SampleView], systems: Sequence[str], scenarios: Sequence[str]) -> dict[str, Any]:
    """``{scenario: {system: {"status", "n_ok", "n_failed", "figures": {key: Stats}}}}``."""
    out: dict[str, Any] = {}
    for sc in scenarios:
        figure_keys = [f.key for f in SCENARIOS[sc].figures] if sc in SCENARIOS else []
        per: dict[str, Any] = {}
        for sy in systems:
            mine = [s for s in samples if s["scenario"] == sc and s["system"] == sy]
            ok = [s for s in mine if s["status"] == OK]
            failed = [s for s in mine if s["status"] in FAILED]
            keys = figure_keys or sorted({k for s in ok for k in s["figures"]})
            figures: dict[str, Any] = {}
            for key in keys:
                st = summarize(s["figures"][key] for s in ok if key in s["figures"])
                if st is not None:
                    figures[key] = st.to_json()
            per[sy] = {
                "status": sample_status(mine),
                "n_ok": len(ok),
                "n_failed": len(failed),
                "figures": figures,
            }
        out[sc] = per
    return out


def sample_status(samples: Sequence[SampleView]) -> str:
    """One word for a scenario-system cell: ``ok``, a failure, or the reason it was skipped."""
    if not samples:
        return "not run"
    if any(s["status"] == OK for s in samples):
        return OK
    failed = [s["status"] for s in samples if s["status"] in FAILED]
    if failed:
        return str(failed[0])
    return str(samples[0]["status"])


def ratios(summ: dict[str, Any], peers: Sequence[str]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{scenario: {peer: {figure: fedpar median / peer median or None}}}``."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for sc, per in summ.items():
        fed = per.get("fedpar", {}).get("figures", {})
        out[sc] = {}
        for peer in peers:
            theirs = per.get(peer, {}).get("figures", {})
            keys = [f.key for f in SCENARIOS[sc].figures] if sc in SCENARIOS else sorted(theirs)
            out[sc][peer] = {k: ratio(fed.get(k, {}).get("median"), theirs.get(k, {}).get("median")) for k in keys}
    return out


def skipped_sample(scenario: str, repeat: int, system: str, status: str) -> Sample:
    return new_sample(scenario, repeat, system) | {"status": status}


def new_sample(scenario: str, repeat: int, system: str) -> Sample:
    return {
        "scenario": scenario,
        "system": system,
        "repeat": repeat,
        "status": "not run",
        "figures": {},
        "extra": {},
        "notes": {},
        "error": None,
        "startup_s": None,
        "stop_s": None,
        "wall_s": None,
        "started_at": None,
        "leftovers_killed": [],
    }


def skip_reason(probe: Probe, scenario: str) -> str | None:
    """Why ``scenario`` is not run on the probed system, or ``None`` if it is run."""
    if not probe.available:
        return probe.status
    reason = load_system(probe.name).unsupported.get(scenario)
    if reason is None and scenario in SCENARIOS and not SCENARIOS[scenario].figures:
        reason = "not available yet"
    return reason


# -- running one sample --------------------------------------------------------------------------


def run_sample(spec: dict[str, Any]) -> Sample:
    """Start the system, measure the scenario, ALWAYS stop it. Runs in the worker (or in-process)."""
    sample = new_sample(spec["scenario"], spec["repeat"], spec["system"])
    sample["started_at"] = datetime.now(UTC).isoformat()
    sizes = Sizes(**spec["sizes"])
    system = load_system(spec["system"])(spec.get("options", {}))
    wall0 = time.perf_counter()
    try:
        t0 = time.perf_counter()
        system.start(int(spec["engines"]), spec["scenario"])
        sample["startup_s"] = time.perf_counter() - t0
        figures, extra = run_scenario(system, spec["scenario"], sizes)
        sample.update(status=OK, figures=figures, extra=extra)
    except NotApplicable as exc:
        sample.update(status=str(exc) or "n/a")
    except Exception as exc:
        sample.update(status="error", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        started = [p for p in descendants() if not is_runtime_helper(p)]
        t0 = time.perf_counter()
        try:
            system.stop()
        except Exception as exc:
            log.exception("stopping %s failed", spec["system"])
            sample["notes"]["stop_error"] = f"{type(exc).__name__}: {exc}"
        sample["stop_s"] = time.perf_counter() - t0
        sample["leftovers_killed"] = reap(started, wait=5.0)
        sample["notes"].update(system.notes)
        sample["wall_s"] = time.perf_counter() - wall0
    return sample


def worker_env(tag: str) -> dict[str, str]:
    """Environment for a worker: the tag, and the repository root importable everywhere."""
    env = dict(os.environ)
    env[TAG_VAR] = tag
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def execute_isolated(spec: dict[str, Any], timeout: float, log_path: Path) -> Sample:
    """Run one sample in ``python -m benchmarks.worker``; kill everything tagged afterwards."""
    tag = str(spec["tag"])
    result_path = Path(spec["result_path"])
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)]
    timed_out = False
    rc: int | None = None
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=worker_env(tag),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:  # timed out or interrupted: ask politely, then kill
                kill_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    kill_group(proc.pid, signal.SIGKILL)
                    proc.wait()
            kill_group(proc.pid, signal.SIGKILL)
            leftovers = kill_tagged(tag)
    sample = new_sample(spec["scenario"], spec["repeat"], spec["system"])
    if result_path.exists():
        with contextlib.suppress(ValueError):
            sample = json.loads(result_path.read_text())
        result_path.unlink(missing_ok=True)
    if timed_out:
        sample.update(status="timeout", error=f"sample exceeded {timeout:.0f} s; see {log_path}")
    elif sample["status"] == "not run":
        sample.update(status="error", error=f"worker exited with code {rc} and no result; see {log_path}")
    sample["leftovers_killed"] = sorted(set(sample.get("leftovers_killed", [])) | set(leftovers))
    sample["log"] = str(log_path)
    return sample


def execute_inprocess(spec: dict[str, Any]) -> Sample:
    """Run one sample in this process (debugging; no timeout). Tagged leftovers are still killed."""
    tag = str(spec["tag"])
    saved = {k: os.environ.get(k) for k in (TAG_VAR, "PYTHONPATH")}
    os.environ.update({k: v for k, v in worker_env(tag).items() if k in saved})
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        sample = run_sample(spec)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        leftovers = kill_tagged(tag)
    sample["leftovers_killed"] = sorted(set(sample["leftovers_killed"]) | set(leftovers))
    return sample


def execute(spec: dict[str, Any], config: RunConfig, log_path: Path) -> Sample:
    """Run one sample as configured: in a worker subprocess (default) or in this process."""
    if config.isolate:
        return execute_isolated(spec, config.timeout, log_path)
    return execute_inprocess(spec)


# -- the whole run -------------------------------------------------------------------------------


def run(config: RunConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every scheduled sample, writing ``results.json`` as it goes; return the results."""
    from benchmarks import report

    out = Path(config.out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    probes = {name: probe_system(name) for name in config.systems}
    for p in probes.values():
        echo(f"{p.name:12s} {p.status}{'  ' + str(p.versions) if p.versions else ''}")
    metadata = report.collect_metadata(probes)
    samples: list[Sample] = []
    plan = schedule(config.scenarios, config.systems, config.repeat)
    counter = itertools.count(1)
    for scenario, rep, system in plan:
        reason = skip_reason(probes[system], scenario)
        if reason is not None:
            if rep == 0:
                samples.append(skipped_sample(scenario, rep, system, reason))
                echo(f"[{scenario}] {system}: {reason}")
            continue
        n = next(counter)
        spec = {
            "scenario": scenario,
            "repeat": rep,
            "system": system,
            "engines": config.engines,
            "sizes": asdict(config.sizes),
            "options": config.options,
            "tag": f"{run_id}-{n}",
            "result_path": str((out / "logs" / f".result-{run_id}-{n}.json").resolve()),
        }
        log_path = (out / "logs" / f"{scenario}-{system}-{rep}.log").resolve()
        echo(f"[{scenario}] repeat {rep + 1}/{config.repeat} {system} ...")
        sample = execute(spec, config, log_path)
        samples.append(sample)
        echo(f"[{scenario}] repeat {rep + 1}/{config.repeat} {system}: {describe_sample(sample)}")
        report.write_json(out, report.build_results(metadata, config, probes, samples))
        time.sleep(config.cooldown)
    metadata["finished"] = datetime.now(UTC).isoformat()
    metadata["loadavg_end"] = list(os.getloadavg())
    results = report.build_results(metadata, config, probes, samples)
    for line in report.write_all(out, results):
        echo(line)
    return results


def describe_sample(sample: Sample) -> str:
    if sample["status"] == OK:
        figs = ", ".join(f"{k}={v:.4g}" for k, v in sample["figures"].items())
        return f"{figs} (startup {sample['startup_s'] or 0:.1f} s, wall {sample['wall_s'] or 0:.1f} s)"
    err = (sample.get("error") or "").strip().splitlines()
    return f"{sample['status']}{': ' + err[0] if err else ''}"
