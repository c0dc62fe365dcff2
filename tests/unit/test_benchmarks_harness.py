"""Unit tests of the benchmark harness's pure parts: stats, ratios, alternation order, markdown and
JSON rendering from fake samples, option parsing, and one in-process run with a fake system.

No cluster and no subprocess is started here, and no timing is asserted.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package: import it from the repo
    sys.path.insert(0, str(ROOT))

from benchmarks import cli, harness, report, scenarios  # noqa: E402
from benchmarks.harness import RunConfig, Sample  # noqa: E402
from benchmarks.memory import parse_status  # noqa: E402
from benchmarks.scenarios import SCENARIOS, Sizes, batches, percentile  # noqa: E402
from benchmarks.systems import Probe, System  # noqa: E402
from benchmarks.systems.base import Array  # noqa: E402

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
    assert harness.skip_reason(p["fedpar"], "federation") == "not available yet"


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
        harness.skipped_sample("federation", 0, "fedpar", "not available yet"),
        harness.skipped_sample("federation", 0, "dask", "n/a"),
    ]
    doc = fake_doc(
        samples,
        ["throughput_apply", "latency", "federation"],
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
    assert "| fedpar | not available yet |" in lines
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
    unsupported: ClassVar[dict[str, str]] = {"restart": "n/a", "federation": "n/a"}


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
