"""Direct streams: on one host, large payloads go straight between a client and an engine.

Every byte that crosses the controller costs it a MAC check, a store write and a MAC for the next hop, on
one thread, on a host shared with the client and the engines: through the controller a 100 MB push+pull
runs at a third of what one unix-socket hop gives. So when a client and an engine share a host
(``[stream] direct``, on by default), the controller *brokers* the payloads it does not need to keep and
the bytes skip it:

* The client binds a ROUTER on a unix socket in a private directory (mode 0700: only its user can connect)
  and adds an *offer* ``[hostname, endpoint]`` to the tasks that may use it: large arguments of a task sent
  to a named engine (``push``, ``DirectView.apply``; such a task can only run there, so the controller
  never needs its arguments to retry it elsewhere) and ``pull`` tasks (a read of engine memory: running it
  again is its recovery, so its value need not be stored).
* The controller keeps the offer only if that engine registered from the client's host (else it strips it
  and the payload streams through it as usual), records and acknowledges the task at once, and dispatches
  it with the offer and the client's stream head.
* The engine, when it reaches the task, connects a DEALER to the offered endpoint and runs the ordinary
  stream protocol (``fedpar.wire.streams``) over it: it grants credit, the client sends chunks. A large pull
  result goes the other way: head and chunks to the client, which acknowledges the whole (a last ``Credit``
  after the last chunk); then the engine tells the controller the result was ``DELIVERED`` (the controller
  records that the value is not kept: ``get_result`` from elsewhere gets ``ResultNotFound`` saying so). If the
  direct stream fails (the client vanished, a chunk failed its MAC, no acknowledgement), the engine sends the
  result through the controller instead: nothing is lost.
* The client keeps a direct upload until the task's outcome arrives, so a controller restart that
  re-dispatches the task finds the arguments still on offer.

Every message on these sockets is signed with the cluster key exactly like the others; memory on both
ends stays one credit window per stream.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import zmq

from fedpar.errors import ProtocolError, StreamCorrupted
from fedpar.wire.codec import Codec
from fedpar.wire.protocol import Chunk, Credit, Message, Results, ResultSpec, StreamAbort
from fedpar.wire.streams import (
    DELIVERED,
    Receiver,
    Sender,
    StreamSettings,
    memory_source,
    not_kept,
    parse_head,
    untrusted_chunk_sid,
)
from fedpar.wire.transport import bind_ipc_router, connect_dealer, send_parts

log = logging.getLogger(__name__)

OFFER = "direct"  # task spec key of a direct-stream offer: [hostname, endpoint]
MAX_LINKS = 64  # client endpoints an engine keeps a connection to


def wants_direct(op: str, target: int | None, streamed: bool) -> bool:
    """True for the tasks a client offers a direct stream for (see the module docstring)."""
    return target is not None and (streamed or op == "pull")


def offer_of(spec: dict[str, Any]) -> tuple[str, str] | None:
    """The valid ``(hostname, endpoint)`` offer in a task spec, else None."""
    raw = spec.get(OFFER)
    if not (isinstance(raw, list) and len(raw) == 2):
        return None
    host, endpoint = raw
    if not (isinstance(host, str) and isinstance(endpoint, str) and 0 < len(host) <= 255
            and endpoint.startswith("ipc:///") and len(endpoint) <= 4096):
        return None
    return host, endpoint


def without_offer(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != OFFER}


class ClientLink:
    """The client's end of direct streams; driven by the client's I/O thread (which polls ``sock``)."""

    def __init__(self, ctx: zmq.Context[Any], codec: Codec, settings: StreamSettings):
        self._dir = tempfile.mkdtemp(prefix="fedpar-")  # 0700: the socket is reachable by this user only
        try:
            self.sock, self.endpoint = bind_ipc_router(ctx, os.path.join(self._dir, "data"))
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self.offer = [socket.gethostname(), self.endpoint]
        self.settings = settings
        self._codec = codec
        self._uploads: dict[int, tuple[str, list[int], list[Any]]] = {}  # sid -> (task id, sizes, frames)
        self._upload_sid: dict[str, int] = {}
        self._senders: dict[tuple[bytes, int], Sender] = {}  # (engine, sid) -> one engine's pass over an upload
        self._receivers: dict[tuple[bytes, int], tuple[ResultSpec, Receiver]] = {}
        self._downloading: dict[str, tuple[bytes, int]] = {}  # task id -> its receiver's key

    # ------------------------------------------------------------------ uploads
    def keep_upload(self, task_id: str, sid: int, sizes: list[int], frames: list[Any]) -> None:
        """Offer a task's arguments to whichever engine asks for stream ``sid`` (until ``drop_upload``)."""
        self.drop_upload(task_id)
        self._uploads[sid] = (task_id, sizes, frames)
        self._upload_sid[task_id] = sid

    def drop_upload(self, task_id: str) -> None:
        sid = self._upload_sid.pop(task_id, None)
        if sid is not None:
            del self._uploads[sid]
            for key in [k for k in self._senders if k[1] == sid]:
                del self._senders[key]

    def uploading(self, task_id: str) -> bool:
        return task_id in self._upload_sid

    # ------------------------------------------------------------------ downloads
    def downloading(self, task_id: str) -> bool:
        return task_id in self._downloading

    def drop_download(self, task_id: str, why: str) -> None:
        """Stop receiving a task's result directly (its outcome came from the controller)."""
        key = self._downloading.get(task_id)
        if key is not None:
            self._abort(key, "StreamAborted", why)

    def _abort(self, key: tuple[bytes, int], ename: str, evalue: str) -> None:
        got = self._receivers.pop(key, None)
        if got is not None:
            self._downloading.pop(got[0].task_id, None)
        self._send(key[0], StreamAbort(key[1], ename, evalue))

    def outcomes(self, results: list[ResultSpec]) -> list[ResultSpec]:
        """Outcomes from the controller, seen by the direct side: an outcome ends the task's direct upload
        (and a direct download still running: the controller's word is final, e.g. the engine died); a
        ``DELIVERED`` notice is dropped while the result is arriving here, else it says it is not kept."""
        out: list[ResultSpec] = []
        for r in results:
            self.drop_upload(r.task_id)
            delivered = isinstance(r.stream, list) and len(r.stream) == 2 and r.stream[0] == DELIVERED
            if self.downloading(r.task_id):
                if delivered:
                    continue
                self.drop_download(r.task_id, "the controller reported the task's outcome")
            if delivered:
                r = r._replace(ok=False, nframes=0, stream=None,
                               error=["fedpar.ResultNotFound", not_kept(r.task_id), ""])
            out.append(r)
        return out

    # ------------------------------------------------------------------ messages
    @property
    def busy(self) -> bool:
        return bool(self._senders or self._receivers)

    def on_message(self, parts: list[Any], wants: Callable[[str], bool], now: float,
                   ) -> list[tuple[ResultSpec, list[Any]]]:
        """Handle one message from an engine; returns the results it completed (spec, frames)."""
        ident = parts[0]
        try:
            rx = self._codec.decode(parts, 1)
        except ProtocolError as exc:
            sid = untrusted_chunk_sid(parts, 1)
            if sid is not None and (ident, sid) in self._receivers:
                self._abort((ident, sid), "StreamCorrupted", f"a chunk of stream {sid} failed authentication ({exc})")
            log.warning("dropped a bad message on the direct-stream socket: %s", exc)
            return []
        msg = rx.msg
        if isinstance(msg, Credit):
            self._on_credit(ident, msg, now)
        elif isinstance(msg, Chunk):
            return self._on_chunk(ident, msg, rx.frames[0], now)
        elif isinstance(msg, Results):
            for res in msg.results:
                self._open_download(ident, res, wants, now)
        elif isinstance(msg, StreamAbort):  # the engine gave up (it reports the task through the controller)
            self._senders.pop((ident, msg.sid), None)
            got = self._receivers.pop((ident, msg.sid), None)
            if got is not None:
                self._downloading.pop(got[0].task_id, None)
        return []

    def _on_credit(self, ident: bytes, msg: Credit, now: float) -> None:
        key = (ident, msg.sid)
        sender = self._senders.get(key)
        if sender is None:
            up = self._uploads.get(msg.sid)
            if up is None:
                self._send(ident, StreamAbort(msg.sid, "StreamAborted",
                                              "the client no longer offers these arguments (the task is over)"))
                return
            sender = self._senders[key] = Sender(msg.sid, up[1], memory_source(up[2]), now)
        sender.grant(msg.upto, now)
        for index, data in sender.ready():
            if not self._send(ident, Chunk(msg.sid, index), [data]):
                del self._senders[key]
                return
        if sender.done:
            del self._senders[key]

    def _open_download(self, ident: bytes, res: ResultSpec, wants: Callable[[str], bool], now: float) -> None:
        try:
            sid, sizes = parse_head(res.stream)
        except ProtocolError as exc:
            log.warning("dropped a bad direct result head from %r: %s", ident, exc)
            return
        if not wants(res.task_id) or res.task_id in self._downloading:
            self._send(ident, StreamAbort(sid, "StreamAborted", f"the client does not wait for {res.task_id}"))
            return
        rec = Receiver(sid, sizes, self.settings.window, now)
        key = (ident, sid)
        self._receivers[key] = (res, rec)
        self._downloading[res.task_id] = key
        upto = rec.credit()
        if upto is not None:
            self._send(ident, Credit(sid, upto))

    def _on_chunk(self, ident: bytes, msg: Chunk, data: Any, now: float) -> list[tuple[ResultSpec, list[Any]]]:
        key = (ident, msg.sid)
        got = self._receivers.get(key)
        if got is None:
            return []
        res, rec = got
        try:
            rec.accept(msg.index, data, now)
        except StreamCorrupted as exc:
            self._abort(key, "StreamCorrupted", str(exc))
            return []
        if rec.done:
            del self._receivers[key]
            self._downloading.pop(res.task_id, None)
            self._send(ident, Credit(msg.sid, len(rec)))  # the acknowledgement: every chunk arrived and verified
            frames = rec.frames()
            return [(res._replace(nframes=len(frames), stream=None), frames)]
        upto = rec.credit()
        if upto is not None:
            self._send(ident, Credit(msg.sid, upto))
        return []

    def expire(self, now: float) -> None:
        """Give up direct streams without progress for the stream timeout. A stalled download is aborted:
        the engine then sends the result through the controller (or, if it died, the controller says so)."""
        timeout = self.settings.timeout
        for key in [k for k, (_, rec) in self._receivers.items() if rec.idle(now, timeout)]:
            self._abort(key, "StreamTimeout", f"no chunk for {timeout:.0f}s")
        for key in [k for k, s in self._senders.items() if s.idle(now, timeout)]:
            del self._senders[key]

    def _send(self, ident: bytes, msg: Message, frames: list[Any] | None = None) -> bool:
        parts, _ = self._codec.encode(msg, frames or ())
        try:
            send_parts(self.sock, [ident, *parts])
            return True
        except zmq.ZMQError:  # ROUTER_MANDATORY: that engine is gone
            return False

    def close(self) -> None:
        self.sock.close(0)
        shutil.rmtree(self._dir, ignore_errors=True)


class EngineLinks:
    """The engine's ends of direct streams: one DEALER per client endpoint it was offered (same host only).

    Each DEALER has a zmq monitor, so a client that dies mid-stream (its connection drops) is noticed at once
    (``gone``) instead of after the stream timeout.
    """

    def __init__(self, ctx: zmq.Context[Any], identity: bytes):
        self._ctx = ctx
        self._identity = identity
        self._host = socket.gethostname()
        self._socks: OrderedDict[str, zmq.Socket[Any]] = OrderedDict()
        self._monitors: dict[zmq.Socket[Any], zmq.Socket[Any]] = {}

    def socket_for(self, spec: dict[str, Any]) -> zmq.Socket[Any] | None:
        """The connection to the client offering a direct stream in ``spec``; None if there is no usable offer
        (none, another host, or the client's socket is gone)."""
        offer = offer_of(spec)
        if offer is None or offer[0] != self._host:
            return None
        endpoint = offer[1]
        sock = self._socks.get(endpoint)
        if not os.path.exists(endpoint[len("ipc://"):]):  # that client closed: do not wait for it
            if sock is not None:
                self.forget(sock)
            return None
        if sock is not None:
            self._socks.move_to_end(endpoint)
            return sock
        sock = connect_dealer(self._ctx, endpoint, self._identity)
        self._monitors[sock] = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._socks[endpoint] = sock
        while len(self._socks) > MAX_LINKS:
            self._close(self._socks.popitem(last=False)[1])
        return sock

    def gone(self, sock: zmq.Socket[Any]) -> bool:
        """True once the client at the other end of ``sock`` dropped its connection (it died or closed)."""
        mon = self._monitors.get(sock)
        return mon is not None and bool(mon.poll(0))

    def forget(self, sock: zmq.Socket[Any]) -> None:
        """Close a connection whose client failed a stream (a later offer connects afresh)."""
        for endpoint, s in list(self._socks.items()):
            if s is sock:
                del self._socks[endpoint]
        self._close(sock)

    def _close(self, sock: zmq.Socket[Any]) -> None:
        mon = self._monitors.pop(sock, None)
        if mon is not None:
            sock.disable_monitor()
            mon.close(0)
        sock.close(0)

    def close(self) -> None:
        for sock in list(self._socks.values()):
            self._close(sock)
        self._socks.clear()
