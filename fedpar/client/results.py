"""``AsyncResult``: the handle of submitted work, a ``concurrent.futures.Future`` subclass.

Results arrive on the client's I/O thread as raw frames; they are unpickled lazily, in the thread that
asks for them, so the I/O thread stays free to move messages.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import TYPE_CHECKING, Any, TextIO

from fedpar import errors
from fedpar.errors import CompositeError, FedparError, RemoteError, TaskError, TimeoutError
from fedpar.wire.payload import loads
from fedpar.wire.protocol import ResultSpec

if TYPE_CHECKING:
    from fedpar.client.client import Client

_UNSET = object()
Reducer = Callable[[list[Any]], Any]


def first(values: list[Any]) -> Any:
    return values[0]


def as_list(values: list[Any]) -> Any:
    return values


def concat(values: list[Any]) -> Any:
    """Join the chunks of a map (lists) or a gather (lists or numpy arrays) in order."""
    if values and all(type(v).__name__ == "ndarray" for v in values):
        import numpy as np

        return np.concatenate(values)
    out: list[Any] = []
    for v in values:
        out.extend(v)
    return out


def error_from_spec(spec: ResultSpec) -> FedparError:
    """The exception a failed task raises on the client."""
    ename, evalue, tb = spec.error or ["FedparError", "task failed without details", ""]
    if ename.startswith("fedpar."):  # raised by fedpar itself (controller side), not by user code
        cls = getattr(errors, ename.split(".", 1)[1], None)
        if isinstance(cls, type) and issubclass(cls, TaskError):
            return cls(evalue, task_id=spec.task_id, engine_id=spec.engine)
        if isinstance(cls, type) and issubclass(cls, FedparError):
            return cls(evalue)
    return RemoteError(ename, evalue, tb, task_id=spec.task_id, engine_id=spec.engine)


class AsyncResult(Future[Any]):
    """Handle of one request (one or many tasks). ``get()`` waits and returns the value.

    * ``task_ids`` (alias ``msg_ids``): the ids of the tasks, usable with ``Client.get_result``.
    * ``get(timeout=)``, ``wait(timeout=)``, ``ready()``, ``successful()``, ``elapsed``, ``progress``.
    * ``sent`` / ``wait_for_send(timeout=)``: whether the controller has stored every submission (from then
      on any client can ``get_result`` these ids, and a controller restart keeps them).
    * Iterating a map result yields its elements in order as their chunks arrive.
    * One failed task raises its ``RemoteError`` (or ``EngineError``, ...); several raise ``CompositeError``.
    """

    def __init__(
        self,
        task_ids: Sequence[str],
        reduce: Reducer = first,
        *,
        chunked: bool = False,
        label: str = "",
        sent: bool = False,
        client: Client | None = None,
    ):
        super().__init__()
        self.task_ids = list(task_ids)
        self._reduce = reduce
        self._chunked = chunked
        self.label = label
        self._n = len(self.task_ids)
        self._raw: list[tuple[ResultSpec, list[Any]] | None] = [None] * self._n
        self._values: list[Any] = [_UNSET] * self._n
        self._done = 0
        self._client = client
        self._accepted: list[bool] | None = None if sent else [False] * self._n
        self._unsent = 0 if sent else self._n  # neither acknowledged by the controller nor finished
        self._lock = threading.Lock()  # cheap; a Condition on it is made only if someone waits on it
        self._cond: threading.Condition | None = None
        self._value: Any = _UNSET
        self._submitted = time.monotonic()
        self._finished: float | None = None
        self.set_running_or_notify_cancel()  # submitted work cannot be cancelled from here (yet)
        if self._n == 0:
            self._finish()

    # ------------------------------------------------------------------ fed by the client's I/O thread
    def _accept(self, index: int) -> None:
        """The controller acknowledged (stored) the submission of task ``index``."""
        with self._lock:
            if self._mark_sent(index) and self._cond is not None:
                self._cond.notify_all()

    def _mark_sent(self, index: int) -> bool:
        """Count task ``index`` as sent (holding the lock); True when that changed something."""
        accepted = self._accepted
        if accepted is None or accepted[index]:
            return False
        accepted[index] = True
        self._unsent -= 1
        return True

    def _deliver(self, index: int, spec: ResultSpec, frames: list[Any]) -> None:
        with self._lock:
            if self._raw[index] is not None:
                return
            self._raw[index] = (spec, frames)
            self._done += 1
            self._mark_sent(index)  # an outcome (even a rejection) ends the wait for the acknowledgement
            if self._cond is not None:
                self._cond.notify_all()
            complete = self._done == self._n
        if complete:
            self._finish()

    def _fail(self, index: int, exc: FedparError) -> None:
        spec = ResultSpec(self.task_ids[index], False, getattr(exc, "engine_id", None), None, time.time(),
                          [f"fedpar.{type(exc).__name__}", str(exc), ""], 0)
        self._deliver(index, spec, [])

    def _finish(self) -> None:
        self._finished = time.monotonic()
        failures = [error_from_spec(r[0]) for r in self._raw if r is not None and not r[0].ok]
        if len(failures) == 1:
            self.set_exception(failures[0])
        elif failures:
            self.set_exception(CompositeError(failures))
        else:
            self.set_result(_UNSET)

    # ------------------------------------------------------------------ values
    def _value_at(self, index: int) -> Any:
        v = self._values[index]
        if v is _UNSET:
            raw = self._raw[index]
            assert raw is not None
            spec, frames = raw
            if not spec.ok:
                raise error_from_spec(spec)
            v = loads(frames)
            self._values[index] = v
            self._raw[index] = (spec, [])  # the frames are no longer needed
        return v

    def result(self, timeout: float | None = None) -> Any:
        """Wait for completion and return the value (``get`` is the same)."""
        try:
            super().result(timeout)
        except FuturesTimeout:
            raise TimeoutError(
                f"{self._done}/{self._n} task(s) finished within {timeout}s"
                + (f" ({self.label})" if self.label else "")
            ) from None
        with self._lock:
            if self._value is _UNSET:
                self._value = self._reduce([self._value_at(i) for i in range(self._n)])
            return self._value

    def get(self, timeout: float | None = None) -> Any:
        """Wait (at most ``timeout`` seconds) and return the result; raises the task's error."""
        return self.result(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until all tasks finished or ``timeout`` passed; True when done. Never raises task errors."""
        try:
            self.exception(timeout)  # waits for the Future itself, so ready() agrees afterwards
        except FuturesTimeout:
            return False
        return True

    def ready(self) -> bool:
        return self.done()

    @property
    def submitted(self) -> bool:
        """True for the handle of a submission (False for one made by ``Client.get_result``)."""
        return self._accepted is not None

    def abort(self, timeout: float = 10.0) -> list[str]:
        """Withdraw these tasks where no engine has them yet (see ``Client.abort``); returns the ids withdrawn.
        The others run to the end."""
        if self._client is None:
            raise FedparError("this AsyncResult belongs to no client")
        return self._client.abort(self, timeout=timeout)

    @property
    def sent(self) -> bool:
        """True once the controller has acknowledged every submission (or the task already finished).

        An acknowledged task is in the controller's store: another client can ``get_result`` its id, and it
        survives a controller restart. Before that, only this client knows the id.
        """
        return self._unsent == 0

    def wait_for_send(self, timeout: float | None = None) -> bool:
        """Wait until ``sent`` (at most ``timeout`` seconds); True when it is. Never raises task errors.

        Load-balanced tasks wait in the client while every controller's queue is full (they go wherever
        engines free up first); this sends them at once."""
        if self._unsent and self._client is not None:
            self._client._force_send()
        with self._lock:
            return self._unsent == 0 or self._changed().wait_for(lambda: self._unsent == 0, timeout)

    def _changed(self) -> threading.Condition:
        """The Condition on ``_lock`` that deliveries and acknowledgements notify (made on first use)."""
        if self._cond is None:
            self._cond = threading.Condition(self._lock)
        return self._cond

    def successful(self) -> bool:
        """True when done without error (ipyparallel's name)."""
        return self.done() and self.exception() is None

    @property
    def msg_ids(self) -> list[str]:
        return self.task_ids

    @property
    def progress(self) -> int:
        """How many of the tasks have finished."""
        return self._done

    @property
    def elapsed(self) -> float:
        """Seconds from submission to completion (or to now while running)."""
        end = self._finished if self._finished is not None else time.monotonic()
        return end - self._submitted

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Any]:
        """Values in order as they arrive (the elements of a map, the per-engine values of a list)."""
        for i in range(self._n):
            with self._lock:
                if self._raw[i] is None:
                    self._changed().wait_for(lambda i=i: self._raw[i] is not None)  # type: ignore[misc]
                v = self._value_at(i)
            if self._chunked:
                yield from v
            else:
                yield v

    def wait_interactive(self, interval: float = 0.5, timeout: float | None = None,
                         stream: TextIO | None = None) -> None:
        """Wait while printing a progress bar (``done/total tasks, elapsed``)."""
        out = stream or sys.stdout
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.wait(interval):
            _bar(out, self._done, self._n, self.elapsed, end="")
            if deadline is not None and time.monotonic() >= deadline:
                break
        _bar(out, self._done, self._n, self.elapsed, end="\n")

    def __repr__(self) -> str:
        state = "done" if self.done() else f"{self._done}/{self._n}"
        return f"<AsyncResult {self.label or ''} {state}>"


def _bar(out: TextIO, done: int, total: int, elapsed: float, end: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} tasks  {elapsed:6.1f}s{end}")
    out.flush()

