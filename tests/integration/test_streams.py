"""Large payloads as chunk streams, end to end: real controller and engine processes on loopback.

The module's cluster uses a 1 MiB stream threshold and a 3 s stream timeout, so streams are cheap to
provoke and abandoned streams are freed quickly, and ``[stream] direct = false``: every payload crosses the
controller's relay, which is what these tests check (direct streams between a client and an engine on one
host are tested in ``test_direct_streams.py``). Exact stream counts are predicted from the payload
frames the client and the engine build (``_apply_frames``, ``payload.dumps``, ``payload.dumps_result``)
and checked against the controller's counters (``streams_in``/``streams_out`` count streams opened).

Interruptions are made deterministic by slowing one end down inside its own process (a subprocess
client whose I/O thread sleeps per chunk or per credit; an engine whose task patches how it reads its
result's chunks), never by racing a fast transfer. Raw protocol tests use ``fedpar.wire.codec.Codec`` on
zmq DEALER sockets; the client's download checks run against a fake controller (a ROUTER in a thread).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
import zmq
from procutil import connected_client, read_json_line, running_cluster
from streamutil import RawClient, aborted, accepted, assert_same, rejected, stats, wait_until

import fedpar
from fedpar.client.views import _apply_frames
from fedpar.config import Config, ControllerConfig, StreamConfig
from fedpar.runtime import ConnectionInfo
from fedpar.wire.codec import Codec, Received
from fedpar.wire.payload import dumps, dumps_result
from fedpar.wire.protocol import (
    CHUNK_BYTES,
    Chunk,
    ClientHello,
    Credit,
    GetResults,
    Message,
    Results,
    ResultSpec,
    StreamAbort,
    SubmitReply,
    Welcome,
)
from fedpar.wire.streams import Sender, frame_size, memory_source, should_stream
from fedpar.wire.transport import send_parts

# engines cannot import this test module: ship its functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(60)

THRESHOLD = 1 << 20  # payloads above 1 MiB are streamed
TIMEOUT = 3.0  # seconds without progress before a stream is abandoned
MiB = 1 << 20
_counter = iter(range(1, 10**9))


# ------------------------------------------------------------------------------------------ task functions


def echo(x, pad=""):
    """The identity (``pad`` only lengthens the arguments' pickle, to hit exact payload sizes)."""
    return x


def ones(nbytes):
    return np.ones(nbytes // 8)


def u8_pattern(n):
    return (np.arange(n) % 251).astype(np.uint8)


def checksum(a):
    return zlib.crc32(a)


def throttled_ones(nbytes, delay):
    """Runs on an engine: ``nbytes`` of float64 ones, with this result's stream slowed down to one chunk per
    ``delay`` seconds (the engine reads a result's chunks through ``fedpar.engine.engine.memory_source``, which is
    patched for the next streamed result only)."""
    import fedpar.engine.engine
    from fedpar.wire.streams import memory_source

    def slow_source(frames):
        fedpar.engine.engine.memory_source = memory_source  # this result only
        read = memory_source(frames)

        def source(*where):
            time.sleep(delay)
            return read(*where)

        return source

    fedpar.engine.engine.memory_source = slow_source
    return np.ones(nbytes // 8)


# ------------------------------------------------------------------------------------------ helpers


def idle_stats(client: fedpar.Client, timeout: float = 5.0) -> dict[str, Any]:
    """Status once the controller has no stream open (fails if one stays open)."""
    last: dict[str, Any] = {}

    def probe() -> dict[str, Any] | None:
        nonlocal last
        last = stats(client)
        return last if last["streams_inbound"] == 0 and last["streams_outbound"] == 0 else None

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.02)
    pytest.fail(f"streams still open after {timeout}s: {last}")


def streamed(frames: list[Any]) -> int:
    return int(should_stream(frames, THRESHOLD))


def nbytes(frames: list[Any]) -> int:
    return sum(frame_size(f) for f in frames)


def blocks_equal(a: np.ndarray, b: np.ndarray, block: int = 64 * MiB) -> bool:
    """``np.array_equal`` of two large flat arrays without a full-size temporary."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return all(np.array_equal(a[i:i + block], b[i:i + block]) for i in range(0, a.size, block))


PROTOCOL_DROPS = ("SignatureError", "MalformedMessage", "ReplayError", "UnexpectedKind", "HandlerError")


def drops(before: dict[str, Any], after: dict[str, Any], kinds: tuple[str, ...]) -> dict[str, int]:
    """How many messages of each of ``kinds`` the controller dropped between two status snapshots."""
    delta = {k: after["dropped"].get(k, 0) - before["dropped"].get(k, 0) for k in kinds}
    return {k: v for k, v in delta.items() if v}


def rss_anon(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon in /proc/{pid}/status")


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def scluster(fedpar_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[fedpar.Cluster]:
    """Two engines; streams above 1 MiB, abandoned after 3 s without progress."""
    config = Config(stream=StreamConfig(threshold=THRESHOLD, timeout=TIMEOUT, direct=False))
    yield from running_cluster(tmp_path_factory.mktemp("stream-logs"), config)


@pytest.fixture(scope="module")
def sclient(scluster: fedpar.Cluster) -> Iterator[fedpar.Client]:
    yield from connected_client(scluster)


@pytest.fixture
def fast_loss_cluster(fedpar_env: Path, tmp_path: Path) -> Iterator[fedpar.Cluster]:
    """A cluster of its own (its engines get killed) that declares a silent engine lost after ~1.5 s."""
    config = Config(stream=StreamConfig(threshold=THRESHOLD, timeout=TIMEOUT, direct=False),
                    controller=ControllerConfig(heartbeat=0.5, heartbeat_misses=3))
    yield from running_cluster(tmp_path / "logs", config)


def assert_serving(client: fedpar.Client, engine: int | None = None) -> None:
    """A small task and a streamed push/pull both work (on ``engine``, else load-balanced and the last)."""
    view = client[client.ids[-1] if engine is None else engine]
    small = client.load_balanced_view() if engine is None else view
    assert small.apply_sync(echo, 41) == 41
    a = np.arange(3 * MiB // 8 + 5, dtype=np.float64)
    name = f"serving_{next(_counter)}"
    view.push({name: a}, block=True)
    got = view.pull(name, block=True)
    assert np.array_equal(got, a)
    view.execute(f"del {name}", block=True)


# ------------------------------------------------------------------------------------------ 1, 2: sizes


def _apply_size(obj: Any, pad: str) -> int:
    return nbytes(_apply_frames(echo, (obj,), {"pad": pad}))


def _for_apply_total(target: int) -> tuple[np.ndarray, str]:
    """A float64 array and a pad whose ``apply(echo, a, pad=pad)`` payload is exactly ``target`` bytes."""
    n0 = (target - _apply_size(np.zeros(0), "")) // 8
    for n in range(max(0, n0 - 8), n0 + 2):
        k = target - _apply_size(np.zeros(n), "")
        if 0 <= k < 200:
            a = np.arange(n, dtype=np.float64) * 1.5
            if _apply_size(a, "p" * k) == target:
                return a, "p" * k
    raise AssertionError(f"no float64 array gives an apply payload of {target} bytes")


def _for_result_total(target: int) -> np.ndarray:
    """A uint8 array whose result payload (``dumps_result``) is exactly ``target`` bytes."""
    n0 = target - nbytes(dumps_result(np.zeros(0, np.uint8)))
    for n in range(max(0, n0 - 16), n0 + 2):
        a = u8_pattern(n)
        if nbytes(dumps_result(a)) == target:
            return a
    raise AssertionError(f"no uint8 array gives a result payload of {target} bytes")


CASES: dict[str, Callable[[], tuple[Any, str]]] = {
    "f64-apply-below": lambda: _for_apply_total(THRESHOLD - 1),
    "f64-apply-equal": lambda: _for_apply_total(THRESHOLD),
    "f64-apply-above": lambda: _for_apply_total(THRESHOLD + 1),
    "u8-result-equal": lambda: (_for_result_total(THRESHOLD), ""),
    "u8-result-above": lambda: (_for_result_total(THRESHOLD + 1), ""),
    "f64-4MiB-whole-chunks": lambda: (np.arange(4 * MiB // 8, dtype=np.float64), ""),
    "f64-5MiB-plus-odd": lambda: (np.arange(5 * MiB // 8 + 1234, dtype=np.float64) - 7.25, ""),
    "f64-empty": lambda: (np.zeros(0), ""),
    "empty-frames-inside-stream": lambda: ((np.zeros(0), np.arange(3 * MiB // 8 + 3, dtype=np.float64),
                                            np.zeros((0, 4), np.int8)), ""),
    "bytes-3MiB": lambda: (bytes(range(256)) * (3 * MiB // 256) + b"tail", ""),
    "bytearray-2MiB": lambda: (bytearray(b"0123456789abcdef" * (2 * MiB // 16)) + b"xyz", ""),
    "f32-2d": lambda: (np.arange(700 * 1000, dtype=np.float32).reshape(700, 1000), ""),
    "i16-2d-fortran": lambda: (np.asfortranarray(np.arange(1500 * 1001, dtype=np.int16).reshape(1500, 1001)), ""),
    "f64-strided-in-band": lambda: (np.arange(2 * MiB // 8 * 2, dtype=np.float64)[::2], ""),
    "small-dict": lambda: ({"k": [1, 2, 3], "s": "x" * 100}, ""),
}


def test_exact_boundary_payloads_are_exact() -> None:
    """The helpers really build payloads of exactly threshold - 1, threshold and threshold + 1 bytes."""
    for delta in (-1, 0, 1):
        a, pad = _for_apply_total(THRESHOLD + delta)
        assert _apply_size(a, pad) == THRESHOLD + delta
        assert should_stream(_apply_frames(echo, (a,), {"pad": pad}), THRESHOLD) == (delta > 0)
    for delta in (0, 1):
        assert nbytes(dumps_result(_for_result_total(THRESHOLD + delta))) == THRESHOLD + delta


@pytest.mark.parametrize("case", list(CASES))
def test_roundtrip_sizes(sclient: fedpar.Client, case: str) -> None:
    """apply (load-balanced), push/pull and get_result return the object unchanged, streamed exactly when its
    payload exceeds the threshold in that direction."""
    obj, pad = CASES[case]()
    up = streamed(_apply_frames(echo, (obj,), {"pad": pad}))
    down = streamed(dumps_result(obj))
    before = idle_stats(sclient)

    # load-balanced apply: arguments up (and on to an engine), result back (and on to the client)
    ar = sclient.load_balanced_view().apply_async(echo, obj, pad=pad)
    assert_same(ar.get(timeout=30), obj)
    after = idle_stats(sclient)
    assert after["streams_in"] - before["streams_in"] == up + down, (case, up, down)
    assert after["streams_out"] - before["streams_out"] == up + down, (case, up, down)
    assert after["streams_failed"] == before["streams_failed"]
    if up or down:
        assert after["chunks"] > before["chunks"]
    else:
        assert after["chunks"] == before["chunks"]

    # the stored result, fetched again from the controller's store
    again = sclient.get_result(ar.task_ids[0], block=True, timeout=30)
    assert_same(again, obj)
    fetched = idle_stats(sclient)
    assert fetched["streams_in"] == after["streams_in"]
    assert fetched["streams_out"] - after["streams_out"] == down

    # push to one engine, pull it back
    name = f"v_{case.replace('-', '_')}"
    push_up = streamed(dumps({name: obj}))
    view = sclient[sclient.ids[0]]
    view.push({name: obj}, block=True)
    assert_same(view.pull(name, block=True), obj)
    view.execute(f"del {name}", block=True)
    end = idle_stats(sclient)
    assert end["streams_in"] - fetched["streams_in"] == push_up + down
    assert end["streams_out"] - fetched["streams_out"] == push_up + down
    assert end["streams_failed"] == before["streams_failed"]


def test_boundary_decides_streaming(sclient: fedpar.Client) -> None:
    """At exactly the threshold nothing is streamed, one byte more and it is: for a task's arguments (the
    result, without the function's pickle, stays smaller) and for a result (the arguments are tiny)."""
    lv = sclient.load_balanced_view()
    counts: dict[str, list[int]] = {"arguments": [], "result": []}
    for delta in (0, 1):
        a, pad = _for_apply_total(THRESHOLD + delta)
        before = idle_stats(sclient)
        assert_same(lv.apply_sync(echo, a, pad=pad), a)
        mid = idle_stats(sclient)
        b = _for_result_total(THRESHOLD + delta)
        assert_same(lv.apply_sync(u8_pattern, b.size), b)
        after = idle_stats(sclient)
        counts["arguments"].append(mid["streams_in"] - before["streams_in"])
        counts["result"].append(after["streams_in"] - mid["streams_in"])
    assert counts == {"arguments": [0, 1], "result": [0, 1]}


def test_scatter_gather_large(sclient: fedpar.Client) -> None:
    """A 24 MB array scattered over both engines and gathered back: four streams, equal content."""
    big = np.arange(3_000_001, dtype=np.float64) * 0.5
    view = sclient[:]
    before = idle_stats(sclient)
    view.scatter("scattered_big", big, block=True)
    back = view.gather("scattered_big", block=True)
    assert_same(back, big)
    after = idle_stats(sclient)
    assert after["streams_in"] - before["streams_in"] == 4  # two pushed halves, two pulled halves
    assert after["streams_out"] - before["streams_out"] == 4
    view.execute("del scattered_big", block=True)


def test_get_result_of_large_result_from_another_client(scluster: fedpar.Cluster, sclient: fedpar.Client) -> None:
    """A large result fetched by task id, also by a second client while the task still runs and later."""
    lv = sclient.load_balanced_view()
    ar = lv.apply_async(throttled_ones, 20 * MiB, 0.01)  # ~0.2 s of result stream
    other = scluster.connect_client()
    try:
        assert ar.wait_for_send(30)  # stored: from now on another client can ask for it (two sockets: no order)
        early = other.get_result(ar.task_ids[0])  # watched while running: delivered when it finishes
        want = np.ones(20 * MiB // 8)
        assert_same(ar.get(timeout=30), want)
        assert_same(early.get(timeout=30), want)
        assert_same(other.get_result(ar.task_ids[0], block=True, timeout=30), want)
        assert_same(sclient.get_result(ar.task_ids[0], block=True, timeout=30), want)
    finally:
        other.close()
    idle_stats(sclient)


# ------------------------------------------------------------------------------------------ 3: one gigabyte


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_one_gigabyte_push_pull_bounded_controller_memory(scluster: fedpar.Cluster, sclient: fedpar.Client) -> None:
    """1 GiB pushed to an engine and pulled back: exact bytes, and the controller's anonymous memory stays
    within 128 MiB of its baseline (the design target is 64 MiB) although the object passes through it."""
    n = 1 << 30
    a = np.empty(n, dtype=np.uint8)
    words = a.view(np.uint64)
    step = 8 * MiB
    for i in range(0, words.size, step):  # each 8-byte word holds its index: a misplaced chunk shows
        words[i:i + step] = np.arange(i, min(i + step, words.size), dtype=np.uint64) * 0x9E3779B97F4A7C15
    local_crc = zlib.crc32(a)

    pid = scluster.controller_pid
    assert pid is not None
    before = idle_stats(sclient)
    baseline = max(rss_anon(pid) for _ in range(5))
    peak = [baseline]
    samples = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], rss_anon(pid))
                samples[0] += 1
            except (OSError, AssertionError):
                return
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    view = sclient[sclient.ids[0]]
    back = None
    ids: list[str] = []
    t0 = time.monotonic()
    sampler.start()
    try:
        push = view.push({"gigabyte": a})
        ids += push.task_ids
        push.get(timeout=120)
        t_push = time.monotonic() - t0
        crc = view.apply_async(checksum, fedpar.Reference("gigabyte"))
        ids += crc.task_ids
        assert crc.get(timeout=60) == local_crc  # the engine holds exactly the bytes sent
        t1 = time.monotonic()
        pull = view.pull("gigabyte")
        ids += pull.task_ids
        back = pull.get(timeout=120)
        t_pull = time.monotonic() - t1
    finally:
        stop.set()
        sampler.join(5)
    growth = peak[0] - baseline
    print(f"\n1 GiB: push {t_push:.1f}s, pull {t_pull:.1f}s; controller RssAnon baseline "
          f"{baseline / MiB:.1f} MiB, peak growth {growth / MiB:.1f} MiB over {samples[0]} samples")
    try:
        assert back.dtype == np.uint8 and back.shape == (n,) and back.flags.writeable
        assert blocks_equal(back, a)
        assert zlib.crc32(back) == local_crc
        assert samples[0] > 10
        assert growth < 128 * MiB, f"controller RssAnon grew by {growth / MiB:.1f} MiB during a 1 GiB transfer"
        end = idle_stats(sclient)
        assert end["streams_in"] - before["streams_in"] == 2  # the push's arguments, the pull's result
        assert end["chunks"] - before["chunks"] >= 2 * n // CHUNK_BYTES
        assert end["streams_failed"] == before["streams_failed"]
    finally:
        del back, a, words
        view.execute("del gigabyte", block=True)
        sclient.purge_results(ids)


# ------------------------------------------------------------------------------------------ 4, 5: senders


CLIENT_SCRIPT = r"""
import json, sys, time
import numpy as np
import fedpar
import fedpar.client.io as fio
from fedpar.wire.protocol import Chunk, Credit

cf, mode, delay, arg, target = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
slowed = Chunk if mode == "upload" else Credit
send = fio.IOThread._send

def slow_send(self, link, msg, frames, reply):
    if isinstance(msg, slowed):
        time.sleep(delay)  # a slow link: the stream stays open long enough to be interrupted
    return send(self, link, msg, frames, reply)

fio.IOThread._send = slow_send
client = fedpar.Client(cf, lost_after=None)
if mode == "upload":
    view = client.load_balanced_view() if target == "any" else client[int(target)]
    ar = view.apply_async(len, np.ones(int(arg) // 8))
else:
    ar = client.get_result(arg)
print(json.dumps({"task": ar.task_ids[0]}), flush=True)
try:
    value = ar.get(timeout=60)
    print(json.dumps({"ok": repr(value)[:60]}), flush=True)
except fedpar.FedparError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
client.close()
"""


@pytest.fixture
def client_script(tmp_path: Path) -> Path:
    path = tmp_path / "fedpar_stream_client.py"
    path.write_text(CLIENT_SCRIPT)
    return path


def start_client(procs: Any, script: Path, cluster: fedpar.Cluster, mode: str, delay: float, arg: str,
                 target: str = "any") -> tuple[subprocess.Popen[bytes], str]:
    proc = procs.popen([sys.executable, str(script), str(cluster.connection_file), mode, str(delay), arg, target],
                       stdout=subprocess.PIPE)
    line = read_json_line(proc, timeout=30)
    assert isinstance(line, dict) and "task" in line, line
    return proc, line["task"]


def block_until(path, limit):
    """Runs on an engine: keeps it busy until ``path`` exists (at most ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.path.exists(path)


def stored_outcome(client: fedpar.Client, tid: str) -> str:
    """What the controller's store says about task ``tid``: "ResultNotFound", an error, or a value."""
    try:
        value = client.get_result(tid, block=True, timeout=10)
    except fedpar.ResultNotFound:
        return "ResultNotFound"
    except fedpar.FedparError as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"value {value!r:.60}"


class Upload:
    """A subprocess client uploading 200 MiB of task arguments slowly (10 ms per chunk). ``engine``:
    ``"waiting"`` sends the task to engine 0 while a blocker keeps it busy (only the controller receives the
    stream); ``"receiving"`` sends it load-balanced to an idle engine (it receives the chunks cut-through)."""

    SIZE = 200 * MiB

    def __init__(self, cluster: fedpar.Cluster, client: fedpar.Client, procs: Any, script: Path, flag: Path,
                 engine: str):
        self.client = client
        self.engine = engine
        self.flag = flag
        self.busy = client.ids[0]
        self.free = client.ids[-1]
        self.blocker = client[self.busy].apply_async(block_until, str(flag), 40) if engine == "waiting" else None
        self.before = idle_stats(client)
        target = str(self.busy) if engine == "waiting" else "any"
        self.proc, self.tid = start_client(procs, script, cluster, "upload", 0.01, str(self.SIZE), target)
        before = self.before
        wait_until("the upload to start", lambda: (s := stats(client))["streams_inbound"] >= 1
                   and s["chunks"] >= before["chunks"] + 3, 30)
        if engine == "receiving":  # the engine the task went to is stuck with it until its stream ends
            self.busy = busy_engine(client)["id"]
            self.free = next(e for e in client.ids if e != self.busy)

    def release(self) -> None:
        self.flag.touch()
        if self.blocker is not None:
            assert self.blocker.get(timeout=20) is True

    def check_freed(self, since: float) -> dict[str, Any]:
        """The controller abandons the upload within the timeout (plus its check interval and some slack)."""
        client, before = self.client, self.before
        after = wait_until("the interrupted upload to be freed",
                           lambda: (s := stats(client))["streams_inbound"] == 0 and s, TIMEOUT + 5)
        freed = time.monotonic() - since
        print(f"\nupload ({self.engine} engine): stream freed {freed:.2f}s after the interruption")
        assert after["streams_failed"] == before["streams_failed"] + 1
        assert before["chunks"] < after["chunks"] < before["chunks"] + self.SIZE // CHUNK_BYTES  # it was partial
        return after


@pytest.mark.parametrize("engine", ["waiting", "receiving"])
def test_killed_uploader_frees_its_stream(scluster, sclient, procs, client_script, tmp_path, engine) -> None:
    """A client SIGKILLed mid-upload (its task waiting for a busy engine, or already on an engine receiving the
    arguments cut-through): the controller frees the partial stream after the stream timeout, the task never
    exists, and the cluster keeps working."""
    up = Upload(scluster, sclient, procs, client_script, tmp_path / "release", engine)
    try:
        os.kill(up.proc.pid, signal.SIGKILL)
        up.proc.wait(10)
        up.check_freed(time.monotonic())
        assert_serving(sclient, up.free)
    finally:
        up.release()
    assert stored_outcome(sclient, up.tid) == "ResultNotFound"
    assert_serving(sclient)
    idle_stats(sclient)


@pytest.mark.parametrize("engine", ["waiting", "receiving"])
def test_stalled_uploader_times_out(scluster, sclient, procs, client_script, tmp_path, engine) -> None:
    """A client SIGSTOPped mid-upload: other work goes on, the controller abandons the stream after the
    timeout, and the client, once resumed, learns that its task failed."""
    up = Upload(scluster, sclient, procs, client_script, tmp_path / "release", engine)
    stopped = time.monotonic()
    os.kill(up.proc.pid, signal.SIGSTOP)
    try:
        assert_serving(sclient, up.free)  # other streams and tasks proceed meanwhile
        served = time.monotonic() - stopped
        up.check_freed(stopped)
        freed = time.monotonic() - stopped
        print(f"stalled uploader: other work took {served:.2f}s meanwhile")
        assert freed > TIMEOUT - 1.0  # not dropped before its timeout
    finally:
        os.kill(up.proc.pid, signal.SIGCONT)
        up.release()
    outcome = read_json_line(up.proc, timeout=30)
    assert isinstance(outcome, dict)
    print(f"resumed uploader ({engine} engine) got: {outcome}")
    # (a receiving engine times out as well, and may report before the controller notices: same outcome)
    assert outcome.get("error") == "StreamTimeout", outcome
    assert stored_outcome(sclient, up.tid) == "ResultNotFound"
    assert up.proc.wait(15) == 0
    assert_serving(sclient)
    idle_stats(sclient)


def test_stalled_downloader_is_dropped(scluster, sclient, procs, client_script) -> None:
    """A client SIGSTOPped while downloading a large stored result: the controller drops the outbound stream
    after the timeout; the resumed client fails with StreamTimeout; the stored result is intact."""
    size = 100 * MiB
    ar = sclient.load_balanced_view().apply_async(ones, size)
    ar.get(timeout=30)
    tid = ar.task_ids[0]
    del ar
    idle_stats(sclient)
    proc, got_tid = start_client(procs, client_script, scluster, "download", 0.05, tid)
    assert got_tid == tid
    wait_until("the download to start", lambda: stats(sclient)["streams_outbound"] >= 1, 30)
    os.kill(proc.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_until("the stalled download to be dropped", lambda: stats(sclient)["streams_outbound"] == 0,
                   TIMEOUT + 5)
        freed = time.monotonic() - stopped
        print(f"\nstalled downloader: outbound stream dropped {freed:.2f}s after SIGSTOP")
        assert freed > TIMEOUT - 1.0
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    outcome = read_json_line(proc, timeout=30)
    assert isinstance(outcome, dict)
    assert outcome.get("error") == "StreamTimeout", outcome
    assert proc.wait(15) == 0
    value = sclient.get_result(tid, block=True, timeout=30)  # nothing was lost from the store
    assert_same(value, np.ones(size // 8))
    del value
    sclient.purge_results([tid])
    idle_stats(sclient)


# ------------------------------------------------------------------------------------------ 6: engine killed


def busy_engine(client: fedpar.Client) -> dict[str, Any]:
    busy = [e for e in client.status()["engines"] if e["load"] >= 1]
    assert len(busy) == 1, busy
    return busy[0]


@pytest.mark.parametrize("retries", [0, 1])
def test_engine_killed_mid_result_stream(fast_loss_cluster: fedpar.Cluster, retries: int) -> None:
    """The engine streaming a 160 MiB result is SIGKILLed: without retries the task fails with EngineError,
    with one retry the other engine's result arrives whole; no stream stays open in the controller."""
    cluster = fast_loss_cluster
    client = cluster.connect_client()
    try:
        size = 160 * MiB
        before = idle_stats(client)
        ar = client.load_balanced_view(retries=retries).apply_async(throttled_ones, size, 0.01)
        wait_until("the result stream to start", lambda: (s := stats(client))["streams_inbound"] >= 1
                   and s["chunks"] >= before["chunks"] + 5, 30)
        victim = busy_engine(client)
        assert victim["pid"] in cluster.engine_pids
        os.kill(victim["pid"], signal.SIGKILL)
        if retries == 0:
            with pytest.raises(fedpar.EngineError) as info:
                ar.get(timeout=30)
            assert info.value.task_id == ar.task_ids[0]
            assert stored_outcome(client, ar.task_ids[0]).startswith("EngineError")  # the store says the same
        else:
            assert_same(ar.get(timeout=30), np.ones(size // 8))
        end = idle_stats(client, timeout=TIMEOUT + 5)
        assert victim["id"] not in [e["id"] for e in client.status()["engines"]]
        assert end["streams_in"] - before["streams_in"] == retries + 1  # one result stream per attempt
        assert_serving(client)
        idle_stats(client)
    finally:
        client.close()


def throttle_uploads(client: fedpar.Client, delay: float) -> None:
    """Slow down this client's chunk uploads to one per ``delay`` seconds (its I/O thread sleeps)."""
    io = client._io
    send = io._send

    def slow_send(link: Any, msg: Message, frames: list[Any], reply: Any) -> int:
        if isinstance(msg, Chunk):
            time.sleep(delay)
        return send(link, msg, frames, reply)

    io._send = slow_send  # type: ignore[method-assign]  # this client only


@pytest.mark.parametrize("retries", [0, 1])
def test_engine_killed_mid_arguments_stream(fast_loss_cluster: fedpar.Cluster, retries: int) -> None:
    """The engine receiving a task's 96 MiB arguments (cut-through, while the client still uploads them) is
    SIGKILLed. With a retry, the other engine gets the whole arguments (from the store) and the task succeeds.
    Without, the submission is refused with EngineError and nothing of the task is stored (it was never
    recorded: its arguments never arrived whole)."""
    cluster = fast_loss_cluster
    client = cluster.connect_client()
    uploader = cluster.connect_client()
    try:
        throttle_uploads(uploader, 0.04)  # ~4 s of upload: the engine's loss is noticed well before its end
        a = np.arange(96 * MiB // 8, dtype=np.float64) * 3.0
        want = zlib.crc32(a)
        before = idle_stats(client)
        ar = uploader.load_balanced_view(retries=retries).apply_async(checksum, a)
        tid = ar.task_ids[0]
        wait_until("the engine to receive the arguments", lambda: (s := stats(client))["streams_inbound"] >= 1
                   and s["streams_outbound"] >= 1 and s["chunks"] >= before["chunks"] + 5, 30)
        victim = busy_engine(client)
        os.kill(victim["pid"], signal.SIGKILL)
        if retries:
            assert ar.get(timeout=60) == want  # the retry's engine got every byte
            assert stored_outcome(client, tid) == f"value {want!r}"
        else:
            with pytest.raises(fedpar.EngineError) as info:
                ar.get(timeout=30)
            assert info.value.task_id == tid
        end = idle_stats(client, timeout=TIMEOUT + 5)
        assert victim["id"] not in [e["id"] for e in client.status()["engines"]]
        assert end["streams_failed"] - before["streams_failed"] == (0 if retries else 1)
        assert_serving(client)
        if not retries:  # the refused submission left nothing in the store
            records = [f"{r.task_id} {r.state}" for r in client.query_tasks() if r.task_id == tid]
            assert (stored_outcome(client, tid), records) == ("ResultNotFound", [])
    finally:
        uploader.close()
        client.close()


# ------------------------------------------------------------------------------------------ raw protocol


@pytest.fixture
def raw(zctx: zmq.Context[Any], scluster: fedpar.Cluster) -> Iterator[Callable[[str], RawClient]]:
    made: list[RawClient] = []

    def make(tag: str) -> RawClient:
        assert scluster.info is not None
        r = RawClient(zctx, scluster.info, tag)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_raw_streamed_push_is_accepted(raw, sclient) -> None:
    """Positive control for the raw tests: a hand-driven streamed push, sent as credit allows, is accepted and
    lands on the engine."""
    r = raw("ok")
    target = r.hello().engines[0]
    a = np.arange(3 * MiB // 8 + 11, dtype=np.float64)
    frames = dumps({"raw_pushed": a})
    tid = f"raw-ok-{next(_counter)}"
    sender = r.announce(tid, target, 7, frames)
    while not sender.done:
        sender.grant(r.credit(7), time.monotonic())
        for index, data in sender.ready():
            r.send(Chunk(7, index), [data])
    r.expect("the acknowledgement", accepted(tid))
    got = sclient.get_result(tid, block=True, timeout=10)
    assert got is None
    assert np.array_equal(sclient[target].pull("raw_pushed", block=True), a)
    sclient[target].execute("del raw_pushed", block=True)
    idle_stats(sclient)


def test_tampered_chunk_aborts_the_upload(raw, sclient) -> None:
    """Chunk 1 of an upload has one payload byte flipped after signing: the controller counts a
    SignatureError, aborts the stream with StreamCorrupted, rejects the task, and keeps nothing."""
    before = idle_stats(sclient)
    r = raw("tamper")
    target = r.hello().engines[0]
    frames = dumps({"tampered": np.arange(3 * MiB // 8, dtype=np.float64)})
    tid = f"raw-tamper-{next(_counter)}"
    sid = 11
    sender = r.announce(tid, target, sid, frames)
    sender.grant(r.credit(sid), time.monotonic())
    assert sender.upto >= 2
    chunks = list(sender.ready(2))
    r.send(Chunk(sid, 0), [chunks[0][1]])
    parts = r.chunk_parts(sid, 1, chunks[1][1])
    payload = bytearray(parts[-1])
    payload[len(payload) // 2] ^= 0x01
    parts[-1] = bytes(payload)
    send_parts(r.sock, parts)

    abort = r.expect("StreamAbort", aborted(sid))
    assert isinstance(abort, StreamAbort) and abort.ename == "StreamCorrupted", abort
    reply = r.expect("the rejection", rejected(tid))
    assert isinstance(reply, SubmitReply)
    assert [x[1] for x in reply.rejected if x[0] == tid] == ["StreamCorrupted"]
    assert tid not in reply.accepted
    after = idle_stats(sclient)
    assert drops(before, after, PROTOCOL_DROPS) == {"SignatureError": 1}
    assert after["streams_failed"] == before["streams_failed"] + 1
    assert after.get("submitted", 0) == before.get("submitted", 0)  # never recorded
    # the remaining chunks of the dead stream are ignored, the task never exists
    for index, data in sender.ready():
        r.send(Chunk(sid, index), [data])
    with pytest.raises(fedpar.ResultNotFound):
        sclient.get_result(tid, block=True, timeout=10)
    assert_serving(sclient)
    assert idle_stats(sclient)["streams_failed"] == after["streams_failed"]


def test_unknown_and_out_of_order_chunks(raw, sclient) -> None:
    """Chunks that do not fit: an unknown stream is answered with StreamAborted; a skipped index, a wrong
    size and a reused stream id abort their streams (StreamCorrupted / StreamAborted) and reject their tasks;
    the controller keeps serving throughout."""
    before = idle_stats(sclient)
    r = raw("order")
    target = r.hello().engines[0]
    frames = dumps({"ordered": np.arange(3 * MiB // 8, dtype=np.float64)})
    data0 = memory_source(frames)(0, 0, 0, frame_size(frames[0]))
    data1 = memory_source(frames)(1, 0, 0, CHUNK_BYTES)

    # a chunk of a stream never announced
    r.send(Chunk(424242, 0), [b"x" * 100])
    abort = r.expect("StreamAbort of the unknown stream", aborted(424242))
    assert isinstance(abort, StreamAbort) and abort.ename == "StreamAborted"

    # chunk 1 before chunk 0
    tid1 = f"raw-skip-{next(_counter)}"
    r.announce(tid1, target, 21, frames)
    r.credit(21)
    r.send(Chunk(21, 1), [data1])
    abort = r.expect("StreamAbort of the skipping stream", aborted(21))
    assert isinstance(abort, StreamAbort) and abort.ename == "StreamCorrupted"
    r.expect("the rejection of the skipping task", rejected(tid1))

    # chunk 0 one byte short of the announced layout
    tid2 = f"raw-short-{next(_counter)}"
    r.announce(tid2, target, 22, frames)
    r.credit(22)
    r.send(Chunk(22, 0), [bytes(data0)[:-1]])
    abort = r.expect("StreamAbort of the short chunk", aborted(22))
    assert isinstance(abort, StreamAbort) and abort.ename == "StreamCorrupted"
    r.expect("the rejection of the short task", rejected(tid2))

    # the same stream id announced again: the first stream is dead, the second one completes
    tid3, tid4 = f"raw-old-{next(_counter)}", f"raw-new-{next(_counter)}"
    r.announce(tid3, target, 23, frames)
    r.credit(23)
    r.send(Chunk(23, 0), [data0])
    sender = r.announce(tid4, target, 23, frames)
    reply = r.expect("the rejection of the replaced stream's task", rejected(tid3))
    assert isinstance(reply, SubmitReply)
    assert [x[1] for x in reply.rejected if x[0] == tid3] == ["StreamAborted"]
    while not sender.done:
        sender.grant(r.credit(23), time.monotonic())
        for index, data in sender.ready():
            r.send(Chunk(23, index), [data])
    r.expect("the acknowledgement of the new stream's task", accepted(tid4))

    for tid in (tid1, tid2, tid3):
        with pytest.raises(fedpar.ResultNotFound):
            sclient.get_result(tid, block=True, timeout=10)
    assert sclient.get_result(tid4, block=True, timeout=10) is None
    assert np.array_equal(sclient[target].pull("ordered", block=True), np.arange(3 * MiB // 8, dtype=np.float64))
    after = idle_stats(sclient)
    assert after["streams_failed"] == before["streams_failed"] + 3
    assert drops(before, after, PROTOCOL_DROPS) == {}  # every message was authentic and well formed
    assert_serving(sclient)


# ------------------------------------------------------------------------------------------ client downloads


class FakeController(threading.Thread):
    """A ROUTER that answers a real ``Client``: ``Welcome`` with stream settings, then each ``GetResults``
    with a streamed result of ``frames``, misbehaving according to the task id's prefix:
    ``tamper`` (chunk 1 altered after signing), ``short`` (chunk 1 one byte short), ``stall`` (no chunk)."""

    def __init__(self, ctx: zmq.Context[Any], key: bytes, frames: list[Any], timeout: float):
        super().__init__(name="fake-controller", daemon=True)
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.codec = Codec(key, "controller:fake")
        self.frames = frames
        self.settings = {"threshold": THRESHOLD, "window": 4, "timeout": timeout}
        self.senders: dict[int, tuple[str, Sender]] = {}
        self.aborts: list[StreamAbort] = []
        self.errors: list[BaseException] = []
        self.halt = threading.Event()
        self._sids = iter(range(100, 10**6))

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                if self.sock.poll(50):
                    parts = self.sock.recv_multipart()
                    self.handle(parts[0], self.codec.decode(parts, 1))
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)
        finally:
            self.sock.close(0)

    def encode(self, ident: bytes, msg: Message, frames: list[Any] | None = None) -> list[Any]:
        return [ident, *self.codec.encode(msg, frames or [])[0]]

    def handle(self, ident: bytes, rx: Received) -> None:
        msg = rx.msg
        if isinstance(msg, ClientHello):
            self.sock.send_multipart(self.encode(ident, Welcome(rx.envelope.id, "fake", [], self.settings)))
        elif isinstance(msg, GetResults):
            for tid in msg.task_ids:
                sid = next(self._sids)
                sizes = [frame_size(f) for f in self.frames]
                now = time.time()
                res = ResultSpec(tid, True, 0, now, now, None, 0, [sid, sizes])
                self.senders[sid] = (tid, Sender(sid, sizes, memory_source(self.frames), time.monotonic()))
                self.sock.send_multipart(self.encode(ident, Results([res], [], rx.envelope.id)))
        elif isinstance(msg, Credit):
            tid, sender = self.senders[msg.sid]
            if tid.startswith("stall"):
                return
            sender.grant(msg.upto, time.monotonic())
            for index, data in sender.ready():
                if index == 1 and tid.startswith("short"):
                    data = bytes(data)[:-1]
                parts = self.encode(ident, Chunk(msg.sid, index), [data])
                if index == 1 and tid.startswith("tamper"):
                    payload = bytearray(parts[-1])
                    payload[7] ^= 0x80
                    parts[-1] = bytes(payload)
                self.sock.send_multipart(parts)
        elif isinstance(msg, StreamAbort):
            self.aborts.append(msg)


def test_client_download_checks_chunks(zctx: zmq.Context[Any], tmp_path: Path) -> None:
    """A real Client against a fake controller: an intact streamed result arrives whole and writable; a
    tampered chunk fails the result with StreamCorrupted, a short chunk too, a silent stream with
    StreamTimeout; the client tells the controller each time (StreamAbort) and stays usable."""
    key = os.urandom(32)
    want = np.arange(3 * MiB // 8 + 9, dtype=np.float64).reshape(-1, 1)
    fake = FakeController(zctx, key, dumps_result(want), timeout=1.5)
    fake.start()
    info = ConnectionInfo("fake", key, fake.endpoint, fake.endpoint, "fake", os.getpid(), str(tmp_path),
                          time.time())
    client = fedpar.Client(info, timeout=10, lost_after=None)
    try:
        assert_same(client.get_result("ok-1", block=True, timeout=10), want)
        with pytest.raises(fedpar.StreamCorrupted) as tampered:
            client.get_result("tamper-1", block=True, timeout=10)
        assert tampered.value.task_id == "tamper-1"
        with pytest.raises(fedpar.StreamCorrupted):
            client.get_result("short-1", block=True, timeout=10)
        t0 = time.monotonic()
        with pytest.raises(fedpar.StreamTimeout):
            client.get_result("stall-1", block=True, timeout=10)
        assert time.monotonic() - t0 > 1.0
        assert_same(client.get_result("ok-2", block=True, timeout=10), want)  # still usable
        wait_until("three StreamAborts", lambda: len(fake.aborts) >= 3, 5)
        by_task = {fake.senders[a.sid][0]: a.ename for a in fake.aborts}
        assert by_task == {"tamper-1": "StreamCorrupted", "short-1": "StreamCorrupted",
                           "stall-1": "StreamTimeout"}
        assert not client.outstanding
    finally:
        client.close()
        fake.halt.set()
        fake.join(5)
    assert not fake.errors, fake.errors


# ------------------------------------------------------------------------------------------ 8: concurrency


def test_many_concurrent_streams(sclient: fedpar.Client) -> None:
    """12 load-balanced echoes of distinct 6 MB arrays and 2 push/pulls at once: all exact, every stream
    counted, none left open."""
    before = idle_stats(sclient)
    lv = sclient.load_balanced_view()
    arrays = [np.arange(6_000_000 // 8, dtype=np.float64) + 1000.0 * i for i in range(12)]
    pushed = [np.arange(5 * MiB // 4 + i, dtype=np.int32) * (i + 2) for i in range(2)]
    ars = [lv.apply_async(echo, a) for a in arrays]
    ids = sclient.ids
    pushes = [sclient[ids[i]].push({f"concurrent_{i}": pushed[i]}) for i in range(2)]
    pulls = [sclient[ids[i]].pull(f"concurrent_{i}") for i in range(2)]  # queued behind each push
    for ar, a in zip(ars, arrays, strict=True):
        assert_same(ar.get(timeout=60), a)
    for p in pushes:
        assert p.get(timeout=60) is None
    for p, a in zip(pulls, pushed, strict=True):
        assert_same(p.get(timeout=60), a)
    after = idle_stats(sclient)
    assert after["streams_in"] - before["streams_in"] == 12 * 2 + 2 + 2
    assert after["streams_out"] - before["streams_out"] == 12 * 2 + 2 + 2
    assert after["streams_failed"] == before["streams_failed"]
    assert after["streams_inbound"] == after["streams_outbound"] == 0
    sclient[:].execute("for _n in ('concurrent_0', 'concurrent_1'):\n    globals().pop(_n, None)", block=True)
