"""On-disk layout of the controller's LMDB store: sub-database names, key layouts, constants.

Sub-databases (all keys and values are bytes; integers are big-endian so keys sort numerically):

``tasks``
    task id (utf-8) -> msgpack(``TaskRecord.to_row()``)
``inputs``
    task id + ``\\x00`` + frame index (u32) + chunk index (u32) -> raw bytes of a task's input payload,
    kept until its result is stored so queued tasks can be re-queued after a restart
``results``
    task id -> msgpack(``ResultRecord.to_row()``)
``blobs``
    task id + ``\\x00`` + frame index (u32) + chunk index (u32) -> raw bytes of a result's payload
``engines``
    engine id (u64) -> msgpack(``EngineRecord.to_row()``)
``marks``
    sender id (utf-8) -> u64 replay high-water mark
``meta``
    ``schema_version``, ``epoch``, ``tasks_done``, ``tasks_failed``, ... -> u64
``completed_idx``
    completion time in microseconds (u64) + task id -> ``b""`` (purge-by-age and time queries)
``open_idx``
    task id -> ``b""`` while the task is queued, assigned or running (a restart reads only these, so its
    time does not grow with the results stored)
``streams``
    ``b"i"`` or ``b"r"`` + task id -> ``b""`` while a streamed input (``inputs``) or result (``blobs``) is
    being written chunk by chunk; a restart deletes the partial chunks of the entries it finds

Payload frames are split into chunks of at most :data:`CHUNK` bytes; every frame has at least one chunk
(a zero-length frame has one empty chunk), so frame boundaries survive a round trip (helpers at the end
of this module write, read and delete them). The frames of one task that together hold at most
:data:`PACK_LIMIT` bytes (the common case: a function and its arguments) are stored as one msgpack list
under the single key ``prefix + PACKED``: one B-tree insert instead of one per frame. Task ids never
contain ``"\\x00"``, which makes ``task id + b"\\x00"`` an unambiguous key prefix.

Change :data:`SCHEMA_VERSION` whenever a key layout or a record's field order changes.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgpack  # type: ignore[import-untyped, unused-ignore]

from fedpar.wire.protocol import CHUNK_BYTES

if TYPE_CHECKING:
    import lmdb

SCHEMA_VERSION: Final = 3
UPGRADABLE: Final = (2,)  # older versions this one opens by adding what it lacks (v3 added ``streams``)

CHUNK: Final = CHUNK_BYTES  # largest value written for one payload chunk (1 MiB, the stream chunk size)

# Sub-database names.
TASKS: Final = b"tasks"
INPUTS: Final = b"inputs"
RESULTS: Final = b"results"
BLOBS: Final = b"blobs"
ENGINES: Final = b"engines"
MARKS: Final = b"marks"
META: Final = b"meta"
COMPLETED_IDX: Final = b"completed_idx"
OPEN_IDX: Final = b"open_idx"  # task id -> b"" for tasks not finished: a restart reads only these
STREAMS: Final = b"streams"  # b"i"/b"r" + task id -> b"" while a streamed payload is partly written
ALL_DBS: Final = (TASKS, INPUTS, RESULTS, BLOBS, ENGINES, MARKS, META, COMPLETED_IDX, OPEN_IDX, STREAMS)
STREAM_INPUT: Final = b"i"
STREAM_RESULT: Final = b"r"

# Keys in ``meta``.
META_SCHEMA_VERSION: Final = b"schema_version"
META_EPOCH: Final = b"epoch"
META_TASKS_DONE: Final = b"tasks_done"
META_TASKS_FAILED: Final = b"tasks_failed"

# LMDB's default maximum key size is 511 bytes; the longest key is a chunk key (id + 9 bytes).
MAX_ID_BYTES: Final = 480

U64: Final = struct.Struct(">Q")
FRAME_CHUNK: Final = struct.Struct(">II")
PACKED: Final = FRAME_CHUNK.pack(0xFFFFFFFF, 0)  # key suffix of a task's frames packed into one value
PACK_LIMIT: Final = 64 * 1024
_U64_MAX: Final = (1 << 64) - 1


def task_key(task_id: str) -> bytes:
    """The ``tasks`` / ``results`` key of ``task_id``; ValueError if the id is unusable."""
    key = task_id.encode()
    if b"\x00" in key or not 0 < len(key) <= MAX_ID_BYTES:
        raise ValueError(
            f"invalid task id {task_id!r}: must be 1..{MAX_ID_BYTES} utf-8 bytes without NUL characters"
        )
    return key


def chunk_prefix(task_key_: bytes) -> bytes:
    """The prefix shared by every ``inputs`` / ``blobs`` chunk key of one task."""
    return task_key_ + b"\x00"


def chunk_key(prefix: bytes, frame: int, chunk: int) -> bytes:
    """The key of chunk ``chunk`` of frame ``frame`` under ``prefix`` (see :func:`chunk_prefix`)."""
    return prefix + FRAME_CHUNK.pack(frame, chunk)


def chunk_frame(key: bytes) -> int:
    """The frame index encoded in a chunk key."""
    frame: int = FRAME_CHUNK.unpack_from(key, len(key) - FRAME_CHUNK.size)[0]
    return frame


def engine_key(engine_id: int) -> bytes:
    """The ``engines`` key of ``engine_id`` (a non-negative integer)."""
    if not 0 <= engine_id <= _U64_MAX:
        raise ValueError(f"invalid engine id {engine_id!r}: must be a non-negative 64-bit integer")
    return U64.pack(engine_id)


def mark_key(sender: str) -> bytes:
    """The ``marks`` key of a sender id; ValueError if the id is unusable."""
    key = sender.encode("utf-8")
    if not key or len(key) > MAX_ID_BYTES:
        raise ValueError(f"invalid sender id {sender!r}: must be 1..{MAX_ID_BYTES} utf-8 bytes")
    return key


def pack_u64(value: int) -> bytes:
    """An unsigned integer as 8 big-endian bytes; ValueError if out of range."""
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"{value!r} is not an unsigned 64-bit integer")
    return U64.pack(value)


def unpack_u64(data: bytes) -> int:
    """The inverse of :func:`pack_u64`."""
    value: int = U64.unpack(data)[0]
    return value


def micros(ts: float) -> int:
    """A time in seconds as whole microseconds, clamped to the u64 range (NaN -> 0)."""
    try:
        us = int(ts * 1_000_000)
    except (OverflowError, ValueError):  # inf, nan
        return _U64_MAX if ts > 0 else 0
    return us if 0 <= us <= _U64_MAX else (0 if us < 0 else _U64_MAX)


def completed_key(completed: float, task_key_: bytes) -> bytes:
    """The ``completed_idx`` key of a result completed at ``completed`` (seconds since the epoch)."""
    try:
        return U64.pack(int(completed * 1_000_000)) + task_key_
    except (struct.error, OverflowError, ValueError):
        return U64.pack(micros(completed)) + task_key_


def completed_key_id(key: bytes) -> str:
    """The task id encoded in a ``completed_idx`` key."""
    return key[U64.size:].decode("utf-8")


# -- payload frames <-> chunks ---------------------------------------------------------------------


class HasBuffer(Protocol):
    """A zmq.Frame-like object exposing its bytes as ``.buffer``."""

    @property
    def buffer(self) -> memoryview: ...


Frame = bytes | bytearray | memoryview | HasBuffer
"""A payload frame as callers hand it to the store."""
ByteBuf = bytes | bytearray | memoryview


def flat_frame(f: Frame) -> ByteBuf:
    """``f`` as a flat byte buffer whose ``len`` is its size in bytes (no copy when possible)."""
    if type(f) is bytes or type(f) is bytearray:
        return f
    mv = f if isinstance(f, memoryview) else memoryview(f.buffer if hasattr(f, "buffer") else f)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B") if mv.c_contiguous else memoryview(mv.tobytes())
    elif not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    return mv


def delete_prefix(cur: lmdb.Cursor[bytes], prefix: bytes) -> None:
    """Delete every key that starts with ``prefix`` from the database of write cursor ``cur``."""
    if cur.set_range(prefix):
        while cur.key().startswith(prefix):
            if not cur.delete():
                break


def put_frames(txn: lmdb.Transaction[bytes], db: Any, prefix: bytes, frames: list[ByteBuf]) -> None:
    """Write ``frames`` (flat, see :func:`flat_frame`) as chunks under ``prefix``."""
    if len(frames) > 1 and sum(len(f) for f in frames) <= PACK_LIMIT:
        txn.put(prefix + PACKED, msgpack.packb([bytes(f) for f in frames], use_bin_type=True), db=db)
        return
    pack = FRAME_CHUNK.pack
    for i, f in enumerate(frames):
        n = len(f)
        if n <= CHUNK:
            txn.put(prefix + pack(i, 0), f, db=db)
        else:
            mv = memoryview(f)  # slices of a memoryview do not copy
            for c, off in enumerate(range(0, n, CHUNK)):
                txn.put(prefix + pack(i, c), mv[off : off + CHUNK], db=db)


def get_frames(txn: lmdb.Transaction[bytes], db: Any, prefix: bytes) -> list[bytes] | None:
    """The frames stored under ``prefix``, reassembled in order; None if there are none."""
    cur = txn.cursor(db)
    if not cur.set_range(prefix):
        return None
    frames: list[bytes] = []
    parts: list[bytes] = []
    current = -1
    for key, value in cur:
        if not key.startswith(prefix):
            break
        if key.endswith(PACKED) and len(key) == len(prefix) + len(PACKED):
            packed: list[bytes] = msgpack.unpackb(value, use_list=True)
            return packed
        idx = chunk_frame(key)
        if idx != current:
            if parts:
                frames.append(parts[0] if len(parts) == 1 else b"".join(parts))
            parts, current = [], idx
        parts.append(value)
    if current < 0:
        return None
    frames.append(parts[0] if len(parts) == 1 else b"".join(parts))
    return frames
