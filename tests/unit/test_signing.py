"""Tests for fedpar.wire.signing: key derivation, the message MAC over header + every frame, the replay guard."""

from __future__ import annotations

import math
import time

import pytest

from fedpar.errors import FedparError, ProtocolError, ReplayError, SignatureError
from fedpar.wire.signing import (
    KEY_BYTES,
    MAC_BYTES,
    MESSAGE_MAC_INFO,
    ReplayGuard,
    Signer,
    derive,
    new_cluster_key,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
HEADER = b"\x87\xa1v\x01\xa4kind\xa6submit some header bytes"
FRAMES = [b"pickle-stream-frame", b"\x00" * 17, b"buffer-two", b""]


@pytest.fixture
def signer() -> Signer:
    return Signer(KEY)


def flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


# --------------------------------------------------------------------------- keys
def test_new_cluster_key_is_random_and_sized() -> None:
    a, b = new_cluster_key(), new_cluster_key()
    assert len(a) == len(b) == KEY_BYTES
    assert a != b


def test_derive_is_deterministic() -> None:
    assert derive(KEY, b"purpose") == derive(KEY, b"purpose")
    assert len(derive(KEY, b"purpose")) == KEY_BYTES


def test_derive_separates_purposes_and_keys() -> None:
    keys = {derive(KEY, MESSAGE_MAC_INFO), derive(KEY, b"bulk mac"), derive(KEY, b"registry mac"),
            derive(OTHER_KEY, MESSAGE_MAC_INFO)}
    assert len(keys) == 4
    # the derived key is never the cluster key itself
    assert KEY not in keys and KEY[:KEY_BYTES] not in keys


def test_derive_rejects_short_keys() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        derive(b"x" * 15, b"purpose")
    assert len(derive(b"x" * 16, b"purpose")) == KEY_BYTES


# --------------------------------------------------------------------------- Signer
def test_sign_verify_round_trip(signer: Signer) -> None:
    mac = signer.sign(HEADER, FRAMES)
    assert isinstance(mac, bytes) and len(mac) == MAC_BYTES
    signer.verify(mac, HEADER, FRAMES)
    # deterministic and independent of the Signer instance
    assert Signer(KEY).sign(HEADER, FRAMES) == mac


def test_sign_without_frames(signer: Signer) -> None:
    mac = signer.sign(HEADER)
    signer.verify(mac, HEADER)
    signer.verify(mac, HEADER, [])
    assert mac == signer.sign(HEADER, ())


def test_sign_accepts_any_buffer_type(signer: Signer) -> None:
    mac = signer.sign(HEADER, FRAMES)
    as_views = [memoryview(f) for f in FRAMES]
    as_arrays = [bytearray(f) for f in FRAMES]
    signer.verify(mac, memoryview(HEADER), as_views)
    signer.verify(mac, bytearray(HEADER), as_arrays)
    signer.verify(memoryview(mac), HEADER, FRAMES)
    signer.verify(bytearray(mac), HEADER, FRAMES)


def test_sign_multibyte_memoryview_counts_bytes_not_items(signer: Signer) -> None:
    import array

    arr = array.array("d", [1.0, 2.0, 3.0])
    mac = signer.sign(HEADER, [memoryview(arr)])
    signer.verify(mac, HEADER, [arr.tobytes()])


def test_sign_is_a_function_of_the_key() -> None:
    assert Signer(KEY).sign(HEADER, FRAMES) != Signer(OTHER_KEY).sign(HEADER, FRAMES)


def test_wrong_key_fails(signer: Signer) -> None:
    mac = Signer(OTHER_KEY).sign(HEADER, FRAMES)
    with pytest.raises(SignatureError, match="cluster key"):
        signer.verify(mac, HEADER, FRAMES)


def test_signing_with_raw_cluster_key_is_not_accepted(signer: Signer) -> None:
    import hashlib
    import hmac

    raw = hmac.new(KEY, HEADER, hashlib.sha256).digest()
    with pytest.raises(SignatureError):
        signer.verify(raw, HEADER)


def test_any_flipped_header_bit_fails(signer: Signer) -> None:
    mac = signer.sign(HEADER, FRAMES)
    for bit in range(len(HEADER) * 8):
        with pytest.raises(SignatureError):
            signer.verify(mac, flip(HEADER, bit), FRAMES)


@pytest.mark.parametrize("index", range(3))  # the non-empty frames
def test_any_flipped_bit_in_any_frame_fails(signer: Signer, index: int) -> None:
    mac = signer.sign(HEADER, FRAMES)
    for bit in range(len(FRAMES[index]) * 8):
        frames = list(FRAMES)
        frames[index] = flip(FRAMES[index], bit)
        with pytest.raises(SignatureError):
            signer.verify(mac, HEADER, frames)


def test_any_flipped_mac_bit_fails(signer: Signer) -> None:
    mac = signer.sign(HEADER, FRAMES)
    for bit in range(MAC_BYTES * 8):
        with pytest.raises(SignatureError):
            signer.verify(flip(mac, bit), HEADER, FRAMES)


def test_last_frame_is_signed_too(signer: Signer) -> None:
    frames = [b"a", b"b", b"c" * 1000]
    mac = signer.sign(HEADER, frames)
    with pytest.raises(SignatureError):
        signer.verify(mac, HEADER, [b"a", b"b", b"c" * 999 + b"d"])


@pytest.mark.parametrize(
    ("header", "frames"),
    [
        # moving bytes between the header and the first frame (both directions)
        (HEADER + b"p", [b"ickle-stream-frame", *FRAMES[1:]]),
        (HEADER[:-1], [HEADER[-1:] + FRAMES[0], *FRAMES[1:]]),
        # moving bytes between two frames
        (HEADER, [FRAMES[0] + FRAMES[1][:1], FRAMES[1][1:], *FRAMES[2:]]),
        (HEADER, [FRAMES[0][:-1], FRAMES[0][-1:] + FRAMES[1], *FRAMES[2:]]),
        # merging two frames, splitting one
        (HEADER, [FRAMES[0] + FRAMES[1], *FRAMES[2:]]),
        (HEADER, [FRAMES[0][:5], FRAMES[0][5:], *FRAMES[1:]]),
        # the header swallowing a frame
        (HEADER + FRAMES[0], FRAMES[1:]),
        # adding / removing an empty frame (at the end, the start, in the middle)
        (HEADER, [*FRAMES, b""]),
        (HEADER, FRAMES[:-1]),
        (HEADER, [b"", *FRAMES]),
        (HEADER, [FRAMES[0], b"", *FRAMES[1:]]),
        # reordering frames
        (HEADER, [FRAMES[1], FRAMES[0], *FRAMES[2:]]),
    ],
)
def test_reframing_fails(signer: Signer, header: bytes, frames: list[bytes]) -> None:
    mac = signer.sign(HEADER, FRAMES)
    # same concatenated bytes (or a permutation): only the framing differs
    assert len(header) + sum(map(len, frames)) == len(HEADER) + sum(map(len, FRAMES))
    with pytest.raises(SignatureError):
        signer.verify(mac, header, frames)


def test_empty_header_and_frames_are_distinct() -> None:
    s = Signer(KEY)
    macs = {s.sign(b""), s.sign(b"", [b""]), s.sign(b"", [b"", b""]), s.sign(b"x"), s.sign(b"", [b"x"])}
    assert len(macs) == 5


@pytest.mark.parametrize("length", [0, 1, 16, MAC_BYTES - 1, MAC_BYTES + 1, 64])
def test_mac_of_wrong_length_fails(signer: Signer, length: int) -> None:
    good = signer.sign(HEADER, FRAMES)
    mac = (good * 3)[:length]
    with pytest.raises(SignatureError):
        signer.verify(mac, HEADER, FRAMES)


def test_signature_error_is_a_protocol_error() -> None:
    assert issubclass(SignatureError, ProtocolError)
    assert issubclass(ReplayError, ProtocolError)
    assert issubclass(ProtocolError, FedparError)


# --------------------------------------------------------------------------- ReplayGuard
NOW = 1_700_000_000.0


def test_replay_increasing_seqs_pass() -> None:
    g = ReplayGuard(window=60)
    for seq in (1, 2, 3, 10, 11, 1000):
        g.check("client-a", seq, NOW, now=NOW)
        assert g.mark("client-a") == seq


def test_replay_repeat_fails() -> None:
    g = ReplayGuard(window=60)
    g.check("a", 5, NOW, now=NOW)
    with pytest.raises(ReplayError, match="repeats sequence number 5"):
        g.check("a", 5, NOW, now=NOW)
    assert g.mark("a") == 5


def test_replay_lower_fails_and_does_not_lower_the_mark() -> None:
    g = ReplayGuard(window=60)
    g.check("a", 7, NOW, now=NOW)
    for seq in (6, 1, 0, -1):
        with pytest.raises(ReplayError):
            g.check("a", seq, NOW, now=NOW)
    assert g.mark("a") == 7
    g.check("a", 8, NOW, now=NOW)
    assert g.mark("a") == 8


def test_replay_seq_zero_never_accepted_from_new_sender() -> None:
    g = ReplayGuard(window=60)
    with pytest.raises(ReplayError):
        g.check("fresh", 0, NOW, now=NOW)
    assert g.mark("fresh") == 0


def test_replay_per_sender_independence() -> None:
    g = ReplayGuard(window=60)
    g.check("a", 100, NOW, now=NOW)
    g.check("b", 1, NOW, now=NOW)  # b's low seq is fine although a is at 100
    g.check("b", 2, NOW, now=NOW)
    with pytest.raises(ReplayError):
        g.check("a", 2, NOW, now=NOW)
    assert g.mark("a") == 100
    assert g.mark("b") == 2
    assert g.mark("c") == 0


@pytest.mark.parametrize("offset", [-300.5, -1000.0, 300.5, 1e6])
def test_replay_timestamp_outside_window_fails(offset: float) -> None:
    g = ReplayGuard(window=300)
    with pytest.raises(ReplayError, match="window"):
        g.check("a", 1, NOW + offset, now=NOW)
    # a rejected message does not advance the mark
    assert g.mark("a") == 0
    g.check("a", 1, NOW, now=NOW)


@pytest.mark.parametrize("offset", [-300.0, -299.9, 0.0, 299.9, 300.0])
def test_replay_timestamp_inside_window_passes(offset: float) -> None:
    g = ReplayGuard(window=300)
    g.check("a", 1, NOW + offset, now=NOW)
    assert g.mark("a") == 1


def test_replay_default_now_is_wall_clock() -> None:
    g = ReplayGuard(window=5)
    g.check("a", 1, time.time())
    with pytest.raises(ReplayError):
        g.check("a", 2, time.time() - 3600)
    with pytest.raises(ReplayError):
        g.check("a", 3, time.time() + 3600)


def test_replay_nan_timestamp_fails() -> None:
    g = ReplayGuard(window=300)
    with pytest.raises(ReplayError):
        g.check("a", 1, math.nan, now=NOW)


@pytest.mark.parametrize("ts", [math.inf, -math.inf])
def test_replay_infinite_timestamp_fails(ts: float) -> None:
    g = ReplayGuard(window=300)
    with pytest.raises(ReplayError):
        g.check("a", 1, ts, now=NOW)


def test_marks_returns_a_copy() -> None:
    g = ReplayGuard(window=60)
    g.check("a", 3, NOW, now=NOW)
    g.check("b", 9, NOW, now=NOW)
    marks = g.marks()
    assert marks == {"a": 3, "b": 9}
    marks["a"] = 1000
    assert g.mark("a") == 3
    assert g.marks() == {"a": 3, "b": 9}


def test_seeded_marks_keep_rejecting_replays() -> None:
    seed = {"a": 50, "b": 2}
    g = ReplayGuard(window=60, marks=seed)
    seed["a"] = 0  # the guard copied the seed
    with pytest.raises(ReplayError):
        g.check("a", 50, NOW, now=NOW)
    with pytest.raises(ReplayError):
        g.check("a", 3, NOW, now=NOW)
    g.check("a", 51, NOW, now=NOW)
    g.check("b", 3, NOW, now=NOW)
    g.check("new", 1, NOW, now=NOW)
    assert g.marks() == {"a": 51, "b": 3, "new": 1}


def test_marks_survive_a_restart() -> None:
    g1 = ReplayGuard(window=60)
    for seq in range(1, 6):
        g1.check("a", seq, NOW, now=NOW)
    g2 = ReplayGuard(window=60, marks=g1.marks())
    with pytest.raises(ReplayError):
        g2.check("a", 5, NOW, now=NOW)
    g2.check("a", 6, NOW, now=NOW)


def test_prune_forgets_only_senders_silent_beyond_twice_the_window() -> None:
    guard = ReplayGuard(window=10.0)
    guard.check("old", 1, 1000.0, now=1000.0)
    guard.check("recent", 1, 1015.0, now=1015.0)
    assert guard.prune(now=1019.0) == []  # 19 s < 2 x 10 s
    assert guard.prune(now=1021.0) == ["old"]
    assert guard.mark("old") == 0 and guard.mark("recent") == 1
    # a replay of old's last message is still refused, by its timestamp
    with pytest.raises(ReplayError):
        guard.check("old", 1, 1000.0, now=1021.0)
    guard.check("old", 2, 1021.0, now=1021.0)  # a live sender simply starts a new mark
