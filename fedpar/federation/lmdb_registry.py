"""The embedded discovery registry: an LMDB environment in a directory (``lmdb:///abs/path/dir``).

For controllers on one host (the default when no etcd or Consul is configured). Several processes share it:
LMDB's own write lock serialises their write transactions and readers never block. Within one process,
every :class:`LmdbRegistry` on a directory shares one environment (LMDB must not be opened twice in a process),
and a process-local lock serialises its transactions, so handles are safe to use from several threads and
map resizing is safe (LMDB allows it only while this process has no transaction).

Facts relied on:

* Leases are rows ``lease id -> [expiry, ttl, name]`` with ``expiry`` from ``time.time()``: one host, one
  clock, so every process agrees on which leases lapsed. A lapsed lease and its keys are treated as absent
  by every operation at once and deleted lazily, inside the next write transaction of any process.
  A step of the wall clock shortens or lengthens leases by the step.
* Versions come from one global revision counter (``meta/rev``), bumped by every write, so a key deleted
  and created again never returns to an old version (no ABA for ``write_if``).
* The map starts at 8 MiB and doubles on ``MapFullError`` up to 1 GiB; a process whose map another process
  grew adopts the new size on ``MapResizedError``. Commits are synced (``sync=True``): engine ids and
  ``known`` records must survive a machine crash.
* LMDB keys are at most 511 bytes: registry keys here are limited to 400 bytes (UTF-8).
* The directory is created with mode 0700; the files with 0600.
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

import lmdb
import msgpack  # type: ignore[import-untyped, unused-ignore]  # no stubs unless [tool.mypy] ignores it

from fedpar.errors import ConfigError, DiscoveryError, RegistryUnavailable
from fedpar.federation.discovery import URL_FORMS, redact_url

__all__ = ["LmdbRegistry"]

_T = TypeVar("_T")
MiB = 1 << 20
_INITIAL_MAP = 8 * MiB
_MAX_MAP = 1024 * MiB
_MAX_KEY = 400  # bytes; LMDB's limit is 511 and the lease index prefixes keys with a lease id
_REV = b"rev"
if TYPE_CHECKING:
    _Txn = lmdb.Transaction[bytes]


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


class _SharedEnv:
    """One LMDB environment per directory and process (LMDB forbids opening the same one twice in a process:
    closing either would drop the other's locks), shared by every :class:`LmdbRegistry` handle on it."""

    _open: dict[str, _SharedEnv] = {}
    _open_lock = threading.Lock()

    def __init__(self, path: str, url: str):
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            self.env = lmdb.open(path, map_size=_INITIAL_MAP, max_dbs=4, subdir=True, mode=0o600,
                                 lock=True, readahead=False, sync=True, metasync=True)
        except (OSError, lmdb.Error) as e:
            raise RegistryUnavailable(
                f"cannot open the LMDB registry {url}: {e}; check that {path} is (or can be created as) a "
                "directory writable by this user on a local file system with free space") from e
        try:
            with self.env.begin(write=True) as txn:
                self.kv = self.env.open_db(b"kv", txn=txn)
                self.leases = self.env.open_db(b"leases", txn=txn)
                self.lease_keys = self.env.open_db(b"lease-keys", txn=txn)
                self.meta = self.env.open_db(b"meta", txn=txn)
        except lmdb.Error as e:
            self.env.close()
            raise RegistryUnavailable(f"cannot open the LMDB registry {url}: {e}") from e
        self.lock = threading.Lock()  # serialises this process's transactions (and map resizing)
        self.map_size: int = self.env.info()["map_size"]
        self.refs = 0

    @classmethod
    def acquire(cls, path: str, url: str) -> _SharedEnv:
        key = os.path.realpath(path)
        with cls._open_lock:
            shared = cls._open.get(key)
            if shared is None:
                shared = cls._open[key] = _SharedEnv(path, url)
            shared.refs += 1
            return shared

    def release(self) -> None:
        with self._open_lock:
            self.refs -= 1
            if self.refs == 0:
                for k, v in list(self._open.items()):
                    if v is self:
                        del self._open[k]
                with self.lock:
                    self.env.close()


class LmdbRegistry:
    """A :class:`~fedpar.federation.discovery.Registry` in an LMDB environment on this host."""

    def __init__(self, url: str):
        self.url = url
        self.path = _parse(url)
        self._closed = False
        self._shared = _SharedEnv.acquire(self.path, url)
        self._env = self._shared.env
        self._kv, self._leases = self._shared.kv, self._shared.leases
        self._lease_keys, self._meta = self._shared.lease_keys, self._shared.meta

    # -- transactions ----------------------------------------------------------------------------
    def _read(self, fn: Callable[[_Txn], _T]) -> _T:
        shared = self._shared
        with shared.lock:
            self._check_open()
            while True:
                try:
                    with self._env.begin() as txn:
                        return fn(txn)
                except lmdb.MapResizedError:
                    self._env.set_mapsize(0)  # another process grew the map: adopt its size
                    shared.map_size = self._env.info()["map_size"]
                except lmdb.Error as e:
                    raise DiscoveryError(f"reading the LMDB registry {self.url} failed: {e}") from e

    def _write(self, fn: Callable[[_Txn, float], _T]) -> _T:
        """Run ``fn(txn, now)`` in a write transaction after purging lapsed leases, and commit."""
        shared = self._shared
        with shared.lock:
            self._check_open()
            while True:
                try:
                    txn = self._env.begin(write=True)
                    try:
                        now = time.time()
                        self._purge(txn, now)
                        result = fn(txn, now)
                    except BaseException:
                        txn.abort()
                        raise
                    txn.commit()
                    return result
                except lmdb.MapFullError:
                    if shared.map_size >= _MAX_MAP:
                        raise DiscoveryError(
                            f"the LMDB registry {self.url} reached {_MAX_MAP >> 20} MiB: it holds far more than "
                            "controller records; delete stray keys or use a new directory") from None
                    self._env.set_mapsize(min(shared.map_size * 2, _MAX_MAP))
                    shared.map_size = self._env.info()["map_size"]
                except lmdb.MapResizedError:
                    self._env.set_mapsize(0)
                    shared.map_size = self._env.info()["map_size"]
                except lmdb.Error as e:
                    raise DiscoveryError(f"writing the LMDB registry {self.url} failed: {e}") from e
                except OSError as e:
                    raise RegistryUnavailable(f"writing the LMDB registry {self.url} failed: {e}; check the disk "
                                              f"holding {self.path}") from e

    def _check_open(self) -> None:
        if self._closed:
            raise DiscoveryError(f"the LMDB registry {self.url} is closed")

    # -- leases ----------------------------------------------------------------------------------
    def _lease_live(self, txn: _Txn, lease: str, now: float, cache: dict[str, bool] | None = None) -> bool:
        if not lease:
            return True
        if cache is not None and lease in cache:
            return cache[lease]
        raw = txn.get(lease.encode("ascii"), db=self._leases)
        live = raw is not None and _unpack(raw)[0] > now
        if cache is not None:
            cache[lease] = live
        return live

    def _purge(self, txn: _Txn, now: float) -> None:
        """Delete every lapsed lease and its keys."""
        lapsed = [k for k, v in txn.cursor(self._leases) if _unpack(v)[0] <= now]
        for lease in lapsed:
            self._drop_lease(txn, lease.decode("ascii"))

    def _drop_lease(self, txn: _Txn, lease: str) -> None:
        prefix = lease.encode("ascii") + b"\x00"
        cur = txn.cursor(self._lease_keys)
        keys = []
        if cur.set_range(prefix):
            for k in cur.iternext(keys=True, values=False):
                if not k.startswith(prefix):
                    break
                keys.append(k)
        for k in keys:
            key = k[len(prefix):]
            raw = txn.get(key, db=self._kv)
            if raw is not None and _unpack(raw)[2] == lease:
                txn.delete(key, db=self._kv)
            txn.delete(k, db=self._lease_keys)
        txn.delete(lease.encode("ascii"), db=self._leases)

    def grant(self, ttl: float, name: str) -> str:
        """A new lease of ``ttl`` seconds (any positive duration)."""
        if not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
            raise ConfigError(f"a registry lease TTL must be a finite number of seconds > 0, not {ttl!r}")
        lease = uuid.uuid4().hex

        def fn(txn: _Txn, now: float) -> str:
            txn.put(lease.encode("ascii"), _pack([now + ttl, float(ttl), str(name)]), db=self._leases)
            return lease

        return self._write(fn)

    def renew(self, lease: str) -> bool:
        """Extend ``lease`` by its TTL from now; False if it lapsed or never existed."""
        if not _valid_lease(lease):
            return False

        def fn(txn: _Txn, now: float) -> bool:
            raw = txn.get(lease.encode("ascii"), db=self._leases)
            if raw is None:
                return False  # unknown, revoked, or lapsed and purged
            _, ttl, name = _unpack(raw)
            txn.put(lease.encode("ascii"), _pack([now + ttl, ttl, name]), db=self._leases)
            return True

        return self._write(fn)

    def revoke(self, lease: str) -> None:
        """Delete ``lease`` and its keys now (no error if unknown)."""
        if _valid_lease(lease):
            self._write(lambda txn, now: self._drop_lease(txn, lease))

    # -- keys --------------------------------------------------------------------------------------
    def get(self, key: str) -> tuple[bytes, int] | None:
        """The value and version of ``key`` if it is live."""
        k = _key(key)

        def fn(txn: _Txn) -> tuple[bytes, int] | None:
            raw = txn.get(k, db=self._kv)
            if raw is None:
                return None
            value, version, lease = _unpack(raw)
            return (value, version) if self._lease_live(txn, lease, time.time()) else None

        return self._read(fn)

    def list(self, prefix: str) -> dict[str, tuple[bytes, int]]:
        """Every live key starting with ``prefix``."""
        p = prefix.encode("utf-8")

        def fn(txn: _Txn) -> dict[str, tuple[bytes, int]]:
            now = time.time()
            cache: dict[str, bool] = {}
            out: dict[str, tuple[bytes, int]] = {}
            cur = txn.cursor(self._kv)
            if not cur.set_range(p):
                return {}
            for k, raw in cur:
                if not k.startswith(p):
                    break
                value, version, lease = _unpack(raw)
                if self._lease_live(txn, lease, now, cache):
                    out[k.decode("utf-8")] = (value, version)
            return out

        return self._read(fn)

    def _store(self, txn: _Txn, k: bytes, value: bytes, lease: str) -> None:
        old = txn.get(k, db=self._kv)
        if old is not None and (old_lease := _unpack(old)[2]) and old_lease != lease:
            txn.delete(old_lease.encode("ascii") + b"\x00" + k, db=self._lease_keys)
        raw_rev = txn.get(_REV, db=self._meta)
        rev = (int.from_bytes(raw_rev, "big") if raw_rev is not None else 0) + 1
        txn.put(_REV, rev.to_bytes(8, "big"), db=self._meta)
        txn.put(k, _pack([bytes(value), rev, lease]), db=self._kv)
        if lease:
            txn.put(lease.encode("ascii") + b"\x00" + k, b"", db=self._lease_keys)

    def _check_lease(self, txn: _Txn, lease: str | None, now: float) -> str:
        if lease is None:
            return ""
        if not _valid_lease(lease) or not self._lease_live(txn, lease, now):
            raise DiscoveryError(f"lease {lease} at {self.url} has lapsed or was revoked: register again")
        return lease

    def put(self, key: str, value: bytes, *, lease: str | None = None) -> None:
        """Write ``key`` (under ``lease`` if given)."""
        k = _key(key)

        def fn(txn: _Txn, now: float) -> None:
            self._store(txn, k, value, self._check_lease(txn, lease, now))

        self._write(fn)

    def write_if(self, key: str, value: bytes, *, version: int, absent: Sequence[str] = (),
                 lease: str | None = None) -> bool:
        """Write ``key`` if it is at ``version`` (0: absent) and no key of ``absent`` exists."""
        k = _key(key)
        others = [_key(a) for a in absent]

        def live_version(txn: _Txn, kk: bytes, now: float) -> int:
            raw = txn.get(kk, db=self._kv)
            if raw is None:
                return 0
            _, ver, ls = _unpack(raw)
            return int(ver) if self._lease_live(txn, ls, now) else 0

        def fn(txn: _Txn, now: float) -> bool:
            if live_version(txn, k, now) != version or any(live_version(txn, o, now) for o in others):
                return False
            self._store(txn, k, value, self._check_lease(txn, lease, now))
            return True

        return self._write(fn)

    def delete(self, key: str) -> None:
        """Delete ``key`` if it exists."""
        k = _key(key)

        def fn(txn: _Txn, now: float) -> None:
            old = txn.get(k, db=self._kv)
            if old is None:
                return
            if old_lease := _unpack(old)[2]:
                txn.delete(old_lease.encode("ascii") + b"\x00" + k, db=self._lease_keys)
            txn.delete(k, db=self._kv)

        self._write(fn)

    def close(self) -> None:
        """Close this handle; the environment closes with the last handle of this process (idempotent)."""
        with self._shared.lock:
            if self._closed:
                return
            self._closed = True
        self._shared.release()

    def __repr__(self) -> str:
        return f"LmdbRegistry({self.url!r})"


def _parse(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ConfigError(f"registry URL {redact_url(url)!r} is malformed ({e}); use one of: {URL_FORMS}") from e
    path = unquote(parts.path)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment or not os.path.isabs(path):
        raise ConfigError(f"registry URL {redact_url(url)!r}: an LMDB registry is lmdb:///ABSOLUTE/DIRECTORY "
                          f"(three slashes, no host or options); valid forms: {URL_FORMS}")
    return os.path.normpath(path)


def _key(key: str) -> bytes:
    k = key.encode("utf-8")
    if not k or len(k) > _MAX_KEY or b"\x00" in k:
        raise DiscoveryError(f"registry key {key[:80]!r} must be 1-{_MAX_KEY} UTF-8 bytes without NUL")
    return k


def _valid_lease(lease: object) -> bool:
    return isinstance(lease, str) and len(lease) == 32 and all(c in "0123456789abcdef" for c in lease)
