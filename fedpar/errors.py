"""Every error fedpar raises, in one place.

Hierarchy::

    FedparError                     root of everything fedpar raises
    ├── ConfigError                 a bad .ini value or an unusable option
    ├── ConnectionFileError         connection file missing, unreadable or malformed
    ├── ProtocolError               a message that cannot be accepted
    │   ├── MalformedMessage        bad framing, header or field types
    │   ├── SignatureError          missing or wrong MAC (wrong cluster key?)
    │   └── ReplayError             sequence number or timestamp outside the window
    ├── TransportError              sockets could not bind / connect
    ├── TimeoutError                a wait ran past its deadline (also a builtin TimeoutError)
    ├── ControllerUnavailable       the controller does not answer
    ├── DiscoveryError              the discovery registry (lmdb, etcd, consul) failed or refused
    │   └── RegistryUnavailable     the registry cannot be reached
    ├── NoEnginesError              work needs engines and none are registered
    ├── UnknownEngineError          a direct request named an engine that is not registered
    ├── TaskError                   base of failures attached to one task
    │   ├── RemoteError             user code raised on an engine (type, message, traceback)
    │   ├── EngineError             the engine running the task died or was lost
    │   ├── TaskAborted             the task was cancelled before it ran
    │   ├── ResultNotFound          no such task id in the controller's store
    │   ├── ResultUnavailable       the result is stored by a controller that is down
    │   └── StreamError             a large payload's chunk stream failed (nothing partial is kept)
    │       ├── StreamTimeout       the sender stalled or died mid-stream
    │       ├── StreamCorrupted     a chunk failed authentication or broke the announced layout
    │       └── StreamAborted       the other end abandoned the stream
    ├── CompositeError              several tasks of one request failed; lists each
    ├── StoreError                  the controller's LMDB store failed
    │   └── StoreFull               the store hit its size limit or the disk is full
    └── ClusterError                starting or stopping a cluster failed
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence


class FedparError(Exception):
    """Root of every exception fedpar raises."""


class ConfigError(FedparError):
    """A configuration value is invalid; the message names the section and key."""


class ConnectionFileError(FedparError):
    """A connection file is missing, unreadable or malformed."""


class ProtocolError(FedparError):
    """A message could not be accepted."""


class MalformedMessage(ProtocolError):
    """Framing, header encoding or field types are wrong."""


class SignatureError(ProtocolError):
    """The MAC is missing or does not match: the peer probably uses another cluster key."""


class ReplayError(ProtocolError):
    """The message repeats an old sequence number or its timestamp is outside the window."""


class TransportError(FedparError):
    """A socket could not be bound or connected."""


class TimeoutError(FedparError, builtins.TimeoutError):
    """A wait ran past its deadline. Also an instance of the builtin ``TimeoutError``."""


class ControllerUnavailable(FedparError):
    """The controller did not answer; check that it runs and that the connection file is current."""


class DiscoveryError(FedparError):
    """The discovery registry through which controllers find each other failed or refused a request
    (a bad URL, a missing backend library, an ACL refusal, a registration that could not be kept)."""


class RegistryUnavailable(DiscoveryError):
    """The discovery registry cannot be reached: check its URL, that it runs, and the network to it."""


class NoEnginesError(FedparError):
    """The request needs engines and none are registered."""


class UnknownEngineError(FedparError):
    """A direct request named an engine id that is not registered."""


class TaskError(FedparError):
    """A failure attached to one task. ``task_id`` and ``engine_id`` say where it happened."""

    def __init__(self, message: str, *, task_id: str | None = None, engine_id: int | None = None):
        super().__init__(message)
        self.task_id = task_id
        self.engine_id = engine_id


class RemoteError(TaskError):
    """User code raised on an engine.

    ``ename`` is the remote exception's type name, ``evalue`` its message and ``traceback``
    the remote traceback as text.
    """

    def __init__(
        self,
        ename: str,
        evalue: str,
        traceback: str = "",
        *,
        task_id: str | None = None,
        engine_id: int | None = None,
    ):
        super().__init__(f"{ename}: {evalue}", task_id=task_id, engine_id=engine_id)
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_remote_error, (self.ename, self.evalue, self.traceback, self.task_id, self.engine_id))

    def render_traceback(self) -> str:
        """The remote traceback followed by the error line, as IPython shows it."""
        where = f"[engine {self.engine_id}] " if self.engine_id is not None else ""
        return f"{where}{self.traceback.rstrip()}\n{self.ename}: {self.evalue}"


def _rebuild_remote_error(
    ename: str, evalue: str, tb: str, task_id: str | None, engine_id: int | None
) -> RemoteError:
    return RemoteError(ename, evalue, tb, task_id=task_id, engine_id=engine_id)


class EngineError(TaskError):
    """The engine running the task died or was lost before it returned a result."""


class TaskAborted(TaskError):
    """The task was cancelled before an engine ran it."""


class ResultNotFound(TaskError):
    """The controller's store holds no task with this id (never submitted, or purged)."""


class ResultUnavailable(TaskError):
    """No live controller holds the result, and a controller that may hold it is down: the result comes
    back when a controller runs on that controller's state directory again."""


class StreamError(TaskError):
    """A large payload travelling as a chunk stream did not arrive whole; its partial state was freed."""


class StreamTimeout(StreamError):
    """No chunk (or no credit) moved within the stream timeout: the sender stalled or died."""


class StreamCorrupted(StreamError):
    """A chunk failed authentication or did not fit the announced layout; the stream was aborted."""


class StreamAborted(StreamError):
    """The other end of the stream gave up on it (for example the payload was purged meanwhile)."""


class CompositeError(FedparError):
    """Several tasks of one request failed. ``errors`` lists each failure in task order."""

    def __init__(self, errors: Sequence[FedparError]):
        self.errors = list(errors)
        lines = [f"{len(self.errors)} task(s) failed:"]
        for err in self.errors:
            eid = getattr(err, "engine_id", None)
            where = f"[engine {eid}] " if eid is not None else ""
            lines.append(f"  {where}{err}")
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[object, ...]:
        return (CompositeError, (self.errors,))

    def raise_exception(self, index: int = 0) -> None:
        """Raise the ``index``-th underlying failure (ipyparallel's name for it)."""
        raise self.errors[index]


class StoreError(FedparError):
    """The controller's LMDB store failed."""


class StoreFull(StoreError):
    """The store reached its maximum map size or the disk is full. Reads keep working."""


class ClusterError(FedparError):
    """Starting, connecting to or stopping a cluster failed."""
