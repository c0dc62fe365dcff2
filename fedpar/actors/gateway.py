"""The gateway: sole owner of the controller's sockets and the thread that runs its hot path.

Why one thread: a thread hand-off costs tens of microseconds in CPython (a pykka ``ask`` ~14 us here),
and a task crosses the controller twice. So the gateway's loop receives a burst of messages, feeds them
to the pure state machines (``Scheduler``, ``EngineRegistry``), records the store writes in the
``Journal``, commits once, and only then sends acknowledgements, results and task batches. Nothing is
acknowledged before it is stored, and the per-task cost is a few dictionary operations, not hand-offs.

Other threads (the housekeeper actor, signal handlers) talk to the gateway with ``call_soon``.

Roles beside the hot path are desks the gateway owns, run on its thread: ``engines`` (registration,
heartbeats, placement, the federation's effects), ``requests`` (results by id, abort, status, queries,
purges), ``streams`` (what a large payload's stream means for its task). What stays here is the hot path
itself: submissions, results, and the end of a pass (commit, then acknowledge, deliver and dispatch); about
590 lines, because splitting it would put its thread-confined state behind another indirection per task.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import zmq

from fedpar.actors.engines import ENGINE_LOST, EngineDesk, FederationLink
from fedpar.actors.journal import Journal
from fedpar.actors.relay import Relay
from fedpar.actors.requests import RequestDesk
from fedpar.actors.streams import StreamDesk
from fedpar.control.recovery import Recovery
from fedpar.control.registry import EngineRegistry
from fedpar.control.scheduler import Scheduler, Task
from fedpar.errors import MalformedMessage, ProtocolError, SignatureError
from fedpar.federation.membership import LOST, OK, Fence
from fedpar.store.records import EngineRecord, TaskRecord
from fedpar.store.schema import STREAM_INPUT
from fedpar.wire.codec import Codec, Received
from fedpar.wire.direct import OFFER, without_offer
from fedpar.wire.protocol import (
    Chunk,
    Credit,
    EngineEvent,
    EngineHello,
    Heartbeat,
    Membership,
    MembershipRequest,
    Message,
    Results,
    ResultSpec,
    StreamAbort,
    Submit,
    SubmitReply,
    Tasks,
    TaskSpec,
)
from fedpar.wire.streams import DELIVERED, StreamSettings, parse_head, untrusted_chunk_sid
from fedpar.wire.transport import NOBLOCK, Waker, readable, recv_parts, send_parts

log = logging.getLogger(__name__)

# Bytes received per pass before it is committed. Bounds the size of one LMDB transaction, and LMDB keeps
# the dirty pages of its largest transaction cached for reuse: so this bounds the controller's footprint.
PASS_BYTES = 2 << 20
# A small submission's acknowledgement waits this long for the task's result, which then acknowledges it
# (the client treats a result as its task's acknowledgement). A short task's round trip then costs one
# message less each way through the client and the controller; a longer task is acknowledged after this.
ACK_HOLD = 0.005
ACK_HOLD_MAX = 16  # tasks in one submission, at most, for its acknowledgement to wait


def _attempts(spec: dict[str, Any]) -> int:
    n = spec.get("attempts")
    return n if isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 1000 else 0


class Gateway:
    """The controller's I/O loop. ``run()`` blocks until ``stop()`` (or a ``Shutdown`` request)."""

    def __init__(
        self,
        *,
        controller_id: str,
        codec: Codec,
        client_sock: zmq.Socket[Any],
        engine_sock: zmq.Socket[Any],
        journal: Journal,
        registry: EngineRegistry,
        scheduler: Scheduler,
        heartbeat: float,
        batch: int = 1024,
        stream: StreamSettings | None = None,
        fence: Fence | None = None,
        federation: FederationLink | None = None,
        pid: int = 0,
        host: str = "",
    ):
        self.controller_id = controller_id
        self.cid = controller_id  # stable per state directory; the epoch tells incarnations apart
        self.pid = pid
        self.host = host
        self.fence = fence or Fence(None)
        self.stepped_down = False  # the registration was lost to a takeover: this controller must stop
        self.leaving = False  # handing its work over (graceful stop while peers run): starts nothing
        self.codec = codec
        self.client_sock = client_sock
        self.engine_sock = engine_sock
        self.journal = journal
        self.registry = registry
        self.scheduler = scheduler
        self.heartbeat = heartbeat
        self.batch = batch
        self.waker = Waker()
        self._inbox: deque[Callable[[], None]] = deque()
        self._running = False
        self.stopped_by_request = False
        self.dropped: dict[str, int] = defaultdict(int)  # bad messages by error class name
        self.counters: dict[str, int] = defaultdict(int)
        self.clients: set[bytes] = set()  # routing ids of clients that said hello
        self._watchers: dict[str, bytes | set[bytes]] = {}  # task id -> client(s) waiting for it
        self._saved_marks: dict[str, int] = codec.guard.marks()
        self._queued_now: list[Task] = []  # accepted this pass (their payload is dropped after commit)
        # Acknowledgements waiting for their tasks' results: (client, request id) -> (until, ids, ids without
        # a result sent yet). Only plain small submissions wait (no stream, no direct offer, no resubmission).
        self._held: dict[tuple[bytes, int], tuple[float, list[str], set[str]]] = {}
        self.recovery = Recovery((), 0.0)
        self.streams = StreamDesk(self)
        self.relay = Relay(journal, stream or StreamSettings(), self._send, self.streams.stream_complete,
                           self.streams.stream_failed)
        self.desk = EngineDesk(self, federation)
        self.requests = RequestDesk(self)
        self._capacity = 0  # what clients were last told to keep outstanding here (load-balanced tasks)
        self._told: dict[bytes, int] = {}  # client -> capacity it was last told
        self._reset_pass()

    # ------------------------------------------------------------------ thread-safe entry points
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the gateway thread at its next pass (safe from any thread)."""
        self._inbox.append(fn)
        self.waker.wake()

    def stop(self) -> None:
        self.call_soon(self._request_stop)

    def _request_stop(self) -> None:
        self._running = False

    def persist_marks(self) -> None:
        """Journal the replay marks that moved since the last call, and forget those too old to matter
        (run on the gateway thread)."""
        for sender in self.codec.guard.prune():
            self.journal.forget_mark(sender)
        marks = self.codec.guard.marks()
        for sender, seq in marks.items():
            if self._saved_marks.get(sender) != seq:
                self.journal.mark(sender, seq)
        self._saved_marks = marks

    def recover(self, tasks: list[TaskRecord], engines: list[EngineRecord], now: float, grace: float) -> None:
        """Resume after a restart: re-queue what was queued, and give the engines that held assigned
        tasks ``grace`` seconds to register again and say which of them they still run."""
        self.registry.remember([e for e in engines if e.state == "up"])
        self.recovery = Recovery(tasks, now + grace)
        for task in self.recovery.queued:
            self.scheduler.submit(task)
        if tasks:
            log.info("recovered %d unfinished task(s): %d queued again, %d waiting for their engines",
                     len(tasks), len(self.recovery.queued), len(tasks) - len(self.recovery.queued))

    def _retry_or_fail(self, task: Task, why: str, now: float) -> None:
        """A task lost its engine: run it again if its policy allows, else fail it with EngineError."""
        if task.target is None and task.attempts <= task.retries:
            self.scheduler.requeue(task)
            self.journal.task_requeued(task)
        else:
            policy = f"after {task.attempts} attempt(s) with retries={task.retries}"
            self._fail(task, ENGINE_LOST, f"{why} ({policy})", now)

    # ------------------------------------------------------------------ loop
    def _reset_pass(self) -> None:
        self._acks: dict[tuple[bytes, int], list[str]] = {}
        self._holdable: set[tuple[bytes, int]] = set()  # acknowledgements of this pass that may wait
        self._rejects: dict[tuple[bytes, int], list[list[str]]] = defaultdict(list)
        self._to_clients: dict[bytes, list[tuple[ResultSpec, list[Any]]]] = defaultdict(list)
        self._replies: list[tuple[zmq.Socket[Any], bytes, Message, list[Any]]] = []
        self._events_registered: list[int] = []
        self._events_unregistered: list[int] = []
        self._events_moved: list[int] = []
        self._finished_now: dict[str, tuple[ResultSpec, list[Any]]] = {}  # results of this pass (not committed)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.client_sock, zmq.POLLIN)
        poller.register(self.engine_sock, zmq.POLLIN)
        poller.register(self.waker.fileno(), zmq.POLLIN)
        self._running = True
        next_check = time.monotonic() + self.heartbeat / 2
        while self._running:
            if self._has_work():
                timeout = 0.0
            else:
                wake = min(next_check, *(h[0] for h in self._held.values())) if self._held else next_check
                timeout = max(0.0, wake - time.monotonic())
            ready = dict(poller.poll(int(timeout * 1000)))
            now = time.time()
            if self.waker.fileno() in ready:
                self.waker.drain()
                while self._inbox:
                    fn = self._inbox.popleft()
                    try:
                        fn()
                    except Exception:  # (an answer from another actor must not end this loop)
                        log.exception("controller: a deferred call failed")
            if self.engine_sock in ready:
                self._drain(self.engine_sock, self._on_engine_message, now)
            if self.client_sock in ready:
                self._drain(self.client_sock, self._on_client_message, now)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.heartbeat / 2
                self.desk.check_engines(now)
            self._finish_pass(now)
        if self.stepped_down:  # taken over: its engines go to the others, which adopt what they hold
            self.desk.send_everyone_away("controller taken over")
        elif self.leaving:  # (its engines go to the other controllers; none is stopped)
            self.desk.evict_now()
        else:
            self.desk.shutdown_engines("controller stopping")
        self._finish_pass(time.time(), final=True)

    def _drain(self, sock: zmq.Socket[Any], handle: Callable[[bytes, Received, float], None], now: float) -> None:
        budget = PASS_BYTES
        for _ in range(self.batch):
            if budget <= 0 or not readable(sock):
                return
            parts = recv_parts(sock, NOBLOCK)
            budget -= sum(len(p) for p in parts)
            ident = parts[0]
            try:
                received = self.codec.decode(parts, 1)
            except ProtocolError as exc:
                name = type(exc).__name__
                self.dropped[name] += 1
                if isinstance(exc, SignatureError) and self.relay.inbound:
                    self.relay.corrupted(ident, untrusted_chunk_sid(parts, 1))
                if self.dropped[name] <= 10 or self.dropped[name] % 1000 == 0:
                    log.warning("dropped a message from %r (%s #%d): %s", ident, name, self.dropped[name], exc)
                continue
            try:
                handle(ident, received, now)
            except Exception:  # a bug must not take the controller down
                self.dropped["HandlerError"] += 1
                log.exception("error handling %s from %r", received.envelope.kind, ident)

    # ------------------------------------------------------------------ client messages
    def _on_client_message(self, ident: bytes, rx: Received, now: float) -> None:
        msg = rx.msg
        if isinstance(msg, Submit):
            self._on_submit(ident, rx.envelope.id, rx.envelope.sender, msg, rx.frames, now)
        elif isinstance(msg, Chunk):
            self.relay.on_chunk(self.client_sock, ident, msg, rx.frames[0], now)
        elif isinstance(msg, Credit):
            self.relay.on_credit(ident, msg, now)
        elif isinstance(msg, StreamAbort):
            self.relay.on_abort(ident, msg)
        else:
            self.requests.on_message(ident, rx, now)

    def _on_submit(self, ident: bytes, rid: int, sender: str, msg: Submit, frames: list[Any], now: float) -> None:
        self.clients.add(ident)
        key = (ident, rid)
        accepted = self._acks.setdefault(key, [])
        if len(msg.tasks) <= ACK_HOLD_MAX and not any("stream" in t.spec or OFFER in t.spec or "resubmit" in t.spec
                                                       for t in msg.tasks):
            self._holdable.add(key)
        pos = 0
        sched = self.scheduler
        for spec in msg.tasks:
            tframes = frames[pos:pos + spec.nframes]
            pos += spec.nframes
            if spec.target is not None and (not sched.has_engine(spec.target) or sched.draining(spec.target)):
                home = self.desk.draining(spec.target)
                self._rejects[(ident, rid)].append(
                    [spec.task_id, "EngineMoved", home] if home is not None else
                    [spec.task_id, "UnknownEngineError",
                     f"engine {spec.target} is not registered (registered: {self.registry.ids()})"]
                )
                continue
            if sched.get(spec.task_id) is not None or (spec.spec.get("resubmit")
                                                       and self.requests.known_task(spec.task_id, ident)):
                self._watch(spec.task_id, ident)
                accepted.append(spec.task_id)  # in flight already, or sent again after a reconnect: never twice
                continue
            if OFFER in spec.spec and not self.streams.direct_ok(spec):  # the bytes must pass here: no direct stream
                spec = spec._replace(spec=without_offer(spec.spec))
            head = spec.spec.get("stream")
            if head is not None and OFFER in spec.spec:  # arguments go straight from client to engine
                try:
                    parse_head(head)
                except MalformedMessage as exc:
                    self._rejects[(ident, rid)].append([spec.task_id, "MalformedMessage", str(exc)])
                    continue
            elif head is not None:  # the arguments follow as a stream: scheduled now, recorded once all stored
                try:
                    sid, sizes = parse_head(head)
                except MalformedMessage as exc:
                    self._rejects[(ident, rid)].append([spec.task_id, "MalformedMessage", str(exc)])
                    continue
                task = Task(spec.task_id, sender, spec.op, spec.target, len(sizes), spec.retries, spec.spec, None,
                            now)
                self.relay.open_input(self.client_sock, ident, rid, task, sid, sizes, now)
                sched.submit(task)
                self._watch(task.task_id, ident)
                continue
            task = Task(spec.task_id, sender, spec.op, spec.target, spec.nframes, spec.retries, spec.spec,
                        tframes, now)
            if "attempts" in spec.spec:  # resubmitted after its controller died: it may have run once already
                task.attempts = _attempts(spec.spec)
            sched.submit(task)
            self.journal.task_queued(task)
            self._queued_now.append(task)
            self._watch(task.task_id, ident)
            accepted.append(spec.task_id)
            self.counters["submitted"] += 1

    def _watch(self, task_id: str, ident: bytes) -> None:
        w = self._watchers.get(task_id)
        if w is None:
            self._watchers[task_id] = ident  # the common case: only the submitter waits (no set per task)
        elif isinstance(w, bytes):
            if w != ident:
                self._watchers[task_id] = {w, ident}
        else:
            w.add(ident)

    # ------------------------------------------------------------------ engine messages
    def _on_engine_message(self, ident: bytes, rx: Received, now: float) -> None:
        msg = rx.msg
        if isinstance(msg, Results):
            eid = self.registry.by_task_identity(ident)
            if eid is not None:
                self.registry.seen(eid, now)
            self._on_results(ident, msg, rx.frames, now)
        elif isinstance(msg, Chunk):
            self.relay.on_chunk(self.engine_sock, ident, msg, rx.frames[0], now)
        elif isinstance(msg, Credit):
            self.relay.on_credit(ident, msg, now)
        elif isinstance(msg, StreamAbort):
            self.relay.on_abort(ident, msg)
        elif isinstance(msg, Heartbeat):
            self.desk.on_heartbeat(ident, msg, now)
        elif isinstance(msg, EngineHello):
            self.desk.on_hello(ident, rx.envelope.id, msg, now)
        elif isinstance(msg, MembershipRequest):
            self._replies.append((self.engine_sock, ident, Membership(self.desk.membership_wire(), rx.envelope.id), []))
        else:
            self.dropped["UnexpectedKind"] += 1

    # ------------------------------------------------------------------ for the engine desk (gateway thread)
    def reply_engine(self, ident: bytes, msg: Message) -> None:
        """Send ``msg`` to an engine after this pass's commit."""
        self._replies.append((self.engine_sock, ident, msg, []))

    def send_engine(self, ident: bytes, msg: Message) -> bool:
        return self._send(self.engine_sock, ident, msg)

    def send_client(self, ident: bytes, msg: Message) -> bool:
        return self._send(self.client_sock, ident, msg)

    def engine_registered(self, eid: int) -> None:
        self._events_registered.append(eid)

    def engine_left(self, eid: int, home: str) -> None:
        """An idle engine moved to controller ``home``: forget it here (clients keep it: it is not gone)."""
        ident = self.registry.task_identity(eid)
        if ident is not None:
            self.relay.drop_peer(ident)
        rec = self.registry.unregister(eid, "moved")
        if rec is not None:
            self.journal.engine(rec)
        self.scheduler.remove_engine(eid)
        self._events_moved.append(eid)

    def watch_submitter(self, task_id: str) -> None:
        """Send ``task_id``'s result to the client that submitted it, if it is connected here (a task id
        starts with its client's sender id, as ``Client`` makes them): used for adopted tasks."""
        ident = ("client:" + task_id.split("-", 1)[0]).encode()
        if ident in self.clients:
            self._watch(task_id, ident)

    def _on_results(self, ident: bytes, msg: Results, frames: list[Any], now: float) -> None:
        pos = 0
        for res in msg.results:
            rframes = frames[pos:pos + res.nframes]
            pos += res.nframes
            if res.stream is not None:
                if isinstance(res.stream, list) and res.stream and res.stream[0] == DELIVERED:
                    self.streams.on_delivered(res)
                else:
                    self.streams.on_result_stream(ident, res, now)
                continue
            runtime = res.completed - res.started if res.started is not None else None
            task = self.scheduler.complete(res.task_id, res.engine, runtime)
            if task is None:
                task = self.recovery.take(res.task_id)  # finished while the controller was down
            if task is None:
                self.dropped["DuplicateResult"] += 1
                continue
            self._finish(task, res, rframes)

    def _finish(self, task: Task, res: ResultSpec, frames: list[Any]) -> None:
        """Record a task's outcome and send it to its watchers (``res.stream``: stored chunk by chunk)."""
        if self.relay.input_of(task.task_id) is not None:
            # It failed (its engine was lost) before its arguments finished arriving: it was never stored or
            # acknowledged, so its submission is refused with that error instead, and nothing is recorded.
            ename, evalue = (res.error[0], res.error[1]) if res.error else ("TaskAborted", "")
            self.relay.fail_input(task.task_id, ename.removeprefix("fedpar.") if ename.startswith("fedpar.")
                                  else "TaskAborted", f"task {task.task_id} ended before its arguments arrived: "
                                                      f"{evalue}")
            return
        delivered = res.stream is not None and res.stream[0] == DELIVERED
        self.journal.task_finished(task, res, frames, None if res.stream is None or delivered else res.stream[1],
                                   delivered=delivered)
        self._finished_now[task.task_id] = (res, frames)
        self.counters["finished"] += 1
        w = self._watchers.pop(task.task_id, None)
        if not self._watchers:  # a dict never shrinks: drop the table a burst grew
            self._watchers = {}
        fed = self.relay.following(task.task_id) if res.stream is not None else ()
        for ident in (w,) if isinstance(w, bytes) else w or ():
            if delivered:  # the submitter has it; any other watcher learns it is not kept
                self._to_clients[ident].append((res, []))
            elif ident not in fed:  # (a follower stream has been sending it already)
                self._to_clients[ident].append(self.requests.for_client(ident, res, frames))

    def _fail(self, task: Task, ename: str, evalue: str, now: float) -> None:
        res = ResultSpec(task.task_id, False, task.engine, task.assigned, now, [ename, evalue, ""], 0)
        self._finish(task, res, [])

    # ------------------------------------------------------------------ end of a pass
    def _finish_pass(self, now: float, final: bool = False) -> None:
        self.relay.after_commit(self.journal.commit_chunks(), now)  # stream chunks first: completions follow
        state = self.fence.state(time.monotonic())
        if state == LOST and not final:
            self.stepped_down = True
            self._running = False
        # Paused (the registration cannot be proven alive: survivors may be taking this controller's work
        # over), stepped down or leaving: start nothing; answers, results and storage go on.
        dispatch = self.scheduler.assign(now) if state == OK and not self.leaving else []
        for _eid, tasks in dispatch:
            for t in tasks:
                self.journal.task_assigned(t)
        refused, why = self.journal.commit()
        for task in self._queued_now:
            if task.engine is None:  # stored and still queued: its payload lives in LMDB only
                task.frames = None
        self._queued_now = []
        if refused:
            refused_ids = {t.task_id for t in refused}
            self.scheduler.cancel_queued(refused_ids)
            for task in refused:  # refused ones already assigned this pass give their slot back
                self.scheduler.complete(task.task_id, None, None)
                self._watchers.pop(task.task_id, None)
                if "stream" in task.spec and OFFER not in task.spec:  # its streamed arguments are stored: free them
                    self.journal.stream_drop(STREAM_INPUT, task.task_id)
                    self.relay.abort_followers(task.task_id, f"the submission was refused: {why}")
            for (ident, rid), ids in self._acks.items():
                bad = [i for i in ids if i in refused_ids]
                if bad:
                    self._acks[(ident, rid)] = [i for i in ids if i not in refused_ids]
                    self._rejects[(ident, rid)].extend([i, "StoreFull", why] for i in bad)
            dispatch = [(eid, [t for t in ts if t.task_id not in refused_ids]) for eid, ts in dispatch]
        acks, rejects, to_clients, replies = self._acks, self._rejects, self._to_clients, self._replies
        registered, unregistered, moved = self._events_registered, self._events_unregistered, self._events_moved
        holdable = self._holdable
        self._reset_pass()  # whatever sending below triggers (a lost engine) lands in the next pass
        cap = self._capacity_now(now)
        if self._held:
            self._settle_held_acks(to_clients, final)
        for key, ids in acks.items():
            rej = rejects.pop(key, [])
            if key in holdable and ids and not rej and not final:
                self._held[key] = (time.monotonic() + ACK_HOLD, ids, set(ids))
            else:
                self._send(self.client_sock, key[0], SubmitReply(key[1], ids, rej, self._tell(key[0], cap)))
        for (ident, rid), rej in rejects.items():
            self._send(self.client_sock, ident, SubmitReply(rid, [], rej, self._tell(ident, cap)))
        for ident, items in to_clients.items():
            self._send(self.client_sock, ident, Results([r for r, _ in items], [], 0, self._tell(ident, cap)),
                       [f for _, fr in items for f in fr])
        for sock, ident, msg, frames in replies:
            self._send(sock, ident, msg, frames)
        for eid, tasks in dispatch:
            if tasks:
                self._dispatch(eid, tasks, now)
        if registered or unregistered or moved:
            self._capacity_at = 0.0  # (engines came or went: recompute now and tell every client)
            cap = self._capacity_now(now)
            ev = EngineEvent(registered, unregistered, moved, cap)
            for ident in list(self.clients):
                self._told[ident] = cap
                self._send(self.client_sock, ident, ev)
        self.desk.after_pass()
        if self.relay.outbound:
            self.relay.pump()

    def _settle_held_acks(self, to_clients: dict[bytes, list[tuple[ResultSpec, list[Any]]]], final: bool) -> None:
        """Drop the held acknowledgements whose tasks' results go out in this pass; send those that waited
        long enough (for the tasks still without a result)."""
        mono = time.monotonic()
        out: dict[bytes, set[str]] = {}  # per client: ids of the results this pass sends it
        for key, (until, ids, remaining) in list(self._held.items()):
            done = out.get(key[0])
            if done is None:
                items = to_clients.get(key[0])
                done = out[key[0]] = {r.task_id for r, _ in items} if items else set()
            if done:  # (cost: the held ids, at most ACK_HOLD_MAX, not the pass's results)
                for tid in [t for t in remaining if t in done]:
                    remaining.discard(tid)
            if not remaining:
                del self._held[key]
            elif final or mono >= until:
                del self._held[key]
                self._send(self.client_sock, key[0], SubmitReply(key[1], [i for i in ids if i in remaining], []))

    def _tell(self, ident: bytes, cap: int) -> int:
        """``cap`` if client ``ident`` was last told another capacity (it is told now), else -1."""
        if self._told.get(ident) == cap:
            return -1
        self._told[ident] = cap
        return cap

    def _capacity_now(self, now: float) -> int:
        """The scheduler's capacity, recomputed at most every 50 ms (it walks every engine)."""
        if now >= self._capacity_at:
            self._capacity_at = now + 0.05
            self._capacity = self.scheduler.capacity()
        return self._capacity

    _capacity_at = 0.0

    def _has_work(self) -> bool:
        """True when the last pass left something to commit or send (poll without sleeping)."""
        return bool(self._to_clients or self._replies or self._rejects or self._acks
                    or self._events_unregistered or self._events_registered or self._events_moved
                    or self.journal.pending
                    or (self.relay.outbound and self.relay.has_ready()))

    def _dispatch(self, eid: int, tasks: list[Task], now: float) -> None:
        ident = self.registry.task_identity(eid)
        if ident is None:
            self.desk.lose_engine(eid, now, f"engine {eid} is unreachable")
            return
        frames: list[Any] = []
        specs: list[TaskSpec] = []
        missing = [t.task_id for t in tasks if t.frames is None and "stream" not in t.spec]
        stored = dict(zip(missing, self.journal.store.get_inputs_many(missing), strict=True)) if missing else {}
        for t in tasks:
            head = t.spec.get("stream")
            if head is not None and OFFER not in t.spec:  # large arguments: streamed from the store under credit
                sizes = head[1]
                sid = self.relay.open_out(self.engine_sock, ident, STREAM_INPUT, t.task_id, sizes, now, patient=True,
                                          follow=self.relay.input_of(t.task_id))
                specs.append(TaskSpec(t.task_id, t.op, t.target, 0, t.retries, {**t.spec, "stream": [sid, sizes]}))
                continue
            tframes = t.frames
            if tframes is None:  # queued before this pass, or a retry: the payload comes from the store
                tframes = stored.get(t.task_id) or []
            t.frames = None  # in-flight memory holds no payload once it is on its way
            specs.append(TaskSpec(t.task_id, t.op, t.target, len(tframes), t.retries, t.spec))
            frames.extend(tframes)
        if not self._send(self.engine_sock, ident, Tasks(specs), frames):
            self.desk.lose_engine(eid, now, f"engine {eid} is unreachable")

    def _reply_client(self, ident: bytes, msg: Message, frames: list[Any] | None = None) -> None:
        self._replies.append((self.client_sock, ident, msg, frames or []))

    def _send(self, sock: zmq.Socket[Any], ident: bytes, msg: Message, frames: list[Any] | None = None) -> bool:
        parts, _ = self.codec.encode(msg, frames or ())
        try:
            send_parts(sock, [ident, *parts])
            return True
        except zmq.ZMQError as exc:  # ROUTER_MANDATORY: the peer is gone
            if sock is self.client_sock:
                self.clients.discard(ident)
                self._told.pop(ident, None)
            log.debug("cannot send %s to %r: %s", msg.KIND, ident, exc)
            return False
