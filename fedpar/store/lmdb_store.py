"""The controller's persistent state: one LMDB environment in its state directory.

(Over the 500-line soft cap, about 620 lines: it is the only module allowed to touch LMDB, one class,
mostly docstrings; key layouts and frame chunking are already in ``schema``.)

One thread (the controller's journal) writes, in batches: it records operations on a :class:`WriteBatch`
(cheap: packing and a list append) and applies the whole batch in one write transaction with
:meth:`LmdbStore.commit`. Any thread may read. The map grows on demand (doubling, up to
``max_map_size``); a store that cannot grow any more, or a full disk, raises :class:`StoreFull` and stays
usable: reads keep working and later commits succeed once space is freed.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import lmdb
import msgpack  # type: ignore[import-untyped, unused-ignore]  # no stubs unless [tool.mypy] ignores it

from fedpar.errors import StoreError, StoreFull
from fedpar.store import schema as S
from fedpar.store.records import UNFINISHED_STATES, EngineRecord, ResultRecord, TaskRecord

_T = TypeVar("_T")
MiB = 1 << 20
TiB = 1 << 40
_LOW_SPACE = 4 * MiB  # free bytes below which an I/O error on write counts as a full disk

# Operation codes recorded by WriteBatch (tuples, dispatched in LmdbStore._apply).
_PUT, _PUT_INPUTS, _PUT_RESULT, _DEL_INPUTS, _DEL_RESULT, _BUMP, _DEL, _STREAM_BEGIN, _STREAM_DROP = range(9)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, strict_map_key=False)


_local = threading.local()


def _pack(obj: Any) -> bytes:
    """msgpack with this thread's ``Packer``: a new ``Packer`` allocates a fresh buffer (256 KiB), which in a
    busy controller cost a fresh mapping and its page faults for every batch (several per pass)."""
    pack: Callable[[Any], bytes] | None = getattr(_local, "pack", None)
    if pack is None:
        pack = _local.pack = msgpack.Packer().pack
    return pack(obj)


class WriteBatch:
    """Operations to apply in one transaction. Only records them; :meth:`LmdbStore.commit` applies them.

    Payload buffers are referenced, not copied: do not mutate them until the batch is committed.
    """

    __slots__ = ("_ops", "_store")

    def __init__(self, store: LmdbStore):
        self._store = store
        self._ops: list[tuple[Any, ...]] = []

    def __len__(self) -> int:
        return len(self._ops)

    def __bool__(self) -> bool:
        return bool(self._ops)

    def put_task(self, rec: TaskRecord) -> None:
        """Store (or replace) a task record."""
        self.put_task_row(rec.task_id, rec.to_row())

    def put_task_row(self, task_id: str, row: list[Any]) -> None:
        """Store (or replace) a task record given as ``TaskRecord.to_row()`` (no record object built).

        Keeps ``open_idx`` in step: a task is in it exactly while its state is unfinished.
        """
        key = S.task_key(task_id)
        self._ops.append((_PUT, self._store._tasks, key, _pack(row)))
        if row[4] in UNFINISHED_STATES:
            self._ops.append((_PUT, self._store._open, key, b""))
        else:
            self._ops.append((_DEL, self._store._open, key))

    def put_inputs(self, task_id: str, frames: Sequence[S.Frame], *, fresh: bool = False) -> None:
        """Store a task's input frames (replacing any stored before). Zero frames store nothing.

        ``fresh=True`` promises that nothing is stored for this task yet (a new submission), which saves
        looking for old frames to replace.
        """
        prefix = S.chunk_prefix(S.task_key(task_id))
        self._ops.append((_PUT_INPUTS, prefix, [S.flat_frame(f) for f in frames], fresh))

    def delete_inputs(self, task_id: str) -> None:
        """Delete a task's input frames, if any."""
        self._ops.append((_DEL_INPUTS, S.chunk_prefix(S.task_key(task_id))))

    def put_result(self, rec: ResultRecord, frames: Sequence[S.Frame], *, streamed: Sequence[int] | None = None,
                   ) -> None:
        """Store a task's result and payload frames; also drops its inputs and bumps a counter.

        The stored record's ``frame_sizes`` are those of ``frames``. Replacing an earlier result of
        the same task replaces its frames and index entry and does not count the task twice.
        ``streamed`` (frame sizes) says the frames were written chunk by chunk already (``put_chunk``
        after ``begin_stream``): the record is stored over them and the stream is closed.
        """
        key = S.task_key(rec.task_id)
        bufs = [S.flat_frame(f) for f in frames]
        row = rec.to_row()
        row[6] = list(streamed) if streamed is not None else [len(b) for b in bufs]
        ckey = S.completed_key(rec.completed, key)
        self._ops.append((_PUT_RESULT, key, _pack(row), ckey, bool(rec.ok), bufs, streamed is not None))

    # -- streamed payloads: written chunk by chunk, over several transactions -----------------------
    def begin_stream(self, kind: bytes, task_id: str) -> None:
        """Start writing a streamed input (``S.STREAM_INPUT``) or result (``S.STREAM_RESULT``) of a task:
        drops any chunks left under its key and records the stream as partial until ``end_stream``."""
        key = S.task_key(task_id)
        self._ops.append((_STREAM_BEGIN, kind, key))

    def put_chunk(self, kind: bytes, task_id: str, frame: int, chunk: int, data: S.Frame) -> None:
        """Write one chunk of a streamed payload (the buffer is referenced until commit)."""
        db = self._store._inputs if kind == S.STREAM_INPUT else self._store._blobs
        key = S.chunk_key(S.chunk_prefix(S.task_key(task_id)), frame, chunk)
        self._ops.append((_PUT, db, key, S.flat_frame(data)))

    def end_stream(self, kind: bytes, task_id: str) -> None:
        """The stream's chunks are all written (its task record or result goes in the same batch)."""
        self._ops.append((_DEL, self._store._streams, kind + S.task_key(task_id)))

    def drop_stream(self, kind: bytes, task_id: str) -> None:
        """Abandon a partial stream: delete its chunks and its partial mark."""
        self._ops.append((_STREAM_DROP, kind, S.task_key(task_id)))

    def put_engine(self, rec: EngineRecord) -> None:
        """Store (or replace) an engine record."""
        key = S.engine_key(rec.engine_id)
        self._ops.append((_PUT, self._store._engines, key, _pack(rec.to_row())))

    def put_mark(self, sender: str, seq: int) -> None:
        """Set the replay high-water mark of ``sender``."""
        self._ops.append((_PUT, self._store._marks, S.mark_key(sender), S.pack_u64(seq)))

    def delete_mark(self, sender: str) -> None:
        """Forget the replay mark of ``sender``."""
        self._ops.append((_DEL, self._store._marks, S.mark_key(sender)))

    def delete_results(self, task_ids: Collection[str]) -> None:
        """Delete results, result frames, index entries, inputs and task records of ``task_ids``.

        Counters (``tasks_done``/``tasks_failed``) are totals and are not decremented.
        """
        self._ops.extend((_DEL_RESULT, S.task_key(t)) for t in task_ids)

    def extend(self, other: WriteBatch) -> None:
        """Append the operations of ``other`` (same store) to this batch."""
        self._ops.extend(other._ops)

    def set_meta(self, name: str, value: int) -> None:
        """Set the ``meta`` integer ``name`` (read back with ``LmdbStore.counters``)."""
        self._ops.append((_PUT, self._store._meta, name.encode("utf-8"), S.pack_u64(value)))

    def bump(self, counter: str, n: int = 1) -> None:
        """Add ``n`` to the ``meta`` counter ``counter`` (never below zero)."""
        self._ops.append((_BUMP, counter.encode("utf-8"), n))


class LmdbStore:
    """The controller's LMDB store. Written by one thread in batches; readable from any thread.

    ``sync=False`` (default): a commit survives a crash of the process but maybe not of the machine;
    call :meth:`sync` to flush. ``map_size`` is the initial map size; it doubles on demand up to
    ``max_map_size``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_size: int = 64 * MiB,
        max_map_size: int = TiB,
        sync: bool = False,
    ):
        self._path = os.fspath(path)
        if map_size <= 0 or map_size > max_map_size:
            raise ValueError(f"map_size {map_size} must be positive and at most max_map_size {max_map_size}")
        self._max_map_size = max_map_size
        self._wlock = threading.Lock()  # serializes write transactions
        self._rlock = threading.Lock()  # held by readers and by map resizing
        self._closed = True
        _prepare_dir(self._path)
        try:
            self._env = lmdb.open(
                self._path, map_size=map_size, max_dbs=16, sync=sync, metasync=sync, writemap=False,
                readahead=False, lock=True, max_readers=126, mode=0o600, subdir=True,
            )
        except lmdb.Error as e:
            raise StoreError(f"cannot open store at {self._path}: {e}") from e
        try:
            self._open_dbs()
        except BaseException:
            self._env.close()
            raise
        self._closed = False

    def _open_dbs(self) -> None:
        env = self._env
        try:
            with env.begin(write=True) as txn:
                dbs = {name: env.open_db(name, txn=txn) for name in S.ALL_DBS}
                meta = dbs[S.META]
                raw = txn.get(S.META_SCHEMA_VERSION, db=meta)
                if raw is None or (version := S.unpack_u64(raw)) in S.UPGRADABLE:
                    txn.put(S.META_SCHEMA_VERSION, S.pack_u64(S.SCHEMA_VERSION), db=meta)
                elif version != S.SCHEMA_VERSION:
                    raise StoreError(
                        f"store at {self._path} has schema version {version}, "
                        f"this fedpar expects {S.SCHEMA_VERSION}"
                    )
        except lmdb.Error as e:
            raise StoreError(f"cannot open store at {self._path}: {e}") from e
        self._tasks, self._inputs, self._results = dbs[S.TASKS], dbs[S.INPUTS], dbs[S.RESULTS]
        self._blobs, self._engines, self._marks = dbs[S.BLOBS], dbs[S.ENGINES], dbs[S.MARKS]
        self._meta, self._completed, self._open = dbs[S.META], dbs[S.COMPLETED_IDX], dbs[S.OPEN_IDX]
        self._streams = dbs[S.STREAMS]
        self._dbs = dbs
        self._map_size: int = env.info()["map_size"]

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The store's directory."""
        return self._path

    def close(self) -> None:
        """Close the environment. Idempotent."""
        with self._wlock, self._rlock:
            if not self._closed:
                self._closed = True
                self._env.close()

    def __enter__(self) -> LmdbStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sync(self) -> None:
        """Flush committed data to disk (needed for machine-crash durability when ``sync=False``)."""
        with self._wlock:
            self._check_open()
            try:
                self._env.sync(True)
            except lmdb.Error as e:
                raise StoreError(f"syncing store at {self._path} failed: {e}") from e

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store at {self._path} is closed")

    # -- writing ---------------------------------------------------------------------------------

    def batch(self) -> WriteBatch:
        """A new, empty batch of operations for :meth:`commit`."""
        return WriteBatch(self)

    def commit(self, batch: WriteBatch) -> None:
        """Apply every operation of ``batch`` in one write transaction (no-op for an empty batch).

        Raises :class:`StoreFull` when the map cannot grow any more or the disk is full (nothing of
        the batch is applied; the batch can be committed again later), :class:`StoreError` otherwise.
        """
        if not batch._ops:
            return
        if batch._store is not self:
            raise ValueError("the batch belongs to another store")
        ops = batch._ops
        deletes_only = all(op[0] in (_DEL_RESULT, _DEL_INPUTS, _DEL) for op in ops)
        with self._wlock:
            self._check_open()
            self._write(lambda txn: self._apply(txn, ops), deletes_only)
            if deletes_only and self._map_size > self._max_map_size:
                # The reserve is for deleting only: give it back so later writes cannot fill it (LMDB never
                # sets the map below the pages in use, so at worst the pages this purge took remain).
                with self._rlock:
                    self._env.set_mapsize(self._max_map_size)
                    self._map_size = self._env.info()["map_size"]

    def next_epoch(self) -> int:
        """Increment the store's epoch in its own transaction and return it (1 on a fresh store)."""

        def bump(txn: lmdb.Transaction[bytes]) -> int:
            raw = txn.get(S.META_EPOCH, db=self._meta)
            epoch = (S.unpack_u64(raw) if raw is not None else 0) + 1
            txn.put(S.META_EPOCH, S.pack_u64(epoch), db=self._meta)
            return epoch

        with self._wlock:
            self._check_open()
            return self._write(bump)

    def _write(self, fn: Callable[[lmdb.Transaction[bytes]], _T], deletes_only: bool = False) -> _T:
        """Run ``fn`` in a write transaction and commit, growing the map as needed. Holds _wlock.

        LMDB copies pages on write, so even deleting needs free pages: a batch that only deletes may use a
        small reserve above ``max_map_size``, so a full store can always be purged."""
        while True:
            try:
                txn = self._env.begin(write=True)
                try:
                    result = fn(txn)
                except BaseException:
                    txn.abort()
                    raise
                txn.commit()
                return result
            except lmdb.MapFullError:
                self._grow(deletes_only)
            except lmdb.MapResizedError:
                with self._rlock:  # another process grew the map: adopt its size
                    self._env.set_mapsize(0)
                    self._map_size = self._env.info()["map_size"]
            except lmdb.Error as e:
                if reason := self._full_reason(e.code):
                    raise StoreFull(f"store at {self._path}: {reason} ({e})") from e
                raise StoreError(f"write to store at {self._path} failed: {e}") from e
            except OSError as e:
                if reason := self._full_reason(e.errno):
                    raise StoreFull(f"store at {self._path}: {reason} ({e})") from e
                raise StoreError(f"write to store at {self._path} failed: {e}") from e

    def _full_reason(self, code: int | None) -> str | None:
        """Why a failed write means "no space", or None if it does not."""
        if code in (errno.ENOSPC, errno.EDQUOT):
            return "disk full"
        if code == errno.EFBIG:
            return "disk full: file size limit reached"
        if code == errno.EIO:  # LMDB reports a short write (filesystem full mid-write) as EIO
            try:
                st = os.statvfs(self._path)
            except OSError:
                return None
            if st.f_bavail * st.f_frsize < _LOW_SPACE:
                return "disk full (short write)"
        return None

    def _grow(self, deletes_only: bool = False) -> None:
        reserve = max(1 << 20, self._max_map_size // 50)
        if deletes_only and self._max_map_size <= self._map_size < self._max_map_size + 8 * reserve:
            # Relative to the current size: pages a previous purge took above the maximum stay in use.
            with self._rlock:
                self._env.set_mapsize(self._map_size + reserve)
                self._map_size = self._env.info()["map_size"]
            return
        if self._map_size >= self._max_map_size:
            raise StoreFull(
                f"store at {self._path} reached its maximum size of {self._max_map_size} bytes; "
                "purge results or raise [store] max_map_size"
            )
        with self._rlock:  # no read transaction may be active while the map is replaced
            self._env.set_mapsize(min(self._map_size * 2, self._max_map_size))
            self._map_size = self._env.info()["map_size"]

    def _apply(self, txn: lmdb.Transaction[bytes], ops: list[tuple[Any, ...]]) -> None:
        bumps: dict[bytes, int] = {}
        results, blobs, inputs, completed = self._results, self._blobs, self._inputs, self._completed
        icur, bcur = txn.cursor(inputs), txn.cursor(blobs)  # reused for every prefix delete
        for op in ops:
            code = op[0]
            if code == _PUT:
                txn.put(op[2], op[3], db=op[1])
            elif code == _PUT_INPUTS:
                if not op[3]:
                    S.delete_prefix(icur, op[1])
                S.put_frames(txn, inputs, op[1], op[2])
            elif code == _PUT_RESULT:
                _, key, row, ckey, ok, frames, streamed = op
                prefix = key + b"\x00"
                old = txn.get(key, db=results)
                if old is not None:
                    self._drop_result(txn, None if streamed else bcur, key, old, bumps)
                txn.put(key, row, db=results)
                if streamed:
                    txn.delete(S.STREAM_RESULT + key, db=self._streams)
                else:
                    S.put_frames(txn, blobs, prefix, frames)
                txn.put(ckey, b"", db=completed)
                S.delete_prefix(icur, prefix)
                counter = S.META_TASKS_DONE if ok else S.META_TASKS_FAILED
                bumps[counter] = bumps.get(counter, 0) + 1
            elif code == _DEL_INPUTS:
                S.delete_prefix(icur, op[1])
            elif code == _DEL_RESULT:
                key = op[1]
                old = txn.get(key, db=results)
                if old is not None:
                    self._drop_result(txn, bcur, key, old, None)
                txn.delete(key, db=self._tasks)
                txn.delete(key, db=self._open)
                S.delete_prefix(icur, key + b"\x00")
            elif code == _DEL:
                txn.delete(op[2], db=op[1])
            elif code in (_STREAM_BEGIN, _STREAM_DROP):
                _, kind, key = op
                S.delete_prefix(icur if kind == S.STREAM_INPUT else bcur, key + b"\x00")
                if code == _STREAM_BEGIN:
                    txn.put(kind + key, b"", db=self._streams)
                else:
                    txn.delete(kind + key, db=self._streams)
            elif code == _BUMP:
                bumps[op[1]] = bumps.get(op[1], 0) + op[2]
        meta = self._meta
        for counter, n in bumps.items():
            if n:
                raw = txn.get(counter, db=meta)
                value = S.unpack_u64(raw) if raw is not None and len(raw) == 8 else 0
                txn.put(counter, S.pack_u64(max(value + n, 0)), db=meta)

    def _drop_result(
        self,
        txn: lmdb.Transaction[bytes],
        bcur: lmdb.Cursor[bytes] | None,
        key: bytes,
        old: bytes,
        bumps: dict[bytes, int] | None,
    ) -> None:
        """Delete a stored result record, its index entry and (given a cursor) its frames."""
        row = _unpack(old)
        txn.delete(key, db=self._results)
        txn.delete(S.completed_key(row[4], key), db=self._completed)
        if bcur is not None:
            S.delete_prefix(bcur, key + b"\x00")
        if bumps is not None:  # a replaced result: do not count the task twice
            counter = S.META_TASKS_DONE if row[1] else S.META_TASKS_FAILED
            bumps[counter] = bumps.get(counter, 0) - 1

    # -- reading ---------------------------------------------------------------------------------

    def _read(self, fn: Callable[[lmdb.Transaction[bytes]], _T]) -> _T:
        with self._rlock:
            self._check_open()
            try:
                with self._env.begin() as txn:
                    return fn(txn)
            except lmdb.Error as e:
                raise StoreError(f"reading store at {self._path} failed: {e}") from e

    def get_task(self, task_id: str) -> TaskRecord | None:
        """The task record of ``task_id``, or None."""
        raw = self._read(lambda txn: txn.get(S.task_key(task_id), db=self._tasks))
        return TaskRecord.from_row(_unpack(raw)) if raw is not None else None

    def get_inputs(self, task_id: str) -> list[bytes] | None:
        """The input frames of ``task_id``, or None if none are stored."""
        prefix = S.chunk_prefix(S.task_key(task_id))
        return self._read(lambda txn: S.get_frames(txn, self._inputs, prefix))

    def get_inputs_many(self, task_ids: Sequence[str]) -> list[list[bytes] | None]:
        """``get_inputs`` of several tasks in one read transaction."""
        prefixes = [S.chunk_prefix(S.task_key(t)) for t in task_ids]
        return self._read(lambda txn: [S.get_frames(txn, self._inputs, p) for p in prefixes])

    def get_chunk(self, kind: bytes, task_id: str, frame: int, chunk: int) -> bytes | None:
        """One stored chunk of a task's input (``S.STREAM_INPUT``) or result (``S.STREAM_RESULT``) payload."""
        db = self._inputs if kind == S.STREAM_INPUT else self._blobs
        prefix = S.chunk_prefix(S.task_key(task_id))
        key = S.chunk_key(prefix, frame, chunk)

        def read(txn: lmdb.Transaction[bytes]) -> bytes | None:
            got = txn.get(key, db=db)
            if got is None and (packed := txn.get(prefix + S.PACKED, db=db)) is not None:
                frames = msgpack.unpackb(packed, use_list=True)  # small frames stored as one value
                if frame < len(frames):
                    return bytes(frames[frame][chunk * S.CHUNK:(chunk + 1) * S.CHUNK])
            return got

        return self._read(read)

    def partial_streams(self) -> list[tuple[bytes, str]]:
        """``(kind, task id)`` of the streams left partly written (by a controller that died meanwhile)."""
        def scan(txn: lmdb.Transaction[bytes]) -> list[bytes]:
            return [bytes(k) for k in txn.cursor(self._streams).iternext(keys=True, values=False)]

        return [(k[:1], k[1:].decode()) for k in self._read(scan)]

    def get_result_record(self, task_id: str) -> ResultRecord | None:
        """The result record of ``task_id`` without its frames, or None."""
        raw = self._read(lambda txn: txn.get(S.task_key(task_id), db=self._results))
        return ResultRecord.from_row(_unpack(raw)) if raw is not None else None

    def get_result(self, task_id: str) -> tuple[ResultRecord, list[bytes]] | None:
        """The result record of ``task_id`` and its payload frames, or None."""
        key = S.task_key(task_id)

        def read(txn: lmdb.Transaction[bytes]) -> tuple[bytes, list[bytes]] | None:
            raw = txn.get(key, db=self._results)
            if raw is None:
                return None
            return raw, S.get_frames(txn, self._blobs, key + b"\x00") or []

        found = self._read(read)
        if found is None:
            return None
        rec = ResultRecord.from_row(_unpack(found[0]))
        if len(found[1]) != len(rec.frame_sizes):
            raise StoreError(f"store at {self._path}: result {task_id!r} has missing payload frames")
        return rec, found[1]

    def iter_tasks(
        self,
        *,
        states: Collection[str] | None = None,
        engine: int | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[TaskRecord]:
        """Task records matching every filter given, oldest ``submitted`` first.

        ``since``/``until`` bound the submission time as ``since <= submitted < until``; ``limit``
        keeps the oldest matches.
        """
        wanted = frozenset(states) if states is not None else None

        def scan(txn: lmdb.Transaction[bytes]) -> list[list[Any]]:
            rows = []
            for value in txn.cursor(self._tasks).iternext(keys=False, values=True):
                row = _unpack(value)
                if wanted is not None and row[4] not in wanted:
                    continue
                if engine is not None and row[5] != engine:
                    continue
                if (since is not None and row[6] < since) or (until is not None and row[6] >= until):
                    continue
                rows.append(row)
            return rows

        rows = self._read(scan)
        rows.sort(key=lambda r: (r[6], r[0]))
        if limit is not None:
            rows = rows[: max(limit, 0)]
        return [TaskRecord.from_row(r) for r in rows]

    def unfinished_tasks(self) -> list[TaskRecord]:
        """Tasks still queued, assigned or running (to resume after a restart), oldest first.

        Reads ``open_idx``: the cost depends on the unfinished tasks, not on the results stored.
        """

        def read(txn: lmdb.Transaction[bytes]) -> list[list[Any]]:
            tasks = self._tasks
            rows = []
            for key in txn.cursor(self._open).iternext(keys=True, values=False):
                raw = txn.get(key, db=tasks)
                if raw is not None:
                    rows.append(_unpack(raw))
            return rows

        rows = [r for r in self._read(read) if r[4] in UNFINISHED_STATES]
        rows.sort(key=lambda r: (r[6], r[0]))
        return [TaskRecord.from_row(r) for r in rows]

    def engines(self) -> list[EngineRecord]:
        """Every engine record, by engine id."""
        values = self._read(lambda txn: list(txn.cursor(self._engines).iternext(keys=False)))
        return [EngineRecord.from_row(_unpack(v)) for v in values]

    def marks(self) -> dict[str, int]:
        """Replay high-water mark of each sender."""
        items = self._read(lambda txn: list(txn.cursor(self._marks)))
        return {k.decode("utf-8"): S.unpack_u64(v) for k, v in items}

    def counters(self) -> dict[str, int]:
        """Every integer in ``meta`` (``tasks_done`` and ``tasks_failed`` always present)."""
        items = self._read(lambda txn: list(txn.cursor(self._meta)))
        out = {"tasks_done": 0, "tasks_failed": 0}
        out.update({k.decode("utf-8"): S.unpack_u64(v) for k, v in items if len(v) == 8})
        return out

    def completed_before(self, ts: float, limit: int | None = None) -> list[str]:
        """Ids of tasks whose result completed before ``ts`` (seconds), oldest first."""
        bound = S.micros(ts)

        def scan(txn: lmdb.Transaction[bytes]) -> list[str]:
            ids: list[str] = []
            for key in txn.cursor(self._completed).iternext(keys=True, values=False):
                if S.unpack_u64(key[:8]) >= bound or (limit is not None and len(ids) >= limit):
                    break
                ids.append(S.completed_key_id(key))
            return ids

        return self._read(scan)

    def all_result_ids(self) -> list[str]:
        """Ids of every task with a stored result."""
        keys = self._read(lambda txn: list(txn.cursor(self._results).iternext(keys=True, values=False)))
        return [k.decode("utf-8") for k in keys]

    def stats(self) -> dict[str, Any]:
        """Map size, bytes in use, page size and number of entries of each sub-database."""

        def read(txn: lmdb.Transaction[bytes]) -> dict[str, int]:
            return {name.decode(): txn.stat(db)["entries"] for name, db in self._dbs.items()}

        entries = self._read(read)
        with self._rlock:
            self._check_open()
            info, st = self._env.info(), self._env.stat()
        return {
            "path": self._path,
            "map_size": info["map_size"],
            "max_map_size": self._max_map_size,
            "used": st["psize"] * (info["last_pgno"] + 1),
            "psize": st["psize"],
            "entries": entries,
        }


def _prepare_dir(path: str) -> None:
    """Create the state directory with mode 0700, or tighten it to 0700 if we own it."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"store path {path} is not a directory")
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(path, 0o700)
    except OSError as e:
        raise StoreError(f"cannot use store directory {path}: {e}") from e
