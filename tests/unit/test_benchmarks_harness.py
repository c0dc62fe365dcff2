"""Unit tests of the benchmark harness's pure parts: stats, ratios, alternation order, markdown and
JSON rendering from fake samples, option parsing, and one in-process run with a fake system.

No cluster and no subprocess is started here, and no timing is asserted.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package: import it from the repo
    sys.path.insert(0, str(ROOT))

from benchmarks import cli, federation, harness, report, scenarios, simengines  # noqa: E402
from benchmarks.harness import RunConfig, Sample  # noqa: E402
from benchmarks.memory import parse_status  # noqa: E402
from benchmarks.scenarios import SCENARIOS, Sizes, batches, percentile  # noqa: E402
from benchmarks.systems import NotApplicable, Probe, System  # noqa: E402
from benchmarks.systems.base import NO_FEDERATION, Array, ControllerState  # noqa: E402

# -- helpers -------------------------------------------------------------------------------------


def sample(scenario: str, system: str, repeat: int, status: str = "ok", **figures: float) -> Sample:
    s = harness.new_sample(scenario, repeat, system)
    s.update(status=status, figures=dict(figures))
    return s


def probes(*unavailable: str) -> dict[str, Probe]:
    out: dict[str, Probe] = {}
    for name in ("fedpar", "ipyparallel", "dask", "ray"):
        if name in unavailable:
            out[name] = Probe(name, False, "not installed")
        else:
            out[name] = Probe(name, True, "available", {name: "1.0"})
    return out


def fake_doc(samples: list[Sample], scenarios: list[str], peers: list[str], **pr: Probe) -> dict[str, Any]:
    config = RunConfig(scenarios=scenarios, peers=peers, repeat=3, sizes=Sizes.quick(), quick=True)
    allp = probes()
    allp.update(pr)
    meta = {"date": "2026-01-01T00:00:00+00:00", "host": "h", "cpu_count": 2, "versions": {"x": "1"}}
    return report.build_results(meta, config, {k: allp[k] for k in config.systems}, samples)


# -- statistics ----------------------------------------------------------------------------------


def test_summarize_median_min_max() -> None:
    st = harness.summarize([3.0, 1.0, 2.0, 10.0])
    assert st == harness.Stats(median=2.5, min=1.0, max=10.0, n=4)
    assert harness.summarize([5]) == harness.Stats(5.0, 5.0, 5.0, 1)
    assert harness.summarize([]) is None


def test_ratio_is_fedpar_over_peer() -> None:
    assert harness.ratio(300.0, 100.0) == pytest.approx(3.0)
    assert harness.ratio(0.0, 2.0) == 0.0
    assert harness.ratio(None, 2.0) is None
    assert harness.ratio(2.0, None) is None
    assert harness.ratio(2.0, 0.0) is None  # meaningless: division by zero
    assert harness.ratio(2.0, -1.0) is None  # e.g. memory that shrank on the peer
    assert harness.ratio(-2.0, 1.0) is None


def test_percentile_matches_linear_interpolation() -> None:
    values = [float(v) for v in (7, 1, 3, 9, 5)]
    assert percentile(values, 50) == 5.0
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 9.0
    assert percentile(values, 99) == pytest.approx(8.92)
    assert percentile([4.0], 99) == 4.0
    np = pytest.importorskip("numpy")
    data = [float(x) for x in np.random.default_rng(1).random(101)]
    for q in (1, 25, 50, 90, 99):
        assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)))
    with pytest.raises(ValueError):
        percentile([], 50)


def test_batches() -> None:
    assert batches(25, 10) == [10, 10, 5]
    assert batches(10, 10) == [10]
    assert batches(0, 10) == []
    assert sum(batches(100_000, 10_000)) == 100_000


# -- scheduling ----------------------------------------------------------------------------------


def test_schedule_alternates_systems_within_each_repeat() -> None:
    plan = harness.schedule(["a", "b"], ["fedpar", "p1", "p2"], 2)
    assert plan == [
        ("a", 0, "fedpar"),
        ("a", 0, "p1"),
        ("a", 0, "p2"),
        ("a", 1, "fedpar"),
        ("a", 1, "p1"),
        ("a", 1, "p2"),
        ("b", 0, "fedpar"),
        ("b", 0, "p1"),
        ("b", 0, "p2"),
        ("b", 1, "fedpar"),
        ("b", 1, "p1"),
        ("b", 1, "p2"),
    ]
    systems_of_a = [sy for sc, _, sy in plan if sc == "a"]
    assert systems_of_a == ["fedpar", "p1", "p2"] * 2  # never all of one system in a row
    assert harness.schedule(["a"], ["fedpar"], 0) == []


def test_skip_reason() -> None:
    p = probes("ray")
    assert harness.skip_reason(p["ray"], "latency") == "not installed"
    assert harness.skip_reason(p["dask"], "latency") is None
    assert harness.skip_reason(p["dask"], "restart") == "n/a"
    assert harness.skip_reason(p["fedpar"], "restart") is None
    for name in ("federation", "engines_10k", "failover"):  # fedpar only: the peers have no federation
        assert harness.skip_reason(p["fedpar"], name) is None
        assert harness.skip_reason(p["dask"], name) == "n/a (no federation)"
        assert harness.skip_reason(p["ipyparallel"], name) == "n/a (no federation)"


# -- summary, ratios, status ---------------------------------------------------------------------


def test_summary_and_ratios_from_fake_samples() -> None:
    samples = [
        sample("throughput_apply", "fedpar", 0, tasks_per_s=900.0),
        sample("throughput_apply", "ipyparallel", 0, tasks_per_s=300.0),
        sample("throughput_apply", "fedpar", 1, tasks_per_s=1000.0),
        sample("throughput_apply", "ipyparallel", 1, status="error"),
        sample("throughput_apply", "fedpar", 2, tasks_per_s=1100.0),
        sample("throughput_apply", "ipyparallel", 2, tasks_per_s=500.0),
        sample("throughput_apply", "dask", 0, status="not installed"),
    ]
    summ = harness.summary(samples, ["fedpar", "ipyparallel", "dask"], ["throughput_apply"])
    cell = summ["throughput_apply"]
    assert cell["fedpar"]["figures"]["tasks_per_s"] == {"median": 1000.0, "min": 900.0, "max": 1100.0, "n": 3}
    assert cell["ipyparallel"]["figures"]["tasks_per_s"]["median"] == 400.0
    assert (cell["ipyparallel"]["n_ok"], cell["ipyparallel"]["n_failed"]) == (2, 1)
    assert cell["ipyparallel"]["status"] == "ok"
    assert cell["dask"] == {"status": "not installed", "n_ok": 0, "n_failed": 0, "figures": {}}
    rat = harness.ratios(summ, ["ipyparallel", "dask"])
    assert rat["throughput_apply"]["ipyparallel"]["tasks_per_s"] == pytest.approx(2.5)
    assert rat["throughput_apply"]["dask"]["tasks_per_s"] is None


def test_sample_status() -> None:
    assert harness.sample_status([]) == "not run"
    assert harness.sample_status([sample("x", "s", 0, status="error"), sample("x", "s", 1)]) == "ok"
    assert harness.sample_status([sample("x", "s", 0, status="timeout")]) == "timeout"
    assert harness.sample_status([sample("x", "s", 0, status="n/a")]) == "n/a"


# -- rendering -----------------------------------------------------------------------------------


def latency_samples() -> list[Sample]:
    out = []
    for k, (f, d) in enumerate([(100.0, 400.0), (120.0, 500.0), (110.0, 600.0)]):
        out.append(sample("latency", "fedpar", k, median_us=f, p99_us=f * 2))
        out.append(sample("latency", "dask", k, median_us=d, p99_us=d * 2))
    return out


def test_markdown_table_from_fake_samples() -> None:
    samples = [
        *latency_samples(),
        sample("throughput_apply", "fedpar", 0, tasks_per_s=2000.0),
        sample("throughput_apply", "dask", 0, tasks_per_s=1000.0),
        harness.skipped_sample("latency", 0, "ray", "not installed"),
        harness.skipped_sample("throughput_apply", 0, "ray", "not installed"),
        harness.skipped_sample("restart", 0, "fedpar", "not available yet"),
        harness.skipped_sample("restart", 0, "dask", "n/a"),
    ]
    doc = fake_doc(
        samples,
        ["throughput_apply", "latency", "restart"],
        ["dask", "ray"],
        ray=Probe("ray", False, "not installed"),
    )
    md = report.render_markdown(doc, plots=["latency.png"])
    lines = md.splitlines()
    assert "## latency — Round-trip latency" in lines
    header = next(line for line in lines if line.startswith("| system | median µs ↓"))
    assert "fedpar/peer (<1 = fedpar better)" in header
    assert "| fedpar | 110 (100-120) | — | 220 (200-240) | — |" in lines
    # dask median 500 -> ratio 110/500 = 0.22; p99 220/1000 = 0.22
    assert "| dask | 500 (400-600) | 0.22 | 1,000 (800-1,200) | 0.22 |" in lines
    assert "| ray | not installed | — | not installed | — |" in lines
    tp_header = next(line for line in lines if line.startswith("| system | tasks/s ↑"))
    assert "(>1 = fedpar better)" in tp_header
    assert "| fedpar | 2,000 | — |" in lines  # a single repeat shows no range
    assert "| dask | 1,000 | 2.00 |" in lines
    # No peer measured anything: no ratio columns, the statuses show instead of figures.
    assert "| system | restart s ↓ |" in lines
    assert "| fedpar | not available yet |" in lines
    assert "| dask | n/a |" in lines
    assert "![latency](latency.png)" in lines
    assert "![throughput_apply](throughput_apply.png)" not in lines
    assert "higher is better" in md and "lower is better" in md


def test_markdown_marks_errors() -> None:
    samples = [sample("latency", "fedpar", 0, status="error"), *latency_samples()[1::2]]
    doc = fake_doc(samples, ["latency"], ["dask"])
    md = report.render_markdown(doc)
    assert "| fedpar | error (see results.json) | — |" in md
    assert "fedpar repeat 1: error" in md
    assert "| dask | 500 (400-600) | — |" in md  # no fedpar figure: no ratio


def test_results_json_shape() -> None:
    samples = latency_samples()
    samples[0]["extra"] = {"samples_us": [1.0, 2.0, 3.0]}
    doc = fake_doc(samples, ["latency"], ["dask"])
    back = json.loads(json.dumps(doc))
    assert set(back) == {
        "schema",
        "metadata",
        "config",
        "systems",
        "scenarios",
        "samples",
        "summary",
        "ratios",
    }
    assert back["schema"] == report.SCHEMA
    assert back["config"]["systems"] == ["fedpar", "dask"]
    assert back["config"]["sizes"]["apply_tasks"] == Sizes.quick().apply_tasks
    assert len(back["samples"]) == 6  # every raw sample is kept
    assert back["samples"][0]["extra"]["samples_us"] == [1.0, 2.0, 3.0]
    for s in back["samples"]:
        assert {"scenario", "system", "repeat", "status", "figures", "extra", "notes", "error"} <= set(s)
    fig = back["scenarios"]["latency"]["figures"][0]
    assert fig == {"key": "median_us", "label": "median µs", "higher_is_better": False}
    assert back["summary"]["latency"]["dask"]["figures"]["p99_us"]["n"] == 3
    assert back["ratios"]["latency"]["dask"]["median_us"] == pytest.approx(110 / 500)
    assert back["systems"]["dask"] == {"available": True, "status": "available", "versions": {"dask": "1.0"}}


def test_write_all_and_rerender(tmp_path: Path) -> None:
    doc = fake_doc(latency_samples(), ["latency"], ["dask"])
    lines = report.write_all(tmp_path, doc)
    assert (tmp_path / "results.json").exists()
    md = (tmp_path / "results.md").read_text()
    assert "## latency" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any("plots skipped" in line for line in lines)
    else:
        assert (tmp_path / "latency.png").stat().st_size > 0
        assert "![latency](latency.png)" in md
    (tmp_path / "results.md").unlink()
    report.rerender(tmp_path)
    assert (tmp_path / "results.md").read_text() == md


def test_number_formatting() -> None:
    assert report.fmt(123456.7) == "123,457"
    assert report.fmt(123.4) == "123"
    assert report.fmt(12.34) == "12.3"
    assert report.fmt(1.234) == "1.23"
    assert report.fmt(0.01234) == "0.0123"
    assert report.fmt(0.0) == "0"
    assert report.fmt(None) == "—"
    assert report.fmt_ratio(2.0) == "2.00"
    assert report.fmt_ratio(0.002) == "0.002"
    assert report.fmt_ratio(None) == "—"


# -- parsing -------------------------------------------------------------------------------------


def test_parse_status() -> None:
    text = "Name:\tpython\nVmHWM:\t  2048 kB\nRssAnon:\t    1000 kB\nRssFile:\t 5 kB\nRssShmem:\t 0 kB\n"
    assert parse_status(text) == {"VmHWM": 2048 * 1024, "RssAnon": 1000 * 1024, "RssShmem": 0}
    assert parse_status("") == {}


def test_cli_parsing() -> None:
    assert cli.parse_peers("none") == []
    assert cli.parse_peers("") == []
    assert cli.parse_peers("all") == ["ipyparallel", "dask", "ray"]
    assert cli.parse_peers("dask, ray,dask") == ["dask", "ray"]
    with pytest.raises(Exception, match="unknown peer"):
        cli.parse_peers("spark")
    assert cli.parse_scenarios(None) == list(SCENARIOS)
    assert cli.parse_scenarios(["latency", "throughput_apply,latency"]) == ["throughput_apply", "latency"]
    assert cli.parse_scenarios(["failover,federation", "engines_10k"]) == ["federation", "engines_10k", "failover"]
    with pytest.raises(Exception, match="unknown scenario"):
        cli.parse_scenarios(["nope"])
    assert cli.parse_sizes(["apply_tasks=1_000", "batch=5"]) == {"apply_tasks": 1000, "batch": 5}
    with pytest.raises(Exception, match="NAME=INT"):
        cli.parse_sizes(["apply_tasks"])


def test_sizes() -> None:
    quick, full = Sizes.quick(), Sizes.full()
    assert full.apply_tasks == 10_000 and full.map_elements == 100_000
    assert full.latency_round_trips == 1_000 and full.payload_bytes == 100_000_000
    assert full.memory_tasks == 100_000 and full.restart_results == 100_000
    assert (full.sim_engines, full.sim_controllers, full.sim_window_s) == (10_000, 4, 10)
    assert (quick.sim_engines, quick.failover_kills, full.failover_kills) == (400, 3, 10)
    assert (quick.federation_engines, full.federation_engines) == (2, 4)
    assert quick.with_overrides({"sim_engines": 2_500}).sim_engines == 2_500
    assert quick.apply_tasks < full.apply_tasks and quick.payload_bytes < full.payload_bytes
    assert quick.with_overrides({"apply_tasks": 7}).apply_tasks == 7
    with pytest.raises(ValueError, match="unknown size"):
        quick.with_overrides({"nope": 1})


def test_every_scenario_is_described() -> None:
    for name, sc in SCENARIOS.items():
        assert sc.describe(Sizes.full()), name
        assert len({f.key for f in sc.figures}) == len(sc.figures)


# -- a whole run, in process, with fake systems (no processes are started) -----------------------


class FakeSystem(System):
    name: ClassVar[str] = "fedpar"
    module: ClassVar[str] = "json"
    dists: ClassVar[tuple[str, ...]] = ()
    unsupported: ClassVar[dict[str, str]] = {"federation": "not available yet"}
    calls: ClassVar[list[str]] = []

    def start(self, n_engines: int, scenario: str) -> None:
        self.calls.append(f"start {self.name} {scenario} {n_engines}")
        self._results: dict[str, Any] = {}

    def stop(self) -> None:
        self.calls.append(f"stop {self.name}")

    def controller_pids(self) -> list[int]:
        return [os.getpid()]

    def apply_burst(self, n: int) -> None:
        pass

    def map_noop(self, n: int) -> None:
        pass

    def round_trip(self) -> None:
        pass

    def push_pull(self, arr: Array) -> Array:
        return arr

    def identity_apply(self, arr: Array) -> Array:
        return arr

    def kilobyte_tasks(self, n: int, kb: int) -> None:
        pass

    def fill_results(self, n: int) -> tuple[str, Any]:
        self._results = {f"t{i}": i for i in range(n)}
        return "t1", 1

    def restart_controller(self) -> None:
        pass

    def fetch_result(self, task_id: str) -> Any:
        return self._results[task_id]


class FakePeer(FakeSystem):
    name: ClassVar[str] = "dask"
    unsupported: ClassVar[dict[str, str]] = {"restart": "n/a", **NO_FEDERATION}


class BrokenPeer(FakeSystem):
    name: ClassVar[str] = "ipyparallel"
    unsupported: ClassVar[dict[str, str]] = {"restart": "n/a", "federation": "n/a"}

    def round_trip(self) -> None:
        raise RuntimeError("boom")


@pytest.fixture
def fake_systems(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    classes: dict[str, type[System]] = {"fedpar": FakeSystem, "dask": FakePeer, "ipyparallel": BrokenPeer}

    def load(name: str) -> type[System]:
        return classes[name]

    def probe(name: str) -> Probe:
        if name == "ray":
            return Probe("ray", False, "not installed")
        return Probe(name, True, "available", {name: "0"})

    monkeypatch.setattr(harness, "load_system", load)
    monkeypatch.setattr(harness, "probe_system", probe)
    monkeypatch.setattr(scenarios, "SETTLE_BEFORE_S", 0.0)
    monkeypatch.setattr(scenarios, "SETTLE_AFTER_S", 0.0)
    FakeSystem.calls.clear()
    yield FakeSystem.calls


def test_run_in_process_with_fake_systems(tmp_path: Path, fake_systems: list[str]) -> None:
    config = RunConfig(
        scenarios=["throughput_apply", "latency", "controller_memory", "restart", "federation"],
        peers=["ipyparallel", "dask", "ray"],
        out_dir=tmp_path,
        quick=True,
        repeat=2,
        sizes=Sizes.quick().with_overrides({"memory_tasks": 10, "latency_round_trips": 5}),
        isolate=False,
        cooldown=0.0,
    )
    printed: list[str] = []
    results = harness.run(config, echo=printed.append)
    starts = [c for c in fake_systems if c.startswith("start")]
    # Alternation within each repeat, and every start has its stop.
    assert starts[:6] == [f"start {s} throughput_apply 2" for s in ("fedpar", "ipyparallel", "dask")] * 2
    assert len([c for c in fake_systems if c.startswith("stop")]) == len(starts)
    by = {(s["scenario"], s["system"], s["repeat"]): s for s in results["samples"]}
    assert by[("latency", "ipyparallel", 0)]["status"] == "error"
    assert "boom" in by[("latency", "ipyparallel", 0)]["error"]
    assert by[("throughput_apply", "dask", 1)]["status"] == "ok"
    assert by[("latency", "ray", 0)]["status"] == "not installed"
    assert ("latency", "ray", 1) not in by  # skipped systems are recorded once per scenario
    assert by[("restart", "dask", 0)]["status"] == "n/a"
    assert by[("restart", "fedpar", 1)]["status"] == "ok"
    assert by[("federation", "fedpar", 0)]["status"] == "not available yet"
    assert len(by[("latency", "fedpar", 0)]["extra"]["samples_us"]) == 5
    assert "controller_memory" in results["summary"]
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.md").exists()
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["summary"] == results["summary"]
    assert any("boom" in line for line in printed)


# -- federation scenarios: pure parts, and the runners on fake federations (no process is started) -----


def test_even_split_and_balance() -> None:
    assert federation.even_split(6, 3) == [2, 2, 2]
    assert federation.even_split(2, 4) == [1, 1, 0, 0]
    assert federation.even_split(10_000, 4) == [2_500] * 4
    assert federation.even_split(7, 0) == []
    assert federation.is_balanced([2, 2, 2], 6)
    assert federation.is_balanced([0, 1, 1, 0], 2)
    assert not federation.is_balanced([3, 1, 2], 6)
    assert not federation.is_balanced([2, 2, 1], 6)  # an engine is missing


def test_share_deviation() -> None:
    assert federation.expected_shares([1, 1], 1000) == [500.0, 500.0]
    assert federation.expected_shares([3, 1], 400) == [300.0, 100.0]
    assert federation.expected_shares([0, 0], 10) == [0.0, 0.0]
    assert federation.share_deviation([500, 500], [1, 1]) == 0.0
    assert federation.share_deviation([339, 661], [1, 1]) == pytest.approx(0.322)
    assert federation.share_deviation([300, 100], [3, 1]) == 0.0  # shares follow the engine counts
    assert federation.share_deviation([200, 200], [3, 1]) == pytest.approx(1.0)  # 200 vs 100 expected
    # A controller without engines should run nothing; what it ran counts against the average share.
    assert federation.share_deviation([32, 968, 0, 0], [1, 1, 0, 0]) == pytest.approx(0.936)
    assert federation.share_deviation([400, 400, 200, 0], [1, 1, 0, 0]) == pytest.approx(0.4)
    assert federation.share_deviation([0, 0], [1, 1]) == 0.0
    with pytest.raises(ValueError):
        federation.share_deviation([1], [1, 1])


def test_cpu_figures() -> None:
    assert federation.per_task_us(0.5, 10_000) == pytest.approx(50.0)
    assert federation.per_task_us(0.5, 0) is None
    # Weighted by tasks: (0.04 + 0.0) / (968 + 32) tasks, not the mean of 41 and 0 us.
    assert federation.weighted_per_task_us([0.04, 0.0], [968, 32]) == pytest.approx(40.0)
    assert federation.weighted_per_task_us([], []) is None
    assert federation.cpu_percent(2.5, 10.0) == pytest.approx(25.0)
    assert federation.cpu_percent(1.0, 0.0) == 0.0


def state(number: int | None, pid: int, engines: tuple[int, ...], done: int = 0) -> ControllerState:
    return ControllerState(number, pid, f"c{number}", engines, done)


def test_pick_victim_and_rehomed() -> None:
    states = [state(0, 10, (0, 1)), state(1, 11, ()), state(2, 12, (2, 3))]
    assert federation.pick_victim(states, 0) == states[0]
    assert federation.pick_victim(states, 1) == states[2]  # number 1 owns nothing: the next one
    assert federation.pick_victim(states, 2) == states[2]
    assert federation.pick_victim(states, 3) == states[0]  # round robin
    assert federation.pick_victim([state(0, 10, ()), state(None, 11, (1,))], 0) is None
    after = [state(1, 11, (0,)), state(2, 12, (1, 2, 3))]
    assert federation.rehomed((0, 1), after, dead_pid=10)
    assert not federation.rehomed((0, 1), [state(1, 11, (0,)), state(2, 12, (2, 3))], dead_pid=10)
    assert not federation.rehomed((0, 1), [state(0, 10, (0, 1))], dead_pid=10)  # the dead one does not count


def test_milestones() -> None:
    progress = [(0.1, 0), (0.5, 30), (1.0, 60), (2.0, 100)]
    assert federation.milestones(progress, 100) == {"25%": 0.5, "50%": 1.0, "75%": 2.0, "100%": 2.0}
    assert federation.milestones([(0.1, 10)], 100)["100%"] is None


def test_simengine_planning() -> None:
    assert simengines.plan_processes(10_000, 2_500, 20_000) == [2_500] * 4
    assert simengines.plan_processes(400, 200, 20_000) == [200, 200]
    assert simengines.plan_processes(401, 200, 20_000) == [134, 134, 133]
    # A low descriptor limit splits over more processes: (1024 - 256) // 2 = 384 engines each at most.
    plan = simengines.plan_processes(10_000, 2_500, 1024)
    assert max(plan) <= 384 and sum(plan) == 10_000
    assert simengines.plan_processes(0, 100, 20_000) == []
    with pytest.raises(ValueError):
        simengines.plan_processes(10, 10, 100)


def test_heartbeat_schedule() -> None:
    assert simengines.heartbeats_due(0.5, 1.0, 1000, 0) == 500  # spread evenly over the period
    assert simengines.heartbeats_due(0.5, 1.0, 1000, 450) == 50
    assert simengines.heartbeats_due(0.5, 1.0, 1000, 600) == 0
    assert simengines.heartbeats_due(3.0, 1.0, 100, 0) == 300  # (the caller caps a stall at one per engine)
    assert simengines.heartbeats_due(1.0, 0.0, 100, 0) == 0


def test_latency_histogram() -> None:
    edges = simengines.LATENCY_EDGES_MS
    assert simengines.bucket_of(0.3) == 0
    assert simengines.bucket_of(1.0) == 0
    assert simengines.bucket_of(1.5) == 1
    assert simengines.bucket_of(99_999) == len(edges)
    counts = [0] * (len(edges) + 1)
    for ms in [0.5] * 90 + [15.0] * 9 + [7_000.0]:
        counts[simengines.bucket_of(ms)] += 1
    assert simengines.bucket_percentile(counts, 50) == 1.0
    assert simengines.bucket_percentile(counts, 95) == 20.0
    assert simengines.bucket_percentile(counts, 100) == float("inf")
    assert simengines.bucket_percentile([0] * len(counts), 50) is None


def test_sim_status_sums_and_diffs() -> None:
    a = {"registered": 2, "fds": 10, "counters": {"heartbeat_acks": 5, "latency_ms": [1, 2], "errors": ["x"]}}
    b = {"registered": 3, "fds": -1, "counters": {"heartbeat_acks": 7, "latency_ms": [0, 1, 4]}}
    total = simengines.sum_statuses([a, b, {}])
    assert total == {"registered": 5, "fds": 10, "heartbeat_acks": 12, "latency_ms": [1, 3, 4]}
    later = dict(total, heartbeat_acks=20, latency_ms=[2, 3, 9])
    assert simengines.diff_counters(total, later) == {
        "registered": 0, "fds": 0, "heartbeat_acks": 8, "latency_ms": [1, 0, 5]}


def test_sim_rate_uses_each_process_clock() -> None:
    def st(written: float, acks: int) -> dict[str, Any]:
        return {"written": written, "counters": {"heartbeat_acks": acks}}

    a = [st(100.0, 0), st(100.4, 10)]
    b = [st(110.0, 25_000), st(110.4, 5_010)]
    assert simengines.rate(a, b, "heartbeat_acks") == pytest.approx(2_500 + 500)
    assert simengines.rate(a, a, "heartbeat_acks") is None  # nobody wrote again
    assert simengines.rate([{}], [{}], "heartbeat_acks") is None


class FakeFederation(FakeSystem):
    """Controllers as data: tasks follow the engines, an engine of a killed controller re-homes after two
    polls, a restarted controller gets a new pid."""

    unsupported: ClassVar[dict[str, str]] = {}
    polls_to_rehome: ClassVar[int] = 2

    def start_federation(self, controllers: int, engines: int, heartbeat: float | None = None) -> None:
        self.calls.append(f"federation {controllers} {engines}")
        split = federation.even_split(engines, controllers)
        ids = iter(range(engines))
        self.ctrls = {i: state(i, 100 + i, tuple(next(ids) for _ in range(split[i]))) for i in range(controllers)}
        self.dead: ControllerState | None = None
        self.polls = 0
        self.pending: list[Future[Any]] = []
        self.next_pid = 200

    def federation_status(self, timeout: float = 10.0) -> list[ControllerState]:
        if self.dead is not None:
            self.polls += 1
            if self.polls >= self.polls_to_rehome:  # the survivors take its engines
                heir = min(self.ctrls)
                old = self.ctrls[heir]
                self.ctrls[heir] = state(heir, old.pid, old.engines + self.dead.engines, old.done)
                self.dead = None
        return list(self.ctrls.values())

    def apply_burst(self, n: int) -> None:
        owners = [c for c in self.ctrls.values() if c.engines]
        total = sum(len(c.engines) for c in owners)
        for c in owners:
            self.ctrls[c.number or 0] = state(c.number, c.pid, c.engines, c.done + n * len(c.engines) // total)

    def kill_controller(self, number: int) -> int:
        self.dead = self.ctrls.pop(number)
        self.polls = 0
        for f in self.pending:
            f.set_result(0.5)
        return self.dead.pid

    def restart_controller_number(self, number: int) -> int:
        self.next_pid += 1
        self.ctrls[number] = state(number, self.next_pid, ())
        engines = sorted(e for c in self.ctrls.values() for e in c.engines)  # placement spreads them again
        for i, c in sorted(self.ctrls.items()):
            self.ctrls[i] = state(i, c.pid, tuple(engines[i::len(self.ctrls)]), c.done)
        return self.next_pid

    def submit_sleeps(self, n: int, seconds: float) -> list[Future[Any]]:
        self.pending = [Future() for _ in range(n)]
        return list(self.pending)

    def sleep_burst(self, n: int, seconds: float) -> None:
        self.apply_burst(n)


@pytest.fixture
def fast_federation(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    ticks = iter(range(1, 1_000_000))
    monkeypatch.setattr(federation, "cpu_seconds", lambda pids: {p: next(ticks) * 0.01 for p in pids})
    monkeypatch.setattr(federation, "STABLE_S", 0.0)
    monkeypatch.setattr(federation, "BALANCE_POLL_S", 0.0)
    monkeypatch.setattr(federation, "POLL_S", 0.0)
    monkeypatch.setattr(federation, "DISPATCH_S", 0.0)
    monkeypatch.setattr(federation, "BALANCE_TIMEOUT_S", 2.0)
    FakeSystem.calls.clear()
    yield


def test_federation_runner_on_a_fake(fast_federation: None) -> None:
    sizes = Sizes.quick().with_overrides({"federation_tasks": 1000, "federation_engines": 4})
    figures, extra = scenarios.run_scenario(FakeFederation(), "federation", sizes)
    assert [c for c in FakeSystem.calls if c.startswith("federation")] == [
        "federation 1 4", "federation 2 4", "federation 4 4"]
    assert {f.key for f in SCENARIOS["federation"].figures} == set(figures)
    assert figures["share_dev_pct_2c"] == 0.0 and figures["share_dev_pct_4c"] == 0.0
    assert figures["share_dev_busy_pct_2c"] == 0.0 and figures["share_dev_busy_pct_4c"] == 0.0
    assert all(figures[f"tasks_per_s_{k}c"] > 0 and figures[f"ctrl_cpu_us_per_task_{k}c"] > 0 for k in (1, 2, 4))
    run4 = extra["runs"]["4"]
    assert run4["balanced"] and run4["tasks_counted"] == 1000
    assert [r["tasks"] for r in run4["per_controller"]] == [250] * 4
    assert [r["expected_tasks"] for r in run4["per_controller"]] == [250.0] * 4
    md = federation.details_federation(extra)
    assert "| 4 | 3 | 1 | 250 | 250 |" in "\n".join(md)


def test_failover_runner_on_a_fake(fast_federation: None) -> None:
    figures, extra = scenarios.run_scenario(FakeFederation(), "failover", Sizes.quick())
    assert set(figures) == {"rehome_p50_s", "rehome_max_s", "results_p50_s", "results_max_s"}
    kills = extra["kills"]
    assert len(kills) == Sizes.quick().failover_kills
    assert [k["controller"] for k in kills] == [0, 1, 2]  # round robin over the controllers owning engines
    assert all(k["rehome_s"] is not None and k["polls"] == 2 for k in kills)
    assert all(k["tasks"] == 12 and k["tasks_failed"] == 0 for k in kills)
    assert extra["not_rehomed"] == 0
    assert figures["rehome_max_s"] >= figures["rehome_p50_s"] >= 0
    md = "\n".join(federation.details_failover(extra))
    assert md.startswith("| kill | controller |") and "| 3 | 2 |" in md


def test_federation_scenarios_are_fedpar_only(fast_federation: None) -> None:
    for name in ("federation", "engines_10k", "failover"):
        with pytest.raises(NotApplicable, match="no federation"):
            scenarios.run_scenario(FakePeer(), name, Sizes.quick())
    with pytest.raises(NotApplicable):  # a system that does not implement the federation methods
        scenarios.run_scenario(FakeSystem(), "failover", Sizes.quick())


def test_markdown_details_of_federation_scenarios(fast_federation: None) -> None:
    figures, extra = scenarios.run_scenario(FakeFederation(), "failover", Sizes.quick())
    ok = sample("failover", "fedpar", 0)
    ok.update(figures=figures, extra=extra)
    broken = sample("failover", "fedpar", 1)  # extras of another shape are skipped, not fatal
    broken["figures"] = figures
    doc = fake_doc([ok, broken, harness.skipped_sample("failover", 0, "dask", "n/a (no federation)")],
                   ["failover"], ["dask"])
    lines = report.render_markdown(doc).splitlines()
    assert "| system | re-homed p50 s ↓ | re-homed max s ↓ | waiting results p50 s ↓ | waiting results max s ↓ |" \
        in lines  # fedpar only: no ratio columns
    assert "| dask | n/a (no federation) | n/a (no federation) | n/a (no federation) | n/a (no federation) |" in lines
    assert "Details, fedpar repeat 1:" in lines and "Details, fedpar repeat 2:" not in lines
    assert any(line.startswith("| 1 | 0 | 0, 1 |") for line in lines)


def test_engines_10k_figures_declared() -> None:
    keys = [f.key for f in SCENARIOS["engines_10k"].figures]
    assert keys == ["register_s", "engines_registered", "ctrl_cpu_pct_sum", "ctrl_cpu_pct_max", "heartbeats_per_s",
                    "ctrl_cpu_us_per_heartbeat"]
    text = SCENARIOS["engines_10k"].describe(Sizes.full())
    assert "10,000 simulated engines" in text and "1 s" in text
    assert "every 250 ms" in SCENARIOS["engines_10k"].describe(Sizes.full().with_overrides({"sim_heartbeat_ms": 250}))
