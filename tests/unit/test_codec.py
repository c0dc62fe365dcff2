"""Tests for fedpar.wire.codec + fedpar.wire.protocol: round trips of every kind, envelope, and every rejection path."""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import msgpack
import pytest
import zmq

from fedpar.errors import MalformedMessage, ProtocolError, ReplayError, SignatureError
from fedpar.wire import protocol
from fedpar.wire.codec import MAX_HEADER_BYTES, Codec, Envelope, Received
from fedpar.wire.payload import dumps
from fedpar.wire.protocol import (
    ENVELOPE_KEYS,
    KINDS,
    PROTOCOL_VERSION,
    ClientHello,
    EngineEvent,
    EngineHello,
    EngineStop,
    EngineWelcome,
    ErrorReply,
    GetResults,
    Heartbeat,
    Message,
    Results,
    ResultSpec,
    Shutdown,
    ShutdownReply,
    StatusReply,
    StatusRequest,
    Submit,
    SubmitReply,
    Tasks,
    TaskSpec,
    Welcome,
    payload_frame_count,
)
from fedpar.wire.signing import MAC_BYTES, Signer

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
EPOCH = 7


@pytest.fixture
def tx() -> Codec:
    return Codec(KEY, "client-1f2e", epoch=EPOCH)


@pytest.fixture
def rx() -> Codec:
    return Codec(KEY, "controller-9a")


def _np_frames() -> list[Any]:
    np = pytest.importorskip("numpy")
    return dumps(np.arange(100_000, dtype="float64"))


def sample_messages() -> list[tuple[Message, list[Any]]]:
    """One realistic message (and its payload frames) of every kind."""
    arr_frames = _np_frames()
    assert len(arr_frames) == 2
    apply_frames = [*dumps(pow), *dumps(((2, 10), {}))]
    submit_tasks = [
        TaskSpec("c1f2e-0", "apply", None, len(apply_frames), 0, {}),
        TaskSpec("c1f2e-1", "execute", 3, 0, 2, {"code": "x = 1\nprint(x)"}),
        TaskSpec("c1f2e-2", "push", None, 4, 0, {"block": True}),
        TaskSpec("c1f2e-3", "pull", 1, 0, 0, {"names": ["a", "b"]}),
    ]
    submit_frames: list[Any] = [
        *apply_frames,
        arr_frames[0], memoryview(arr_frames[1]), bytearray(b"extra buffer"), b"",  # push: 4 frames
    ]
    results = [
        ResultSpec("c1f2e-0", True, 0, 1_700_000_000.25, 1_700_000_001.5, None, 2),
        ResultSpec("c1f2e-1", False, 3, None, 1_700_000_002.0,
                   ["ZeroDivisionError", "division by zero", 'Traceback...\n  File "<x>", line 1\n'], 0),
        ResultSpec("c1f2e-2", True, None, None, 1_700_000_003.0, None, 1),
    ]
    result_frames = [*arr_frames, b""]
    msgs: list[tuple[Message, list[Any]]] = [
        (ClientHello("client-1f2e"), []),
        (Welcome(1, "ctl-0001", [0, 1, 2, 5]), []),
        (Submit(submit_tasks), submit_frames),
        (SubmitReply(2, ["c1f2e-0", "c1f2e-2"], [["c1f2e-1", "UnknownEngineError", "no engine 3"]]), []),
        (Results(results, missing=["c1f2e-9"], reply_to=4), result_frames),
        (GetResults(["c1f2e-0", "c1f2e-9"]), []),
        (StatusRequest(), []),
        (protocol.QueryTasks(["done", "failed"], 1, 10.0, 20.0, 50), []),
        (protocol.TaskList(3, [["t-1", "client:a", "apply", None, "done", 0, 1.0, 1.5, 2.0, 1, 0, {}]]), []),
        (protocol.PurgeResults(["t-1", "t-2"], 12.5, False), []),
        (protocol.PurgeReply(4, 2), []),
        (protocol.Abort(["c1f2e-3", "c1f2e-4"]), []),
        (protocol.AbortReply(6, ["c1f2e-3"]), []),
        (StatusReply(5, "ctl-0001", EPOCH,
                     [{"id": 0, "uuid": "u-1", "host": "node1", "pid": 4242, "load": 2}],
                     3, 4, 100, 1, {"tasks_per_s": 12345.5, "uptime": 60}), []),
        (EngineEvent([3, 4], [1]), []),
        (Shutdown(engines_only=True), []),
        (ShutdownReply(6, [0, 1, 2]), []),
        (ErrorReply(7, "NoEnginesError", "no engines are registered"), []),
        (EngineHello("4b1d-uuid", "node1.example.org", 31337, b"\x00\x8f\xffident"), []),
        (EngineWelcome(1, 5, 1.5, "ctl-0001"), []),
        (Heartbeat(-1), []),
        (Tasks(submit_tasks[:1] + submit_tasks[2:3]), [*apply_frames, *submit_frames[len(apply_frames):]]),
        (EngineStop("controller shutdown"), []),
        (protocol.Chunk(7, 3), [bytes(range(256)) * 4096]),
        (protocol.Credit(7, 11), []),
        (protocol.StreamAbort(7, "StreamTimeout", "no chunk for 30s"), []),
        (protocol.MembershipRequest(), []),
        (protocol.Membership({"live": [["c.1", 2, "tcp://h:1", "tcp://h:2", "h", 7, 1.0, 1.5]], "down": [],
                              "takeovers": [["c.0", 1, "c.1", 1.0, False, 0]]}, reply_to=3), []),
        (protocol.EngineMove("c.2", "tcp://127.0.0.1:5555", "placement"), []),
        (EngineHello("4b1d-uuid", "node1", 31337, b"t:x", ["t-1"], 7, ["c.0", 3], True), []),
    ]
    return msgs


SAMPLES = sample_messages()


def test_samples_cover_every_kind() -> None:
    assert {type(m).KIND for m, _ in SAMPLES} == set(KINDS)
    assert all(KINDS[cls.KIND] is cls for cls in KINDS.values())


@pytest.mark.parametrize(("msg", "frames"), SAMPLES, ids=[type(m).KIND for m, _ in SAMPLES])
def test_round_trip_every_kind(tx: Codec, rx: Codec, msg: Message, frames: list[Any]) -> None:
    assert payload_frame_count(msg) == len(frames)
    parts, rid = tx.encode(msg, frames)
    assert parts[0] == b""
    assert len(parts[1]) == MAC_BYTES
    assert len(parts) == 3 + len(frames)
    got = rx.decode(parts)
    assert isinstance(got, Received)
    assert type(got.msg) is type(msg)
    assert got.msg == msg
    assert got.envelope.kind == msg.KIND
    assert got.envelope.id == rid
    # payload frames pass through untouched (same objects, same bytes)
    assert len(got.frames) == len(frames)
    for a, b in zip(got.frames, frames, strict=True):
        assert a is b
        assert bytes(a) == bytes(b)


def test_decoded_items_are_namedtuples(tx: Codec, rx: Codec) -> None:
    msg, frames = next((m, f) for m, f in SAMPLES if isinstance(m, Submit))
    got = rx.decode(tx.encode(msg, frames)[0]).msg
    assert isinstance(got, Submit)
    assert all(isinstance(t, TaskSpec) for t in got.tasks)
    assert got.tasks[1].spec == {"code": "x = 1\nprint(x)"}
    assert got.tasks[0].target is None and got.tasks[1].target == 3
    msg, frames = next((m, f) for m, f in SAMPLES if isinstance(m, Results))
    res = rx.decode(tx.encode(msg, frames)[0]).msg
    assert isinstance(res, Results)
    assert all(isinstance(r, ResultSpec) for r in res.results)
    assert res.results[1].error == msg.results[1].error
    assert res.missing == ["c1f2e-9"] and res.reply_to == 4


def test_results_defaults_fill_in(tx: Codec, rx: Codec) -> None:
    got = rx.decode(tx.encode(Results([]))[0]).msg
    assert got == Results([], [], 0)


def test_envelope_fields(tx: Codec, rx: Codec) -> None:
    before = time.time()
    envs: list[Envelope] = []
    for i in range(5):
        parts, rid = tx.encode(Heartbeat(i))
        envs.append(rx.decode(parts).envelope)
        assert envs[-1].id == rid
    after = time.time()
    assert [e.seq for e in envs] == [1, 2, 3, 4, 5]
    assert [e.id for e in envs] == [1, 2, 3, 4, 5]
    for e in envs:
        assert e.sender == "client-1f2e"
        assert e.epoch == EPOCH
        assert e.kind == "heartbeat"
        assert before <= e.ts <= after
    assert rx.guard.mark("client-1f2e") == 5


def test_two_senders_have_independent_sequences(rx: Codec) -> None:
    a, b = Codec(KEY, "a"), Codec(KEY, "b")
    for _ in range(3):
        rx.decode(a.encode(Heartbeat(0))[0])
    rx.decode(b.encode(Heartbeat(0))[0])  # b's seq 1 is fine although a is at 3
    assert rx.guard.marks() == {"a": 3, "b": 1}


def test_decode_with_routing_id_first(tx: Codec, rx: Codec) -> None:
    msg, frames = next((m, f) for m, f in SAMPLES if isinstance(m, Results))
    parts, _ = tx.encode(msg, frames)
    got = rx.decode([b"routing-id", *parts], start=1)
    assert got.msg == msg
    assert [bytes(f) for f in got.frames] == [bytes(f) for f in frames]
    got2 = rx.decode([b"proxy", b"routing-id", *tx.encode(msg, frames)[0]], start=2)
    assert got2.msg == msg


def test_decode_accepts_memoryview_and_bytearray_parts(tx: Codec, rx: Codec) -> None:
    parts, _ = tx.encode(EngineWelcome(3, 9, 2.0, "ctl"), [])
    got = rx.decode([memoryview(parts[0]), bytearray(parts[1]), memoryview(parts[2])])
    assert got.msg == EngineWelcome(3, 9, 2.0, "ctl")


def test_round_trip_over_zmq_inproc(tx: Codec, rx: Codec) -> None:
    """Real zmq.Frame parts (copy=False) from a ROUTER: routing id first, buffers not copied."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    try:
        router.linger = dealer.linger = 0
        router.bind("inproc://fedpar-test-codec")
        dealer.connect("inproc://fedpar-test-codec")
        msg, frames = next((m, f) for m, f in SAMPLES if isinstance(m, Submit))
        parts, _ = tx.encode(msg, frames)
        dealer.send_multipart(parts, copy=False)
        assert router.poll(5000)
        got_parts = router.recv_multipart(copy=False)
        assert len(got_parts) == 1 + len(parts)
        got = rx.decode(got_parts, start=1)
        assert got.msg == msg
        assert [bytes(f) for f in got.frames] == [bytes(f) for f in frames]
    finally:
        dealer.close()
        router.close()


# --------------------------------------------------------------------------- crafted messages
_seq = itertools.count(1)


def head(kind: str = "heartbeat", **fields: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": kind, "id": 1, "sender": "eng-1",
                         "seq": next(_seq), "ts": time.time(), "epoch": 0}
    if kind == "heartbeat" and "engine_id" not in fields:
        fields["engine_id"] = 0
    h.update(fields)
    return h


def signed(header: Any, frames: list[Any] = (), key: bytes = KEY) -> list[Any]:  # type: ignore[assignment]
    raw = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    return [b"", Signer(key).sign(raw, frames), raw, *frames]


def test_crafted_valid_message_decodes(rx: Codec) -> None:
    got = rx.decode(signed(head(engine_id=12)))
    assert got.msg == Heartbeat(12)
    assert got.envelope.sender == "eng-1"


def test_unknown_extra_header_fields_are_ignored(rx: Codec) -> None:
    assert rx.decode(signed(head(engine_id=1, future_field=[1, 2]))).msg == Heartbeat(1)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_rejects_too_few_parts(rx: Codec, n: int) -> None:
    parts = signed(head())[:n]
    with pytest.raises(MalformedMessage, match="parts"):
        rx.decode(parts)
    with pytest.raises(MalformedMessage):
        rx.decode([b"routing", *parts], start=1)


def test_rejects_too_few_parts_after_start(rx: Codec) -> None:
    parts = signed(head())
    with pytest.raises(MalformedMessage):
        rx.decode(parts, start=1)


def test_rejects_missing_delimiter(rx: Codec) -> None:
    parts = signed(head())
    with pytest.raises(MalformedMessage, match="delimiter"):
        rx.decode([b"x", *parts[1:]])
    with pytest.raises(MalformedMessage, match="delimiter"):
        rx.decode([*parts[1:], b""])  # delimiter dropped, everything shifted
    # routing id given but start not passed: the id is taken for the delimiter
    with pytest.raises(MalformedMessage, match="delimiter"):
        rx.decode([b"routing-id", *parts])


@pytest.mark.parametrize("length", [0, 1, MAC_BYTES - 1, MAC_BYTES + 1, 64])
def test_rejects_mac_of_wrong_length(rx: Codec, length: int) -> None:
    parts = signed(head())
    parts[1] = (parts[1] * 2)[:length]
    with pytest.raises(ProtocolError):
        rx.decode(parts)


def test_rejects_oversized_header(rx: Codec) -> None:
    raw = msgpack.packb(head(pad="x" * MAX_HEADER_BYTES), use_bin_type=True)
    with pytest.raises(MalformedMessage, match="exceeds"):
        rx.decode(signed(raw))


@pytest.mark.parametrize(
    "raw",
    [b"\xc1", b"\x92\x01", b"\x81\xa1k", b"\x01\x02", b"", b"\xdb\xff\xff\xff\xff"],
    ids=["reserved-byte", "truncated-array", "truncated-map", "extra-data", "empty", "huge-str"],
)
def test_rejects_signed_header_that_is_not_msgpack(rx: Codec, raw: bytes) -> None:
    with pytest.raises(MalformedMessage, match="msgpack"):
        rx.decode(signed(raw))


@pytest.mark.parametrize("value", [[1, 2, 3], "heartbeat", 42, None, b"\x00"])
def test_rejects_header_that_is_not_a_map(rx: Codec, value: Any) -> None:
    with pytest.raises(MalformedMessage, match="not a map"):
        rx.decode(signed(msgpack.packb(value, use_bin_type=True)))


def test_rejects_non_string_map_keys(rx: Codec) -> None:
    raw = msgpack.packb({1: "x", **head()}, use_bin_type=True)
    with pytest.raises(MalformedMessage):
        rx.decode(signed(raw))


@pytest.mark.parametrize("key", ENVELOPE_KEYS)
def test_rejects_missing_envelope_field(rx: Codec, key: str) -> None:
    h = head()
    del h[key]
    with pytest.raises(MalformedMessage, match=repr(key)):
        rx.decode(signed(h))


@pytest.mark.parametrize("v", [0, 2, PROTOCOL_VERSION + 1, "1", None])
def test_rejects_wrong_protocol_version(rx: Codec, v: Any) -> None:
    with pytest.raises(MalformedMessage, match="protocol version"):
        rx.decode(signed(head(v=v)))


@pytest.mark.parametrize(
    "fields",
    [
        {"seq": 0}, {"seq": -5}, {"seq": True}, {"seq": 1.5}, {"seq": "3"},
        {"sender": ""}, {"sender": "s" * 257}, {"sender": 5}, {"sender": b"eng"},
        {"ts": "now"}, {"ts": None}, {"epoch": "0"}, {"epoch": 1.0}, {"id": "1"}, {"kind": 3},
    ],
    ids=lambda f: "-".join(f"{k}={v!r}"[:20] for k, v in f.items()),
)
def test_rejects_envelope_fields_of_wrong_type(rx: Codec, fields: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessage):
        rx.decode(signed(head(**fields)))


def test_sender_of_256_chars_is_accepted(rx: Codec) -> None:
    assert rx.decode(signed(head(sender="s" * 256))).envelope.sender == "s" * 256


@pytest.mark.parametrize("kind", ["nope", "", "Heartbeat", "HEARTBEAT", "message"])
def test_rejects_unknown_kind(rx: Codec, kind: str) -> None:
    with pytest.raises(MalformedMessage, match="unknown message kind"):
        rx.decode(signed(head(kind=kind)))


GOOD_TASK = ["t-1", "apply", None, 0, 0, {}]
GOOD_RESULT = ["t-1", True, 0, 1.0, 2.0, None, 0]


def _task(**change: Any) -> list[Any]:
    names = ["task_id", "op", "target", "nframes", "retries", "spec"]
    return [change.get(n, v) for n, v in zip(names, GOOD_TASK, strict=True)]


def _result(**change: Any) -> list[Any]:
    names = ["task_id", "ok", "engine", "started", "completed", "error", "nframes"]
    return [change.get(n, v) for n, v in zip(names, GOOD_RESULT, strict=True)]


BAD_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("submit", {"tasks": "t-1"}),
    ("submit", {"tasks": {"t-1": GOOD_TASK}}),
    ("submit", {"tasks": None}),
    ("submit", {"tasks": [GOOD_TASK[:5]]}),
    ("submit", {"tasks": [[*GOOD_TASK, 1]]}),
    ("submit", {"tasks": [tuple(GOOD_TASK)[:0]]}),
    ("submit", {"tasks": ["t-1"]}),
    ("submit", {"tasks": [_task(nframes=-1)]}),
    ("submit", {"tasks": [_task(nframes=(1 << 16) + 1)]}),
    ("submit", {"tasks": [_task(nframes=1.0)]}),
    ("submit", {"tasks": [_task(nframes=True)]}),
    ("submit", {"tasks": [_task(task_id="t\x00-1")]}),
    ("submit", {"tasks": [_task(task_id="")]}),
    ("submit", {"tasks": [_task(task_id="t" * 257)]}),
    ("submit", {"tasks": [_task(task_id=7)]}),
    ("submit", {"tasks": [_task(op=None)]}),
    ("submit", {"tasks": [_task(target="0")]}),
    ("submit", {"tasks": [_task(target=False)]}),
    ("submit", {"tasks": [_task(retries=-1)]}),
    ("submit", {"tasks": [_task(retries=1001)]}),
    ("submit", {"tasks": [_task(spec=[])]}),
    ("submit", {"tasks": [GOOD_TASK, _task(task_id=None)]}),
    ("submit", {}),
    ("tasks", {"tasks": [_task(nframes=-3)]}),
    ("results", {"results": [_result(ok=1)]}),
    ("results", {"results": [_result(engine="0")]}),
    ("results", {"results": [_result(started="x")]}),
    ("results", {"results": [_result(completed=None)]}),
    ("results", {"results": [_result(error=["A", "b"])]}),
    ("results", {"results": [_result(error=["A", "b", 3])]}),
    ("results", {"results": [_result(error="boom")]}),
    ("results", {"results": [_result(nframes=-1)]}),
    ("results", {"results": [_result(task_id="")]}),
    ("results", {"results": [GOOD_RESULT[:6]]}),
    ("results", {"results": [GOOD_RESULT], "missing": "t-2"}),
    ("results", {"results": [GOOD_RESULT], "missing": [2]}),
    ("results", {"results": [GOOD_RESULT], "reply_to": "1"}),
    ("welcome", {"reply_to": 1, "controller": "c", "engines": ["0"]}),
    ("welcome", {"reply_to": 1, "controller": "c", "engines": [True]}),
    ("welcome", {"reply_to": 1, "controller": "c"}),
    ("welcome", {"reply_to": 1.0, "controller": "c", "engines": []}),
    ("submit_reply", {"reply_to": 1, "accepted": [], "rejected": ["t-1"]}),
    ("submit_reply", {"reply_to": 1, "accepted": [], "rejected": [[1, 2, 3]]}),
    ("get_results", {"task_ids": "t-1"}),
    ("status_reply", {"reply_to": 1, "controller": "c", "epoch": 0, "engines": [[]], "queued": 0,
                      "in_flight": 0, "done": 0, "failed": 0, "stats": {}}),
    ("status_reply", {"reply_to": 1, "controller": "c", "epoch": 0, "engines": [], "queued": 0,
                      "in_flight": 0, "done": 0, "failed": 0, "stats": []}),
    ("shutdown", {"engines_only": 1}),
    ("engine_hello", {"uuid": "u", "hostname": "h", "pid": 1, "task_identity": "ident"}),
    ("engine_hello", {"uuid": "u", "hostname": "h", "pid": "1", "task_identity": b"ident"}),
    ("engine_welcome", {"reply_to": 1, "engine_id": 0, "heartbeat": "1", "controller": "c"}),
    ("engine_welcome", {"reply_to": 1, "engine_id": 0, "heartbeat": True, "controller": "c"}),
    ("heartbeat", {"engine_id": "3"}),
    ("heartbeat", {"engine_id": None}),
    ("heartbeat", {"engine_id": 2.5}),
    ("engine_event", {"registered": [1], "unregistered": None}),
    ("error_reply", {"reply_to": 1, "ename": None, "evalue": "x"}),
    ("engine_stop", {"reason": 3}),
]


@pytest.mark.parametrize(("kind", "fields"), BAD_FIELDS,
                         ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD_FIELDS)])
def test_rejects_fields_of_wrong_type(rx: Codec, kind: str, fields: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessage):
        rx.decode(signed(head(kind=kind, **fields)))


def test_boundary_field_values_are_accepted(rx: Codec) -> None:
    t = _task(task_id="t" * 256, nframes=0, retries=1000, target=-1)
    got = rx.decode(signed(head(kind="submit", tasks=[t]))).msg
    assert got == Submit([TaskSpec(*t)])
    ok = rx.decode(signed(head(kind="engine_welcome", reply_to=1, engine_id=0, heartbeat=2,
                                controller="c"))).msg
    assert ok == EngineWelcome(1, 0, 2, "c")


@pytest.mark.parametrize("nframes_declared, nframes_sent", [(0, 1), (1, 0), (2, 1), (2, 3), (3, 0)])
def test_rejects_frame_count_mismatch(rx: Codec, nframes_declared: int, nframes_sent: int) -> None:
    h = head(kind="submit", tasks=[_task(nframes=nframes_declared)])
    frames = [b"f%d" % i for i in range(nframes_sent)]
    with pytest.raises(MalformedMessage, match="payload frames"):
        rx.decode(signed(h, frames))


def test_rejects_frames_on_a_kind_without_payload(rx: Codec) -> None:
    with pytest.raises(MalformedMessage, match="payload frames"):
        rx.decode(signed(head(engine_id=3), [b"unexpected"]))


def test_frame_count_sums_over_items(rx: Codec) -> None:
    h = head(kind="results", results=[_result(task_id="a", nframes=2), _result(task_id="b", nframes=0),
                                      _result(task_id="c", nframes=3)])
    frames = [b"%d" % i for i in range(5)]
    got = rx.decode(signed(h, frames))
    assert [bytes(f) for f in got.frames] == frames
    with pytest.raises(MalformedMessage):
        rx.decode(signed(head(kind="results", results=h["results"]), frames[:4]))


def test_rejects_replayed_message(tx: Codec, rx: Codec) -> None:
    msg, frames = next((m, f) for m, f in SAMPLES if isinstance(m, Submit))
    parts, _ = tx.encode(msg, frames)
    rx.decode(parts)
    with pytest.raises(ReplayError):
        rx.decode(parts)
    with pytest.raises(ReplayError):
        rx.decode([b"other-route", *parts], start=1)


def test_rejects_older_message_after_newer(tx: Codec, rx: Codec) -> None:
    old, _ = tx.encode(Heartbeat(0))
    new, _ = tx.encode(Heartbeat(0))
    rx.decode(new)
    with pytest.raises(ReplayError):
        rx.decode(old)


def test_seeded_marks_reject_replays_after_restart(tx: Codec, rx: Codec) -> None:
    parts, _ = tx.encode(Heartbeat(0))
    rx.decode(parts)
    restarted = Codec(KEY, "controller-9a", marks=rx.guard.marks())
    with pytest.raises(ReplayError):
        restarted.decode(parts)
    restarted.decode(tx.encode(Heartbeat(0))[0])


@pytest.mark.parametrize("offset", [-3600.0, 3600.0])
def test_rejects_timestamp_outside_window(offset: float) -> None:
    rx = Codec(KEY, "ctl", replay_window=60.0)
    with pytest.raises(ReplayError, match="window"):
        rx.decode(signed(head(ts=time.time() + offset)))


def test_rejects_nan_timestamp(rx: Codec) -> None:
    with pytest.raises(ReplayError):
        rx.decode(signed(head(ts=math.nan)))


def test_rejects_message_signed_with_another_key(rx: Codec) -> None:
    other = Codec(OTHER_KEY, "intruder")
    parts, _ = other.encode(Shutdown())
    with pytest.raises(SignatureError):
        rx.decode(parts)
    assert rx.guard.marks() == {}


def test_rejects_tampered_payload_frame(tx: Codec, rx: Codec) -> None:
    msg, frames = next((m, f) for m, f in SAMPLES if isinstance(m, Results))
    parts, _ = tx.encode(msg, frames)
    for i in range(3, len(parts)):
        if not len(parts[i]):
            continue
        bad = list(parts)
        b = bytearray(bad[i])
        b[len(b) // 2] ^= 0x40
        bad[i] = bytes(b)
        with pytest.raises(SignatureError):
            rx.decode(bad)
    rx.decode(parts)  # the original still passes: the failures did not consume its seq


def test_rejects_tampered_header(tx: Codec, rx: Codec) -> None:
    parts, _ = tx.encode(Shutdown(engines_only=True))
    header = bytes(parts[2])
    forged = header.replace(b"\xc3", b"\xc2")  # engines_only True -> False
    assert forged != header
    with pytest.raises(SignatureError):
        rx.decode([parts[0], parts[1], forged])


def test_rejects_moved_frame_boundary(tx: Codec, rx: Codec) -> None:
    parts, _ = tx.encode(Results([ResultSpec("t", True, 0, None, 1.0, None, 2)]), [b"abcd", b"efgh"])
    with pytest.raises(SignatureError):
        rx.decode([*parts[:3], b"abc", b"defgh"])


@pytest.mark.parametrize(
    "raw", [b"\xc1garbage", b"", msgpack.packb([1, 2]), msgpack.packb({"v": 1})],
    ids=["garbage", "empty", "array", "partial-map"],
)
def test_mac_is_checked_before_decoding(rx: Codec, raw: bytes) -> None:
    """A header that would be malformed, sent with a bad MAC, is a SignatureError (not decoded)."""
    with pytest.raises(SignatureError):
        rx.decode([b"", b"\x00" * MAC_BYTES, raw])
    with pytest.raises(SignatureError):
        rx.decode(signed(raw, key=OTHER_KEY))


def test_mac_is_checked_before_replay_and_frame_count(rx: Codec) -> None:
    h = head(kind="submit", tasks=[_task(nframes=2)], ts=0.0)  # stale ts AND wrong frame count
    with pytest.raises(SignatureError):
        rx.decode(signed(h, [b"one"], key=OTHER_KEY))


def test_every_error_is_a_protocol_error() -> None:
    for cls in (MalformedMessage, SignatureError, ReplayError):
        assert issubclass(cls, ProtocolError)


def test_message_from_header_missing_required_field() -> None:
    with pytest.raises(MalformedMessage, match="missing field 'engine_id'"):
        protocol.message_from_header({"kind": "heartbeat"})
    assert protocol.message_from_header({"kind": "status_request"}) == StatusRequest()
    assert protocol.message_from_header({"kind": "shutdown"}) == Shutdown(False)


def test_no_message_field_collides_with_an_envelope_key_except_known() -> None:
    from dataclasses import fields

    clashes = {(cls.KIND, f.name) for cls in KINDS.values() for f in fields(cls) if f.name in ENVELOPE_KEYS}
    assert clashes == set()


def test_status_reply_epoch_survives_round_trip(rx: Codec) -> None:
    tx = Codec(KEY, "ctl-1", epoch=3)
    msg = StatusReply(1, "ctl-1", 4, [], 0, 0, 0, 0, {})
    assert rx.decode(tx.encode(msg)[0]).msg == msg


# --------------------------------------------------------------------------- task ids vs the store
def _store_accepts(task_id: str) -> bool:
    from fedpar.store.schema import task_key

    try:
        task_key(task_id)
    except ValueError:
        return False
    return True


def test_task_ids_the_protocol_accepts_are_storable() -> None:
    for tid in ["c1f2e-0", "t" * 256, "é" * 128, "ü-" + "x" * 200]:
        TaskSpec.from_wire(_task(task_id=tid))
        assert _store_accepts(tid)


def test_multibyte_task_id_rejected_by_protocol_or_accepted_by_store() -> None:
    tid = "\U0001f600" * 256  # 256 characters, 1024 utf-8 bytes
    try:
        TaskSpec.from_wire(_task(task_id=tid))
    except MalformedMessage:
        return
    assert _store_accepts(tid)


def test_result_task_id_with_nul_is_rejected(rx: Codec) -> None:
    with pytest.raises(MalformedMessage):
        rx.decode(signed(head(kind="results", results=[_result(task_id="t\x00-1")])))


@pytest.mark.parametrize("tid", ["t\x00-1", "", "t" * 600])
def test_get_results_task_ids_are_validated(rx: Codec, tid: str) -> None:
    with pytest.raises(MalformedMessage):
        rx.decode(signed(head(kind="get_results", task_ids=[tid])))


# --------------------------------------------------------------------------- packed small frames
def test_small_frames_travel_packed_and_come_back_apart() -> None:
    from fedpar.wire.codec import PACK_FRAME_LIMIT

    tx, rx_ = Codec(KEY, "packer"), Codec(KEY, "unpacker")
    frames = [b"a", b"", b"bc" * 10, bytearray(b"xyz"), memoryview(b"m" * 100)]
    msg = Results([ResultSpec(f"t-{i}", True, 0, 1.0, 2.0, None, 1) for i in range(len(frames))])
    parts, _ = tx.encode(msg, frames)
    assert len(parts) == 3 + 1  # delimiter, MAC, header, one packed part
    got = rx_.decode(parts)
    assert [bytes(f) for f in got.frames] == [bytes(f) for f in frames]
    big = [b"x" * (PACK_FRAME_LIMIT + 1), b"y"]
    parts, _ = tx.encode(Results([ResultSpec("t-b", True, 0, 1.0, 2.0, None, 2)]), big)
    assert len(parts) == 3 + 2  # a big frame: nothing packed
    assert [bytes(f) for f in rx_.decode(parts).frames] == big


@pytest.mark.parametrize("table", [[1, 1], "12", [1, -1, 3], [True, 1], [1] * 3 + [0]])
def test_bad_packed_table_is_rejected(table: Any) -> None:
    signer = Codec(KEY, "x").signer
    header = msgpack.packb({"v": 1, "kind": "results", "id": 1, "sender": "evil", "seq": 1, "ts": time.time(),
                            "epoch": 0, "pk": table, "results": [["t-1", True, 0, 1.0, 2.0, None, 1],
                                                                  ["t-2", True, 0, 1.0, 2.0, None, 1]]})
    payload = [b"abc"]
    with pytest.raises(MalformedMessage):
        Codec(KEY, "rx").decode([b"", signer.sign(header, payload), header, *payload])


@pytest.mark.parametrize("bad", ["", "x" * 257, "a\x00b"])
def test_task_id_lists_are_checked(bad: str) -> None:
    """Requests naming tasks (get_results, abort) refuse ids the store could not hold."""
    for cls in (GetResults, protocol.Abort):
        with pytest.raises(MalformedMessage):
            cls(["ok-1", bad])
