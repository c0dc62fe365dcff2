"""Tests for fedpar.wire.streams (pure stream bookkeeping: layout, heads, Sender, Receiver) and the [stream] config."""

from __future__ import annotations

import array
import collections
import dataclasses
import math
import mmap
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from fedpar.config import CONFIG_ENV, Config, StreamConfig, load_config
from fedpar.errors import ConfigError, MalformedMessage, StreamCorrupted, StreamError
from fedpar.wire.codec import Codec
from fedpar.wire.payload import dumps, loads
from fedpar.wire.protocol import CHUNK_BYTES, MAX_FRAMES, Chunk, Credit
from fedpar.wire.streams import (
    MAX_STREAM_BYTES,
    Receiver,
    Sender,
    StreamSettings,
    flat,
    layout,
    memory_source,
    parse_head,
    should_stream,
    untrusted_chunk_sid,
)

MiB = 1 << 20
KiB = 1 << 10
KEY = b"k" * 32


def blob(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-per-chunk bytes (so a chunk written at the wrong offset is noticed)."""
    return random.Random(seed).randbytes(size)


def chunk_count(size: int) -> int:
    return max(1, math.ceil(size / CHUNK_BYTES))


# -- StreamSettings --------------------------------------------------------------------------------


def test_settings_defaults_and_wire_round_trip() -> None:
    d = StreamSettings()
    assert (d.threshold, d.window, d.timeout, d.direct) == (4 * MiB, 8, 30.0, True)
    s = StreamSettings(threshold=123, window=3, timeout=2.5, direct=False)
    wire = s.to_wire()
    assert wire == {"threshold": 123, "window": 3, "timeout": 2.5, "direct": False}
    assert StreamSettings.from_wire(wire) == s
    assert StreamSettings.from_wire(msgpack.unpackb(msgpack.packb(wire), raw=False)) == s


def test_settings_missing_fields_keep_defaults() -> None:
    assert StreamSettings.from_wire({}) == StreamSettings()
    assert StreamSettings.from_wire({"window": 2}) == StreamSettings(window=2)
    assert StreamSettings.from_wire({"threshold": 0, "unknown": "x"}) == StreamSettings(threshold=0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", -1), ("threshold", "4MiB"), ("threshold", None), ("threshold", 1.5), ("threshold", [1]),
        ("window", 0), ("window", -3), ("window", "8"), ("window", 2.0), ("window", None),
        ("timeout", 0), ("timeout", 0.0), ("timeout", -1.0), ("timeout", "30"), ("timeout", None),
        ("timeout", float("nan")), ("direct", 1), ("direct", "false"), ("direct", None),
    ],
)
def test_settings_bad_fields_keep_defaults(field: str, value: object) -> None:
    got = StreamSettings.from_wire({field: value})
    assert got == StreamSettings()
    others = StreamSettings(threshold=7, window=5, timeout=9.0)
    got = StreamSettings.from_wire({**others.to_wire(), field: value})  # one bad field does not spoil the others
    assert got.to_wire() == {**others.to_wire(), field: getattr(StreamSettings(), field)}


def test_settings_integer_timeout_becomes_float() -> None:
    got = StreamSettings.from_wire({"timeout": 7})
    assert got.timeout == 7.0 and type(got.timeout) is float


@pytest.mark.parametrize("field", ["threshold", "window", "timeout"])
def test_settings_bool_fields_keep_defaults(field: str) -> None:
    assert StreamSettings.from_wire({field: True}) == StreamSettings()


# -- should_stream ---------------------------------------------------------------------------------


def test_should_stream_threshold_is_exclusive() -> None:
    assert not should_stream([], 0)
    assert not should_stream([b""], 0)
    assert should_stream([b"x"], 0)
    assert not should_stream([b"a" * 10], 10)
    assert should_stream([b"a" * 11], 10)
    assert not should_stream([b"a" * 4, b"b" * 6], 10)  # the total counts, not each frame
    assert should_stream([b"a" * 4, b"b" * 6, b"c"], 10)


def test_should_stream_counts_bytes_of_any_buffer() -> None:
    arr = np.zeros(100, dtype=np.float64)  # 800 bytes in 100 items
    assert should_stream([arr.data], 799)
    assert not should_stream([arr.data], 800)
    assert should_stream([bytearray(5), array.array("i", [1, 2])], 12)  # 5 + 8
    assert not should_stream([bytearray(5), array.array("i", [1, 2])], 13)


# -- layout ----------------------------------------------------------------------------------------


def test_layout_examples() -> None:
    C = CHUNK_BYTES
    assert layout([]) == []
    assert layout([0]) == [(0, 0, 0, 0)]
    assert layout([1]) == [(0, 0, 0, 1)]
    assert layout([C]) == [(0, 0, 0, C)]
    assert layout([C + 1]) == [(0, 0, 0, C), (0, 1, C, 1)]
    assert layout([0, 3 * C + C // 2, 0, 5]) == [
        (0, 0, 0, 0),
        (1, 0, 0, C), (1, 1, C, C), (1, 2, 2 * C, C), (1, 3, 3 * C, C // 2),
        (2, 0, 0, 0),
        (3, 0, 0, 5),
    ]


def test_chunk_size_is_one_mib() -> None:
    assert CHUNK_BYTES == 1 << 20


@pytest.mark.parametrize("seed", range(20))
def test_layout_invariants(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, rng.randrange(10 * CHUNK_BYTES)])
             for _ in range(rng.randrange(1, 12))]
    chunks = layout(sizes)
    assert len(chunks) == sum(chunk_count(n) for n in sizes)
    by_frame: dict[int, list[tuple[int, int, int, int]]] = collections.defaultdict(list)
    for c in chunks:
        by_frame[c[0]].append(c)
    assert [c[0] for c in chunks] == sorted(c[0] for c in chunks)  # stream order: frame by frame
    assert sorted(by_frame) == list(range(len(sizes)))
    for frame, size in enumerate(sizes):
        cs = by_frame[frame]
        assert [c[1] for c in cs] == list(range(len(cs)))
        assert sum(c[3] for c in cs) == size
        pos = 0
        for _, _, off, n in cs:
            assert off == pos and 0 <= n <= CHUNK_BYTES
            pos += n
        assert all(c[3] == CHUNK_BYTES for c in cs[:-1])  # only the last chunk of a frame may be short


# -- parse_head ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        [1, [0]],
        [7, [0, 1, CHUNK_BYTES, CHUNK_BYTES + 1]],
        [(1 << 63) - 1, [5]],
        [1, [0] * MAX_FRAMES],
        [1, [MAX_STREAM_BYTES]],
        [2, [MAX_STREAM_BYTES - 1, 1]],
    ],
)
def test_parse_head_accepts(raw: list[Any]) -> None:
    sid, sizes = parse_head(raw)
    assert sid == raw[0] and sizes == raw[1]


@pytest.mark.parametrize(
    "raw",
    [
        None, 5, "head", b"head", {"sid": 1, "sizes": [1]}, (1, [1]),  # not a list
        [], [1], [1, [1], 2],  # wrong arity
        [True, [1]], [False, [1]], [0, [1]], [-1, [1]], [1 << 63, [1]], [1.0, [1]], ["1", [1]], [None, [1]],  # sid
        [1, []], [1, None], [1, 5], [1, "12"], [1, (1, 2)], [1, {0: 1}],  # sizes container
        [1, [-1]], [1, [1, -1]], [1, [True]], [1, [False]], [1, [1.0]], [1, ["1"]], [1, [None]], [1, [[1]]],
        [1, [0] * (MAX_FRAMES + 1)],  # too many frames
        [1, [MAX_STREAM_BYTES + 1]], [1, [MAX_STREAM_BYTES, 1]], [1, [1 << 39] * 3],  # more than 1 TiB
    ],
)
def test_parse_head_rejects(raw: Any) -> None:
    with pytest.raises(MalformedMessage):
        parse_head(raw)


def test_parse_head_of_a_wire_round_trip() -> None:
    raw = msgpack.unpackb(msgpack.packb([99, [0, 3 * CHUNK_BYTES]]), raw=False)
    assert parse_head(raw) == (99, [0, 3 * CHUNK_BYTES])


# -- flat and memory_source ------------------------------------------------------------------------


def test_flat_of_byte_buffers_is_zero_copy() -> None:
    ba = bytearray(b"hello world")
    mv = flat(ba)
    assert mv.ndim == 1 and mv.itemsize == 1 and mv.nbytes == 11
    ba[0:1] = b"J"
    assert bytes(mv) == b"Jello world"
    assert bytes(flat(b"abc")) == b"abc"


def test_flat_of_typed_and_multidimensional_buffers() -> None:
    arr = np.arange(12, dtype=np.float64).reshape(3, 4)
    mv = flat(arr)
    assert mv.format == "B" and mv.ndim == 1 and mv.nbytes == arr.nbytes
    assert bytes(mv) == arr.tobytes()
    arr[0, 0] = 42.0  # C-contiguous: cast, no copy
    assert bytes(mv[:8]) == np.float64(42.0).tobytes()
    ints = array.array("i", range(10))
    assert bytes(flat(ints)) == ints.tobytes()
    assert bytes(flat(memoryview(bytes(range(20)))[::3])) == bytes(range(0, 20, 3))  # strided: copied


def test_flat_of_non_contiguous_array_copies_in_c_order() -> None:
    arr = np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2]
    assert not arr.flags.c_contiguous
    mv = flat(arr)
    assert mv.ndim == 1 and mv.itemsize == 1 and bytes(mv) == np.ascontiguousarray(arr).tobytes()


def test_memory_source_slices_frames() -> None:
    last = bytearray(blob(10, 2))
    frames = [b"", blob(3 * KiB, 1), last]
    src = memory_source(frames)
    assert bytes(src(0, 0, 0, 0)) == b""
    assert bytes(src(1, 0, 0, 1000)) == frames[1][:1000]
    assert bytes(src(1, 2, 2000, 1072)) == frames[1][2000:]
    view = src(2, 0, 0, 10)
    assert isinstance(view, memoryview)
    last[0] ^= 0xFF  # a view of the frame itself, not a copy
    assert bytes(view) == bytes(last)


# -- Sender ----------------------------------------------------------------------------------------


def sender(sizes: Sequence[int], now: float = 0.0, sid: int = 1) -> tuple[Sender, list[bytes]]:
    frames = [blob(n, i) for i, n in enumerate(sizes)]
    return Sender(sid, sizes, memory_source(frames), now), frames


def test_sender_basics() -> None:
    s, _ = sender([0, CHUNK_BYTES + 5, 3])
    assert len(s) == 4 and s.sid == 1 and s.sizes == [0, CHUNK_BYTES + 5, 3]
    assert [s.length(i) for i in range(4)] == [0, CHUNK_BYTES, 5, 3]
    assert not s.done and s.next == 0 and s.upto == 0 and s.available == 4
    assert list(s.ready()) == []  # no credit yet
    assert not s.done


def test_sender_sends_only_with_credit_and_in_order() -> None:
    sizes = [2 * CHUNK_BYTES + 7, 0, 1]
    s, frames = sender(sizes)
    s.grant(2, 1.0)
    got = list(s.ready())
    assert [i for i, _ in got] == [0, 1]
    assert bytes(got[0][1]) == frames[0][:CHUNK_BYTES]
    assert bytes(got[1][1]) == frames[0][CHUNK_BYTES:2 * CHUNK_BYTES]
    assert list(s.ready()) == []  # already sent
    s.grant(10, 2.0)  # beyond the end: clamped
    assert s.upto == len(s) == 5
    got = list(s.ready())
    assert [i for i, _ in got] == [2, 3, 4]
    assert [bytes(d) for _, d in got] == [frames[0][2 * CHUNK_BYTES:], b"", frames[2]]
    assert s.done
    assert list(s.ready()) == []


def test_sender_grant_never_moves_backwards() -> None:
    s, _ = sender([5 * CHUNK_BYTES])
    s.grant(3, 1.0)
    assert (s.upto, s.touched) == (3, 1.0)
    s.grant(1, 2.0)
    s.grant(3, 3.0)  # not a move either
    assert (s.upto, s.touched) == (3, 1.0)
    assert [i for i, _ in s.ready()] == [0, 1, 2]
    s.grant(0, 4.0)
    assert list(s.ready()) == [] and s.upto == 3
    s.grant(4, 5.0)
    assert (s.upto, s.touched) == (4, 5.0)
    assert [i for i, _ in s.ready()] == [3]


def test_sender_ready_limit() -> None:
    s, _ = sender([0] * 10)
    s.grant(8, 1.0)
    assert [i for i, _ in s.ready(3)] == [0, 1, 2]
    assert [i for i, _ in s.ready(0)] == []
    assert [i for i, _ in s.ready(1)] == [3]
    assert [i for i, _ in s.ready(100)] == [4, 5, 6, 7]  # credit still bounds it
    assert s.next == 8 and not s.done


def test_sender_ready_stops_at_available() -> None:
    """A relay forwarding a stream it is still receiving: chunks not at the source yet are not sent."""
    s, _ = sender([0] * 6)
    s.available = 2
    s.grant(5, 1.0)
    assert [i for i, _ in s.ready()] == [0, 1]
    s.available = 4
    assert [i for i, _ in s.ready(1)] == [2]
    assert [i for i, _ in s.ready()] == [3]
    s.available = 6
    assert [i for i, _ in s.ready()] == [4]  # now credit is the bound
    s.grant(6, 2.0)
    assert [i for i, _ in s.ready()] == [5]
    assert s.done


def test_sender_marks_chunks_as_they_are_taken() -> None:
    s, _ = sender([0] * 4)
    s.grant(4, 1.0)
    it = s.ready()
    assert next(it)[0] == 0
    assert s.next == 1  # the generator is lazy: abandoning it leaves the rest unsent
    del it
    assert [i for i, _ in s.ready()] == [1, 2, 3]


def test_sender_reads_the_source_lazily_with_layout_arguments() -> None:
    calls: list[tuple[int, int, int, int]] = []

    def source(frame: int, chunk: int, off: int, n: int) -> bytes:
        calls.append((frame, chunk, off, n))
        return b"\0" * n

    sizes = [CHUNK_BYTES * 2 + 1, 0]
    s = Sender(3, sizes, source, 0.0)
    assert calls == []
    s.grant(2, 0.0)
    list(s.ready())
    assert calls == layout(sizes)[:2]
    s.grant(4, 0.0)
    list(s.ready())
    assert calls == layout(sizes)


def test_sender_idle() -> None:
    s, _ = sender([0, 0, 0], now=100.0)
    assert not s.idle(110.0, 10.0)  # not more than the timeout
    assert s.idle(110.5, 10.0)
    s.grant(1, 110.0)
    assert not s.idle(115.0, 10.0)
    list(s.ready())  # sending does not count as progress: only the receiver's credit does
    assert s.idle(120.5, 10.0)
    s.grant(3, 121.0)
    list(s.ready())
    assert s.done
    assert not s.idle(10_000.0, 10.0)  # a finished stream is never idle


def test_sender_of_no_frames_is_done() -> None:
    s = Sender(1, [], memory_source([]), 0.0)
    assert len(s) == 0 and s.done and list(s.ready()) == [] and not s.idle(100.0, 1.0)


# -- Receiver --------------------------------------------------------------------------------------


def test_receiver_first_credit_is_immediate_then_half_window() -> None:
    r = Receiver(1, [0] * 20, window=8, now=0.0)
    assert len(r) == 20 and not r.done
    assert r.credit() == 8
    assert r.credit() is None  # nothing consumed yet
    for i in range(3):
        r.accept(i, b"", 0.0)
        assert r.credit() is None  # 5 of 8 still outstanding
    r.accept(3, b"", 0.0)
    assert r.credit() == 12  # half the window consumed: top up to consumed + window
    assert r.credit() is None
    for i in range(4, 8):
        r.accept(i, b"", 0.0)
    assert r.credit() == 16
    for i in range(8, 12):
        r.accept(i, b"", 0.0)
    assert r.credit() == 20  # the end
    for i in range(12, 20):
        assert r.credit() is None
        r.accept(i, b"", 0.0)
    assert r.done and r.credit() is None


def test_receiver_grants_the_end_without_waiting_for_half_a_window() -> None:
    r = Receiver(1, [0] * 10, window=8, now=0.0)
    assert r.credit() == 8
    r.accept(0, b"", 0.0)
    assert r.credit() is None  # 9 < 10 and 7 outstanding
    r.accept(1, b"", 0.0)
    assert r.credit() == 10  # reaches the end: granted although only 2 were consumed


def test_receiver_small_stream_gets_all_credit_at_once() -> None:
    r = Receiver(1, [5, 0], window=8, now=0.0)
    assert r.credit() == 2
    assert r.credit() is None


@pytest.mark.parametrize("window", [0, 1])
def test_receiver_window_of_one(window: int) -> None:
    r = Receiver(1, [0] * 3, window=window, now=0.0)
    assert r.window == 1
    assert r.credit() == 1
    assert r.credit() is None
    r.accept(0, b"", 0.0)
    assert r.credit() == 2
    r.accept(1, b"", 0.0)
    assert r.credit() == 3
    r.accept(2, b"", 0.0)
    assert r.done and r.credit() is None


def test_receiver_of_no_frames() -> None:
    r = Receiver(1, [], window=4, now=0.0)
    assert r.done and r.credit() is None and r.frames() == [] and r.nbytes == 0


def test_receiver_rejects_out_of_order_chunks() -> None:
    r = Receiver(5, [0] * 4, window=4, now=0.0)
    assert r.credit() == 4
    with pytest.raises(StreamCorrupted, match="stream 5: got chunk 1, expected chunk 0"):
        r.accept(1, b"", 0.0)
    r.accept(0, b"", 0.0)
    with pytest.raises(StreamCorrupted):
        r.accept(0, b"", 0.0)  # a duplicate
    with pytest.raises(StreamCorrupted):
        r.accept(-1, b"", 0.0)
    with pytest.raises(StreamCorrupted):
        r.accept(3, b"", 0.0)
    assert r.next == 1
    r.accept(1, b"", 0.0)


def test_receiver_rejects_chunks_without_credit() -> None:
    r = Receiver(5, [0] * 4, window=2, now=0.0)
    with pytest.raises(StreamCorrupted, match="without credit"):
        r.accept(0, b"", 0.0)  # before any credit was announced
    assert r.credit() == 2
    r.accept(0, b"", 0.0)
    r.accept(1, b"", 0.0)
    with pytest.raises(StreamCorrupted, match="without credit"):
        r.accept(2, b"", 0.0)
    assert r.credit() == 4
    r.accept(2, b"", 0.0)


def test_receiver_rejects_wrong_sizes() -> None:
    r = Receiver(5, [CHUNK_BYTES + 3, 0], window=4, now=0.0)
    r.credit()
    with pytest.raises(StreamCorrupted, match="has 3 bytes, the layout says 1048576"):
        r.accept(0, b"abc", 0.0)
    with pytest.raises(StreamCorrupted):
        r.accept(0, bytes(CHUNK_BYTES + 1), 0.0)
    r.accept(0, bytes(CHUNK_BYTES), 0.0)
    with pytest.raises(StreamCorrupted):
        r.accept(1, b"abcd", 0.0)
    with pytest.raises(StreamCorrupted):
        r.accept(1, np.zeros(3, dtype=np.int64), 0.0)  # 24 bytes, even though 3 items
    r.accept(1, memoryview(b"abc"), 0.0)
    with pytest.raises(StreamCorrupted):
        r.accept(2, b"x", 0.0)  # the empty frame still has its one (empty) chunk
    r.accept(2, b"", 0.0)
    assert r.done


def test_receiver_accepts_typed_buffers_by_byte_size() -> None:
    ints = np.arange(3, dtype=np.int32)  # 12 bytes in 3 items
    r = Receiver(5, [12, CHUNK_BYTES], window=4, now=0.0)
    r.credit()
    r.accept(0, ints.data, 0.0)
    big = np.arange(CHUNK_BYTES // 8, dtype=np.float64)
    r.accept(1, big, 0.0)
    small, large = r.frames()
    assert bytes(small) == ints.tobytes() and bytes(large) == big.tobytes()


def test_receiver_rejects_chunks_after_done() -> None:
    r = Receiver(5, [1], window=4, now=0.0)
    r.credit()
    r.accept(0, b"x", 0.0)
    assert r.done
    for index in (0, 1):
        with pytest.raises(StreamCorrupted):
            r.accept(index, b"x", 0.0)
    assert r.frames() == [bytearray(b"x")]


def test_stream_corrupted_is_a_stream_error() -> None:
    assert issubclass(StreamCorrupted, StreamError)


def test_receiver_rejected_chunk_changes_nothing() -> None:
    r = Receiver(5, [4], window=4, now=1.0)
    r.credit()
    with pytest.raises(StreamCorrupted):
        r.accept(0, b"toolong", 9.0)
    assert r.next == 0 and r.touched == 1.0 and not r.done
    r.accept(0, b"good", 10.0)
    assert r.frames() == [bytearray(b"good")]


def test_receiver_frames_buffers() -> None:
    sizes = [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1]
    r = Receiver(1, sizes, window=100, now=0.0)
    assert r.nbytes == sum(sizes)
    with pytest.raises(RuntimeError):
        r.frames()
    frames = [blob(n, i) for i, n in enumerate(sizes)]
    r.credit()
    for i, (frame, _, off, n) in enumerate(layout(sizes)):
        with pytest.raises(RuntimeError):
            r.frames()
        r.accept(i, memoryview(frames[frame])[off:off + n], 0.0)
    got = r.frames()
    assert [type(f) for f in got] == [bytearray, bytearray, bytearray, mmap.mmap, mmap.mmap]
    assert [len(f) for f in got] == sizes
    assert [bytes(f) for f in got] == frames
    for f in got:
        assert not memoryview(f).readonly


def test_receiver_with_a_sink() -> None:
    calls: list[tuple[int, int, int, bytes]] = []
    sizes = [CHUNK_BYTES + 2, 0, 3]
    frames = [blob(n, i) for i, n in enumerate(sizes)]
    r = Receiver(1, sizes, window=2, now=0.0, sink=lambda f, c, o, d: calls.append((f, c, o, bytes(d))))
    for i, (frame, _, off, n) in enumerate(layout(sizes)):
        if (upto := r.credit()) is not None:
            assert upto > i
        r.accept(i, frames[frame][off:off + n], float(i))
    assert r.done and r.touched == 3.0
    assert calls == [
        (0, 0, 0, frames[0][:CHUNK_BYTES]),
        (0, 1, CHUNK_BYTES, frames[0][CHUNK_BYTES:]),
        (1, 0, 0, b""),
        (2, 0, 0, frames[2]),
    ]
    with pytest.raises(RuntimeError):
        r.frames()  # the chunks went to the sink


def test_receiver_sink_error_does_not_advance() -> None:
    def sink(_f: int, _c: int, _o: int, _d: Any) -> None:
        raise OSError("disk")

    r = Receiver(1, [1, 1], window=2, now=0.0, sink=sink)
    r.credit()
    with pytest.raises(OSError):
        r.accept(0, b"x", 1.0)
    assert r.next == 0


def test_receiver_idle() -> None:
    r = Receiver(1, [0, 0], window=1, now=50.0)
    assert not r.idle(55.0, 5.0)
    assert r.idle(55.1, 5.0)
    r.credit()  # granting credit is not progress of the sender
    assert r.idle(55.1, 5.0)
    r.accept(0, b"", 60.0)
    assert not r.idle(64.0, 5.0) and r.idle(65.5, 5.0)
    r.credit()
    r.accept(1, b"", 70.0)
    assert r.done and not r.idle(1e9, 5.0)


# -- full round trips through the credit loop ------------------------------------------------------


def transfer(
    snd: Sender, rcv: Receiver, rng: random.Random | None = None, *, reorder_check: bool = True,
) -> int:
    """Drive ``snd`` -> ``rcv`` honouring credit, with chunks in flight in a queue between them.

    ``rng`` varies how many chunks the sender sends and the receiver takes per step. Returns the most
    chunks that were ever in flight (sent, not yet accepted), which credit bounds by the window.
    """
    wire: collections.deque[tuple[int, Any]] = collections.deque()
    now, most = 0.0, 0
    for _ in range(10 * len(rcv) + 10):
        if rcv.done:
            break
        now += 1.0
        if (upto := rcv.credit()) is not None:
            snd.grant(upto, now)
        limit = None if rng is None else rng.randrange(1, 4)
        wire.extend(snd.ready(limit))
        most = max(most, len(wire))
        assert len(wire) <= rcv.window
        take = len(wire) if rng is None else rng.randrange(0, len(wire) + 1)
        for _ in range(take):
            index, data = wire.popleft()
            rcv.accept(index, data, now)
    assert rcv.done and snd.done and not wire
    return most


ODD_SIZES = {"empty": 0, "one": 1, "mib": CHUNK_BYTES, "mib_plus_one": CHUNK_BYTES + 1, "3.5mib": 7 * CHUNK_BYTES // 2}


def odd_arrays() -> dict[str, Any]:
    rng = np.random.default_rng(1234)
    out: dict[str, Any] = {
        "empty": np.zeros(0, dtype=np.uint8),
        "one": np.array([0xA5], dtype=np.uint8),
        "mib": rng.standard_normal(CHUNK_BYTES // 8),  # float64: exactly 1 MiB
        "mib_plus_one": rng.integers(0, 256, CHUNK_BYTES + 1, dtype=np.uint8),
        "3.5mib": rng.integers(-(1 << 31), 1 << 31, 7 * CHUNK_BYTES // 8, dtype=np.int32).reshape(-1, 64),
    }
    for name, arr in out.items():
        assert arr.nbytes == ODD_SIZES[name]
    out["fortran"] = np.asfortranarray(rng.standard_normal((300, 7)))
    out["meta"] = {"label": "odd sizes", "n": 5}
    return out


@pytest.mark.parametrize("window", [1, 2, 3, 8])
def test_round_trip_of_numpy_payload(window: int) -> None:
    obj = odd_arrays()
    frames = dumps(obj)
    sizes = [memoryview(f).nbytes for f in frames]
    assert len(frames) > 5 and sum(sizes) > 5 * CHUNK_BYTES
    assert should_stream(frames, StreamSettings().threshold)
    sid, head = parse_head(msgpack.unpackb(msgpack.packb([42, sizes]), raw=False))
    snd = Sender(sid, head, memory_source(frames), 0.0)
    rcv = Receiver(sid, head, window, 0.0)
    most = transfer(snd, rcv)
    assert most <= window
    got = rcv.frames()
    assert [bytes(g) for g in got] == [bytes(memoryview(f)) for f in frames]
    back = loads(got)
    assert back.keys() == obj.keys() and back["meta"] == obj["meta"]
    for name in (*ODD_SIZES, "fortran"):
        assert back[name].dtype == obj[name].dtype and back[name].shape == obj[name].shape
        np.testing.assert_array_equal(back[name], obj[name])
        assert back[name].flags.writeable
    assert back["fortran"].flags.f_contiguous


def test_round_trip_rebuilds_arrays_zero_copy() -> None:
    """``loads`` builds the arrays on the receiver's buffers (bytearray and mmap) without copying them."""
    small = np.arange(100, dtype=np.int64)  # 800 bytes: a bytearray frame
    big = np.arange(CHUNK_BYTES // 4 + 3, dtype=np.int32)  # a little over 1 MiB: an mmap frame
    frames = dumps([small, big])
    sizes = [memoryview(f).nbytes for f in frames]
    rcv = Receiver(1, sizes, 4, 0.0)
    transfer(Sender(1, sizes, memory_source(frames), 0.0), rcv)
    got = rcv.frames()
    assert [type(g) for g in got[1:]] == [bytearray, mmap.mmap]
    back_small, back_big = loads(got)
    got[1][0:8] = np.int64(-7).tobytes()
    got[2][0:4] = np.int32(-9).tobytes()
    assert back_small[0] == -7 and back_big[0] == -9  # the arrays see writes to the received buffers
    back_big[1] = 12345
    assert bytes(got[2][4:8]) == np.int32(12345).tobytes()


def test_round_trip_into_a_sink() -> None:
    frames = dumps({"a": np.arange(300_000, dtype=np.float32), "b": b"x" * 10})
    sizes = [memoryview(f).nbytes for f in frames]
    store: dict[tuple[int, int], bytes] = {}
    rcv = Receiver(9, sizes, 3, 0.0, sink=lambda f, c, _o, d: store.__setitem__((f, c), bytes(d)))
    transfer(Sender(9, sizes, memory_source(frames), 0.0), rcv)
    assert sorted(store) == [(f, c) for f, c, _, _ in layout(sizes)]
    rebuilt = [b"".join(store[(f, c)] for c in range(chunk_count(n))) for f, n in enumerate(sizes)]
    back = loads(rebuilt)
    np.testing.assert_array_equal(back["a"], np.arange(300_000, dtype=np.float32))
    assert back["b"] == b"x" * 10


SIZE_CHOICES = (0, 1, 2, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 2 * CHUNK_BYTES)


@pytest.mark.parametrize("seed", range(25))
def test_round_trip_random_sizes(seed: int) -> None:
    rng = random.Random(seed)
    nframes = rng.randrange(1, 7)
    sizes = [rng.choice(SIZE_CHOICES) if rng.random() < 0.5 else rng.randrange(0, 3 * CHUNK_BYTES)
             for _ in range(nframes)]
    frames: list[Any] = [rng.randbytes(n) for n in sizes]
    if nframes > 1:  # mix buffer kinds the sender accepts
        frames[0] = bytearray(frames[0])
        frames[-1] = memoryview(frames[-1])
    window = rng.randrange(1, 6)
    chunks = layout(sizes)
    snd = Sender(seed + 1, sizes, memory_source(frames), 0.0)
    rcv = Receiver(seed + 1, sizes, window, 0.0)
    assert len(snd) == len(rcv) == len(chunks) == sum(chunk_count(n) for n in sizes)
    most = transfer(snd, rcv, rng)
    assert 1 <= most <= window
    got = rcv.frames()
    assert [len(g) for g in got] == sizes
    assert [bytes(g) for g in got] == [bytes(f) for f in frames]


@pytest.mark.parametrize("seed", range(10))
def test_random_corruption_is_detected(seed: int) -> None:
    """A chunk dropped, duplicated, or cut short somewhere in a stream raises StreamCorrupted there."""
    rng = random.Random(1000 + seed)
    sizes = [rng.randrange(0, 3 * CHUNK_BYTES) for _ in range(rng.randrange(1, 4))]
    chunks = layout(sizes)
    rcv = Receiver(1, sizes, len(chunks), 0.0)
    rcv.credit()
    bad = rng.randrange(len(chunks))
    for i in range(bad):
        rcv.accept(i, bytes(chunks[i][3]), 0.0)
    right = chunks[bad][3]
    how = rng.choice(["skip", "repeat", "short", "long"])
    if how == "skip":  # the chunk after the expected one (or one past the end), of the right size for it
        index, size = bad + 1, (chunks[bad + 1][3] if bad + 1 < len(chunks) else 0)
    elif how == "repeat":  # the previous chunk again (or index -1 before the first)
        index, size = bad - 1, (chunks[bad - 1][3] if bad else 0)
    elif how == "short" and right > 0:
        index, size = bad, right - 1
    else:  # too long
        index, size = bad, right + 1
    with pytest.raises(StreamCorrupted):
        rcv.accept(index, bytes(size), 0.0)
    assert rcv.next == bad


# -- untrusted_chunk_sid ---------------------------------------------------------------------------


def chunk_message(sid: int, data: bytes = b"payload") -> list[Any]:
    parts, _ = Codec(KEY, "engine-1").encode(Chunk(sid, 3), [data])
    return parts


def test_untrusted_chunk_sid_of_a_tampered_chunk() -> None:
    parts = chunk_message(77)
    parts[-1] = b"tampered"
    assert untrusted_chunk_sid(parts) == 77
    assert untrusted_chunk_sid([b"identity", *parts], 1) == 77  # a ROUTER socket's identity frame first
    assert untrusted_chunk_sid([zmq.Frame(bytes(memoryview(p))) for p in parts]) == 77  # received frames
    assert untrusted_chunk_sid([b"identity", *[zmq.Frame(bytes(memoryview(p))) for p in parts]], 1) == 77


def test_untrusted_chunk_sid_of_other_messages() -> None:
    parts, _ = Codec(KEY, "engine-1").encode(Credit(77, 4))
    assert untrusted_chunk_sid(parts) is None
    assert untrusted_chunk_sid(chunk_message(77), 1) is None  # the wrong offset: the payload is no header


@pytest.mark.parametrize(
    "parts",
    [
        [], [b""], [b"", b"mac"],  # too short
        [b"", b"mac", b"\xc1"],  # not msgpack (0xc1 is never used)
        [b"", b"mac", msgpack.packb({"kind": "chunk", "sid": 1}) + b"extra"],  # trailing bytes
        [b"", b"mac", msgpack.packb(["chunk", 1])],  # not a map
        [b"", b"mac", msgpack.packb({"kind": "credit", "sid": 1})],
        [b"", b"mac", msgpack.packb({"kind": "chunk"})],
        [b"", b"mac", msgpack.packb({"kind": "chunk", "sid": True})],
        [b"", b"mac", msgpack.packb({"kind": "chunk", "sid": "1"})],
        [b"", b"mac", msgpack.packb({"kind": "chunk", "sid": 1.0})],
        [b"", b"mac", msgpack.packb({"kind": b"chunk", "sid": 1})],
        [b"", b"mac", None],
        [b"", b"mac", 12],
    ],
)
def test_untrusted_chunk_sid_of_garbage(parts: list[Any]) -> None:
    assert untrusted_chunk_sid(parts) is None


def test_untrusted_chunk_sid_ignores_nothing_but_the_header() -> None:
    header = msgpack.packb({"kind": "chunk", "sid": 5})
    assert untrusted_chunk_sid([b"", b"no mac", header]) == 5
    assert untrusted_chunk_sid([b"x", b"", b"no mac", memoryview(header), b"data"], 1) == 5


# -- [stream] configuration ------------------------------------------------------------------------


@pytest.fixture
def no_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)


def ini(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fedpar.ini"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.usefixtures("no_env_config")
def test_stream_config_defaults() -> None:
    cfg = load_config()
    assert cfg.stream == StreamConfig()
    assert (cfg.stream.threshold, cfg.stream.window, cfg.stream.timeout) == (4 * MiB, 8 * MiB, 30.0)


@pytest.mark.usefixtures("no_env_config")
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("threshold = 512KiB\nwindow = 16MiB\ntimeout = 2.5", StreamConfig(512 * KiB, 16 * MiB, 2.5)),
        ("threshold = 0\nwindow = 1M\ntimeout = 1", StreamConfig(0, MiB, 1.0)),
        ("threshold = 2G\nwindow = 1.5MiB", StreamConfig(2 << 30, 3 * MiB // 2, 30.0)),
        ("threshold = 100\nwindow = 1024KiB  # one chunk", StreamConfig(100, MiB, 30.0)),
        ("window = 1GiB", StreamConfig(window=1 << 30)),
    ],
)
def test_stream_config_from_file(tmp_path: Path, text: str, expected: StreamConfig) -> None:
    cfg = load_config(ini(tmp_path, f"[stream]\n{text}\n"))
    assert cfg.stream == expected
    assert cfg.store == Config().store  # other sections keep their defaults


@pytest.mark.usefixtures("no_env_config")
@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("window = 1023KiB", r"\[stream\] window = 1047552: must be at least 1 MiB"),
        ("window = 0", r"\[stream\] window"),
        ("window = 1048575", r"\[stream\] window"),
        ("threshold = -1", r"\[stream\] threshold"),
        ("threshold = -4MiB", r"\[stream\] threshold"),
        ("threshold = lots", r"\[stream\] threshold"),
        ("timeout = 0", r"\[stream\] timeout"),
        ("timeout = 0.0", r"\[stream\] timeout"),
        ("timeout = -5", r"\[stream\] timeout"),
        ("timeout = nan", r"\[stream\] timeout"),
        ("timeout = inf", r"\[stream\] timeout"),
        ("timeout = soon", r"\[stream\] timeout"),
        ("chunk = 2MiB", r"unknown key 'chunk' in section \[stream\]"),
    ],
)
def test_stream_config_errors(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(ini(tmp_path, f"[stream]\n{text}\n"))


@pytest.mark.usefixtures("no_env_config")
def test_stream_config_errors_from_overrides_and_constructor() -> None:
    with pytest.raises(ConfigError, match=r"\[stream\] threshold = -1: must be >= 0"):
        load_config(overrides={"stream": {"threshold": -1}})
    with pytest.raises(ConfigError, match=r"\[stream\] window"):
        load_config(overrides={"stream": {"window": MiB - 1}})
    with pytest.raises(ConfigError, match=r"\[stream\] timeout"):
        load_config(overrides={"stream": {"timeout": 0}})
    with pytest.raises(ConfigError):
        StreamConfig(window=512 * KiB)
    with pytest.raises(ConfigError):
        dataclasses.replace(StreamConfig(), timeout=-1.0)
    assert load_config(overrides={"stream": {"window": "2MiB", "timeout": 3}}).stream == StreamConfig(
        window=2 * MiB, timeout=3.0)


@pytest.mark.usefixtures("no_env_config")
@pytest.mark.parametrize(
    "stream",
    [
        StreamConfig(),
        StreamConfig(threshold=0, window=MiB, timeout=0.25),
        StreamConfig(threshold=1536 * KiB, window=3 * MiB // 2, timeout=600.0),
        StreamConfig(threshold=12345, window=MiB + 1, timeout=1e-3),
    ],
)
def test_stream_config_to_ini_round_trip(tmp_path: Path, stream: StreamConfig) -> None:
    cfg = dataclasses.replace(Config(), stream=stream)
    text = cfg.to_ini()
    assert "[stream]" in text
    assert load_config(ini(tmp_path, text)) == cfg
