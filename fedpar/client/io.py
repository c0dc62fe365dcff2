"""The client's I/O thread: one logical controller over one ``Link`` per live controller.

User threads never touch a socket: they queue tasks and requests here and wake this thread.

* **Load-balanced tasks** wait in the client until a controller has room: each controller says how many it
  wants outstanding from this client (``capacity``: what its engines hold plus a short queue), and tasks go
  to the controller with the most room. So work is spread by outstanding load, a controller whose engines
  finish first gets the next tasks, and no controller sits on a queue while another's engines idle.
* **Direct tasks** go to the controller that owns their engine (engine ids are global); while an engine
  moves between controllers its tasks wait here for its new home.
* **Requests** (status, abort, queries, purges, shutdown) go to every controller and their answers are
  merged by ``Client``; ``get_result`` asks every controller and fails only when none has the result.
* **Restarts**: a controller answering with a new epoch restarted: tasks it had not acknowledged are sent
  again (flagged, so it never runs one twice) and results it owed are asked for again.
* **Failover**: when the federation's view shows that the survivors took over a controller, its link is
  closed and the tasks this client had there wait until the takeover closes (its engines have then been
  adopted with the tasks they hold); the client then asks every live controller which of them they hold,
  and resubmits the rest (it kept every task's arguments until its result came).

The roles live in their own modules, each a part of this thread: ``routing`` (where tasks go),
``requests`` (fan-out requests, lookups), ``failover`` (restarts, silence, takeovers) and ``transfers``
(chunk streams through the controllers, direct streams with engines on this host).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from fedpar.client.failover import Failover
from fedpar.client.link import Link, Track
from fedpar.client.requests import Gather, Lookup, Requests
from fedpar.client.routing import Router
from fedpar.client.transfers import Transfers
from fedpar.errors import (
    ControllerUnavailable,
    FedparError,
    ProtocolError,
    ResultNotFound,
    StreamCorrupted,
    UnknownEngineError,
)
from fedpar.federation.discovery import live_controllers
from fedpar.federation.membership import View
from fedpar.wire.codec import Codec, Received
from fedpar.wire.protocol import (
    Chunk,
    ClientHello,
    Credit,
    EngineEvent,
    GetResults,
    Membership,
    Message,
    Results,
    StreamAbort,
    SubmitReply,
    TaskSpec,
    Welcome,
)
from fedpar.wire.streams import StreamSettings, untrusted_chunk_sid
from fedpar.wire.transport import NOBLOCK, Waker, connect_dealer, readable, recv_parts, send_parts

if TYPE_CHECKING:
    from fedpar.client.client import Client

log = logging.getLogger(__name__)

PING_INTERVAL = 1.0  # with work outstanding, ping a silent controller this often (detects a restart)
REGISTRY_EVERY = 3.0  # with no controller heard from for this long, look the live ones up in the registry
MOVE_WAIT = 30.0  # seconds a direct task waits for its engine to reappear after a move



# ---------------------------------------------------------------------------------------- operations
@dataclass
class Seeds:
    """Controller endpoints read from the registry (by a helper thread): connect to the new ones."""

    endpoints: list[str]


class Force:
    """Send every held task now, ignoring capacity (``wait_for_send``, ``close``)."""


@dataclass
class Withdraw:
    """Take tasks the client still holds back out of its queues; ``reply`` gets the ids withdrawn."""

    ids: list[str] | None
    reply: Future[list[str]]


# ---------------------------------------------------------------------------------------- the thread
class IOThread(threading.Thread):
    """Owns every controller socket of one ``Client`` (see the module docstring)."""

    def __init__(self, client: Client, ctx: zmq.Context[Any], codec: Codec, endpoints: list[str]):
        super().__init__(name="fedpar-client-io", daemon=True)
        self.client = client
        self.ctx = ctx
        self.codec = codec
        self.waker = Waker()
        self.outbox: deque[tuple[Any, list[Any], Future[Received] | None]] = deque()
        self.replies: dict[int, Future[Received]] = {}
        self.running = True
        self.links: dict[str, Link] = {}  # by endpoint
        self.by_cid: dict[str, Link] = {}
        self.hellos: dict[int, Link] = {}  # ClientHello request id -> link
        self.tracks: dict[str, Track] = {}
        self.router = Router(self)  # where tasks go: capacity, engine owners, tasks held back
        self.view = View()
        self.welcomed = threading.Event()  # the first Welcome arrived
        self._looked_up = time.monotonic()  # when the registry was last read for controllers
        self.settled = threading.Event()  # connected to every live controller of the view
        self.settings = StreamSettings()
        self.sids = itertools.count(1)
        self.transfers = Transfers(self)  # chunk streams and same-host direct streams
        self.requests = Requests(self)  # requests to every controller, and get_result lookups
        self.failover = Failover(self)  # tasks of controllers that were taken over
        self.poller = zmq.Poller()
        self.poller.register(self.waker.fileno(), zmq.POLLIN)
        for ep in endpoints:
            self._connect(ep)

    @property
    def last_heard(self) -> float:
        """When any controller was last heard from (monotonic)."""
        # (called from user threads while the I/O thread may add links: iterate a snapshot)
        return max((lk.last_heard for lk in tuple(self.links.values()) if not lk.gone), default=0.0)

    def queue(self, item: Any, frames: list[Any], reply: Future[Received] | None = None) -> None:
        self.outbox.append((item, frames, reply))
        self.waker.wake()

    # ------------------------------------------------------------------ connections
    def _connect(self, endpoint: str) -> Link:
        sock = connect_dealer(self.ctx, endpoint, self.client.sender.encode())
        link = Link(endpoint, sock)
        self.links[endpoint] = link
        self.poller.register(sock, zmq.POLLIN)
        self._hello(link)
        return link

    def _hello(self, link: Link) -> None:
        parts, rid = self.codec.encode(ClientHello(self.client.sender))
        for old in [r for r, lk in self.hellos.items() if lk is link]:  # (only the latest is answered for)
            del self.hellos[old]
        self.hellos[rid] = link
        link.last_ping = time.monotonic()
        send_parts(link.sock, parts)

    def _drop(self, link: Link) -> None:
        """Close a link for good (its controller was taken over, or it never answered and left the view)."""
        link.gone = True
        link.ready = False
        self.links.pop(link.endpoint, None)
        if link.cid is not None and self.by_cid.get(link.cid) is link:
            del self.by_cid[link.cid]
        self.poller.unregister(link.sock)
        link.sock.close(0)
        for sid in [s for s, (_, _, lk) in self.transfers.senders.items() if lk is link]:
            tid = self.transfers.senders.pop(sid)[0]
            self.transfers.upload_of.pop(tid, None)
        for rid in [r for r, (_, lk) in self.requests.gathers.items() if lk is link]:
            self.requests.gathers.pop(rid)[0].add(link, None)
        for rid in [r for r, (_, lk) in self.requests.lookups.items() if lk is link]:  # (a dead controller: not there)
            lookup = self.requests.lookups.pop(rid)[0]
            self.requests.lookup_reply(lookup, lookup.ids, None)
        for rid in [r for r, (_, lk) in self.failover.locates.items() if lk is link]:
            fo = self.failover.locates.pop(rid)[0]
            self.failover.locate_reply(fo, None, Results([], fo.ids))
        for rid, lk in list(self.hellos.items()):
            if lk is link:
                del self.hellos[rid]

    def ready_links(self) -> list[Link]:
        return [lk for lk in tuple(self.links.values()) if lk.ready and not lk.gone]

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        poller = self.poller
        try:
            while self.running:
                ready = dict(poller.poll(int(PING_INTERVAL * 1000)))
                if self.waker.fileno() in ready:
                    self.waker.drain()
                    self._flush()
                for link in list(self.links.values()):
                    if link.sock in ready and not link.gone:
                        for _ in range(1024):
                            if link.gone or not readable(link.sock):
                                break
                            self._on_message(link, recv_parts(link.sock, NOBLOCK))
                direct = self.transfers.direct
                if direct is not None:
                    if direct.sock in ready:
                        self.transfers.on_direct(direct)
                    if direct.busy:
                        direct.expire(time.monotonic())
                self._housekeep(time.monotonic())
        except Exception:  # pragma: no cover - a bug here must not hang the user silently
            log.exception("client I/O thread failed")
            self.client._fail_all(ControllerUnavailable("the client's I/O thread failed; see the log"))
        finally:
            if self.transfers.direct is not None:
                self.transfers.direct.close()
            for link in self.links.values():
                link.sock.close(0)
            self.waker.close()

    def _housekeep(self, now: float) -> None:
        """Pings (restart detection), silent controllers, stream timeouts, direct tasks whose engine vanished,
        and the registry when no controller answers any more."""
        lost_after = self.client.lost_after
        waiting = self.client._waiting
        links = tuple(self.links.values())
        if (self.client.info.discovery and now - self._looked_up > REGISTRY_EVERY
                and (waiting or self.router.held or any(lk.busy for lk in links))  # (an idle client reads nothing)
                and not any(lk.ready and now - lk.last_heard < REGISTRY_EVERY for lk in links)):
            self._looked_up = now
            threading.Thread(target=self._read_registry, name="fedpar-client-registry", daemon=True).start()
        for link in list(self.links.values()):
            if link.gone:
                continue
            silent = now - link.last_heard
            if link.ready and silent > PING_INTERVAL and now - link.last_ping > PING_INTERVAL and (link.busy
                                                                                                 or waiting):
                self._hello(link)
            if not link.ready and link.cid is None and now - link.opened > 30.0 and self.welcomed.is_set():
                self._drop(link)  # a seed that never answered, while others did
            elif lost_after is not None and silent > lost_after and link.busy:
                self.failover.lost(link, silent)
        if self.transfers.senders or any(lk.receivers for lk in self.links.values()):
            self.transfers.expire_streams(now)
        if self.router.transit:
            for eid, since in list(self.router.transit.items()):
                if now - since > MOVE_WAIT:
                    del self.router.transit[eid]
                    self.router.engines_changed()
                    for tid in self.router.held_direct.pop(eid, ()):
                        self._fail(tid, UnknownEngineError(f"engine {eid} moved and did not reappear within "
                                                           f"{MOVE_WAIT:.0f}s"))


    # ------------------------------------------------------------------ from user threads
    def _read_registry(self) -> None:
        """(A helper thread.) The live controllers of the registry: links to those the client lacks."""
        info = self.client.info
        try:
            live = live_controllers(info.discovery, info.cluster_id, info.key)
        except FedparError as exc:
            log.warning("cannot read the discovery registry %s: %s", info.discovery, exc)
            return
        self.queue(Seeds([e.client_endpoint for e in live]), [])

    def _flush(self) -> None:
        out = self.outbox
        direct_out: dict[str, list[str]] = {}
        added = False
        while out:
            item, frames, reply = out.popleft()
            if isinstance(item, TaskSpec):
                track = Track(item, frames)
                self.tracks[item.task_id] = track
                if item.target is None:
                    self.router.held.append(item.task_id)
                    added = True
                else:
                    cid = self.router.route_direct(item.task_id, item.target)
                    if cid is not None:
                        direct_out.setdefault(cid, []).append(item.task_id)
            elif isinstance(item, Gather):
                self.requests.fanout(item)
            elif isinstance(item, Lookup):
                self.requests.lookup(item)
            elif isinstance(item, Force):
                self.router.dispatch(force=True)
            elif isinstance(item, Withdraw):
                item.reply.set_result(self.router.withdraw(item.ids))
            elif isinstance(item, Seeds):
                for ep in item.endpoints:
                    if ep not in self.links:
                        self._connect(ep)
            else:
                target = self._any_link()
                if target is None:
                    if reply is not None:
                        reply.set_exception(ControllerUnavailable("no controller is connected"))
                    continue
                self._send(target, item, frames, reply)
        for cid, ids in direct_out.items():
            link = self.by_cid.get(cid)
            if link is not None:
                self.router.submit(link, ids)
        if added:
            self.router.dispatch()

    def _any_link(self) -> Link | None:
        ready = self.ready_links()
        return ready[0] if ready else next(iter(self.links.values()), None)

    def _send(self, link: Link, msg: Message, frames: list[Any], reply: Future[Received] | None) -> int:
        if isinstance(msg, GetResults):
            link.expected.update(msg.task_ids)
        parts, rid = self.codec.encode(msg, frames)
        if reply is not None:
            self.replies[rid] = reply
        send_parts(link.sock, parts)
        return rid

    # ------------------------------------------------------------------ messages from controllers
    def _on_message(self, link: Link, parts: list[Any]) -> None:
        try:
            rx = self.codec.decode(parts)
        except ProtocolError as exc:
            log.warning("dropped a bad message from controller %s: %s", link.cid or link.endpoint, exc)
            if link.receivers:
                sid = untrusted_chunk_sid(parts)
                if sid is not None and sid in link.receivers:
                    self.transfers.abort_download(link, sid, StreamCorrupted(
                        f"a chunk of stream {sid} failed authentication ({exc}); stream aborted"))
            return
        msg = rx.msg
        link.last_heard = time.monotonic()
        epoch = rx.envelope.epoch
        if link.epoch != epoch and not isinstance(msg, Welcome):
            if link.epoch is not None:
                self.failover.resync(link, epoch)
            link.epoch = epoch
        if isinstance(msg, Chunk):
            self.transfers.on_chunk(link, msg, rx.frames[0])
        elif isinstance(msg, Results):
            self._on_results(link, msg, rx)
        elif isinstance(msg, Credit):
            got = self.transfers.senders.get(msg.sid)
            if got is not None:
                self.transfers.pump(got[2], got[1], msg.upto)
        elif isinstance(msg, SubmitReply):
            self._on_submit_reply(link, msg)
        elif isinstance(msg, StreamAbort):
            self.transfers.on_stream_abort(link, msg)
        elif isinstance(msg, EngineEvent):
            if msg.capacity >= 0:
                link.capacity = msg.capacity
            self.router.on_engine_event(link, msg.registered, msg.unregistered, msg.moved)
            if self.router.held:
                self.router.dispatch()
        elif isinstance(msg, Welcome):
            self._on_welcome(link, msg, rx)
        elif isinstance(msg, Membership):
            self._on_view(msg.view)
        else:
            rid = getattr(msg, "reply_to", None)
            if isinstance(rid, int):
                g = self.requests.gathers.pop(rid, None)
                if g is not None:
                    g[0].add(link, rx)
                    return
                fut = self.replies.pop(rid, None)
                if fut is not None:
                    fut.set_result(rx)

    def _on_welcome(self, link: Link, msg: Welcome, rx: Received) -> None:
        self.hellos.pop(msg.reply_to, None)
        epoch = rx.envelope.epoch
        first = not link.ready
        if first:
            other = self.by_cid.get(msg.controller)
            if other is not None and other is not link:  # the same controller under another endpoint
                if other.ready and not other.gone and (other.epoch is None or epoch <= other.epoch):
                    self._drop(link)
                    return
                self._take_over_link(other, link)  # (restarted on other ports: what waited there comes here)
        if link.epoch is not None and link.epoch != epoch:
            self.failover.resync(link, epoch)
        link.epoch = epoch
        if first:
            link.cid = msg.controller
            self.by_cid[msg.controller] = link
            link.ready = True
            link.pid, link.host = msg.pid, msg.host
            self.settings = StreamSettings.from_wire(msg.stream)
        link.capacity = msg.capacity
        self.router.on_engine_event(link, msg.engines, [e for e in link.engines if e not in msg.engines], [])
        if msg.membership:
            self._on_view(msg.membership)
        self.welcomed.set()
        self._check_settled()
        self.client._on_welcome(link)
        if first:
            self.requests.extend_lookups(link)
            self.router.dispatch()

    def _take_over_link(self, old: Link, new: Link) -> None:
        """``new`` reaches the controller ``old`` reached (restarted elsewhere): the tasks, results and
        requests that waited on ``old`` move to ``new`` (resynchronised once its epoch is known)."""
        new.epoch = old.epoch
        new.unacked, old.unacked = old.unacked, {}
        new.expected, old.expected = old.expected, set()
        for tr in self.tracks.values():
            if tr.out is old:
                tr.count_on(new)
        req = self.requests
        for table in (req.gathers, req.lookups, self.failover.locates):
            for rid, (item, lk) in list(table.items()):
                if lk is old:
                    table[rid] = (item, new)  # type: ignore[assignment]
        self._drop(old)

    def initial_links_ready(self) -> bool:
        """True when every link made so far answered (or was dropped)."""
        return all(lk.ready for lk in tuple(self.links.values()) if not lk.gone)

    def _on_results(self, link: Link, msg: Results, rx: Received) -> None:
        if msg.capacity >= 0:
            link.capacity = msg.capacity
        results = msg.results
        frames = rx.frames
        tracks = self.tracks
        implied: list[str] = []
        freed = False
        for r in results:
            tid = r.task_id
            tr = tracks.get(tid)
            if tr is None:
                link.expected.discard(tid)
                continue
            home = link if tr.cid == link.cid else self.by_cid.get(tr.cid or "")
            if home is not None:
                if home.unacked.pop(tid, 0) is None:  # a result acknowledges its task
                    implied.append(tid)
                home.expected.discard(tid)
            if tr.out is not None:
                tr.release()
                freed = True
            tr.cid = link.cid
            if r.stream is None:
                del tracks[tid]
            else:
                tr.finished_there = True  # arriving as a stream: it is done (and stored) there
        if implied:
            self.client._on_accepted(implied)
        if self.transfers.direct is not None:  # outcomes end direct uploads/downloads; DELIVERED notices are handled
            results = self.transfers.direct.outcomes(results)
        if any(r.stream is not None for r in results):  # large results follow as streams
            results, frames = self.transfers.open_downloads(link, results, frames)
        rid = msg.reply_to
        if rid:
            lk = self.requests.lookups.pop(rid, None)
            lookup = lk[0] if lk is not None else None
            if lookup is not None:
                self.requests.lookup_reply(lookup, msg.missing, link)
            lc = self.failover.locates.pop(rid, None)
            fo = lc[0] if lc is not None else None
            if fo is not None:
                self.failover.locate_reply(fo, link, msg)
            if lookup is None and fo is None:
                for tid in msg.missing:  # a restart's re-ask: the controller has no such task any more
                    link.expected.discard(tid)
                    self.client._fail_task(tid, ResultNotFound(f"no task {tid!r} in the controller's store",
                                                               task_id=tid))
                fut = self.replies.pop(rid, None)
                if fut is not None:
                    fut.set_result(rx)
        self.client._on_results(results, frames)
        if freed and self.router.held:
            self.router.dispatch()

    def _on_submit_reply(self, link: Link, msg: SubmitReply) -> None:
        if msg.capacity >= 0:
            link.capacity = msg.capacity
        for tid in msg.accepted:
            link.unacked.pop(tid, None)
        link.expected.update(msg.accepted)
        self.client._on_accepted(msg.accepted)
        if self.transfers.upload_of:
            for tid in msg.accepted:
                self.transfers.close_upload(tid, acked=True)
        if not msg.rejected:
            return
        refused: list[list[str]] = []
        for item in msg.rejected:
            tid, ename, _ = item
            link.unacked.pop(tid, None)
            self.transfers.close_upload(tid)
            tr = self.tracks.get(tid)
            if tr is not None:
                tr.release()
            if ename == "EngineMoved" and tr is not None and tr.spec.target is not None:
                eid = tr.spec.target  # its engine left for controller ``evalue``: send it there once it is in
                tr.cid = None
                if self.router.owner.get(eid) == link.cid:
                    del self.router.owner[eid]
                self.router.transit.setdefault(eid, time.monotonic())
                self.router.held_direct.setdefault(eid, deque()).append(tid)
                continue
            self.tracks.pop(tid, None)
            refused.append(item)
        if refused:
            self.client._on_rejected(refused)
        if self.router.held_direct:
            self.router.release_direct()

    # ------------------------------------------------------------------ engines and membership

    def _on_view(self, raw: dict[str, Any]) -> None:
        try:
            view = View.from_wire(raw)
        except ProtocolError as exc:
            log.warning("ignored a malformed membership view: %s", exc)
            return
        self.view = view
        for entry in view.live:
            link = self.by_cid.get(entry.cid)
            if (link is None or link.epoch != entry.epoch) and entry.client_endpoint not in self.links:
                self._connect(entry.client_endpoint)
            elif link is not None and not link.ready and not link.gone:  # (live again: ready once it answers)
                self._hello(link)
        if view.live:  # a controller that left the registry without a takeover (a plain stop): send it nothing
            down = {k.cid for k in view.down} - {t.cid for t in view.takeovers}
            for cid in down:
                link = self.by_cid.get(cid)
                if link is not None and link.ready:
                    link.ready = False
                    self.router.dispatch()
        for t in view.takeovers:
            link = self.by_cid.get(t.cid)
            key = (t.cid, t.epoch)
            if link is not None and link.epoch == t.epoch and key not in self.failover.pending:
                self.failover.taken_over(link, t.epoch)
            fo = self.failover.pending.get(key)
            if fo is not None and t.closed and not fo.started:
                self.failover.locate(fo)
        self._check_settled()

    def _check_settled(self) -> None:
        """Set ``settled`` once a ready link exists to every live controller of the view."""
        if all((lk := self.by_cid.get(e.cid)) is not None and lk.ready for e in self.view.live):
            self.settled.set()

    def _fail(self, tid: str, exc: FedparError) -> None:
        tr = self.tracks.pop(tid, None)
        if tr is not None and tr.cid is not None:
            link = self.by_cid.get(tr.cid)
            if link is not None:
                link.unacked.pop(tid, None)
                link.expected.discard(tid)
        if tr is not None:
            tr.release()
        self.client._fail_task(tid, exc)

    # ------------------------------------------------------------------ streams
