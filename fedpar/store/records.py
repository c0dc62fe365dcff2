"""Records kept in the controller's store: frozen, msgpack-friendly, no I/O.

Each record converts to and from a plain tuple (``to_row`` / ``from_row``) so the store can pack it
with msgpack in one call; field order is part of the on-disk schema (bump ``SCHEMA_VERSION`` in
``schema.py`` when it changes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Task states. A task moves queued -> assigned [-> running] -> done | failed (back to queued on a retry).
# "running" is recorded when the engine's heartbeat names the task it executes: tasks shorter than a
# heartbeat go from assigned straight to done, at no per-task cost.
QUEUED = "queued"
ASSIGNED = "assigned"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
TASK_STATES = (QUEUED, ASSIGNED, RUNNING, DONE, FAILED)
UNFINISHED_STATES = (QUEUED, ASSIGNED, RUNNING)
FINISHED_STATES = (DONE, FAILED)


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One submitted task as the controller knows it."""

    task_id: str
    client: str  # sender id of the submitting client (results are routed there)
    op: str  # "apply" | "execute" | "push" | "pull" | ...
    target: int | None  # engine id of a direct request, None for load-balanced work
    state: str
    engine: int | None  # engine the task is (or was last) assigned to
    submitted: float
    assigned: float | None = None
    completed: float | None = None
    attempts: int = 0
    retries: int = 0  # allowed re-runs after an engine failure
    spec: dict[str, Any] = field(default_factory=dict)  # op-specific fields the engine needs

    def to_row(self) -> list[Any]:
        return [
            self.task_id, self.client, self.op, self.target, self.state, self.engine,
            self.submitted, self.assigned, self.completed, self.attempts, self.retries, self.spec,
        ]

    @classmethod
    def from_row(cls, row: list[Any]) -> TaskRecord:
        return cls(*row)


@dataclass(frozen=True, slots=True)
class ResultRecord:
    """The outcome of one task. Its payload frames are stored separately, chunked."""

    task_id: str
    ok: bool
    engine: int | None
    started: float | None
    completed: float
    error: tuple[str, str, str] | None = None  # (type name, message, traceback text) when not ok
    frame_sizes: tuple[int, ...] = ()  # byte length of each payload frame

    def to_row(self) -> list[Any]:
        return [
            self.task_id, self.ok, self.engine, self.started, self.completed,
            list(self.error) if self.error is not None else None, list(self.frame_sizes),
        ]

    @classmethod
    def from_row(cls, row: list[Any]) -> ResultRecord:
        task_id, ok, engine, started, completed, error, sizes = row
        return cls(
            task_id, ok, engine, started, completed,
            tuple(error) if error is not None else None, tuple(sizes),
        )


@dataclass(frozen=True, slots=True)
class EngineRecord:
    """An engine that registered with this controller."""

    engine_id: int
    uuid: str
    hostname: str
    pid: int
    registered: float
    state: str = "up"  # "up" | "dead" | "stopped"

    def to_row(self) -> list[Any]:
        return [self.engine_id, self.uuid, self.hostname, self.pid, self.registered, self.state]

    @classmethod
    def from_row(cls, row: list[Any]) -> EngineRecord:
        return cls(*row)
