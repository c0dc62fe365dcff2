"""The engine's side of chunk streams (``fedpar.wire.streams``), run inline on its main thread.

Large task arguments are received into their final memory before the task runs (from the controller, or
straight from the client over a direct-stream socket, ``fedpar.wire.direct``); large results are sent as a
stream after it (straight to the client for a pull that offered it, else through the controller).
Messages that are not part of the stream in progress wait in ``backlog`` for the main loop.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from fedpar.errors import ProtocolError, StreamAborted, StreamCorrupted, StreamError, StreamTimeout
from fedpar.wire.codec import Codec, Received
from fedpar.wire.direct import OFFER, EngineLinks
from fedpar.wire.protocol import Chunk, Credit, Results, ResultSpec, StreamAbort
from fedpar.wire.streams import (
    DELIVERED,
    Receiver,
    Sender,
    StreamSettings,
    frame_size,
    memory_source,
    parse_head,
    untrusted_chunk_sid,
)
from fedpar.wire.transport import recv_parts, send_parts

log = logging.getLogger(__name__)

DIRECT_FIRST_WAIT = 5.0  # seconds a client offering a direct stream has to answer (else: via the controller)


class StreamIO:
    """Stream state of one engine: settings, stream ids, backlog and direct-stream connections.

    ``stopping()`` says the engine is stopping; ``sent(task_id)`` records that a task's result is out;
    ``report(sock, codec, results, frames)`` sends ordinary results (a failed stream's error)."""

    def __init__(self, links: EngineLinks, stopping: Callable[[], bool], sent: Callable[[str], None],
                 report: Callable[[zmq.Socket[Any], Codec, list[ResultSpec], list[Any]], None]):
        self.links = links
        self.stopping = stopping
        self.sent = sent
        self.report = report
        self.settings = StreamSettings()  # the cluster's, from the controller's welcome
        self.sids = itertools.count(1)
        self.backlog: deque[Received] = deque()  # messages read while a stream was in progress

    def next_message(self, sock: zmq.Socket[Any], codec: Codec, sid: int, deadline: float,
                      backlog: bool = True) -> Received | None:
        """The next message of stream ``sid`` (a chunk, credit or abort) within ``deadline``; other messages
        go to the backlog (``backlog``: the task socket) or are dropped (a direct-stream socket). None on
        timeout. Raises ``StreamCorrupted`` for a chunk failing authentication."""
        while True:
            left = deadline - time.monotonic()
            if self.stopping():
                raise StreamAborted("the engine is stopping")
            if left <= 0 or not sock.poll(int(min(left, 0.2) * 1000) + 1):
                if left <= 0:
                    return None
                if not backlog and self.links.gone(sock):
                    raise StreamAborted("the client's direct-stream connection closed (it died or closed)")
                continue
            parts = recv_parts(sock)
            try:
                rx = codec.decode(parts)
            except ProtocolError as exc:
                if untrusted_chunk_sid(parts) == sid:
                    raise StreamCorrupted(f"a chunk of stream {sid} failed authentication ({exc})") from None
                log.warning("dropped a bad message on the task socket: %s", exc)
                continue
            msg = rx.msg
            if isinstance(msg, (Chunk, Credit, StreamAbort)):
                if msg.sid == sid:
                    return rx
                continue  # a stream that is over
            if backlog:
                self.backlog.append(rx)

    def receive_args(self, sock: zmq.Socket[Any], codec: Codec, head: Any, spec: dict[str, Any]) -> list[Any]:
        """A task's streamed arguments: from the controller, or straight from the client if it offered them."""
        if OFFER not in spec:
            return self.receive_stream(sock, codec, head)
        direct = self.links.socket_for(spec)
        if direct is None:
            raise StreamAborted("the client offering the task's arguments directly is gone (or on another host)")
        try:
            return self.receive_stream(direct, codec, head, backlog=False)
        except StreamError:
            self.links.forget(direct)
            raise

    def receive_stream(self, sock: zmq.Socket[Any], codec: Codec, head: Any, backlog: bool = True) -> list[Any]:
        """Receive a task's streamed arguments into their final memory (one bytearray per frame)."""
        sid, sizes = parse_head(head)
        timeout = self.settings.timeout
        rec = Receiver(sid, sizes, self.settings.window, time.monotonic())
        try:
            while not rec.done:
                upto = rec.credit()
                if upto is not None:
                    send_parts(sock, codec.encode(Credit(sid, upto))[0])
                rx = self.next_message(sock, codec, sid, rec.touched + timeout, backlog)
                if rx is None:
                    raise StreamTimeout(f"no chunk of the task's arguments for {timeout:.0f}s "
                                        f"({rec.next} of {len(rec)} received)")
                msg = rx.msg
                if isinstance(msg, StreamAbort):
                    raise StreamAborted(f"the sender abandoned the arguments' stream: {msg.ename}: {msg.evalue}")
                if isinstance(msg, Chunk):
                    rec.accept(msg.index, rx.frames[0], time.monotonic())
        except StreamError as exc:
            if not isinstance(exc, StreamAborted):
                send_parts(sock, codec.encode(StreamAbort(sid, type(exc).__name__, str(exc)))[0])
            raise
        return rec.frames()

    def stream_result(self, sock: zmq.Socket[Any], codec: Codec, res: ResultSpec, frames: list[Any],
                       direct: zmq.Socket[Any] | None = None) -> None:
        """Send a large result as a stream: straight to the client on ``direct`` if given (the controller is
        then told it was ``DELIVERED``), else, or if that fails, through the controller."""
        if direct is not None:
            why = self.send_stream(direct, codec, res, frames, min(DIRECT_FIRST_WAIT, self.settings.timeout), False,
                                    acknowledged=True)
            if why is None:
                sizes = [frame_size(f) for f in frames]
                send_parts(sock, codec.encode(Results([res._replace(nframes=0, stream=[DELIVERED, sizes])]))[0])
                self.sent(res.task_id)
                return
            log.info("direct stream of task %s's result failed (%s: %s); sending it through the controller",
                     res.task_id, *why)
            self.links.forget(direct)
        why = self.send_stream(sock, codec, res, frames, self.settings.timeout, True)
        if why is not None and not why[1].startswith("duplicate"):  # report the failure, so the task does not hang
            ename, evalue = why
            log.warning("could not stream the result of task %s: %s: %s", res.task_id, ename, evalue)
            err = res._replace(ok=False, nframes=0, stream=None,
                               error=[f"fedpar.{ename}", f"the result stream failed: {ename}: {evalue}", ""])
            self.report(sock, codec, [err], [])
            return
        self.sent(res.task_id)  # (a "duplicate" abort: the task is finished already, nothing is lost)

    def send_stream(self, sock: zmq.Socket[Any], codec: Codec, res: ResultSpec, frames: list[Any],
                     first_wait: float, backlog: bool, acknowledged: bool = False) -> tuple[str, str] | None:
        """Send ``res``'s head then its chunks as credit arrives; (error class, message) if it fails.

        ``acknowledged`` (a direct stream): done only when the receiver confirms it took every chunk (a
        ``Credit`` covering the whole stream, arriving after the last chunk was sent)."""
        sid = next(self.sids)
        sizes = [frame_size(f) for f in frames]
        timeout = self.settings.timeout
        sender = Sender(sid, sizes, memory_source(frames), time.monotonic())
        send_parts(sock, codec.encode(Results([res._replace(nframes=0, stream=[sid, sizes])]))[0])
        try:
            while not sender.done:
                wait = timeout if sender.upto else first_wait
                rx = self.next_message(sock, codec, sid, sender.touched + wait, backlog)
                if rx is None:
                    return "StreamTimeout", f"the receiver granted no credit for {wait:.0f}s"
                msg = rx.msg
                if isinstance(msg, StreamAbort):
                    return msg.ename, msg.evalue
                if isinstance(msg, Credit):
                    sender.grant(msg.upto, time.monotonic())
                    for index, data in sender.ready():
                        send_parts(sock, codec.encode(Chunk(sid, index), [data])[0])
            while acknowledged:
                rx = self.next_message(sock, codec, sid, time.monotonic() + first_wait, backlog)
                if rx is None:
                    return "StreamTimeout", f"the receiver did not acknowledge the stream within {first_wait:.0f}s"
                if isinstance(rx.msg, StreamAbort):
                    return rx.msg.ename, rx.msg.evalue
                if isinstance(rx.msg, Credit) and rx.msg.upto >= len(sender):
                    break
        except StreamError as exc:
            return type(exc).__name__, str(exc)
        return None

