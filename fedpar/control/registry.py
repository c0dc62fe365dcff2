"""Which engines are registered and alive: a pure state machine fed with times by the gateway.

An engine is declared dead when nothing (heartbeat or result) came from it for ``timeout`` seconds.
A lone controller allocates engine ids itself, never reusing one within its store (the next id continues
after the highest ever recorded). In a federation ids are global: the discovery registry allocates them,
an engine keeps its id for life, and registers with it (``engine_id``) wherever it goes.
"""

from __future__ import annotations

from dataclasses import replace

from fedpar.store.records import EngineRecord


class EngineRegistry:
    """Registered engines, their sockets' identities and when each was last heard from."""

    def __init__(self, timeout: float, next_id: int = 0):
        self.timeout = timeout
        self._next_id = next_id
        self._records: dict[int, EngineRecord] = {}
        self._by_uuid: dict[str, int] = {}
        self._task_ident: dict[int, bytes] = {}
        self._by_task_ident: dict[bytes, int] = {}
        self._control_ident: dict[int, bytes] = {}
        self._last_seen: dict[int, float] = {}
        self._known: dict[str, int] = {}  # uuid -> id of engines registered before a restart

    def remember(self, records: list[EngineRecord]) -> None:
        """Engines of a previous incarnation keep their ids when they register again."""
        for rec in records:
            self._known[rec.uuid] = rec.engine_id
            self._next_id = max(self._next_id, rec.engine_id + 1)

    def was_known(self, uuid: str) -> bool:
        return uuid in self._known

    def id_of(self, uuid: str) -> int | None:
        """The id of the engine ``uuid`` if it is registered here, or was before a restart."""
        eid = self._by_uuid.get(uuid)
        return eid if eid is not None and eid in self._records else self._known.get(uuid)

    def holder(self, engine_id: int) -> str | None:
        """The uuid registered under ``engine_id`` (None if none)."""
        rec = self._records.get(engine_id)
        return None if rec is None else rec.uuid

    def register(self, uuid: str, hostname: str, pid: int, task_identity: bytes, now: float,
                 engine_id: int | None = None) -> EngineRecord:
        """Register an engine (or re-register the same uuid, keeping its id). ``engine_id``: the global id
        the engine already has (federation); else the id it had here, or a new local one."""
        eid = engine_id if engine_id is not None and engine_id >= 0 else self._by_uuid.get(uuid)
        if eid is None:
            eid = self._known.pop(uuid, None)
        else:
            self._known.pop(uuid, None)
        if eid is None:
            eid = self._next_id
        self._next_id = max(self._next_id, eid + 1)
        old = self._task_ident.get(eid)
        if old is not None:
            self._by_task_ident.pop(old, None)
        rec = EngineRecord(eid, uuid, hostname, pid, now, "up")
        self._records[eid] = rec
        self._by_uuid[uuid] = eid
        self._task_ident[eid] = task_identity
        self._by_task_ident[task_identity] = eid
        self._last_seen[eid] = now
        return rec

    def seen(self, engine_id: int, now: float, control_identity: bytes | None = None) -> bool:
        """Note a sign of life. False if the engine is not registered."""
        if engine_id not in self._records:
            return False
        self._last_seen[engine_id] = now
        if control_identity is not None:
            self._control_ident[engine_id] = control_identity
        return True

    def expired(self, now: float) -> list[int]:
        """Engines silent for longer than ``timeout``."""
        limit = now - self.timeout
        return [eid for eid, t in self._last_seen.items() if t < limit]

    def unregister(self, engine_id: int, state: str = "stopped") -> EngineRecord | None:
        rec = self._records.pop(engine_id, None)
        if rec is None:
            return None
        self._by_uuid.pop(rec.uuid, None)
        ident = self._task_ident.pop(engine_id, None)
        if ident is not None:
            self._by_task_ident.pop(ident, None)
        self._control_ident.pop(engine_id, None)
        self._last_seen.pop(engine_id, None)
        return replace(rec, state=state)

    def ids(self) -> list[int]:
        return sorted(self._records)

    def engines(self) -> list[EngineRecord]:
        return [self._records[i] for i in sorted(self._records)]

    def host(self, engine_id: int) -> str | None:
        """The host name a registered engine reported."""
        rec = self._records.get(engine_id)
        return None if rec is None else rec.hostname

    def task_identity(self, engine_id: int) -> bytes | None:
        return self._task_ident.get(engine_id)

    def control_identity(self, engine_id: int) -> bytes | None:
        return self._control_ident.get(engine_id)

    def by_task_identity(self, ident: bytes) -> int | None:
        return self._by_task_ident.get(ident)

    def __len__(self) -> int:
        return len(self._records)
