"""The gateway's stream desk: what a large payload's stream means for its task.

Runs on the gateway thread (the gateway owns it and calls it). Streams themselves are the relay's business
(``relay``: chunks stored and forwarded under credit); here is what their start, completion and failure do
to the task: a task with streamed arguments is queued when they are all stored (or refused if they never
arrive), an engine's streamed result is followed by every watching client as it arrives and finishes the
task when stored, and a pull result an engine delivered straight to its client (``fedpar.wire.direct``)
finishes the task with a record saying the value is not kept here.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fedpar.actors.relay import Inbound
from fedpar.errors import MalformedMessage
from fedpar.store.schema import STREAM_INPUT
from fedpar.wire.direct import offer_of
from fedpar.wire.protocol import ResultSpec, StreamAbort, TaskSpec
from fedpar.wire.streams import DELIVERED, parse_head

if TYPE_CHECKING:
    from fedpar.actors.gateway import Gateway


class StreamDesk:
    """Stream events turned into task events (gateway thread only)."""

    def __init__(self, gw: Gateway):
        self.gw = gw

    def on_result_stream(self, ident: bytes, res: ResultSpec, now: float) -> None:
        """An engine announced a large result; its chunks follow (the task finishes when all are stored)."""
        try:
            sid, sizes = parse_head(res.stream)
        except MalformedMessage:
            self.gw.dropped["MalformedMessage"] += 1
            return
        task = self.gw.scheduler.get(res.task_id) or self.gw.recovery.find(res.task_id)
        gw = self.gw
        w = gw._watchers.get(res.task_id)
        watchers = (w,) if isinstance(w, bytes) else tuple(w or ())
        heads = None if task is None else gw.relay.open_result(gw.engine_sock, ident, task, res, sid, sizes, now,
                                                               watchers, gw.client_sock)
        if heads is None:
            gw.dropped["DuplicateResult"] += 1
            gw.send_engine(ident, StreamAbort(sid, "StreamAborted", f"duplicate result of {res.task_id}"))
            return
        for client, fsid in heads:  # the watchers get the result as it arrives (cut-through)
            self.gw._to_clients[client].append((res._replace(nframes=0, stream=[fsid, sizes]), []))

    def on_delivered(self, res: ResultSpec) -> None:
        """An engine sent a large pull result straight to its client (``fedpar.wire.direct``): finish the task,
        recording that the value is not kept here."""
        try:
            _, sizes = parse_head(res.stream, delivered=True)
        except MalformedMessage:
            self.gw.dropped["MalformedMessage"] += 1
            return
        runtime = res.completed - res.started if res.started is not None else None
        task = self.gw.scheduler.complete(res.task_id, res.engine, runtime) or self.gw.recovery.take(res.task_id)
        if task is None:
            self.gw.dropped["DuplicateResult"] += 1
            return
        self.gw.counters["delivered_direct"] += 1
        self.gw._finish(task, res._replace(stream=[DELIVERED, sizes]), [])

    def stream_complete(self, inb: Inbound) -> None:
        """Every chunk of an inbound stream is stored: queue its task, or finish it with its result."""
        task = inb.task
        if inb.kind == STREAM_INPUT:
            self.gw.journal.task_queued(task, streamed=True)
            self.gw._acks.setdefault((inb.ident, inb.rid), []).append(task.task_id)
            self.gw.counters["submitted"] += 1
            return
        res = inb.res
        assert res is not None
        runtime = res.completed - res.started if res.started is not None else None
        found = self.gw.scheduler.complete(res.task_id, res.engine, runtime) or self.gw.recovery.take(res.task_id)
        if found is None:
            self.gw.dropped["DuplicateResult"] += 1
            return
        self.gw._finish(found, res._replace(nframes=0, stream=[0, inb.sizes]), [])

    def stream_failed(self, inb: Inbound, ename: str, evalue: str) -> None:
        """An inbound stream was abandoned: refuse its submission, or fail its task."""
        tid = inb.task.task_id
        if inb.kind == STREAM_INPUT:  # scheduled already (maybe running on its engine): withdraw it
            self.gw._rejects[(inb.ident, inb.rid)].append([tid, ename, evalue])
            if not self.gw.scheduler.cancel_queued([tid]):
                self.gw.scheduler.complete(tid, None, None)
            self.gw._watchers.pop(tid, None)
            self.gw.journal.unrecorded.discard(tid)
            return
        task = self.gw.scheduler.complete(tid, None, None) or self.gw.recovery.take(tid)
        if task is not None:
            self.gw._fail(task, f"fedpar.{ename}", evalue, time.time())

    def direct_ok(self, spec: TaskSpec) -> bool:
        """True when the engine a task names runs on the host of the client offering a direct stream."""
        offer = offer_of(spec.spec)
        return (self.gw.relay.settings.direct and offer is not None and spec.target is not None
                and self.gw.registry.host(spec.target) == offer[0])
