"""Benchmark harness comparing fedpar with ipyparallel, dask.distributed and Ray.

Run ``python -m benchmarks run --help`` from the repository root. See ``benchmarks/README.md``.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point shared by ``python -m benchmarks`` and ``fedpar bench``."""
    from benchmarks.cli import main as _main

    return _main(argv)
