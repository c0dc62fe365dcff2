"""Requests a client sends to every controller of its federation, and ``get_result`` lookups.

Part of the client's I/O thread (``fedpar.client.io``). A ``Gather`` collects one request's answers from every
live controller (``Client`` merges them: status, queries, aborts, purges, shutdown). A ``Lookup`` asks every
controller for results the client does not track: found anywhere, it is delivered; missing everywhere, it
fails with ``ResultNotFound``, or ``ResultUnavailable`` when a controller that may hold it is down.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedpar.client.link import Link
from fedpar.errors import FedparError, ResultNotFound, ResultUnavailable
from fedpar.wire.codec import Received
from fedpar.wire.protocol import GetResults, Message

if TYPE_CHECKING:
    from fedpar.client.io import IOThread


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


class Requests:
    """Fan-out requests and lookups in flight, by request id."""

    def __init__(self, io: IOThread):
        self.io = io
        self.gathers: dict[int, tuple[Gather, Link]] = {}
        self.lookups: dict[int, tuple[Lookup, Link]] = {}

    def fanout(self, gather: Gather) -> None:
        links = self.io.ready_links()
        gather.asked = len(links)
        if not links:
            gather.done.set()
            return
        for link in links:
            rid = self.io._send(link, gather.msg, [], None)
            self.gathers[rid] = (gather, link)

    def lookup(self, lookup: Lookup) -> None:
        links = self.io.ready_links()
        if not links:
            for tid in lookup.ids:
                self.fail_lookup(tid)
            return
        lookup.asked = lookup.total = len(links)
        for link in links:
            rid = self.io._send(link, GetResults(lookup.ids), [], None)
            self.lookups[rid] = (lookup, link)

    def lookup_reply(self, lookup: Lookup, missing: list[str], link: Link | None) -> None:
        """A controller answered (or died before answering: ``missing`` is then every id)."""
        for tid in missing:
            lookup.missing[tid] = lookup.missing.get(tid, 0) + 1
            if link is not None:
                link.expected.discard(tid)
        lookup.asked -= 1
        if lookup.asked <= 0:
            for tid, n in lookup.missing.items():
                if n >= lookup.total and tid not in self.io.tracks:
                    self.fail_lookup(tid)

    def fail_lookup(self, tid: str) -> None:
        down = self.io.view.down
        if down:
            where = ", ".join(f"{k.cid} (host {k.host}, state directory {k.state_dir})" for k in down)
            exc: FedparError = ResultUnavailable(
                f"no live controller holds task {tid!r}; controller(s) {where} are down: results they stored come "
                "back when a controller runs on that state directory again", task_id=tid)
        else:
            exc = ResultNotFound(f"no task {tid!r} in any controller's store", task_id=tid)
        self.io.client._fail_task(tid, exc)

    def extend_lookups(self, link: Link) -> None:
        """A controller joined (or its link became ready): lookups still waiting for answers ask it too."""
        pending = {id(lk): lk for lk, _ in self.lookups.values()}
        for lookup in pending.values():
            lookup.asked += 1
            lookup.total += 1
            rid = self.io._send(link, GetResults(lookup.ids), [], None)
            self.lookups[rid] = (lookup, link)
