"""What a client does when the survivors take one of its controllers over.

Part of the client's I/O thread (``fedpar.client.io``). The federation's view (pushed by every controller)
shows a takeover of a controller this client talks to: its link is closed, and the tasks this client had
there wait while the takeover is open (the dead controller's engines are adopted meanwhile, with the tasks
they hold). Once it closes, every live controller is asked which of those tasks it has (finished or in
flight); the rest are resubmitted from the arguments the client kept. A task that may have been running on
an engine lost together with the controller counts that as an attempt (its retry policy decides), and a
task whose result had begun to arrive is done: it fails with ``ResultUnavailable`` until a controller runs on
that state directory again, instead of running twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedpar.client.link import Link
from fedpar.errors import ControllerUnavailable, EngineError, ResultUnavailable
from fedpar.wire.protocol import GetResults, Results

if TYPE_CHECKING:
    from fedpar.client.io import IOThread

log = logging.getLogger(__name__)

BATCH = 4096  # ids per GetResults asked again after a restart


@dataclass
class Orphans:
    """Tasks of a controller that was taken over, from its takeover until they are resubmitted or found."""

    cid: str
    epoch: int
    ids: list[str]
    engines: set[int]  # the engines it owned when it died
    asked: int = 0
    total: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    started: bool = False


class Failover:
    """Takeovers of this client's controllers, from the view that shows them until their tasks are settled."""

    def __init__(self, io: IOThread):
        self.io = io
        self.pending: dict[tuple[str, int], Orphans] = {}  # (controller id, epoch) -> its tasks
        self.locates: dict[int, tuple[Orphans, Link]] = {}  # GetResults request id -> (takeover, link asked)

    def taken_over(self, link: Link, epoch: int) -> None:
        """The survivors took over ``link``'s controller: its tasks wait for the takeover to close."""
        cid = link.cid
        assert cid is not None
        ids = [tid for tid, tr in self.io.tracks.items() if tr.cid == cid]
        for rec in link.receivers.values():  # results that were arriving are stored there: done, not resubmitted
            tr = self.io.tracks.get(rec[0].task_id)
            if tr is not None:
                tr.finished_there = True
        engines = set(link.engines)
        now = time.monotonic()
        for eid in engines:
            if self.io.router.owner.get(eid) == cid:
                del self.io.router.owner[eid]
                self.io.router.transit[eid] = now
        self.io.router.engines_changed()
        log.log(logging.WARNING if ids else logging.INFO, "controller %s (epoch %d) was taken over; %d task(s) of "
                "this client wait to be found or resubmitted", cid, epoch, len(ids))
        self.pending[(cid, epoch)] = Orphans(cid, epoch, ids, engines)
        self.io._drop(link)

    def locate(self, fo: Orphans) -> None:
        """The takeover closed: ask every live controller which of the tasks it holds."""
        fo.started = True
        links = self.io.ready_links()
        ids = [t for t in fo.ids if t in self.io.tracks]
        fo.ids = ids
        if not ids:
            self.pending.pop((fo.cid, fo.epoch), None)
            return
        fo.asked = fo.total = len(links)
        if not links:
            self.resubmit(fo, ids)
            return
        for link in links:
            rid = self.io._send(link, GetResults(ids), [], None)
            self.locates[rid] = (fo, link)

    def locate_reply(self, fo: Orphans, link: Link | None, msg: Results) -> None:
        """A controller said which of a failover's tasks it has (``link`` None: it died before answering)."""
        found = {r.task_id for r in msg.results}
        missing = set(msg.missing)
        for tid in fo.ids:
            if tid in missing:
                fo.missing[tid] = fo.missing.get(tid, 0) + 1
                if link is not None:
                    link.expected.discard(tid)
            elif tid not in found and link is not None:  # in flight there (adopted with its engine): it will come
                tr = self.io.tracks.get(tid)
                if tr is not None:
                    tr.cid = link.cid
                    tr.count_on(link)
        fo.asked -= 1
        if fo.asked <= 0:
            n = fo.total
            self.resubmit(fo, [t for t in fo.ids if fo.missing.get(t, 0) >= n and t in self.io.tracks
                                and self.io.tracks[t].cid in (None, fo.cid)])

    def resubmit(self, fo: Orphans, ids: list[str]) -> None:
        """Tasks no live controller holds: resubmit them (a task that may have run on an engine lost with
        the controller counts that as an attempt, following its retry policy)."""
        self.pending.pop((fo.cid, fo.epoch), None)  # (settled: a view showing the takeover again changes nothing)
        lost = {e for e in fo.engines if e not in self.io.router.owner}
        again = 0
        for tid in ids:
            tr = self.io.tracks[tid]
            tr.cid = None
            if tr.finished_there:
                self.io._fail(tid, ResultUnavailable(
                    f"task {tid} finished on controller {fo.cid}, which died while sending its result: it comes "
                    "back when a controller runs on that state directory again", task_id=tid))
                continue
            spec = tr.spec
            attempts = 0
            if spec.target is not None and spec.target in lost:
                self.io._fail(tid, EngineError(
                    f"controller {fo.cid} died together with engine {spec.target}, which task {tid} was sent to",
                    task_id=tid))
                continue
            if lost and spec.target is None:  # (it may have been running on one of them)
                if spec.retries < 1:
                    self.io._fail(tid, EngineError(
                        f"controller {fo.cid} died together with engine(s) {sorted(lost)}; task {tid} may have been "
                        f"running on one of them (retries={spec.retries})", task_id=tid))
                    continue
                attempts = 1
            flags = {**spec.spec, "resubmit": True}
            if attempts:
                flags["attempts"] = attempts
            if "stream" in spec.spec:
                flags["stream"] = [next(self.io.sids), spec.spec["stream"][1]]
            tr.spec = spec._replace(spec=flags)
            again += 1
            if spec.target is None:
                self.io.router.held.appendleft(tid)
            else:
                cid = self.io.router.route_direct(tid, spec.target)
                if cid is not None:
                    self.io.router.submit(self.io.by_cid[cid], [tid])
        if again:
            log.warning("resubmitting %d task(s) of controller %s that no live controller holds", again, fo.cid)
        self.io.router.dispatch()

    def lost(self, link: Link, silent: float) -> None:
        """A controller silent for ``lost_after`` seconds (no takeover): fail what waits on it."""
        ids = [t for t, tr in self.io.tracks.items() if tr.cid == link.cid] + list(link.expected)
        exc = ControllerUnavailable(
            f"the controller at {link.endpoint} has been silent for {silent:.0f}s; results already stored "
            "stay retrievable with get_result() if it comes back")
        link.unacked.clear()
        link.expected.clear()
        for tid in ids:
            self.io._fail(tid, exc)

    def resync(self, link: Link, epoch: int) -> None:
        """The controller restarted: send unacknowledged tasks again (flagged, so a task it had already stored
        is not run twice) and ask again for every result still awaited."""
        log.warning("controller %s restarted (epoch %s -> %s); resynchronising %d unacknowledged task(s)",
                    link.cid, link.epoch, epoch, len(link.unacked))
        for sid in [s for s, (_, _, lk) in self.io.transfers.senders.items() if lk is link]:
            self.io.transfers.upload_of.pop(self.io.transfers.senders.pop(sid)[0], None)
        link.receivers.clear()  # results being downloaded are in ``expected``: asked for again below
        ids = list(link.unacked)
        link.unacked.clear()
        for tid in ids:
            tr = self.io.tracks.get(tid)
            if tr is None:
                continue
            flags = {**tr.spec.spec, "resubmit": True}
            if "stream" in tr.spec.spec:
                flags["stream"] = [next(self.io.sids), tr.spec.spec["stream"][1]]
            tr.spec = tr.spec._replace(spec=flags)
        self.io.router.submit(link, ids)
        waiting = list(link.expected)
        for i in range(0, len(waiting), BATCH):
            self.io._send(link, GetResults(waiting[i:i + BATCH]), [], None)
        # Requests it had not answered died with it: ask again.
        req = self.io.requests
        for rid in [r for r, (_, lk) in req.gathers.items() if lk is link]:
            gather = req.gathers.pop(rid)[0]
            req.gathers[self.io._send(link, gather.msg, [], None)] = (gather, link)
        for rid in [r for r, (_, lk) in req.lookups.items() if lk is link]:
            lookup = req.lookups.pop(rid)[0]
            req.lookups[self.io._send(link, GetResults(lookup.ids), [], None)] = (lookup, link)
        for rid in [r for r, (_, lk) in self.locates.items() if lk is link]:
            fo = self.locates.pop(rid)[0]
            self.locates[self.io._send(link, GetResults(fo.ids), [], None)] = (fo, link)
