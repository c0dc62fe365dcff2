"""Bytes <-> messages: ``[b"", MAC, HEADER, *PAYLOAD]`` with the MAC checked before anything is decoded.

One ``Codec`` per socket owner (it holds that sender's sequence counter and the replay guard for what it
receives). Payload frames pass through untouched: the codec never unpickles anything.

Many small payload frames (a batch of results of a few bytes each) cost one zmq part each at every hop;
when all of a message's frames are small they travel concatenated in one part, their lengths in the
header field ``pk``, and the receiver slices them apart again without copying. Above the codec nothing
changes: ``decode`` returns the same logical frames ``encode`` was given.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack

from fedpar.errors import MalformedMessage
from fedpar.wire.protocol import (
    PROTOCOL_VERSION,
    Message,
    message_from_header,
    payload_frame_count,
)
from fedpar.wire.signing import MAC_BYTES, Buffer, ReplayGuard, Signer

MAX_HEADER_BYTES = 4 << 20
MAX_PARTS = 1 << 16
PACK_FRAME_LIMIT = 64 << 10  # payload frames at most this big travel packed together in one zmq part
PACK_TOTAL_LIMIT = 1 << 20


class Envelope(NamedTuple):
    """The envelope fields of a received message (a NamedTuple: built on every receive, 10x cheaper than a
    frozen dataclass)."""

    kind: str
    id: int
    sender: str
    seq: int
    ts: float
    epoch: int


class Received(NamedTuple):
    """A verified, decoded message: envelope, message object and its payload frames (untouched)."""

    envelope: Envelope
    msg: Message
    frames: list[Any]


def _buf(part: Any) -> Any:
    """The buffer of a received part (``zmq.Frame`` or bytes)."""
    return part.buffer if hasattr(part, "buffer") else part


class Codec:
    """Signs and sequences outgoing messages; verifies, replay-checks and decodes incoming ones."""

    def __init__(
        self,
        cluster_key: bytes,
        sender: str,
        *,
        epoch: int = 0,
        replay_window: float = 300.0,
        marks: dict[str, int] | None = None,
    ):
        self.signer = Signer(cluster_key)
        self.sender = sender
        self.epoch = epoch
        self.guard = ReplayGuard(replay_window, marks)
        self._seq = itertools.count(1)
        self._packb = msgpack.Packer(use_bin_type=True).pack

    # ------------------------------------------------------------------ sending
    def encode(self, msg: Message, frames: Sequence[Buffer] = ()) -> tuple[list[Any], int]:
        """Frames to send (starting with the empty delimiter) and the message's request id."""
        seq = next(self._seq)
        head = msg.to_wire()
        head["v"] = PROTOCOL_VERSION
        head["kind"] = msg.KIND
        head["id"] = seq
        head["sender"] = self.sender
        head["seq"] = seq
        head["ts"] = time.time()
        head["epoch"] = self.epoch
        if len(frames) > 1:
            sizes = [_size(f) for f in frames]
            if max(sizes) <= PACK_FRAME_LIMIT and sum(sizes) <= PACK_TOTAL_LIMIT:
                head["pk"] = sizes
                frames = [b"".join(frames)]
        header = self._packb(head)
        mac = self.signer.sign(header, frames)
        return [b"", mac, header, *frames], seq

    # ------------------------------------------------------------------ receiving
    def decode(self, parts: Sequence[Any], start: int = 0) -> Received:
        """Verify and decode ``parts[start:]`` (``b"", MAC, HEADER, *PAYLOAD``).

        Raises ``SignatureError``, ``ReplayError`` or ``MalformedMessage``; nothing is decoded before
        the MAC has been checked.
        """
        n = len(parts) - start
        if n < 3 or n > MAX_PARTS:
            raise MalformedMessage(f"message has {n} parts; expected at least 3 and at most {MAX_PARTS}")
        if len(_buf(parts[start])) != 0:
            raise MalformedMessage("missing empty delimiter frame")
        mac = _buf(parts[start + 1])
        header = _buf(parts[start + 2])
        if len(mac) != MAC_BYTES:
            raise MalformedMessage(f"MAC frame has {len(mac)} bytes, expected {MAC_BYTES}")
        if len(header) > MAX_HEADER_BYTES:
            raise MalformedMessage(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
        frames = parts[start + 3:] if type(parts[-1]) is bytes else [_buf(p) for p in parts[start + 3:]]
        self.signer.verify(mac, header, frames)
        try:
            head = msgpack.unpackb(header, raw=False, strict_map_key=True, max_bin_len=MAX_HEADER_BYTES)
        except Exception as exc:  # msgpack raises several unrelated types
            raise MalformedMessage(f"header is not valid msgpack: {exc}") from None
        if not isinstance(head, dict):
            raise MalformedMessage("header is not a map")
        env = _envelope(head)
        self.guard.check(env.sender, env.seq, env.ts)
        packed = head.get("pk")
        if packed is not None:
            frames = _unpack_frames(packed, frames)
        msg = message_from_header(head)
        expected = payload_frame_count(msg)
        if expected != len(frames):
            raise MalformedMessage(f"{env.kind}: items declare {expected} payload frames, got {len(frames)}")
        return Received(env, msg, list(frames))


def _size(f: Any) -> int:
    return len(f) if type(f) is bytes else memoryview(f).nbytes


def _unpack_frames(sizes: Any, frames: Sequence[Any]) -> list[Any]:
    """Split a packed payload part back into its frames (memoryview slices: no copy)."""
    if not (type(sizes) is list and len(frames) == 1 and len(sizes) <= MAX_PARTS):
        raise MalformedMessage("bad packed-frame table")
    whole = memoryview(frames[0])
    out: list[Any] = []
    pos = 0
    for n in sizes:
        if type(n) is not int or n < 0:
            raise MalformedMessage("bad packed-frame table")
        out.append(whole[pos:pos + n])
        pos += n
    if pos != whole.nbytes:
        raise MalformedMessage("packed frame sizes do not add up to the packed part")
    return out


def _envelope(head: dict[Any, Any]) -> Envelope:
    try:  # (ENVELOPE_KEYS, spelled out: this runs for every message received)
        v, kind, mid, sender = head["v"], head["kind"], head["id"], head["sender"]
        seq, ts, epoch = head["seq"], head["ts"], head["epoch"]
    except KeyError as exc:
        raise MalformedMessage(f"header lacks envelope field {exc.args[0]!r}") from None
    if v != PROTOCOL_VERSION:
        raise MalformedMessage(f"protocol version {v!r}; this fedpar speaks {PROTOCOL_VERSION}")
    if not (
        type(kind) is str and type(mid) is int and type(sender) is str and 0 < len(sender) <= 256
        and type(seq) is int and seq > 0 and (type(ts) is float or type(ts) is int) and type(epoch) is int
    ):
        raise MalformedMessage("envelope field of the wrong type")
    return Envelope(kind, mid, sender, seq, float(ts), epoch)
