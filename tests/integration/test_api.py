"""The user-facing API against a real controller and two engines (one cluster for the whole module).

Tests share the engines' namespaces, so each test uses variable names of its own.
"""

from __future__ import annotations

import concurrent.futures
import io
import math
import os
import sys
import time

import cloudpickle
import numpy as np
import pytest
from procutil import cluster_pids

import fedpar
from fedpar.client.results import AsyncResult

# engines cannot import this test module: ship its functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(60)


def double(x):
    return 2 * x


def add(x, y=0, *, z=0):
    return x + y + z


def raising_function(x):
    raise ValueError(f"boom {x}")


def fail_on(bad):
    def f(x):
        if x in bad:
            raise KeyError(f"bad element {x}")
        return x * 10

    return f


# ------------------------------------------------------------------------------------------ views


def test_ids_and_views(cluster, client):
    ids = client.ids
    assert len(ids) == 2 and ids == sorted(ids)
    engine_pids = set(cluster.engine_pids)

    all_view = client[:]
    assert isinstance(all_view, fedpar.DirectView)
    assert sorted(all_view.apply_sync(os.getpid)) == sorted(engine_pids)

    one = client[ids[0]]
    pid0 = one.apply_sync(os.getpid)
    assert isinstance(pid0, int) and pid0 in engine_pids  # a single engine gives a value, not a list

    pair = client[[ids[1], ids[0]]]
    pids = pair.apply_sync(os.getpid)
    assert isinstance(pids, list) and set(pids) == engine_pids and pids[1] == pid0

    assert sorted(client.direct_view().apply_sync(os.getpid)) == sorted(engine_pids)
    assert client.direct_view(ids[0]).apply_sync(os.getpid) == pid0
    assert client.direct_view([ids[0]]).apply_sync(os.getpid) == [pid0]
    assert client[1:].apply_sync(os.getpid) == [client[ids[1]].apply_sync(os.getpid)]

    lv = client.load_balanced_view()
    assert isinstance(lv, fedpar.LoadBalancedView)
    assert lv.apply_sync(os.getpid) in engine_pids


def test_unknown_engine_id_client_side(client):
    missing = max(client.ids) + 100
    with pytest.raises(fedpar.UnknownEngineError, match=str(missing)):
        client[missing]
    with pytest.raises(fedpar.UnknownEngineError):
        client[[client.ids[0], missing]]


# Regression: this used to surface as TaskAborted('UnknownEngineError: ...').
def test_unknown_engine_id_controller_side(client):
    missing = max(client.ids) + 100
    view = client.direct_view(missing)  # no client-side check: the controller rejects the task
    with pytest.raises(fedpar.UnknownEngineError):
        view.apply_sync(os.getpid)


def test_unknown_engine_id_controller_side_fails_cleanly(client):
    """Whatever its class, the rejection names the engine and arrives quickly (no hang)."""
    missing = max(client.ids) + 100
    ar = client.direct_view(missing).apply_async(os.getpid)
    with pytest.raises(fedpar.FedparError, match=r"UnknownEngineError|not registered"):
        ar.get(timeout=10)


# ------------------------------------------------------------------------------------------ apply


@pytest.mark.parametrize("kind", ["lb", "direct"])
def test_apply_variants(client, kind):
    view = client.load_balanced_view() if kind == "lb" else client[:]
    n = 1 if kind == "lb" else len(client.ids)

    def shape(v):
        return v if kind == "lb" else [v] * n

    ar = view.apply(double, 21)  # block defaults to False
    assert isinstance(ar, AsyncResult)
    assert ar.get(timeout=10) == shape(42)
    assert isinstance(view.apply_async(double, 1), AsyncResult)
    assert view.apply_sync(double, 4) == shape(8)
    assert view.apply_sync(add, 1, 2, z=3) == shape(6)
    assert view.apply_sync(add, x=1, y=5) == shape(6)
    assert view.apply_sync(lambda: "no args") == shape("no args")

    offset = 1000

    def closure(x):
        return x + offset

    assert view.apply_sync(closure, 1) == shape(1001)
    assert view.apply_sync(lambda a, b: a * b, 6, b=7) == shape(42)

    view.block = True
    try:
        assert view.apply(double, 5) == shape(10)
    finally:
        view.block = False
    assert isinstance(view.apply(double, 5), AsyncResult)


@pytest.mark.parametrize("kind", ["lb", "direct"])
def test_apply_numpy_in_and_out(client, kind):
    view = client.load_balanced_view() if kind == "lb" else client[:]
    arr = np.arange(100_000, dtype=np.float64)

    out = view.apply_sync(lambda a: a * 2, arr)
    outs = [out] if kind == "lb" else out
    assert len(outs) == (1 if kind == "lb" else len(client.ids))
    for o in outs:
        assert isinstance(o, np.ndarray) and o.dtype == np.float64
        np.testing.assert_array_equal(o, arr * 2)
        assert o.flags.writeable
        o[0] = -1.0  # really writable
        assert o[0] == -1.0

    # the argument arrives writable on the engine too, and is a copy (the client's array is untouched)
    def mutate(a):
        a[0] = 123.0
        return a.flags.writeable, float(a.sum())

    res = view.apply_sync(mutate, arr)
    for writable, total in [res] if kind == "lb" else res:
        assert writable is True
        assert total == float(arr.sum()) + 123.0
    assert arr[0] == 0.0

    # structured output: arrays inside containers, several arrays
    pair = client.load_balanced_view().apply_sync(lambda a: {"a": a, "b": a[::2].copy()}, arr[:10])
    np.testing.assert_array_equal(pair["a"], arr[:10])
    np.testing.assert_array_equal(pair["b"], arr[:10:2])


# ------------------------------------------------------------------------------------------ map


@pytest.mark.parametrize("chunksize", [1, 3, None])
def test_map_chunksizes(client, chunksize):
    lv = client.load_balanced_view()
    data = list(range(20))
    ar = lv.map_async(double, data, chunksize=chunksize)
    assert ar.get(timeout=20) == [2 * x for x in data]
    if chunksize is not None:
        assert len(ar.task_ids) == math.ceil(len(data) / chunksize)
    assert lv.map_sync(double, data, chunksize=chunksize) == [2 * x for x in data]
    assert lv.map(double, data, chunksize=chunksize, block=True) == [2 * x for x in data]


def test_map_block_flag(client):
    for view in (client.load_balanced_view(), client[:]):
        ar = view.map(double, range(5))
        assert isinstance(ar, AsyncResult)  # block defaults to False
        assert ar.get(timeout=10) == [0, 2, 4, 6, 8]
        assert view.map(double, range(5), block=True) == [0, 2, 4, 6, 8]
        view.block = True
        try:
            assert view.map(double, range(3)) == [0, 2, 4]
            assert isinstance(view.map(double, range(3), block=False), AsyncResult)
        finally:
            view.block = False


def test_map_multiple_sequences_and_edges(client):
    for view in (client.load_balanced_view(), client[:]):
        assert view.map_sync(pow, range(10), [2] * 10) == [x**2 for x in range(10)]
        assert view.map_sync(lambda a, b, c: a + b + c, [1, 2], [10, 20], [100, 200]) == [111, 222]
        # like the builtin map, the shortest sequence decides the length
        assert view.map_sync(add, range(10), range(3)) == [0, 2, 4]
        assert view.map_sync(double, []) == []
        assert view.map_sync(double, iter(range(4))) == [0, 2, 4, 6]  # any iterable
        assert view.map_sync(double, [7]) == [14]
        assert view.map_sync(str.upper, "abc") == ["A", "B", "C"]


def test_map_preserves_order_and_iterates_in_order(client):
    lv = client.load_balanced_view()

    def slow_first(x):
        import time

        time.sleep(0.02 * (8 - x))  # early elements finish last
        return x

    ar = lv.map_async(slow_first, range(8), chunksize=1)
    assert list(ar) == list(range(8))  # iteration yields elements in order as they arrive
    assert ar.get() == list(range(8))
    ar2 = lv.map_async(double, range(25), chunksize=4)
    assert list(ar2) == [2 * x for x in range(25)]
    ar3 = client[:].map_async(double, range(11))
    assert list(ar3) == [2 * x for x in range(11)]


def test_direct_map_splits_over_engines(client):
    pids = client[:].map_sync(lambda _x: os.getpid(), range(10))
    engine_pids = client[:].apply_sync(os.getpid)
    assert pids[:5] == [engine_pids[0]] * 5 and pids[5:] == [engine_pids[1]] * 5


# ------------------------------------------------------------------------------------------ namespaces


def test_push_pull(client):
    dv = client[:]
    n = len(client.ids)
    assert dv.push({"pp_a": 5, "pp_b": [1, 2]}, block=True) is None
    assert dv.pull("pp_a", block=True) == [5] * n
    assert dv.pull(["pp_a", "pp_b"], block=True) == [[5, [1, 2]]] * n
    assert client[client.ids[0]].pull("pp_a", block=True) == 5
    assert client[client.ids[0]].pull(("pp_a", "pp_b"), block=True) == [5, [1, 2]]
    ar = dv.pull("pp_a")  # block defaults to False
    assert isinstance(ar, AsyncResult) and ar.get(10) == [5] * n

    with pytest.raises(fedpar.RemoteError) as info:
        client[client.ids[0]].pull("pp_does_not_exist", block=True)
    assert info.value.ename == "NameError"
    assert "pp_does_not_exist" in info.value.evalue

    with pytest.raises(TypeError):
        dv.push([("pp_a", 1)])


def test_push_numpy_and_different_values_per_engine(client):
    ids = client.ids
    client[ids[0]].push({"pp_arr": np.ones(1000)}, block=True)
    client[ids[1]].push({"pp_arr": np.zeros(1000)}, block=True)
    sums = client[:].apply_sync(lambda a: float(a.sum()), fedpar.Reference("pp_arr"))
    assert sums == [1000.0, 0.0]
    arrs = client[:].pull("pp_arr", block=True)
    np.testing.assert_array_equal(arrs[0], np.ones(1000))
    assert arrs[1].flags.writeable


def test_scatter_gather_list_and_array(client):
    dv = client[:]
    ids = client.ids
    dv.scatter("sg_x", list(range(11)), block=True)
    assert client[ids[0]].pull("sg_x", block=True) == list(range(6))
    assert client[ids[1]].pull("sg_x", block=True) == list(range(6, 11))
    assert dv.gather("sg_x", block=True) == list(range(11))

    arr = np.arange(10.0)
    dv.scatter("sg_arr", arr, block=True)
    np.testing.assert_array_equal(client[ids[0]].pull("sg_arr", block=True), arr[:5])
    gathered = dv.gather("sg_arr", block=True)
    assert isinstance(gathered, np.ndarray)
    np.testing.assert_array_equal(gathered, arr)

    ar = dv.scatter("sg_y", [1, 2])
    assert isinstance(ar, AsyncResult)
    ar.get(10)
    assert dv.gather("sg_y", block=True) == [1, 2]
    g = dv.gather("sg_y")
    assert isinstance(g, AsyncResult) and g.get(10) == [1, 2]


def test_execute_and_item_access(client):
    dv = client[:]
    n = len(client.ids)
    dv.push({"ex_a": 5}, block=True)
    assert dv.execute("ex_b = ex_a * 3", block=True) is None
    assert dv["ex_b"] == [15] * n
    dv["ex_c"] = 1
    assert dv["ex_c"] == [1] * n
    assert client[client.ids[0]]["ex_c"] == 1
    ar = dv.execute("ex_d = 4")
    assert isinstance(ar, AsyncResult)
    ar.get(10)
    assert dv.pull("ex_d", block=True) == [4] * n
    dv.execute("def ex_fn(x):\n    return x + ex_a\n", block=True)
    dv.execute("ex_r = ex_fn(1)", block=True)
    assert dv["ex_r"] == [6] * n
    assert dv.apply_sync(lambda f: f(2), fedpar.Reference("ex_fn")) == [7] * n


def test_applied_function_sees_engine_namespace(client):
    client[:].push({"ns_a": 5}, block=True)
    assert client[client.ids[0]].apply_sync(lambda: ns_a + 1) == 6  # noqa: F821 - engine global


def test_execute_that_raises(client):
    with pytest.raises(fedpar.RemoteError) as info:
        client[client.ids[0]].execute("1 / 0", block=True)
    assert info.value.ename == "ZeroDivisionError"
    assert info.value.engine_id == client.ids[0]

    with pytest.raises(fedpar.CompositeError) as many:  # every engine failed
        client[:].execute("raise RuntimeError('exec failed')", block=True)
    assert len(many.value.errors) == len(client.ids)
    assert all(isinstance(e, fedpar.RemoteError) and e.ename == "RuntimeError" for e in many.value.errors)
    assert sorted(e.engine_id for e in many.value.errors) == client.ids

    with pytest.raises(fedpar.RemoteError) as syntax:
        client[client.ids[0]].execute("def (:", block=True)
    assert syntax.value.ename == "SyntaxError"


def test_reference_argument(client):
    ids = client.ids
    client[ids[0]]["ref_v"] = 1
    client[ids[1]]["ref_v"] = 2
    assert client[:].apply_sync(lambda x: x * 10, fedpar.Reference("ref_v")) == [10, 20]
    assert client.load_balanced_view().apply_sync(add, fedpar.Reference("ref_v"), 100) in (101, 102)
    with pytest.raises(fedpar.RemoteError) as info:
        client[ids[0]].apply_sync(lambda x: x, fedpar.Reference("ref_missing"))
    assert info.value.ename == "NameError"


def test_reference_keyword_argument(client):
    client[:]["ref_kw"] = 7
    assert client[client.ids[0]].apply_sync(add, 1, y=fedpar.Reference("ref_kw")) == 8


# ------------------------------------------------------------------------------------------ decorators


def test_remote_decorator(client):
    dv = client[:]
    lv = client.load_balanced_view()

    @dv.remote(block=True)
    def where(x):
        return os.getpid(), x

    res = where(3)
    assert isinstance(res, list) and len(res) == len(client.ids)
    assert {r[1] for r in res} == {3}
    assert where.__name__ == "where"

    @lv.remote(block=False)
    def later(x):
        return x + 1

    ar = later(1)
    assert isinstance(ar, AsyncResult)
    assert ar.get(10) == 2

    @lv.remote(block=True)
    def now(x, y=1):
        return x * y

    assert now(3, y=4) == 12


def test_parallel_decorator(client):
    dv = client[:]
    engine_pids = dv.apply_sync(os.getpid)

    @dv.parallel(block=True)
    def tag(xs):
        return [(x, os.getpid()) for x in xs]

    out = tag(list(range(10)))
    assert [x for x, _ in out] == list(range(10))
    assert [p for _, p in out] == [engine_pids[0]] * 5 + [engine_pids[1]] * 5  # each engine a part

    @dv.parallel(block=True)
    def square(x):
        return x * x

    assert square.map(range(6)) == [0, 1, 4, 9, 16, 25]

    lv = client.load_balanced_view()

    @lv.parallel(block=False)
    def lengths(xs):
        return [len(xs)]

    ar = lengths(list(range(7)))
    assert isinstance(ar, AsyncResult)
    assert sorted(ar.get(10)) == [3, 4]


# ------------------------------------------------------------------------------------------ AsyncResult


def test_async_result_basics(client):
    lv = client.load_balanced_view()
    ar = lv.apply_async(time.sleep, 0.5)
    assert not ar.ready()
    with pytest.raises(fedpar.TimeoutError):
        ar.get(timeout=0.05)
    with pytest.raises(TimeoutError):  # also the builtin
        ar.get(timeout=0.01)
    assert ar.wait(0.01) is False
    assert ar.wait(10) is True
    assert ar.get(timeout=0) is None
    assert ar.ready() and ar.successful()
    assert ar.elapsed > 0.3
    assert ar.task_ids == ar.msg_ids and len(ar.task_ids) == 1
    assert isinstance(ar.task_ids[0], str)
    assert len(ar) == 1 and ar.progress == 1

    bad = lv.apply_async(raising_function, 1)
    assert bad.wait(10)
    assert not bad.successful()
    with pytest.raises(fedpar.RemoteError):
        bad.get()

    m = lv.map_async(double, range(9), chunksize=2)
    assert m.wait(10)
    assert len(m.task_ids) == 5 and m.msg_ids == m.task_ids
    assert m.elapsed > 0
    e1 = m.elapsed
    time.sleep(0.05)
    assert m.elapsed == e1  # frozen once done


# Regression: wait() used to return once all results were delivered but before the Future was marked
# done, so ready()/get(timeout=0) right after it could fail (fixed in results.py AsyncResult.wait).
def test_ready_right_after_wait(client, monkeypatch):
    real_finish = AsyncResult._finish

    def slow_finish(self):  # widen the window between 'all delivered' and 'future done'
        time.sleep(0.3)     # (what a GIL switch on the client's I/O thread does at random)
        real_finish(self)

    monkeypatch.setattr(AsyncResult, "_finish", slow_finish)
    ar = client.load_balanced_view().apply_async(double, 1)
    assert ar.wait(10)
    assert ar.ready()
    assert ar.get(timeout=0) == 2


def test_as_completed_over_async_results(client):
    lv = client.load_balanced_view()

    def nap(t):
        import time

        time.sleep(t)
        return t

    ars = [lv.apply_async(nap, t) for t in (0.4, 0.05, 0.2, 0.0)]
    seen = [f.result() for f in concurrent.futures.as_completed(ars, timeout=20)]
    assert sorted(seen) == [0.0, 0.05, 0.2, 0.4]
    done, not_done = concurrent.futures.wait(ars, timeout=10)
    assert len(done) == 4 and not not_done


def test_wait_interactive(client):
    lv = client.load_balanced_view()
    ar = lv.map_async(time.sleep, [0.15] * 6, chunksize=1)
    out = io.StringIO()
    ar.wait_interactive(interval=0.05, stream=out)
    text = out.getvalue()
    assert ar.ready()
    assert "/6 tasks" in text
    assert text.rstrip("\n").split("\r")[-1].strip().startswith("[" + "#" * 30 + "]")
    assert "6/6 tasks" in text.split("\r")[-1]
    assert text.endswith("\n")


# ------------------------------------------------------------------------------------------ executor


def test_executor(client):
    ex = client.executor()
    assert isinstance(ex, fedpar.FedparExecutor)
    assert isinstance(ex, concurrent.futures.Executor)
    fut = ex.submit(pow, 2, 10)
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(timeout=10) == 1024
    assert list(ex.map(double, range(10))) == [2 * x for x in range(10)]
    assert list(ex.map(add, range(5), range(5), chunksize=2)) == [0, 2, 4, 6, 8]
    assert list(ex.map(double, range(3), timeout=10)) == [0, 2, 4]
    slow = ex.submit(time.sleep, 0.3)
    ex.shutdown(wait=True)
    assert slow.done()
    with pytest.raises(RuntimeError):
        ex.submit(pow, 2, 2)
    with pytest.raises(RuntimeError):
        ex.map(double, [1])


def test_executor_context_manager(client):
    with client.executor() as ex:
        futs = [ex.submit(double, i) for i in range(6)]
        last = ex.submit(time.sleep, 0.2)
    assert last.done()  # __exit__ waited
    assert [f.result() for f in futs] == [0, 2, 4, 6, 8, 10]
    with client.executor() as ex:
        bad = ex.submit(raising_function, 3)
        with pytest.raises(fedpar.RemoteError):
            bad.result(timeout=10)
        assert isinstance(bad.exception(), fedpar.RemoteError)


# ------------------------------------------------------------------------------------------ results by id


def test_get_result_by_id(cluster, client):
    lv = client.load_balanced_view()
    ar = lv.apply_async(double, 50)
    assert ar.get(10) == 100
    tid = ar.task_ids[0]
    again = client.get_result(tid)
    assert isinstance(again, AsyncResult)
    assert again.get(timeout=10) == 100
    assert client.get_result(tid, block=True, timeout=10) == 100

    m = lv.map_async(double, range(4), chunksize=2)
    m.get(10)
    assert client.get_result(m.task_ids, block=True, timeout=10) == [[0, 2], [4, 6]]

    arr_ar = lv.apply_async(lambda: np.arange(5))
    arr_ar.get(10)
    failed = lv.apply_async(raising_function, 9)
    assert failed.wait(10)

    # a different client (its own connection) reads the results from the controller's store
    with cluster.connect_client() as other:
        assert other.get_result(tid, block=True, timeout=10) == 100
        stored = other.get_result(arr_ar.task_ids[0], block=True, timeout=10)
        np.testing.assert_array_equal(stored, np.arange(5))
        with pytest.raises(fedpar.RemoteError) as info:
            other.get_result(failed.task_ids[0], block=True, timeout=10)
        assert info.value.ename == "ValueError" and "boom 9" in info.value.evalue


def test_get_result_right_after_completion(client):
    # One client, so the request is ordered after the submission (two clients' sockets are not ordered:
    # another client may legitimately ask before the task exists). The sweep puts the request in the
    # same gateway pass as the result, before it is committed.
    lv = client.load_balanced_view()
    for i in range(300):
        ar = lv.apply_async(int, i)
        time.sleep((i % 10) * 0.0002)
        assert client.get_result(ar.task_ids[0], block=True, timeout=10) == i
        assert ar.get(10) == i


def test_get_result_of_running_task(client):
    ar = client.load_balanced_view().apply_async(lambda: (time.sleep(0.3), "late")[1])
    pending = client.get_result(ar.task_ids[0])
    assert pending.get(timeout=10) == "late"
    assert ar.get(timeout=10) == "late"


def test_running_task_from_another_client_once_sent(cluster, client):
    """``wait_for_send`` says when the controller has stored a submission: from then on another client (its own
    socket, not ordered with ours) finds the task while it still runs."""
    ar = client.load_balanced_view().apply_async(lambda: (time.sleep(3), "late")[1])
    # the controller holds a small submission's acknowledgement only briefly (its result would replace it)
    assert ar.wait_for_send(2.5) and ar.sent
    assert not ar.ready()
    with cluster.connect_client() as other:
        watched = other.get_result(ar.task_ids[0])
        assert watched.sent  # nothing of its own to submit
        assert watched.get(timeout=10) == "late"
    assert ar.get(timeout=10) == "late"


def test_close_right_after_submitting_loses_nothing(cluster):
    """``close()`` waits until the controller has stored what the client submitted: a task whose 3 MB of
    arguments were still on their way when ``close`` was called runs, and another client gets its result
    (before, some of these submissions were dropped with the socket)."""
    ids = []
    for i in range(10):
        c = cluster.connect_client()
        ar = c.load_balanced_view().apply_async(len, bytes(3_000_000 + i))
        c.close()
        ids.append(ar.task_ids[0])
    with cluster.connect_client() as other:
        assert other.get_result(ids, block=True, timeout=30) == [3_000_000 + i for i in range(10)]


def mark_and_return(path, i):
    with open(path, "a") as f:  # one line per task that ran (O_APPEND: whole lines)
        f.write(f"{i}\n")
    return i


def test_abort_withdraws_queued_tasks_only(cluster, client, tmp_path):
    """Tasks still queued in the controller are withdrawn: they fail with TaskAborted, never run, and are
    recorded failed; the ones engines already had run to the end."""
    marks = tmp_path / "ran.txt"
    busy = [client[e].apply_async(time.sleep, 3.0) for e in client.ids]  # both engines occupied
    lv = client.load_balanced_view()
    ar = lv.map_async(mark_and_return, [str(marks)] * 400, range(400), chunksize=1)
    assert ar.wait_for_send(10)
    aborted = ar.abort()
    # each engine holds at most its credit (64) while busy: most of the 400 were still queued here
    assert len(aborted) >= 400 - 2 * 64, len(aborted)
    assert set(aborted) <= set(ar.task_ids)
    for b in busy:
        b.get(timeout=30)
    assert ar.wait(30)
    outcomes = {}
    for tid in ar.task_ids:
        try:
            outcomes[tid] = client.get_result(tid, block=True, timeout=10)
        except fedpar.TaskAborted as exc:
            assert exc.task_id == tid and "aborted before it ran" in str(exc)
            outcomes[tid] = None
    assert {tid for tid, v in outcomes.items() if v is None} == set(aborted)
    ran = {int(line) for line in marks.read_text().split()} if marks.exists() else set()
    assert ran == {i for i, tid in enumerate(ar.task_ids) if tid not in aborted}
    with pytest.raises(fedpar.CompositeError) as info:
        ar.get(timeout=0)
    assert all(isinstance(e, fedpar.TaskAborted) for e in info.value.errors)
    recs = {r.task_id: r.state for r in client.query_tasks(states=["failed"], limit=100_000)}
    assert all(recs.get(tid) == "failed" for tid in aborted)
    assert client.abort(aborted) == []  # finished now: nothing left to withdraw
    assert client.abort() == []  # nothing outstanding


@pytest.mark.timeout(60)
def test_abort_right_after_submitting_and_from_another_client(procs, tmp_path):
    """With no engine anywhere, load-balanced tasks wait in the client (no controller has room for them), so
    an abort right behind the submission withdraws them there: they fail with TaskAborted and never reach a
    store. Tasks pushed out with wait_for_send are queued in the controller: an abort leaves them recorded
    failed, not queued; any client may abort by id, and every watcher gets TaskAborted."""
    c = fedpar.Cluster(n=0, log_dir=tmp_path / "logs")
    try:
        c.start()
        procs.add(*cluster_pids(c))
        with c.connect_client() as client, c.connect_client() as other:
            lv = client.load_balanced_view()
            for i in range(20):
                ar = lv.apply_async(double, i)
                assert client.abort(ar) == ar.task_ids
                with pytest.raises(fedpar.TaskAborted):
                    ar.get(timeout=10)
            kept = lv.map_async(double, range(6), chunksize=1)
            assert kept.wait_for_send(10)
            watched = other.get_result(kept.task_ids[:3])
            assert sorted(other.abort([*kept.task_ids[:3], "no-such-task"])) == sorted(kept.task_ids[:3])
            with pytest.raises(fedpar.CompositeError):
                watched.get(timeout=10)
            assert client.abort() == kept.task_ids[3:]  # what this client still waits for
            failed = {r.task_id for r in client.query_tasks(states=["failed"], limit=1000)}
            assert not client.query_tasks(states=["queued"])  # none left queued (not even in the store)
            assert failed == set(kept.task_ids)  # (the 20 withdrawn in the client were never stored)
            assert client.status()["aborted"] == 6
    finally:
        c.stop()


def test_get_result_unknown_id(client):
    with pytest.raises(fedpar.ResultNotFound) as info:
        client.get_result("no-such-task-id", block=True, timeout=10)
    assert info.value.task_id == "no-such-task-id"
    ar = client.get_result(["no-such-1", "no-such-2"])
    with pytest.raises(fedpar.CompositeError) as many:
        ar.get(10)
    assert all(isinstance(e, fedpar.ResultNotFound) for e in many.value.errors)


# Regression: an id longer than the store's key limit used to make the controller drop the request
# (HandlerError) and the client waited forever.
def test_get_result_overlong_id_fails_cleanly(cluster):
    with cluster.connect_client() as client:
        t0 = time.monotonic()
        with pytest.raises(fedpar.FedparError) as info:
            client.get_result("x" * 500, block=True, timeout=5)
        assert not isinstance(info.value, fedpar.TimeoutError)
        assert time.monotonic() - t0 < 4
        assert client.status()["dropped"].get("HandlerError", 0) == 0


def test_get_result_invalid_id_leaves_nothing_outstanding(cluster):
    with cluster.connect_client() as client:
        with pytest.raises(fedpar.FedparError):
            client.get_result("x" * 500)
        assert client.outstanding == set()
        assert client.wait(timeout=1) is True


# ------------------------------------------------------------------------------------------ status & wait


def _idle_status(client, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        st = client.status()
        if (st["queued"] == 0 and st["in_flight"] == 0) or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def test_status(cluster, client):
    st = _idle_status(client)
    assert st["controller"] == client.controller_id
    assert sorted(e["id"] for e in st["engines"]) == client.ids
    assert sorted(e["pid"] for e in st["engines"]) == sorted(cluster.engine_pids)
    assert all(e["load"] == 0 for e in st["engines"])
    assert st["queued"] == 0 and st["in_flight"] == 0
    assert isinstance(st["done"], int) and isinstance(st["failed"], int)
    counters = ("submitted", "finished", "delivered_direct", "streams_in", "streams_out", "chunks",
                "streams_failed", "streams_inbound", "streams_outbound")
    assert all(isinstance(st[k], int) for k in counters), {k: st.get(k) for k in counters}  # always present
    before_done, before_failed = st["done"], st["failed"]

    client.load_balanced_view().map_sync(double, range(6), chunksize=2)
    with pytest.raises(fedpar.RemoteError):
        client.load_balanced_view().apply_sync(raising_function, 0)
    st2 = client.status()
    assert st2["done"] == before_done + 3
    assert st2["failed"] == before_failed + 1
    assert st2["queued"] == 0 and st2["in_flight"] == 0
    assert client.queue_status()["done"] == st2["done"]

    busy = client.load_balanced_view().map_async(time.sleep, [0.3] * 6, chunksize=1)
    time.sleep(0.1)
    st3 = client.status()
    assert st3["queued"] + st3["in_flight"] > 0
    assert sum(e["load"] for e in st3["engines"]) > 0
    busy.get(20)


def test_client_wait(cluster):
    client = cluster.connect_client()  # its own client: nothing outstanding from other tests
    try:
        _check_client_wait(client)
    finally:
        client.close()


def _check_client_wait(client):
    lv = client.load_balanced_view()
    ars = [lv.apply_async(time.sleep, 0.2) for _ in range(3)]
    assert client.outstanding
    assert client.wait(ars, timeout=0.01) is False
    assert client.wait(timeout=20) is True  # everything this client waits for
    for ar in ars:
        ar.get(timeout=10)
    assert not client.outstanding
    assert client.wait(ars, timeout=1) is True


# ------------------------------------------------------------------------------------------ errors


def test_remote_error_details(client):
    lv = client.load_balanced_view()
    ar = lv.apply_async(raising_function, 7)
    with pytest.raises(fedpar.RemoteError) as info:
        ar.get(10)
    err = info.value
    assert isinstance(err, fedpar.TaskError) and isinstance(err, fedpar.FedparError)
    assert err.ename == "ValueError"
    assert err.evalue == "boom 7"
    assert "raising_function" in err.traceback
    assert "Traceback" in err.traceback
    assert err.engine_id in client.ids
    assert err.task_id == ar.task_ids[0]
    assert "raising_function" in err.render_traceback()

    with pytest.raises(fedpar.RemoteError) as direct:
        client[client.ids[1]].apply_sync(raising_function, 8)
    assert direct.value.engine_id == client.ids[1]


def test_map_failures_in_several_chunks(client):
    lv = client.load_balanced_view()
    with pytest.raises(fedpar.CompositeError) as info:
        lv.map_sync(fail_on({1, 7}), range(10), chunksize=3)  # chunks [0-2] [3-5] [6-8] [9]
    errs = info.value.errors
    assert len(errs) == 2
    assert all(isinstance(e, fedpar.RemoteError) and e.ename == "KeyError" for e in errs)
    assert "bad element 1" in errs[0].evalue and "bad element 7" in errs[1].evalue
    text = str(info.value)
    assert "2 task(s) failed" in text and "bad element 1" in text and "bad element 7" in text
    with pytest.raises(fedpar.RemoteError):
        info.value.raise_exception(1)

    # one failing chunk is a plain RemoteError; iterating stops at the failing element
    ar = lv.map_async(fail_on({4}), range(6), chunksize=2)
    with pytest.raises(fedpar.RemoteError):
        ar.get(10)
    it = iter(ar)
    assert [next(it) for _ in range(4)] == [0, 10, 20, 30]
    with pytest.raises(fedpar.RemoteError):
        next(it)


def test_one_failure_in_multi_engine_apply(client):
    dv = client[:]
    pid0 = client[client.ids[0]].apply_sync(os.getpid)

    def fail_on_first(p):
        import os

        if os.getpid() == p:
            raise RuntimeError("only here")
        return "ok"

    with pytest.raises(fedpar.RemoteError) as info:
        dv.apply_sync(fail_on_first, pid0)
    assert not isinstance(info.value, fedpar.CompositeError)
    assert info.value.ename == "RuntimeError"
    assert info.value.engine_id == client.ids[0]
    # the engines are fine afterwards
    assert dv.apply_sync(lambda: 1) == [1] * len(client.ids)


def test_remote_builtin_exceptions_and_base_exceptions(client):
    lv = client.load_balanced_view()
    with pytest.raises(fedpar.RemoteError) as info:
        lv.apply_sync(lambda: [][1])
    assert info.value.ename == "IndexError"

    def exit_task():
        raise SystemExit(3)

    with pytest.raises(fedpar.RemoteError) as sysexit:  # an engine must survive user code calling exit
        lv.apply_sync(exit_task)
    assert sysexit.value.ename == "SystemExit"
    assert len(client[:].apply_sync(os.getpid)) == len(client.ids)


# ------------------------------------------------------------------------------------------ wakeups


class _OsWithWakeDuringRead:
    """Stands in for ``os`` inside ``fedpar.wire.transport``: the first read of the waker's pipe is preceded
    by a ``wake()``, exactly as if a user thread queued a message while the I/O thread was inside
    ``Waker.drain`` (after ``_armed = False``, before the read), which a GIL switch can cause."""

    def __init__(self, waker):
        self._waker = waker
        self._fired = False

    def read(self, fd, n):
        if fd == self._waker.fileno() and not self._fired:
            self._fired = True
            self._waker.wake()
        return os.read(fd, n)

    def __getattr__(self, name):
        return getattr(os, name)


# Regression: transport.Waker.drain() cleared _armed before reading the pipe; a wake() in between was
# consumed while _armed stayed True, so every later wake() was skipped and the client hung for good.
def test_client_survives_wake_during_drain(cluster, monkeypatch):
    import fedpar.wire.transport

    client = cluster.connect_client()
    try:
        monkeypatch.setattr(fedpar.wire.transport, "os", _OsWithWakeDuringRead(client._io.waker))
        assert client.status(timeout=3)["controller"] == client.controller_id  # the racy drain
        assert client.status(timeout=3)["controller"] == client.controller_id  # hangs with the bug
    finally:
        monkeypatch.undo()
        client.close()


def test_long_task_is_recorded_running_then_done(client):
    ar = client.load_balanced_view().apply_async(lambda: (time.sleep(2.5), "slept")[1])
    tid = ar.task_ids[0]
    deadline = time.monotonic() + 10
    states = set()
    while not ar.done() and time.monotonic() < deadline:
        states |= {r.state for r in client.query_tasks(states=["assigned", "running"]) if r.task_id == tid}
        time.sleep(0.1)
    assert ar.get(10) == "slept"
    assert "running" in states  # named by the engine's heartbeat while it ran
    assert [r.state for r in client.query_tasks(states=["done"], limit=100_000) if r.task_id == tid] == ["done"]
