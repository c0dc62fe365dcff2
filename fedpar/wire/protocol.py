"""Message kinds of the wire protocol: frozen dataclasses, pure data, no I/O.

A message on the wire is ``[routing ids..., b"", MAC, HEADER, *PAYLOAD]`` (see ``codec``). HEADER is a
msgpack map holding the envelope fields (``v`` protocol version, ``kind``, ``id``, ``sender``, ``seq``,
``ts``, ``epoch``) and the kind's own fields. ``id`` is the sender's request id (replies name it in
``reply_to``); ``(sender, seq)`` is unique per message and feeds the replay guard.

Batches: ``Submit``, ``Tasks`` and ``Results`` carry many items; each item says how many payload frames
it owns (``nframes``) and the items' frames follow each other in order.

Control messages are never pickled: every field is a msgpack scalar, list or map, and ``from_wire``
checks each field's type before a message object exists. Dispatch is on the class, never on strings.
"""

import types
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, NamedTuple, Union, get_args, get_origin, get_type_hints

from fedpar.errors import MalformedMessage

PROTOCOL_VERSION = 1
ENVELOPE_KEYS = ("v", "kind", "id", "sender", "seq", "ts", "epoch")


# --------------------------------------------------------------------------- batch items
MAX_TASK_ID_BYTES = 256
# An engine waits this long (seconds) for a controller's EngineWelcome before trying the next one; a
# controller does not register a new engine from a hello older than that (the engine has moved on).
REGISTER_WAIT = 2.0


def valid_task_id(task_id: object) -> bool:
    """A task id is a str of 1-256 UTF-8 bytes without NUL (it is an LMDB key prefix)."""
    if not isinstance(task_id, str) or not task_id or "\x00" in task_id:
        return False
    if len(task_id) <= MAX_TASK_ID_BYTES // 4:  # at most 4 UTF-8 bytes per character: surely short enough
        return task_id.isascii() or _encodes(task_id)
    return _encodes(task_id) and len(task_id.encode()) <= MAX_TASK_ID_BYTES


def _encodes(task_id: str) -> bool:
    try:
        task_id.encode()
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


class TaskSpec(NamedTuple):
    """One task inside ``Submit`` (client -> controller) and ``Tasks`` (controller -> engine).

    ``op`` is what the engine does: ``apply`` (frames: function, args, *buffers), ``execute``
    (``spec["code"]``), ``push`` (frames: namespace pickle, *buffers), ``pull`` (``spec["names"]``).
    ``target`` is an engine id for direct work, ``None`` for load-balanced work.
    """

    task_id: str
    op: str
    target: int | None
    nframes: int
    retries: int
    spec: dict[str, Any]

    @classmethod
    def from_wire(cls, row: Any) -> "TaskSpec":
        if not (isinstance(row, list) and len(row) == 6):
            raise MalformedMessage("task item must be a list of 6 fields")
        task_id, op, target, nframes, retries, spec = row
        if not (
            valid_task_id(task_id)
            and isinstance(op, str)
            and (target is None or _is_int(target))
            and _is_int(nframes) and 0 <= nframes <= MAX_FRAMES
            and _is_int(retries) and 0 <= retries <= 1000
            and isinstance(spec, dict)
        ):
            raise MalformedMessage("task item has a field of the wrong type or range")
        return cls(task_id, op, target, nframes, retries, spec)


class ResultSpec(NamedTuple):
    """One task outcome inside ``Results`` (engine -> controller -> client).

    ``error`` is ``[type name, message, traceback text]`` when ``ok`` is false; frames then are empty.
    ``stream`` is ``[stream id, frame sizes]`` when the payload follows as a chunk stream (``nframes``
    is then 0; see ``fedpar.wire.streams``).
    """

    task_id: str
    ok: bool
    engine: int | None
    started: float | None
    completed: float
    error: list[str] | None
    nframes: int
    stream: list[Any] | None = None

    @classmethod
    def from_wire(cls, row: Any) -> "ResultSpec":
        if not (isinstance(row, list) and len(row) in (7, 8)):
            raise MalformedMessage("result item must be a list of 7 or 8 fields")
        task_id, ok, engine, started, completed, error, nframes = row[:7]
        stream = row[7] if len(row) == 8 else None
        if not (
            valid_task_id(task_id)
            and isinstance(ok, bool)
            and (engine is None or _is_int(engine))
            and (started is None or isinstance(started, (int, float)))
            and isinstance(completed, (int, float))
            and (error is None or (isinstance(error, list) and len(error) == 3
                                   and all(isinstance(e, str) for e in error)))
            and _is_int(nframes) and 0 <= nframes <= MAX_FRAMES
            and (stream is None or isinstance(stream, list))
        ):
            raise MalformedMessage("result item has a field of the wrong type or range")
        return cls(task_id, ok, engine, started, completed, error, nframes, stream)


MAX_FRAMES = 1 << 16
CHUNK_BYTES = 1 << 20  # a streamed payload travels in chunks of this size (the store keeps the same chunks)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --------------------------------------------------------------------------- message kinds
@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message kind. Subclasses set ``KIND`` (the wire name)."""

    KIND: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        cls = type(self)
        names = _FIELD_NAMES.get(cls)
        if names is None:  # (dataclasses.fields() costs more than the rest of this per message)
            names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
        return {n: getattr(self, n) for n in names}


_FIELD_NAMES: dict[type[Message], tuple[str, ...]] = {}


# client <-> controller ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClientHello(Message):
    """A client connects; the controller answers ``Welcome``."""

    KIND: ClassVar[str] = "client_hello"
    name: str = ""


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """The controller's answer to ``ClientHello``: who it is, which engines it owns, how many load-balanced
    tasks it wants outstanding (``capacity``), and the federation as it sees it (``membership``)."""

    KIND: ClassVar[str] = "welcome"
    reply_to: int
    controller: str
    engines: list[int]
    stream: dict[str, Any] = field(default_factory=dict)  # the cluster's stream settings (threshold, ...)
    capacity: int = 0
    membership: dict[str, Any] = field(default_factory=dict)  # fedpar.federation.membership.View.to_wire()
    pid: int = 0
    host: str = ""


@dataclass(frozen=True, slots=True)
class MembershipRequest(Message):
    """Ask a controller for its view of the federation (engines looking for a new home, clients)."""

    KIND: ClassVar[str] = "membership_request"


@dataclass(frozen=True, slots=True)
class Membership(Message):
    """A controller's view of the federation (``View.to_wire()``): pushed to its clients and engines when it
    changes, and the answer to ``MembershipRequest``."""

    KIND: ClassVar[str] = "membership"
    view: dict[str, Any]
    reply_to: int = 0


@dataclass(frozen=True, slots=True)
class Submit(Message):
    """A batch of tasks from a client. Acknowledged by ``SubmitReply`` once stored, or (a small submission
    whose tasks finish within the gateway's ``ACK_HOLD``) by the tasks' results alone."""

    KIND: ClassVar[str] = "submit"
    tasks: list[TaskSpec]


@dataclass(frozen=True, slots=True)
class SubmitReply(Message):
    """Which tasks of a ``Submit`` were stored; ``rejected`` items are ``[task_id, ename, evalue]``."""

    KIND: ClassVar[str] = "submit_reply"
    reply_to: int
    accepted: list[str]
    rejected: list[list[str]]
    capacity: int = -1  # the load-balanced tasks the controller wants outstanding from a client (-1: unchanged)


@dataclass(frozen=True, slots=True)
class Results(Message):
    """Task outcomes: engine -> controller, and controller -> client (also answers ``GetResults``)."""

    KIND: ClassVar[str] = "results"
    results: list[ResultSpec]
    missing: list[str] = field(default_factory=list)
    reply_to: int = 0
    capacity: int = -1  # as in SubmitReply (controller -> client only)


def check_task_ids(kind: str, task_ids: list[str]) -> None:
    """Raise ``MalformedMessage`` unless every id could be a stored task's (requests that name tasks)."""
    if not all(valid_task_id(t) for t in task_ids):
        raise MalformedMessage(f"{kind}: every task id must be 1-256 UTF-8 bytes without NUL")


@dataclass(frozen=True, slots=True)
class GetResults(Message):
    """Ask for stored results by task id (served from the store, also long after completion)."""

    KIND: ClassVar[str] = "get_results"
    task_ids: list[str]

    def __post_init__(self) -> None:
        check_task_ids(self.KIND, self.task_ids)


@dataclass(frozen=True, slots=True)
class Abort(Message):
    """Withdraw tasks still queued in the controller (no engine has them): they fail with ``TaskAborted``."""

    KIND: ClassVar[str] = "abort"
    task_ids: list[str]

    def __post_init__(self) -> None:
        check_task_ids(self.KIND, self.task_ids)


@dataclass(frozen=True, slots=True)
class AbortReply(Message):
    """The tasks of an ``Abort`` that were withdrawn (the others were with an engine, finished, or unknown)."""

    KIND: ClassVar[str] = "abort_reply"
    reply_to: int
    aborted: list[str]


@dataclass(frozen=True, slots=True)
class QueryTasks(Message):
    """Ask for stored task records matching every filter given (times are submission times)."""

    KIND: ClassVar[str] = "query_tasks"
    states: list[str] | None = None
    engine: int | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 1000


@dataclass(frozen=True, slots=True)
class TaskList(Message):
    """Task records (``TaskRecord.to_row()`` lists) answering ``QueryTasks``."""

    KIND: ClassVar[str] = "task_list"
    reply_to: int
    rows: list[list[Any]]


@dataclass(frozen=True, slots=True)
class PurgeResults(Message):
    """Delete finished tasks' results and records: by id, finished before a time, or all."""

    KIND: ClassVar[str] = "purge_results"
    task_ids: list[str] = field(default_factory=list)
    before: float | None = None
    everything: bool = False


@dataclass(frozen=True, slots=True)
class PurgeReply(Message):
    """How many finished tasks were purged."""

    KIND: ClassVar[str] = "purge_reply"
    reply_to: int
    purged: int


@dataclass(frozen=True, slots=True)
class StatusRequest(Message):
    """Ask for the controller's status."""

    KIND: ClassVar[str] = "status_request"


@dataclass(frozen=True, slots=True)
class StatusReply(Message):
    """Engines, queue depth and task counters. ``engines`` items are maps (id, uuid, host, pid, load)."""

    KIND: ClassVar[str] = "status_reply"
    reply_to: int
    controller: str
    controller_epoch: int
    engines: list[dict[str, Any]]
    queued: int
    in_flight: int
    done: int
    failed: int
    stats: dict[str, Any]
    pid: int = 0
    host: str = ""


@dataclass(frozen=True, slots=True)
class EngineEvent(Message):
    """Pushed to clients when engines come or go."""

    KIND: ClassVar[str] = "engine_event"
    registered: list[int]
    unregistered: list[int]
    moved: list[int] = field(default_factory=list)  # left this controller for another one: not gone
    capacity: int = -1  # the controller's capacity for load-balanced tasks now (see SubmitReply)


@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    """Ask the controller to stop its engines and (unless ``engines_only``) itself."""

    KIND: ClassVar[str] = "shutdown"
    engines_only: bool = False


@dataclass(frozen=True, slots=True)
class ShutdownReply(Message):
    """Shutdown accepted; ``engines`` lists the engines told to stop."""

    KIND: ClassVar[str] = "shutdown_reply"
    reply_to: int
    engines: list[int]


@dataclass(frozen=True, slots=True)
class ErrorReply(Message):
    """A request failed as a whole; ``ename`` names a ``fedpar.errors`` class."""

    KIND: ClassVar[str] = "error_reply"
    reply_to: int
    ename: str
    evalue: str


# engine <-> controller -------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EngineHello(Message):
    """An engine registers. ``task_identity`` is the zmq identity of its task socket.

    ``engine_id`` is the engine's global id once it has one (-1 for a new engine: the controller allocates
    it). ``origin`` is ``[controller id, epoch]`` of the controller it was registered with before, when it
    comes with the tasks it holds from a controller that died or left (``running``). ``redirected``: it was
    sent here (a move), so placement should leave it alone for a moment."""

    KIND: ClassVar[str] = "engine_hello"
    uuid: str
    hostname: str
    pid: int
    task_identity: bytes
    running: list[str] = field(default_factory=list)  # task ids not answered, or answered only recently
    engine_id: int = -1
    origin: list[Any] = field(default_factory=list)
    redirected: bool = False


@dataclass(frozen=True, slots=True)
class EngineWelcome(Message):
    """The controller's answer to ``EngineHello``: the engine's id and heartbeat period."""

    KIND: ClassVar[str] = "engine_welcome"
    reply_to: int
    engine_id: int
    heartbeat: float
    controller: str
    resend: list[str] = field(default_factory=list)  # results to send again (lost with a previous controller)
    stream: dict[str, Any] = field(default_factory=dict)  # the cluster's stream settings (threshold, ...)
    move_to: list[str] = field(default_factory=list)  # [controller id, engine endpoint]: register there instead
    drop: list[str] = field(default_factory=list)  # held tasks not adopted here: never run or report them
    membership: dict[str, Any] = field(default_factory=dict)  # View.to_wire()


@dataclass(frozen=True, slots=True)
class EngineMove(Message):
    """Tells an engine to register with another controller: an idle engine (placement), or, with
    ``handover``, a busy one whose controller leaves: it brings the tasks it holds and the results it sent
    lately (that controller stops before they reach their clients)."""

    KIND: ClassVar[str] = "engine_move"
    controller: str
    endpoint: str
    reason: str = ""
    handover: bool = False


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Sent both ways on the engine's control socket. From the controller, ``engine_id`` -1 means
    "I do not know you" (it restarted): the engine registers again."""

    KIND: ClassVar[str] = "heartbeat"
    engine_id: int
    running: str = ""  # from an engine: the task it is executing right now ("" when idle)


@dataclass(frozen=True, slots=True)
class Tasks(Message):
    """A batch of tasks for one engine (never more than its prefetch credit)."""

    KIND: ClassVar[str] = "tasks"
    tasks: list[TaskSpec]


@dataclass(frozen=True, slots=True)
class EngineStop(Message):
    """Tells an engine to exit."""

    KIND: ClassVar[str] = "engine_stop"
    reason: str = ""


# streams (any direction) -----------------------------------------------------
@dataclass(frozen=True, slots=True)
class Chunk(Message):
    """Chunk ``index`` of stream ``sid``: its single payload frame holds the bytes (see ``fedpar.wire.streams``)."""

    KIND: ClassVar[str] = "chunk"
    sid: int
    index: int


@dataclass(frozen=True, slots=True)
class Credit(Message):
    """The receiver of stream ``sid`` accepts chunks whose index is below ``upto``."""

    KIND: ClassVar[str] = "credit"
    sid: int
    upto: int


@dataclass(frozen=True, slots=True)
class StreamAbort(Message):
    """Stream ``sid`` is abandoned by whichever end sends this; ``ename`` names a ``fedpar.errors`` class."""

    KIND: ClassVar[str] = "stream_abort"
    sid: int
    ename: str
    evalue: str


# --------------------------------------------------------------------------- decoding
KINDS: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (
        ClientHello, Welcome, Submit, SubmitReply, Results, GetResults, StatusRequest, StatusReply,
        EngineEvent, Shutdown, ShutdownReply, ErrorReply, EngineHello, EngineWelcome, Heartbeat,
        Tasks, EngineStop, QueryTasks, TaskList, PurgeResults, PurgeReply, Chunk, Credit, StreamAbort,
        Abort, AbortReply, MembershipRequest, Membership, EngineMove,
    )
}

_Check = tuple[str, Any, bool]  # field name, checker, required


def _checker(tp: Any) -> Any:
    """Build a function value -> value (converted) that raises MalformedMessage on a type mismatch."""
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = _checker(args[0])
        return lambda v: None if v is None else inner(v)
    if origin is list:
        (item,) = get_args(tp)
        if item in (TaskSpec, ResultSpec):
            conv = item.from_wire

            def check_items(v: Any) -> Any:
                if not isinstance(v, list) or len(v) > MAX_FRAMES:
                    raise MalformedMessage("expected a list of items")
                return [conv(x) for x in v]

            return check_items
        item_check = _checker(item)

        def check_list(v: Any) -> Any:
            if not isinstance(v, list):
                raise MalformedMessage("expected a list")
            for x in v:
                item_check(x)
            return v

        return check_list
    base = origin or tp
    if base is int:
        return lambda v: v if _is_int(v) else _bad("int", v)
    if base is float:
        return lambda v: v if isinstance(v, (int, float)) and not isinstance(v, bool) else _bad("float", v)
    if base is Any:
        return lambda v: v
    return lambda v: v if isinstance(v, base) else _bad(base.__name__, v)


def _bad(expected: str, v: object) -> Any:
    raise MalformedMessage(f"expected {expected}, got {type(v).__name__}")


def _build_checks(cls: type[Message]) -> list[_Check]:
    hints = get_type_hints(cls)
    out: list[_Check] = []
    for f in fields(cls):
        required = f.default is MISSING and f.default_factory is MISSING
        out.append((f.name, _checker(hints[f.name]), required))
    return out


_CHECKS: dict[type[Message], list[_Check]] = {cls: _build_checks(cls) for cls in KINDS.values()}


def message_from_header(header: dict[Any, Any]) -> Message:
    """Build the message object of a decoded header map, checking every field's type."""
    kind = header.get("kind")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MalformedMessage(f"unknown message kind {kind!r}")
    kwargs: dict[str, Any] = {}
    for name, check, required in _CHECKS[cls]:
        if name in header:
            kwargs[name] = check(header[name])
        elif required:
            raise MalformedMessage(f"{kind}: missing field {name!r}")
    return cls(**kwargs)


def payload_frame_count(msg: Message) -> int:
    """How many payload frames a message carries (the sum of its items' ``nframes``)."""
    if isinstance(msg, (Submit, Tasks)):
        return sum(t.nframes for t in msg.tasks)
    if isinstance(msg, Results):
        return sum(r.nframes for r in msg.results)
    if isinstance(msg, Chunk):
        return 1
    return 0
