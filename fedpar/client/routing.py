"""Where a client's tasks go: load-balanced work by capacity, direct work to its engine's controller.

Part of the client's I/O thread (``fedpar.client.io``). Load-balanced tasks wait here until a controller
wants more (its ``capacity``, what its engines hold plus a short queue, minus what this client has there);
then each controller with room takes a share in proportion to its capacity, least loaded first, so work is
spread by outstanding load and goes wherever engines free up. Direct tasks go to the controller owning their
engine; engine ids are global, and while an engine moves between controllers (or its controller is taken
over) its tasks wait here for its new home.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fedpar.client.link import Link
from fedpar.errors import TaskAborted, UnknownEngineError
from fedpar.wire.direct import OFFER
from fedpar.wire.protocol import Submit, TaskSpec

if TYPE_CHECKING:
    from fedpar.client.io import IOThread

SUBMIT_BATCH = 4096  # most tasks coalesced into one Submit message
SUBMIT_BATCH_BYTES = 8 << 20


def _nbytes(frames: Iterable[Any]) -> int:
    return sum(memoryview(f).nbytes for f in frames)


class Router:
    """Tasks held back, engine owners, and the decisions where tasks go."""

    def __init__(self, io: IOThread):
        self.io = io
        self.held: deque[str] = deque()  # load-balanced task ids waiting for capacity
        self.held_direct: dict[int, deque[str]] = {}  # engine id -> its tasks waiting for the engine's home
        self.owner: dict[int, str] = {}  # engine id -> controller id
        self.transit: dict[int, float] = {}  # engines moving between controllers -> since (monotonic)

    def route_direct(self, tid: str, target: int) -> str | None:
        """The controller to send a direct task to now (None: it waits here, or failed)."""
        cid = self.owner.get(target)
        if cid is not None and cid in self.io.by_cid and self.io.by_cid[cid].ready:
            return cid
        if target in self.transit or (cid is not None and cid in self.io.by_cid):
            self.held_direct.setdefault(target, deque()).append(tid)
            return None
        ready = self.io.ready_links()
        if len(ready) == 1 and ready[0].cid is not None:  # one controller: it decides (it may know it by now)
            return ready[0].cid
        if not ready:
            self.held_direct.setdefault(target, deque()).append(tid)
            self.transit.setdefault(target, time.monotonic())
            return None
        self.io._fail(tid, UnknownEngineError(f"engine {target} is not registered (registered: "
                                           f"{sorted(self.owner)})"))
        return None

    def dispatch(self, force: bool = False) -> None:
        """Send held load-balanced tasks to the controllers with room, least loaded first: each takes a share
        of what is held in proportion to its capacity, so they fill up evenly (relative to their capacity),
        whether tasks come one by one or in a burst. ``force``: send everything (to the least loaded)."""
        held = self.held
        while held:
            links = [lk for lk in self.io.ready_links() if lk.free > 0]
            if not links:
                if not force or not self.io.ready_links():
                    return
                best = min(self.io.ready_links(), key=lambda lk: (lk.lb_out + 1) / max(lk.capacity, 1))
                self.submit(best, [held.popleft() for _ in range(min(len(held), SUBMIT_BATCH))])
                continue
            total = sum(lk.capacity for lk in links)
            n = len(held)
            for link in sorted(links, key=lambda lk: (lk.lb_out / lk.capacity, random.random())):  # (ties: by chance)
                k = min(link.free, math.ceil(n * link.capacity / total), len(held), SUBMIT_BATCH)
                if k > 0:
                    self.submit(link, [held.popleft() for _ in range(k)])

    def submit(self, link: Link, ids: list[str]) -> None:
        """Send tasks to ``link`` (at most SUBMIT_BATCH tasks or SUBMIT_BATCH_BYTES per message)."""
        tracks = self.io.tracks
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
                spec = tr.spec = self.io.transfers.offer(spec)
            tr.cid = cid
            link.unacked[tid] = None
            tr.count_on(link)
            specs.append(spec)
            if "stream" in spec.spec:  # large arguments: sent as a stream when the controller grants credit
                self.io.transfers.open_upload(link, spec, tr.frames)
            else:
                frames.extend(tr.frames)
                size += _nbytes(tr.frames)
            if len(specs) >= SUBMIT_BATCH or size >= SUBMIT_BATCH_BYTES:
                self.io._send(link, Submit(specs), frames, None)
                specs, frames, size = [], [], 0
        if specs:
            self.io._send(link, Submit(specs), frames, None)

    def withdraw(self, ids: list[str] | None) -> list[str]:
        """Remove held tasks (all with ``ids`` None); they fail with TaskAborted."""

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
            self.io._fail(tid, TaskAborted(f"task {tid} was aborted before it was sent", task_id=tid))
        return out

    def on_engine_event(self, link: Link, registered: Iterable[int], unregistered: Iterable[int],
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
        self.engines_changed()
        if self.held_direct:
            self.release_direct()

    def engines_changed(self) -> None:
        self.io.client._set_engines(set(self.owner) | set(self.transit))

    def release_direct(self) -> None:
        """Send the direct tasks whose engine now has a (new) home."""
        for eid in list(self.held_direct):
            cid = self.owner.get(eid)
            link = self.io.by_cid.get(cid) if cid is not None else None
            if link is not None and link.ready:
                self.submit(link, list(self.held_direct.pop(eid)))
