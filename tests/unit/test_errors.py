"""Tests for fedpar.errors: the hierarchy, pickling, RemoteError and CompositeError."""

from __future__ import annotations

import builtins
import inspect
import pickle

import cloudpickle
import pytest

import fedpar
from fedpar import errors
from fedpar.errors import (
    CompositeError,
    EngineError,
    FedparError,
    MalformedMessage,
    ProtocolError,
    RemoteError,
    ReplayError,
    ResultNotFound,
    SignatureError,
    StoreError,
    StoreFull,
    TaskAborted,
    TaskError,
    TimeoutError,
)

ALL_CLASSES = [
    obj for _name, obj in inspect.getmembers(errors, inspect.isclass)
    if issubclass(obj, BaseException) and obj.__module__ == errors.__name__
]

EXPECTED_PARENTS = {
    "ConfigError": FedparError, "ConnectionFileError": FedparError, "ProtocolError": FedparError,
    "MalformedMessage": ProtocolError, "SignatureError": ProtocolError, "ReplayError": ProtocolError,
    "TransportError": FedparError, "TimeoutError": FedparError, "ControllerUnavailable": FedparError,
    "NoEnginesError": FedparError, "UnknownEngineError": FedparError, "TaskError": FedparError,
    "RemoteError": TaskError, "EngineError": TaskError, "TaskAborted": TaskError, "ResultNotFound": TaskError,
    "CompositeError": FedparError, "StoreError": FedparError, "StoreFull": StoreError,
    "ClusterError": FedparError, "StreamError": TaskError, "StreamTimeout": errors.StreamError,
    "StreamCorrupted": errors.StreamError, "StreamAborted": errors.StreamError,
    "DiscoveryError": FedparError, "RegistryUnavailable": errors.DiscoveryError, "ResultUnavailable": TaskError,
}


def make(cls: type[BaseException]) -> BaseException:
    if cls is RemoteError:
        return RemoteError("ValueError", "bad", "Traceback...", task_id="t-1", engine_id=2)
    if cls is CompositeError:
        return CompositeError([RemoteError("A", "a"), EngineError("lost", engine_id=1)])
    if issubclass(cls, TaskError):
        return cls("something failed", task_id="t-9", engine_id=4)
    return cls("something failed")


def test_the_module_defines_every_documented_class() -> None:
    assert {c.__name__ for c in ALL_CLASSES} == set(EXPECTED_PARENTS) | {"FedparError"}


def test_every_class_subclasses_fedpar_error() -> None:
    for cls in ALL_CLASSES:
        assert issubclass(cls, FedparError), cls
        assert issubclass(cls, Exception)


@pytest.mark.parametrize(("name", "parent"), sorted(EXPECTED_PARENTS.items(), key=lambda kv: kv[0]))
def test_hierarchy_matches_docstring(name: str, parent: type[BaseException]) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, parent)
    assert parent in cls.__mro__[1:]
    assert name in (errors.__doc__ or "")


def test_every_class_is_exported_and_documented() -> None:
    for cls in ALL_CLASSES:
        assert getattr(fedpar, cls.__name__) is cls
        assert cls.__name__ in fedpar.__all__
        assert cls.__doc__


def test_timeout_error_is_also_builtin() -> None:
    assert issubclass(TimeoutError, builtins.TimeoutError)
    assert issubclass(TimeoutError, FedparError)
    assert TimeoutError is not builtins.TimeoutError
    with pytest.raises(builtins.TimeoutError):
        raise TimeoutError("too slow")
    with pytest.raises(FedparError, match="too slow"):
        raise TimeoutError("too slow")
    assert str(TimeoutError("too slow")) == "too slow"


def test_protocol_errors() -> None:
    for cls in (MalformedMessage, SignatureError, ReplayError):
        with pytest.raises(ProtocolError):
            raise cls("x")


def test_task_error_attributes() -> None:
    e = TaskAborted("cancelled", task_id="t-3", engine_id=None)
    assert str(e) == "cancelled"
    assert e.task_id == "t-3" and e.engine_id is None
    plain = ResultNotFound("no such id")
    assert plain.task_id is None and plain.engine_id is None


def test_remote_error_attributes_and_message() -> None:
    e = RemoteError("ZeroDivisionError", "division by zero", "Traceback (most recent call last):\n  ...\n",
                    task_id="t-1", engine_id=3)
    assert e.ename == "ZeroDivisionError"
    assert e.evalue == "division by zero"
    assert e.traceback.startswith("Traceback")
    assert e.task_id == "t-1" and e.engine_id == 3
    assert str(e) == "ZeroDivisionError: division by zero"
    assert isinstance(e, TaskError)


def test_remote_error_render_traceback() -> None:
    e = RemoteError("KeyError", "'x'", "Traceback:\n  line\n\n", engine_id=5)
    assert e.render_traceback() == "[engine 5] Traceback:\n  line\nKeyError: 'x'"
    assert RemoteError("E", "v", "tb").render_traceback() == "tb\nE: v"


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_remote_error_pickle_round_trip(dumps: object) -> None:
    e = RemoteError("ValueError", "bad value", "Traceback...\n  File x\n", task_id="t-7", engine_id=11)
    got = pickle.loads(dumps(e))  # type: ignore[operator]
    assert type(got) is RemoteError
    assert (got.ename, got.evalue, got.traceback, got.task_id, got.engine_id) == (
        "ValueError", "bad value", "Traceback...\n  File x\n", "t-7", 11)
    assert str(got) == str(e)
    assert got.args == e.args


def test_remote_error_pickle_defaults() -> None:
    got = pickle.loads(pickle.dumps(RemoteError("E", "v")))
    assert (got.traceback, got.task_id, got.engine_id) == ("", None, None)


@pytest.mark.parametrize("cls", [c for c in ALL_CLASSES if c is not CompositeError], ids=lambda c: c.__name__)
def test_every_error_pickles(cls: type[BaseException]) -> None:
    e = make(cls)
    got = pickle.loads(pickle.dumps(e))
    assert type(got) is cls
    assert str(got) == str(e)
    for attr in ("task_id", "engine_id", "ename", "evalue", "traceback"):
        assert getattr(got, attr, None) == getattr(e, attr, None)


def test_composite_error_lists_each_error() -> None:
    errs = [
        RemoteError("ValueError", "bad 1", task_id="t-0", engine_id=0),
        EngineError("engine 3 died", task_id="t-1", engine_id=3),
        RemoteError("KeyError", "'k'", task_id="t-2"),
    ]
    c = CompositeError(errs)
    msg = str(c)
    assert msg.splitlines()[0] == "3 task(s) failed:"
    assert "[engine 0] ValueError: bad 1" in msg
    assert "[engine 3] engine 3 died" in msg
    assert "KeyError: 'k'" in msg
    assert msg.splitlines()[3].strip() == "KeyError: 'k'"  # no engine prefix when unknown
    assert c.errors == errs
    assert c.errors is not errs  # copied


def test_composite_error_raise_exception() -> None:
    errs = [RemoteError("A", "first"), EngineError("second"), RemoteError("C", "third")]
    c = CompositeError(errs)
    for i, err in enumerate(errs):
        with pytest.raises(type(err)) as info:
            c.raise_exception(i)
        assert info.value is err
    with pytest.raises(RemoteError) as info:
        c.raise_exception()
    assert info.value is errs[0]
    with pytest.raises(RemoteError) as info:
        c.raise_exception(-1)
    assert info.value is errs[-1]
    with pytest.raises(IndexError):
        c.raise_exception(3)


def test_composite_error_accepts_any_sequence() -> None:
    c = CompositeError((RemoteError("A", "a"),))
    assert len(c.errors) == 1 and str(c).startswith("1 task(s) failed:")


def test_composite_error_pickle_round_trip() -> None:
    c = CompositeError([RemoteError("A", "a", task_id="t-0", engine_id=1), EngineError("lost", engine_id=2)])
    got = pickle.loads(pickle.dumps(c))
    assert type(got) is CompositeError
    assert str(got) == str(c)
    assert [type(e) for e in got.errors] == [RemoteError, EngineError]
    assert got.errors[0].engine_id == 1


def test_store_full_is_store_error() -> None:
    with pytest.raises(StoreError):
        raise StoreFull("disk full")
