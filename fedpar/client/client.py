"""``Client``: the user's connection to a cluster. One background I/O thread owns its socket.

User threads never touch the socket: they queue outgoing messages and wake the I/O thread, which
coalesces queued task submissions into one ``Submit`` batch, signs, sends, and hands results to the
waiting ``AsyncResult`` objects. Large payloads go out and come in as chunk streams (``fedpar.wire.streams``),
also driven by the I/O thread.

(Over the 500-line soft cap, about 790 lines: ``Client`` is the public API and carries its docstrings; the
stream bookkeeping that needs its own logic lives in ``streams`` and ``direct``; what remains here is the
I/O thread's half of it, which shares the thread's socket, codec and resync state and cannot move without
them.)
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from fedpar.client.results import AsyncResult, as_list, first
from fedpar.errors import (
    ControllerUnavailable,
    FedparError,
    ProtocolError,
    ResultNotFound,
    StreamCorrupted,
    StreamError,
    StreamTimeout,
    TimeoutError,
    UnknownEngineError,
)
from fedpar.runtime import ConnectionInfo, read_connection_file
from fedpar.store.records import TaskRecord
from fedpar.wire.codec import Codec, Received
from fedpar.wire.direct import OFFER, ClientLink, wants_direct
from fedpar.wire.protocol import (
    Abort,
    AbortReply,
    Chunk,
    ClientHello,
    Credit,
    EngineEvent,
    ErrorReply,
    GetResults,
    Message,
    PurgeReply,
    PurgeResults,
    QueryTasks,
    Results,
    ResultSpec,
    Shutdown,
    ShutdownReply,
    StatusReply,
    StatusRequest,
    StreamAbort,
    Submit,
    SubmitReply,
    TaskList,
    TaskSpec,
    Welcome,
)
from fedpar.wire.streams import (
    Receiver,
    Sender,
    StreamSettings,
    frame_size,
    memory_source,
    parse_head,
    should_stream,
    untrusted_chunk_sid,
)
from fedpar.wire.transport import NOBLOCK, Waker, connect_dealer, readable, recv_parts, send_parts

if TYPE_CHECKING:
    from fedpar.client.executor import FedparExecutor
    from fedpar.client.views import DirectView, LoadBalancedView

log = logging.getLogger(__name__)

SUBMIT_BATCH = 4096  # most tasks coalesced into one Submit message
SUBMIT_BATCH_BYTES = 8 << 20
PING_INTERVAL = 1.0  # with work outstanding, ping a silent controller this often (detects a restart)


def _nbytes(frames: Sequence[Any]) -> int:
    return sum(memoryview(f).nbytes for f in frames)


def _task_ids(jobs: str | Sequence[str] | AsyncResult) -> list[str]:
    """The task ids a ``jobs`` argument names: one id, several, or an ``AsyncResult``'s."""
    if isinstance(jobs, AsyncResult):
        return jobs.task_ids
    return [jobs] if isinstance(jobs, str) else list(jobs)


class _IOThread(threading.Thread):
    """Owns the DEALER socket: sends queued messages, receives and dispatches replies."""

    def __init__(self, client: Client, sock: zmq.Socket[Any], codec: Codec):
        super().__init__(name="fedpar-client-io", daemon=True)
        self.client = client
        self.sock = sock
        self.codec = codec
        self.waker = Waker()
        self.outbox: deque[tuple[Message | TaskSpec, list[Any], Future[Received] | None]] = deque()
        self.replies: dict[int, Future[Received]] = {}
        self.running = True
        # Tasks sent but not yet acknowledged: sent again if the controller restarts before its ack.
        self.unacked: dict[str, tuple[TaskSpec, list[Any]]] = {}
        # Task ids whose result the controller owes us: submissions it acknowledged and results we asked
        # for. After a restart exactly these are asked for again (never ids it has not heard of yet).
        self.expected: set[str] = set()
        self.epoch: int | None = None  # the controller incarnation we talk to
        self.last_heard = time.monotonic()
        self.last_ping = 0.0
        # Streams (large payloads): uploads of task arguments by stream id, downloads of results.
        self.settings = StreamSettings()
        self.sids = itertools.count(1)
        self.senders: dict[int, tuple[str, Sender]] = {}
        self.upload_of: dict[str, int] = {}  # task id -> stream id of its upload
        self.receivers: dict[int, tuple[ResultSpec, Receiver]] = {}
        self.link: ClientLink | None = None  # direct streams with engines on this host, bound when first offered
        self.poller = zmq.Poller()

    def queue(self, item: Message | TaskSpec, frames: list[Any], reply: Future[Received] | None = None) -> None:
        self.outbox.append((item, frames, reply))
        self.waker.wake()

    def run(self) -> None:
        poller = self.poller
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.waker.fileno(), zmq.POLLIN)
        try:
            while self.running:
                ready = dict(poller.poll(int(PING_INTERVAL * 1000)))
                if self.waker.fileno() in ready:
                    self.waker.drain()
                    self._flush()
                now = time.monotonic()
                if (now - self.last_heard > PING_INTERVAL and now - self.last_ping > PING_INTERVAL
                        and (self.unacked or self.client._waiting)):
                    self.last_ping = now
                    self._send(ClientHello(self.client.sender), [], None)
                    lost_after = self.client.lost_after
                    if lost_after is not None and now - self.last_heard > lost_after:
                        self.unacked.clear()
                        self.client._fail_all(ControllerUnavailable(
                            f"the controller at {self.client.info.client_endpoint} has been silent for "
                            f"{now - self.last_heard:.0f}s; results already stored stay retrievable with "
                            "get_result() if it comes back"))
                if self.sock in ready:
                    for _ in range(1024):
                        if not readable(self.sock):
                            break
                        self._on_message(recv_parts(self.sock, NOBLOCK))
                link = self.link
                if link is not None:
                    if link.sock in ready:
                        self._on_direct(link)
                    if link.busy:
                        link.expire(time.monotonic())
                if self.senders or self.receivers:
                    self._expire_streams(time.monotonic())
        except Exception:  # pragma: no cover - a bug here must not hang the user silently
            log.exception("client I/O thread failed")
            self.client._fail_all(ControllerUnavailable("the client's I/O thread failed; see the log"))
        finally:
            if self.link is not None:
                self.link.close()
            self.sock.close(0)
            self.waker.close()

    def _flush(self) -> None:
        out = self.outbox
        while out:
            item, frames, reply = out.popleft()
            if isinstance(item, TaskSpec):
                specs: list[TaskSpec] = []
                allframes: list[Any] = []
                size = 0
                out.appendleft((item, frames, reply))
                while (out and isinstance(out[0][0], TaskSpec) and len(specs) < SUBMIT_BATCH
                       and size < SUBMIT_BATCH_BYTES):
                    nxt, nframes, _ = out.popleft()
                    assert isinstance(nxt, TaskSpec)
                    if nxt.spec.get(OFFER) is True:  # may go straight to the engine: offer this client's socket
                        nxt = self._offer(nxt)
                    specs.append(nxt)
                    self.unacked[nxt.task_id] = (nxt, nframes)
                    if "stream" in nxt.spec:  # large arguments: sent as a stream when the controller grants credit
                        self._open_upload(nxt, nframes)
                    else:
                        allframes.extend(nframes)
                        size += _nbytes(nframes)
                self._send(Submit(specs), allframes, None)
            else:
                self._send(item, frames, reply)

    def _send(self, msg: Message, frames: list[Any], reply: Future[Received] | None) -> None:
        if isinstance(msg, GetResults):
            self.expected.update(msg.task_ids)
        parts, rid = self.codec.encode(msg, frames)
        if reply is not None:
            self.replies[rid] = reply
        send_parts(self.sock, parts)

    def _on_message(self, parts: list[Any]) -> None:
        try:
            rx = self.codec.decode(parts)
        except ProtocolError as exc:
            log.warning("dropped a bad message from the controller: %s", exc)
            if self.receivers:
                sid = untrusted_chunk_sid(parts)
                if sid in self.receivers:
                    self._abort_download(sid, StreamCorrupted(
                        f"a chunk of stream {sid} failed authentication ({exc}); stream aborted"))
            return
        msg = rx.msg
        self.last_heard = time.monotonic()
        if self.epoch != rx.envelope.epoch:
            if self.epoch is not None:
                self._resync(rx.envelope.epoch)
            self.epoch = rx.envelope.epoch
        if isinstance(msg, Chunk):
            self._on_chunk(msg, rx.frames[0])
        elif isinstance(msg, Credit):
            got = self.senders.get(msg.sid)
            if got is not None:
                self._pump(got[1], msg.upto)
        elif isinstance(msg, Results):
            expected = self.expected
            results = msg.results
            frames = rx.frames
            if self.unacked:  # a result acknowledges its task (the controller may skip the SubmitReply)
                implied = [r.task_id for r in results if self.unacked.pop(r.task_id, None) is not None]
                if implied:
                    self.client._on_accepted(implied)
            if self.link is not None:  # outcomes end direct uploads/downloads; DELIVERED notices are handled
                results = self.link.outcomes(results)
            if any(r.stream is not None for r in results):  # large results follow as streams
                results, frames = self._open_downloads(results, frames)
            for r in results:
                expected.discard(r.task_id)
            expected.difference_update(msg.missing)
            self.client._on_results(results, frames, msg.missing)
            fut = self.replies.pop(msg.reply_to, None) if msg.reply_to else None
            if fut is not None:
                fut.set_result(rx)
        elif isinstance(msg, SubmitReply):
            for tid in msg.accepted:
                self.unacked.pop(tid, None)
            self.expected.update(msg.accepted)
            self.client._on_accepted(msg.accepted)
            if self.upload_of:
                for tid in msg.accepted:
                    self._close_upload(tid, acked=True)
            if msg.rejected:
                for tid, *_ in msg.rejected:
                    self.unacked.pop(tid, None)
                    self._close_upload(tid)
                self.client._on_rejected(msg.rejected)
        elif isinstance(msg, StreamAbort):
            self._on_stream_abort(msg)
        elif isinstance(msg, EngineEvent):
            self.client._on_engine_event(msg.registered, msg.unregistered)
        else:
            rid = getattr(msg, "reply_to", None)
            fut = self.replies.pop(rid, None) if isinstance(rid, int) else None
            if fut is not None:
                fut.set_result(rx)


    # ------------------------------------------------------------------ streams
    def _open_upload(self, spec: TaskSpec, frames: list[Any]) -> None:
        sid, sizes = spec.spec["stream"]
        self.senders[sid] = (spec.task_id, Sender(sid, sizes, memory_source(frames), time.monotonic()))
        self.upload_of[spec.task_id] = sid
        if self.link is not None and OFFER in spec.spec:  # or the engine asks for it directly
            self.link.keep_upload(spec.task_id, sid, sizes, frames)

    def _close_upload(self, task_id: str, acked: bool = False) -> None:
        """Forget an upload. On its acknowledgement an upload the controller took no chunk of goes direct: the
        arguments stay on offer to the engine (``fedpar.wire.direct``) until the task's outcome arrives."""
        sid = self.upload_of.pop(task_id, None)
        if sid is not None:
            got = self.senders.pop(sid, None)
            if acked and got is not None and got[1].next == 0 and self.link is not None:
                return
        if self.link is not None:
            self.link.drop_upload(task_id)

    # ------------------------------------------------------------------ direct streams (fedpar.wire.direct)
    def _offer(self, spec: TaskSpec) -> TaskSpec:
        """``spec`` with this client's direct-stream offer (binding its socket the first time), or without."""
        if self.link is None:
            try:
                self.link = ClientLink(self.client._ctx, self.codec, self.settings)
            except FedparError as exc:
                log.warning("no direct streams: %s", exc)
                self.settings = replace(self.settings, direct=False)
                return spec._replace(spec={k: v for k, v in spec.spec.items() if k != OFFER})
            self.poller.register(self.link.sock, zmq.POLLIN)
        return spec._replace(spec={**spec.spec, OFFER: self.link.offer})

    def _on_direct(self, link: ClientLink) -> None:
        """Messages from engines on the direct-stream socket; completed downloads become results."""
        waiting = self.client._waiting
        for _ in range(1024):
            if not readable(link.sock):
                return
            for res, frames in link.on_message(recv_parts(link.sock, NOBLOCK), waiting.__contains__,
                                               time.monotonic()):
                self.expected.discard(res.task_id)
                link.drop_upload(res.task_id)
                self.client._on_results([res], frames, [])


    def _pump(self, sender: Sender, upto: int) -> None:
        sender.grant(upto, time.monotonic())
        sid = sender.sid
        for index, data in sender.ready():
            self._send(Chunk(sid, index), [data], None)

    def _open_downloads(self, results: list[ResultSpec], frames: list[Any]) -> tuple[list[ResultSpec], list[Any]]:
        """Start receiving the streamed results of a ``Results`` message; returns the inline ones."""
        inline: list[ResultSpec] = []
        inline_frames: list[Any] = []
        pos = 0
        now = time.monotonic()
        for r in results:
            fr = frames[pos:pos + r.nframes]
            pos += r.nframes
            if r.stream is None:
                inline.append(r)
                inline_frames.extend(fr)
                continue
            try:
                sid, sizes = parse_head(r.stream)
            except ProtocolError as exc:
                self.client._fail_task(r.task_id, StreamCorrupted(f"bad stream head: {exc}", task_id=r.task_id))
                continue
            rec = Receiver(sid, sizes, self.settings.window, now)
            self.receivers[sid] = (r, rec)
            upto = rec.credit()
            if upto is not None:
                self._send(Credit(sid, upto), [], None)
        return inline, inline_frames

    def _on_chunk(self, msg: Chunk, data: Any) -> None:
        got = self.receivers.get(msg.sid)
        if got is None:
            return  # a stream abandoned already
        spec, rec = got
        try:
            rec.accept(msg.index, data, time.monotonic())
        except StreamCorrupted as exc:
            self._abort_download(msg.sid, exc)
            return
        if rec.done:
            del self.receivers[msg.sid]
            self.expected.discard(spec.task_id)
            frames = rec.frames()
            self.client._on_results([spec._replace(nframes=len(frames), stream=None)], frames, [])
            return
        upto = rec.credit()
        if upto is not None:
            self._send(Credit(msg.sid, upto), [], None)

    def _abort_download(self, sid: int, exc: StreamError, tell: bool = True) -> None:
        got = self.receivers.pop(sid, None)
        if got is None:
            return
        tid = got[0].task_id
        self.expected.discard(tid)
        exc.task_id = tid
        if tell:
            self._send(StreamAbort(sid, type(exc).__name__, str(exc)), [], None)
        self.client._fail_task(tid, exc)

    def _on_stream_abort(self, msg: StreamAbort) -> None:
        """The controller gave up on a stream: an upload (it refuses the task separately) or a download."""
        got = self.senders.pop(msg.sid, None)
        if got is not None:
            self.upload_of.pop(got[0], None)
            return
        if msg.ename == "StreamRestarted":  # the engine's stream failed: the outcome comes separately
            self.receivers.pop(msg.sid, None)
            return
        if msg.sid in self.receivers:
            from fedpar import errors

            cls = getattr(errors, msg.ename, None)
            exc = cls(msg.evalue) if isinstance(cls, type) and issubclass(cls, StreamError) else None
            self._abort_download(msg.sid, exc or errors.StreamAborted(f"{msg.ename}: {msg.evalue}"), tell=False)

    def _expire_streams(self, now: float) -> None:
        timeout = self.settings.timeout
        for sid, (spec, rec) in list(self.receivers.items()):
            if rec.idle(now, timeout):
                self._abort_download(sid, StreamTimeout(
                    f"result of task {spec.task_id}: no chunk for {timeout:.0f}s ({rec.next} of {len(rec)} received)"))
        for sid, (tid, sender) in list(self.senders.items()):
            if sender.idle(now, timeout):  # the controller abandoned it (it refuses the task itself)
                del self.senders[sid]
                self.upload_of.pop(tid, None)

    def _resync(self, epoch: int) -> None:
        """The controller restarted: send unacknowledged tasks again (flagged, so a task it had already
        stored is not run twice) and ask again for every result still awaited."""
        log.warning("controller restarted (epoch %s -> %s); resynchronising %d unacknowledged task(s)",
                    self.epoch, epoch, len(self.unacked))
        self.senders.clear()
        self.upload_of.clear()  # (direct uploads stay on offer: a re-dispatched task is served again)
        self.receivers.clear()  # results being downloaded are in ``expected``: asked for again below
        resend: list[TaskSpec] = []
        frames: list[Any] = []
        for spec, fr in self.unacked.values():
            flags = {**spec.spec, "resubmit": True}
            if "stream" in spec.spec:
                flags["stream"] = [next(self.sids), spec.spec["stream"][1]]
                spec = spec._replace(spec=flags)
                self._open_upload(spec, fr)
            else:
                spec = spec._replace(spec=flags)
                frames.extend(fr)
            resend.append(spec)
        pos = 0
        for i in range(0, len(resend), SUBMIT_BATCH):
            chunk = resend[i:i + SUBMIT_BATCH]
            m = sum(s.nframes for s in chunk)
            self._send(Submit(chunk), frames[pos:pos + m], None)
            pos += m
        waiting = list(self.expected)
        for i in range(0, len(waiting), SUBMIT_BATCH):
            self._send(GetResults(waiting[i:i + SUBMIT_BATCH]), [], None)


class Client:
    """Connection to a running cluster.

    ``Client()`` reads the connection file of the default cluster; pass ``connection_file=`` (a path or
    a cluster id) for another. ``client.ids`` lists engine ids; ``client[:]``, ``client[0]`` and
    ``client[[0, 2]]`` are ``DirectView``s; ``client.load_balanced_view()`` spreads work over engines.

    If the controller restarts, the client reconnects and resynchronises by itself. If it stays silent for
    ``lost_after`` seconds while results are awaited, those fail with ``ControllerUnavailable`` (None: wait
    for ever).
    """

    def __init__(self, connection_file: str | os.PathLike[str] | ConnectionInfo | None = None, *,
                 timeout: float = 10.0, lost_after: float | None = 120.0):
        if isinstance(connection_file, ConnectionInfo):
            self.info = connection_file
        else:
            path = Path(connection_file) if isinstance(connection_file, os.PathLike) else connection_file
            self.info = read_connection_file(path)
        self.lost_after = lost_after  # fail waiting results after this long without a word from the controller
        self.sender = f"client:{secrets.token_hex(6)}"
        self._task_prefix = self.sender[7:] + "-"
        self._next_task = 0
        self._id_lock = threading.Lock()
        self._waiting: dict[str, list[tuple[AsyncResult, int]]] = {}
        self._wlock = threading.Lock()
        self._engines: set[int] = set()
        self._engines_cond = threading.Condition()
        self._closed = False
        self._ctx: zmq.Context[Any] = zmq.Context()
        sock = connect_dealer(self._ctx, self.info.client_endpoint, self.sender.encode())
        self._io = _IOThread(self, sock, Codec(self.info.key, self.sender))
        self._io.start()
        try:
            welcome = self._request(ClientHello(self.sender), timeout)
        except BaseException:
            self.close()
            raise
        assert isinstance(welcome, Welcome)
        self._io.settings = StreamSettings.from_wire(welcome.stream)
        self.controller_id = welcome.controller
        self._on_engine_event(welcome.engines, [])

    # ------------------------------------------------------------------ plumbing
    def _request(self, msg: Message, timeout: float | None, frames: list[Any] | None = None) -> Message:
        """Send a request and wait for its reply message."""
        if self._closed:
            raise FedparError("this client is closed")
        fut: Future[Received] = Future()
        self._io.queue(msg, frames or [], fut)
        try:
            rx = fut.result(timeout)
        except FuturesTimeout:
            raise ControllerUnavailable(
                f"the controller at {self.info.client_endpoint} did not answer within {timeout}s: is it "
                "running, and does the connection file belong to it (same cluster key)?"
            ) from None
        if isinstance(rx.msg, ErrorReply):
            from fedpar import errors

            cls = getattr(errors, rx.msg.ename, None)
            if isinstance(cls, type) and issubclass(cls, FedparError) and not issubclass(cls, errors.TaskError):
                raise cls(rx.msg.evalue)
            raise FedparError(f"{rx.msg.ename}: {rx.msg.evalue}")
        return rx.msg

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

    def _fail_task(self, task_id: str, exc: FedparError) -> None:
        with self._wlock:
            waiters = self._waiting.pop(task_id, ())
        for ar, i in waiters:
            ar._fail(i, exc)

    def _on_results(self, results: Sequence[ResultSpec], frames: list[Any], missing: Sequence[str]) -> None:
        pos = 0
        for spec in results:
            fr = frames[pos:pos + spec.nframes]
            pos += spec.nframes
            with self._wlock:
                waiters = self._waiting.pop(spec.task_id, ())
            for ar, i in waiters:
                ar._deliver(i, spec, fr)
        for tid in missing:
            with self._wlock:
                waiters = self._waiting.pop(tid, ())
            for ar, i in waiters:
                ar._fail(i, ResultNotFound(f"no task {tid!r} in the controller's store", task_id=tid))

    def _on_accepted(self, accepted: Sequence[str]) -> None:
        with self._wlock:
            waiting = self._waiting
            found = [w for tid in accepted for w in waiting.get(tid, ())]
        for ar, i in found:
            ar._accept(i)

    def _on_rejected(self, rejected: list[list[str]]) -> None:
        from fedpar import errors

        for tid, ename, evalue in rejected:
            with self._wlock:
                waiters = self._waiting.pop(tid, ())
            cls = getattr(errors, ename, None)
            exc: FedparError
            if isinstance(cls, type) and issubclass(cls, errors.TaskError):
                exc = cls(evalue, task_id=tid)
            elif isinstance(cls, type) and issubclass(cls, FedparError):
                exc = cls(evalue)  # e.g. StoreFull: the controller could not store the submission
            else:
                exc = errors.TaskAborted(f"{ename}: {evalue}", task_id=tid)
            for ar, i in waiters:
                ar._fail(i, exc)

    def _on_engine_event(self, registered: Iterable[int], unregistered: Iterable[int]) -> None:
        with self._engines_cond:
            self._engines.update(registered)
            self._engines.difference_update(unregistered)
            self._engines_cond.notify_all()

    def _fail_all(self, exc: FedparError) -> None:
        with self._wlock:
            waiting, self._waiting = self._waiting, {}
        err = exc if isinstance(exc, ControllerUnavailable) else ControllerUnavailable(str(exc))
        for waiters in waiting.values():
            for ar, i in waiters:
                ar._fail(i, err)

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
        """Results by task id, served from the controller's store (also long after completion).

        One id gives that task's value; a list gives a list. Unknown ids raise ``ResultNotFound``.
        """
        single = isinstance(task_ids, str)
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        request = GetResults(ids)  # validates the ids before anything is registered
        ar = AsyncResult(ids, first if single else as_list, label="get_result", sent=True, client=self)
        with self._wlock:
            for i, tid in enumerate(ids):
                self._waiting.setdefault(tid, []).append((ar, i))
        self._io.queue(request, [])
        return ar.get(timeout) if block else ar

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """Controller status: engines (with load), queued, in-flight, done and failed task counts."""
        reply = self._request(StatusRequest(), timeout)
        assert isinstance(reply, StatusReply)
        return {
            "controller": reply.controller, "epoch": reply.controller_epoch, "engines": reply.engines,
            "queued": reply.queued, "in_flight": reply.in_flight, "done": reply.done,
            "failed": reply.failed, **reply.stats,
        }

    queue_status = status

    def query_tasks(self, *, states: Sequence[str] | None = None, engine: int | None = None,
                    since: float | None = None, until: float | None = None, limit: int = 1000,
                    timeout: float = 30.0) -> list[TaskRecord]:
        """Task records from the controller's store, oldest first.

        ``states`` picks among ``"queued"``, ``"assigned"``, ``"done"``, ``"failed"``; ``engine`` the engine
        that ran (or runs) the task; ``since``/``until`` bound the submission time (``time.time()`` values).
        """
        reply = self._request(QueryTasks(list(states) if states is not None else None, engine, since, until,
                                         limit), timeout)
        assert isinstance(reply, TaskList)
        return [TaskRecord.from_row(r) for r in reply.rows]

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
        reply = self._request(Abort(ids), timeout)
        assert isinstance(reply, AbortReply)
        return reply.aborted

    def purge_results(self, jobs: str | Sequence[str] | AsyncResult | None = None, *, before: float | None = None,
                      everything: bool = False, timeout: float = 30.0) -> int:
        """Delete finished tasks from the controller's store: given ids (or an AsyncResult's), those finished
        before ``before`` (a ``time.time()`` value), or ``everything``. Tasks still running are kept.
        Returns how many were purged."""
        ids = _task_ids(jobs) if jobs is not None else []
        if not ids and before is None and not everything:
            raise ValueError("say what to purge: task ids, before=, or everything=True")
        reply = self._request(PurgeResults(ids, before, everything), timeout)
        assert isinstance(reply, PurgeReply)
        return reply.purged

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
        """Stop the cluster's engines and (unless ``engines_only``) its controller."""
        reply = self._request(Shutdown(engines_only), timeout)
        assert isinstance(reply, ShutdownReply)
        if not engines_only:
            self.close(timeout=1.0)  # (the controller's last acknowledgements follow its reply)
        return reply.engines

    def close(self, timeout: float | None = 10.0) -> None:
        """Disconnect.

        First waits (at most ``timeout`` seconds, and only while the controller answers) until the controller
        has stored every task this client submitted, so work submitted just before ``close`` runs and its
        results stay retrievable with ``get_result`` from another client. Results still pending are then
        failed here with ``ControllerUnavailable``.
        """
        if self._closed:
            return
        if self._io.is_alive():
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
        return f"<fedpar.Client {self.info.cluster_id} engines={self.ids}>"
