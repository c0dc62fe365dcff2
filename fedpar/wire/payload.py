"""User data <-> payload frames: pickle protocol 5 with out-of-band buffers, cloudpickle for code.

Frame 0 is the pickle stream; the remaining frames are the raw out-of-band buffers (numpy arrays,
bytes-like objects), sent zero-copy and rebuilt zero-copy on the other side. Only clients and engines
call this module: the controller never unpickles user data.
"""

from __future__ import annotations

import pickle
import sys
import threading
import traceback
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

PROTOCOL = 5
_PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), complex})


def _is_plain(obj: object, depth: int = 0) -> bool:
    """True when standard pickle is certainly right (no code that would pickle by reference)."""
    t = type(obj)
    if t in _PLAIN_TYPES:
        return True
    if depth < 2 and isinstance(obj, (tuple, list)) and t in (tuple, list):
        return len(obj) <= 64 and all(_is_plain(x, depth + 1) for x in obj)
    if depth < 2 and isinstance(obj, dict) and t is dict:
        return len(obj) <= 64 and all(type(k) is str and _is_plain(v, depth + 1) for k, v in obj.items())
    return t.__module__ == "numpy" and t.__name__ == "ndarray" and not getattr(obj, "dtype").hasobject  # noqa: B009


def dumps(obj: Any) -> list[Any]:
    """Serialize ``obj`` into ``[pickle stream, *out-of-band buffers]``."""
    buffers: list[pickle.PickleBuffer] = []
    if _is_plain(obj):
        stream = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
    else:
        stream = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
    if not buffers:
        return [stream]
    return [stream, *(b.raw() for b in buffers)]


def loads(frames: Sequence[Any]) -> Any:
    """Rebuild an object from ``dumps`` frames.

    Writable out-of-band buffers are used in place (zero-copy). Read-only ones (received message memory)
    are copied once into writable memory, so that arrays rebuilt on them accept writes, as users expect.
    """
    if not frames:
        raise ValueError("no payload frames")
    bufs = [bytearray(f) if memoryview(f).readonly else f for f in frames[1:]]
    return pickle.loads(frames[0], buffers=bufs)


def dumps_result(obj: Any) -> list[Any]:
    """Like ``dumps`` but tries the fast standard pickler first (engine results)."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        stream = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
    except Exception:
        buffers.clear()
        stream = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
    return [stream, *(b.raw() for b in buffers)]


_MISSING = object()


def _code_names(code: Any) -> set[str]:
    """Global names used by ``code`` and by the code objects nested in it."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _code_names(const)
    return names


class FunctionPickles:
    """Caches the cloudpickle of functions sent repeatedly (the per-task hot path of ``apply``).

    The cache key is the function object. A function's pickle may capture the values of the globals it
    refers to (functions defined in ``__main__`` or a notebook), so an entry also remembers the identity
    of each referenced global and of each closure cell value, and is rebuilt when any of them was
    rebound. (Like dask, an in-place mutation of such a global is not noticed.)
    """

    def __init__(self, size: int = 256):
        self._size = size
        self._cache: weakref.WeakKeyDictionary[Callable[..., Any], tuple[Any, tuple[Any, ...], bytes]]
        self._cache = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    @staticmethod
    def _plan(fn: Callable[..., Any], depth: int = 0) -> list[tuple[dict[str, Any], tuple[str, ...], Any]]:
        """Where a pickle of ``fn`` captures values: (globals, names used, closure) of ``fn`` and of the
        functions it refers to. Computed once per function; ``_fingerprint`` reads the values."""
        code = getattr(fn, "__code__", None)
        if code is None:
            return []
        g: dict[str, Any] = getattr(fn, "__globals__", {})
        names = tuple(sorted(_code_names(code)))
        plan = [(g, names, getattr(fn, "__closure__", None))]
        if depth < 3:
            for name in names:
                obj = g.get(name)
                if obj is not fn and callable(obj) and hasattr(obj, "__code__"):
                    plan.extend(FunctionPickles._plan(obj, depth + 1))
        return plan

    @staticmethod
    def _fingerprint(plan: list[tuple[dict[str, Any], tuple[str, ...], Any]]) -> tuple[Any, ...]:
        """The objects a pickle captures by value (referenced globals, also in nested code, and closure
        cells), kept as strong references and compared with ``is``: a reused address cannot fool it."""
        out: list[Any] = []
        for g, names, closure in plan:
            out.extend(g.get(n, _MISSING) for n in names)
            for cell in closure or ():
                try:
                    out.append(cell.cell_contents)
                except ValueError:  # empty cell
                    out.append(_MISSING)
        return tuple(out)

    def get(self, fn: Callable[..., Any]) -> bytes:
        """The pickle of ``fn`` (cached while its referenced globals and closure stay the same)."""
        try:
            hit = self._cache.get(fn)
        except TypeError:  # not weak-referenceable (e.g. some builtins): no caching
            return cloudpickle.dumps(fn, protocol=PROTOCOL)  # type: ignore[no-any-return]
        if hit is not None:
            old_plan, old_fp, cached = hit
            now = self._fingerprint(old_plan)
            if len(now) == len(old_fp) and all(a is b for a, b in zip(now, old_fp, strict=True)):
                return cached
        plan = self._plan(fn)  # names may have changed too (a global rebound to another function)
        fp = self._fingerprint(plan)
        data: bytes = cloudpickle.dumps(fn, protocol=PROTOCOL)
        with self._lock:
            if len(self._cache) >= self._size:
                self._cache.clear()
            self._cache[fn] = (plan, fp, data)
        return data


class FunctionCache:
    """Engine side: unpickled functions keyed by their pickle bytes (LRU).

    With ``rebind`` (the engine's namespace), functions shipped by value (those defined in the client's
    script or notebook, lambdas, closures) run with that namespace as their globals, as in ipyparallel:
    variables pushed to the engine are visible to them. The globals cloudpickle shipped along fill in
    only names the namespace lacks. Functions of importable modules keep their module's globals.
    """

    def __init__(self, size: int = 256, rebind: dict[str, Any] | None = None):
        self._size = size
        self._cache: OrderedDict[bytes, Any] = OrderedDict()
        self._ns = rebind

    def load(self, data: Any) -> Any:
        key = bytes(data)
        fn = self._cache.get(key)
        if fn is not None:
            self._cache.move_to_end(key)
        else:
            fn = pickle.loads(key)
            if self._ns is not None:
                fn = _rebind(fn, self._ns)
            self._cache[key] = fn
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return fn


def _rebind(fn: Any, ns: dict[str, Any]) -> Any:
    """Give a function shipped by value (its globals are not its module's) the engine namespace."""
    if not isinstance(fn, types.FunctionType):
        return fn
    module = sys.modules.get(fn.__module__)
    if module is not None and fn.__globals__ is module.__dict__:
        return fn  # pickled by reference: an importable module's function keeps that module's globals
    for name, value in fn.__globals__.items():
        if not name.startswith("__"):
            ns.setdefault(name, value)
    new = types.FunctionType(fn.__code__, ns, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__ = fn.__qualname__
    return new


def describe_exception(exc: BaseException) -> list[str]:
    """``[type name, message, traceback text]`` of an exception, as it travels on the wire."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return [type(exc).__name__, str(exc), tb]
