"""Helpers shared by the stream tests (``test_streams``, ``test_direct_streams``)."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import zmq

import fedpar
from fedpar.runtime import ConnectionInfo
from fedpar.wire.codec import Codec, Received
from fedpar.wire.protocol import (
    Chunk,
    ClientHello,
    Credit,
    Message,
    StreamAbort,
    Submit,
    SubmitReply,
    TaskSpec,
    Welcome,
)
from fedpar.wire.streams import Sender, frame_size, memory_source
from fedpar.wire.transport import connect_dealer, send_parts

_counter = itertools.count(1)


def stats(client: fedpar.Client) -> dict[str, Any]:
    st = client.status()
    st.pop("engines")
    return st


def wait_until(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)




def assert_same(got: Any, want: Any) -> None:
    """Equal value, type, dtype, shape and memory order; arrays are writable (an in-place write works)."""
    assert type(got) is type(want), (type(got), type(want))
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.flags.f_contiguous == want.flags.f_contiguous or got.ndim < 2
        assert np.array_equal(got, want)
        assert got.flags.writeable, "a result array is read-only"
        np.copyto(got, want)  # an in-place write: raises ValueError on read-only memory
    elif isinstance(want, tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    else:
        assert got == want


class RawClient:
    """A hand-driven client on a DEALER socket: every message it receives is decoded and kept in ``seen``."""

    def __init__(self, ctx: zmq.Context[Any], info: ConnectionInfo, tag: str):
        self.sender = f"client:raw-{tag}-{os.getpid()}-{next(_counter)}"
        self.sock = connect_dealer(ctx, info.client_endpoint, self.sender.encode())
        self.codec = Codec(info.key, self.sender)
        self.seen: list[Received] = []

    def send(self, msg: Message, frames: list[Any] | None = None) -> int:
        parts, rid = self.codec.encode(msg, frames or [])
        send_parts(self.sock, parts)
        return rid

    def poll(self, timeout: float) -> Received | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        rx = self.codec.decode(self.sock.recv_multipart())
        self.seen.append(rx)
        return rx

    def expect(self, what: str, match: Callable[[Message], bool], timeout: float = 10.0) -> Message:
        for rx in self.seen:
            if match(rx.msg):
                return rx.msg
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rx = self.poll(max(0.0, deadline - time.monotonic()))
            if rx is not None and match(rx.msg):
                return rx.msg
        pytest.fail(f"no {what} from the controller within {timeout}s; got {[r.msg for r in self.seen]}")

    def hello(self) -> Welcome:
        rid = self.send(ClientHello(self.sender))
        msg = self.expect("Welcome", lambda m: isinstance(m, Welcome) and m.reply_to == rid)
        assert isinstance(msg, Welcome)
        return msg

    def announce(self, tid: str, target: int, sid: int, frames: list[Any], extra: dict[str, Any] | None = None,
                 ) -> Sender:
        """Submit a streamed push of ``frames`` (``extra``: more spec fields); returns the Sender (chunks
        follow as credit arrives)."""
        sizes = [frame_size(f) for f in frames]
        self.send(Submit([TaskSpec(tid, "push", target, 0, 0, {"stream": [sid, sizes], **(extra or {})})]))
        return Sender(sid, sizes, memory_source(frames), time.monotonic())

    def credit(self, sid: int, timeout: float = 10.0) -> int:
        msg = self.expect(f"Credit for stream {sid}", lambda m: isinstance(m, Credit) and m.sid == sid, timeout)
        assert isinstance(msg, Credit)
        self.seen = [r for r in self.seen if r.msg is not msg]
        return msg.upto

    def chunk_parts(self, sid: int, index: int, data: Any) -> list[Any]:
        return self.codec.encode(Chunk(sid, index), [data])[0]

    def close(self) -> None:
        self.sock.close(0)


def rejected(tid: str) -> Callable[[Message], bool]:
    return lambda m: isinstance(m, SubmitReply) and any(r[0] == tid for r in m.rejected)


def accepted(tid: str) -> Callable[[Message], bool]:
    return lambda m: isinstance(m, SubmitReply) and tid in m.accepted


def aborted(sid: int) -> Callable[[Message], bool]:
    return lambda m: isinstance(m, StreamAbort) and m.sid == sid
