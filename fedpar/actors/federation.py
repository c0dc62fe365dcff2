"""The federation actor: the controller's only user of the discovery registry, off the hot path.

A pykka actor ticked every ``[discovery] poll`` seconds. Each tick it renews the controller's lease when
due (every ``ttl / 3``) and feeds the outcome to the ``Fence`` the gateway reads on every pass; polls the
registry and hands what changed to the gateway (``call_soon``): a new ``View`` to push to clients and
engines, peers that lapsed. It takes over lapsed peers (once per incarnation) and closes the takeovers it
opened once the adoption window has passed. It also serves the gateway's requests, which would otherwise
make the gateway wait on the network: global engine ids for new engines (one registry transaction per
batch) and adoptions (an engine of a dead controller arriving with the tasks it holds).

A registry that cannot be reached only delays all this: the lease is not renewed, so the fence pauses the
gateway's dispatch about a TTL later, and resumes it when a renewal succeeds again. Failures are logged
(the first, then one a minute while it lasts).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

from fedpar.errors import FedparError
from fedpar.federation.discovery import Discovery
from fedpar.federation.membership import ADOPT, BACK, REFUSE, Fence, Tracker, View
from fedpar.federation.records import ControllerEntry

log = logging.getLogger(__name__)

TICK = "tick"


@dataclass(frozen=True)
class Settings:
    ttl: float
    poll: float
    window: float


class Federation(pykka.ThreadingActor):
    """Registration keep-alive, peer watch, takeovers, id allocation and adoption verdicts."""

    def __init__(self, discovery: Discovery, entry: ControllerEntry, lease: str, fence: Fence,
                 tracker: Tracker, settings: Settings, call_soon: Callable[[Callable[[], None]], None],
                 on_view: Callable[[View, list[ControllerEntry]], None], engine_count: Callable[[], int]):
        super().__init__()
        self.discovery = discovery
        self.entry = entry
        self.lease = lease
        self.fence = fence
        self.tracker = tracker
        self.settings = settings
        self.call_soon = call_soon
        self.on_view = on_view
        self.engine_count = engine_count
        self._last_update = 0.0
        self._stopped = threading.Event()
        self._ticking = threading.Event()  # a tick is queued or running
        self._last_renew = float("-inf")  # (renewed at the first tick: starting the gateway may have taken long)
        self._failing_since: float | None = None
        self._last_failure_log = 0.0
        self.leaving = False

    # ------------------------------------------------------------------ actor plumbing
    def on_start(self) -> None:
        threading.Thread(target=self._tick_loop, name="fedpar-federation-ticks", daemon=True).start()

    def on_stop(self) -> None:
        self._stopped.set()

    def on_failure(self, *exc_info: Any) -> None:
        log.error("federation actor failed", exc_info=exc_info)

    def _tick_loop(self) -> None:
        while not self._stopped.wait(self.settings.poll):
            if self._ticking.is_set():
                continue  # (the last tick is still running, the registry being slow: ticks do not pile up)
            self._ticking.set()
            try:
                self.actor_ref.tell(TICK)
            except pykka.ActorDeadError:
                return

    def on_receive(self, message: Any) -> Any:
        if message == TICK:
            try:
                self._guard("keeping the registration alive", self._tick)
            finally:
                self._ticking.clear()
        elif isinstance(message, tuple) and message[0] == "allocate":
            _, n, reply = message
            self._guard("allocating engine ids", lambda: self._allocate(n, reply))
        elif isinstance(message, tuple) and message[0] == "adopt":
            _, cid, epoch, reply = message
            self._guard("deciding an adoption", lambda: self._adopt(cid, epoch, reply))
        elif isinstance(message, tuple) and message[0] == "term":
            gateway = message[1]
            try:
                self._term(gateway)
            except Exception:
                log.exception("handing the work over failed; stopping without a handover")
                self.call_soon(gateway.stop)
        elif isinstance(message, tuple) and message[0] == "deregister":
            self._guard("deregistering", self._deregister)
        return None

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        """Run ``fn``; a registry failure is logged (rate-limited) and retried by the next tick."""
        try:
            fn()
        except Exception as exc:  # (a failure must not end the actor: the lease would lapse for good)
            if not isinstance(exc, FedparError):
                log.exception("federation actor: %s failed unexpectedly", what)
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
            if now - self._last_failure_log >= 60.0 or self._last_failure_log == 0.0:
                self._last_failure_log = now
                log.warning("discovery registry: %s failed (%s: %s); dispatch pauses %.1fs after the last "
                            "successful renewal and resumes when the registry answers", what, type(exc).__name__,
                            exc, self.settings.ttl * self.fence.margin)
        else:
            if self._failing_since is not None and what.startswith("keeping"):
                log.warning("discovery registry reachable again after %.1fs", time.monotonic() - self._failing_since)
                self._failing_since = None
                self._last_failure_log = 0.0

    # ------------------------------------------------------------------ each tick
    def _tick(self) -> None:
        mono = time.monotonic()
        if self._leave_done is not None and mono >= self._leave_done[0]:
            gateway = self._leave_done[1]
            self._leave_done = None
            try:
                self.discovery.close(self.entry.cid, self.entry.epoch)  # the window passed: clients resubmit now
            finally:
                self.call_soon(gateway.stop)  # (a close that failed is done by the survivors' trackers)
            return
        if mono - self._last_renew >= self.settings.ttl / 3 and not self.leaving:
            self._renew(mono)
        n = self.engine_count()
        if n != self.entry.engines and mono - self._last_update >= 1.0 and not self.leaving:
            # (published about once a second: other controllers place engines by everyone's counts)
            self.entry = dataclasses.replace(self.entry, engines=n)
            self._last_update = mono
            self.discovery.update(self.lease, self.entry)
        self._poll()

    def _renew(self, sent: float) -> None:
        if self.discovery.renew(self.lease):
            self._last_renew = sent
            self.fence.renewed(sent)
            return
        # The lease lapsed (this process was paused or cut off for longer than the TTL). If the survivors
        # took our work over we must step down; if nobody did (no survivors, or not yet), register again.
        marker = self.discovery.takeovers().get(self.entry.cid)
        if marker is not None and marker.epoch == self.entry.epoch:
            log.error("controller %s: its registration lapsed and controller %s took its work over; stepping "
                      "down", self.entry.cid, marker.by)
            self.fence.lost()
            return
        lease = self.discovery.reclaim(self.entry, self.settings.ttl)
        if lease is None:
            log.error("controller %s: its registration lapsed and was taken over; stepping down", self.entry.cid)
            self.fence.lost()
            return
        log.warning("controller %s: its registration had lapsed (paused or cut off for longer than %.1fs); "
                    "nobody took over, registered again", self.entry.cid, self.settings.ttl)
        self.lease = lease
        self._last_renew = sent
        self.fence.renewed(sent)

    def _poll(self) -> None:
        d = self.discovery
        live, known, takeovers = d.controllers(), d.known(), d.takeovers()
        mono = time.monotonic()
        decisions = self.tracker.observe(live, known.values(), takeovers.values(), time.time(), mono)
        for cid, epoch in decisions.take_over:
            if self.leaving:
                break
            try:
                if d.stopped(cid) == epoch:  # it stopped cleanly: nothing to take over
                    self.tracker.took_over(cid, epoch, None, mono)
                    continue
                marker = d.take_over(cid, epoch, self.entry.cid)
            except FedparError:
                self.tracker.failed(cid, epoch)
                raise
            self.tracker.took_over(cid, epoch, marker, mono)
            if marker is not None:
                log.warning("controller %s (epoch %d) is gone; %s its work (engines re-home, clients resubmit what "
                            "no one holds)", cid, epoch, "took over" if marker.by == self.entry.cid else
                            f"{marker.by} took over")
        for cid, epoch in decisions.close:
            if d.close(cid, epoch):
                self.tracker.closed(cid, epoch)
        if decisions.take_over or decisions.close:  # re-read, so the view pushed shows what was just written
            again = self.tracker.observe(live, known.values(), d.takeovers().values(), time.time(), mono)
            decisions.view = again.view or decisions.view
        if decisions.view is not None:
            view, left = decisions.view, decisions.left
            self.call_soon(lambda: self.on_view(view, left))

    # ------------------------------------------------------------------ requests from the gateway
    def _allocate(self, n: int, reply: Callable[[list[int]], None]) -> None:
        """Global ids for ``n`` new engines; none when the registry fails (the gateway asks again later)."""
        ids: list[int] = []
        try:
            ids = self.discovery.allocate_ids(n)
        finally:
            self.call_soon(lambda: reply(ids))

    def _adopt(self, cid: str, epoch: int, reply: Callable[[str], None]) -> None:
        """An engine of controller ``cid`` (incarnation ``epoch``) arrived with the tasks it holds. No
        verdict when the registry fails: the engine asks again (its hello is re-sent until welcomed)."""
        try:
            verdict = self._verdict(cid, epoch)
        except BaseException:
            self.call_soon(lambda: reply(""))
            raise
        self.call_soon(lambda: reply(verdict))

    def _verdict(self, cid: str, epoch: int) -> str:
        d = self.discovery
        marker = d.takeovers().get(cid)
        if marker is None or marker.epoch != epoch:
            live = {e.cid: e for e in d.controllers()}
            if cid in live and live[cid].epoch != epoch:
                verdict = BACK  # restarted: its recovery waits for this engine
            elif cid in live:
                verdict = BACK  # not dead after all (the engine lost its connection): go back
            else:
                marker = d.take_over(cid, epoch, self.entry.cid)
                verdict = BACK if marker is None else ADOPT if d.adopt(cid, epoch) else REFUSE
                if marker is not None:
                    self.tracker.took_over(cid, epoch, marker, time.monotonic())
        else:
            verdict = REFUSE if marker.closed else ADOPT if d.adopt(cid, epoch) else REFUSE
        return verdict

    # ------------------------------------------------------------------ leaving
    def _term(self, gateway: Any) -> None:
        """SIGTERM: with other controllers live (asked of the registry, not of a view that may lag), hand the
        work over to them; else stop as a lone controller does (its tasks wait in its store)."""
        try:
            others = [e for e in self.discovery.controllers() if e.cid != self.entry.cid]
            if others:
                self._leave(gateway)
                return
        except FedparError as exc:
            log.warning("cannot ask the registry whether other controllers run (%s); stopping without a "
                        "handover", exc)
        gateway.leaving = False
        self.call_soon(gateway.stop)

    def _leave(self, gateway: Any) -> None:
        """A graceful stop while peers run (the gateway already starts nothing): deregister, take this
        controller's own work over (so its engines are adopted by the others with what they hold), send the
        engines away, and stop once the adoption window has passed."""
        self.leaving = True
        d = self.discovery
        d.deregister(self.lease)
        d.take_over(self.entry.cid, self.entry.epoch, self.entry.cid)
        self.call_soon(gateway.desk.send_everyone_away)
        self._leave_done = (time.monotonic() + self.settings.window, gateway)

    _leave_done: tuple[float, Any] | None = None

    def _deregister(self) -> None:
        """A clean stop (not a handover): mark it, so that the others do not take this controller over, then
        leave the registry."""
        if not self.leaving:
            self.discovery.mark_stopped(self.entry.cid, self.entry.epoch)
            self.discovery.deregister(self.lease)
