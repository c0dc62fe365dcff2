"""Results: ``results.json`` (every raw sample + metadata), ``results.md`` and PNG plots."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.scenarios import SCENARIOS, Figure, Sizes
from benchmarks.systems import Probe
from benchmarks.systems.base import dist_version

if TYPE_CHECKING:
    from benchmarks.harness import RunConfig

SCHEMA = 1
PLOTS_PER_ROW = 4  # bar charts per row in a scenario's PNG
EXTRA_DISTS = ("numpy", "cloudpickle", "pyzmq", "psutil", "matplotlib")


# -- building the results document --------------------------------------------------------------


def collect_metadata(probes: Mapping[str, Probe]) -> dict[str, Any]:
    versions: dict[str, str] = {}
    for p in probes.values():
        versions.update(p.versions)
    for dist in EXTRA_DISTS:
        v = dist_version(dist)
        if v is not None:
            versions.setdefault(dist, v)
    return {
        "date": datetime.now(UTC).isoformat(),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_total_gb": _mem_total_gb(),
        "loadavg_start": list(os.getloadavg()),
        "versions": dict(sorted(versions.items())),
        "git_commit": _git_commit(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }


def build_results(
    metadata: Mapping[str, Any],
    config: RunConfig,
    probes: Mapping[str, Probe],
    samples: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The ``results.json`` document; everything the markdown and plots need is in it."""
    from benchmarks.harness import ratios, summary

    summ = summary(samples, config.systems, config.scenarios)
    return {
        "schema": SCHEMA,
        "metadata": dict(metadata),
        "config": config.to_json(),
        "systems": {
            name: {"available": p.available, "status": p.status, "versions": p.versions} for name, p in probes.items()
        },
        "scenarios": {name: scenario_info(name, config.sizes) for name in config.scenarios},
        "samples": [dict(s) for s in samples],
        "summary": summ,
        "ratios": ratios(summ, config.peers),
    }


def scenario_info(name: str, sizes: Sizes) -> dict[str, Any]:
    sc = SCENARIOS[name]
    return {
        "title": sc.title,
        "description": sc.describe(sizes),
        "figures": [{"key": f.key, "label": f.label, "higher_is_better": f.higher_is_better} for f in sc.figures],
    }


# -- markdown ------------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    """A compact human number: 12,345 / 123 / 12.3 / 1.23 / 0.0123."""
    if value is None:
        return "—"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    if a == 0:
        return "0"
    return f"{value:.3g}"


def fmt_ratio(value: float | None) -> str:
    """Two decimals, or two significant digits below 0.1 (so 0.002 does not show as 0.00)."""
    if value is None:
        return "—"
    if value == 0 or abs(value) >= 0.1:
        return f"{value:.2f}"
    return f"{value:.2g}"


def _figures(info: Mapping[str, Any]) -> list[Figure]:
    return [Figure(f["key"], f["label"], bool(f["higher_is_better"])) for f in info["figures"]]


def _cell(cell: Mapping[str, Any], key: str) -> str:
    st = cell.get("figures", {}).get(key)
    if st is None:
        status = str(cell.get("status", "not run"))
        if status == "ok":
            return "—"  # (measured, but this figure could not be taken: see the details or results.json)
        return "error (see results.json)" if status == "error" else status
    text = fmt(st["median"])
    if st["n"] > 1:
        text += f" ({fmt(st['min'])}-{fmt(st['max'])})"
    return text


def render_markdown(doc: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    md = doc["metadata"]
    cfg = doc["config"]
    systems: list[str] = list(cfg["systems"])
    lines = [
        "# fedpar benchmark results",
        "",
        f"- date: {md.get('date', '?')} — host `{md.get('host', '?')}`, {md.get('cpu_count', '?')} CPUs "
        f"({md.get('cpu_model') or 'unknown CPU'}), {md.get('memory_total_gb', '?')} GB RAM, "
        f"Python {md.get('python', '?')}, load average at start {_loadavg(md.get('loadavg_start'))}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in md.get('versions', {}).items()) or '?'}",
        f"- engines/workers: {cfg['engines']}; repeats: {cfg['repeat']} (systems alternate within each "
        f"repeat); {'quick sizes' if cfg['quick'] else 'full sizes'}; each sample on a fresh cluster",
        "- systems: " + ", ".join(f"{name} ({info['status']})" for name, info in doc.get("systems", {}).items()),
        "",
        "Values are medians over the repeats, with (min-max) when there was more than one. "
        "↑: higher is better; ↓: lower is better. **fedpar/peer** is fedpar's median divided by "
        "the peer's: for ↑ figures a ratio above 1 favours fedpar, for ↓ figures a ratio below 1 does.",
        "",
    ]
    for name, info in doc["scenarios"].items():
        lines += [f"## {name} — {info['title']}", "", info["description"], ""]
        figures = _figures(info)
        per = doc["summary"].get(name, {})
        if not figures:
            lines += ["| system | status |", "|---|---|"]
            lines += [f"| {sy} | {per.get(sy, {}).get('status', 'not run')} |" for sy in systems]
            lines.append("")
            continue
        # Ratio columns only where a peer measured something (not for fedpar-only scenarios or runs).
        compared = any(per.get(sy, {}).get("figures") for sy in systems if sy != "fedpar")
        header = ["system"]
        for f in figures:
            better = ">1" if f.higher_is_better else "<1"
            header += [f"{f.label} {f.arrow}"] + ([f"fedpar/peer ({better} = fedpar better)"] if compared else [])
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for sy in systems:
            cell = per.get(sy, {})
            row = [sy]
            for f in figures:
                row.append(_cell(cell, f.key))
                if compared:
                    r = doc["ratios"].get(name, {}).get(sy, {}).get(f.key)
                    row.append("—" if sy == "fedpar" else fmt_ratio(r))
            lines.append("| " + " | ".join(row) + " |")
        notes = _notes(doc, name)
        if notes:
            lines += ["", "Notes: " + "; ".join(notes) + "."]
        lines += _details(doc, name)
        plot = f"{name}.png"
        if plot in plots:
            lines += ["", f"![{name}]({plot})"]
        lines.append("")
    if not plots:
        lines += [str(doc.get("plots_notice") or "No plots."), ""]
    return "\n".join(lines)


def _notes(doc: Mapping[str, Any], scenario: str) -> list[str]:
    notes: list[str] = []
    seen: set[str] = set()
    for s in doc["samples"]:
        if s["scenario"] != scenario:
            continue
        for k, v in sorted(s.get("notes", {}).items()):
            text = f"{s['system']} {k}: {v}"
            if text not in seen:
                seen.add(text)
                notes.append(text)
        if s["status"] in ("error", "timeout"):
            text = f"{s['system']} repeat {s['repeat'] + 1}: {s['status']}"
            if text not in seen:
                seen.add(text)
                notes.append(text)
        if s.get("leftovers_killed"):
            text = f"{s['system']} left processes behind that the harness killed"
            if text not in seen:
                seen.add(text)
                notes.append(text)
    return notes


def _details(doc: Mapping[str, Any], scenario: str) -> list[str]:
    """Extra markdown for the scenarios that have it (``benchmarks.federation.DETAILS``), from each successful
    fedpar sample's extras; nothing for extras of another shape (e.g. an older results.json)."""
    from benchmarks.federation import DETAILS

    render = DETAILS.get(scenario)
    if render is None:
        return []
    out: list[str] = []
    for s in doc["samples"]:
        if s["scenario"] != scenario or s["system"] != "fedpar" or s["status"] != "ok":
            continue
        try:
            body = render(s.get("extra", {}))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            continue
        out += ["", f"Details, fedpar repeat {s['repeat'] + 1}:", "", *body]
    return out


def _loadavg(value: Any) -> str:
    if not value:
        return "?"
    return "/".join(f"{v:.2f}" for v in value)


# -- plots ---------------------------------------------------------------------------------------


def write_plots(doc: Mapping[str, Any], out: Path) -> tuple[list[str], str | None]:
    """One PNG per scenario with data: a bar per system (median) with min-max error bars.

    Returns the file names written and a notice when plotting was skipped.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: plots skipped."
    written: list[str] = []
    systems: list[str] = list(doc["config"]["systems"])
    for name, info in doc["scenarios"].items():
        figures = _figures(info)
        per = doc["summary"].get(name, {})
        if not figures or not any(per.get(sy, {}).get("figures") for sy in systems):
            continue
        cols = min(len(figures), PLOTS_PER_ROW)
        rows = -(-len(figures) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
        flat = [ax for row in axes for ax in row]
        for ax in flat[len(figures):]:
            ax.set_visible(False)
        for ax, f in zip(flat, figures, strict=False):
            names, med, lo, hi = [], [], [], []
            for sy in systems:
                st = per.get(sy, {}).get("figures", {}).get(f.key)
                if st is None:
                    continue
                names.append(sy)
                med.append(st["median"])
                lo.append(st["median"] - st["min"])
                hi.append(st["max"] - st["median"])
            colors = ["#d62728" if n == "fedpar" else "#1f77b4" for n in names]
            ax.bar(names, med, yerr=[lo, hi], capsize=4, color=colors)
            ax.set_title(f"{f.label} ({'higher' if f.higher_is_better else 'lower'} is better)", fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{name}: {info['title']}", fontsize=10)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    return written, None


# -- writing -------------------------------------------------------------------------------------


def write_json(out: Path, doc: Mapping[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)
    return path


def write_all(out: Path, doc: dict[str, Any]) -> list[str]:
    """Write results.json, the plots and results.md; return human-readable lines about it."""
    plots, notice = write_plots(doc, out)
    if notice:
        doc["plots_notice"] = notice
    json_path = write_json(out, doc)
    md_path = out / "results.md"
    md_path.write_text(render_markdown(doc, plots))
    lines = [f"wrote {json_path}", f"wrote {md_path}"]
    lines += [f"wrote {out / p}" for p in plots]
    if notice:
        lines.append(notice)
    return lines


def rerender(out: Path) -> list[str]:
    """Re-create results.md and the plots from an existing results.json."""
    doc = json.loads((out / "results.json").read_text())
    return write_all(out, doc)


# -- host facts ----------------------------------------------------------------------------------


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) * 1024 / 1e9, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git_commit() -> str | None:
    """The checked-out commit (read-only ``git rev-parse``), if there is one."""
    root = Path(__file__).resolve().parent.parent
    try:
        res = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None
