"""The housekeeper: a pykka actor for the controller's periodic chores, kept off the hot path.

Every tick it flushes the store to disk (``env.sync``, which may take milliseconds and so must not run on
the gateway thread), asks the gateway to persist replay marks, purges results past the retention
period (the deletion itself is written by the journal, the store's only writer), and stops the
controller when the process that started it has died (no stray controllers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from typing import Any

import pykka

from fedpar.actors.gateway import Gateway
from fedpar.runtime import pid_alive

log = logging.getLogger(__name__)

TICK = "tick"


def _malloc_trim() -> object:
    """glibc's ``malloc_trim`` (None elsewhere): hands freed heap back to the OS."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


class Housekeeper(pykka.ThreadingActor):
    """Periodic store sync, replay-mark persistence, retention and parent watch."""

    def __init__(self, gateway: Gateway, *, interval: float = 1.0, retention: float = 0.0,
                 parent_pid: int | None = None):
        super().__init__()
        self.gateway = gateway
        self.interval = interval
        self.retention = retention
        self.parent_pid = parent_pid
        self._stopped = threading.Event()
        self._ticker: threading.Thread | None = None
        self._last_purge = 0.0
        self._trimmed_at = -1  # tasks finished when the heap was last trimmed
        self._idle_trims = 0  # trims since the controller went idle at that count

    def on_start(self) -> None:
        # One ticker thread for the actor's life (not a threading.Timer thread per tick).
        self._ticker = threading.Thread(target=self._tick_loop, name="fedpar-housekeeper-ticks", daemon=True)
        self._ticker.start()

    def on_stop(self) -> None:
        self._stopped.set()

    def on_failure(self, *exc_info: Any) -> None:
        log.error("housekeeper failed", exc_info=exc_info)

    def _tick_loop(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.actor_ref.tell(TICK)
            except pykka.ActorDeadError:
                return

    def on_receive(self, message: Any) -> Any:
        if message == TICK:
            self.tick(time.time())
        return None

    def tick(self, now: float) -> None:
        gw = self.gateway
        gw.call_soon(gw.persist_marks)
        gw.journal.store.sync()
        if self.retention > 0 and now - self._last_purge >= 60 * self.interval:
            self._last_purge = now
            old = gw.journal.store.completed_before(now - self.retention, limit=10_000)
            if old:
                log.info("purging %d results older than %.0fs", len(old), self.retention)
                gw.call_soon(lambda: gw.journal.delete_results(old))
        finished = gw.counters.get("finished", 0)
        if finished != self._trimmed_at:
            self._trimmed_at, self._idle_trims = finished, 0
        if _TRIM is not None and self._idle_trims < 2 and gw.scheduler.in_flight == 0:
            # Idle after work: give the memory of finished tasks back, so the controller's footprint
            # returns to its baseline instead of staying at the high-water mark of a burst. Twice: the
            # second time (a tick later) after a collection, for what the last pass and cycles freed.
            if self._idle_trims:
                gc.collect()
            self._idle_trims += 1
            _TRIM(0)  # type: ignore[operator]
        if self.parent_pid is not None and not pid_alive(self.parent_pid):
            log.warning("parent process %d is gone; stopping the controller", self.parent_pid)
            gw.stop()

