"""Views: how work is sent to engines, with ipyparallel's names.

* ``DirectView`` (``client[:]``, ``client[0]``, ``client[[0, 2]]``) runs on chosen engines and reaches
  their namespaces: ``push``/``pull``, ``scatter``/``gather``, ``execute``, ``view["a"] = 1``.
* ``LoadBalancedView`` (``client.load_balanced_view()``) sends each task to whichever engine is free.

Both have ``apply`` / ``apply_async`` / ``apply_sync``, ``map`` / ``map_async`` / ``map_sync`` and the
``@view.remote()`` / ``@view.parallel()`` decorators. ``block`` (default False) picks what ``apply``
and ``map`` do: return an ``AsyncResult`` or wait and return the value.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from fedpar.client.results import AsyncResult, as_list, concat, first
from fedpar.errors import NoEnginesError
from fedpar.wire.payload import FunctionPickles, dumps

if TYPE_CHECKING:
    from fedpar.client.client import Client

_PICKLES = FunctionPickles()
_NO_ARGS = dumps(((), {}))


def _apply_frames(f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    fn = _PICKLES.get(f)
    if not args and not kwargs:
        return [fn, *_NO_ARGS]
    return [fn, *dumps((args, kwargs))]


def _partition(seq: Sequence[Any], n: int) -> list[Sequence[Any]]:
    """Split ``seq`` into ``n`` contiguous parts whose sizes differ by at most one."""
    q, r = divmod(len(seq), n)
    out: list[Sequence[Any]] = []
    start = 0
    for i in range(n):
        end = start + q + (1 if i < r else 0)
        out.append(seq[start:end])
        start = end
    return out


def _as_seqs(sequences: tuple[Any, ...]) -> tuple[list[Sequence[Any]], int]:
    if not sequences:
        raise TypeError("map needs at least one sequence")
    seqs = [s if hasattr(s, "__getitem__") and hasattr(s, "__len__") else list(s) for s in sequences]
    return seqs, min(len(s) for s in seqs)


class View:
    """Behaviour shared by both views."""

    def __init__(self, client: Client, *, block: bool = False, retries: int = 0):
        self.client = client
        self.block = block
        self.retries = retries

    def set_flags(self, *, block: bool | None = None, retries: int | None = None) -> None:
        """Change the view's defaults: ``block`` (wait for values) and ``retries`` (re-runs of a task whose
        engine died; load-balanced work only)."""
        if block is not None:
            self.block = block
        if retries is not None:
            if retries < 0:
                raise ValueError("retries must be >= 0")
            self.retries = retries

    @contextlib.contextmanager
    def temp_flags(self, *, block: bool | None = None, retries: int | None = None) -> Iterator[View]:
        """``with view.temp_flags(retries=2): view.apply(...)`` sets flags for the calls inside only."""
        saved = (self.block, self.retries)
        self.set_flags(block=block, retries=retries)
        try:
            yield self
        finally:
            self.block, self.retries = saved

    # subclasses implement these two
    def apply_async(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> AsyncResult:
        raise NotImplementedError

    def map_async(self, f: Callable[..., Any], *sequences: Any, chunksize: int | None = None) -> AsyncResult:
        raise NotImplementedError

    def apply(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``f(*args, **kwargs)``; waits for the value when ``self.block`` is true."""
        ar = self.apply_async(f, *args, **kwargs)
        return ar.get() if self.block else ar

    def apply_sync(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``f(*args, **kwargs)`` and wait for the value."""
        return self.apply_async(f, *args, **kwargs).get()

    def map(self, f: Callable[..., Any], *sequences: Any, block: bool | None = None,
            chunksize: int | None = None) -> Any:
        """Parallel ``map(f, *sequences)``: a list (blocking) or an ``AsyncResult`` iterating in order."""
        ar = self.map_async(f, *sequences, chunksize=chunksize)
        return ar.get() if (self.block if block is None else block) else ar

    def map_sync(self, f: Callable[..., Any], *sequences: Any, chunksize: int | None = None) -> list[Any]:
        return self.map_async(f, *sequences, chunksize=chunksize).get()  # type: ignore[no-any-return]

    def _map_chunks(self, f: Callable[..., Any], seqs: list[Sequence[Any]], bounds: list[tuple[int, int]],
                    targets: Sequence[int | None]) -> AsyncResult:
        fn = _PICKLES.get(f)
        items: list[tuple[str, int | None, list[Any], dict[str, Any]]] = [
            ("map", target, [fn, *dumps(tuple(s[a:b] for s in seqs))], {})
            for (a, b), target in zip(bounds, targets, strict=True)
        ]
        name = getattr(f, "__name__", "function")
        return self.client._submit(items, retries=self.retries, reduce=concat, chunked=True, label=f"map {name}")

    def remote(self, block: bool | None = None) -> Callable[[Callable[..., Any]], RemoteFunction]:
        """Decorator: calling the function runs it remotely through this view."""
        def wrap(f: Callable[..., Any]) -> RemoteFunction:
            return RemoteFunction(self, f, block)
        return wrap

    def parallel(self, block: bool | None = None) -> Callable[[Callable[..., Any]], ParallelFunction]:
        """Decorator: calling the function with sequences splits them and runs one part per task."""
        def wrap(f: Callable[..., Any]) -> ParallelFunction:
            return ParallelFunction(self, f, block)
        return wrap


class RemoteFunction:
    """A function that runs remotely when called (``@view.remote()``)."""

    def __init__(self, view: View, f: Callable[..., Any], block: bool | None):
        self.view, self.func, self.block = view, f, block
        functools.update_wrapper(self, f)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ar = self.view.apply_async(self.func, *args, **kwargs)
        return ar.get() if (self.view.block if self.block is None else self.block) else ar


class ParallelFunction(RemoteFunction):
    """``@view.parallel()``: ``f(seq)`` runs ``f`` on parts of ``seq`` and joins the parts' results.

    ``f.map(seq)`` maps ``f`` over the elements instead (like ``view.map``).
    """

    def __call__(self, *sequences: Any, **kwargs: Any) -> Any:
        seqs, _n = _as_seqs(sequences)
        view = self.view
        if isinstance(view, DirectView):
            targets: list[int | None] = list(view._targets())
        else:
            targets = [None] * max(1, len(view.client.ids))
        parts = [_partition(s, len(targets)) for s in seqs]
        fn = _PICKLES.get(self.func)
        items: list[tuple[str, int | None, list[Any], dict[str, Any]]] = [
            ("apply", t, [fn, *dumps((tuple(p[i] for p in parts), kwargs))], {})
            for i, t in enumerate(targets) if len(parts[0][i])
        ]
        label = f"parallel {getattr(self.func, '__name__', 'function')}"
        ar = view.client._submit(items, retries=view.retries, reduce=concat, label=label)
        return ar.get() if (view.block if self.block is None else self.block) else ar

    def map(self, *sequences: Any) -> Any:
        return self.view.map(self.func, *sequences, block=self.block)


class DirectView(View):
    """Work on specific engines, and access to their namespaces."""

    def __init__(self, client: Client, targets: int | list[int] | str = "all", *, block: bool = False):
        super().__init__(client, block=block)
        self.targets = targets

    def _targets(self) -> list[int]:
        t = self.targets
        ids = self.client.ids if isinstance(t, str) else [t] if isinstance(t, int) else list(t)
        if not ids:
            raise NoEnginesError("no engines are registered; start some or wait for them with "
                                 "client.wait_for_engines(n)")
        return ids

    @property
    def _single(self) -> bool:
        return isinstance(self.targets, int)

    def _each(self, op: str, frames: list[Any], spec: dict[str, Any], label: str,
              reduce: Any = None) -> AsyncResult:
        targets = self._targets()
        items = [(op, t, frames, spec) for t in targets]
        red = reduce or (first if self._single else as_list)
        return self.client._submit(items, reduce=red, label=label)

    def apply_async(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> AsyncResult:
        """Run ``f(*args, **kwargs)`` on every target engine (a value, or a list of per-engine values)."""
        return self._each("apply", _apply_frames(f, args, kwargs), {}, getattr(f, "__name__", "apply"))

    def map_async(self, f: Callable[..., Any], *sequences: Any, chunksize: int | None = None) -> AsyncResult:
        """Map ``f`` over the sequences, one contiguous part per target engine (``chunksize`` ignored)."""
        seqs, n = _as_seqs(sequences)
        targets = self._targets()
        k = max(1, min(len(targets), n))
        sizes = [len(p) for p in _partition(range(n), k)]
        bounds, a = [], 0
        for s in sizes:
            bounds.append((a, a + s))
            a += s
        return self._map_chunks(f, seqs, bounds, targets[:k])

    def execute(self, code: str, block: bool | None = None) -> Any:
        """Run Python source ``code`` in each target engine's namespace."""
        ar = self._each("execute", [], {"code": code}, "execute", reduce=lambda _v: None)
        return ar.get() if (self.block if block is None else block) else ar

    def push(self, ns: dict[str, Any], block: bool | None = None) -> Any:
        """Set the variables of ``ns`` in each target engine's namespace."""
        if not isinstance(ns, dict):
            raise TypeError("push takes a dict of names to values")
        ar = self._each("push", dumps(ns), {}, "push", reduce=lambda _v: None)
        return ar.get() if (self.block if block is None else block) else ar

    def pull(self, names: str | Sequence[str], block: bool | None = None) -> Any:
        """Fetch variables: one name gives its value, a list of names a list (per engine unless single)."""
        spec = {"names": names if isinstance(names, str) else list(names)}
        ar = self._each("pull", [], spec, "pull")
        return ar.get() if (self.block if block is None else block) else ar

    def scatter(self, name: str, seq: Sequence[Any], block: bool | None = None) -> Any:
        """Split ``seq`` into contiguous parts, one per target engine, stored as ``name`` on each."""
        targets = self._targets()
        parts = _partition(seq, len(targets))
        items: list[tuple[str, int | None, list[Any], dict[str, Any]]] = [
            ("push", t, dumps({name: part}), {}) for t, part in zip(targets, parts, strict=True)
        ]
        ar = self.client._submit(items, reduce=lambda _v: None, label="scatter")
        return ar.get() if (self.block if block is None else block) else ar

    def gather(self, name: str, block: bool | None = None) -> Any:
        """Fetch ``name`` from each target engine and join the parts in engine order."""
        ar = self._each("pull", [], {"names": name}, "gather", reduce=concat)
        return ar.get() if (self.block if block is None else block) else ar

    def __setitem__(self, name: str, value: Any) -> None:
        self.push({name: value}, block=True)

    def __getitem__(self, name: str) -> Any:
        return self.pull(name, block=True)

    def __repr__(self) -> str:
        return f"<DirectView {self.targets}>"


class LoadBalancedView(View):
    """Each task goes to whichever engine has room first; ``retries`` re-runs tasks whose engine died."""

    def apply_async(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> AsyncResult:
        """Run ``f(*args, **kwargs)`` on one engine chosen by the scheduler."""
        return self.client._submit([("apply", None, _apply_frames(f, args, kwargs), {})],
                                   retries=self.retries, label=getattr(f, "__name__", "apply"))

    def map_async(self, f: Callable[..., Any], *sequences: Any, chunksize: int | None = None) -> AsyncResult:
        """Map ``f`` over the sequences in chunks of ``chunksize`` elements.

        The default chunk size gives each engine about four chunks (like ``multiprocessing.Pool``), so
        per-task overhead vanishes on long maps while load still balances.
        """
        seqs, n = _as_seqs(sequences)
        if chunksize is None:
            chunksize = max(1, math.ceil(n / (4 * max(1, len(self.client.ids)))))
        elif chunksize < 1:
            raise ValueError("chunksize must be at least 1")
        bounds = [(a, min(a + chunksize, n)) for a in range(0, n, chunksize)]
        return self._map_chunks(f, seqs, bounds, [None] * len(bounds))

    def __repr__(self) -> str:
        return "<LoadBalancedView>"
