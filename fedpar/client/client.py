"""``Client``: the user's connection to a cluster: one logical controller, however many there are.

A cluster may be one controller or a federation of several (``fedpar.federation``); the client connects to
every live controller and presents them as one: ``client.ids`` spans every engine (ids are global),
direct requests go to the controller owning the engine, load-balanced work goes wherever engines have room,
``get_result``/``abort``/``query_tasks``/``purge_results``/``status`` span the federation, and when a
controller dies its tasks are found again or resubmitted. One background I/O thread (``fedpar.client.io``)
owns every socket.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from fedpar.client.io import PING_INTERVAL, Force, IOThread, Withdraw
from fedpar.client.link import Link
from fedpar.client.requests import Gather, Lookup
from fedpar.client.results import AsyncResult, as_list, first
from fedpar.errors import (
    ControllerUnavailable,
    FedparError,
    TimeoutError,
    UnknownEngineError,
)
from fedpar.federation.seeds import connection_info, endpoints
from fedpar.runtime import ConnectionInfo, read_connection_file
from fedpar.store.records import TaskRecord
from fedpar.wire.codec import Codec
from fedpar.wire.direct import OFFER, wants_direct
from fedpar.wire.protocol import (
    Abort,
    AbortReply,
    ErrorReply,
    GetResults,
    Message,
    PurgeReply,
    PurgeResults,
    QueryTasks,
    ResultSpec,
    Shutdown,
    ShutdownReply,
    StatusReply,
    StatusRequest,
    TaskList,
    TaskSpec,
)
from fedpar.wire.streams import frame_size, should_stream

if TYPE_CHECKING:
    from fedpar.client.executor import FedparExecutor
    from fedpar.client.views import DirectView, LoadBalancedView

log = logging.getLogger(__name__)



def _task_ids(jobs: str | Sequence[str] | AsyncResult) -> list[str]:
    """The task ids a ``jobs`` argument names: one id, several, or an ``AsyncResult``'s."""
    if isinstance(jobs, AsyncResult):
        return jobs.task_ids
    return [jobs] if isinstance(jobs, str) else list(jobs)


def _merge_stats(into: dict[str, Any], stats: dict[str, Any]) -> None:
    """Add one controller's counters to the federation's (numbers summed, maps of numbers merged)."""
    for k, v in stats.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, dict)):
            into.setdefault(k, v)
        elif isinstance(v, dict):
            sub = into.setdefault(k, {})
            if isinstance(sub, dict):
                for kk, vv in v.items():
                    if isinstance(vv, (int, float)) and not isinstance(vv, bool):
                        sub[kk] = sub.get(kk, 0) + vv
        else:
            into[k] = into.get(k, 0) + v


class Client:
    """Connection to a running cluster (one controller, or a federation of several).

    ``Client()`` reads the connection file of the default cluster; pass ``connection_file=`` (a path or
    a cluster id) for another, or ``discovery=URL, cluster=NAME`` (and ``key=``, the cluster key or the path
    of a file holding it) to find the controllers through a discovery registry. ``client.ids`` lists engine
    ids; ``client[:]``, ``client[0]`` and ``client[[0, 2]]`` are ``DirectView``s;
    ``client.load_balanced_view()`` spreads work over engines.

    If a controller restarts, the client reconnects and resynchronises by itself; if the survivors of a
    federation take a dead controller over, the client finds its tasks again or resubmits them. If a
    controller stays silent for ``lost_after`` seconds while results are awaited from it, those fail with
    ``ControllerUnavailable`` (None: wait for ever).
    """

    def __init__(self, connection_file: str | os.PathLike[str] | ConnectionInfo | None = None, *,
                 discovery: str | None = None, cluster: str | None = None,
                 key: bytes | str | os.PathLike[str] | None = None,
                 timeout: float = 10.0, lost_after: float | None = 120.0):
        if discovery is not None:
            self.info = connection_info(discovery, cluster, key)
        elif isinstance(connection_file, ConnectionInfo):
            self.info = connection_file
        else:
            path = Path(connection_file) if isinstance(connection_file, os.PathLike) else connection_file
            self.info = read_connection_file(path)
        self.lost_after = lost_after  # fail waiting results after this long without a word from their controller
        self.sender = f"client:{secrets.token_hex(6)}"
        self._task_prefix = self.sender[7:] + "-"
        self._next_task = 0
        self._id_lock = threading.Lock()
        self._waiting: dict[str, list[tuple[AsyncResult, int]]] = {}
        self._wlock = threading.Lock()
        self._engines: set[int] = set()
        self._engines_cond = threading.Condition()
        self._closed = False
        self.controller_id = self.info.controller_id
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._io = IOThread(self, self._ctx, Codec(self.info.key, self.sender), endpoints(self.info, "client"))
        self._io.start()
        deadline = time.monotonic() + timeout
        if not self._io.welcomed.wait(timeout):
            where = ", ".join(self._io.links) or self.info.client_endpoint
            self.close(timeout=0)
            raise ControllerUnavailable(
                f"the controller at {where} did not answer within {timeout}s: is it running, and does the "
                "connection file belong to it (same cluster key)?")
        if not self._io.settled.wait(max(0.0, deadline - time.monotonic())):  # (the rest of a federation)
            log.warning("not every controller of the federation answered within %ss; continuing with %d",
                        timeout, len(self._io.ready_links()))
        grace = min(time.monotonic() + 1.0, deadline)  # (the other controllers of the connection file: a moment)
        while not self._io.initial_links_ready() and time.monotonic() < grace:
            time.sleep(0.01)

    # ------------------------------------------------------------------ fed by the I/O thread
    def _on_welcome(self, link: Link) -> None:
        if link.cid is not None and (self.controller_id == self.info.controller_id or not self.controller_id):
            self.controller_id = link.cid

    def _set_engines(self, ids: set[int]) -> None:
        with self._engines_cond:
            self._engines = ids
            self._engines_cond.notify_all()

    def _fail_task(self, task_id: str, exc: FedparError) -> None:
        with self._wlock:
            waiters = self._waiting.pop(task_id, ())
        for ar, i in waiters:
            ar._fail(i, exc)

    def _on_results(self, results: Sequence[ResultSpec], frames: list[Any]) -> None:
        pos = 0
        for spec in results:
            fr = frames[pos:pos + spec.nframes]
            pos += spec.nframes
            with self._wlock:
                waiters = self._waiting.pop(spec.task_id, ())
            for ar, i in waiters:
                ar._deliver(i, spec, fr)

    def _on_accepted(self, accepted: Sequence[str]) -> None:
        with self._wlock:
            waiting = self._waiting
            found = [w for tid in accepted for w in waiting.get(tid, ())]
        for ar, i in found:
            ar._accept(i)

    def _on_rejected(self, rejected: list[list[str]]) -> None:
        from fedpar import errors

        for tid, ename, evalue in rejected:
            cls = getattr(errors, ename, None)
            exc: FedparError
            if isinstance(cls, type) and issubclass(cls, errors.TaskError):
                exc = cls(evalue, task_id=tid)
            elif isinstance(cls, type) and issubclass(cls, FedparError):
                exc = cls(evalue)  # e.g. StoreFull: the controller could not store the submission
            else:
                exc = errors.TaskAborted(f"{ename}: {evalue}", task_id=tid)
            self._fail_task(tid, exc)

    def _fail_all(self, exc: FedparError) -> None:
        with self._wlock:
            waiting, self._waiting = self._waiting, {}
        err = exc if isinstance(exc, ControllerUnavailable) else ControllerUnavailable(str(exc))
        for waiters in waiting.values():
            for ar, i in waiters:
                ar._fail(i, err)

    # ------------------------------------------------------------------ plumbing
    def _fanout(self, msg: Message, timeout: float | None) -> list[tuple[Link, Message]]:
        """Send ``msg`` to every live controller; their answers (raises if none answers, or on an error)."""
        if self._closed:
            raise FedparError("this client is closed")
        g = Gather(msg)
        self._io.queue(g, [])
        g.done.wait(timeout)
        replies = [(link, rx.msg) for link, rx in list(g.replies)]
        if not replies:
            raise ControllerUnavailable(
                f"no controller answered within {timeout}s: is the cluster running, and does the connection file "
                "belong to it (same cluster key)?")
        for _, m in replies:
            if isinstance(m, ErrorReply):
                from fedpar import errors

                cls = getattr(errors, m.ename, None)
                if isinstance(cls, type) and issubclass(cls, FedparError) and not issubclass(cls, errors.TaskError):
                    raise cls(m.evalue)
                raise FedparError(f"{m.ename}: {m.evalue}")
        return replies

    def _new_task_ids(self, n: int) -> list[str]:
        with self._id_lock:
            start = self._next_task
            self._next_task += n
        p = self._task_prefix
        return [f"{p}{i}" for i in range(start, start + n)]

    def _submit(self, items: Sequence[tuple[str, int | None, list[Any], dict[str, Any]]], *,
                retries: int = 0, reduce: Any = first, chunked: bool = False, label: str = "") -> AsyncResult:
        """Submit tasks ``(op, target, frames, spec)``; one AsyncResult covers them all."""
        if self._closed:
            raise FedparError("this client is closed")
        ids = self._new_task_ids(len(items))
        ar = AsyncResult(ids, reduce, chunked=chunked, label=label, client=self)
        with self._wlock:
            for i, tid in enumerate(ids):
                self._waiting[tid] = [(ar, i)]
        io = self._io
        threshold = io.settings.threshold
        direct = io.settings.direct
        for tid, (op, target, frames, spec) in zip(ids, items, strict=True):
            streamed = should_stream(frames, threshold)
            if direct and wants_direct(op, target, streamed):  # the I/O thread fills in the offer
                spec = {**spec, OFFER: True}
            if streamed:  # too big for one message: its bytes follow as a stream
                spec = {**spec, "stream": [next(io.sids), [frame_size(f) for f in frames]]}
                io.queue(TaskSpec(tid, op, target, 0, retries, spec), frames)
            else:
                io.queue(TaskSpec(tid, op, target, len(frames), retries, spec), frames)
        return ar

    def _force_send(self) -> None:
        """Send every task held back for capacity now (``AsyncResult.wait_for_send``)."""
        self._io.queue(Force(), [])

    # ------------------------------------------------------------------ public API
    @property
    def ids(self) -> list[int]:
        """Ids of the registered engines, sorted."""
        with self._engines_cond:
            return sorted(self._engines)

    def wait_for_engines(self, n: int, timeout: float | None = 60.0) -> list[int]:
        """Block until at least ``n`` engines are registered; returns their ids."""
        with self._engines_cond:
            if not self._engines_cond.wait_for(lambda: len(self._engines) >= n, timeout):
                raise TimeoutError(f"{len(self._engines)} of {n} engines registered within {timeout}s")
            return sorted(self._engines)

    def __getitem__(self, key: int | slice | Sequence[int]) -> DirectView:
        from fedpar.client.views import DirectView

        if isinstance(key, int):
            if key not in self.ids:
                raise UnknownEngineError(f"engine {key} is not registered (registered: {self.ids})")
            return DirectView(self, key)
        if isinstance(key, slice):
            if key == slice(None):
                return DirectView(self, "all")
            return DirectView(self, self.ids[key])
        targets = list(key)
        missing = [t for t in targets if t not in self.ids]
        if missing:
            raise UnknownEngineError(f"engines {missing} are not registered (registered: {self.ids})")
        return DirectView(self, targets)

    def direct_view(self, targets: int | Sequence[int] | str = "all") -> DirectView:
        """A ``DirectView`` on ``targets`` (``"all"`` follows engines as they come and go)."""
        from fedpar.client.views import DirectView

        return DirectView(self, targets if isinstance(targets, (int, str)) else list(targets))

    def load_balanced_view(self, targets: None = None, *, retries: int = 0) -> LoadBalancedView:
        """A view that sends each task to whichever engine is free first."""
        from fedpar.client.views import LoadBalancedView

        return LoadBalancedView(self, retries=retries)

    def executor(self, *, retries: int = 0) -> FedparExecutor:
        """A ``concurrent.futures.Executor`` running on the load-balanced view."""
        from fedpar.client.executor import FedparExecutor

        return FedparExecutor(self.load_balanced_view(retries=retries))

    def get_result(self, task_ids: str | Sequence[str], *, block: bool = False,
                   timeout: float | None = None) -> Any:
        """Results by task id, served from the controllers' stores (also long after completion).

        One id gives that task's value; a list gives a list. Ids no controller knows raise ``ResultNotFound``;
        when a controller that may hold the result is down, ``ResultUnavailable`` says which.
        """
        single = isinstance(task_ids, str)
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        GetResults(ids)  # validates the ids before anything is registered
        ar = AsyncResult(ids, first if single else as_list, label="get_result", sent=True, client=self)
        with self._wlock:
            fresh = [tid for tid in ids if tid not in self._waiting]  # (ours in flight: their results come anyway)
            for i, tid in enumerate(ids):
                self._waiting.setdefault(tid, []).append((ar, i))
        if fresh:
            self._io.queue(Lookup(fresh), [])
        return ar.get(timeout) if block else ar

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """Cluster status: engines (with load), queued, in-flight, done and failed task counts, summed over the
        controllers, and ``controllers``: one dict per live controller (``id``, ``pid``, ``host``, ``epoch``,
        ``engines`` (ids), ``queued``, ``in_flight``, ``done``, ``failed``)."""
        replies = sorted(((lk, m) for lk, m in self._fanout(StatusRequest(), timeout) if isinstance(m, StatusReply)),
                         key=lambda x: x[1].controller)
        out: dict[str, Any] = {"engines": [], "queued": 0, "in_flight": 0, "done": 0, "failed": 0}
        stats: dict[str, Any] = {}
        controllers: list[dict[str, Any]] = []
        for link, m in replies:
            out["engines"].extend(m.engines)
            for k in ("queued", "in_flight", "done", "failed"):
                out[k] += getattr(m, k)
            _merge_stats(stats, m.stats)
            controllers.append({"id": m.controller, "pid": m.pid, "host": m.host, "epoch": m.controller_epoch,
                                "endpoint": link.endpoint, "engines": sorted(e["id"] for e in m.engines),
                                "queued": m.queued, "in_flight": m.in_flight, "done": m.done, "failed": m.failed})
        out["engines"].sort(key=lambda e: e["id"])
        return {"controller": ",".join(c["id"] for c in controllers),
                "epoch": max(c["epoch"] for c in controllers), **out, **stats, "controllers": controllers}

    queue_status = status

    def query_tasks(self, *, states: Sequence[str] | None = None, engine: int | None = None,
                    since: float | None = None, until: float | None = None, limit: int = 1000,
                    timeout: float = 30.0) -> list[TaskRecord]:
        """Task records from the controllers' stores, oldest first.

        ``states`` picks among ``"queued"``, ``"assigned"``, ``"done"``, ``"failed"``; ``engine`` the engine
        that ran (or runs) the task; ``since``/``until`` bound the submission time (``time.time()`` values).
        """
        msg = QueryTasks(list(states) if states is not None else None, engine, since, until, limit)
        rows = [r for _, m in self._fanout(msg, timeout) if isinstance(m, TaskList) for r in m.rows]
        recs = sorted((TaskRecord.from_row(r) for r in rows), key=lambda r: (r.submitted, r.task_id))
        return recs[:max(0, limit)]

    def abort(self, jobs: str | Sequence[str] | AsyncResult | None = None, *, timeout: float = 10.0) -> list[str]:
        """Withdraw submitted tasks that no engine has yet: they fail with ``fedpar.TaskAborted`` (so do their
        ``AsyncResult``s, here and in any client watching them, and ``get_result`` later).

        ``jobs``: task ids or an ``AsyncResult``; ``None``: every task this client submitted and still waits
        for. Tasks already sent to an engine run to the end. Returns the ids withdrawn; their results have
        arrived by the time it returns.
        """
        if jobs is None:
            with self._wlock:
                ids = [tid for tid, waiters in self._waiting.items() if any(ar.submitted for ar, _ in waiters)]
        else:
            ids = _task_ids(jobs)
        if not ids:
            return []
        from concurrent.futures import Future

        local: Future[list[str]] = Future()
        self._io.queue(Withdraw(None if jobs is None else ids, local), [])
        withdrawn = local.result(timeout)
        rest = [t for t in ids if t not in set(withdrawn)]
        if rest:
            for _, m in self._fanout(Abort(rest), timeout):
                if isinstance(m, AbortReply):
                    withdrawn.extend(m.aborted)
        return withdrawn

    def purge_results(self, jobs: str | Sequence[str] | AsyncResult | None = None, *, before: float | None = None,
                      everything: bool = False, timeout: float = 30.0) -> int:
        """Delete finished tasks from the controllers' stores: given ids (or an AsyncResult's), those finished
        before ``before`` (a ``time.time()`` value), or ``everything``. Tasks still running are kept.
        Returns how many were purged."""
        ids = _task_ids(jobs) if jobs is not None else []
        if not ids and before is None and not everything:
            raise ValueError("say what to purge: task ids, before=, or everything=True")
        replies = self._fanout(PurgeResults(ids, before, everything), timeout)
        return sum(m.purged for _, m in replies if isinstance(m, PurgeReply))

    def wait(self, jobs: Iterable[AsyncResult] | None = None, timeout: float | None = None) -> bool:
        """Wait for ``jobs`` (default: everything this client is still waiting for). True if all done."""
        if jobs is None:
            with self._wlock:
                jobs = {ar for ws in self._waiting.values() for ar, _ in ws}
        deadline = None if timeout is None else time.monotonic() + timeout
        for ar in jobs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not ar.wait(left):
                return False
        return True

    @property
    def outstanding(self) -> set[str]:
        """Ids of tasks this client still waits for."""
        with self._wlock:
            return set(self._waiting)

    def shutdown(self, *, engines_only: bool = False, timeout: float = 10.0) -> list[int]:
        """Stop the cluster's engines and (unless ``engines_only``) its controllers."""
        replies = self._fanout(Shutdown(engines_only), timeout)
        engines = sorted(e for _, m in replies if isinstance(m, ShutdownReply) for e in m.engines)
        if not engines_only:
            self.close(timeout=1.0)  # (the controllers' last acknowledgements follow their replies)
        return engines

    def close(self, timeout: float | None = 10.0) -> None:
        """Disconnect.

        First sends what it still holds back and waits (at most ``timeout`` seconds, and only while the
        controllers answer) until they have stored every task this client submitted, so work submitted just
        before ``close`` runs and its results stay retrievable with ``get_result`` from another client. Results
        still pending are then failed here with ``ControllerUnavailable``.
        """
        if self._closed:
            return
        if self._io.is_alive() and timeout:
            self._force_send()
            self._await_sent(timeout)
        self._closed = True
        self._io.running = False
        self._io.waker.wake()
        self._io.join(5)
        self._fail_all(ControllerUnavailable("the client was closed before the result arrived"))
        self._ctx.term()

    def _await_sent(self, timeout: float | None) -> None:
        with self._wlock:
            unsent = {ar for waiters in self._waiting.values() for ar, _ in waiters if not ar.sent}
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        for ar in unsent:
            while not ar.wait_for_send(0.05):
                now = time.monotonic()  # (with tasks unacknowledged, the I/O thread pings a silent controller)
                silent = now - max(self._io.last_heard, start) > 2 * PING_INTERVAL + 1.0
                if silent or (deadline is not None and now >= deadline):
                    left = sum(1 for a in unsent if not a.sent)
                    log.warning("closing with %d submission(s) the controller has not confirmed (%s); they may "
                                "not run", left, "it is silent" if silent else f"waited {timeout}s")
                    return

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        n = len(self._io.ready_links())
        return f"<fedpar.Client {self.info.cluster_id} controllers={n} engines={self.ids}>"


__all__ = ["Client"]
