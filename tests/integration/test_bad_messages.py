"""Hostile and broken input on the controller's sockets: every bad message is counted by class, dropped
without a reply, and the controller keeps serving normal clients.

Raw zmq DEALER sockets talk to the endpoints of ``cluster.info``; valid messages are built with
``fedpar.wire.codec.Codec`` and hand-made ones are signed with its ``signer``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from procutil import assert_no_procs

import fedpar
from fedpar.wire.codec import Codec
from fedpar.wire.protocol import (
    PROTOCOL_VERSION,
    ClientHello,
    EngineStop,
    ErrorReply,
    GetResults,
    Heartbeat,
    Results,
    ResultSpec,
    StatusReply,
    StatusRequest,
    Submit,
    SubmitReply,
    TaskSpec,
    Welcome,
)

pytestmark = pytest.mark.timeout(60)

_counter = iter(range(1, 10**9))


def sender(tag: str) -> str:
    return f"client:evil-{tag}-{os.getpid()}-{next(_counter)}"


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def zctx() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.term()


class Raw:
    """Opens raw DEALER sockets to the controller; all closed at teardown."""

    def __init__(self, ctx: zmq.Context[Any], info: Any):
        self.ctx, self.info = ctx, info
        self.socks: list[zmq.Socket[Any]] = []

    def dealer(self, endpoint: str | None = None) -> zmq.Socket[Any]:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint or self.info.client_endpoint)
        self.socks.append(s)
        return s

    def engine_dealer(self) -> zmq.Socket[Any]:
        return self.dealer(self.info.engine_endpoint)

    def close(self) -> None:
        for s in self.socks:
            s.close(0)


@pytest.fixture
def raw(zctx, cluster) -> Iterator[Raw]:
    r = Raw(zctx, cluster.info)
    yield r
    r.close()


@pytest.fixture
def key(cluster) -> bytes:
    return cluster.info.key


def signed(key: bytes, header: bytes, frames: list[bytes] | tuple[bytes, ...] = ()) -> list[bytes]:
    """A correctly signed message around an arbitrary header."""
    mac = Codec(key, "client:signer").signer.sign(header, list(frames))
    return [b"", mac, header, *frames]


def head(kind: str, who: str, seq: int = 1, ts: float | None = None, **fields: Any) -> dict[str, Any]:
    h = {"v": PROTOCOL_VERSION, "kind": kind, "id": seq, "sender": who, "seq": seq,
         "ts": time.time() if ts is None else ts, "epoch": 0}
    h.update(fields)
    return h


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def dropped(client: fedpar.Client) -> dict[str, int]:
    return dict(client.status()["dropped"])


def expect_drops(client: fedpar.Client, before: dict[str, int], expected: dict[str, int],
                 timeout: float = 5.0) -> None:
    """Wait until the drop counters moved by exactly ``expected`` (by error class name)."""
    deadline = time.monotonic() + timeout
    while True:
        now = dropped(client)
        delta = {k: now.get(k, 0) - before.get(k, 0) for k in set(now) | set(before)}
        delta = {k: v for k, v in delta.items() if v}
        if all(delta.get(k, 0) >= v for k, v in expected.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    time.sleep(0.1)  # anything counted twice would show up now
    now = dropped(client)
    delta = {k: now.get(k, 0) - before.get(k, 0) for k in set(now) | set(before)}
    assert {k: v for k, v in delta.items() if v} == expected


def assert_serving(client: fedpar.Client) -> None:
    st = client.status()
    assert len(st["engines"]) == 2
    assert client.load_balanced_view().apply_sync(lambda x: x + 1, 1) == 2
    assert len(client[:].apply_sync(os.getpid)) == 2


def no_reply(sock: zmq.Socket[Any], ms: int = 300) -> bool:
    return sock.poll(ms) == 0


def recv_reply(sock: zmq.Socket[Any], key: bytes, timeout_ms: int = 5000) -> Any:
    assert sock.poll(timeout_ms), "no reply from the controller"
    return Codec(key, "client:reader").decode(sock.recv_multipart()).msg


# ------------------------------------------------------------------------------------------ tests


def test_valid_raw_message_gets_a_reply(raw, key, client):
    """Sanity check of the helpers: a well-formed raw request is answered."""
    s = raw.dealer()
    parts, rid = Codec(key, sender("ok")).encode(StatusRequest())
    s.send_multipart(parts)
    reply = recv_reply(s, key)
    assert isinstance(reply, StatusReply) and reply.reply_to == rid
    hand = signed(key, packb(head("status_request", sender("hand"), seq=7)))
    s.send_multipart(hand)
    assert isinstance(recv_reply(s, key), StatusReply)


def test_garbage_frames(raw, client):
    before = dropped(client)
    s = raw.dealer()
    s.send_multipart([b"garbage"])                                     # too few parts
    s.send_multipart([os.urandom(64)])
    s.send_multipart([os.urandom(1), os.urandom(2)])
    s.send_multipart([b"x", os.urandom(32), b"header"])                # no empty delimiter
    s.send_multipart([b"", b"short-mac", b"header"])                   # MAC of the wrong size
    s.send_multipart([b"", os.urandom(32), os.urandom(100)])           # random MAC
    s.send_multipart([b"", os.urandom(32), os.urandom(100), os.urandom(5000), b""])
    s.send_multipart([b"", b"", b""])
    expect_drops(client, before, {"MalformedMessage": 6, "SignatureError": 2})
    assert no_reply(s)
    assert_serving(client)


def test_wrong_mac_and_tampering(raw, key, client):
    before = dropped(client)
    s = raw.dealer()
    codec = Codec(key, sender("mac"))
    parts, _ = codec.encode(StatusRequest())
    good = list(parts)

    bad_mac = list(good)
    bad_mac[1] = bytes([good[1][0] ^ 1]) + good[1][1:]
    s.send_multipart(bad_mac)

    bad_header = list(good)
    bad_header[2] = good[2].replace(b"status_request", b"status_requesu")
    s.send_multipart(bad_header)

    # payload frames are signed too: change one byte of one frame of a Submit
    spec = TaskSpec(f"tamper-{os.getpid()}", "apply", None, 2, 0, {})
    sub, _ = codec.encode(Submit([spec]), [b"function", b"arguments"])
    tampered = list(sub)
    tampered[-1] = b"argumentz"
    s.send_multipart(tampered)

    # a MAC over the header alone (payload frames unsigned, as ipyparallel does) is refused
    header_only = [b"", Codec(key, "x").signer.sign(sub[2], []), sub[2], *sub[3:]]
    s.send_multipart(header_only)

    expect_drops(client, before, {"SignatureError": 4})
    assert no_reply(s)
    # the rejected copies did not move the sender's replay mark: the genuine message is still accepted
    s.send_multipart(good)
    assert isinstance(recv_reply(s, key), StatusReply)
    with pytest.raises(fedpar.ResultNotFound):
        client.get_result(spec.task_id, block=True, timeout=10)
    assert_serving(client)


def test_message_signed_with_another_key(raw, client, key):
    before = dropped(client)
    s = raw.dealer()
    other = Codec(os.urandom(32), sender("otherkey"))
    for msg in (StatusRequest(), ClientHello("intruder"), GetResults(["x"])):
        s.send_multipart(other.encode(msg)[0])
    spec = TaskSpec(f"otherkey-{os.getpid()}", "apply", None, 1, 0, {})
    s.send_multipart(other.encode(Submit([spec]), [b"payload"])[0])
    # and on the engine socket: an engine with the wrong key cannot register
    e = raw.engine_dealer()
    hello_codec = Codec(os.urandom(32), "engine:intruder:t")
    from fedpar.wire.protocol import EngineHello

    e.send_multipart(hello_codec.encode(EngineHello("intruder", "evil-host", 1, b"t:intruder"))[0])
    expect_drops(client, before, {"SignatureError": 5})
    assert no_reply(s) and no_reply(e, 100)
    assert len(client.status()["engines"]) == 2
    with pytest.raises(fedpar.ResultNotFound):
        client.get_result(spec.task_id, block=True, timeout=10)
    assert_serving(client)


def test_signed_but_malformed_headers(raw, key, client):
    before = dropped(client)
    s = raw.dealer()
    ok = head("status_request", sender("mal"))
    headers = [
        b"\xc1",                                                    # not msgpack
        packb(ok)[:-3],                                             # truncated
        packb([1, 2, 3]),                                           # not a map
        packb("status_request"),
        packb({1: 2, "kind": "status_request"}),                   # non-string key
        packb({"kind": "status_request"}),                         # no envelope
        packb({k: v for k, v in ok.items() if k != "ts"}),         # envelope field missing
        packb({**ok, "v": 99}),                                     # unknown protocol version
        packb({**ok, "seq": "1"}),                                  # wrong type
        packb({**ok, "seq": 0}),                                    # out of range
        packb({**ok, "seq": True}),
        packb({**ok, "sender": ""}),
        packb({**ok, "sender": "x" * 1000}),
        packb({**ok, "ts": "yesterday"}),
        packb({**ok, "kind": None}),
        packb(head("get_results", sender("mal"), task_ids="not-a-list")),
        packb(head("get_results", sender("mal"), task_ids=[1, 2])),
        packb(head("get_results", sender("mal"))),                 # required field missing
        packb(head("submit", sender("mal"), tasks=[["only", "five", None, 0, 0]])),
        packb(head("submit", sender("mal"), tasks=[["t", "apply", None, -1, 0, {}]])),
        packb(head("submit", sender("mal"), tasks=[["t\x00", "apply", None, 0, 0, {}]])),
        packb(head("submit", sender("mal"), tasks=[["t", "apply", "engine-0", 0, 0, {}]])),
        packb(head("shutdown", sender("mal"), engines_only="yes")),
        b"\x91" * 20000 + b"\xc0",                                  # 20000 nested arrays
    ]
    for h in headers:
        s.send_multipart(signed(key, h))
    expect_drops(client, before, {"MalformedMessage": len(headers)})
    assert no_reply(s)
    assert_serving(client)  # in particular the Shutdown above did not stop anything


def test_replay_is_rejected(raw, key, client):
    s = raw.dealer()
    codec = Codec(key, "client:evil")
    parts, rid = codec.encode(StatusRequest())
    captured = [bytes(p) for p in parts]

    before = dropped(client)
    s.send_multipart(captured)
    reply = recv_reply(s, key)
    assert isinstance(reply, StatusReply) and reply.reply_to == rid
    s.send_multipart(captured)  # the exact same bytes again
    expect_drops(client, before, {"ReplayError": 1})
    assert no_reply(s)

    # replayed from another connection (another zmq identity): still a replay
    s2 = raw.dealer()
    s2.send_multipart(captured)
    expect_drops(client, before, {"ReplayError": 2})
    assert no_reply(s2)

    # an older sequence number than one already seen, genuinely signed
    newer, _ = codec.encode(StatusRequest())
    older = [bytes(p) for p in parts]
    s.send_multipart(newer)
    assert isinstance(recv_reply(s, key), StatusReply)
    s.send_multipart(older)
    expect_drops(client, before, {"ReplayError": 3})

    # timestamps outside the replay window (default 300 s), correctly signed
    for i, ts in enumerate((time.time() - 3600, time.time() + 3600)):
        s.send_multipart(signed(key, packb(head("status_request", sender("ts"), seq=i + 1, ts=ts))))
    expect_drops(client, before, {"ReplayError": 5})
    assert no_reply(s)
    assert_serving(client)


# Regression: abs(now - nan) > window is False, so NaN used to pass the replay window.
def test_non_finite_timestamps_are_rejected(raw, key, client):
    before = dropped(client)
    s = raw.dealer()
    for ts in (float("nan"), float("inf"), float("-inf")):
        s.send_multipart(signed(key, packb(head("status_request", sender("nan"), ts=ts))))
    expect_drops(client, before, {"ReplayError": 3})
    assert no_reply(s)
    assert_serving(client)


def test_submit_with_frame_count_mismatch(raw, key, client):
    before = dropped(client)
    s = raw.dealer()
    codec = Codec(key, sender("frames"))
    tid = f"frames-{os.getpid()}"
    more = Submit([TaskSpec(tid + "-a", "apply", None, 3, 0, {})])
    s.send_multipart(codec.encode(more, [b"only one frame"])[0])
    fewer = Submit([TaskSpec(tid + "-b", "apply", None, 0, 0, {})])
    s.send_multipart(codec.encode(fewer, [b"unexpected", b"frames"])[0])
    split = Submit([TaskSpec(tid + "-c", "apply", None, 2, 0, {}), TaskSpec(tid + "-d", "apply", None, 2, 0, {})])
    s.send_multipart(codec.encode(split, [b"1", b"2", b"3"])[0])
    expect_drops(client, before, {"MalformedMessage": 3})
    assert no_reply(s)
    for suffix in "abcd":
        with pytest.raises(fedpar.ResultNotFound):
            client.get_result(f"{tid}-{suffix}", block=True, timeout=10)
    assert client.status()["queued"] == 0
    assert_serving(client)


def test_well_formed_submit_of_garbage_payload(raw, key, client):
    """Frames the engine cannot unpickle make the task fail, not the engine."""
    s = raw.dealer()
    codec = Codec(key, sender("payload"))
    tid = f"payload-{os.getpid()}"
    specs = [TaskSpec(tid + "-1", "apply", None, 2, 0, {}), TaskSpec(tid + "-2", "bogus-op", None, 0, 0, {}),
             TaskSpec(tid + "-3", "execute", None, 0, 0, {"code": 42}),
             TaskSpec(tid + "-4", "pull", None, 0, 0, {"names": {"a": 1}})]
    parts, rid = codec.encode(Submit(specs), [b"not a pickle", b"nor this"])
    s.send_multipart(parts)
    # the submitting socket is sent the outcomes (once they are stored); a small submission's SubmitReply
    # may be left out for the tasks whose outcome comes soon (an outcome acknowledges its task)
    outcomes: dict[str, ResultSpec] = {}
    acked: list[str] = []
    deadline = time.monotonic() + 10
    while len(outcomes) < len(specs) and time.monotonic() < deadline:
        msg = recv_reply(s, key)
        if isinstance(msg, Results):
            outcomes.update((r.task_id, r) for r in msg.results)
        elif isinstance(msg, SubmitReply):
            assert msg.reply_to == rid and msg.rejected == []
            assert not set(msg.accepted) & set(outcomes)  # never acknowledged after its outcome
            acked.extend(msg.accepted)
    assert sorted(outcomes) == sorted(t.task_id for t in specs)
    assert set(acked) <= set(outcomes) and len(acked) == len(set(acked))
    assert not any(r.ok for r in outcomes.values())
    for t in specs:
        with pytest.raises(fedpar.RemoteError):
            client.get_result(t.task_id, block=True, timeout=10)
    assert_serving(client)


def test_unknown_and_unexpected_kinds(raw, key, client):
    before = dropped(client)
    s = raw.dealer()
    s.send_multipart(signed(key, packb(head("bogus", sender("kind")))))
    s.send_multipart(signed(key, packb(head("", sender("kind")))))
    s.send_multipart(signed(key, packb({**head("status_request", sender("kind")), "kind": 42})))
    expect_drops(client, before, {"MalformedMessage": 3})
    assert no_reply(s)

    # known kinds that a client must not send: answered with an error, counted
    codec = Codec(key, sender("unexpected"))
    for msg in (Heartbeat(0), Welcome(1, "fake", [0])):
        parts, rid = codec.encode(msg)
        s.send_multipart(parts)
        reply = recv_reply(s, key)
        assert isinstance(reply, ErrorReply) and reply.reply_to == rid and reply.ename == "ProtocolError"
    s.send_multipart(codec.encode(Results([ResultSpec("nope", True, 0, None, time.time(), None, 0)]))[0])
    assert isinstance(recv_reply(s, key), ErrorReply)
    expect_drops(client, before, {"MalformedMessage": 3, "UnexpectedKind": 3})
    assert_serving(client)


def test_bad_messages_on_engine_socket(raw, key, client):
    before = dropped(client)
    e = raw.engine_dealer()
    e.send_multipart([b"garbage"])
    e.send_multipart([b"", os.urandom(32), os.urandom(40)])
    e.send_multipart(Codec(os.urandom(32), "engine:x:c").encode(Heartbeat(0))[0])
    e.send_multipart(signed(key, packb(head("bogus", "engine:evil:c"))))
    e.send_multipart(signed(key, b"\xc1"))
    codec = Codec(key, f"engine:evil-{os.getpid()}:c")
    e.send_multipart(codec.encode(ClientHello("not an engine"))[0])               # wrong socket
    e.send_multipart(codec.encode(Results([ResultSpec("never-submitted", True, 0, None, time.time(),
                                                      None, 1)]), [b"value"])[0])  # unknown task
    expect_drops(client, before, {"MalformedMessage": 3, "SignatureError": 2, "UnexpectedKind": 1,
                                  "DuplicateResult": 1})
    assert no_reply(e)
    # a heartbeat from an engine id nobody registered is told to stop, or to register first
    parts, _ = codec.encode(Heartbeat(987654))
    e.send_multipart(parts)
    answer = recv_reply(e, key)
    assert isinstance(answer, EngineStop) or (isinstance(answer, Heartbeat) and answer.engine_id == -1)
    assert sorted(x["id"] for x in client.status()["engines"]) == client.ids
    assert_serving(client)


def test_client_with_wrong_key_fails_fast(cluster, client):
    before = dropped(client)
    bad = dataclasses.replace(cluster.info, key=os.urandom(32))
    t0 = time.monotonic()
    with pytest.raises(fedpar.ControllerUnavailable, match="cluster key"):
        fedpar.Client(bad, timeout=2)
    took = time.monotonic() - t0
    assert 1.5 < took < 8
    expect_drops(client, before, {"SignatureError": 1})
    assert_serving(client)


# Regression: TaskSpec.from_wire bounded task ids in characters while the store's keys are bounded in
# bytes; an id of 200 emoji (800 bytes) was queued, then journal.task_assigned raised in
# Gateway._finish_pass outside any handler and the controller died.
@pytest.mark.timeout(60)
def test_overlong_task_id_does_not_kill_controller(procs, tmp_path, zctx):
    c = fedpar.Cluster(n=1, log_dir=tmp_path / "logs")
    try:
        c.start()
        procs.add(c.controller_pid, *c.engine_pids)
        c.wait_for_engines(1, timeout=30)
        info = c.info
        assert info is not None
        s = zctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(info.client_endpoint)
        try:
            codec = Codec(info.key, sender("long"))
            long_id = "\U0001f600" * 200  # 200 characters, 800 utf-8 bytes
            task = TaskSpec(long_id, "execute", None, 0, 0, {"code": "1"})
            s.send_multipart(codec.encode(Submit([task]))[0])
            time.sleep(1.0)
            with c.connect_client(timeout=3) as client:
                assert client.status(timeout=3)["controller"]
                assert client.load_balanced_view().apply_sync(lambda: 1) == 1
                drops = client.status()["dropped"]
                assert drops.get("HandlerError", 0) == 0
                if not drops.get("MalformedMessage"):  # else: refused in a SubmitReply
                    reply = recv_reply(s, info.key, 1000)
                    assert isinstance(reply, SubmitReply) and reply.rejected
                    assert reply.rejected[0][0] == long_id
                # a raw GetResults with such an id does not break anything either
                s.send_multipart(signed(info.key, packb(head("get_results", sender("long"),
                                                             task_ids=[long_id]))))
                time.sleep(0.3)
                assert client.status()["dropped"].get("HandlerError", 0) == 0
                assert client.load_balanced_view().apply_sync(lambda: 2) == 2
        finally:
            s.close(0)
    finally:
        pids = [p for p in [c.controller_pid, *c.engine_pids] if p is not None]
        c.stop(grace=2)
        assert_no_procs(pids, timeout=10)
