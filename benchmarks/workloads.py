"""The functions the benchmarks ship to engines/workers.

Kept in their own tiny module (no heavy imports) so that every system can pickle them by
reference: the harness puts the repository root on ``PYTHONPATH`` for everything it starts.
"""

from __future__ import annotations

import time
from typing import Any


def noop(*args: Any, **kwargs: Any) -> None:
    """Do nothing; the unit of every throughput and latency figure."""
    return None


def identity(x: Any) -> Any:
    """Return the argument: used to ship a payload to an engine and back."""
    return x


def kilobytes(n: int = 1) -> bytes:
    """Return ``n`` KB of ``b"x"`` (``b"x" * 1024`` for the controller-memory scenario)."""
    return b"x" * (1024 * n)


def echo(x: Any) -> Any:
    """Return the argument: used to recognise a stored result after a restart."""
    return x


def sleep_for(seconds: float) -> float:
    """Sleep, then return the seconds slept: a task that is still running when a controller is killed."""
    time.sleep(seconds)
    return seconds
