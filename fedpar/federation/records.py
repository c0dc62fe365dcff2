"""What the discovery registry holds about controllers: frozen records, pure data, no I/O.

Each record converts to and from a plain list (``to_wire`` / ``from_wire``), the form used both inside
registry values and in ``Membership`` messages; ``from_wire`` checks every field's type and raises
``MalformedMessage`` on anything else (these come from the network or from a shared registry).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

from fedpar.errors import MalformedMessage

_R = TypeVar("_R")


def _from_wire(cls: type[_R], raw: Any) -> _R:
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    if not isinstance(raw, list) or len(raw) != len(names):
        raise MalformedMessage(f"{cls.__name__}: expected a list of {len(names)} fields")
    types = cls.__annotations__
    for name, value in zip(names, raw, strict=True):
        t = types[name]
        ok = (
            (t == "str" and isinstance(value, str))
            or (t == "int" and isinstance(value, int) and not isinstance(value, bool))
            or (t == "float" and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (t == "bool" and isinstance(value, bool))
        )
        if not ok:
            raise MalformedMessage(f"{cls.__name__}.{name}: expected {t}, got {type(value).__name__}")
    return cls(*(float(v) if types[n] == "float" else v for n, v in zip(names, raw, strict=True)))


@dataclass(frozen=True)
class ControllerEntry:
    """A live controller's registration: who it is, where it listens, and its share of the engines."""

    cid: str  # stable per state directory: a restarted controller keeps it, with a higher epoch
    epoch: int  # incarnation (the store's epoch counter)
    client_endpoint: str
    engine_endpoint: str
    host: str
    pid: int
    state_dir: str
    weight: float  # relative share of engines it should own (rendezvous weight)
    started: float  # time.time() of this incarnation's start
    engines: int = 0  # how many engines it has (published about once a second: placement's bounded loads)

    def to_wire(self) -> list[Any]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_wire(cls, raw: Any) -> ControllerEntry:
        return _from_wire(cls, raw)


@dataclass(frozen=True)
class KnownController:
    """Every controller that ever registered (kept after it dies): to say which results are unavailable."""

    cid: str
    host: str
    state_dir: str
    first_seen: float

    def to_wire(self) -> list[Any]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_wire(cls, raw: Any) -> KnownController:
        return _from_wire(cls, raw)


@dataclass(frozen=True)
class Takeover:
    """The survivors took over the work of controller ``cid`` at incarnation ``epoch``: its engines may be
    adopted (with the tasks they hold) while the takeover is open; once ``closed``, clients resubmit what no
    live controller holds, and a controller restarted on ``cid``'s state directory drops its unfinished
    tasks instead of running them again."""

    cid: str
    epoch: int
    by: str  # the controller that wrote the marker
    started: float  # time.time() when it was written
    closed: bool
    adopters: int  # how many adoptions joined it before it closed

    def to_wire(self) -> list[Any]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_wire(cls, raw: Any) -> Takeover:
        return _from_wire(cls, raw)
