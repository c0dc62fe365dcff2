"""The controller's scheduling logic as a pure state machine: no threads, sockets or clocks.

The gateway feeds it events (``submit``, ``complete``, ``add_engine``, ``remove_engine``) and executes
the decisions ``assign`` returns. Everything here is plain data, unit-tested without processes.

Policy
* Direct tasks (``target`` set) wait in their engine's own FIFO; load-balanced tasks in one shared FIFO.
  An engine with free credit takes its direct tasks first, then load-balanced ones.
* Credit (tasks queued on an engine at once) adapts to the task length: enough tasks to cover about
  ``PIPELINE_SECONDS`` of work, so short tasks stream without idle gaps and long tasks are not hoarded by
  one engine while another is idle. ``prefetch > 0`` fixes the credit instead.
* Load-balanced tasks go to the engine with the most free credit first (least outstanding work).
* A draining engine (about to move to another controller) gets no new load-balanced task; its direct
  queue still runs. ``capacity()`` tells clients how many load-balanced tasks to keep outstanding here:
  what the engines hold (credit) plus about ``QUEUE_SECONDS`` of queued work each, so clients hold the rest
  back and can send it wherever engines free up first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

PIPELINE_SECONDS = 0.004
MAX_CREDIT = 64
INITIAL_CREDIT = 2
QUEUE_SECONDS = 0.05  # queued work per engine a controller asks clients for, beyond what its engines hold
MIN_QUEUE = 2
MAX_QUEUE = 1024
UNMEASURED_QUEUE = 16  # an engine whose task length is not known yet: a modest queue until it is


class Task:
    """A task the controller has accepted and not yet finished (in-flight state only)."""

    __slots__ = (
        "assigned", "attempts", "client", "engine", "frames", "nframes", "op", "retries", "running", "spec",
        "submitted", "target", "task_id",
    )

    def __init__(
        self,
        task_id: str,
        client: str,
        op: str,
        target: int | None,
        nframes: int,
        retries: int,
        spec: dict[str, Any],
        frames: list[Any] | None,
        submitted: float,
        attempts: int = 0,
    ):
        self.task_id = task_id
        self.client = client
        self.op = op
        self.target = target
        self.nframes = nframes
        self.retries = retries
        self.spec = spec
        self.frames = frames  # None once dispatched: the store keeps the inputs for a retry
        self.submitted = submitted
        self.engine: int | None = None
        self.assigned: float | None = None
        self.attempts = attempts
        self.running = False  # its engine's heartbeat said it executes it


class _Engine:
    __slots__ = ("direct", "draining", "ewma", "fixed", "outstanding", "want")

    def __init__(self, fixed: int):
        self.direct: deque[Task] = deque()
        self.outstanding: dict[str, Task] = {}
        self.ewma: float | None = None  # mean task runtime on this engine (seconds)
        self.fixed = fixed
        self.draining = False
        self.want = 0  # its part of the scheduler's capacity, as last added up

    def credit(self) -> int:
        if self.fixed:
            return self.fixed
        if self.ewma is None:
            return INITIAL_CREDIT
        return max(1, min(MAX_CREDIT, int(PIPELINE_SECONDS / max(self.ewma, 1e-6))))

    def free(self) -> int:
        return self.credit() - len(self.outstanding)

    def wanted(self) -> int:
        """Load-balanced tasks this engine should have outstanding or queued for it."""
        if self.draining:
            return 0
        queue = UNMEASURED_QUEUE if self.ewma is None else int(QUEUE_SECONDS / max(self.ewma, 1e-6))
        return self.credit() + max(MIN_QUEUE, min(MAX_QUEUE, queue))


class Scheduler:
    """Queues, per-engine credit and the assignment decision."""

    def __init__(self, prefetch: int = 0):
        self.prefetch = prefetch
        self._engines: dict[int, _Engine] = {}
        self._queue: deque[Task] = deque()
        self._in_flight: dict[str, Task] = {}
        self._direct: set[int] = set()  # engines with direct tasks waiting (assign visits only those, and
        #                                 every engine only when load-balanced tasks wait: thousands of idle
        #                                 engines cost nothing per pass)
        self._capacity = 0  # sum of every engine's ``want``, kept up to date as engines change

    def _rewant(self, eng: _Engine) -> None:
        new = eng.wanted()
        self._capacity += new - eng.want
        eng.want = new

    # ------------------------------------------------------------------ engines
    def add_engine(self, engine_id: int) -> None:
        if engine_id not in self._engines:
            eng = self._engines[engine_id] = _Engine(self.prefetch)
            self._rewant(eng)

    def remove_engine(self, engine_id: int) -> tuple[list[Task], list[Task]]:
        """Forget an engine. Returns (tasks that were running on it, direct tasks still waiting for it)."""
        eng = self._engines.pop(engine_id, None)
        if eng is None:
            return [], []
        self._capacity -= eng.want
        self._direct.discard(engine_id)
        running = list(eng.outstanding.values())
        waiting = list(eng.direct)
        for t in running + waiting:
            self._in_flight.pop(t.task_id, None)
        return running, waiting

    def has_engine(self, engine_id: int) -> bool:
        return engine_id in self._engines

    def engine_ids(self) -> list[int]:
        return sorted(self._engines)

    def outstanding(self, engine_id: int) -> list[Task]:
        """Tasks assigned to ``engine_id`` and not finished."""
        eng = self._engines.get(engine_id)
        return list(eng.outstanding.values()) if eng else []

    def engine_load(self, engine_id: int) -> int:
        eng = self._engines.get(engine_id)
        return len(eng.outstanding) + len(eng.direct) if eng else 0

    def drain(self, engine_id: int, on: bool = True) -> None:
        """Stop (``on``) or resume giving ``engine_id`` load-balanced work (it is about to move away)."""
        eng = self._engines.get(engine_id)
        if eng is not None:
            eng.draining = on
            self._rewant(eng)

    def draining(self, engine_id: int) -> bool:
        eng = self._engines.get(engine_id)
        return eng is not None and eng.draining

    def idle(self, engine_id: int) -> bool:
        """True when ``engine_id`` holds no task and has none waiting for it."""
        eng = self._engines.get(engine_id)
        return eng is None or not (eng.outstanding or eng.direct)

    def capacity(self) -> int:
        """How many load-balanced tasks clients should keep outstanding here (see the module docstring)."""
        return self._capacity

    # ------------------------------------------------------------------ tasks
    def submit(self, task: Task) -> None:
        """Queue a task. A direct task's engine must exist (the caller checks ``has_engine``)."""
        self._in_flight[task.task_id] = task
        if task.target is None:
            self._queue.append(task)
        else:
            self._engines[task.target].direct.append(task)
            self._direct.add(task.target)

    def requeue(self, task: Task) -> None:
        """Put a task that lost its engine back at the front of the shared queue (a retry)."""
        task.engine = None
        task.assigned = None
        task.running = False
        self._in_flight[task.task_id] = task
        self._queue.appendleft(task)

    def adopt(self, engine_id: int, task: Task) -> None:
        """Record that ``engine_id`` is already running ``task`` (it said so when it registered again)."""
        self._in_flight[task.task_id] = task
        task.engine = engine_id
        self._engines[engine_id].outstanding[task.task_id] = task

    def assign(self, now: float) -> list[tuple[int, list[Task]]]:
        """Decide which queued tasks go to which engine now; marks them assigned."""
        out: list[tuple[int, list[Task]]] = []
        lb = self._queue
        if not self._engines or not (lb or self._direct):
            return out
        engines = self._engines
        taken: dict[int, int] = {}  # direct tasks given to each engine in this pass
        for eid in list(self._direct):
            eng = engines.get(eid)
            if eng is None or not eng.direct:
                self._direct.discard(eid)
                continue
            free = eng.free()
            if free > 0:
                batch: list[Task] = []
                while free > 0 and eng.direct:
                    batch.append(eng.direct.popleft())
                    free -= 1
                out.append((eid, batch))
                taken[eid] = len(batch)
                if not eng.direct:
                    self._direct.discard(eid)
        free_after: dict[int, int] = {}
        if lb:
            for eid, eng in engines.items():
                if not eng.draining:
                    free = eng.free() - taken.get(eid, 0)
                    if free > 0:
                        free_after[eid] = free
        if lb and free_after:
            # Spread evenly: one task at a time, engines with the most free credit first.
            order = sorted(free_after, key=free_after.__getitem__, reverse=True)
            shares: dict[int, int] = dict.fromkeys(order, 0)
            n = len(lb)
            while n and order:
                for eid in list(order):
                    if not n:
                        break
                    shares[eid] += 1
                    n -= 1
                    free_after[eid] -= 1
                    if free_after[eid] <= 0:
                        order.remove(eid)
            merged = dict(out)
            for eid, k in shares.items():
                if k:
                    merged.setdefault(eid, []).extend(lb.popleft() for _ in range(k))
            out = list(merged.items())
        for eid, batch in out:
            eng = self._engines[eid]
            for t in batch:
                t.engine = eid
                t.assigned = now
                t.attempts += 1
                eng.outstanding[t.task_id] = t
        return out

    def complete(self, task_id: str, engine_id: int | None, runtime: float | None) -> Task | None:
        """A result arrived. Returns the finished task, or None if it is unknown (a duplicate)."""
        task = self._in_flight.pop(task_id, None)
        if task is None:
            return None
        if not self._in_flight:  # a dict never shrinks: drop the table a burst grew (10k tasks: 200 KB)
            self._in_flight = {}
        if task.engine is None:
            # A late result for a task that was re-queued after its engine was declared lost: the result
            # stands, so the queued copy must not run again.
            queue = self._queue if task.target is None else self._engines[task.target].direct \
                if task.target in self._engines else self._queue
            try:
                queue.remove(task)
            except ValueError:
                pass
            return task
        eng = self._engines.get(task.engine)
        if eng is not None:
            eng.outstanding.pop(task_id, None)
            # Only the engine that ran it teaches us its speed (a stale result may come from another).
            if engine_id == task.engine and runtime is not None and runtime >= 0:
                eng.ewma = runtime if eng.ewma is None else 0.8 * eng.ewma + 0.2 * runtime
                self._rewant(eng)
        return task

    def get(self, task_id: str) -> Task | None:
        return self._in_flight.get(task_id)

    def cancel_queued(self, task_ids: Iterable[str]) -> list[Task]:
        """Remove tasks that are still queued (not assigned); returns the removed ones."""
        wanted = set(task_ids)
        removed: list[Task] = []
        for q in [self._queue, *(e.direct for e in self._engines.values())]:
            keep = [t for t in q if t.task_id not in wanted]
            if len(keep) != len(q):
                removed.extend(t for t in q if t.task_id in wanted)
                q.clear()
                q.extend(keep)
        for t in removed:
            self._in_flight.pop(t.task_id, None)
        return removed

    # ------------------------------------------------------------------ counters
    @property
    def queued(self) -> int:
        return len(self._queue) + sum(len(e.direct) for e in self._engines.values())

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def assigned_count(self) -> int:
        return sum(len(e.outstanding) for e in self._engines.values())
