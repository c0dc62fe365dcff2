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

Large payloads travel as chunk streams (``fedpar.wire.streams``), and same-host payloads may go straight
to and from engines (``fedpar.wire.direct``); both are driven from here too.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import zmq

from fedpar.client.link import Link, Track
from fedpar.errors import (
    ControllerUnavailable,
    EngineError,
    FedparError,
    ProtocolError,
    ResultNotFound,
    ResultUnavailable,
    StreamCorrupted,
    StreamError,
    StreamTimeout,
    UnknownEngineError,
)
from fedpar.federation.membership import View
from fedpar.wire.codec import Codec, Received
from fedpar.wire.direct import OFFER, ClientLink
from fedpar.wire.protocol import (
    Chunk,
    ClientHello,
    Credit,
    EngineEvent,
    GetResults,
    Membership,
    Message,
    Results,
    ResultSpec,
    StreamAbort,
    Submit,
    SubmitReply,
    TaskSpec,
    Welcome,
)
from fedpar.wire.streams import Receiver, Sender, StreamSettings, memory_source, parse_head, untrusted_chunk_sid
from fedpar.wire.transport import NOBLOCK, Waker, connect_dealer, readable, recv_parts, send_parts

if TYPE_CHECKING:
    from fedpar.client.client import Client

log = logging.getLogger(__name__)

SUBMIT_BATCH = 4096  # most tasks coalesced into one Submit message
SUBMIT_BATCH_BYTES = 8 << 20
PING_INTERVAL = 1.0  # with work outstanding, ping a silent controller this often (detects a restart)
MOVE_WAIT = 30.0  # seconds a direct task waits for its engine to reappear after a move


def _nbytes(frames: Iterable[Any]) -> int:
    return sum(memoryview(f).nbytes for f in frames)


# ---------------------------------------------------------------------------------------- operations
@dataclass
class Gather:
    """Answers of every controller to one request (filled by the I/O thread, read by a user thread)."""

    msg: Message
    replies: list[tuple[Link, Received]] = field(default_factory=list)
    asked: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def add(self, link: Link, rx: Received | None) -> None:
        if rx is not None:
            self.replies.append((link, rx))
        self.asked -= 1
        if self.asked <= 0:
            self.done.set()


@dataclass
class Lookup:
    """A ``get_result`` for ids this client does not track: every controller is asked."""

    ids: list[str]
    asked: int = 0  # answers still due
    total: int = 0  # controllers asked
    missing: dict[str, int] = field(default_factory=dict)


@dataclass
class _Failover:
    """Tasks of a controller that was taken over, from its takeover until they are resubmitted or found."""

    cid: str
    epoch: int
    ids: list[str]
    engines: set[int]  # the engines it owned when it died
    asked: int = 0
    total: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    started: bool = False


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
        self.gathers: dict[int, tuple[Gather, Link]] = {}
        self.lookups: dict[int, tuple[Lookup, Link]] = {}
        self.locates: dict[int, tuple[_Failover, Link]] = {}
        self.running = True
        self.links: dict[str, Link] = {}  # by endpoint
        self.by_cid: dict[str, Link] = {}
        self.hellos: dict[int, Link] = {}  # ClientHello request id -> link
        self.tracks: dict[str, Track] = {}
        self.held: deque[str] = deque()  # load-balanced task ids waiting for capacity
        self.held_direct: dict[int, deque[str]] = {}  # engine id -> its tasks waiting for the engine's home
        self.owner: dict[int, str] = {}  # engine id -> controller id
        self.transit: dict[int, float] = {}  # engines moving between controllers -> since (monotonic)
        self.view = View()
        self.failovers: dict[tuple[str, int], _Failover] = {}
        self.welcomed = threading.Event()  # the first Welcome arrived
        self.settled = threading.Event()  # connected to every live controller of the view
        self.settings = StreamSettings()
        self.sids = itertools.count(1)
        self.senders: dict[int, tuple[str, Sender, Link]] = {}  # uploads by our stream id
        self.upload_of: dict[str, int] = {}
        self.link: ClientLink | None = None  # direct streams with engines on this host, bound when first offered
        self.poller = zmq.Poller()
        self.poller.register(self.waker.fileno(), zmq.POLLIN)
        for ep in endpoints:
            self._connect(ep)

    @property
    def last_heard(self) -> float:
        """When any controller was last heard from (monotonic)."""
        return max((lk.last_heard for lk in self.links.values() if not lk.gone), default=0.0)

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
        for sid in [s for s, (_, _, lk) in self.senders.items() if lk is link]:
            tid = self.senders.pop(sid)[0]
            self.upload_of.pop(tid, None)
        for rid in [r for r, (_, lk) in self.gathers.items() if lk is link]:
            self.gathers.pop(rid)[0].add(link, None)
        for rid in [r for r, (_, lk) in self.lookups.items() if lk is link]:  # (a dead controller: not there)
            lookup = self.lookups.pop(rid)[0]
            self._lookup_reply(lookup, lookup.ids, None)
        for rid in [r for r, (_, lk) in self.locates.items() if lk is link]:
            fo = self.locates.pop(rid)[0]
            self._locate_reply(fo, None, Results([], fo.ids))
        for rid, lk in list(self.hellos.items()):
            if lk is link:
                del self.hellos[rid]

    def ready_links(self) -> list[Link]:
        return [lk for lk in self.links.values() if lk.ready and not lk.gone]

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
                direct = self.link
                if direct is not None:
                    if direct.sock in ready:
                        self._on_direct(direct)
                    if direct.busy:
                        direct.expire(time.monotonic())
                self._housekeep(time.monotonic())
        except Exception:  # pragma: no cover - a bug here must not hang the user silently
            log.exception("client I/O thread failed")
            self.client._fail_all(ControllerUnavailable("the client's I/O thread failed; see the log"))
        finally:
            if self.link is not None:
                self.link.close()
            for link in self.links.values():
                link.sock.close(0)
            self.waker.close()

    def _housekeep(self, now: float) -> None:
        """Pings (restart detection), silent controllers, stream timeouts, direct tasks whose engine vanished."""
        lost_after = self.client.lost_after
        waiting = self.client._waiting
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
                self._lost(link, silent)
        if self.senders or any(lk.receivers for lk in self.links.values()):
            self._expire_streams(now)
        if self.transit:
            for eid, since in list(self.transit.items()):
                if now - since > MOVE_WAIT:
                    del self.transit[eid]
                    self._engines_changed()
                    for tid in self.held_direct.pop(eid, ()):
                        self._fail(tid, UnknownEngineError(f"engine {eid} moved and did not reappear within "
                                                           f"{MOVE_WAIT:.0f}s"))

    def _lost(self, link: Link, silent: float) -> None:
        """A controller silent for ``lost_after`` seconds (no takeover): fail what waits on it."""
        ids = [t for t, tr in self.tracks.items() if tr.cid == link.cid] + list(link.expected)
        exc = ControllerUnavailable(
            f"the controller at {link.endpoint} has been silent for {silent:.0f}s; results already stored "
            "stay retrievable with get_result() if it comes back")
        link.unacked.clear()
        link.expected.clear()
        link.lb_out = 0
        for tid in ids:
            self._fail(tid, exc)

    # ------------------------------------------------------------------ from user threads
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
                    self.held.append(item.task_id)
                    added = True
                else:
                    cid = self._route_direct(item.task_id, item.target)
                    if cid is not None:
                        direct_out.setdefault(cid, []).append(item.task_id)
            elif isinstance(item, Gather):
                self._fanout(item)
            elif isinstance(item, Lookup):
                self._lookup(item)
            elif isinstance(item, Force):
                self._dispatch(force=True)
            elif isinstance(item, Withdraw):
                item.reply.set_result(self._withdraw(item.ids))
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
                self._submit(link, ids)
        if added:
            self._dispatch()

    def _any_link(self) -> Link | None:
        ready = self.ready_links()
        return ready[0] if ready else next(iter(self.links.values()), None)

    def _route_direct(self, tid: str, target: int) -> str | None:
        """The controller to send a direct task to now (None: it waits here, or failed)."""
        cid = self.owner.get(target)
        if cid is not None and cid in self.by_cid and self.by_cid[cid].ready:
            return cid
        if target in self.transit or (cid is not None and cid in self.by_cid):
            self.held_direct.setdefault(target, deque()).append(tid)
            return None
        ready = self.ready_links()
        if len(ready) == 1 and ready[0].cid is not None:  # one controller: it decides (it may know it by now)
            return ready[0].cid
        if not ready:
            self.held_direct.setdefault(target, deque()).append(tid)
            self.transit.setdefault(target, time.monotonic())
            return None
        self._fail(tid, UnknownEngineError(f"engine {target} is not registered (registered: "
                                           f"{sorted(self.owner)})"))
        return None

    def _dispatch(self, force: bool = False) -> None:
        """Send held load-balanced tasks to the controllers with room, least loaded first: each takes a share
        of what is held in proportion to its capacity, so they fill up evenly (relative to their capacity),
        whether tasks come one by one or in a burst. ``force``: send everything (to the least loaded)."""
        held = self.held
        while held:
            links = [lk for lk in self.ready_links() if lk.free > 0]
            if not links:
                if not force or not self.ready_links():
                    return
                best = min(self.ready_links(), key=lambda lk: (lk.lb_out + 1) / max(lk.capacity, 1))
                self._submit(best, [held.popleft() for _ in range(min(len(held), SUBMIT_BATCH))])
                continue
            total = sum(lk.capacity for lk in links)
            n = len(held)
            for link in sorted(links, key=lambda lk: lk.lb_out / lk.capacity):
                k = min(link.free, math.ceil(n * link.capacity / total), len(held), SUBMIT_BATCH)
                if k > 0:
                    self._submit(link, [held.popleft() for _ in range(k)])

    def _submit(self, link: Link, ids: list[str]) -> None:
        """Send tasks to ``link`` (at most SUBMIT_BATCH tasks or SUBMIT_BATCH_BYTES per message)."""
        tracks = self.tracks
        specs: list[TaskSpec] = []
        frames: list[Any] = []
        size = 0
        cid = link.cid
        for tid in ids:
            tr = tracks.get(tid)
            if tr is None:
                continue  # failed or withdrawn meanwhile
            spec = tr.spec
            if spec.spec.get(OFFER) is True:  # may go straight to the engine: offer this client's socket
                spec = tr.spec = self._offer(spec)
            tr.cid = cid
            link.unacked[tid] = None
            if spec.target is None:
                link.lb_out += 1
            specs.append(spec)
            if "stream" in spec.spec:  # large arguments: sent as a stream when the controller grants credit
                self._open_upload(link, spec, tr.frames)
            else:
                frames.extend(tr.frames)
                size += _nbytes(tr.frames)
            if len(specs) >= SUBMIT_BATCH or size >= SUBMIT_BATCH_BYTES:
                self._send(link, Submit(specs), frames, None)
                specs, frames, size = [], [], 0
        if specs:
            self._send(link, Submit(specs), frames, None)

    def _withdraw(self, ids: list[str] | None) -> list[str]:
        """Remove held tasks (all with ``ids`` None); they fail with TaskAborted."""
        from fedpar.errors import TaskAborted

        wanted = None if ids is None else set(ids)
        out = [t for t in self.held if wanted is None or t in wanted]
        if out:
            drop = set(out)
            self.held = deque(t for t in self.held if t not in drop)
        for eid, q in list(self.held_direct.items()):
            mine = [t for t in q if wanted is None or t in wanted]
            if mine:
                out.extend(mine)
                self.held_direct[eid] = deque(t for t in q if t not in set(mine))
        for tid in out:
            self._fail(tid, TaskAborted(f"task {tid} was aborted before it was sent", task_id=tid))
        return out

    def _send(self, link: Link, msg: Message, frames: list[Any], reply: Future[Received] | None) -> int:
        if isinstance(msg, GetResults):
            link.expected.update(msg.task_ids)
        parts, rid = self.codec.encode(msg, frames)
        if reply is not None:
            self.replies[rid] = reply
        send_parts(link.sock, parts)
        return rid

    # ------------------------------------------------------------------ fan-out requests
    def _fanout(self, gather: Gather) -> None:
        links = self.ready_links()
        gather.asked = len(links)
        if not links:
            gather.done.set()
            return
        for link in links:
            rid = self._send(link, gather.msg, [], None)
            self.gathers[rid] = (gather, link)

    def _lookup(self, lookup: Lookup) -> None:
        links = self.ready_links()
        if not links:
            for tid in lookup.ids:
                self._fail_lookup(tid)
            return
        lookup.asked = lookup.total = len(links)
        for link in links:
            rid = self._send(link, GetResults(lookup.ids), [], None)
            self.lookups[rid] = (lookup, link)

    def _lookup_reply(self, lookup: Lookup, missing: list[str], link: Link | None) -> None:
        """A controller answered (or died before answering: ``missing`` is then every id)."""
        for tid in missing:
            lookup.missing[tid] = lookup.missing.get(tid, 0) + 1
            if link is not None:
                link.expected.discard(tid)
        lookup.asked -= 1
        if lookup.asked <= 0:
            for tid, n in lookup.missing.items():
                if n >= lookup.total and tid not in self.tracks:
                    self._fail_lookup(tid)

    def _fail_lookup(self, tid: str) -> None:
        down = self.view.down
        if down:
            where = ", ".join(f"{k.cid} (host {k.host}, state directory {k.state_dir})" for k in down)
            exc: FedparError = ResultUnavailable(
                f"no live controller holds task {tid!r}; controller(s) {where} are down: results they stored come "
                "back when a controller runs on that state directory again", task_id=tid)
        else:
            exc = ResultNotFound(f"no task {tid!r} in any controller's store", task_id=tid)
        self.client._fail_task(tid, exc)

    # ------------------------------------------------------------------ messages from controllers
    def _on_message(self, link: Link, parts: list[Any]) -> None:
        try:
            rx = self.codec.decode(parts)
        except ProtocolError as exc:
            log.warning("dropped a bad message from controller %s: %s", link.cid or link.endpoint, exc)
            if link.receivers:
                sid = untrusted_chunk_sid(parts)
                if sid is not None and sid in link.receivers:
                    self._abort_download(link, sid, StreamCorrupted(
                        f"a chunk of stream {sid} failed authentication ({exc}); stream aborted"))
            return
        msg = rx.msg
        link.last_heard = time.monotonic()
        epoch = rx.envelope.epoch
        if link.epoch != epoch and not isinstance(msg, Welcome):
            if link.epoch is not None:
                self._resync(link, epoch)
            link.epoch = epoch
        if isinstance(msg, Chunk):
            self._on_chunk(link, msg, rx.frames[0])
        elif isinstance(msg, Results):
            self._on_results(link, msg, rx)
        elif isinstance(msg, Credit):
            got = self.senders.get(msg.sid)
            if got is not None:
                self._pump(got[2], got[1], msg.upto)
        elif isinstance(msg, SubmitReply):
            self._on_submit_reply(link, msg)
        elif isinstance(msg, StreamAbort):
            self._on_stream_abort(link, msg)
        elif isinstance(msg, EngineEvent):
            if msg.capacity >= 0:
                link.capacity = msg.capacity
            self._on_engine_event(link, msg.registered, msg.unregistered, msg.moved)
            if self.held:
                self._dispatch()
        elif isinstance(msg, Welcome):
            self._on_welcome(link, msg, rx)
        elif isinstance(msg, Membership):
            self._on_view(msg.view)
        else:
            rid = getattr(msg, "reply_to", None)
            if isinstance(rid, int):
                g = self.gathers.pop(rid, None)
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
        if link.epoch is not None and link.epoch != epoch:
            self._resync(link, epoch)
        link.epoch = epoch
        if first:
            other = self.by_cid.get(msg.controller)
            if other is not None and other is not link:  # the same controller under another endpoint
                if other.ready and not other.gone:
                    self._drop(link)
                    return
                self._drop(other)
            link.cid = msg.controller
            self.by_cid[msg.controller] = link
            link.ready = True
            link.pid, link.host = msg.pid, msg.host
            self.settings = StreamSettings.from_wire(msg.stream)
        link.capacity = msg.capacity
        self._on_engine_event(link, msg.engines, [e for e in link.engines if e not in msg.engines], [])
        if msg.membership:
            self._on_view(msg.membership)
        self.welcomed.set()
        self._check_settled()
        self.client._on_welcome(link)
        if first:
            self._extend_lookups(link)
            self._dispatch()

    def _extend_lookups(self, link: Link) -> None:
        """A controller joined (or its link became ready): lookups still waiting for answers ask it too."""
        pending = {id(lk): lk for lk, _ in self.lookups.values()}
        for lookup in pending.values():
            lookup.asked += 1
            lookup.total += 1
            rid = self._send(link, GetResults(lookup.ids), [], None)
            self.lookups[rid] = (lookup, link)

    def initial_links_ready(self) -> bool:
        """True when every link made so far answered (or was dropped)."""
        return all(lk.ready for lk in self.links.values() if not lk.gone)

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
                if tr.lb and tr.cid is not None:
                    home.lb_out -= 1
                    freed = True
            tr.cid = link.cid
            if r.stream is None:
                del tracks[tid]
            else:
                tr.finished_there = True  # arriving as a stream: it is done (and stored) there
        if implied:
            self.client._on_accepted(implied)
        if self.link is not None:  # outcomes end direct uploads/downloads; DELIVERED notices are handled
            results = self.link.outcomes(results)
        if any(r.stream is not None for r in results):  # large results follow as streams
            results, frames = self._open_downloads(link, results, frames)
        rid = msg.reply_to
        if rid:
            lk = self.lookups.pop(rid, None)
            lookup = lk[0] if lk is not None else None
            if lookup is not None:
                self._lookup_reply(lookup, msg.missing, link)
            lc = self.locates.pop(rid, None)
            fo = lc[0] if lc is not None else None
            if fo is not None:
                self._locate_reply(fo, link, msg)
            if lookup is None and fo is None:
                for tid in msg.missing:  # a restart's re-ask: the controller has no such task any more
                    link.expected.discard(tid)
                    self.client._fail_task(tid, ResultNotFound(f"no task {tid!r} in the controller's store",
                                                               task_id=tid))
                fut = self.replies.pop(rid, None)
                if fut is not None:
                    fut.set_result(rx)
        self.client._on_results(results, frames)
        if freed and self.held:
            self._dispatch()

    def _on_submit_reply(self, link: Link, msg: SubmitReply) -> None:
        if msg.capacity >= 0:
            link.capacity = msg.capacity
        for tid in msg.accepted:
            link.unacked.pop(tid, None)
        link.expected.update(msg.accepted)
        self.client._on_accepted(msg.accepted)
        if self.upload_of:
            for tid in msg.accepted:
                self._close_upload(tid, acked=True)
        if not msg.rejected:
            return
        refused: list[list[str]] = []
        for item in msg.rejected:
            tid, ename, _ = item
            link.unacked.pop(tid, None)
            self._close_upload(tid)
            tr = self.tracks.get(tid)
            if tr is not None and tr.lb and tr.cid == link.cid:
                link.lb_out -= 1
            if ename == "EngineMoved" and tr is not None and tr.spec.target is not None:
                eid = tr.spec.target  # its engine left for controller ``evalue``: send it there once it is in
                tr.cid = None
                if self.owner.get(eid) == link.cid:
                    del self.owner[eid]
                self.transit.setdefault(eid, time.monotonic())
                self.held_direct.setdefault(eid, deque()).append(tid)
                continue
            self.tracks.pop(tid, None)
            refused.append(item)
        if refused:
            self.client._on_rejected(refused)
        if self.held_direct:
            self._release_direct()

    # ------------------------------------------------------------------ engines and membership
    def _on_engine_event(self, link: Link, registered: Iterable[int], unregistered: Iterable[int],
                         moved: Iterable[int]) -> None:
        cid = link.cid
        if cid is None:
            return
        now = time.monotonic()
        for eid in registered:
            self.owner[eid] = cid
            link.engines.add(eid)
            self.transit.pop(eid, None)
        for eid in unregistered:
            link.engines.discard(eid)
            if self.owner.get(eid) == cid:
                del self.owner[eid]
        for eid in moved:
            link.engines.discard(eid)
            if self.owner.get(eid) == cid:
                del self.owner[eid]
                self.transit[eid] = now
        self._engines_changed()
        if self.held_direct:
            self._release_direct()

    def _engines_changed(self) -> None:
        self.client._set_engines(set(self.owner) | set(self.transit))

    def _release_direct(self) -> None:
        """Send the direct tasks whose engine now has a (new) home."""
        for eid in list(self.held_direct):
            cid = self.owner.get(eid)
            link = self.by_cid.get(cid) if cid is not None else None
            if link is not None and link.ready:
                self._submit(link, list(self.held_direct.pop(eid)))

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
        for t in view.takeovers:
            link = self.by_cid.get(t.cid)
            key = (t.cid, t.epoch)
            if link is not None and link.epoch == t.epoch and key not in self.failovers:
                self._taken_over(link, t.epoch)
            fo = self.failovers.get(key)
            if fo is not None and t.closed and not fo.started:
                self._locate(fo)
        self._check_settled()

    def _check_settled(self) -> None:
        """Set ``settled`` once a ready link exists to every live controller of the view."""
        if all((lk := self.by_cid.get(e.cid)) is not None and lk.ready for e in self.view.live):
            self.settled.set()

    def _taken_over(self, link: Link, epoch: int) -> None:
        """The survivors took over ``link``'s controller: its tasks wait for the takeover to close."""
        cid = link.cid
        assert cid is not None
        ids = [tid for tid, tr in self.tracks.items() if tr.cid == cid]
        for rec in link.receivers.values():  # results that were arriving are stored there: done, not resubmitted
            tr = self.tracks.get(rec[0].task_id)
            if tr is not None:
                tr.finished_there = True
        engines = set(link.engines)
        now = time.monotonic()
        for eid in engines:
            if self.owner.get(eid) == cid:
                del self.owner[eid]
                self.transit[eid] = now
        self._engines_changed()
        log.warning("controller %s (epoch %d) was taken over; %d task(s) of this client wait to be found or "
                    "resubmitted", cid, epoch, len(ids))
        self.failovers[(cid, epoch)] = _Failover(cid, epoch, ids, engines)
        self._drop(link)

    def _locate(self, fo: _Failover) -> None:
        """The takeover closed: ask every live controller which of the tasks it holds."""
        fo.started = True
        links = self.ready_links()
        ids = [t for t in fo.ids if t in self.tracks]
        fo.ids = ids
        if not ids:
            return
        fo.asked = fo.total = len(links)
        if not links:
            self._resubmit(fo, ids)
            return
        for link in links:
            rid = self._send(link, GetResults(ids), [], None)
            self.locates[rid] = (fo, link)

    def _locate_reply(self, fo: _Failover, link: Link | None, msg: Results) -> None:
        """A controller said which of a failover's tasks it has (``link`` None: it died before answering)."""
        found = {r.task_id for r in msg.results}
        missing = set(msg.missing)
        for tid in fo.ids:
            if tid in missing:
                fo.missing[tid] = fo.missing.get(tid, 0) + 1
                if link is not None:
                    link.expected.discard(tid)
            elif tid not in found and link is not None:  # in flight there (adopted with its engine): it will come
                tr = self.tracks.get(tid)
                if tr is not None:
                    tr.cid = link.cid
                    if tr.lb:
                        link.lb_out += 1
        fo.asked -= 1
        if fo.asked <= 0:
            n = fo.total
            self._resubmit(fo, [t for t in fo.ids if fo.missing.get(t, 0) >= n and t in self.tracks
                                and self.tracks[t].cid in (None, fo.cid)])

    def _resubmit(self, fo: _Failover, ids: list[str]) -> None:
        """Tasks no live controller holds: resubmit them (a task that may have run on an engine lost with
        the controller counts that as an attempt, following its retry policy)."""
        lost = {e for e in fo.engines if e not in self.owner}
        again = 0
        for tid in ids:
            tr = self.tracks[tid]
            tr.cid = None
            if tr.finished_there:
                self._fail(tid, ResultUnavailable(
                    f"task {tid} finished on controller {fo.cid}, which died while sending its result: it comes "
                    "back when a controller runs on that state directory again", task_id=tid))
                continue
            spec = tr.spec
            attempts = 0
            if lost:
                if spec.retries < 1 or spec.target is not None:
                    self._fail(tid, EngineError(
                        f"controller {fo.cid} died together with engine(s) {sorted(lost)}; task {tid} may have been "
                        f"running on one of them (retries={spec.retries})", task_id=tid))
                    continue
                attempts = 1
            flags = {**spec.spec, "resubmit": True}
            if attempts:
                flags["attempts"] = attempts
            if "stream" in spec.spec:
                flags["stream"] = [next(self.sids), spec.spec["stream"][1]]
            tr.spec = spec._replace(spec=flags)
            again += 1
            if spec.target is None:
                self.held.appendleft(tid)
            else:
                cid = self._route_direct(tid, spec.target)
                if cid is not None:
                    self._submit(self.by_cid[cid], [tid])
        if again:
            log.warning("resubmitting %d task(s) of controller %s that no live controller holds", again, fo.cid)
        self._dispatch()

    def _resync(self, link: Link, epoch: int) -> None:
        """The controller restarted: send unacknowledged tasks again (flagged, so a task it had already stored
        is not run twice) and ask again for every result still awaited."""
        log.warning("controller %s restarted (epoch %s -> %s); resynchronising %d unacknowledged task(s)",
                    link.cid, link.epoch, epoch, len(link.unacked))
        for sid in [s for s, (_, _, lk) in self.senders.items() if lk is link]:
            self.upload_of.pop(self.senders.pop(sid)[0], None)
        link.receivers.clear()  # results being downloaded are in ``expected``: asked for again below
        ids = list(link.unacked)
        link.unacked.clear()
        for tid in ids:
            tr = self.tracks.get(tid)
            if tr is None:
                continue
            flags = {**tr.spec.spec, "resubmit": True}
            if "stream" in tr.spec.spec:
                flags["stream"] = [next(self.sids), tr.spec.spec["stream"][1]]
            tr.spec = tr.spec._replace(spec=flags)
            if tr.lb:
                link.lb_out -= 1
        self._submit(link, ids)
        waiting = list(link.expected)
        for i in range(0, len(waiting), SUBMIT_BATCH):
            self._send(link, GetResults(waiting[i:i + SUBMIT_BATCH]), [], None)

    def _fail(self, tid: str, exc: FedparError) -> None:
        tr = self.tracks.pop(tid, None)
        if tr is not None and tr.cid is not None:
            link = self.by_cid.get(tr.cid)
            if link is not None:
                link.unacked.pop(tid, None)
                link.expected.discard(tid)
                if tr.lb:
                    link.lb_out -= 1
        self.client._fail_task(tid, exc)

    # ------------------------------------------------------------------ streams
    def _open_upload(self, link: Link, spec: TaskSpec, frames: list[Any]) -> None:
        sid, sizes = spec.spec["stream"]
        self.senders[sid] = (spec.task_id, Sender(sid, sizes, memory_source(frames), time.monotonic()), link)
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

    def _on_direct(self, direct: ClientLink) -> None:
        """Messages from engines on the direct-stream socket; completed downloads become results."""
        waiting = self.client._waiting
        for _ in range(1024):
            if not readable(direct.sock):
                return
            for res, frames in direct.on_message(recv_parts(direct.sock, NOBLOCK), waiting.__contains__,
                                                 time.monotonic()):
                tr = self.tracks.pop(res.task_id, None)
                if tr is not None and tr.cid is not None and tr.cid in self.by_cid:
                    self.by_cid[tr.cid].expected.discard(res.task_id)
                direct.drop_upload(res.task_id)
                self.client._on_results([res], frames)

    def _pump(self, link: Link, sender: Sender, upto: int) -> None:
        sender.grant(upto, time.monotonic())
        sid = sender.sid
        for index, data in sender.ready():
            self._send(link, Chunk(sid, index), [data], None)

    def _open_downloads(self, link: Link, results: list[ResultSpec], frames: list[Any],
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
                self.tracks.pop(r.task_id, None)
                self.client._fail_task(r.task_id, StreamCorrupted(f"bad stream head: {exc}", task_id=r.task_id))
                continue
            rec = Receiver(sid, sizes, self.settings.window, now)
            link.receivers[sid] = (r, rec)
            upto = rec.credit()
            if upto is not None:
                self._send(link, Credit(sid, upto), [], None)
        return inline, inline_frames

    def _on_chunk(self, link: Link, msg: Chunk, data: Any) -> None:
        got = link.receivers.get(msg.sid)
        if got is None:
            return  # a stream abandoned already
        spec, rec = got
        try:
            rec.accept(msg.index, data, time.monotonic())
        except StreamCorrupted as exc:
            self._abort_download(link, msg.sid, exc)
            return
        if rec.done:
            del link.receivers[msg.sid]
            link.expected.discard(spec.task_id)
            self.tracks.pop(spec.task_id, None)
            frames = rec.frames()
            self.client._on_results([spec._replace(nframes=len(frames), stream=None)], frames)
            return
        upto = rec.credit()
        if upto is not None:
            self._send(link, Credit(msg.sid, upto), [], None)

    def _abort_download(self, link: Link, sid: int, exc: StreamError, tell: bool = True) -> None:
        got = link.receivers.pop(sid, None)
        if got is None:
            return
        tid = got[0].task_id
        link.expected.discard(tid)
        exc.task_id = tid
        if tell:
            self._send(link, StreamAbort(sid, type(exc).__name__, str(exc)), [], None)
        self._fail(tid, exc)

    def _on_stream_abort(self, link: Link, msg: StreamAbort) -> None:
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
                tr = self.tracks.get(rec[0].task_id)
                if tr is not None:
                    tr.finished_there = False
            return
        if msg.sid in link.receivers:
            from fedpar import errors

            cls = getattr(errors, msg.ename, None)
            exc = cls(msg.evalue) if isinstance(cls, type) and issubclass(cls, StreamError) else None
            self._abort_download(link, msg.sid, exc or errors.StreamAborted(f"{msg.ename}: {msg.evalue}"), tell=False)

    def _expire_streams(self, now: float) -> None:
        timeout = self.settings.timeout
        for link in list(self.links.values()):
            for sid, (spec, rec) in list(link.receivers.items()):
                if rec.idle(now, timeout):
                    self._abort_download(link, sid, StreamTimeout(
                        f"result of task {spec.task_id}: no chunk for {timeout:.0f}s ({rec.next} of {len(rec)} "
                        "received)"))
        for sid, (tid, sender, _link) in list(self.senders.items()):
            if sender.idle(now, timeout):  # the controller abandoned it (it refuses the task itself)
                del self.senders[sid]
                self.upload_of.pop(tid, None)


def wait_gather(gather: Gather, timeout: float | None) -> list[tuple[Link, Received]]:
    """Wait for a fan-out's answers (those that came within ``timeout``)."""
    gather.done.wait(timeout)
    return list(gather.replies)

