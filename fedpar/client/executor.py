"""``concurrent.futures.Executor`` on a fedpar view, for code written against the standard interface."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from fedpar.client.results import AsyncResult
from fedpar.errors import TimeoutError

if TYPE_CHECKING:
    from fedpar.client.views import View


class FedparExecutor(Executor):
    """``submit`` returns an ``AsyncResult`` (a ``Future``); ``map`` runs as one chunked fedpar map."""

    def __init__(self, view: View):
        self.view = view
        self._futures: set[AsyncResult] = set()
        self._lock = threading.Lock()
        self._shutdown = False

    def _track(self, ar: AsyncResult) -> AsyncResult:
        with self._lock:
            self._futures.add(ar)
        ar.add_done_callback(self._untrack)
        return ar

    def _untrack(self, ar: Any) -> None:
        with self._lock:
            self._futures.discard(ar)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> AsyncResult:
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        return self._track(self.view.apply_async(fn, *args, **kwargs))

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None) -> Iterator[Any]:
        """Like ``Executor.map``; ``chunksize`` > 1 groups elements per task (default: automatic)."""
        if self._shutdown:
            raise RuntimeError("cannot map after shutdown")
        seqs = [list(it) for it in iterables]
        ar = self._track(self.view.map_async(fn, *seqs, chunksize=chunksize if chunksize > 1 else None))
        deadline = None if timeout is None else time.monotonic() + timeout

        def results() -> Iterator[Any]:
            if deadline is not None and not ar.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"map did not finish within {timeout}s")
            yield from ar

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new work; with ``wait``, block until submitted work is done.

        ``cancel_futures`` is accepted for compatibility; submitted tasks cannot be cancelled yet.
        """
        self._shutdown = True
        if wait:
            with self._lock:
                pending = list(self._futures)
            for ar in pending:
                ar.wait()
