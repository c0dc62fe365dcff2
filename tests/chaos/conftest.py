"""Fixtures for the chaos tests: real controller and engine processes, killed and paused on purpose.

``procs`` (a :class:`chaosutil.Proc`) starts a restartable controller and engines as subprocesses, logs in
the test's tmp dir; at teardown it SIGKILLs every process it started (by pid) and asserts none is left.
Task functions defined in the test modules are pickled by value (the engines cannot import the test
modules), see ``_pickle_test_module_by_value``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from chaosutil import Proc


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Proc]:
    """A :class:`Proc` whose processes are all SIGKILLed (by pid) at teardown."""
    mgr = Proc(tmp_path)
    try:
        yield mgr
    finally:
        mgr.cleanup()


@pytest.fixture
def make_procs(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """A factory of :class:`Proc` with options (``heartbeat=``, ``misses=``, ``map_size=`` ...)."""
    made: list[Proc] = []

    def make(name: str = "c", **kw: Any) -> Proc:
        root = tmp_path / name
        root.mkdir()
        p = Proc(root, **kw)
        made.append(p)
        return p

    try:
        yield make
    finally:
        errors = []
        for p in made:
            try:
                p.cleanup()
            except AssertionError as exc:
                errors.append(str(exc))
        assert not errors, errors


@pytest.fixture(autouse=True)
def _runtime_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connection files never land in the user's runtime directory (the subprocesses get their own too)."""
    monkeypatch.setenv("FEDPAR_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))
    monkeypatch.delenv("FEDPAR_CONFIG", raising=False)
    monkeypatch.delenv("FEDPAR_CONNECTION_FILE", raising=False)


@pytest.fixture(autouse=True)
def _pickle_test_module_by_value(request: pytest.FixtureRequest) -> Iterator[None]:
    """Engines cannot import the test modules: ship their functions by value."""
    mod = request.module
    cloudpickle.register_pickle_by_value(mod)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            cloudpickle.unregister_pickle_by_value(mod)

