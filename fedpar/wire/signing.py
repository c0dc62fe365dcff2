"""Keys, MACs and the replay guard.

* The cluster key (32 random bytes, fresh per cluster) never signs anything directly: HKDF derives
  one key per purpose (``derive``), so a later bulk-data MAC or registry MAC never shares a key with
  the message MAC.
* ``Signer`` computes HMAC-SHA256 over the length-framed header **and every payload frame**: the
  lengths of all parts are hashed first, so no two different framings give the same input. A frame
  larger than ``BULK_THRESHOLD`` is first authenticated with AES-GCM used as a MAC (GMAC: the frame is
  associated data, nothing is encrypted) under its own derived key, and its 16-byte tag goes into the
  HMAC instead of the frame: measured here 4-5 GB/s against 0.23 GB/s for HMAC-SHA256. The GMAC nonce
  is the first 8 bytes of SHA-256 of the header (which names the sender and its sequence number, so it
  never repeats) followed by the frame's index.
* ``ReplayGuard`` rejects a message whose sequence number is not above the sender's high-water mark
  or whose timestamp is outside the window.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
import time
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpar.errors import ReplayError, SignatureError

KEY_BYTES = 32
MAC_BYTES = 32  # HMAC-SHA256 digest size
MESSAGE_MAC_INFO = b"fedpar message mac v1"
BULK_MAC_INFO = b"fedpar bulk mac v1"
BULK_THRESHOLD = 64 << 10  # frames above this are GMAC'd first (HMAC-SHA256 is the bottleneck for bulk)

_JOIN_LIMIT = 1 << 16  # join frames totalling up to this many bytes before hashing
Buffer = Any  # bytes, bytearray, memoryview or anything exposing the buffer protocol


def new_cluster_key() -> bytes:
    """A fresh random cluster key."""
    return os.urandom(KEY_BYTES)


def derive(cluster_key: bytes, info: bytes) -> bytes:
    """Derive a purpose-specific key from the cluster key (HKDF-SHA256)."""
    if len(cluster_key) < 16:
        raise ValueError("the cluster key must be at least 16 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(cluster_key)


class Signer:
    """HMAC-SHA256 over ``len-prefix(header, *frames) || header || frames``."""

    __slots__ = ("_base", "_bulk")

    def __init__(self, cluster_key: bytes):
        self._base = hmac.new(derive(cluster_key, MESSAGE_MAC_INFO), digestmod=hashlib.sha256)
        self._bulk = AESGCM(derive(cluster_key, BULK_MAC_INFO))

    def sign(self, header: Buffer, frames: Sequence[Buffer] = ()) -> bytes:
        """The MAC of a header and its payload frames."""
        h = self._base.copy()
        n = len(frames)
        sizes = [_nbytes(f) for f in frames]
        hsize = _nbytes(header)
        lengths = struct.pack(f">{n + 2}Q", n, hsize, *sizes)
        if hsize + sum(sizes) <= _JOIN_LIMIT:  # small: one update of the joined parts is much cheaper than several
            h.update(b"".join((lengths, header, *frames)))
            return h.digest()
        h.update(lengths)
        h.update(header)
        if n and max(sizes) > BULK_THRESHOLD:
            nonce = hashlib.sha256(header).digest()[:8]
            gmac = self._bulk.encrypt
            for i, f in enumerate(frames):
                h.update(gmac(nonce + i.to_bytes(4, "big"), b"", f) if sizes[i] > BULK_THRESHOLD else f)
        else:
            for f in frames:
                h.update(f)
        return h.digest()

    def verify(self, mac: Buffer, header: Buffer, frames: Sequence[Buffer] = ()) -> None:
        """Raise ``SignatureError`` unless ``mac`` matches. Constant-time comparison."""
        if _nbytes(mac) != MAC_BYTES or not hmac.compare_digest(self.sign(header, frames), bytes(mac)):
            raise SignatureError(
                "message MAC does not match: the sender uses another cluster key, or the message was "
                "altered in transit"
            )


def _nbytes(b: Buffer) -> int:
    return len(b) if type(b) is bytes or type(b) is bytearray else memoryview(b).nbytes


class ReplayGuard:
    """Per-sender sequence high-water marks plus a timestamp window.

    ``marks`` can be seeded from persisted state so a restarted controller keeps rejecting replays.
    Marks of senders silent for more than twice the window are dropped by ``prune``: a message accepted
    at time T carries a timestamp within ``window`` of T, so after T + 2 * window any replay of it fails
    the timestamp check anyway. The guard's memory stays proportional to recently active senders.
    """

    __slots__ = ("_marks", "_seen", "window")

    def __init__(self, window: float = 300.0, marks: dict[str, int] | None = None):
        self.window = window
        self._marks: dict[str, int] = dict(marks or {})
        now = time.time()
        self._seen: dict[str, float] = dict.fromkeys(self._marks, now)

    def check(self, sender: str, seq: int, ts: float, now: float | None = None) -> None:
        """Accept (and record) ``seq`` from ``sender`` or raise ``ReplayError``."""
        if now is None:
            now = time.time()
        if not math.isfinite(ts) or abs(now - ts) > self.window:
            raise ReplayError(
                f"message from {sender!r} is timestamped {now - ts:+.1f}s from now, outside the "
                f"{self.window:.0f}s window (are the clocks of the two hosts in sync?)"
            )
        if seq <= self._marks.get(sender, 0):
            raise ReplayError(f"message from {sender!r} repeats sequence number {seq}")
        self._marks[sender] = seq
        self._seen[sender] = now

    def mark(self, sender: str) -> int:
        """The highest sequence number accepted from ``sender`` (0 if none)."""
        return self._marks.get(sender, 0)

    def prune(self, now: float | None = None) -> list[str]:
        """Drop the marks of senders silent for more than ``2 * window``; returns those senders."""
        limit = (time.time() if now is None else now) - 2 * self.window
        gone = [s for s, t in self._seen.items() if t < limit]
        for s in gone:
            del self._seen[s]
            self._marks.pop(s, None)
        return gone

    def marks(self) -> dict[str, int]:
        """A copy of all marks (for persisting)."""
        return dict(self._marks)
