"""The gateway's engine desk: registration, heartbeats, placement and the federation's effects.

Runs on the gateway thread (the gateway owns it and calls it; it sends through the gateway). It decides:

* **ids**: a lone controller numbers engines from its store; in a federation a new engine's global id comes
  from the registry (asked of the federation actor, in batches, so registrations never wait on the network
  in the gateway's loop) and the engine keeps it for life.
* **placement** (``fedpar.federation.placement``): weighted rendezvous ranking with bounded loads. A new
  engine registers where it arrives (engines start at a random controller of those they know, so arrivals
  are spread; redirecting them on counts that lag behind a registration storm only bounced them around);
  once the counts have been stable for a while, a controller over its quota drains the engines it should
  shed, those that rank it lowest (no new load-balanced work; what they hold finishes), and then tells each
  to move (``EngineMove``) to its best-ranked controller under quota. Balanced federations move nothing.
* **adoption**: an engine whose controller died arrives with the tasks it holds (``origin``); the federation
  actor says whether the takeover of that controller is still open. If so, the tasks become this
  controller's (their results are stored here and go to their clients); if it closed, the engine drops
  them (their clients resubmit them); if the old controller is registered again, the engine goes back.
* **membership pushes**: every change of the view goes to every client and engine (``Membership``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedpar.control.scheduler import Task
from fedpar.federation import placement
from fedpar.federation.membership import ADOPT, BACK, REFUSE, View
from fedpar.federation.records import ControllerEntry
from fedpar.wire.protocol import (
    REGISTER_WAIT,
    EngineHello,
    EngineMove,
    EngineStop,
    EngineWelcome,
    Heartbeat,
    Membership,
)

if TYPE_CHECKING:
    from fedpar.actors.gateway import Gateway

log = logging.getLogger(__name__)

ENGINE_LOST = "fedpar.EngineError"  # the error of a task whose engine was lost
QUIET = 2.0  # seconds without rebalancing after engines moved in or out (published counts lag ~1 s)


@dataclass
class FederationLink:
    """How the gateway reaches the federation actor (all calls return at once; answers come by call_soon)."""

    allocate: Callable[[int, Callable[[list[int]], None]], None]  # (n, reply)
    adopt: Callable[[str, int, Callable[[str], None]], None]  # (controller id, epoch, reply)


@dataclass
class _Hello:
    ident: bytes
    rid: int
    msg: EngineHello
    now: float


class EngineDesk:
    """Engine registration and everything membership changes do to engines (gateway thread only)."""

    def __init__(self, gw: Gateway, fed: FederationLink | None):
        self.gw = gw
        self.fed = fed
        self.view = View()
        self._need_ids: list[_Hello] = []  # new engines waiting for global ids
        self._spare_ids: list[int] = []  # global ids allocated for engines that went elsewhere meanwhile
        self._asking = False
        self._tokens = itertools.count(1)
        self._moving: dict[int, str] = {}  # engine id -> the controller it drains towards
        self.moved_to: dict[int, str] = {}  # engines that left for another controller
        self._adopting: set[int] = set()  # engine ids with an adoption verdict pending
        self._evicting: dict[int, str] = {}  # leaving: engine id -> where it goes (told once it can be reached)
        self._evict_reason = ""
        # Engines this controller sent elsewhere (redirected or moved) lately, counted for their new home until
        # its published count shows them (placement decides from counts published about once a second).
        self._sent: deque[tuple[float, str]] = deque()
        self._sent_count: Counter[str] = Counter()  # the same, counted per controller
        self._shape: object = None  # what clients and engines were last told of the federation
        self._quiet_until = 0.0  # no rebalancing before (monotonic): the counts must catch up with the moves
        self._stable: tuple[dict[str, int], float] = ({}, 0.0)  # counts last seen, and since when unchanged

    # ------------------------------------------------------------------ messages from engines
    def on_hello(self, ident: bytes, rid: int, msg: EngineHello, now: float) -> None:
        hello = _Hello(ident, rid, msg, now)
        origin = msg.origin
        if msg.engine_id < 0:
            known = self.gw.registry.id_of(msg.uuid)
            if self.fed is None or known is not None:  # (a lone controller numbers its own; a re-sent hello)
                self._register(hello, known)
                return
            # (an engine asking again while its id is on the way: answer the latest hello, once)
            self._need_ids = [h for h in self._need_ids if h.msg.uuid != msg.uuid]
            self._need_ids.append(hello)
            self._assign_ids(now)
            return
        if (self.fed is not None and len(origin) == 2 and isinstance(origin[0], str) and isinstance(origin[1], int)
                and msg.running and (origin[0] != self.gw.cid or self.view.takeover(origin[0], origin[1]))):
            # (from another controller; or from an older incarnation of this one that the others took over:
            # then its tasks are the takeover's, not this store's)
            if msg.engine_id in self._adopting:
                return  # (asked again while the verdict is pending)
            self._adopting.add(msg.engine_id)
            self.fed.adopt(origin[0], origin[1], lambda verdict: self._verdict(hello, verdict))
            return
        self._register(hello, msg.engine_id)

    def _assign_ids(self, now: float) -> None:
        """Register the new engines waiting, with global ids from the federation actor (asked one request at
        a time; one that failed, the registry being unreachable, is asked again by ``check_engines``). A
        hello older than ``REGISTER_WAIT`` is dropped: its engine has gone on to another controller (and
        says hello again if it comes back), so registering it here would leave a phantom engine."""
        self._need_ids = [h for h in self._need_ids if now - h.now < REGISTER_WAIT]
        while self._need_ids and self._spare_ids:
            self._register(self._need_ids.pop(0), self._spare_ids.pop(0))
        if self._need_ids and not self._asking and self.fed is not None:
            self._asking = True
            self.fed.allocate(len(self._need_ids), self._got_ids)

    def _got_ids(self, ids: list[int]) -> None:
        self._asking = False
        self._spare_ids.extend(ids)  # (ids left over, their hellos gone stale, serve the next engines)
        self._assign_ids(time.time())

    def _verdict(self, hello: _Hello, verdict: str) -> None:
        msg = hello.msg
        self._adopting.discard(msg.engine_id)
        cid, epoch = msg.origin
        if not verdict:  # (the registry failed: the engine's hello comes again)
            return
        if verdict == BACK:
            entry = self.view.entry(cid)
            if entry is not None:
                log.info("engine %d comes from controller %s, which is registered again: sent back", msg.engine_id,
                         cid)
                self._welcome(hello, msg.engine_id, move_to=[cid, entry.engine_endpoint])
                return
            verdict = REFUSE  # (not in our view yet: keep it here without its tasks rather than bounce it)
        if verdict == ADOPT:
            self._register(hello, msg.engine_id, adopt=(cid, epoch))
        else:
            log.warning("engine %d comes from controller %s with %d task(s), but that takeover has closed: the "
                        "engine drops them and their clients resubmit them", msg.engine_id, cid, len(msg.running))
            self._register(hello, msg.engine_id, drop=list(msg.running))

    def _register(self, hello: _Hello, eid: int | None, *, adopt: tuple[str, int] | None = None,
                  drop: list[str] | None = None) -> None:
        gw, msg = self.gw, hello.msg
        holder = gw.registry.holder(eid) if eid is not None else None
        if holder is not None and holder != msg.uuid:
            log.error("engine id %d is claimed by uuid %s while uuid %s holds it; refused", eid, msg.uuid, holder)
            return
        again = gw.registry.was_known(msg.uuid) or holder == msg.uuid
        rec = gw.registry.register(msg.uuid, msg.hostname, msg.pid, msg.task_identity, hello.now, engine_id=eid)
        eid = rec.engine_id
        if hello.ident.startswith(b"c:"):  # (registered over its control socket: reachable there at once)
            gw.registry.seen(eid, hello.now, control_identity=hello.ident)
        if msg.redirected:
            self._quiet_until = time.monotonic() + QUIET
        gw.journal.engine(rec)
        gw.scheduler.add_engine(eid)
        self.moved_to.pop(eid, None)
        resend: list[str] = []
        if adopt is not None:
            resend = self._adopt_tasks(eid, msg.running, adopt, hello.now)
        elif again:
            resend = self.returned(eid, msg.running, hello.now)
        gw.engine_registered(eid)
        self._welcome(hello, eid, resend=resend, drop=drop or [])
        if eid in self._moving:  # (re-registered while draining: its placement is decided again)
            self._moving.pop(eid)
            gw.scheduler.drain(eid, False)
        log.info("engine %d registered (pid %d on %s)%s", eid, msg.pid, msg.hostname,
                 f", adopted with {len(msg.running)} task(s) of controller {adopt[0]}" if adopt else "")

    def _welcome(self, hello: _Hello, eid: int, *, move_to: list[str] | None = None, resend: list[str] | None = None,
                 drop: list[str] | None = None) -> None:
        gw = self.gw
        gw.reply_engine(hello.ident, EngineWelcome(
            hello.rid, eid, gw.heartbeat, gw.controller_id, resend or [], gw.relay.settings.to_wire(),
            move_to or [], drop or [], self.view.to_wire() if self.view.live else {}))

    def _adopt_tasks(self, eid: int, running: list[str], origin: tuple[str, int], now: float) -> list[str]:
        """Make the tasks an engine of a dead controller holds ours: placeholders in the scheduler (their
        records and inputs died with that controller); results are stored here and go to their clients."""
        gw = self.gw
        adopted = []
        for tid in running:
            if gw.scheduler.get(tid) is not None:
                continue
            task = Task(tid, "", "adopted", None, 0, 0, {"adopted_from": list(origin)}, None, now, attempts=1)
            task.assigned = now
            gw.scheduler.adopt(eid, task)
            gw.journal.task_assigned(task)
            gw.watch_submitter(tid)
            adopted.append(tid)
        gw.counters["adopted"] += len(adopted)
        return adopted  # results it sent already (to the dead controller) are sent again

    def check_engines(self, now: float) -> None:
        self._assign_ids(now)
        self.gw.relay.expire(now)
        self.rebalance()
        for eid in self.gw.registry.expired(now):
            self.lose_engine(eid, now, f"engine {eid} stopped answering heartbeats")
        if self.gw.recovery.active:
            lost, held = self.gw.recovery.expire(now)
            for task in lost:
                self.gw._retry_or_fail(task, f"engine {task.engine} did not come back after the controller "
                                          f"restarted while it held task {task.task_id}", now)
            for task in held:
                self.gw._fail(task, ENGINE_LOST, f"engine {task.target} did not come back after the controller "
                                              f"restarted; direct task {task.task_id} cannot run", now)

    def lose_engine(self, eid: int, now: float, why: str, state: str = "dead") -> None:
        ident = self.gw.registry.task_identity(eid)
        if ident is not None:
            self.gw.relay.drop_peer(ident)
        rec = self.gw.registry.unregister(eid, state)
        if rec is None:
            return
        if state == "dead":
            log.warning("%s; its tasks are retried or failed", why)
        self.gw.journal.engine(rec)
        self.gw._events_unregistered.append(eid)
        running, waiting = self.gw.scheduler.remove_engine(eid)
        for task in running:
            self.gw._retry_or_fail(task, f"{why} while running task {task.task_id}", now)
        for task in waiting:
            self.gw._fail(task, ENGINE_LOST, f"{why} before task {task.task_id} could run", now)

    def shutdown_engines(self, reason: str) -> None:
        """Stop every engine (clients are told they are gone; the store keeps them for a restart)."""
        for rec in self.gw.registry.engines():
            ident = self.gw.registry.control_identity(rec.engine_id)
            if ident is not None:
                self.gw.send_engine(ident, EngineStop(reason))
            self.gw._events_unregistered.append(rec.engine_id)

    def returned(self, eid: int, running: list[str], now: float) -> list[str]:
        """An engine registered again (after a controller restart or a reconnect). Returns the ids of the
        tasks it holds or answered recently that we still wait for: it sends those results (again)."""
        holding = set(running)
        # Tasks this incarnation had assigned to it that it no longer holds were lost on the way.
        for task in [t for t in self.gw.scheduler.outstanding(eid) if t.task_id not in holding]:
            self.gw.scheduler.complete(task.task_id, None, None)
            self.gw._retry_or_fail(task, f"engine {eid} reconnected without task {task.task_id}", now)
        adopt, lost, held = self.gw.recovery.engine_returned(eid, running)
        for task in adopt:
            self.gw.scheduler.adopt(eid, task)
        for task in lost:
            self.gw._retry_or_fail(task, f"the controller restarted while task {task.task_id} was on engine {eid}, "
                                      "which no longer holds it", now)
        for task in held:
            self.gw.scheduler.submit(task)
        return [t.task_id for t in adopt] + [t.task_id for t in self.gw.scheduler.outstanding(eid)
                                             if t.task_id in holding and t not in adopt]

    def on_heartbeat(self, ident: bytes, msg: Heartbeat, now: float) -> None:
        gw = self.gw
        known = gw.registry.seen(msg.engine_id, now, control_identity=ident)
        gw.send_engine(ident, Heartbeat(msg.engine_id if known else -1))
        if known and msg.running:
            task = gw.scheduler.get(msg.running)
            if task is not None and task.engine == msg.engine_id and not task.running:
                task.running = True
                gw.journal.task_running(task)

    # ------------------------------------------------------------------ membership
    def on_view(self, view: View, left: list[ControllerEntry]) -> None:
        """The federation changed: tell everyone what they use of it, and decide which of our engines belong
        elsewhere now. Clients and engines need the live controllers, those down and the takeovers, not the
        engine counts, which change with every registration: a change of counts alone is not pushed (with
        thousands of engines that would be a message per engine per second)."""
        self.view = view
        gw = self.gw
        shape = ([(e.cid, e.epoch, e.client_endpoint, e.engine_endpoint) for e in view.live],
                 [k.cid for k in view.down], view.takeovers)
        if shape != self._shape:
            self._shape = shape
            wire = Membership(view.to_wire())
            for ident in list(gw.clients):
                gw.send_client(ident, wire)
            for rec in gw.registry.engines():
                ctl = gw.registry.control_identity(rec.engine_id)
                if ctl is not None:
                    gw.send_engine(ctl, wire)
        if left:
            log.info("controllers gone: %s", ", ".join(f"{e.cid} (epoch {e.epoch})" for e in left))
        self.rebalance()

    def _counts(self) -> dict[str, int]:
        """Engines per controller for placement: published counts, ours exact, plus the engines we sent
        elsewhere lately that the published counts may not show yet."""
        now = time.monotonic()
        sent = self._sent
        while sent and now - sent[0][0] >= 2 * QUIET:
            self._sent_count[sent.popleft()[1]] -= 1
        counts = {e.cid: e.engines for e in self.view.live}
        for cid, n in self._sent_count.items():
            if n > 0:
                counts[cid] = counts.get(cid, 0) + n
        counts[self.gw.cid] = len(self.gw.registry)
        return counts

    def _sent_to(self, cid: str) -> None:
        self._sent.append((time.monotonic(), cid))
        self._sent_count[cid] += 1

    def rebalance(self) -> None:
        """Drain the engines this controller should shed (over quota) towards their new homes; stop draining
        those it may keep after all. Only on counts unchanged for ``QUIET`` seconds, and not within ``QUIET``
        seconds of engines moving in or out: published counts lag by about a second, and deciding on stale
        counts would move engines of a balanced federation, or bounce them back and forth."""
        gw = self.gw
        now = time.monotonic()
        if self.view.entry(gw.cid) is None or gw.leaving:  # not in the view (yet, paused or leaving): move nobody
            moves: dict[int, str] = {}
        elif now < self._quiet_until:
            return
        else:
            counts = self._counts()
            if counts != self._stable[0]:  # (engines still arriving, or counts not yet published everywhere)
                self._stable = (counts, now)
                return
            if now - self._stable[1] < QUIET:
                return
            moves = placement.rebalance(gw.cid, gw.registry.ids(), self.view.weights(), counts)
        for eid in [e for e in self._moving if e not in moves]:
            del self._moving[eid]
            gw.scheduler.drain(eid, False)
            gw._events_registered.append(eid)  # (clients holding its direct tasks as "moved" send them here)
        for eid, home in moves.items():
            if self._moving.get(eid) != home:
                self._moving[eid] = home
                gw.scheduler.drain(eid)

    def after_pass(self) -> None:
        """Move the drained engines, and a leaving controller's engines (cheap when neither)."""
        if self._evicting:
            self.evict_now()
        if not self._moving:
            return
        gw = self.gw
        for eid, home in list(self._moving.items()):
            if not gw.scheduler.idle(eid):
                continue
            entry = self.view.entry(home)
            ident = gw.registry.control_identity(eid)
            if entry is None or ident is None:
                continue  # (its new home vanished, or it has not heartbeated yet: decided again later)
            self._moving.pop(eid)
            gw.send_engine(ident, EngineMove(home, entry.engine_endpoint, "placement"))
            gw.engine_left(eid, home)
            self.moved_to[eid] = home
            self._sent_to(home)
            self._quiet_until = time.monotonic() + QUIET
            log.info("engine %d moves to controller %s (placement)", eid, home)

    def send_everyone_away(self, reason: str = "controller leaving") -> None:
        """This controller leaves (or steps down): every engine goes to its place among the others, with what
        it holds and the results it sent lately (told at once, or as soon as it can be reached: see
        ``evict_now``)."""
        gw = self.gw
        self._evict_reason = reason
        counts = self._counts()
        counts.pop(gw.cid, None)
        for eid in gw.registry.ids():
            home = self.view.place(eid, exclude=[gw.cid], counts=counts)
            if home is not None:
                counts[home] = counts.get(home, 0) + 1
                self._evicting[eid] = home
        self.evict_now()

    def evict_now(self) -> None:
        """Tell the engines of a leaving controller to go (busy or not: the new controller adopts what they
        hold); those not reachable yet (no heartbeat so far) are told at a later pass."""
        gw = self.gw
        for eid, home in list(self._evicting.items()):
            entry = self.view.entry(home)
            ident = gw.registry.control_identity(eid)
            if gw.registry.holder(eid) is None:
                del self._evicting[eid]  # (gone meanwhile)
                continue
            if entry is None or ident is None:
                continue
            del self._evicting[eid]
            gw.send_engine(ident, EngineMove(entry.cid, entry.engine_endpoint, self._evict_reason, handover=True))
            gw.engine_left(eid, home)

    def draining(self, eid: int) -> str | None:
        """Where ``eid`` is going if it is draining towards (or moved to) another controller."""
        return self._moving.get(eid) or self.moved_to.get(eid)

    def membership_wire(self) -> dict[str, Any]:
        return self.view.to_wire() if self.view.live else {}
