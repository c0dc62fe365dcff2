"""Command line: ``python -m benchmarks run|list|report`` (``fedpar bench`` calls :func:`main`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.scenarios import SCENARIOS, Sizes
from benchmarks.systems import PEERS, SYSTEMS, probe_system

EXIT_OK = 0
EXIT_FAILED_SAMPLES = 1
EXIT_USAGE = 2
EXIT_FEDPAR_UNAVAILABLE = 3


def split_list(values: Sequence[str] | None) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (repeatable and comma-separated options)."""
    out: list[str] = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def parse_peers(text: str) -> list[str]:
    """``"ipyparallel,dask"`` -> peers; ``"none"`` or ``""`` -> no peers; ``"all"`` -> every peer."""
    names = split_list([text])
    if not names or names == ["none"]:
        return []
    if names == ["all"]:
        return list(PEERS)
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}, none, all")
    return list(dict.fromkeys(names))


def parse_scenarios(values: Sequence[str] | None) -> list[str]:
    names = split_list(values) or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    # Run in the canonical order, once each.
    return [n for n in SCENARIOS if n in names]


def parse_sizes(values: Sequence[str] | None) -> dict[str, int]:
    """``["apply_tasks=500", "batch=100"]`` -> ``{"apply_tasks": 500, "batch": 100}``."""
    out: dict[str, int] = {}
    for item in split_list(values):
        key, sep, val = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--size expects NAME=INT, got {item!r}")
        try:
            out[key.strip()] = int(val.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--size {key}: {val!r} is not an integer") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Benchmark fedpar against ipyparallel, dask and Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the benchmarks")
    run.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help=f"scenario(s) to run; repeatable or comma-separated (default: all of {', '.join(SCENARIOS)})",
    )
    run.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="comma-separated peers to compare with fedpar, or 'none' (default: %(default)s)",
    )
    run.add_argument("--engines", type=int, default=2, help="engines/workers per cluster (default: 2)")
    run.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default: %(default)s)")
    run.add_argument("--quick", action="store_true", help="small sizes, for CI (e.g. --quick --peers none)")
    run.add_argument("--repeat", type=int, default=None, help="repeats per system (default: 1 quick, 3 full)")
    run.add_argument(
        "--size",
        action="append",
        metavar="NAME=INT",
        help="override a workload size, e.g. --size apply_tasks=2000 (names: "
        + ", ".join(Sizes.__dataclass_fields__)
        + ")",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per sample before it is killed (default: 300 quick, 1800 full)",
    )
    run.add_argument("--cooldown", type=float, default=1.0, help="seconds between samples (default: 1)")
    run.add_argument(
        "--no-isolate",
        action="store_true",
        help="run samples in this process instead of a worker subprocess (debugging; no timeout)",
    )
    run.add_argument(
        "--dask-scheduler",
        choices=("auto", "inprocess", "subprocess"),
        default="auto",
        help="where dask's scheduler runs: 'auto' = in the client process (LocalCluster) except for the "
        "memory scenarios, which need it in its own process to measure it (default: auto)",
    )
    run.add_argument(
        "--strict",
        action="store_true",
        help=f"exit {EXIT_FEDPAR_UNAVAILABLE} if fedpar itself cannot be benchmarked (for CI)",
    )

    sub.add_parser("list", help="list scenarios and whether each system is installed")

    rep = sub.add_parser("report", help="re-render results.md and plots from DIR/results.json")
    rep.add_argument("dir", type=Path, nargs="?", default=Path("bench-out"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command == "list":
        return _list()
    if args.command == "report":
        from benchmarks.report import rerender

        for line in rerender(args.dir):
            print(line)
        return EXIT_OK
    return _run(parser, args)


def _list() -> int:
    print("scenarios:")
    for name, sc in SCENARIOS.items():
        print(f"  {name:18s} {sc.describe(Sizes.full())}")
    print("systems:")
    for name in SYSTEMS:
        p = probe_system(name)
        print(f"  {name:12s} {p.status}  {p.versions}")
    return EXIT_OK


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from benchmarks.harness import FAILED, RunConfig, run

    try:
        scenarios = parse_scenarios(args.scenario)
        peers = parse_peers(args.peers)
        base = Sizes.quick() if args.quick else Sizes.full()
        sizes = base.with_overrides(parse_sizes(args.size))
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(str(exc))
    if args.engines < 1:
        parser.error("--engines must be at least 1")
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    config = RunConfig(
        scenarios=scenarios,
        peers=peers,
        engines=args.engines,
        out_dir=args.out,
        quick=args.quick,
        repeat=repeat,
        sizes=sizes,
        timeout=args.timeout if args.timeout is not None else (300.0 if args.quick else 1800.0),
        isolate=not args.no_isolate,
        cooldown=args.cooldown,
        options={"dask_scheduler": args.dask_scheduler},
    )
    results = run(config)
    failed = [s for s in results["samples"] if s["status"] in FAILED]
    for s in failed:
        first = (s.get("error") or "").strip().splitlines()
        print(
            f"FAILED {s['scenario']} {s['system']} repeat {s['repeat'] + 1}: {s['status']}"
            f"{' - ' + first[0] if first else ''}",
            file=sys.stderr,
        )
    if failed:
        return EXIT_FAILED_SAMPLES
    if args.strict and not results["systems"]["fedpar"]["available"]:
        print(f"fedpar is {results['systems']['fedpar']['status']}", file=sys.stderr)
        return EXIT_FEDPAR_UNAVAILABLE
    return EXIT_OK
