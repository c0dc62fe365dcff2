"""The controller's stream relay: large payloads pass through the store chunk by chunk, never whole.

Runs on the gateway thread (the gateway calls it; it owns no socket and no thread).

Inbound streams (a client's task arguments, an engine's result): each chunk is written to the store in
the pass it arrives (``Journal.stream_chunk``, committed on its own before anything else of the pass), and
only after that commit does the relay grant the sender more credit. When the last chunk is stored the
stream *completes*: the gateway then records and acknowledges the task, or finishes it with its result.

Outbound streams (task arguments to an engine, a result to a client): chunks are read back from the store
one at a time as the receiver grants credit.

Nothing waits for a whole object (cut-through): a task with streamed arguments is scheduled when its head
arrives (but stored and acknowledged only once complete, see ``Journal.unrecorded``), and the engine it is
dispatched to gets a *follower* stream that sends every chunk as soon as it is stored; likewise each client
watching a task gets a follower of its streamed result. Followers send from the few just-committed chunk
buffers the relay keeps, else from the store. If the inbound stream fails, the followers are aborted: an
engine reports the task failed (the controller ignores it: the submission was refused), a client is told
``StreamRestarted`` and keeps waiting for the task's outcome (a retry's result, or the failure).

So the controller holds at most a credit window of chunks per stream (plus one pass's LMDB transaction),
whatever the object's size. A stream that makes no progress for ``settings.timeout`` seconds is abandoned:
an inbound one frees its stored chunks and fails its task with ``StreamTimeout``; an outbound one is
dropped (its receiver times out on its side).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import zmq

from fedpar.actors.journal import Journal
from fedpar.control.scheduler import Task
from fedpar.errors import StreamCorrupted
from fedpar.store.schema import STREAM_INPUT, STREAM_RESULT
from fedpar.wire.protocol import Chunk, Credit, Message, ResultSpec, StreamAbort
from fedpar.wire.streams import Receiver, Sender, StreamSettings

log = logging.getLogger(__name__)

PUMP_CHUNKS = 8  # chunks sent per pass over all outbound streams (then the loop polls sockets again)

SendFn = Callable[[zmq.Socket[Any], bytes, Message, list[Any]], bool]


class Inbound:
    """A stream the controller receives: a task's arguments (``kind`` input) or result (``kind`` result)."""

    __slots__ = ("followers", "ident", "kind", "receiver", "recent", "res", "rid", "sock", "task")

    def __init__(self, sock: zmq.Socket[Any], ident: bytes, kind: bytes, task: Task, rid: int = 0,
                 res: ResultSpec | None = None):
        self.sock = sock
        self.ident = ident
        self.kind = kind
        self.task = task
        self.rid = rid  # input: the Submit to acknowledge
        self.res = res  # result: the engine's result head
        self.followers: list[Outbound] = []  # streams relaying this one (to its engine, to watching clients)
        self.recent: dict[tuple[int, int], Any] = {}  # (frame, chunk) -> the last committed chunks' buffers
        self.receiver: Receiver  # set by Relay._open

    @property
    def sizes(self) -> list[int]:
        return self.receiver.sizes


class Outbound:
    """A stream the controller sends from its store."""

    __slots__ = ("ident", "kind", "patient", "sender", "sock", "task_id")

    def __init__(self, sock: zmq.Socket[Any], ident: bytes, kind: bytes, task_id: str, sender: Sender,
                 patient: bool):
        self.sock = sock
        self.ident = ident
        self.kind = kind
        self.task_id = task_id
        self.sender = sender
        self.patient = patient  # an engine grants the first credit only when it reaches the task


class Relay:
    """Inbound and outbound streams of the controller. ``on_complete``/``on_failed`` are the gateway's."""

    def __init__(self, journal: Journal, settings: StreamSettings, send: SendFn,
                  on_complete: Callable[[Inbound], None], on_failed: Callable[[Inbound, str, str], None]):
        self.journal = journal
        self.settings = settings
        self._send = send
        self._on_complete = on_complete
        self._on_failed = on_failed
        self.inbound: dict[tuple[bytes, int], Inbound] = {}
        self.outbound: dict[tuple[bytes, int], Outbound] = {}
        self._sids = itertools.count(1)
        self._results: set[str] = set()  # task ids whose result is being received
        self._touched: dict[tuple[bytes, int], Inbound] = {}  # opened or fed this pass: credit after commit
        self._following: dict[str, set[bytes]] = {}  # task id -> clients fed by a follower stream
        self._inputs: dict[str, Inbound] = {}  # task id -> its arguments' stream, while incomplete
        self.counters: dict[str, int] = {"streams_in": 0, "streams_out": 0, "streams_failed": 0, "chunks": 0}

    # ------------------------------------------------------------------ inbound
    def open_input(self, sock: zmq.Socket[Any], ident: bytes, rid: int, task: Task, sid: int, sizes: list[int],
                   now: float) -> None:
        """A client announced a streamed task (the gateway schedules it now; it is recorded at completion)."""
        inb = self._open(Inbound(sock, ident, STREAM_INPUT, task, rid), sid, sizes, now)
        self._inputs[task.task_id] = inb
        self.journal.unrecorded.add(task.task_id)

    def fail_input(self, task_id: str, ename: str, evalue: str) -> None:
        """Abandon the arguments' stream of a task (it ended without them, e.g. its engine was lost)."""
        inb = self._inputs.get(task_id)
        if inb is not None:
            self._fail(inb, ename, evalue)

    def input_of(self, task_id: str) -> Inbound | None:
        """The inbound stream of a task's arguments while they are still arriving."""
        return self._inputs.get(task_id)

    def open_result(self, sock: zmq.Socket[Any], ident: bytes, task: Task, res: ResultSpec, sid: int,
                    sizes: list[int], now: float, watchers: tuple[bytes, ...] = (),
                    client_sock: zmq.Socket[Any] | None = None) -> list[tuple[bytes, int]] | None:
        """An engine announced a streamed result; None if one is being received for this task already.

        Each of ``watchers`` (client idents) gets a follower stream; returns ``(ident, stream id)`` of each,
        for the gateway to send the result heads.
        """
        tid = task.task_id
        if tid in self._results:
            return None
        self._results.add(tid)
        inb = self._open(Inbound(sock, ident, STREAM_RESULT, task, res=res), sid, sizes, now)
        heads: list[tuple[bytes, int]] = []
        if client_sock is not None:
            for w in watchers:
                fsid = self.open_out(client_sock, w, STREAM_RESULT, tid, sizes, now, follow=inb)
                heads.append((w, fsid))
            if heads:
                self._following[tid] = {w for w, _ in heads}
        return heads

    def following(self, task_id: str) -> set[bytes]:
        """Clients that were sent a task's streamed result by a follower (forgotten once asked)."""
        return self._following.pop(task_id, set())

    def _open(self, inb: Inbound, sid: int, sizes: list[int], now: float) -> Inbound:
        """Give ``inb`` a receiver writing each chunk to the store (and the last window of chunks into
        ``inb.recent``, for its followers) and start receiving."""
        chunk = self.journal.stream_chunk
        kind, tid, recent, keep = inb.kind, inb.task.task_id, inb.recent, self.settings.window

        def sink(frame: int, index: int, _off: int, data: Any) -> None:
            chunk(kind, tid, frame, index, data)
            recent[(frame, index)] = data
            if len(recent) > keep:
                del recent[next(iter(recent))]

        inb.receiver = Receiver(sid, sizes, keep, now, sink)
        key = (inb.ident, sid)
        old = self.inbound.pop(key, None)
        if old is not None:  # the sender reused a stream id: the old stream is dead
            self._fail(old, "StreamAborted", "the sender started another stream under the same id", tell=False)
        self.inbound[key] = inb
        self._touched[key] = inb
        self.journal.stream_begin(inb.kind, inb.task.task_id)
        self.counters["streams_in"] += 1
        return inb

    def on_chunk(self, sock: zmq.Socket[Any], ident: bytes, msg: Chunk, data: Any, now: float) -> None:
        key = (ident, msg.sid)
        inb = self.inbound.get(key)
        if inb is None:  # finished, failed or never known (a restarted controller): tell the sender once
            if msg.index == 0 or msg.index % 64 == 0:
                self._send(sock, ident, StreamAbort(msg.sid, "StreamAborted", "unknown stream"), [])
            return
        try:
            inb.receiver.accept(msg.index, data, now)
        except StreamCorrupted as exc:
            self._fail(inb, "StreamCorrupted", str(exc))
            return
        self.counters["chunks"] += 1
        self._touched[key] = inb

    def corrupted(self, ident: bytes, sid: int | None) -> None:
        """A message that failed authentication claimed to be a chunk of stream ``sid`` from ``ident``."""
        inb = self.inbound.get((ident, sid)) if sid is not None else None
        if inb is not None:
            self._fail(inb, "StreamCorrupted", f"a chunk of stream {sid} failed authentication; stream aborted")

    def after_commit(self, refused: str, now: float) -> None:
        """The pass's chunks were committed (``refused`` empty) or refused: complete, fail or grant credit."""
        touched, self._touched = self._touched, {}
        for key, inb in touched.items():
            if self.inbound.get(key) is not inb:
                continue
            if refused:
                self._fail(inb, "StoreFull" if refused.startswith("StoreFull") else "StreamAborted",
                           f"the controller's store refused the stream: {refused}")
                continue
            if inb.followers:
                got = inb.receiver.next
                for out in inb.followers:
                    if out.sender.available < got:
                        out.sender.available = got
                        out.sender.touched = now
            if inb.receiver.done:
                del self.inbound[key]
                self._results.discard(inb.task.task_id)
                self._inputs.pop(inb.task.task_id, None)
                self._on_complete(inb)
            else:
                upto = inb.receiver.credit()
                if upto is not None:
                    self._send(inb.sock, inb.ident, Credit(inb.receiver.sid, upto), [])

    def _fail(self, inb: Inbound, ename: str, evalue: str, *, tell: bool = True) -> None:
        """Abandon an inbound stream: free its stored chunks, tell the sender, let the gateway fail the task."""
        key = (inb.ident, inb.receiver.sid)
        if self.inbound.get(key) is inb:
            del self.inbound[key]
        self._touched.pop(key, None)
        self._results.discard(inb.task.task_id)
        self._inputs.pop(inb.task.task_id, None)
        self.journal.stream_drop(inb.kind, inb.task.task_id)
        self._restart_followers(inb, f"{ename}: {evalue}")
        self.counters["streams_failed"] += 1
        log.warning("stream %d of task %s from %r failed: %s: %s", inb.receiver.sid, inb.task.task_id, inb.ident,
                    ename, evalue)
        if tell:
            self._send(inb.sock, inb.ident, StreamAbort(inb.receiver.sid, ename, evalue), [])
        self._on_failed(inb, ename, evalue)

    def _restart_followers(self, inb: Inbound, why: str) -> None:
        """The payload the followers relay will not arrive whole: abort them (a client then keeps waiting)."""
        for out in inb.followers:
            if self.outbound.pop((out.ident, out.sender.sid), None) is not None:
                self._send(out.sock, out.ident, StreamAbort(out.sender.sid, "StreamRestarted", why), [])
        inb.followers = []
        self._following.pop(inb.task.task_id, None)

    def abort_followers(self, task_id: str, why: str) -> None:
        """Stop relaying a task's arguments to its engine (the submission was refused after all)."""
        for out in [o for o in self.outbound.values() if o.task_id == task_id and o.kind == STREAM_INPUT]:
            self.outbound.pop((out.ident, out.sender.sid), None)
            self._send(out.sock, out.ident, StreamAbort(out.sender.sid, "StreamAborted", why), [])

    # ------------------------------------------------------------------ outbound
    def open_out(self, sock: zmq.Socket[Any], ident: bytes, kind: bytes, task_id: str, sizes: list[int],
                 now: float, *, patient: bool = False, follow: Inbound | None = None) -> int:
        """Send a stored payload to ``ident`` as a stream; returns its stream id (for the head).

        ``patient``: the receiver (an engine, busy with earlier tasks) may take any time to grant its first
        credit; the stream timeout counts only from then (a lost engine drops its streams anyway).
        """
        sid = next(self._sids)
        get = self.journal.store.get_chunk
        recent = follow.recent if follow is not None else None

        def source(frame: int, chunk: int, _off: int, _n: int) -> Any:
            if recent is not None:
                data = recent.get((frame, chunk))
                if data is not None:
                    return data
            return get(kind, task_id, frame, chunk)

        out = Outbound(sock, ident, kind, task_id, Sender(sid, sizes, source, now), patient)
        if follow is not None:
            out.sender.available = follow.receiver.next
            follow.followers.append(out)
        self.outbound[(ident, sid)] = out
        self.counters["streams_out"] += 1
        return sid

    def on_credit(self, ident: bytes, msg: Credit, now: float) -> None:
        out = self.outbound.get((ident, msg.sid))
        if out is not None:
            out.sender.grant(msg.upto, now)

    def on_abort(self, ident: bytes, msg: StreamAbort) -> None:
        """The other end gave up on a stream (either direction)."""
        out = self.outbound.pop((ident, msg.sid), None)
        if out is not None:
            log.info("receiver %r abandoned stream %d of task %s: %s: %s", ident, msg.sid, out.task_id, msg.ename,
                     msg.evalue)
        inb = self.inbound.get((ident, msg.sid))
        if inb is not None:
            self._fail(inb, "StreamAborted", f"the sender abandoned the stream: {msg.ename}: {msg.evalue}", tell=False)

    def pump(self) -> None:
        """Send the chunks credit allows (at most ``PUMP_CHUNKS`` per pass, spread over the streams)."""
        budget = PUMP_CHUNKS
        for key, out in list(self.outbound.items()):
            if budget <= 0:
                return
            s = out.sender
            for index, data in s.ready(budget):
                budget -= 1
                if data is None or len(data) != s.length(index):  # purged meanwhile
                    self.outbound.pop(key, None)
                    gone = f"task {out.task_id}'s payload is no longer stored"
                    self._send(out.sock, out.ident, StreamAbort(s.sid, "StreamAborted", gone), [])
                    break
                if not self._send(out.sock, out.ident, Chunk(s.sid, index), [data]):
                    self.outbound.pop(key, None)
                    break
            if s.done:
                self.outbound.pop(key, None)

    def has_ready(self) -> bool:
        """True when some outbound stream may send now (the loop should not sleep)."""
        return any(o.sender.next < min(o.sender.upto, o.sender.available) for o in self.outbound.values())

    # ------------------------------------------------------------------ housekeeping
    def expire(self, now: float) -> None:
        """Abandon streams without progress for the stream timeout."""
        timeout = self.settings.timeout
        for inb in [i for i in self.inbound.values() if i.receiver.idle(now, timeout)]:
            what = "arguments" if inb.kind == STREAM_INPUT else "result"
            self._fail(inb, "StreamTimeout",
                       f"no chunk of task {inb.task.task_id}'s {what} for {timeout:.0f}s ({inb.receiver.next} of "
                       f"{len(inb.receiver)} chunks received): the sender stalled or died")
        for key in [k for k, o in self.outbound.items()
                    if o.sender.idle(now, timeout) and not (o.patient and o.sender.upto == 0)]:
            out = self.outbound.pop(key)
            log.warning("stream %d of task %s to %r: no credit for %.0fs; dropped", out.sender.sid, out.task_id,
                        out.ident, timeout)

    def drop_peer(self, ident: bytes) -> None:
        """A peer is gone (an engine was lost): forget its streams; the gateway deals with their tasks."""
        for key in [k for k in self.outbound if k[0] == ident]:
            del self.outbound[key]
        for key in [k for k in self.inbound if k[0] == ident]:
            inb = self.inbound.pop(key)
            self._touched.pop(key, None)
            self._results.discard(inb.task.task_id)
            self.journal.stream_drop(inb.kind, inb.task.task_id)
            self._restart_followers(inb, "the engine sending the result was lost")
        for inb in self._inputs.values():  # arguments on their way to that engine: it will not take them
            inb.followers = [o for o in inb.followers if o.ident != ident]

    def receiving_result(self, task_id: str) -> bool:
        return task_id in self._results

    def stats(self) -> dict[str, int]:
        return {**self.counters, "streams_inbound": len(self.inbound), "streams_outbound": len(self.outbound)}

