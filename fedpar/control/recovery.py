"""What a restarted controller does with the tasks its store says were unfinished: a pure state machine.

* Queued load-balanced tasks are queued again at once.
* Queued direct tasks wait for their engine to register again.
* Assigned tasks may still be running on their engine. When that engine registers again it lists the
  task ids it still holds; those stay assigned to it (their results will come), the others were lost
  with the old controller and are retried or failed by the caller, following their retry policy.
* Engines that do not come back before the deadline lose their tasks the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedpar.control.scheduler import Task
from fedpar.store.records import ASSIGNED, QUEUED, RUNNING, TaskRecord


def task_from_record(rec: TaskRecord) -> Task:
    """The in-flight form of a stored task (its inputs stay in the store until dispatch)."""
    task = Task(rec.task_id, rec.client, rec.op, rec.target, 0, rec.retries, rec.spec, None, rec.submitted,
                rec.attempts)
    task.engine = rec.engine
    task.assigned = rec.assigned
    return task


class Recovery:
    """Unfinished tasks found at start-up, until their engines return or ``deadline`` passes."""

    def __init__(self, records: Iterable[TaskRecord], deadline: float):
        self.deadline = deadline
        self.queued: list[Task] = []  # load-balanced, ready to queue
        self.held: dict[int, list[Task]] = {}  # direct tasks waiting for their engine
        self.limbo: dict[int, dict[str, Task]] = {}  # assigned tasks: engine -> task id -> task
        self._index: dict[str, Task] = {}  # every task above, by id
        for rec in records:
            task = task_from_record(rec)
            if rec.state != QUEUED or rec.target is not None:
                self._index[rec.task_id] = task
            if rec.state == QUEUED:
                if rec.target is None:
                    self.queued.append(task)
                else:
                    self.held.setdefault(rec.target, []).append(task)
            elif rec.state in (ASSIGNED, RUNNING) and rec.engine is not None:
                self.limbo.setdefault(rec.engine, {})[rec.task_id] = task

    @property
    def active(self) -> bool:
        return bool(self.held or self.limbo)

    def find(self, task_id: str) -> Task | None:
        """A held or limbo task by id (None for others, including re-queued ones)."""
        return self._index.get(task_id)

    def take(self, task_id: str) -> Task | None:
        """Remove and return a recovered task (its result arrived)."""
        task = self._index.pop(task_id, None)
        if task is None:
            return None
        for tasks in self.limbo.values():
            if tasks.pop(task_id, None) is not None:
                return task
        for held in self.held.values():
            if task in held:
                held.remove(task)
        return task

    def engine_returned(self, engine_id: int, running: Iterable[str]) -> tuple[list[Task], list[Task], list[Task]]:
        """Engine ``engine_id`` registered again, holding ``running``.

        Returns (tasks it still runs: adopt them, assigned tasks it lost, direct tasks to queue for it).
        """
        holding = set(running)
        limbo = self.limbo.pop(engine_id, {})
        adopt = [t for tid, t in limbo.items() if tid in holding]
        lost = [t for tid, t in limbo.items() if tid not in holding]
        held = self.held.pop(engine_id, [])
        for t in (*limbo.values(), *held):
            self._index.pop(t.task_id, None)
        return adopt, lost, held

    def expire(self, now: float) -> tuple[list[Task], list[Task]]:
        """After the deadline: (assigned tasks whose engine never came back, direct tasks likewise)."""
        if now < self.deadline:
            return [], []
        lost = [t for tasks in self.limbo.values() for t in tasks.values()]
        held = [t for tasks in self.held.values() for t in tasks]
        self.limbo.clear()
        self.held.clear()
        self._index.clear()
        return lost, held
