"""Tests for fedpar.client.results.AsyncResult without a cluster: results are fed through ``_deliver``."""

from __future__ import annotations

import builtins
import concurrent.futures as cf
import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import fedpar
from fedpar.client.results import AsyncResult, as_list, concat, error_from_spec, first
from fedpar.errors import CompositeError, EngineError, FedparError, RemoteError, TaskAborted
from fedpar.wire.payload import dumps
from fedpar.wire.protocol import ResultSpec

np = pytest.importorskip("numpy")


def ok(ar: AsyncResult, index: int, value: Any, engine: int = 0) -> None:
    frames = dumps(value)
    spec = ResultSpec(ar.task_ids[index], True, engine, time.time() - 0.01, time.time(), None, len(frames))
    ar._deliver(index, spec, frames)


USER_TB = 'Traceback (most recent call last):\n  File "<user>", line 3, in f\n'


def fail(ar: AsyncResult, index: int, ename: str = "ValueError", evalue: str = "bad input",
         tb: str = USER_TB, engine: int | None = 2) -> None:
    spec = ResultSpec(ar.task_ids[index], False, engine, None, time.time(), [ename, evalue, tb], 0)
    ar._deliver(index, spec, [])


def ids(n: int) -> list[str]:
    return [f"c0-{i}" for i in range(n)]


@pytest.fixture
def later() -> Iterator[Any]:
    """Run a callable in a thread after a delay; joined at teardown."""
    threads: list[threading.Thread] = []

    def run(delay: float, fn: Any, *args: Any) -> None:
        def body() -> None:
            time.sleep(delay)
            fn(*args)

        t = threading.Thread(target=body, daemon=True)
        threads.append(t)
        t.start()

    yield run
    for t in threads:
        t.join(5)


# --------------------------------------------------------------------------- basics
def test_single_value() -> None:
    ar = AsyncResult(ids(1))
    assert not ar.ready() and not ar.done()
    assert ar.progress == 0 and len(ar) == 1
    ok(ar, 0, {"answer": 42})
    assert ar.ready() and ar.done()
    assert ar.successful()
    assert ar.progress == 1
    assert ar.get() == {"answer": 42}
    assert ar.result() == {"answer": 42}
    assert ar.get(timeout=0) == {"answer": 42}
    assert ar.wait(0) is True
    assert ar.exception() is None


def test_value_is_computed_once() -> None:
    ar = AsyncResult(ids(1))
    ok(ar, 0, [1, 2, 3])
    assert ar.get() is ar.get()


def test_task_ids_and_msg_ids() -> None:
    ar = AsyncResult(["a", "b"], as_list, label="map f")
    assert ar.task_ids == ["a", "b"]
    assert ar.msg_ids == ["a", "b"]
    assert "0/2" in repr(ar)
    ok(ar, 0, 1)
    ok(ar, 1, 2)
    assert "done" in repr(ar)


def test_progress_and_out_of_order_delivery() -> None:
    ar = AsyncResult(ids(3), as_list)
    ok(ar, 2, "c")
    assert ar.progress == 1 and not ar.ready()
    assert ar.wait(0) is False
    ok(ar, 0, "a")
    assert ar.progress == 2 and not ar.ready()
    ok(ar, 1, "b")
    assert ar.progress == 3 and ar.ready()
    assert ar.get() == ["a", "b", "c"]


def test_duplicate_delivery_is_ignored() -> None:
    ar = AsyncResult(ids(2), as_list)
    ok(ar, 0, "first")
    ok(ar, 0, "second")
    assert ar.progress == 1 and not ar.ready()
    ok(ar, 1, "x")
    fail(ar, 1)  # a late failure for a finished task changes nothing
    assert ar.successful()
    assert ar.get() == ["first", "x"]


def test_elapsed() -> None:
    ar = AsyncResult(ids(1))
    time.sleep(0.02)
    running = ar.elapsed
    assert running >= 0.02
    assert ar.elapsed >= running  # grows while running
    ok(ar, 0, None)
    done = ar.elapsed
    time.sleep(0.02)
    assert ar.elapsed == done  # frozen once finished
    assert done >= running


def test_zero_task_result_is_done_immediately() -> None:
    ar = AsyncResult([], as_list)
    assert ar.ready() and ar.done() and ar.successful()
    assert len(ar) == 0 and ar.progress == 0
    assert ar.wait(0) is True
    assert ar.get(timeout=0) == []
    assert list(ar) == []
    assert AsyncResult([], concat).get() == []


def test_done_callback_runs() -> None:
    ar = AsyncResult(ids(2), as_list)
    seen: list[Any] = []
    ar.add_done_callback(lambda f: seen.append(f.result()))
    ok(ar, 0, 1)
    assert seen == []
    ok(ar, 1, 2)
    assert seen == [[1, 2]]


def test_cannot_be_cancelled() -> None:
    ar = AsyncResult(ids(1))
    assert ar.cancel() is False
    assert not ar.cancelled()


# --------------------------------------------------------------------------- reducers
def test_reducer_first() -> None:
    ar = AsyncResult(ids(2), first)
    ok(ar, 0, "a")
    ok(ar, 1, "b")
    assert ar.get() == "a"
    assert first([3, 4]) == 3


def test_reducer_as_list() -> None:
    ar = AsyncResult(ids(3), as_list)
    for i in range(3):
        ok(ar, i, i * 10)
    assert ar.get() == [0, 10, 20]


def test_reducer_concat_lists() -> None:
    ar = AsyncResult(ids(3), concat, chunked=True)
    ok(ar, 0, [1, 2])
    ok(ar, 1, [])
    ok(ar, 2, [3])
    assert ar.get() == [1, 2, 3]
    assert concat([(1,), [2, 3]]) == [1, 2, 3]
    assert concat([]) == []


def test_reducer_concat_numpy() -> None:
    parts = [np.arange(0, 50_000), np.arange(50_000, 50_010), np.arange(50_010, 100_000)]
    ar = AsyncResult(ids(3), concat, chunked=True)
    for i, p in enumerate(parts):
        ok(ar, i, p)
    got = ar.get()
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, np.arange(100_000))


def test_numpy_results_are_writable() -> None:
    ar = AsyncResult(ids(1))
    ok(ar, 0, np.arange(10_000.0))
    arr = ar.get()
    arr[0] = -1.0  # frames from the wire are read-only bytes: the result must still be writable
    assert arr[0] == -1.0


def test_reducer_custom() -> None:
    ar = AsyncResult(ids(4), sum)
    for i in range(4):
        ok(ar, i, i)
    assert ar.get() == 6


def test_frames_as_received_from_the_wire() -> None:
    ar = AsyncResult(ids(1))
    frames = [bytes(f) for f in dumps({"x": np.ones(1000)})]
    ar._deliver(0, ResultSpec(ar.task_ids[0], True, 0, None, time.time(), None, len(frames)), frames)
    np.testing.assert_array_equal(ar.get()["x"], np.ones(1000))


# --------------------------------------------------------------------------- iteration
def test_iteration_not_chunked() -> None:
    ar = AsyncResult(ids(3), as_list)
    for i in range(3):
        ok(ar, i, [i])
    assert list(ar) == [[0], [1], [2]]


def test_chunked_iteration_in_order() -> None:
    ar = AsyncResult(ids(3), concat, chunked=True)
    ok(ar, 2, [5, 6])
    ok(ar, 0, [0, 1, 2])
    ok(ar, 1, [3, 4])
    assert list(ar) == [0, 1, 2, 3, 4, 5, 6]


def test_chunked_iteration_blocks_until_the_chunk_arrives(later: Any) -> None:
    ar = AsyncResult(ids(2), concat, chunked=True)
    ok(ar, 0, ["a", "b"])
    later(0.3, ok, ar, 1, ["c"])
    t0 = time.monotonic()
    it = iter(ar)
    assert next(it) == "a"
    assert next(it) == "b"
    assert time.monotonic() - t0 < 0.25  # the first chunk did not wait for the second
    assert next(it) == "c"
    assert time.monotonic() - t0 >= 0.29  # blocked until the second chunk was delivered
    with pytest.raises(StopIteration):
        next(it)
    assert ar.get() == ["a", "b", "c"]


def test_chunked_iteration_of_numpy_chunks() -> None:
    ar = AsyncResult(ids(2), concat, chunked=True)
    ok(ar, 0, np.arange(3))
    ok(ar, 1, np.arange(3, 5))
    assert [int(x) for x in ar] == [0, 1, 2, 3, 4]


def test_iteration_raises_the_failed_chunk() -> None:
    ar = AsyncResult(ids(2), concat, chunked=True)
    ok(ar, 0, [1, 2])
    fail(ar, 1, "KeyError", "'k'")
    it = iter(ar)
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(RemoteError, match="KeyError"):
        next(it)


# --------------------------------------------------------------------------- failures
def test_one_failure_raises_remote_error() -> None:
    ar = AsyncResult(ids(2), as_list)
    ok(ar, 0, 1)
    fail(ar, 1, "ZeroDivisionError", "division by zero", "Traceback...\n  1/0\n", engine=4)
    assert ar.ready()
    assert not ar.successful()
    assert ar.wait(0) is True  # wait never raises task errors
    with pytest.raises(RemoteError) as info:
        ar.get()
    err = info.value
    assert err.ename == "ZeroDivisionError"
    assert err.evalue == "division by zero"
    assert err.traceback == "Traceback...\n  1/0\n"
    assert err.engine_id == 4
    assert err.task_id == "c0-1"
    assert isinstance(ar.exception(), RemoteError)
    with pytest.raises(RemoteError):
        ar.result()


def test_two_failures_raise_composite_error() -> None:
    ar = AsyncResult(ids(3), as_list)
    fail(ar, 0, "ValueError", "v", engine=0)
    ok(ar, 1, "fine")
    fail(ar, 2, "TypeError", "t", engine=1)
    with pytest.raises(CompositeError) as info:
        ar.get()
    errs = info.value.errors
    assert [type(e) for e in errs] == [RemoteError, RemoteError]
    assert [e.ename for e in errs] == ["ValueError", "TypeError"]  # type: ignore[attr-defined]
    assert [e.task_id for e in errs] == ["c0-0", "c0-2"]  # type: ignore[attr-defined]
    assert "2 task(s) failed" in str(info.value)
    with pytest.raises(RemoteError, match="TypeError"):
        info.value.raise_exception(1)


def test_engine_error_spec() -> None:
    ar = AsyncResult(ids(1))
    fail(ar, 0, "fedpar.EngineError", "engine 3 stopped answering heartbeats", "", engine=3)
    with pytest.raises(fedpar.EngineError) as info:
        ar.get()
    assert str(info.value) == "engine 3 stopped answering heartbeats"
    assert info.value.engine_id == 3 and info.value.task_id == "c0-0"


@pytest.mark.parametrize(
    ("ename", "cls"),
    [("fedpar.TaskAborted", TaskAborted), ("fedpar.ResultNotFound", fedpar.ResultNotFound),
     ("fedpar.NoEnginesError", fedpar.NoEnginesError), ("fedpar.StoreFull", fedpar.StoreFull)],
)
def test_fedpar_error_specs(ename: str, cls: type[FedparError]) -> None:
    err = error_from_spec(ResultSpec("t", False, 1, None, 0.0, [ename, "why", ""], 0))
    assert type(err) is cls and str(err) == "why"


def test_unknown_fedpar_names_and_user_errors_are_remote_errors() -> None:
    for ename in ("fedpar.NoSuchThing", "fedpar.client.results", "mylib.EngineError", "EngineError"):
        err = error_from_spec(ResultSpec("t", False, 1, None, 0.0, [ename, "v", "tb"], 0))
        assert type(err) is RemoteError and err.ename == ename


def test_error_spec_without_details() -> None:
    err = error_from_spec(ResultSpec("t", False, None, None, 0.0, None, 0))
    assert isinstance(err, FedparError)
    assert "without details" in str(err)


def test_fail_helper_delivers_fedpar_error() -> None:
    ar = AsyncResult(ids(2), as_list)
    ok(ar, 0, 1)
    ar._fail(1, EngineError("controller lost", engine_id=7))
    with pytest.raises(EngineError) as info:
        ar.get()
    assert info.value.engine_id == 7 and info.value.task_id == "c0-1"


# --------------------------------------------------------------------------- waiting
def test_get_timeout_on_unfinished() -> None:
    ar = AsyncResult(ids(2), as_list, label="map slow")
    ok(ar, 0, 1)
    t0 = time.monotonic()
    with pytest.raises(fedpar.TimeoutError) as info:
        ar.get(timeout=0.05)
    assert 0.04 <= time.monotonic() - t0 < 1.0
    assert isinstance(info.value, builtins.TimeoutError)
    assert "1/2" in str(info.value) and "map slow" in str(info.value)
    with pytest.raises(builtins.TimeoutError):
        ar.result(timeout=0.01)
    assert ar.wait(0.02) is False


def test_get_blocks_until_delivered(later: Any) -> None:
    ar = AsyncResult(ids(2), as_list)
    later(0.05, ok, ar, 0, "a")
    later(0.1, ok, ar, 1, "b")
    assert ar.get(timeout=5) == ["a", "b"]


def test_wait_returns_when_done(later: Any) -> None:
    ar = AsyncResult(ids(1))
    later(0.05, ok, ar, 0, 1)
    t0 = time.monotonic()
    assert ar.wait(5) is True
    assert time.monotonic() - t0 < 2


class _SlowFinish(AsyncResult):
    """Widens the window between the last ``_deliver`` waking waiters and the future completing."""

    release = threading.Event()

    def _finish(self) -> None:
        self.release.wait(5)
        super()._finish()


def test_ready_right_after_wait_returns_true() -> None:
    ar = _SlowFinish(ids(1))
    ar.release = threading.Event()
    t = threading.Thread(target=ok, args=(ar, 0, "v"), daemon=True)
    t.start()
    threading.Timer(0.2, ar.release.set).start()  # _finish completes only after wait() has started
    try:
        assert ar.wait(5) is True
        assert ar.ready()
        assert ar.successful()
    finally:
        ar.release.set()
        t.join(5)


def test_as_completed_and_wait(later: Any) -> None:
    slow, fast = AsyncResult(["s"]), AsyncResult(["f"])
    later(0.15, ok, slow, 0, "slow")
    later(0.02, ok, fast, 0, "fast")
    order = [f.result() for f in cf.as_completed([slow, fast], timeout=5)]
    assert order == ["fast", "slow"]

    a, b = AsyncResult(["a"]), AsyncResult(["b"])
    later(0.02, ok, a, 0, 1)
    done, not_done = cf.wait([a, b], timeout=5, return_when=cf.FIRST_COMPLETED)
    assert done == {a} and not_done == {b}
    ok(b, 0, 2)
    done, not_done = cf.wait([a, b], timeout=5)
    assert done == {a, b} and not not_done


def test_futures_wait_first_exception() -> None:
    a, b = AsyncResult(["a"]), AsyncResult(["b"])
    fail(a, 0)
    done, not_done = cf.wait([a, b], timeout=1, return_when=cf.FIRST_EXCEPTION)
    assert done == {a} and not_done == {b}


def test_as_completed_timeout() -> None:
    ar = AsyncResult(["never"])
    with pytest.raises(builtins.TimeoutError):
        list(cf.as_completed([ar], timeout=0.05))


def test_wait_interactive_writes_progress(later: Any) -> None:
    ar = AsyncResult(ids(4), as_list)
    ok(ar, 0, 0)
    later(0.05, ok, ar, 1, 1)
    later(0.1, ok, ar, 2, 2)
    later(0.12, ok, ar, 3, 3)
    out = io.StringIO()
    ar.wait_interactive(interval=0.02, stream=out)
    text = out.getvalue()
    assert text.endswith("\n")
    assert "4/4 tasks" in text.splitlines()[-1].split("\r")[-1]
    assert "/4 tasks" in text.split("\r")[1]  # intermediate lines were written
    assert text.count("\r") >= 2
    assert ar.get() == [0, 1, 2, 3]


def test_wait_interactive_timeout() -> None:
    ar = AsyncResult(ids(3), as_list)
    ok(ar, 0, 0)
    out = io.StringIO()
    t0 = time.monotonic()
    ar.wait_interactive(interval=0.02, timeout=0.1, stream=out)
    assert time.monotonic() - t0 < 1.0
    last = out.getvalue().split("\r")[-1]
    assert "1/3 tasks" in last and last.endswith("\n")
    assert "#" in last and "." in last
    assert not ar.ready()


def test_wait_interactive_done_already() -> None:
    ar = AsyncResult(ids(1))
    ok(ar, 0, 0)
    out = io.StringIO()
    ar.wait_interactive(stream=out)
    assert out.getvalue().strip().startswith("[" + "#" * 30 + "] 1/1 tasks")


def test_sent_after_every_acknowledgement() -> None:
    ar = AsyncResult(ids(3))
    assert not ar.sent and not ar.wait_for_send(0.01)
    ar._accept(0)
    ar._accept(0)  # a repeated acknowledgement counts once
    ar._accept(2)
    assert not ar.sent
    ar._accept(1)
    assert ar.sent and ar.wait_for_send(0)
    assert not ar.done()  # acknowledged is not finished


def test_an_outcome_counts_as_sent() -> None:
    """A task that finished (or was rejected) without its acknowledgement being seen needs no further wait."""
    ar = AsyncResult(ids(2))
    ok(ar, 0, 1)
    ar._fail(1, fedpar.StoreFull("the controller's store is full"))
    assert ar.sent
    ar._accept(1)  # a late acknowledgement changes nothing
    assert ar.sent


def test_wait_for_send_wakes_on_the_last_acknowledgement(later: Any) -> None:
    ar = AsyncResult(ids(2))
    ar._accept(0)
    later(0.05, ar._accept, 1)
    t0 = time.monotonic()
    assert ar.wait_for_send(5)
    assert time.monotonic() - t0 < 4


def test_results_asked_for_by_id_are_sent_already() -> None:
    ar = AsyncResult(ids(2), sent=True)
    assert ar.sent and ar.wait_for_send(0)
    ar._accept(0)
    assert ar.sent
