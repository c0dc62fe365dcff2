"""``fedpar.wire.direct``: the client's ``ClientLink`` and the engine's ``EngineLinks`` on real zmq sockets in one
process (an engine played by hand on a DEALER), plus the offer rules."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from fedpar.wire.codec import Codec
from fedpar.wire.direct import OFFER, ClientLink, EngineLinks, offer_of, wants_direct, without_offer
from fedpar.wire.protocol import CHUNK_BYTES, Chunk, Credit, Results, ResultSpec, StreamAbort
from fedpar.wire.streams import DELIVERED, StreamSettings, layout, memory_source
from fedpar.wire.transport import connect_dealer, send_parts

KEY = b"k" * 32
SETTINGS = StreamSettings(threshold=1 << 20, window=4, timeout=0.5)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def link(ctx: zmq.Context[Any]) -> Iterator[ClientLink]:
    lk = ClientLink(ctx, Codec(KEY, "client:unit"), SETTINGS)
    yield lk
    lk.close()


class FakeEngine:
    """An engine's end of a direct stream, by hand."""

    def __init__(self, ctx: zmq.Context[Any], link: ClientLink):
        self.codec = Codec(KEY, "engine:unit:t")
        self.sock = connect_dealer(ctx, link.endpoint, b"d:unit-engine")
        self.link = link

    def send(self, msg: Any, frames: list[Any] | None = None, tamper: bool = False) -> None:
        parts = self.codec.encode(msg, frames or [])[0]
        if tamper:
            b = bytearray(parts[-1])
            b[7] ^= 0x10
            parts[-1] = bytes(b)
        send_parts(self.sock, parts)

    def pump(self, wants: Any = lambda tid: True) -> list[tuple[ResultSpec, list[Any]]]:
        """Let the link handle everything that arrived from this engine."""
        out: list[tuple[ResultSpec, list[Any]]] = []
        wait = 5000  # the first message may take a while on a busy host (a fresh connection); then drain
        while self.link.sock.poll(wait):
            out += self.link.on_message(self.link.sock.recv_multipart(), wants, time.monotonic())
            wait = 100
        return out

    def recv(self, timeout: float = 5.0) -> Any:
        assert self.sock.poll(int(timeout * 1000)), "nothing from the client"
        return self.codec.decode(self.sock.recv_multipart()).msg


def test_offer_rules() -> None:
    assert wants_direct("push", 0, True) and wants_direct("apply", 3, True) and wants_direct("pull", 1, False)
    assert not wants_direct("apply", None, True)  # load-balanced: may be retried elsewhere
    assert not wants_direct("push", 0, False) and not wants_direct("execute", 0, False)
    good = {OFFER: ["host", "ipc:///tmp/x/data"], "names": "a"}
    assert offer_of(good) == ("host", "ipc:///tmp/x/data")
    assert without_offer(good) == {"names": "a"}
    for bad in (None, "x", ["host"], ["host", "tcp://1.2.3.4:5"], [1, "ipc:///x"], ["", "ipc:///x"],
                ["h" * 300, "ipc:///x"], ["host", "ipc:///" + "x" * 5000]):
        assert offer_of({OFFER: bad}) is None, bad


def test_socket_is_private(link: ClientLink) -> None:
    path = link.endpoint.removeprefix("ipc://")
    assert os.path.exists(path)
    assert os.stat(os.path.dirname(path)).st_mode & 0o077 == 0
    assert link.offer == [socket.gethostname(), link.endpoint]


def test_upload_served_to_the_engine_that_asks(ctx: zmq.Context[Any], link: ClientLink) -> None:
    frames = [b"head", np.arange(3 * CHUNK_BYTES // 8 + 5, dtype=np.float64)]
    sizes = [len(frames[0]), frames[1].nbytes]
    link.keep_upload("t1", 7, sizes, frames)
    eng = FakeEngine(ctx, link)
    chunks = layout(sizes)
    src = memory_source(frames)

    def take(n: int, first: int) -> None:
        for want in range(first, first + n):
            assert eng.sock.poll(2000), f"chunk {want} did not come"
            rx = eng.codec.decode(eng.sock.recv_multipart())
            assert isinstance(rx.msg, Chunk) and rx.msg.sid == 7 and rx.msg.index == want
            assert bytes(rx.frames[0]) == bytes(src(*chunks[want]))
        assert not eng.sock.poll(50), "a chunk was sent without credit"

    eng.send(Credit(7, 2))
    eng.pump()
    take(2, 0)
    eng.send(Credit(7, len(chunks)))
    eng.pump()
    take(len(chunks) - 2, 2)
    assert not link.busy  # the engine's pass is complete; the upload stays on offer until the outcome
    assert link.uploading("t1")
    link.drop_upload("t1")
    assert not link.uploading("t1")
    eng.send(Credit(7, 1))
    eng.pump()
    msg = eng.recv()
    assert isinstance(msg, StreamAbort) and msg.sid == 7 and "no longer offers" in msg.evalue


def test_unknown_upload_is_refused(ctx: zmq.Context[Any], link: ClientLink) -> None:
    eng = FakeEngine(ctx, link)
    eng.send(Credit(99, 4))
    eng.pump()
    msg = eng.recv()
    assert isinstance(msg, StreamAbort) and msg.sid == 99


def _head(tid: str, sid: int, sizes: list[int]) -> Results:
    return Results([ResultSpec(tid, True, 0, 1.0, 2.0, None, 0, [sid, sizes])])


def test_download_into_final_memory(ctx: zmq.Context[Any], link: ClientLink) -> None:
    data = np.random.default_rng(0).bytes(2 * CHUNK_BYTES + 123)
    eng = FakeEngine(ctx, link)
    eng.send(_head("t2", 4, [len(data)]))
    assert eng.pump() == []
    assert link.downloading("t2")
    credit = eng.recv()
    assert isinstance(credit, Credit) and credit.upto == 3
    for i, (_, _, off, n) in enumerate(layout([len(data)])):
        eng.send(Chunk(4, i), [data[off:off + n]])
    done = eng.pump()
    assert len(done) == 1
    res, frames = done[0]
    assert res.task_id == "t2" and res.stream is None and res.nframes == 1
    assert bytes(frames[0]) == data
    assert not link.downloading("t2") and not link.busy
    ack = eng.recv()  # the acknowledgement the engine waits for before reporting the result DELIVERED
    assert isinstance(ack, Credit) and ack.sid == 4 and ack.upto == 3


def test_unwanted_result_is_refused(ctx: zmq.Context[Any], link: ClientLink) -> None:
    eng = FakeEngine(ctx, link)
    eng.send(_head("nobody-waits", 6, [5 * CHUNK_BYTES]))
    eng.pump(wants=lambda tid: False)
    msg = eng.recv()
    assert isinstance(msg, StreamAbort) and msg.sid == 6
    assert not link.downloading("nobody-waits")


def test_tampered_chunk_aborts_the_download(ctx: zmq.Context[Any], link: ClientLink) -> None:
    """A chunk failing its MAC never reaches the result: the link drops the download and tells the engine
    StreamCorrupted (the engine then sends the result through the controller)."""
    eng = FakeEngine(ctx, link)
    eng.send(_head("t3", 8, [3 * CHUNK_BYTES]))
    eng.pump()
    eng.recv()  # credit
    eng.send(Chunk(8, 0), [b"\x01" * CHUNK_BYTES])
    eng.send(Chunk(8, 1), [b"\x02" * CHUNK_BYTES], tamper=True)
    assert eng.pump() == []
    msg = eng.recv()
    while isinstance(msg, Credit):
        msg = eng.recv()
    assert isinstance(msg, StreamAbort) and msg.ename == "StreamCorrupted"
    assert not link.downloading("t3")
    eng.send(Chunk(8, 2), [b"\x03" * CHUNK_BYTES])  # the rest of a dead stream is ignored
    assert eng.pump() == []


def test_out_of_order_chunk_aborts(ctx: zmq.Context[Any], link: ClientLink) -> None:
    eng = FakeEngine(ctx, link)
    eng.send(_head("t4", 2, [3 * CHUNK_BYTES]))
    eng.pump()
    eng.recv()
    eng.send(Chunk(2, 1), [b"\x00" * CHUNK_BYTES])
    eng.pump()
    msg = eng.recv()
    assert isinstance(msg, StreamAbort) and msg.ename == "StreamCorrupted"


def test_stalled_download_is_abandoned(ctx: zmq.Context[Any], link: ClientLink) -> None:
    eng = FakeEngine(ctx, link)
    eng.send(_head("t5", 3, [2 * CHUNK_BYTES]))
    eng.pump()
    eng.recv()
    link.expire(time.monotonic() + SETTINGS.timeout + 0.1)
    msg = eng.recv()
    assert isinstance(msg, StreamAbort) and msg.ename == "StreamTimeout"
    assert not link.downloading("t5")


def test_controller_outcome_stops_a_download(ctx: zmq.Context[Any], link: ClientLink) -> None:
    eng = FakeEngine(ctx, link)
    eng.send(_head("t6", 1, [2 * CHUNK_BYTES]))
    eng.pump()
    eng.recv()
    link.drop_download("t6", "the controller reported the task's outcome")
    msg = eng.recv()
    assert isinstance(msg, StreamAbort) and msg.sid == 1
    assert not link.downloading("t6")


def test_engine_links(ctx: zmq.Context[Any], link: ClientLink) -> None:
    links = EngineLinks(ctx, b"d:unit")
    try:
        assert links.socket_for({}) is None
        assert links.socket_for({OFFER: ["another-host.invalid", link.endpoint]}) is None
        assert links.socket_for({OFFER: [socket.gethostname(), "ipc:///nonexistent/fedpar/data"]}) is None
        sock = links.socket_for({OFFER: link.offer})
        assert sock is not None and links.socket_for({OFFER: link.offer}) is sock  # one connection per client
        links.forget(sock)
        again = links.socket_for({OFFER: link.offer})
        assert again is not None and again is not sock
    finally:
        links.close()


def test_engine_links_drop_a_closed_client(ctx: zmq.Context[Any]) -> None:
    """Once a client has closed (its socket file is gone) the engine stops using the cached connection."""
    lk = ClientLink(ctx, Codec(KEY, "client:unit3"), SETTINGS)
    links = EngineLinks(ctx, b"d:unit")
    try:
        assert links.socket_for({OFFER: lk.offer}) is not None
        lk.close()
        assert links.socket_for({OFFER: lk.offer}) is None
    finally:
        links.close()


def test_close_removes_the_socket(ctx: zmq.Context[Any]) -> None:
    lk = ClientLink(ctx, Codec(KEY, "client:unit2"), SETTINGS)
    path = lk.endpoint.removeprefix("ipc://")
    lk.close()
    assert not os.path.exists(os.path.dirname(path))


def test_controller_outcomes_seen_by_the_link(ctx: zmq.Context[Any], link: ClientLink) -> None:
    """What the client makes of the controller's outcomes: a DELIVERED notice is dropped while the result is
    still arriving directly, else it becomes ResultNotFound (not kept); any outcome ends the task's direct
    upload, and a real outcome (e.g. the engine died) stops a direct download."""
    eng = FakeEngine(ctx, link)
    eng.send(_head("arriving", 2, [2 * CHUNK_BYTES]))
    eng.pump()
    eng.recv()
    link.keep_upload("uploaded", 9, [10], [b"0123456789"])
    delivered = ResultSpec("arriving", True, 0, 1.0, 2.0, None, 0, [DELIVERED, [2 * CHUNK_BYTES]])
    elsewhere = ResultSpec("elsewhere", True, 0, 1.0, 2.0, None, 0, [DELIVERED, [5]])
    done = ResultSpec("uploaded", True, 0, 1.0, 2.0, None, 0)
    out = link.outcomes([delivered, elsewhere, done])
    assert [r.task_id for r in out] == ["elsewhere", "uploaded"]
    assert out[0].ok is False and out[0].stream is None and out[0].error is not None
    assert out[0].error[0] == "fedpar.ResultNotFound" and "not kept" in out[0].error[1]
    assert out[1] == done
    assert link.downloading("arriving") and not link.uploading("uploaded")
    lost = ResultSpec("arriving", False, 0, 1.0, 2.0, ["fedpar.EngineError", "engine 0 died", ""], 0)
    assert link.outcomes([lost]) == [lost]
    assert not link.downloading("arriving")
    msg = eng.recv()
    assert isinstance(msg, StreamAbort) and msg.sid == 2
