"""LmdbStore's streamed payloads (schema v3): chunks written over several commits, partial marks, upgrades.

Against a real LMDB environment in tmp_path (no mocks).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import lmdb
import pytest

from fedpar.errors import StoreError
from fedpar.launch.controller import drop_partial_streams
from fedpar.store import schema
from fedpar.store.lmdb_store import LmdbStore
from fedpar.store.records import DONE, FAILED, QUEUED, ResultRecord, TaskRecord
from fedpar.wire.protocol import CHUNK_BYTES
from fedpar.wire.streams import layout

MiB = 1 << 20
INPUT, RESULT = schema.STREAM_INPUT, schema.STREAM_RESULT
ODD_SIZES = [0, 1, CHUNK_BYTES, CHUNK_BYTES + 1, 7 * CHUNK_BYTES // 2]


def task(tid: str, *, state: str = QUEUED, submitted: float = 100.0) -> TaskRecord:
    return TaskRecord(task_id=tid, client="client-1", op="apply", target=None, state=state, engine=None,
                      submitted=submitted, spec={"stream": [1, [3]]})


def result(tid: str, *, ok: bool = True, completed: float = 200.0) -> ResultRecord:
    err = None if ok else ("ValueError", "bad", "Traceback ...")
    return ResultRecord(task_id=tid, ok=ok, engine=3, started=150.0, completed=completed, error=err)


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(path: Path) -> Iterator[LmdbStore]:
    with LmdbStore(path) as s:
        yield s


def write_chunks(store: LmdbStore, kind: bytes, tid: str, frames: Sequence[bytes], *, per_commit: int = 2,
                 begin: bool = True) -> None:
    """Begin a stream and write its chunks, ``per_commit`` chunks per transaction (like the journal does)."""
    if begin:
        b = store.batch()
        b.begin_stream(kind, tid)
        store.commit(b)
    chunks = layout([len(f) for f in frames])
    for start in range(0, len(chunks), per_commit):
        b = store.batch()
        for frame, chunk, off, n in chunks[start:start + per_commit]:
            b.put_chunk(kind, tid, frame, chunk, memoryview(frames[frame])[off:off + n])
        store.commit(b)


def stream_result(store: LmdbStore, tid: str, frames: Sequence[bytes], *, ok: bool = True,
                  completed: float = 200.0, per_commit: int = 2) -> None:
    write_chunks(store, RESULT, tid, frames, per_commit=per_commit)
    b = store.batch()
    b.put_task(task(tid, state=DONE if ok else FAILED))
    b.put_result(result(tid, ok=ok, completed=completed), [], streamed=[len(f) for f in frames])
    store.commit(b)


def stream_inputs(store: LmdbStore, tid: str, frames: Sequence[bytes], *, per_commit: int = 2) -> None:
    write_chunks(store, INPUT, tid, frames, per_commit=per_commit)
    b = store.batch()
    b.end_stream(INPUT, tid)
    b.put_task(task(tid))
    store.commit(b)


def commit_result(store: LmdbStore, tid: str, frames: list[bytes], *, ok: bool = True,
                  completed: float = 200.0) -> None:
    b = store.batch()
    b.put_task(task(tid, state=DONE))
    b.put_result(result(tid, ok=ok, completed=completed), frames)
    store.commit(b)


def entries(store: LmdbStore) -> dict[str, int]:
    e: dict[str, int] = store.stats()["entries"]
    return e


# -- streamed results ------------------------------------------------------------------------------


@pytest.mark.parametrize("per_commit", [1, 3, 100])
def test_streamed_result_round_trip(store: LmdbStore, per_commit: int) -> None:
    frames = [payload(n, i) for i, n in enumerate(ODD_SIZES)]
    sizes = [len(f) for f in frames]
    stream_result(store, "t", frames, per_commit=per_commit)
    got = store.get_result("t")
    assert got is not None
    rec, back = got
    assert back == frames
    assert rec == dataclasses.replace(result("t"), frame_sizes=tuple(sizes))
    assert store.get_result_record("t") == rec
    assert store.partial_streams() == []
    assert store.all_result_ids() == ["t"]
    assert store.completed_before(1e12) == ["t"]
    assert store.counters()["tasks_done"] == 1
    assert entries(store)["blobs"] == len(layout(sizes))  # one stored value per chunk


def test_get_chunk_reads_each_chunk(store: LmdbStore) -> None:
    frames = [payload(n, 10 + i) for i, n in enumerate(ODD_SIZES)]
    stream_result(store, "t", frames)
    for frame, chunk, off, n in layout([len(f) for f in frames]):
        assert store.get_chunk(RESULT, "t", frame, chunk) == frames[frame][off:off + n]
    assert store.get_chunk(RESULT, "t", len(frames), 0) is None
    assert store.get_chunk(RESULT, "t", 4, 4) is None
    assert store.get_chunk(INPUT, "t", 1, 0) is None  # the other kind lives in another sub-database
    assert store.get_chunk(RESULT, "never", 0, 0) is None


def test_get_chunk_of_partial_stream(store: LmdbStore) -> None:
    data = payload(2 * CHUNK_BYTES + 5)
    b = store.batch()
    b.begin_stream(RESULT, "t")
    b.put_chunk(RESULT, "t", 0, 0, data[:CHUNK_BYTES])
    store.commit(b)
    assert store.get_chunk(RESULT, "t", 0, 0) == data[:CHUNK_BYTES]  # readable before the stream ends
    assert store.get_chunk(RESULT, "t", 0, 1) is None
    assert store.get_result("t") is None  # no record yet
    assert store.partial_streams() == [(RESULT, "t")]


@pytest.mark.parametrize(
    "frames",
    [
        [payload(MiB + 3, 1)],
        [payload(3 * MiB, 2), b"", b"x"],
        [payload(schema.PACK_LIMIT, 3), b"y"],  # just over PACK_LIMIT in total: one value per chunk
    ],
)
def test_get_chunk_of_an_inline_result(store: LmdbStore, frames: list[bytes]) -> None:
    """The gateway streams a large stored result from its chunks, also when it arrived in one message."""
    commit_result(store, "t", frames)
    for frame, chunk, off, n in layout([len(f) for f in frames]):
        assert store.get_chunk(RESULT, "t", frame, chunk) == frames[frame][off:off + n]


def test_get_chunk_of_a_small_inline_result(store: LmdbStore) -> None:
    frames = [b"\x80\x05small pickle" * 100, b"", b"x" * 5000]  # 3 frames, about 7 KiB: stored packed
    commit_result(store, "t", frames)
    for frame, chunk, off, n in layout([len(f) for f in frames]):
        assert store.get_chunk(RESULT, "t", frame, chunk) == frames[frame][off:off + n]


def test_streamed_result_drops_inputs_and_keeps_neighbours(store: LmdbStore) -> None:
    b = store.batch()
    b.put_inputs("t", [b"args"])
    b.put_inputs("t-x", [b"neighbour"])
    store.commit(b)
    stream_result(store, "t-x2", [payload(10)])
    stream_result(store, "t", [payload(CHUNK_BYTES + 1, 3)])
    assert store.get_inputs("t") is None
    assert store.get_inputs("t-x") == [b"neighbour"]
    got = store.get_result("t-x2")
    assert got is not None and got[1] == [payload(10)]


def test_put_result_closes_the_stream_without_end_stream(store: LmdbStore) -> None:
    write_chunks(store, RESULT, "t", [b"abc"])
    assert store.partial_streams() == [(RESULT, "t")]
    b = store.batch()
    b.put_result(result("t"), [], streamed=[3])
    store.commit(b)
    assert store.partial_streams() == []


def test_end_stream_in_the_same_batch_as_the_result(store: LmdbStore) -> None:
    write_chunks(store, RESULT, "t", [b"abc", b"de"])
    b = store.batch()
    b.end_stream(RESULT, "t")
    b.put_result(result("t"), [], streamed=[3, 2])
    store.commit(b)
    got = store.get_result("t")
    assert got is not None and got[1] == [b"abc", b"de"] and got[0].frame_sizes == (3, 2)
    assert store.partial_streams() == []


def test_streamed_result_with_a_missing_frame_is_an_error(store: LmdbStore) -> None:
    write_chunks(store, RESULT, "t", [b"abc"])
    b = store.batch()
    b.put_result(result("t"), [], streamed=[3, 4])  # claims a frame that was never written
    store.commit(b)
    with pytest.raises(StoreError, match="missing payload frames"):
        store.get_result("t")


# -- partial streams -------------------------------------------------------------------------------


def test_partial_streams_lists_begun_but_not_ended(store: LmdbStore, path: Path) -> None:
    assert store.partial_streams() == []
    write_chunks(store, INPUT, "in-open", [payload(CHUNK_BYTES + 1)])
    write_chunks(store, RESULT, "res-open", [payload(7)])
    write_chunks(store, INPUT, "both", [b"i"])
    write_chunks(store, RESULT, "both", [b"r"])
    stream_inputs(store, "in-done", [payload(3)])
    stream_result(store, "res-done", [payload(5)])
    b = store.batch()
    b.begin_stream(RESULT, "no-chunks-yet")
    b.begin_stream(INPUT, "caf\u00e9")
    store.commit(b)
    expected = sorted([(INPUT, "in-open"), (RESULT, "res-open"), (INPUT, "both"), (RESULT, "both"),
                       (RESULT, "no-chunks-yet"), (INPUT, "caf\u00e9")])
    assert sorted(store.partial_streams()) == expected
    assert entries(store)["streams"] == len(expected)
    store.close()
    with LmdbStore(path) as again:  # what a restarted controller finds
        assert sorted(again.partial_streams()) == expected


def test_end_stream_of_inputs(store: LmdbStore) -> None:
    write_chunks(store, INPUT, "t", [b"abc"])
    assert store.partial_streams() == [(INPUT, "t")]
    b = store.batch()
    b.end_stream(INPUT, "t")
    b.end_stream(RESULT, "t")  # no such stream: harmless
    store.commit(b)
    assert store.partial_streams() == []
    assert store.get_inputs("t") == [b"abc"]


def test_drop_stream_deletes_chunks_and_mark(store: LmdbStore) -> None:
    big = [payload(3 * CHUNK_BYTES + 1, 1), b"", payload(10, 2)]
    write_chunks(store, INPUT, "t", big)
    write_chunks(store, RESULT, "t", big)
    write_chunks(store, INPUT, "t-x", [b"neighbour"])  # shares a string prefix, not a key prefix
    b = store.batch()
    b.put_inputs("t2", [b"other"])
    store.commit(b)
    b = store.batch()
    b.drop_stream(INPUT, "t")
    store.commit(b)
    assert store.get_inputs("t") is None
    assert all(store.get_chunk(INPUT, "t", f, c) is None for f, c, _, _ in layout([len(x) for x in big]))
    assert store.get_chunk(RESULT, "t", 0, 0) == big[0][:CHUNK_BYTES]  # the result stream is another one
    assert sorted(store.partial_streams()) == [(INPUT, "t-x"), (RESULT, "t")]
    assert store.get_inputs("t-x") == [b"neighbour"] and store.get_inputs("t2") == [b"other"]
    b = store.batch()
    b.drop_stream(RESULT, "t")
    b.drop_stream(RESULT, "never-begun")
    store.commit(b)
    assert store.get_chunk(RESULT, "t", 0, 0) is None
    assert store.partial_streams() == [(INPUT, "t-x")]
    assert entries(store)["blobs"] == 0 and entries(store)["inputs"] == 2


def test_drop_stream_leaves_a_stored_task_record(store: LmdbStore) -> None:
    b = store.batch()
    b.put_task(task("t"))
    store.commit(b)
    write_chunks(store, INPUT, "t", [b"abc"])
    b = store.batch()
    b.drop_stream(INPUT, "t")
    store.commit(b)
    assert store.get_task("t") == task("t")


def test_begin_stream_clears_leftover_chunks(store: LmdbStore) -> None:
    old = [payload(2 * CHUNK_BYTES + 1, 1), payload(5, 2), payload(CHUNK_BYTES, 3)]
    write_chunks(store, RESULT, "t", old)  # a stream abandoned without drop_stream
    new = [payload(10, 4)]
    stream_result(store, "t", new)
    got = store.get_result("t")
    assert got is not None and got[1] == new and got[0].frame_sizes == (10,)
    assert store.get_chunk(RESULT, "t", 0, 1) is None
    assert store.get_chunk(RESULT, "t", 1, 0) is None
    assert store.get_chunk(RESULT, "t", 2, 0) is None
    assert entries(store)["blobs"] == 1
    assert store.partial_streams() == []


def test_begin_stream_clears_leftover_input_chunks(store: LmdbStore) -> None:
    b = store.batch()
    b.put_inputs("t", [payload(CHUNK_BYTES * 2, 1), b"x", b"y"])
    store.commit(b)
    stream_inputs(store, "t", [b"fresh"])
    assert store.get_inputs("t") == [b"fresh"]
    assert entries(store)["inputs"] == 1


def test_begin_stream_clears_leftovers_stored_packed(store: LmdbStore) -> None:
    b = store.batch()
    b.put_inputs("t", [b"a", b"b", b"c"])  # small frames: one packed value
    store.commit(b)
    stream_inputs(store, "t", [b"fresh", b""])
    assert store.get_inputs("t") == [b"fresh", b""]


# -- a streamed result replacing a stored one ------------------------------------------------------


def test_streamed_result_replaces_inline_result(store: LmdbStore) -> None:
    commit_result(store, "t", [payload(3 * MiB), b"2", b"3"], ok=False, completed=10.0)
    c = store.counters()
    assert (c["tasks_done"], c["tasks_failed"]) == (0, 1)
    new = [payload(CHUNK_BYTES + 1, 9), b""]
    stream_result(store, "t", new, ok=True, completed=30.0)
    got = store.get_result("t")
    assert got is not None
    assert got[1] == new and got[0].ok and got[0].frame_sizes == (CHUNK_BYTES + 1, 0)
    c = store.counters()
    assert (c["tasks_done"], c["tasks_failed"]) == (1, 0)  # not counted twice, the failure is undone
    assert store.completed_before(20.0) == []
    assert store.completed_before(40.0) == ["t"]
    e = entries(store)
    assert e["blobs"] == 3 and e["results"] == 1 and e["completed_idx"] == 1
    assert store.get_chunk(RESULT, "t", 1, 1) is None and store.get_chunk(RESULT, "t", 2, 0) is None


def test_streamed_result_replaces_packed_result(store: LmdbStore) -> None:
    commit_result(store, "t", [b"a", b"b", b"c"])  # stored packed in one value
    stream_result(store, "t", [b"new"])
    got = store.get_result("t")
    assert got is not None and got[1] == [b"new"]
    assert entries(store)["blobs"] == 1
    assert store.counters()["tasks_done"] == 1


def test_streamed_result_replaces_streamed_result(store: LmdbStore) -> None:
    stream_result(store, "t", [payload(3 * CHUNK_BYTES, 1)], completed=10.0)
    stream_result(store, "t", [payload(CHUNK_BYTES, 2)], completed=20.0)
    got = store.get_result("t")
    assert got is not None and got[1] == [payload(CHUNK_BYTES, 2)]
    assert entries(store)["blobs"] == 1
    assert store.counters()["tasks_done"] == 1
    assert store.completed_before(15.0) == []


def test_inline_result_replaces_streamed_result(store: LmdbStore) -> None:
    stream_result(store, "t", [payload(3 * CHUNK_BYTES, 1), b"x"], ok=False)
    commit_result(store, "t", [b"inline"])
    got = store.get_result("t")
    assert got is not None and got[1] == [b"inline"]
    assert entries(store)["blobs"] == 1
    c = store.counters()
    assert (c["tasks_done"], c["tasks_failed"]) == (1, 0)


def test_delete_results_of_a_streamed_result(store: LmdbStore) -> None:
    stream_result(store, "t", [payload(2 * CHUNK_BYTES + 1)])
    b = store.batch()
    b.delete_results(["t"])
    store.commit(b)
    assert store.get_result("t") is None and store.get_chunk(RESULT, "t", 0, 0) is None
    e = entries(store)
    assert e["blobs"] == 0 and e["results"] == 0 and e["completed_idx"] == 0


# -- streamed inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("per_commit", [1, 4])
def test_streamed_inputs_round_trip(store: LmdbStore, per_commit: int) -> None:
    frames = [payload(n, 20 + i) for i, n in enumerate(ODD_SIZES)]
    stream_inputs(store, "t", frames, per_commit=per_commit)
    assert store.get_inputs("t") == frames
    assert store.get_inputs_many(["t", "none"]) == [frames, None]
    for frame, chunk, off, n in layout([len(f) for f in frames]):
        assert store.get_chunk(INPUT, "t", frame, chunk) == frames[frame][off:off + n]
    assert store.get_chunk(RESULT, "t", 0, 0) is None
    assert store.partial_streams() == []
    assert [t.task_id for t in store.unfinished_tasks()] == ["t"]


def test_streamed_inputs_of_small_frames(store: LmdbStore) -> None:
    frames = [b"\x80\x05pickle", b"", b"abc"]  # under PACK_LIMIT, but streamed: one value per chunk
    stream_inputs(store, "t", frames)
    assert store.get_inputs("t") == frames
    assert entries(store)["inputs"] == 3


def test_streamed_inputs_survive_reopen_and_go_with_the_result(path: Path) -> None:
    frames = [payload(CHUNK_BYTES + 7, 1), b"tail"]
    with LmdbStore(path) as s:
        stream_inputs(s, "t", frames)
    with LmdbStore(path) as s:
        assert s.get_inputs("t") == frames
        assert s.partial_streams() == []
        stream_result(s, "t", [b"out"])
        assert s.get_inputs("t") is None
        assert entries(s)["inputs"] == 0


# -- drop_partial_streams (controller start) -------------------------------------------------------


def test_drop_partial_streams(path: Path) -> None:
    with LmdbStore(path) as s:
        write_chunks(s, INPUT, "half-in", [payload(3 * CHUNK_BYTES, 1)], per_commit=1)
        write_chunks(s, RESULT, "half-out", [payload(CHUNK_BYTES + 1, 2), b"x"])
        stream_inputs(s, "whole-in", [payload(CHUNK_BYTES + 1, 3)])
        stream_result(s, "whole-out", [payload(2 * CHUNK_BYTES, 4)])
    with LmdbStore(path) as s:  # a controller restarting after a crash mid-stream
        assert drop_partial_streams(s) == 2
        assert s.partial_streams() == []
        assert s.get_inputs("half-in") is None
        assert s.get_chunk(RESULT, "half-out", 0, 0) is None and s.get_chunk(RESULT, "half-out", 1, 0) is None
        assert s.get_inputs("whole-in") == [payload(CHUNK_BYTES + 1, 3)]
        got = s.get_result("whole-out")
        assert got is not None and got[1] == [payload(2 * CHUNK_BYTES, 4)]
        e = entries(s)
        assert e["inputs"] == 2 and e["blobs"] == 2 and e["streams"] == 0
        assert drop_partial_streams(s) == 0


def test_drop_partial_streams_on_a_fresh_store(store: LmdbStore) -> None:
    assert drop_partial_streams(store) == 0


# -- schema versions -------------------------------------------------------------------------------


def set_version(path: Path, version: int) -> None:
    env = lmdb.open(str(path), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            txn.put(schema.META_SCHEMA_VERSION, schema.pack_u64(version), db=env.open_db(schema.META, txn=txn))
    finally:
        env.close()


def read_version(path: Path) -> int:
    env = lmdb.open(str(path), max_dbs=16, readonly=True)
    try:
        with env.begin() as txn:
            raw = txn.get(schema.META_SCHEMA_VERSION, db=env.open_db(schema.META, txn=txn, create=False))
    finally:
        env.close()
    assert raw is not None
    return schema.unpack_u64(raw)


def test_schema_version_is_three() -> None:
    assert schema.SCHEMA_VERSION == 3
    assert schema.UPGRADABLE == (2,)
    assert schema.STREAMS in schema.ALL_DBS


def test_version_2_store_is_upgraded(path: Path) -> None:
    with LmdbStore(path) as s:
        commit_result(s, "old", [payload(CHUNK_BYTES + 1, 1)])
    set_version(path, 2)
    assert read_version(path) == 2
    with LmdbStore(path) as s:
        assert s.counters()["schema_version"] == 3
        got = s.get_result("old")
        assert got is not None and got[1] == [payload(CHUNK_BYTES + 1, 1)]
        stream_result(s, "new", [payload(5, 2)])
    assert read_version(path) == 3
    with LmdbStore(path) as s:
        assert s.counters()["schema_version"] == 3


def test_version_2_store_without_streams_database(path: Path) -> None:
    """A store as fedpar with schema v2 wrote it: every sub-database but ``streams``."""
    path.mkdir(mode=0o700)
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        dbs = {name: env.open_db(name, txn=txn) for name in schema.ALL_DBS if name != schema.STREAMS}
        txn.put(schema.META_SCHEMA_VERSION, schema.pack_u64(2), db=dbs[schema.META])
        txn.put(schema.META_TASKS_DONE, schema.pack_u64(4), db=dbs[schema.META])
    env.close()
    with LmdbStore(path) as s:
        c = s.counters()
        assert c["schema_version"] == 3 and c["tasks_done"] == 4
        assert s.partial_streams() == []
        write_chunks(s, INPUT, "t", [b"abc"])
        assert s.partial_streams() == [(INPUT, "t")]


@pytest.mark.parametrize("version", [0, 1, 4, 99])
def test_other_versions_are_refused(path: Path, version: int) -> None:
    LmdbStore(path).close()
    set_version(path, version)
    with pytest.raises(StoreError, match=rf"schema version {version}, this fedpar expects 3") as info:
        LmdbStore(path)
    assert str(path) in str(info.value)
    assert read_version(path) == version  # a refused store is left as it was
    with pytest.raises(StoreError):
        LmdbStore(path)  # and the refusal released the environment: refused again, not "already open"
