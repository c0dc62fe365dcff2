"""Who is alive, who took over whom, and whether this controller may still act: pure state machines.

* ``View``: one snapshot of the federation (live controllers with their engine counts, controllers known
  but down, takeovers). A controller builds it from registry polls and pushes it to its clients and engines
  (``Membership`` messages); controllers and engines place engines with ``View.place`` (weighted
  rendezvous ranking with bounded loads, ``placement``).
* ``Tracker``: the controller's side. Fed with each poll, it says what changed and what to do: take over
  a peer whose registration lapsed (once per incarnation), close the takeovers it opened once the adoption
  window has passed (or ones left open by a survivor that died too).
* ``Fence``: the controller's own registration. A registration is a lease; while the controller cannot
  prove its lease is alive (renewals failing for about a TTL) it must not start new work, because the
  survivors may already have taken it over; when the registry says the lease is gone, it steps down.

Nothing here does I/O or reads a clock: times are passed in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fedpar.errors import MalformedMessage
from fedpar.federation import placement
from fedpar.federation.records import ControllerEntry, KnownController, Takeover

# Verdicts on an engine arriving from another controller with the tasks it holds (``origin``).
ADOPT = "adopt"  # the takeover is open: take the engine and the tasks it holds
REFUSE = "refuse"  # the takeover closed: take the engine, it drops the tasks (clients resubmit them)
BACK = "back"  # the old controller is registered again: the engine goes back to it


@dataclass(frozen=True)
class View:
    """The federation as one controller saw it at its last registry poll."""

    live: tuple[ControllerEntry, ...] = ()
    down: tuple[KnownController, ...] = ()  # registered once, not live now
    takeovers: tuple[Takeover, ...] = ()
    _by_cid: dict[str, ControllerEntry] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_cid.update((e.cid, e) for e in self.live)

    def entry(self, cid: str) -> ControllerEntry | None:
        return self._by_cid.get(cid)

    def weights(self, exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
        skip = set(exclude)
        return [(e.cid, e.weight) for e in self.live if e.cid not in skip]

    def place(self, engine_id: int, exclude: Iterable[str] = (), counts: dict[str, int] | None = None) -> str | None:
        """Where engine ``engine_id`` should register: its best-ranked live controller under quota (bounded
        loads, ``placement.place``); ``counts`` override the published engine counts (e.g. our own, exact)."""
        have = {e.cid: e.engines for e in self.live}
        have.update(counts or {})
        return placement.place(engine_id, self.weights(exclude), have)

    def takeover(self, cid: str, epoch: int) -> Takeover | None:
        """The takeover of ``cid`` at incarnation ``epoch``, if the survivors started one."""
        for t in self.takeovers:
            if t.cid == cid and t.epoch == epoch:
                return t
        return None

    def to_wire(self) -> dict[str, Any]:
        return {"live": [e.to_wire() for e in self.live], "down": [k.to_wire() for k in self.down],
                "takeovers": [t.to_wire() for t in self.takeovers]}

    @classmethod
    def from_wire(cls, raw: Any) -> View:
        """Rebuild a view received in a message; ``MalformedMessage`` if any part has the wrong shape."""
        if not isinstance(raw, dict):
            raise MalformedMessage("membership: expected a map")
        parts = {}
        for name, rec in (("live", ControllerEntry), ("down", KnownController), ("takeovers", Takeover)):
            items = raw.get(name, [])
            if not isinstance(items, list) or len(items) > 100_000:
                raise MalformedMessage(f"membership: {name} must be a list")
            parts[name] = tuple(rec.from_wire(x) for x in items)
        return cls(parts["live"], parts["down"], parts["takeovers"])  # type: ignore[arg-type]


@dataclass
class Decisions:
    """What a registry poll means for this controller."""

    view: View | None = None  # the new view when anything changed (push it), else None
    joined: list[str] = field(default_factory=list)
    left: list[ControllerEntry] = field(default_factory=list)  # lapsed since the last poll (or restarted)
    take_over: list[tuple[str, int]] = field(default_factory=list)  # (cid, epoch) to try to take over now
    close: list[tuple[str, int]] = field(default_factory=list)  # takeovers to close now


class Tracker:
    """The controller's view of its peers, from one registry poll to the next.

    ``window`` is how long a takeover stays open for engines of the dead controller to be adopted with the
    tasks they hold. The controller that opened a takeover closes it ``window`` seconds later (by its own
    monotonic clock); a takeover whose opener died too is closed by anyone ``window + grace`` seconds after
    it started (by wall clock, the only time the marker carries).
    """

    def __init__(self, cid: str, *, window: float, grace: float = 5.0):
        self.cid = cid
        self.window = window
        self.grace = grace
        self.view = View()
        self._tried: set[tuple[str, int]] = set()  # takeovers attempted (successfully or not now: see failed)
        self._opened: dict[tuple[str, int], float] = {}  # takeovers this controller holds open -> monotonic
        self._closed: set[tuple[str, int]] = set()

    def observe(self, live: Iterable[ControllerEntry], known: Iterable[KnownController],
                takeovers: Iterable[Takeover], now: float, mono: float) -> Decisions:
        """A registry poll returned these records (``now``: wall clock, ``mono``: monotonic clock)."""
        live = tuple(sorted(live, key=lambda e: e.cid))
        live_cids = {e.cid for e in live}
        down = tuple(sorted((k for k in known if k.cid not in live_cids), key=lambda k: k.cid))
        tks = tuple(sorted(takeovers, key=lambda t: (t.cid, t.epoch)))
        old = self.view
        d = Decisions()
        before = {e.cid: e for e in old.live}
        for e in live:
            prev = before.get(e.cid)
            if prev is None:
                d.joined.append(e.cid)
            elif prev.epoch != e.epoch:  # restarted (re-registered over its own entry): the old one is gone
                d.left.append(prev)
                d.joined.append(e.cid)
        d.left.extend(prev for cid, prev in before.items() if cid not in live_cids)
        marked = {(t.cid, t.epoch) for t in tks}
        for gone in d.left:
            key = (gone.cid, gone.epoch)
            if gone.cid != self.cid and gone.cid not in live_cids and key not in marked and key not in self._tried:
                d.take_over.append(key)
        for t in tks:
            key = (t.cid, t.epoch)
            if t.closed or key in self._closed:
                continue
            opened = self._opened.get(key)
            if (opened is not None and mono - opened >= self.window) or (
                    opened is None and now - t.started >= self.window + self.grace):
                d.close.append(key)
        view = View(live, down, tks)
        if view != old:
            d.view = view
        self.view = view
        return d

    def took_over(self, cid: str, epoch: int, marker: Takeover | None, mono: float) -> None:
        """The result of a takeover attempt: ``marker`` is the takeover now in place (None: the peer is back)."""
        self._tried.add((cid, epoch))
        if marker is not None and marker.by == self.cid and not marker.closed:
            self._opened.setdefault((cid, epoch), mono)

    def failed(self, cid: str, epoch: int) -> None:
        """A takeover attempt could not reach the registry: try again at the next poll."""
        self._tried.discard((cid, epoch))

    def closed(self, cid: str, epoch: int) -> None:
        self._opened.pop((cid, epoch), None)
        self._closed.add((cid, epoch))


OK = "ok"
PAUSED = "paused"
LOST = "lost"


class Fence:
    """Whether this controller's registration still entitles it to start work.

    The registry counts a lease's time from when it handled the last renewal, which is after the
    controller sent it; so the controller's own deadline ``sent + ttl * margin`` always ends first. Past it
    (the registry unreachable, or this process paused) the controller is ``PAUSED``: it keeps answering and
    storing results but starts no task, because survivors may be taking its work over. A successful renewal
    makes it ``OK`` again; the registry saying the lease is gone makes it ``LOST`` for good (step down).
    Without a registry (a lone controller) it is always ``OK``.
    """

    def __init__(self, ttl: float | None, margin: float = 0.8):
        self.ttl = ttl
        self.margin = margin
        self._until = math.inf if ttl is None else -math.inf  # registered controllers start unproven
        self._lost = False

    def renewed(self, sent: float) -> None:
        """A renewal sent at monotonic time ``sent`` succeeded."""
        if self.ttl is not None and not self._lost:
            self._until = max(self._until, sent + self.ttl * self.margin)

    def lost(self) -> None:
        self._lost = True

    def state(self, mono: float) -> str:
        if self._lost:
            return LOST
        return OK if mono < self._until else PAUSED

    @property
    def until(self) -> float:
        """Monotonic time at which the controller pauses unless renewed (inf without a registry)."""
        return self._until
