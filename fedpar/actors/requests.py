"""The gateway's request desk: a client's questions about tasks, and requests about the controller.

Runs on the gateway thread (the gateway owns it and calls it for every client message that is not a
submission or a stream message). ``get_result`` is served from the store, also long after completion (a
large result as a stream), or waited for when still running; ``abort`` withdraws queued tasks; status,
queries, purges, membership and shutdown. Submissions and results stay on the gateway's hot path.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fedpar.errors import StoreError
from fedpar.store.records import FINISHED_STATES
from fedpar.store.schema import STREAM_RESULT
from fedpar.wire.codec import Received
from fedpar.wire.protocol import (
    Abort,
    AbortReply,
    ClientHello,
    ErrorReply,
    GetResults,
    Membership,
    MembershipRequest,
    PurgeReply,
    PurgeResults,
    QueryTasks,
    Results,
    ResultSpec,
    Shutdown,
    ShutdownReply,
    StatusReply,
    StatusRequest,
    TaskList,
    Welcome,
)

if TYPE_CHECKING:
    from fedpar.actors.gateway import Gateway


class RequestDesk:
    """Client requests other than submissions and streams (gateway thread only)."""

    def __init__(self, gw: Gateway):
        self.gw = gw

    def on_message(self, ident: bytes, rx: Received, now: float) -> None:
        """A client's request other than a submission or a stream message."""
        msg, rid = rx.msg, rx.envelope.id
        if isinstance(msg, GetResults):
            self.on_get_results(ident, rid, msg)
        elif isinstance(msg, Abort):
            self.gw._reply_client(ident, AbortReply(rid, self.abort(msg.task_ids, now)))
        elif isinstance(msg, ClientHello):
            self.gw.clients.add(ident)
            cap = self.gw._told[ident] = self.gw.scheduler.capacity()
            self.gw._reply_client(ident, Welcome(rid, self.gw.controller_id, self.gw.registry.ids(),
                                              self.gw.relay.settings.to_wire(), cap, self.gw.desk.membership_wire(),
                                              self.gw.pid, self.gw.host))
        elif isinstance(msg, MembershipRequest):
            self.gw._reply_client(ident, Membership(self.gw.desk.membership_wire(), rid))
        elif isinstance(msg, StatusRequest):
            self.gw._reply_client(ident, self.status(rid))
        elif isinstance(msg, QueryTasks):
            recs = self.gw.journal.store.iter_tasks(states=msg.states, engine=msg.engine, since=msg.since,
                                                 until=msg.until, limit=max(0, min(msg.limit, 100_000)))
            self.gw._reply_client(ident, TaskList(rid, [r.to_row() for r in recs]))
        elif isinstance(msg, PurgeResults):
            try:
                self.gw._reply_client(ident, PurgeReply(rid, self.purge(msg)))
            except StoreError as exc:
                self.gw._reply_client(ident, ErrorReply(rid, type(exc).__name__, str(exc)))
        elif isinstance(msg, Shutdown):
            engines = self.gw.registry.ids()
            self.gw.desk.shutdown_engines("shutdown requested by a client")
            for eid in engines:
                self.gw.desk.lose_engine(eid, now, f"engine {eid} was stopped by a shutdown request", state="stopped")
            self.gw._reply_client(ident, ShutdownReply(rid, engines))
            if not msg.engines_only:
                self.gw.stopped_by_request = True
                self.gw._running = False
        else:
            self.gw.dropped["UnexpectedKind"] += 1
            self.gw._reply_client(ident, ErrorReply(rid, "ProtocolError", f"unexpected message {msg.KIND}"))

    def abort(self, task_ids: list[str], now: float) -> list[str]:
        """Withdraw the given tasks that are still queued here: each fails with ``TaskAborted`` (recorded, and
        sent to its watchers); one still receiving its arguments is refused with it instead."""
        aborted = []
        for task in self.gw.scheduler.cancel_queued(task_ids):
            self.gw._fail(task, "fedpar.TaskAborted", f"task {task.task_id} was aborted before it ran", now)
            aborted.append(task.task_id)
        if aborted:
            self.gw.counters["aborted"] += len(aborted)
        return aborted

    def known_task(self, task_id: str, ident: bytes) -> bool:
        """For a resubmitted task: True if it exists already (watched now, or its result queued)."""
        if self.gw.scheduler.get(task_id) is not None or self.gw.recovery.find(task_id) is not None:
            self.gw._watch(task_id, ident)
            return True
        got = self.stored_result(ident, task_id)
        if got is not None:
            self.gw._to_clients[ident].append(got)
            return True
        return False

    def stored_result(self, ident: bytes, task_id: str) -> tuple[ResultSpec, list[Any]] | None:
        """A stored result as sent to client ``ident``: inline, or as a stream head when it is large."""
        store = self.gw.journal.store
        rec = store.get_result_record(task_id)
        if rec is None:
            return None
        error = list(rec.error) if rec.error else None
        if sum(rec.frame_sizes) > self.gw.relay.settings.threshold:
            sizes = list(rec.frame_sizes)
            sid = self.gw.relay.open_out(self.gw.client_sock, ident, STREAM_RESULT, task_id, sizes, time.time())
            return ResultSpec(task_id, rec.ok, rec.engine, rec.started, rec.completed, error, 0, [sid, sizes]), []
        got = store.get_result(task_id)
        if got is None:
            return None
        frames = got[1]
        return ResultSpec(task_id, rec.ok, rec.engine, rec.started, rec.completed, error, len(frames)), frames

    def for_client(self, ident: bytes, res: ResultSpec, frames: list[Any]) -> tuple[ResultSpec, list[Any]]:
        """A result finished this pass as sent to ``ident``: a streamed one gets its own stream from the store."""
        if res.stream is None:
            return res, frames
        sizes = res.stream[1]
        sid = self.gw.relay.open_out(self.gw.client_sock, ident, STREAM_RESULT, res.task_id, sizes, time.time())
        return res._replace(stream=[sid, sizes]), []

    def on_get_results(self, ident: bytes, rid: int, msg: GetResults) -> None:
        found: list[ResultSpec] = []
        frames: list[Any] = []
        missing: list[str] = []
        for tid in msg.task_ids:
            if self.gw.scheduler.get(tid) is not None or self.gw.recovery.find(tid) is not None:
                self.gw._watch(tid, ident)  # still running: delivered when it finishes
                continue
            now_done = self.gw._finished_now.get(tid)
            if now_done is not None:  # finished in this very pass: sent with this pass's results
                self.gw._to_clients[ident].append(self.for_client(ident, *now_done))
                continue
            got = self.stored_result(ident, tid)
            if got is None:
                missing.append(tid)
                continue
            found.append(got[0])
            frames.extend(got[1])
        self.gw._reply_client(ident, Results(found, missing, rid), frames)

    def purge(self, msg: PurgeResults) -> int:
        """Delete finished tasks (in-flight ones are never purged); returns how many."""
        store = self.gw.journal.store
        if msg.everything or msg.before is not None:
            # Results, and finished tasks whose results were delivered without being stored.
            finished = store.iter_tasks(states=FINISHED_STATES)
            if msg.everything:
                found = set(store.all_result_ids()) | {r.task_id for r in finished}
            else:
                before = msg.before
                assert before is not None
                found = set(store.completed_before(before)) | {
                    r.task_id for r in finished if r.completed is not None and r.completed < before}
            ids = sorted(found)
        else:
            ids = [t for t in msg.task_ids
                   if store.get_result_record(t) is not None
                   or ((rec := store.get_task(t)) is not None and rec.state in FINISHED_STATES)]
        ids = [t for t in ids if self.gw.scheduler.get(t) is None and self.gw.recovery.find(t) is None]
        if ids:
            batch = store.batch()  # committed now, on its own: the reply says what really happened
            batch.delete_results(ids)
            store.commit(batch)
        return len(ids)

    def status(self, rid: int) -> StatusReply:
        counters = self.gw.journal.store.counters()
        engines = [
            {"id": e.engine_id, "uuid": e.uuid, "host": e.hostname, "pid": e.pid,
             "load": self.gw.scheduler.engine_load(e.engine_id)}
            for e in self.gw.registry.engines()
        ]
        stats: dict[str, Any] = {"dropped": dict(self.gw.dropped), "submitted": 0, "finished": 0, "delivered_direct": 0,
                                 **self.gw.counters, **self.gw.relay.stats(),
                                 "unstored_results": self.gw.journal.unstored_results}
        return StatusReply(rid, self.gw.controller_id, self.gw.codec.epoch, engines, self.gw.scheduler.queued,
                           self.gw.scheduler.in_flight, counters.get("tasks_done", 0),
                           counters.get("tasks_failed", 0), stats, self.gw.pid, self.gw.host)
