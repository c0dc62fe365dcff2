"""Tests for fedpar.wire.payload: pickle-5 frames with out-of-band buffers, function pickle caches, exceptions."""

from __future__ import annotations

import functools
import gc
import math
import pickle
from collections import OrderedDict
from typing import Any

import cloudpickle
import pytest

from fedpar.wire.payload import (
    FunctionCache,
    FunctionPickles,
    describe_exception,
    dumps,
    dumps_result,
    loads,
)

np = pytest.importorskip("numpy")


def round_trip(obj: Any) -> Any:
    frames = dumps(obj)
    assert frames and isinstance(frames[0], bytes)
    return loads(frames)


def wire(frames: list[Any]) -> list[bytes]:
    """What the other side receives: every frame as independent bytes (no shared memory)."""
    return [bytes(f) for f in frames]


# --------------------------------------------------------------------------- dumps / loads
@pytest.mark.parametrize(
    "obj",
    [
        None, True, False, 0, -1, 2**100, 3.25, math.inf, 1 + 2j, "", "héllo\x00", b"", b"\x00\xff" * 10,
        [], (), {}, [1, 2.5, "x"], (1, (2, (3, (4, (5,))))), {"a": [1, {"b": (2, None)}]},
        {1: "int key", (2, 3): "tuple key"}, {1, 2, 3}, frozenset("abc"), list(range(1000)),
        OrderedDict(a=1), bytearray(b"mutable"), [[[[[[["deep"]]]]]]],
    ],
    ids=repr,
)
def test_round_trip_plain_data(obj: Any) -> None:
    got = loads(wire(dumps(obj)))
    assert got == obj
    assert type(got) is type(obj)


def test_plain_data_is_a_single_frame() -> None:
    assert len(dumps({"a": [1, 2, 3], "b": "text"})) == 1
    assert len(dumps(b"x" * 100_000)) == 1


def test_round_trip_lambda() -> None:
    f = round_trip(lambda x, y=2: x**y + 1)
    assert f(3) == 10
    assert f(2, y=3) == 9


def test_round_trip_closure() -> None:
    def make(n: int) -> Any:
        base = [n]

        def add(x: int) -> int:
            return x + base[0]

        return add

    add5 = loads(wire(dumps(make(5))))
    assert add5(1) == 6


def test_round_trip_functions_inside_containers() -> None:
    factor = 3
    obj = {"f": lambda x: x * factor, "args": (1, 2), "kw": {"g": lambda: "g"}}
    got = loads(wire(dumps(obj)))
    assert got["f"](2) == 6
    assert got["kw"]["g"]() == "g"
    assert got["args"] == (1, 2)


def test_round_trip_local_class_instance() -> None:
    class Point:
        def __init__(self, x: int, y: int):
            self.x, self.y = x, y

        def norm2(self) -> int:
            return self.x**2 + self.y**2

    p = loads(wire(dumps(Point(3, 4))))
    assert (p.x, p.y, p.norm2()) == (3, 4, 25)


def test_round_trip_partial() -> None:
    f = loads(wire(dumps(functools.partial(pow, 2))))
    assert f(10) == 1024


def test_numpy_array_out_of_band() -> None:
    arr = np.arange(250_000, dtype="float64").reshape(500, 500)
    frames = dumps(arr)
    assert len(frames) > 1
    assert memoryview(frames[1]).nbytes == arr.nbytes
    assert len(frames[0]) < 1000  # the data is not in the pickle stream
    got = loads(wire(frames))
    assert isinstance(got, np.ndarray)
    assert got.dtype == arr.dtype and got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)


def test_numpy_out_of_band_frames_are_zero_copy() -> None:
    arr = np.arange(10_000, dtype="int32")
    frames = dumps(arr)
    assert np.shares_memory(np.frombuffer(frames[1], dtype="int32"), arr)
    buf = bytearray(frames[1])
    got = loads([frames[0], buf])
    assert np.shares_memory(got, np.frombuffer(buf, dtype="int32"))  # rebuilt on the buffer, no copy
    assert got.flags.writeable


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.asfortranarray(np.arange(10_000.0).reshape(100, 100)),
        lambda: np.arange(100_000.0)[::3],  # not contiguous: travels in-band
        lambda: np.zeros(0),
        lambda: np.array([[1 + 2j, 3 - 4j]] * 1000),
        lambda: np.array(["a", "bc"] * 100),
        lambda: np.array([(1, 2.0)] * 100, dtype=[("a", "i4"), ("b", "f8")]),
        lambda: np.array([1, "x", None] * 10, dtype=object),
        lambda: np.float64(2.5),
    ],
    ids=["fortran", "strided", "empty", "complex", "unicode", "structured", "object", "scalar"],
)
def test_numpy_variants_round_trip(make: Any) -> None:
    arr = make()
    got = loads(wire(dumps(arr)))
    assert type(got) is type(arr)
    np.testing.assert_array_equal(got, arr)
    if isinstance(arr, np.ndarray):
        assert got.dtype == arr.dtype and got.shape == arr.shape


def test_several_arrays_in_a_container() -> None:
    obj = {"x": np.ones(1000), "y": [np.arange(2000), "text"], "z": (np.zeros((10, 10)), 3)}
    frames = dumps(obj)
    assert len(frames) == 4
    got = loads(wire(frames))
    np.testing.assert_array_equal(got["x"], obj["x"])
    np.testing.assert_array_equal(got["y"][0], obj["y"][0])
    assert got["y"][1] == "text"
    np.testing.assert_array_equal(got["z"][0], obj["z"][0])
    assert got["z"][1] == 3


def test_array_in_cloudpickle_path_is_out_of_band_too() -> None:
    arr = np.arange(100_000)
    obj = (lambda: None, arr)  # the lambda forces cloudpickle
    frames = dumps(obj)
    assert len(frames) == 2
    got = loads(wire(frames))
    np.testing.assert_array_equal(got[1], arr)


def test_pickle_buffer_is_out_of_band() -> None:
    frames = dumps(pickle.PickleBuffer(b"z" * 4096))
    assert len(frames) == 2 and bytes(frames[1]) == b"z" * 4096


def test_loads_accepts_memoryview_and_bytearray_frames() -> None:
    arr = np.arange(1000.0)
    frames = dumps(arr)
    got = loads([memoryview(bytes(frames[0])), memoryview(bytes(frames[1]))])
    np.testing.assert_array_equal(got, arr)
    assert loads([bytearray(dumps([1, 2])[0])]) == [1, 2]


def test_loads_without_frames_fails() -> None:
    with pytest.raises(ValueError, match="no payload frames"):
        loads([])


def test_loads_missing_buffer_fails() -> None:
    frames = dumps(np.arange(1000))
    with pytest.raises(pickle.UnpicklingError):
        loads(frames[:1])


# --------------------------------------------------------------------------- dumps_result
def test_dumps_result_plain_and_numpy() -> None:
    assert loads(wire(dumps_result({"a": 1}))) == {"a": 1}
    arr = np.arange(50_000)
    frames = dumps_result([arr, "x"])
    assert len(frames) == 2
    got = loads(wire(frames))
    np.testing.assert_array_equal(got[0], arr)


def test_dumps_result_falls_back_to_cloudpickle_for_local_classes() -> None:
    class Local:
        def __init__(self) -> None:
            self.data = np.arange(10_000)
            self.name = "local"

    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(Local(), protocol=5)
    frames = dumps_result(Local())
    got = loads(wire(frames))
    assert got.name == "local"
    np.testing.assert_array_equal(got.data, np.arange(10_000))
    assert len(frames) == 2  # the buffers of the failed first attempt are not kept


def test_dumps_result_lambda() -> None:
    assert loads(wire(dumps_result(lambda: 42)))() == 42


# --------------------------------------------------------------------------- FunctionPickles
DYNAMIC_SRC = """
G = [1]
H = 10

def direct():
    return G[0]

def via_genexpr():
    return sum(G[0] for _ in range(1))

def helper():
    return H

def calls_helper():
    return helper()

def make_closure(v):
    box = v
    def inner():
        return box
    return inner
"""


@pytest.fixture
def dyn() -> dict[str, Any]:
    """Functions of a module that cannot be imported: cloudpickle pickles them by value (like __main__)."""
    ns: dict[str, Any] = {"__name__": "fedpar_test_dynamic_module_not_importable"}
    exec(compile(DYNAMIC_SRC, "<dynamic>", "exec"), ns)
    return ns


def call(data: bytes) -> Any:
    return pickle.loads(data)()


def test_function_pickles_caches_by_identity(dyn: dict[str, Any]) -> None:
    fp = FunctionPickles()
    a = fp.get(dyn["direct"])
    b = fp.get(dyn["direct"])
    assert a is b
    assert call(a) == 1


def test_function_pickles_distinct_functions(dyn: dict[str, Any]) -> None:
    fp = FunctionPickles()
    assert fp.get(dyn["direct"]) is not fp.get(dyn["helper"])
    assert call(fp.get(dyn["helper"])) == 10


def test_function_pickles_invalidated_when_global_rebound(dyn: dict[str, Any]) -> None:
    fp = FunctionPickles()
    first = fp.get(dyn["direct"])
    keep = dyn["G"]  # keep the old object alive so its id cannot be reused
    dyn["G"] = [2]
    second = fp.get(dyn["direct"])
    assert second is not first
    assert call(second) == 2
    assert fp.get(dyn["direct"]) is second
    del keep


def test_function_pickles_in_place_mutation_not_noticed(dyn: dict[str, Any]) -> None:
    """Documented limitation (like dask): mutating a referenced global in place keeps the old pickle."""
    fp = FunctionPickles()
    first = fp.get(dyn["direct"])
    dyn["G"].append(99)
    assert fp.get(dyn["direct"]) is first


def test_function_pickles_invalidated_when_closure_cell_changes(dyn: dict[str, Any]) -> None:
    fp = FunctionPickles()
    inner = dyn["make_closure"]([7])
    first = fp.get(inner)
    assert call(first) == [7]
    keep = inner.__closure__[0].cell_contents
    inner.__closure__[0].cell_contents = [8]
    second = fp.get(inner)
    assert second is not first
    assert call(second) == [8]
    del keep


def test_function_pickles_closure_defined_here() -> None:
    fp = FunctionPickles()
    counter = [0]

    def f() -> int:
        return counter[0]

    data = fp.get(f)
    assert fp.get(f) is data
    old = counter
    counter = [5]  # rebinding the cell
    assert fp.get(f) is not data
    assert call(fp.get(f)) == 5
    del old


def test_function_pickles_non_weakrefable_builtin() -> None:
    fp = FunctionPickles()
    data = fp.get(len)
    assert pickle.loads(data) is len
    assert pickle.loads(fp.get(len)) is len


def test_function_pickles_entry_dies_with_function(dyn: dict[str, Any]) -> None:
    fp = FunctionPickles()
    f = dyn["make_closure"](1)
    fp.get(f)
    assert len(fp._cache) == 1
    del f
    gc.collect()
    assert len(fp._cache) == 0


def test_function_pickles_bounded_size(dyn: dict[str, Any]) -> None:
    fp = FunctionPickles(size=4)
    fns = [dyn["make_closure"](i) for i in range(10)]
    for f in fns:
        fp.get(f)
    assert len(fp._cache) <= 4
    for i, f in enumerate(fns):
        assert call(fp.get(f)) == i


def test_function_pickles_invalidated_for_global_in_nested_code(dyn: dict[str, Any]) -> None:
    fp = FunctionPickles()
    assert call(fp.get(dyn["via_genexpr"])) == 1
    keep = dyn["G"]
    dyn["G"] = [5]
    assert call(fp.get(dyn["via_genexpr"])) == 5
    del keep


def test_function_pickles_invalidated_for_global_of_helper(dyn: dict[str, Any]) -> None:
    fp = FunctionPickles()
    assert call(fp.get(dyn["calls_helper"])) == 10
    dyn["H"] = 11
    assert call(fp.get(dyn["calls_helper"])) == 11


def test_function_pickles_invalidated_when_rebound_object_reuses_address(dyn: dict[str, Any]) -> None:
    fp = FunctionPickles()
    assert call(fp.get(dyn["direct"])) == 1
    old_id = id(dyn["G"])
    dyn["G"] = None  # the old list is freed...
    dyn["G"] = [4]  # ...and CPython's list free list hands its address to the new one
    if id(dyn["G"]) != old_id:
        pytest.skip("the allocator did not reuse the address this time")
    assert call(fp.get(dyn["direct"])) == 4


# --------------------------------------------------------------------------- FunctionCache
def test_function_cache_same_object_for_equal_bytes() -> None:
    data = cloudpickle.dumps(lambda x: x + 1)
    cache = FunctionCache()
    f = cache.load(data)
    assert f(1) == 2
    assert cache.load(bytes(data)) is f
    assert cache.load(bytearray(data)) is f
    assert cache.load(memoryview(data)) is f


def test_function_cache_different_bytes_different_functions() -> None:
    cache = FunctionCache()
    f = cache.load(cloudpickle.dumps(lambda: 1))
    g = cache.load(cloudpickle.dumps(lambda: 2))
    assert f is not g and (f(), g()) == (1, 2)


def test_function_cache_bounded() -> None:
    cache = FunctionCache(size=3)
    datas = [cloudpickle.dumps(lambda i=i: i) for i in range(5)]
    fns = [cache.load(d) for d in datas]
    assert len(cache._cache) == 3
    assert cache.load(datas[-1]) is fns[-1]
    assert cache.load(datas[0]) is not fns[0]  # evicted: rebuilt
    assert cache.load(datas[0])() == 0


def test_function_cache_is_lru() -> None:
    cache = FunctionCache(size=2)
    a, b, c = (cloudpickle.dumps(lambda i=i: i) for i in range(3))
    fa = cache.load(a)
    cache.load(b)
    assert cache.load(a) is fa  # a is now the most recently used
    cache.load(c)  # evicts b, the least recently used
    assert cache.load(a) is fa


# --------------------------------------------------------------------------- describe_exception
def _raiser() -> None:
    raise ValueError("bad value: 42")  # the raise line


def test_describe_exception() -> None:
    try:
        _raiser()
    except ValueError as exc:
        ename, evalue, tb = describe_exception(exc)
    assert ename == "ValueError"
    assert evalue == "bad value: 42"
    assert "Traceback (most recent call last)" in tb
    assert 'raise ValueError("bad value: 42")  # the raise line' in tb
    assert "_raiser" in tb
    assert tb.rstrip().endswith("ValueError: bad value: 42")


def test_describe_exception_chained_and_custom() -> None:
    class MyError(Exception):
        pass

    try:
        try:
            {}["missing"]
        except KeyError as inner:
            raise MyError("outer") from inner
    except MyError as exc:
        ename, evalue, tb = describe_exception(exc)
    assert ename == "MyError" and evalue == "outer"
    assert "KeyError: 'missing'" in tb
    assert "direct cause" in tb


def test_describe_exception_without_traceback() -> None:
    desc = describe_exception(RuntimeError("never raised"))
    assert desc[:2] == ["RuntimeError", "never raised"]
    assert "RuntimeError: never raised" in desc[2]
    assert all(isinstance(x, str) for x in desc)
