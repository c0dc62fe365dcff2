"""LmdbStore against a real LMDB environment in tmp_path (no mocks)."""

from __future__ import annotations

import array
import dataclasses
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from fedpar.errors import StoreError, StoreFull
from fedpar.store import schema
from fedpar.store.lmdb_store import LmdbStore
from fedpar.store.records import (
    ASSIGNED,
    DONE,
    FAILED,
    QUEUED,
    EngineRecord,
    ResultRecord,
    TaskRecord,
)

MiB = 1 << 20
SIZES = [0, 1, MiB, MiB + 1, 5 * MiB]


def task(tid: str, *, state: str = QUEUED, engine: int | None = None, submitted: float = 100.0) -> TaskRecord:
    return TaskRecord(
        task_id=tid, client="client-1", op="apply", target=None, state=state, engine=engine,
        submitted=submitted,
        spec={"name": tid, "n": [1, 2.5, None], "raw": b"\x00\xff", "by_int": {7: "seven"}},
    )


def result(tid: str, *, ok: bool = True, completed: float = 200.0) -> ResultRecord:
    err = None if ok else ("ValueError", "bad", "Traceback ...")
    return ResultRecord(task_id=tid, ok=ok, engine=3, started=150.0, completed=completed, error=err)


def payload(size: int, seed: int = 0) -> bytes:
    block = bytes((i * 31 + seed) % 251 for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(path: Path) -> Iterator[LmdbStore]:
    with LmdbStore(path) as s:
        yield s


def commit_result(store: LmdbStore, tid: str, frames: list[bytes], **kw: object) -> None:
    b = store.batch()
    b.put_task(task(tid, state=DONE))
    b.put_result(result(tid, **kw), frames)  # type: ignore[arg-type]
    store.commit(b)


# -- round trips ----------------------------------------------------------------------------------


def test_task_round_trip(store: LmdbStore) -> None:
    rec = TaskRecord(
        task_id="t-1", client="c", op="execute", target=4, state=ASSIGNED, engine=4, submitted=1.5,
        assigned=2.5, completed=None, attempts=2, retries=3, spec={"code": "x = 1", "nested": {"a": [1]}},
    )
    b = store.batch()
    b.put_task(rec)
    assert len(b) >= 1 and b  # the record, plus its open-task index entry
    store.commit(b)
    assert store.get_task("t-1") == rec
    assert store.get_task("missing") is None
    rec2 = task("t-1", state=DONE)
    b = store.batch()
    b.put_task(rec2)
    store.commit(b)
    assert store.get_task("t-1") == rec2


def test_engine_and_mark_round_trip(store: LmdbStore) -> None:
    engines = [EngineRecord(i, f"uuid-{i}", "host", 1000 + i, 5.0, "up") for i in (300, 2, 0)]
    b = store.batch()
    for e in engines:
        b.put_engine(e)
    b.put_mark("client-a", 17)
    b.put_mark("engine-\u00e9", 2**63)
    b.put_mark("client-a", 18)
    store.commit(b)
    assert store.engines() == sorted(engines, key=lambda e: e.engine_id)
    assert store.marks() == {"client-a": 18, "engine-\u00e9": 2**63}
    b = store.batch()
    b.put_engine(EngineRecord(2, "uuid-2", "host", 1002, 5.0, "dead"))
    store.commit(b)
    assert [e.state for e in store.engines()] == ["up", "dead", "up"]


def test_empty_batch_is_noop(store: LmdbStore) -> None:
    b = store.batch()
    assert len(b) == 0 and not b
    store.commit(b)
    assert store.counters()["tasks_done"] == 0


@pytest.mark.parametrize("size", SIZES)
def test_inputs_frame_sizes(store: LmdbStore, size: int) -> None:
    frames = [payload(size, 1), payload(3, 2), payload(size, 3)]
    b = store.batch()
    b.put_inputs("t", frames)
    store.commit(b)
    assert store.get_inputs("t") == frames


@pytest.mark.parametrize("size", SIZES)
def test_result_frame_sizes(store: LmdbStore, size: int) -> None:
    frames = [payload(size, 1), b"", payload(size, 5)]
    commit_result(store, "t", frames)
    got = store.get_result("t")
    assert got is not None
    rec, back = got
    assert back == frames
    assert rec.frame_sizes == (size, 0, size)
    assert rec == dataclasses.replace(result("t"), frame_sizes=(size, 0, size))
    assert store.get_result_record("t") == rec


def test_all_sizes_in_one_result(store: LmdbStore) -> None:
    frames = [payload(s, i) for i, s in enumerate(SIZES)]
    commit_result(store, "big", frames, ok=False)
    got = store.get_result("big")
    assert got is not None
    assert got[1] == frames
    assert got[0].error == ("ValueError", "bad", "Traceback ...")
    assert got[0].ok is False


def test_buffer_types(store: LmdbStore) -> None:
    class FrameLike:  # like zmq.Frame
        def __init__(self, data: bytes):
            self.buffer = memoryview(data)

    ints = array.array("i", range(1000))
    big = payload(MiB + 10)
    frames = [
        bytearray(b"abc"), memoryview(b"0123456789")[2:7], memoryview(ints), memoryview(big),
        FrameLike(b"zmq-frame"), memoryview(bytes(range(20)))[::2],
    ]
    expected = [b"abc", b"23456", ints.tobytes(), big, b"zmq-frame", bytes(range(0, 20, 2))]
    b = store.batch()
    b.put_inputs("t", frames)  # type: ignore[arg-type]
    b.put_task(task("r"))
    b.put_result(result("r"), frames)  # type: ignore[arg-type]
    store.commit(b)
    assert store.get_inputs("t") == expected
    got = store.get_result("r")
    assert got is not None and got[1] == expected
    assert got[0].frame_sizes == tuple(len(e) for e in expected)


def test_inputs_replace_and_delete(store: LmdbStore) -> None:
    b = store.batch()
    b.put_inputs("t", [payload(3 * MiB), b"x", b"y"])
    b.put_inputs("t2", [b"other"])
    b.put_inputs("none", [])
    store.commit(b)
    assert store.get_inputs("none") is None
    b = store.batch()
    b.put_inputs("t", [b"short"])  # fewer frames and chunks: nothing stale may remain
    store.commit(b)
    assert store.get_inputs("t") == [b"short"]
    b = store.batch()
    b.delete_inputs("t")
    b.delete_inputs("never-stored")
    store.commit(b)
    assert store.get_inputs("t") is None
    assert store.get_inputs("t2") == [b"other"]
    assert store.stats()["entries"]["inputs"] == 1


def test_result_drops_inputs(store: LmdbStore) -> None:
    b = store.batch()
    b.put_inputs("t", [b"in"])
    b.put_inputs("t-x", [b"neighbour"])  # shares a string prefix, not a key prefix
    store.commit(b)
    commit_result(store, "t", [b"out"])
    assert store.get_inputs("t") is None
    assert store.get_inputs("t-x") == [b"neighbour"]


def test_invalid_ids(store: LmdbStore) -> None:
    b = store.batch()
    for bad in ("a\x00b", "", "x" * 600):
        with pytest.raises(ValueError):
            b.put_task(task(bad))
        with pytest.raises(ValueError):
            b.put_inputs(bad, [b""])
    with pytest.raises(ValueError):
        b.put_engine(EngineRecord(-1, "u", "h", 1, 0.0))
    with pytest.raises(ValueError):
        b.put_mark("s", -1)
    assert not b


# -- results, purge, queries ----------------------------------------------------------------------


def test_delete_results_removes_everything(store: LmdbStore) -> None:
    commit_result(store, "a", [payload(2 * MiB + 5)], completed=10.0)
    commit_result(store, "b", [b"keep"], completed=20.0)
    b = store.batch()
    b.put_inputs("a", [b"late input"])
    store.commit(b)
    b = store.batch()
    b.delete_results(["a", "never"])
    store.commit(b)
    assert store.get_result("a") is None and store.get_result_record("a") is None
    assert store.get_task("a") is None and store.get_inputs("a") is None
    assert store.all_result_ids() == ["b"]
    assert store.completed_before(1e12) == ["b"]
    entries = store.stats()["entries"]
    assert entries["results"] == 1 and entries["blobs"] == 1 and entries["completed_idx"] == 1
    assert entries["tasks"] == 1 and entries["inputs"] == 0
    assert store.counters()["tasks_done"] == 2  # totals are not decremented by a purge


def test_replaced_result(store: LmdbStore) -> None:
    commit_result(store, "t", [payload(3 * MiB), b"2", b"3"], ok=False, completed=10.0)
    commit_result(store, "t", [b"one"], ok=True, completed=30.0)
    got = store.get_result("t")
    assert got is not None and got[1] == [b"one"] and got[0].ok
    assert store.completed_before(20.0) == []
    assert store.completed_before(40.0) == ["t"]
    c = store.counters()
    assert (c["tasks_done"], c["tasks_failed"]) == (1, 0)
    assert store.stats()["entries"]["blobs"] == 1


def test_iter_tasks_filters(store: LmdbStore) -> None:
    recs = [
        task("q1", state=QUEUED, submitted=1.0),
        task("a1", state=ASSIGNED, engine=1, submitted=2.0),
        task("a2", state=ASSIGNED, engine=2, submitted=3.0),
        task("d1", state=DONE, engine=1, submitted=4.0),
        task("f1", state=FAILED, engine=2, submitted=5.0),
        task("q2", state=QUEUED, submitted=6.0),
    ]
    b = store.batch()
    for r in reversed(recs):
        b.put_task(r)
    store.commit(b)
    def ids(rs: list[TaskRecord]) -> list[str]:
        return [r.task_id for r in rs]

    assert ids(store.iter_tasks()) == ["q1", "a1", "a2", "d1", "f1", "q2"]
    assert ids(store.iter_tasks(states={QUEUED})) == ["q1", "q2"]
    assert ids(store.iter_tasks(states=[DONE, FAILED])) == ["d1", "f1"]
    assert ids(store.iter_tasks(engine=1)) == ["a1", "d1"]
    assert ids(store.iter_tasks(engine=2, states=(FAILED,))) == ["f1"]
    assert ids(store.iter_tasks(since=2.0, until=5.0)) == ["a1", "a2", "d1"]
    assert ids(store.iter_tasks(since=5.5)) == ["q2"]
    assert ids(store.iter_tasks(until=1.0)) == []
    assert ids(store.iter_tasks(limit=2)) == ["q1", "a1"]
    assert ids(store.iter_tasks(states={ASSIGNED, QUEUED}, limit=3)) == ["q1", "a1", "a2"]
    assert ids(store.unfinished_tasks()) == ["q1", "a1", "a2", "q2"]
    assert store.iter_tasks(states=set()) == []
    assert store.iter_tasks(since=1.0)[0] == recs[0]


def test_completed_before(store: LmdbStore) -> None:
    b = store.batch()
    for i, t in enumerate([30.0, 10.0, 20.0, 10.5]):
        b.put_result(result(f"r{i}", completed=t), [])
    store.commit(b)
    assert store.completed_before(10.0) == []
    assert store.completed_before(10.5) == ["r1"]
    assert store.completed_before(25.0) == ["r1", "r3", "r2"]
    assert store.completed_before(25.0, limit=2) == ["r1", "r3"]
    assert store.completed_before(1e12) == ["r1", "r3", "r2", "r0"]
    assert sorted(store.all_result_ids()) == ["r0", "r1", "r2", "r3"]


def test_counters(store: LmdbStore) -> None:
    b = store.batch()
    for i in range(5):
        b.put_result(result(f"ok{i}"), [b"x"])
    for i in range(3):
        b.put_result(result(f"bad{i}", ok=False), [])
    b.bump("custom", 4)
    store.commit(b)
    c = store.counters()
    assert c["tasks_done"] == 5 and c["tasks_failed"] == 3 and c["custom"] == 4
    assert c["schema_version"] == schema.SCHEMA_VERSION
    b = store.batch()
    b.put_result(result("ok9"), [])
    store.commit(b)
    assert store.counters()["tasks_done"] == 6


def test_fresh_counters(store: LmdbStore) -> None:
    c = store.counters()
    assert c["tasks_done"] == 0 and c["tasks_failed"] == 0


# -- lifecycle, persistence -----------------------------------------------------------------------


def test_persistence_and_epoch_across_reopen(path: Path) -> None:
    frames = [payload(MiB + 1), b""]
    with LmdbStore(path) as s:
        assert s.next_epoch() == 1
        assert s.next_epoch() == 2
        b = s.batch()
        b.put_task(task("q", state=QUEUED))
        b.put_inputs("q", frames)
        b.put_engine(EngineRecord(1, "u", "h", 1, 0.0))
        b.put_mark("c", 5)
        s.commit(b)
        commit_result(s, "r", frames)
    with LmdbStore(path) as s:
        assert s.next_epoch() == 3
        assert s.get_task("q") == task("q", state=QUEUED)
        assert s.get_inputs("q") == frames
        assert [t.task_id for t in s.unfinished_tasks()] == ["q"]
        got = s.get_result("r")
        assert got is not None and got[1] == frames
        assert s.engines() == [EngineRecord(1, "u", "h", 1, 0.0)]
        assert s.marks() == {"c": 5}
        assert s.counters()["tasks_done"] == 1
        assert s.counters()["epoch"] == 3
        assert s.path == str(path)


def test_close_is_idempotent_and_final(path: Path) -> None:
    s = LmdbStore(path)
    s.sync()
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get_task("x")
    b = s.batch()
    b.put_task(task("x"))
    with pytest.raises(StoreError, match="closed"):
        s.commit(b)


def test_open_twice_in_one_process(path: Path) -> None:
    with LmdbStore(path), pytest.raises(StoreError, match="already open"):
        LmdbStore(path)


def test_batch_of_other_store(tmp_path: Path) -> None:
    with LmdbStore(tmp_path / "a") as a, LmdbStore(tmp_path / "b") as b:
        batch = a.batch()
        batch.put_task(task("x"))
        with pytest.raises(ValueError):
            b.commit(batch)


def test_schema_version_mismatch(path: Path) -> None:
    LmdbStore(path).close()
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(schema.META_SCHEMA_VERSION, schema.pack_u64(99), db=env.open_db(schema.META, txn=txn))
    env.close()
    with pytest.raises(StoreError, match=rf"schema version 99, this fedpar expects {schema.SCHEMA_VERSION}") as info:
        LmdbStore(path)
    assert str(path) in str(info.value)


def test_directory_mode(tmp_path: Path) -> None:
    p = tmp_path / "deep" / "state"
    LmdbStore(p).close()
    assert stat.S_IMODE(p.stat().st_mode) == 0o700
    q = tmp_path / "loose"
    q.mkdir(mode=0o755)
    os.chmod(q, 0o755)
    LmdbStore(q).close()
    assert stat.S_IMODE(q.stat().st_mode) == 0o700
    assert stat.S_IMODE((q / "data.mdb").stat().st_mode) & 0o077 == 0


def test_unusable_path(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"not a directory")
    with pytest.raises(StoreError, match="file"):
        LmdbStore(f)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "data.mdb").write_bytes(b"\xff" * 100_000)
    with pytest.raises(StoreError, match="garbage"):
        LmdbStore(tmp_path / "garbage")


def test_bad_sizes(path: Path) -> None:
    with pytest.raises(ValueError):
        LmdbStore(path, map_size=8 * MiB, max_map_size=4 * MiB)


# -- growth and full stores -----------------------------------------------------------------------


def test_map_grows(path: Path) -> None:
    with LmdbStore(path, map_size=MiB) as s:
        b = s.batch()  # one batch needing several doublings
        for i in range(6):
            b.put_task(task(f"a{i}"))
            b.put_result(result(f"a{i}"), [payload(MiB, i)])
        s.commit(b)
        for i in range(14):  # and many small growths
            commit_result(s, f"b{i}", [payload(MiB, i)])
        st = s.stats()
        assert st["map_size"] >= 20 * MiB and st["used"] >= 20 * MiB
        assert st["entries"]["blobs"] == 20
        for i in range(6):
            got = s.get_result(f"a{i}")
            assert got is not None and got[1] == [payload(MiB, i)]
    with LmdbStore(path, map_size=MiB) as s:  # reopening adopts the grown size
        assert s.stats()["map_size"] >= 20 * MiB
        assert len(s.all_result_ids()) == 20


def test_store_full_at_max_map_size(path: Path) -> None:
    with LmdbStore(path, map_size=MiB, max_map_size=4 * MiB) as s:
        written: list[str] = []
        with pytest.raises(StoreFull, match=r"maximum size of 4194304 bytes; purge results or raise"):
            for i in range(8):
                failed_batch = s.batch()
                failed_batch.put_task(task(f"t{i}", state=DONE))
                failed_batch.put_result(result(f"t{i}", completed=float(i)), [payload(MiB, i)])
                s.commit(failed_batch)
                written.append(f"t{i}")
        failed = f"t{len(written)}"
        assert 1 <= len(written) < 8
        # the failed batch left nothing behind; everything committed before is intact
        assert s.get_task(failed) is None and s.get_result_record(failed) is None
        for i, tid in enumerate(written):
            got = s.get_result(tid)
            assert got is not None and got[1] == [payload(MiB, i)]
        assert s.stats()["map_size"] == 4 * MiB
        # still full for big writes, but purging makes room again
        b = s.batch()
        b.delete_results(s.completed_before(float(len(written))))
        s.commit(b)
        assert s.all_result_ids() == []
        commit_result(s, "small", [b"fits"])
        s.commit(failed_batch)  # the batch that failed can be committed once there is room
        got = s.get_result(failed)
        assert got is not None and got[1] == [payload(MiB, len(written))]
        commit_result(s, "big-again", [payload(MiB, 9)])
        got = s.get_result("big-again")
        assert got is not None and got[1] == [payload(MiB, 9)]
        assert s.next_epoch() == 1


def test_file_size_limit_is_store_full(path: Path) -> None:
    """Writes past RLIMIT_FSIZE fail like a full disk; the store stays usable once the limit is lifted."""
    if not hasattr(signal, "SIGXFSZ"):
        pytest.skip("no RLIMIT_FSIZE")
    with LmdbStore(path) as s:
        commit_result(s, "before", [b"x"])
        size = (path / "data.mdb").stat().st_size
        old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, old_limit[1]))
            with pytest.raises(StoreError) as info:
                commit_result(s, "big", [payload(3 * MiB)])
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)
        assert str(path) in str(info.value)
        assert s.get_result_record("big") is None
        got = s.get_result("before")
        assert got is not None and got[1] == [b"x"]
        commit_result(s, "big", [payload(3 * MiB)])
        got = s.get_result("big")
        assert got is not None and got[1] == [payload(3 * MiB)]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs (needs root on Linux; skipped elsewhere)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_is_store_full(small_fs: Path) -> None:
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (2 * MiB))
    with LmdbStore(small_fs / "state", map_size=64 * MiB) as s:
        written: list[int] = []
        with pytest.raises(StoreFull, match="disk full") as info:
            for i in range(10):
                commit_result(s, f"t{i}", [payload(MiB, i)])
                written.append(i)
        assert str(small_fs / "state") in str(info.value)
        assert written
        for i in written:
            got = s.get_result(f"t{i}")
            assert got is not None and got[1] == [payload(MiB, i)]
        filler.unlink()  # free space on the disk: commits work again
        commit_result(s, "after", [payload(MiB, 42)])
        got = s.get_result("after")
        assert got is not None and got[1] == [payload(MiB, 42)]


# -- concurrency ----------------------------------------------------------------------------------


def test_reader_thread_while_writer_grows_map(path: Path) -> None:
    fixed = [payload(MiB + 3, 7), b"tail"]
    with LmdbStore(path, map_size=MiB) as s:
        commit_result(s, "fixed", fixed)
        stop = threading.Event()
        errors: list[BaseException] = []
        reads = [0]

        def reader() -> None:
            try:
                last_done = 0
                while not stop.is_set():
                    got = s.get_result("fixed")
                    assert got is not None and got[1] == fixed
                    assert s.get_task("fixed") == task("fixed", state=DONE)
                    done = s.counters()["tasks_done"]
                    assert done >= last_done
                    last_done = done
                    ids = s.all_result_ids()
                    assert "fixed" in ids and len(ids) >= done  # ids are read after the counter
                    s.stats()
                    reads[0] += 1
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for i in range(40):
                b = s.batch()
                for j in range(3):
                    tid = f"w{i}-{j}"
                    b.put_task(task(tid, state=DONE))
                    b.put_result(result(tid), [payload(200_000, i + j)])
                s.commit(b)
        finally:
            stop.set()
            thread.join(30)
        assert not thread.is_alive()
        assert not errors, errors
        assert reads[0] > 0
        assert s.stats()["map_size"] > MiB
        assert s.counters()["tasks_done"] == 121


def test_unfinished_tasks_come_from_the_open_index(tmp_path: Path) -> None:
    with LmdbStore(tmp_path / "st") as store:
        b = store.batch()
        for i, state in enumerate([QUEUED, ASSIGNED, "running", DONE, FAILED, QUEUED]):
            b.put_task(TaskRecord(f"t-{i}", "c", "apply", None, state, None, float(i)))
        store.commit(b)
        assert [r.task_id for r in store.unfinished_tasks()] == ["t-0", "t-1", "t-2", "t-5"]
        b = store.batch()
        b.put_task(TaskRecord("t-1", "c", "apply", None, DONE, 0, 1.0))  # finished: leaves the index
        b.delete_results(["t-5"])  # purged: leaves the index
        store.commit(b)
        assert [r.task_id for r in store.unfinished_tasks()] == ["t-0", "t-2"]
