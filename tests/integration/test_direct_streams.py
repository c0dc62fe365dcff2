"""Direct streams (``fedpar.wire.direct``): a client and an engine on one host exchange large payloads over a
unix socket; the controller brokers the task but never carries the bytes.

Real controller and engine processes; a 1 MiB stream threshold and a 3 s stream timeout. The controller's
relay counters (``chunks``, ``streams_in``/``streams_out``) prove the bytes skipped it, ``delivered_direct``
counts pull results sent straight to their client. Hand-driven clients (``RawClient`` plus a ROUTER of their
own on a unix socket) play the client's side of the protocol to check what the engine does with a tampered
chunk, a client that vanishes, and a client that refuses the direct result (it then comes through the
controller).
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from procutil import connected_client, running_cluster
from streamutil import RawClient, accepted, assert_same, stats, wait_until

import fedpar
from fedpar.config import Config, ControllerConfig, StreamConfig
from fedpar.errors import EngineError, ResultNotFound, StreamAborted, StreamCorrupted, StreamTimeout
from fedpar.wire.codec import Codec, Received
from fedpar.wire.direct import OFFER
from fedpar.wire.payload import dumps, dumps_result
from fedpar.wire.protocol import Chunk, Credit, Results, StreamAbort, Submit, TaskSpec
from fedpar.wire.streams import layout, memory_source, should_stream
from fedpar.wire.transport import bind_ipc_router, send_parts

pytestmark = pytest.mark.timeout(120)

THRESHOLD = 1 << 20
TIMEOUT = 3.0
MiB = 1 << 20
_counter = iter(range(1, 10**9))


def relay_moved(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """What the controller's relay carried between two snapshots (all zero when payloads went direct)."""
    return {k: after[k] - before[k] for k in ("chunks", "streams_in", "streams_out")}


def delivered(before: dict[str, Any], after: dict[str, Any]) -> int:
    return int(after.get("delivered_direct", 0) - before.get("delivered_direct", 0))


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def dcluster(fedpar_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[fedpar.Cluster]:
    config = Config(stream=StreamConfig(threshold=THRESHOLD, timeout=TIMEOUT))
    yield from running_cluster(tmp_path_factory.mktemp("direct-logs"), config)


@pytest.fixture(scope="module")
def dclient(dcluster: fedpar.Cluster) -> Iterator[fedpar.Client]:
    yield from connected_client(dcluster)


@pytest.fixture
def lossy_cluster(fedpar_env: Path, tmp_path: Path) -> Iterator[fedpar.Cluster]:
    """A cluster of its own (an engine gets killed) that declares a silent engine lost after ~1.5 s."""
    config = Config(stream=StreamConfig(threshold=THRESHOLD, timeout=TIMEOUT),
                    controller=ControllerConfig(heartbeat=0.5, heartbeat_misses=3))
    yield from running_cluster(tmp_path / "logs", config)


class RawLink:
    """The client's side of direct streams, by hand: a ROUTER on a unix socket in a private directory."""

    def __init__(self, ctx: zmq.Context[Any], codec: Codec):
        self.dir = tempfile.mkdtemp(prefix="fedpar-rawlink-")
        self.sock, endpoint = bind_ipc_router(ctx, os.path.join(self.dir, "data"))
        self.offer = [socket.gethostname(), endpoint]
        self.codec = codec

    def recv(self, timeout: float = 10.0) -> tuple[bytes, Received]:
        if not self.sock.poll(int(timeout * 1000)):
            pytest.fail(f"no message from an engine within {timeout}s")
        parts = self.sock.recv_multipart()
        return parts[0], self.codec.decode(parts, 1)

    def send(self, ident: bytes, msg: Any, frames: list[Any] | None = None, tamper: bool = False) -> None:
        parts = self.codec.encode(msg, frames or [])[0]
        if tamper:
            payload = bytearray(parts[-1])
            payload[len(payload) // 2] ^= 0x01
            parts[-1] = bytes(payload)
        send_parts(self.sock, [ident, *parts])

    def close(self) -> None:
        self.sock.close(0)  # (closing twice is harmless)
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


@pytest.fixture
def raw_pair(zctx: zmq.Context[Any], dcluster: fedpar.Cluster) -> Iterator[Callable[[str], tuple[RawClient, RawLink]]]:
    made: list[tuple[RawClient, RawLink]] = []

    def make(tag: str) -> tuple[RawClient, RawLink]:
        assert dcluster.info is not None
        r = RawClient(zctx, dcluster.info, tag)
        pair = (r, RawLink(zctx, r.codec))
        made.append(pair)
        return pair

    yield make
    for r, link in made:
        r.close()
        link.close()


# ------------------------------------------------------------------------------------------ the fast path


@pytest.mark.parametrize("case", ["over", "f-order", "odd-u8", "5MB"])
def test_push_and_pull_skip_the_controller(dclient, case) -> None:
    """Push and pull above the threshold travel straight between client and engine: the values come back
    exact (dtype, order, writable), the relay carries nothing, and each large pull counts as delivered."""
    obj = {
        "over": np.arange(THRESHOLD // 8 + 3, dtype=np.float64),
        "f-order": np.asfortranarray(np.arange(600 * 400, dtype=np.float64).reshape(600, 400)),
        "odd-u8": (np.arange(3 * MiB + 7) % 251).astype(np.uint8),
        "5MB": np.random.default_rng(5).random(5_000_000 // 8),
    }[case]
    name = f"d_{case.replace('-', '_')}"
    assert should_stream(dumps({name: obj}), THRESHOLD)
    assert should_stream(dumps_result(obj), THRESHOLD)
    view = dclient[dclient.ids[0]]
    before = stats(dclient)
    view.push({name: obj}, block=True)
    got = view.pull(name, block=True)
    assert_same(got, obj)
    # the engine reports DELIVERED to the controller after the client acknowledged the last chunk, which may
    # be a moment after the pull returned here
    def counted() -> dict[str, Any] | None:
        now = stats(dclient)
        return now if delivered(before, now) else None

    after = wait_until("the pull to be counted as delivered", counted, 10)
    assert relay_moved(before, after) == {"chunks": 0, "streams_in": 0, "streams_out": 0}
    assert delivered(before, after) == 1
    view.execute(f"del {name}", block=True)


def test_under_the_threshold_is_inline(dclient) -> None:
    """A payload the threshold does not stream travels inline, direct or not: nothing is delivered direct."""
    small = np.arange(THRESHOLD // 16, dtype=np.float64)
    view = dclient[dclient.ids[1]]
    before = stats(dclient)
    view.push({"small": small}, block=True)
    assert_same(view.pull("small", block=True), small)
    after = stats(dclient)
    assert delivered(before, after) == 0
    assert relay_moved(before, after)["chunks"] == 0


def test_direct_pull_result_is_not_kept(dcluster, dclient) -> None:
    """A pull delivered straight to its client is recorded as done but not kept: fetching it again, from this
    client or another, raises ResultNotFound saying why."""
    a = np.arange(2 * MiB // 8, dtype=np.float64)
    view = dclient[dclient.ids[0]]
    view.push({"kept": a}, block=True)
    ar = view.pull("kept", block=False)
    assert_same(ar.get(timeout=30), a)
    tid = ar.task_ids[0]
    with pytest.raises(ResultNotFound, match="not kept"):
        dclient.get_result(tid, block=True, timeout=10)
    other = dcluster.connect_client()
    try:
        with pytest.raises(ResultNotFound, match="straight to the client"):
            other.get_result(tid, block=True, timeout=10)
        rec = [t for t in other.query_tasks() if t.task_id == tid]
        assert rec and rec[0].state == "done"
    finally:
        other.close()
    view.execute("del kept", block=True)


def test_direct_apply_arguments_but_stored_result(dcluster, dclient) -> None:
    """A DirectView apply sends its large arguments straight to the engine; its large result still goes
    through the controller and is stored (another client fetches it)."""
    a = np.random.default_rng(1).random(3 * MiB // 8)
    view = dclient[dclient.ids[1]]
    before = stats(dclient)
    ar = view.apply_async(np.copy, a)
    assert_same(ar.get(timeout=30), a)
    after = stats(dclient)
    moved = relay_moved(before, after)
    assert moved["streams_in"] == 1 and moved["chunks"] > 0  # the result only
    assert delivered(before, after) == 0
    other = dcluster.connect_client()
    try:
        assert_same(other.get_result(ar.task_ids[0], block=True, timeout=30), a)
    finally:
        other.close()


def test_load_balanced_arguments_use_the_relay(dclient) -> None:
    """Load-balanced tasks may be retried anywhere: their arguments are stored, so they cross the controller."""
    a = np.ones(3 * MiB // 8)
    before = stats(dclient)
    assert dclient.load_balanced_view().apply_sync(np.sum, a) == a.size
    after = stats(dclient)
    assert relay_moved(before, after)["streams_in"] == 1
    assert delivered(before, after) == 0


def test_many_concurrent_direct_transfers(dclient) -> None:
    """Pushes and pulls to both engines in flight at once each arrive whole."""
    arrays = [np.full(2 * MiB // 8 + i, float(i)) for i in range(6)]
    views = [dclient[dclient.ids[i % 2]] for i in range(6)]
    pushes = [v.push({f"many_{i}": a}, block=False) for i, (v, a) in enumerate(zip(views, arrays, strict=True))]
    for ar in pushes:
        ar.get(timeout=60)
    pulls = [v.pull(f"many_{i}", block=False) for i, v in enumerate(views)]
    for ar, a in zip(pulls, arrays, strict=True):
        assert_same(ar.get(timeout=60), a)
    for i, v in enumerate(views):
        v.execute(f"del many_{i}", block=True)


# ------------------------------------------------------------------------------------------ the engine's side


def _push_spec(r: RawClient, link: RawLink, target: int, tid: str, sid: int, frames: list[Any]) -> None:
    sizes = [len(memoryview(f).cast("B")) for f in frames]
    r.send(Submit([TaskSpec(tid, "push", target, 0, 0, {"stream": [sid, sizes], OFFER: link.offer})]))


def test_raw_direct_push_is_served_by_the_engine(raw_pair, dclient) -> None:
    """Positive control: a hand-driven client offering its arguments gets the engine's credit on its own
    socket, sends the chunks there, and the push lands; the controller acknowledges at once."""
    r, link = raw_pair("ok")
    target = r.hello().engines[0]
    a = np.arange(3 * MiB // 8 + 1, dtype=np.float64)
    frames = dumps({"raw_direct": a})
    tid, sid = f"raw-direct-{next(_counter)}", 5
    _push_spec(r, link, target, tid, sid, frames)
    r.expect("the acknowledgement", accepted(tid))
    source = memory_source(frames)
    chunks = layout([len(memoryview(f).cast("B")) for f in frames])
    sent = 0
    while sent < len(chunks):
        ident, rx = link.recv()
        assert isinstance(rx.msg, Credit) and rx.msg.sid == sid, rx.msg
        while sent < rx.msg.upto:
            link.send(ident, Chunk(sid, sent), [source(*chunks[sent])])
            sent += 1
    assert dclient.get_result(tid, block=True, timeout=30) is None
    assert_same(dclient[target].pull("raw_direct", block=True), a)
    dclient[target].execute("del raw_direct", block=True)


def test_tampered_direct_chunk_fails_the_task(raw_pair, dclient) -> None:
    """A chunk altered after signing is refused by the engine: it aborts the stream with StreamCorrupted,
    the task fails with that error, nothing lands in the namespace, and the engine serves on."""
    r, link = raw_pair("tamper")
    target = r.hello().engines[1]
    frames = dumps({"raw_tampered": np.arange(3 * MiB // 8, dtype=np.float64)})
    tid, sid = f"raw-tamper-{next(_counter)}", 9
    _push_spec(r, link, target, tid, sid, frames)
    source = memory_source(frames)
    chunks = layout([len(memoryview(f).cast("B")) for f in frames])
    ident, rx = link.recv()
    assert isinstance(rx.msg, Credit) and rx.msg.upto >= 2
    link.send(ident, Chunk(sid, 0), [source(*chunks[0])])
    link.send(ident, Chunk(sid, 1), [source(*chunks[1])], tamper=True)
    _, rx = link.recv()
    assert isinstance(rx.msg, StreamAbort) and rx.msg.ename == "StreamCorrupted", rx.msg
    with pytest.raises(StreamCorrupted):
        dclient.get_result(tid, block=True, timeout=30)
    with pytest.raises(fedpar.RemoteError):
        dclient[target].pull("raw_tampered", block=True)
    a = np.ones(2 * MiB // 8)
    dclient[target].push({"after_tamper": a}, block=True)
    assert_same(dclient[target].pull("after_tamper", block=True), a)


def test_silent_client_times_out_and_the_engine_serves_on(raw_pair, dclient) -> None:
    """A client that offers its arguments and then never sends them: the engine gives up after the stream
    timeout, the task fails with StreamTimeout, and the engine serves the next push."""
    r, link = raw_pair("silent")
    target = r.hello().engines[0]
    frames = dumps({"never": np.zeros(2 * MiB // 8)})
    tid = f"raw-silent-{next(_counter)}"
    _push_spec(r, link, target, tid, 3, frames)
    _, rx = link.recv()
    assert isinstance(rx.msg, Credit)
    t0 = time.monotonic()
    with pytest.raises(StreamTimeout):
        dclient.get_result(tid, block=True, timeout=30)
    assert TIMEOUT - 0.5 < time.monotonic() - t0 < TIMEOUT + 10
    a = np.ones(2 * MiB // 8)
    dclient[target].push({"after_silence": a}, block=True)
    assert_same(dclient[target].pull("after_silence", block=True), a)


def test_vanished_client_is_noticed_at_once(raw_pair, dclient) -> None:
    """A client that offers its arguments, sends one chunk and then goes away (its connection drops, as when it
    is killed): the engine notices at once, not after the 3 s stream timeout; the task fails with
    StreamAborted and the engine serves on."""
    r, link = raw_pair("vanish")
    target = r.hello().engines[1]
    frames = dumps({"vanished": np.zeros(3 * MiB // 8)})
    tid, sid = f"raw-vanish-{next(_counter)}", 4
    _push_spec(r, link, target, tid, sid, frames)
    ident, rx = link.recv()
    assert isinstance(rx.msg, Credit)
    chunks = layout([len(memoryview(f).cast("B")) for f in frames])
    link.send(ident, Chunk(sid, 0), [memory_source(frames)(*chunks[0])])
    t0 = time.monotonic()
    link.sock.close(0)
    with pytest.raises(StreamAborted, match="connection closed"):
        dclient.get_result(tid, block=True, timeout=30)
    assert time.monotonic() - t0 < TIMEOUT - 1
    a = np.ones(2 * MiB // 8)
    dclient[target].push({"after_vanish": a}, block=True)
    assert_same(dclient[target].pull("after_vanish", block=True), a)


def offered_pull(r: RawClient, link: RawLink, dclient: fedpar.Client, target: int, name: str,
                 a: Any) -> tuple[str, bytes, Results, dict[str, Any]]:
    """Put ``a`` on ``target`` as ``name`` and pull it with a direct offer from the raw client. Returns the task
    id, the engine's identity on the link, the engine's Results head and the counters before."""
    dclient[target].push({name: a}, block=True)
    before = stats(dclient)
    tid = f"raw-{name}-{next(_counter)}"
    r.send(Submit([TaskSpec(tid, "pull", target, 0, 0, {"names": name, OFFER: link.offer})]))
    ident, rx = link.recv()
    assert isinstance(rx.msg, Results)
    return tid, ident, rx.msg, before


def assert_came_through_controller(dclient: fedpar.Client, target: int, name: str, tid: str, a: Any,
                                   before: dict[str, Any]) -> None:
    """The pull result was stored by the controller (its relay carried it) and not counted as delivered."""
    assert_same(dclient.get_result(tid, block=True, timeout=30), a)
    after = stats(dclient)
    assert delivered(before, after) == 0
    assert relay_moved(before, after)["streams_in"] == 1
    dclient[target].execute(f"del {name}", block=True)


def test_refused_direct_result_comes_through_the_controller(raw_pair, dclient) -> None:
    """A client that turns the engine's direct result away (StreamAbort) still gets it: the engine sends it
    through the controller, which stores it (the relay carries it, nothing is counted as delivered)."""
    r, link = raw_pair("refuse")
    target = r.hello().engines[1]
    a = np.arange(2 * MiB // 8, dtype=np.float64)
    tid, ident, results, before = offered_pull(r, link, dclient, target, "refused", a)
    assert results.results[0].task_id == tid
    head = results.results[0].stream
    link.send(ident, StreamAbort(head[0], "StreamAborted", "not now"))
    assert_came_through_controller(dclient, target, "refused", tid, a, before)


def test_unacknowledged_direct_result_comes_through_the_controller(raw_pair, dclient) -> None:
    """A client that takes every chunk of a direct result but then turns it away instead of acknowledging it
    (as if the last chunk had failed its check): the engine does not report it delivered, it sends the result
    through the controller, which stores it."""
    r, link = raw_pair("noack")
    target = r.hello().engines[0]
    a = np.arange(2 * MiB // 8 + 3, dtype=np.float64)
    tid, ident, results, before = offered_pull(r, link, dclient, target, "noack", a)
    sid, sizes = results.results[0].stream
    n = len(layout(sizes))
    link.send(ident, Credit(sid, n))
    got = 0
    while got < n:
        _, rx = link.recv()
        assert isinstance(rx.msg, Chunk) and rx.msg.index == got
        got += 1
    link.send(ident, StreamAbort(sid, "StreamCorrupted", "the last chunk failed its check"))
    assert_came_through_controller(dclient, target, "noack", tid, a, before)


def test_offer_from_another_host_is_ignored(raw_pair, dclient) -> None:
    """An offer naming another host is stripped by the controller: the controller grants credit itself and
    the arguments come through its relay."""
    r, link = raw_pair("elsewhere")
    target = r.hello().engines[0]
    a = np.arange(2 * MiB // 8, dtype=np.float64)
    frames = dumps({"from_afar": a})
    tid, sid = f"raw-afar-{next(_counter)}", 13
    sender = r.announce(tid, target, sid, frames, {OFFER: ["no-such-host.invalid", link.offer[1]]})
    while not sender.done:
        sender.grant(r.credit(sid), time.monotonic())
        for index, data in sender.ready():
            r.send(Chunk(sid, index), [data])
    r.expect("the acknowledgement", accepted(tid))
    assert dclient.get_result(tid, block=True, timeout=30) is None
    assert_same(dclient[target].pull("from_afar", block=True), a)
    assert not link.sock.poll(0)  # the engine never came to the offered socket
    dclient[target].execute("del from_afar", block=True)


# ------------------------------------------------------------------------------------------ failures


def test_engine_killed_during_direct_push(lossy_cluster, monkeypatch) -> None:
    """The engine dies while the client streams it a push directly (sends slowed to ~20 ms per chunk): the
    push fails with EngineError once the controller declares it lost; the client drops the upload; the
    other engine is unaffected."""
    import fedpar.wire.direct as direct

    def slow_source(frames: list[Any]) -> Any:
        src = memory_source(frames)

        def source(*where: int) -> Any:
            time.sleep(0.02)
            return src(*where)

        return source

    monkeypatch.setattr(direct, "memory_source", slow_source)
    client = lossy_cluster.connect_client()
    try:
        ids = client.wait_for_engines(2, timeout=30)
        victim, survivor = ids[0], ids[1]
        pid = next(e["pid"] for e in client.status()["engines"] if e["id"] == victim)
        ar = client[victim].push({"doomed": np.ones(64 * MiB // 8)}, block=False)
        link = wait_until("the direct upload", lambda: client._io.transfers.direct, 10)
        wait_until("the engine to start pulling", lambda: link.busy, 10)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EngineError):
            ar.get(timeout=30)
        wait_until("the upload to be dropped", lambda: not link.uploading(ar.task_ids[0]), 10)
        a = np.ones(2 * MiB // 8)
        monkeypatch.undo()
        client[survivor].push({"ok": a}, block=True)
        assert_same(client[survivor].pull("ok", block=True), a)
    finally:
        client.close()
