"""The client's large payloads: chunk streams through its controllers, and direct streams with engines.

Part of the client's I/O thread (``fedpar.client.io``), on which everything here runs. Uploads of task
arguments above the stream threshold go out chunk by chunk as the controller grants credit; results above it
come in the same way, into their final memory (``fedpar.wire.streams``). On one host, a push's arguments and
a pull's result may go straight between this client and the engine over a private unix socket
(``fedpar.wire.direct``), the controller only brokering the offer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import zmq

from fedpar.client.link import Link
from fedpar.errors import FedparError, ProtocolError, StreamCorrupted, StreamError, StreamTimeout
from fedpar.wire.direct import OFFER, ClientLink
from fedpar.wire.protocol import Chunk, Credit, ResultSpec, StreamAbort, TaskSpec
from fedpar.wire.streams import Receiver, Sender, memory_source, parse_head
from fedpar.wire.transport import NOBLOCK, readable, recv_parts

if TYPE_CHECKING:
    from fedpar.client.io import IOThread

log = logging.getLogger(__name__)


class Transfers:
    """Stream state of one client: uploads by our stream id, the direct-stream socket (bound when first
    offered); downloads live on their ``Link`` (the controller picks their stream ids)."""

    def __init__(self, io: IOThread):
        self.io = io
        self.senders: dict[int, tuple[str, Sender, Link]] = {}  # uploads by our stream id
        self.upload_of: dict[str, int] = {}
        self.direct: ClientLink | None = None  # direct streams with engines on this host

    def open_upload(self, link: Link, spec: TaskSpec, frames: list[Any]) -> None:
        sid, sizes = spec.spec["stream"]
        self.senders[sid] = (spec.task_id, Sender(sid, sizes, memory_source(frames), time.monotonic()), link)
        self.upload_of[spec.task_id] = sid
        if self.direct is not None and OFFER in spec.spec:  # or the engine asks for it directly
            self.direct.keep_upload(spec.task_id, sid, sizes, frames)

    def close_upload(self, task_id: str, acked: bool = False) -> None:
        """Forget an upload. On its acknowledgement an upload the controller took no chunk of goes direct: the
        arguments stay on offer to the engine (``fedpar.wire.direct``) until the task's outcome arrives."""
        sid = self.upload_of.pop(task_id, None)
        if sid is not None:
            got = self.senders.pop(sid, None)
            if acked and got is not None and got[1].next == 0 and self.direct is not None:
                return
        if self.direct is not None:
            self.direct.drop_upload(task_id)

    def offer(self, spec: TaskSpec) -> TaskSpec:
        """``spec`` with this client's direct-stream offer (binding its socket the first time), or without."""
        if self.direct is None:
            try:
                self.direct = ClientLink(self.io.client._ctx, self.io.codec, self.io.settings)
            except FedparError as exc:
                log.warning("no direct streams: %s", exc)
                self.io.settings = replace(self.io.settings, direct=False)
                return spec._replace(spec={k: v for k, v in spec.spec.items() if k != OFFER})
            self.io.poller.register(self.direct.sock, zmq.POLLIN)
        return spec._replace(spec={**spec.spec, OFFER: self.direct.offer})

    def on_direct(self, direct: ClientLink) -> None:
        """Messages from engines on the direct-stream socket; completed downloads become results."""
        waiting = self.io.client._waiting
        for _ in range(1024):
            if not readable(direct.sock):
                return
            for res, frames in direct.on_message(recv_parts(direct.sock, NOBLOCK), waiting.__contains__,
                                                 time.monotonic()):
                tr = self.io.tracks.pop(res.task_id, None)
                if tr is not None and tr.cid is not None and tr.cid in self.io.by_cid:
                    self.io.by_cid[tr.cid].expected.discard(res.task_id)
                direct.drop_upload(res.task_id)
                self.io.client._on_results([res], frames)

    def pump(self, link: Link, sender: Sender, upto: int) -> None:
        sender.grant(upto, time.monotonic())
        sid = sender.sid
        for index, data in sender.ready():
            self.io._send(link, Chunk(sid, index), [data], None)

    def open_downloads(self, link: Link, results: list[ResultSpec], frames: list[Any],
                        ) -> tuple[list[ResultSpec], list[Any]]:
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
                self.io.tracks.pop(r.task_id, None)
                self.io.client._fail_task(r.task_id, StreamCorrupted(f"bad stream head: {exc}", task_id=r.task_id))
                continue
            rec = Receiver(sid, sizes, self.io.settings.window, now)
            link.receivers[sid] = (r, rec)
            upto = rec.credit()
            if upto is not None:
                self.io._send(link, Credit(sid, upto), [], None)
        return inline, inline_frames

    def on_chunk(self, link: Link, msg: Chunk, data: Any) -> None:
        got = link.receivers.get(msg.sid)
        if got is None:
            return  # a stream abandoned already
        spec, rec = got
        try:
            rec.accept(msg.index, data, time.monotonic())
        except StreamCorrupted as exc:
            self.abort_download(link, msg.sid, exc)
            return
        if rec.done:
            del link.receivers[msg.sid]
            link.expected.discard(spec.task_id)
            self.io.tracks.pop(spec.task_id, None)
            frames = rec.frames()
            self.io.client._on_results([spec._replace(nframes=len(frames), stream=None)], frames)
            return
        upto = rec.credit()
        if upto is not None:
            self.io._send(link, Credit(msg.sid, upto), [], None)

    def abort_download(self, link: Link, sid: int, exc: StreamError, tell: bool = True) -> None:
        got = link.receivers.pop(sid, None)
        if got is None:
            return
        tid = got[0].task_id
        link.expected.discard(tid)
        exc.task_id = tid
        if tell:
            self.io._send(link, StreamAbort(sid, type(exc).__name__, str(exc)), [], None)
        self.io._fail(tid, exc)

    def on_stream_abort(self, link: Link, msg: StreamAbort) -> None:
        """The controller gave up on a stream: an upload (it refuses the task separately) or a download."""
        got = self.senders.pop(msg.sid, None)
        if got is not None and got[2] is link:
            self.upload_of.pop(got[0], None)
            return
        if got is not None:
            self.senders[msg.sid] = got
        if msg.ename == "StreamRestarted":  # the engine's stream failed: the outcome comes separately
            rec = link.receivers.pop(msg.sid, None)
            if rec is not None:
                tr = self.io.tracks.get(rec[0].task_id)
                if tr is not None:
                    tr.finished_there = False
            return
        if msg.sid in link.receivers:
            from fedpar import errors

            cls = getattr(errors, msg.ename, None)
            exc = cls(msg.evalue) if isinstance(cls, type) and issubclass(cls, StreamError) else None
            self.abort_download(link, msg.sid, exc or errors.StreamAborted(f"{msg.ename}: {msg.evalue}"), tell=False)

    def expire_streams(self, now: float) -> None:
        timeout = self.io.settings.timeout
        for link in list(self.io.links.values()):
            for sid, (spec, rec) in list(link.receivers.items()):
                if rec.idle(now, timeout):
                    self.abort_download(link, sid, StreamTimeout(
                        f"result of task {spec.task_id}: no chunk for {timeout:.0f}s ({rec.next} of {len(rec)} "
                        "received)"))
        for sid, (tid, sender, _link) in list(self.senders.items()):
            if sender.idle(now, timeout):  # the controller abandoned it (it refuses the task itself)
                del self.senders[sid]
                self.upload_of.pop(tid, None)
