"""The engine's control thread: heartbeats, membership, and moving to another controller.

It owns the control socket (identity ``c:<uuid>``) and talks to the engine's current controller (its
*home*) while the main thread runs tasks. It:

* heartbeats both ways; an echo of engine id -1 means the controller restarted and does not know this
  engine: it registers again on the same socket, listing the tasks it holds;
* keeps the federation's membership view the controller pushes (``Membership``);
* moves when told to (``EngineMove``: placement, or the controller leaving) and when its controller dies:
  after ``SUSPECT`` heartbeats of silence it asks the other controllers of its view for theirs; once its
  controller's registration has lapsed there (the registry is the judge, never this engine's own
  connection), it registers with the rendezvous owner among the survivors, bringing the tasks it holds;
  if its controller re-registered with a new epoch (restarted), it goes back to it;
* stops on ``EngineStop`` or after ``controller_timeout`` seconds without any controller.

A move hands the main thread a new task socket, already connected (so the new controller can send tasks
while a long task still runs), and raises the generation: batches read from the old socket are dropped,
never run. What was taken before the switch is in the list sent to the new controller.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from fedpar.errors import MalformedMessage, ProtocolError
from fedpar.federation.membership import View
from fedpar.wire.codec import Codec
from fedpar.wire.protocol import (
    EngineHello,
    EngineMove,
    EngineStop,
    EngineWelcome,
    Heartbeat,
    Membership,
    MembershipRequest,
)
from fedpar.wire.transport import connect_dealer, recv_parts, send_parts

if TYPE_CHECKING:
    from fedpar.engine.engine import Engine

log = logging.getLogger(__name__)

SUSPECT = 2.0  # heartbeats of silence after which the engine asks the other controllers about its own
PROBE_WAIT = 1.0  # seconds to wait for a peer's answer


@dataclass(frozen=True)
class Home:
    """The controller an engine is registered with."""

    cid: str
    epoch: int
    endpoint: str


class Control:
    """The control thread's loop (see the module docstring)."""

    def __init__(self, engine: Engine, home: Home, heartbeat: float):
        self.e = engine
        self.home = home
        self.heartbeat = heartbeat
        self.codec = Codec(engine.info.key, f"engine:{engine.uuid}:c", replay_window=engine.replay_window)
        self.sock = connect_dealer(engine.ctx, home.endpoint, f"c:{engine.uuid}".encode())
        self.last_ack = time.monotonic()
        self.last_hello = 0.0
        self.pending: tuple[str, str] | None = None  # a move in progress: (cid, endpoint) awaiting its welcome
        self.failing_over = False  # the move in progress is a failover (it brings recent results too)
        self._pending_hello: tuple[list[str], list[Any]] = ([], [])  # (running, origin) of the move in progress
        self._probes = 0

    def run(self) -> None:
        e = self.e
        reason = ""
        try:
            while not e.stop_event.is_set() and not reason:
                send_parts(self.sock, self.codec.encode(Heartbeat(e.engine_id, e.current))[0])
                deadline = time.monotonic() + self.heartbeat
                unknown = False
                while not reason and (left := deadline - time.monotonic()) > 0:
                    if not self.sock.poll(int(left * 1000) + 1):
                        break
                    try:
                        rx = self.codec.decode(recv_parts(self.sock))
                    except ProtocolError as exc:
                        log.warning("dropped a bad control message: %s", exc)
                        continue
                    msg = rx.msg
                    if isinstance(msg, Heartbeat):
                        self.last_ack = time.monotonic()
                        unknown = msg.engine_id == -1
                        if unknown:  # tasks of older incarnations are not started from now on (see Engine)
                            e.raise_epoch(rx.envelope.epoch)
                    elif isinstance(msg, EngineWelcome):
                        self._welcomed(msg, rx.envelope.epoch)
                    elif isinstance(msg, EngineMove):
                        log.info("engine %d moves to controller %s (%s)", e.engine_id, msg.controller, msg.reason)
                        self._move(msg.controller, msg.endpoint, with_recent=msg.handover)
                    elif isinstance(msg, Membership):
                        self._learn(msg.view)
                    elif isinstance(msg, EngineStop):
                        reason = msg.reason or "stop requested"
                now = time.monotonic()
                if unknown and now - self.last_hello > self.heartbeat:
                    # The controller restarted (or lost us): register again and say what we still hold.
                    self.last_hello = now
                    if self.pending is not None:  # (moving: the hello of the move, again)
                        self._hello(*self._pending_hello, True)
                    else:
                        held = sorted(e.holding_now() | e.recent_ids())
                        self._hello(held, [self.home.cid, self.home.epoch])
                        log.info("engine %d registering again (holding %d task(s))", e.engine_id, len(held))
                silent = now - self.last_ack
                if silent > SUSPECT * self.heartbeat:
                    if self.pending is None:
                        self._probe()
                    else:
                        self._probe_pending()
                if not reason and time.monotonic() - self.last_ack > e.controller_timeout:
                    reason = f"no controller answered for {e.controller_timeout:.0f}s"
        finally:
            self.sock.close(0)
        if reason:
            log.info("engine %d stopping: %s", e.engine_id, reason)
            e.halt()

    # ------------------------------------------------------------------ registration
    def _hello(self, running: list[str], origin: list[Any], redirected: bool = False) -> None:
        e = self.e
        hello = EngineHello(e.uuid, socket.gethostname(), os.getpid(), e.task_ident, running, e.engine_id, origin,
                            redirected)
        send_parts(self.sock, self.codec.encode(hello)[0])

    def _welcomed(self, msg: EngineWelcome, epoch: int) -> None:
        e = self.e
        self.last_ack = time.monotonic()
        if msg.move_to:  # our old controller came back: go there
            cid, endpoint = msg.move_to[0], msg.move_to[1]
            self._move(cid, endpoint, with_recent=self.failing_over)
            return
        e.welcomed(msg, epoch)
        self.home = Home(self.pending[0] if self.pending else self.home.cid, epoch,
                         self.pending[1] if self.pending else self.home.endpoint)
        self.pending = None
        self.failing_over = False
        if msg.membership:
            self._learn(msg.membership)
        if msg.engine_id != e.engine_id:
            log.info("engine %d is now engine %d", e.engine_id, msg.engine_id)
        e.engine_id = msg.engine_id

    def _learn(self, raw: dict[str, Any]) -> None:
        try:
            self.e.view = View.from_wire(raw)
        except MalformedMessage as exc:
            log.warning("ignored a malformed membership view: %s", exc)

    # ------------------------------------------------------------------ moving
    def _move(self, cid: str, endpoint: str, *, with_recent: bool) -> None:
        """Register with controller ``cid`` at ``endpoint``, bringing the tasks held from our home (and,
        ``with_recent``, the results sent to it lately: after a failover or a handover they may not have
        been stored). The list is taken when the main thread's generation rises (``Engine.switch``)."""
        e = self.e
        origin = [self.home.cid, self.home.epoch]
        running = e.switch(endpoint, with_recent=with_recent)  # the main thread takes a new task socket
        self.sock.close(0)
        self.sock = connect_dealer(e.ctx, endpoint, f"c:{e.uuid}".encode())
        self.pending = (cid, endpoint)
        self._pending_hello = (running, origin)
        self.last_ack = time.monotonic()  # (give the new controller a fair chance before suspecting it)
        self._hello(running, origin, True)

    def _probe_pending(self) -> None:
        """The controller we are moving to has not welcomed us: if the registry says it is gone (or it
        restarted), go where placement says among the others, still bringing what we hold."""
        assert self.pending is not None
        e = self.e
        target = self.pending[0]
        peers = [x for x in e.view.live if x.cid != target]
        if not peers:
            return
        self._probes += 1
        peer = peers[self._probes % len(peers)]
        view = _ask_view(e.ctx, self.codec, peer.engine_endpoint, f"p:{e.uuid}:{self._probes}".encode())
        if view is None:
            return
        e.view = view
        if view.entry(target) is not None:  # still registered: slow or paused (our hello may be lost: again)
            self._hello(*self._pending_hello, True)
            return
        home = view.place(e.engine_id)
        entry = view.entry(home) if home is not None else None
        if entry is None:
            return
        log.warning("engine %d: controller %s, where it was moving, is gone; moving to controller %s instead",
                    e.engine_id, target, entry.cid)
        self._move(entry.cid, entry.engine_endpoint, with_recent=self.failing_over)

    def _probe(self) -> None:
        """Our controller is silent: ask the others of our view whether it is still registered."""
        e = self.e
        home = self.home
        peers = [x for x in e.view.live if x.cid != home.cid]
        if not peers:
            return  # a lone controller: wait for it (it re-registers us when it restarts)
        self._probes += 1
        peer = peers[self._probes % len(peers)]
        view = _ask_view(e.ctx, self.codec, peer.engine_endpoint, f"p:{e.uuid}:{self._probes}".encode())
        if view is None:
            return
        e.view = view
        now_home = view.entry(home.cid)
        if now_home is not None and now_home.epoch == home.epoch:
            return  # still registered: slow or cut off from us; the registry decides, not our socket
        self.failing_over = True
        if now_home is not None and view.takeover(home.cid, home.epoch) is None:
            # Restarted, and nobody took its old incarnation over: its recovery waits for what we hold.
            log.warning("engine %d: controller %s restarted (epoch %d); registering again", e.engine_id, home.cid,
                        now_home.epoch)
            self._move(home.cid, now_home.engine_endpoint, with_recent=True)
            return
        target = view.place(e.engine_id)
        entry = view.entry(target) if target is not None else None
        if entry is None:
            return
        log.warning("engine %d: controller %s is gone; moving to controller %s", e.engine_id, home.cid, entry.cid)
        self._move(entry.cid, entry.engine_endpoint, with_recent=True)


def _ask_view(ctx: zmq.Context[Any], codec: Codec, endpoint: str, identity: bytes) -> View | None:
    """A controller's membership view, asked over a short-lived socket (None if it does not answer)."""
    sock = connect_dealer(ctx, endpoint, identity)
    try:
        send_parts(sock, codec.encode(MembershipRequest())[0])
        deadline = time.monotonic() + PROBE_WAIT
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                return None
            try:
                rx = codec.decode(recv_parts(sock))
            except ProtocolError:
                continue
            if isinstance(rx.msg, Membership):
                try:
                    return View.from_wire(rx.msg.view)
                except MalformedMessage:
                    return None
        return None
    finally:
        sock.close(0)

