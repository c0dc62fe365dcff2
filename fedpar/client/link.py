"""One client's connection to one controller, and the client's record of each task it waits for.

The client's I/O thread (``fedpar.client.io``) holds one ``Link`` per live controller of the federation
(one in all when there is a single controller). Everything here is plain state, touched only by that
thread; the logic lives in ``io``.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from fedpar.wire.protocol import ResultSpec, TaskSpec
from fedpar.wire.streams import Receiver


class Track:
    """A task this client submitted and still waits for. ``frames`` are kept until the result arrives, so
    the task can be resubmitted elsewhere if its controller dies; ``cid`` is the controller holding it
    (None while the client holds it back, waiting for capacity or for its engine's new home)."""

    __slots__ = ("cid", "finished_there", "frames", "out", "spec")

    def __init__(self, spec: TaskSpec, frames: list[Any]):
        self.spec = spec
        self.frames = frames
        self.cid: str | None = None
        self.finished_there = False  # its result began to arrive: it is done and stored where it ran
        self.out: Link | None = None  # the link whose ``lb_out`` counts it (load-balanced tasks only)

    def count_on(self, link: Link) -> None:
        """Count this load-balanced task as outstanding at ``link`` (and no longer where it was)."""
        if self.spec.target is None and self.out is not link:
            self.release()
            link.lb_out += 1
            self.out = link

    def release(self) -> None:
        """It no longer takes a place of its controller's capacity (finished, failed, refused, moved)."""
        if self.out is not None:
            self.out.lb_out -= 1
            self.out = None

    @property
    def lb(self) -> bool:
        """Load-balanced (no target engine)."""
        return self.spec.target is None


class Link:
    """The state of one controller connection (its socket is used by the I/O thread only)."""

    def __init__(self, endpoint: str, sock: zmq.Socket[Any]):
        self.endpoint = endpoint
        self.sock = sock
        self.cid: str | None = None  # known from its Welcome
        self.epoch: int | None = None
        self.ready = False  # Welcome received: tasks may be sent here
        self.gone = False  # taken over, or replaced: nothing is sent here any more
        self.pid = 0
        self.host = ""
        self.engines: set[int] = set()
        self.capacity = 0  # load-balanced tasks the controller wants outstanding from this client
        self.lb_out = 0  # this client's load-balanced tasks there, not finished
        self.unacked: dict[str, None] = {}  # submitted, not yet acknowledged (in order)
        self.expected: set[str] = set()  # results it owes this client
        self.receivers: dict[int, tuple[ResultSpec, Receiver]] = {}  # downloads, by the controller's stream id
        now = time.monotonic()
        self.opened = now
        self.last_heard = now
        self.last_ping = 0.0

    @property
    def free(self) -> int:
        """How many more load-balanced tasks the controller wants from this client now."""
        return self.capacity - self.lb_out if self.ready and not self.gone else 0

    @property
    def busy(self) -> bool:
        """True while this client waits for something from the controller."""
        return bool(self.unacked or self.expected or self.lb_out)

    def __repr__(self) -> str:
        return f"<Link {self.cid or '?'}@{self.epoch} {self.endpoint} {'ready' if self.ready else 'connecting'}>"
