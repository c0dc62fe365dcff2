"""The discovery registry through which the controllers of one federated cluster find each other.

Two layers:

* :class:`Registry` is the small backend protocol: leases (grant / renew / revoke), versioned keys and one
  conditional write. ``open_registry(url)`` opens one of three backends: ``lmdb:///dir`` (embedded, one
  host, several processes; the default), ``etcd://host:port`` (etcd v3 through its JSON gateway) and
  ``consul://host:port`` (a Consul agent). Every backend honours the same semantics, checked by the shared
  contract tests (``tests/registry_contract.py``):

  - a key put under a lease is absent for every operation once the lease lapsed (or was revoked);
  - ``renew`` of a lapsed, revoked or unknown lease returns False, never raises for that reason;
  - ``put`` / ``write_if`` under a lapsed or revoked lease raise :class:`DiscoveryError` (register again);
  - ``write_if(key, value, version=v, absent=[...])`` writes only if ``key`` is at version ``v`` (0: it does
    not exist) and no key of ``absent`` exists; the conditions are evaluated before the lease, so a refused
    condition returns False even under a lapsed lease;
  - versions are > 0 and change on every write of the key;
  - network failures and timeouts (a few seconds, see each backend) raise :class:`RegistryUnavailable`
    naming the URL and what to check; ACL/permission refusals raise :class:`DiscoveryError`; no
    backend-specific exception escapes.

* :class:`Discovery` stores signed records on any registry, under ``fedpar/<cluster>/``:

  - ``ctl/<cid>``: a live controller (:class:`ControllerEntry`), under its lease;
  - ``known/<cid>``: every controller ever registered (:class:`KnownController`), persistent;
  - ``takeover/<cid>``: the survivors took over a dead controller's work (:class:`Takeover`), persistent;
  - ``engine-ids``: the engine id counter.

  The records are those of ``fedpar.federation.records`` (re-exported here). Each value is the msgpack of
  the record's fields (``record.to_wire()``, a list in field order; the counter is ``[next id]``) followed by
  HMAC-SHA256 (32 bytes) over the full key (UTF-8), a NUL separator and the msgpack bytes, keyed by
  ``derive(cluster_key, b"fedpar registry mac v1")``.
  A record that fails its MAC, was copied under another key or does not decode is ignored, counted in
  ``bad_entries`` and logged (the first 10, then every 100th). Nobody without the cluster key can forge a
  controller entry; anybody with write access to the registry can still delete entries (deny them that).

  Beyond the records: ``register(..., replace=True)`` replaces the live entry of an older incarnation of the
  same controller, ``reclaim`` registers again after the controller's own lease lapsed unless it was taken
  over, and ``live_controllers(url, cluster, key)`` is a one-shot read for clients and engines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import msgpack  # type: ignore[import-untyped, unused-ignore]  # no stubs unless [tool.mypy] ignores it

from fedpar.config import check_cluster_id
from fedpar.errors import ConfigError, DiscoveryError
from fedpar.federation.records import ControllerEntry, KnownController, Takeover
from fedpar.wire.signing import MAC_BYTES, derive

__all__ = [
    "REGISTRY_MAC_INFO", "URL_FORMS", "ControllerEntry", "Discovery", "KnownController", "Registry", "Takeover",
    "check_controller_id", "live_controllers", "open_registry",
]

log = logging.getLogger(__name__)

REGISTRY_MAC_INFO = b"fedpar registry mac v1"
URL_FORMS = (
    "lmdb:///ABSOLUTE/DIRECTORY, "
    "etcd://HOST:PORT[?ca=PATH&cert=PATH&key=PATH&timeout=SECONDS], "
    "consul://HOST:PORT[?scheme=https&ca=PATH&verify=false&cert=PATH&key=PATH&token_file=PATH&timeout=SECONDS]"
)
_CID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_SEP = b"\x00"
_MAX_RACE_RETRIES = 1000  # conditional-write retries before giving up (only under pathological contention)


class Registry(Protocol):
    """A backend of the discovery registry. Keys are full strings (``fedpar/<cluster>/ctl/<cid>``), values
    bytes. See the module docstring for the semantics every backend honours."""

    url: str  # for messages; never includes a secret

    def grant(self, ttl: float, name: str) -> str:
        """A new lease of ``ttl`` seconds (``name`` labels it where the backend shows leases)."""

    def renew(self, lease: str) -> bool:
        """Keep ``lease`` alive for another TTL; False when it lapsed (its keys are gone)."""

    def revoke(self, lease: str) -> None:
        """End ``lease`` now, deleting its keys (an unknown lease is no error)."""

    def get(self, key: str) -> tuple[bytes, int] | None:
        """The value of a live ``key`` and its version (> 0), or None."""

    def list(self, prefix: str) -> dict[str, tuple[bytes, int]]:
        """Every live key starting with ``prefix``, with its value and version."""

    def put(self, key: str, value: bytes, *, lease: str | None = None) -> None:
        """Write ``key`` unconditionally; under ``lease`` it vanishes with the lease, else it is persistent."""

    def write_if(self, key: str, value: bytes, *, version: int, absent: Sequence[str] = (),
                 lease: str | None = None) -> bool:
        """Atomically write ``key`` only if it is at ``version`` (0: it does not exist) and no key of
        ``absent`` exists; True if written."""

    def delete(self, key: str) -> None:
        """Delete ``key`` (no error if it does not exist)."""

    def close(self) -> None:
        """Release the backend's resources (idempotent)."""


def open_registry(url: str) -> Registry:
    """Open the registry at ``url``; an unknown scheme or a malformed URL raises :class:`ConfigError`.

    Network backends connect lazily: an unreachable etcd or Consul raises :class:`RegistryUnavailable` from
    the first operation, not from here.
    """
    if not isinstance(url, str):
        raise ConfigError(f"the registry URL must be a string, not {type(url).__name__}; use one of: {URL_FORMS}")
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as e:
        raise ConfigError(f"registry URL {redact_url(url)!r} is malformed ({e}); use one of: {URL_FORMS}") from e
    if scheme == "lmdb":
        from fedpar.federation.lmdb_registry import LmdbRegistry

        return LmdbRegistry(url)
    if scheme == "etcd":
        from fedpar.federation.etcd_registry import EtcdRegistry

        return EtcdRegistry(url)
    if scheme == "consul":
        from fedpar.federation.consul_registry import ConsulRegistry

        return ConsulRegistry(url)
    raise ConfigError(f"registry URL {redact_url(url)!r} has an unknown scheme; use one of: {URL_FORMS}")


def live_controllers(url: str, cluster: str, key: bytes) -> list[ControllerEntry]:
    """The live controllers of ``cluster`` in the registry at ``url`` (opened and closed here), sorted by id:
    for clients and engines looking for a controller."""
    registry = open_registry(url)
    try:
        return Discovery(registry, cluster, key).controllers()
    finally:
        registry.close()


def redact_url(url: str) -> str:
    """``url`` without any ``user:password@`` part, for messages."""
    return re.sub(r"(//)[^/@]*@", r"\1***@", url) if isinstance(url, str) else repr(url)


def check_controller_id(cid: str) -> str:
    """Return ``cid`` if it is usable in registry keys, else raise :class:`ConfigError`."""
    if not isinstance(cid, str) or _CID_RE.fullmatch(cid) is None:
        raise ConfigError(
            f"controller id {cid!r} must be 1-128 characters from A-Z a-z 0-9 _ . : - and start with a letter or digit"
        )
    return cid


# ------------------------------------------------------------------------------------------ Discovery

_R = TypeVar("_R", ControllerEntry, KnownController, Takeover)  # the records, from fedpar.federation.records


class Discovery:
    """Signed controller records of one cluster on a :class:`Registry`. Thread-safe (no state besides
    ``bad_entries``); every method may raise :class:`RegistryUnavailable` and :class:`DiscoveryError`."""

    def __init__(self, registry: Registry, cluster: str, key: bytes):
        check_cluster_id(cluster)
        if not isinstance(key, bytes) or len(key) < 16:
            raise ConfigError("the cluster key must be at least 16 bytes (fedpar makes 32)")
        self.registry = registry
        self.cluster = cluster
        self.bad_entries = 0
        self._mac_key = derive(key, REGISTRY_MAC_INFO)
        self._lock = threading.Lock()
        self._root = f"fedpar/{cluster}/"

    # -- keys ----------------------------------------------------------------------------------
    def ctl_key(self, cid: str) -> str:
        """The key of ``cid``'s live entry."""
        return f"{self._root}ctl/{check_controller_id(cid)}"

    def known_key(self, cid: str) -> str:
        """The key of ``cid``'s persistent record."""
        return f"{self._root}known/{check_controller_id(cid)}"

    def takeover_key(self, cid: str) -> str:
        """The key of ``cid``'s takeover marker."""
        return f"{self._root}takeover/{check_controller_id(cid)}"

    @property
    def ids_key(self) -> str:
        """The key of the engine id counter."""
        return f"{self._root}engine-ids"

    # -- signing -------------------------------------------------------------------------------
    def _mac(self, key: str, body: bytes) -> bytes:
        return hmac.new(self._mac_key, key.encode("utf-8") + _SEP + body, hashlib.sha256).digest()

    def seal(self, key: str, record: ControllerEntry | KnownController | Takeover) -> bytes:
        """The signed value of ``record`` stored under ``key``."""
        return self._seal_body(key, record.to_wire())

    def _seal_body(self, key: str, fields: Any) -> bytes:
        body: bytes = msgpack.packb(fields, use_bin_type=True)
        return body + self._mac(key, body)

    def _verified(self, key: str, value: bytes) -> Any:
        """The decoded msgpack body of an authentic value; raises ValueError (or msgpack's errors) otherwise."""
        if len(value) <= MAC_BYTES:
            raise ValueError(f"{len(value)} bytes, too short for a signed record")
        body, mac = value[:-MAC_BYTES], value[-MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(key, body)):
            raise ValueError("MAC mismatch (another cluster key, a tampered record, or one copied from another key)")
        return msgpack.unpackb(body, raw=False, strict_map_key=True)

    def _open(self, cls: type[_R], key: str, value: bytes) -> _R | None:
        """The record stored at ``key``, or None (counted and logged) when it is not authentic or malformed."""
        try:
            return cls.from_wire(self._verified(key, value))
        except Exception as e:  # anything a malformed record raises: it is ignored, never fatal
            self._bad(key, f"{type(e).__name__}: {e}")
            return None

    def _bad(self, key: str, why: str) -> None:
        with self._lock:
            self.bad_entries += 1
            n = self.bad_entries
        if n <= 10 or n % 100 == 0:
            log.warning("ignoring registry record %s at %s: %s (%d bad record(s) so far)",
                        key, self.registry.url, why, n)

    # -- controllers ---------------------------------------------------------------------------
    def register(self, entry: ControllerEntry, ttl: float, *, replace: bool = False) -> str:
        """Grant a lease of ``ttl`` s and write ``ctl/<cid>`` under it, and ``known/<cid>`` once. Returns the
        lease, to pass to :meth:`renew` about every ``ttl / 3`` seconds.

        When another live process holds ``ctl/<cid>`` this raises :class:`DiscoveryError` naming it, except
        with ``replace=True`` when the holder is an authentic entry of an older incarnation of this
        controller (``epoch`` below ``entry.epoch``: the previous process on the same state directory, killed
        before its lease lapsed): that entry is replaced atomically (compare-and-set on its version).
        """
        key = self.ctl_key(entry.cid)
        value = self.seal(key, entry)
        lease = self.registry.grant(ttl, f"{self.cluster}-ctl-{entry.cid}")
        try:
            for _ in range(_MAX_RACE_RETRIES):
                if self.registry.write_if(key, value, version=0, lease=lease):
                    break
                if not replace:
                    raise DiscoveryError(self._held_message(entry.cid))
                cur = self.registry.get(key)
                if cur is None:
                    continue  # it lapsed meanwhile: create it again
                old = self._open(ControllerEntry, key, cur[0])
                if old is None or old.cid != entry.cid or old.epoch >= entry.epoch:
                    raise DiscoveryError(self._held_message(entry.cid))
                if self.registry.write_if(key, value, version=cur[1], lease=lease):
                    log.info("controller %s: replaced the registration of its previous incarnation (epoch %d, "
                             "pid %d on %s)", entry.cid, old.epoch, old.pid, old.host)
                    break
            else:
                raise DiscoveryError(f"could not write {key} at {self.registry.url}: too much contention")
            self._ensure_known(entry)
        except BaseException:
            self._revoke_quietly(lease)
            raise
        return lease

    def reclaim(self, entry: ControllerEntry, ttl: float) -> str | None:
        """Register again after this controller's own lease lapsed, unless the survivors took it over.

        Returns the new lease, or None when a takeover marker for ``entry.epoch`` (or a newer one) exists, or
        appears while this runs, or another process holds ``ctl/<cid>``: then step down. Race-free with
        :meth:`take_over`, which writes its marker only while ``ctl/<cid>`` is absent: the entry is written
        first and the marker read after it.
        """
        key = self.ctl_key(entry.cid)
        marker, _ = self._marker(entry.cid)
        if marker is not None and marker.epoch >= entry.epoch:
            return None
        lease = self.registry.grant(ttl, f"{self.cluster}-ctl-{entry.cid}")
        try:
            if not self.registry.write_if(key, self.seal(key, entry), version=0, lease=lease):
                self._revoke_quietly(lease)
                return None
            marker, _ = self._marker(entry.cid)
            if marker is not None and marker.epoch >= entry.epoch:
                self._revoke_quietly(lease)
                return None
            self._ensure_known(entry)
        except BaseException:
            self._revoke_quietly(lease)
            raise
        return lease

    def _revoke_quietly(self, lease: str) -> None:
        try:
            self.registry.revoke(lease)
        except DiscoveryError as e:
            log.warning("could not revoke lease %s at %s: %s (it lapses by itself)", lease, self.registry.url, e)

    def _held_message(self, cid: str) -> str:
        key = self.ctl_key(cid)
        cur = self.registry.get(key)
        holder = "a process that holds its key"
        if cur is not None and (other := self._open(ControllerEntry, key, cur[0])) is not None:
            holder = f"pid {other.pid} on host {other.host} (epoch {other.epoch}, state dir {other.state_dir})"
        elif cur is not None:
            holder = "an unreadable record (wrong cluster key?) that holds its key"
        return (f"controller {cid} is already registered in cluster {self.cluster} at {self.registry.url} by "
                f"{holder}: stop that controller, or wait for its registration to lapse, or use another "
                "controller id")

    def _ensure_known(self, entry: ControllerEntry) -> None:
        key = self.known_key(entry.cid)
        record = KnownController(entry.cid, entry.host, entry.state_dir, time.time())
        for _ in range(_MAX_RACE_RETRIES):
            cur = self.registry.get(key)
            if cur is not None and self._open(KnownController, key, cur[0]) is not None:
                return  # written once, kept
            version = cur[1] if cur is not None else 0  # absent, or unreadable: replace it
            if self.registry.write_if(key, self.seal(key, record), version=version):
                return
        raise DiscoveryError(f"could not write {key} at {self.registry.url}: too much contention")

    def renew(self, lease: str) -> bool:
        """Keep the registration alive; False when it lapsed (register again, with a new epoch)."""
        return self.registry.renew(lease)

    def update(self, lease: str, entry: ControllerEntry) -> None:
        """Rewrite ``ctl/<cid>`` under ``lease`` (e.g. a new weight). :class:`DiscoveryError` if the lease lapsed."""
        key = self.ctl_key(entry.cid)
        self.registry.put(key, self.seal(key, entry), lease=lease)

    def deregister(self, lease: str) -> None:
        """Revoke the lease: the controller's entry disappears now."""
        self.registry.revoke(lease)

    def controllers(self) -> list[ControllerEntry]:
        """Every live controller with an authentic entry, sorted by id."""
        prefix = f"{self._root}ctl/"
        out = []
        for key, (value, _) in self.registry.list(prefix).items():
            entry = self._open(ControllerEntry, key, value)
            if entry is None:
                continue
            if entry.cid != key[len(prefix):]:
                self._bad(key, f"entry names controller {entry.cid!r}")
                continue
            out.append(entry)
        return sorted(out, key=lambda e: e.cid)

    def known(self) -> dict[str, KnownController]:
        """Every controller that ever registered (and was not forgotten), by id."""
        return self._records(KnownController, "known/")

    def takeovers(self) -> dict[str, Takeover]:
        """Every takeover marker, by the id of the controller taken over."""
        return self._records(Takeover, "takeover/")

    def _records(self, cls: type[_R], sub: str) -> dict[str, _R]:
        prefix = self._root + sub
        out: dict[str, _R] = {}
        for key, (value, _) in self.registry.list(prefix).items():
            rec = self._open(cls, key, value)
            if rec is None:
                continue
            cid = key[len(prefix):]
            if getattr(rec, "cid", None) != cid:
                self._bad(key, f"record names controller {getattr(rec, 'cid', None)!r}")
                continue
            out[cid] = rec
        return out

    # -- takeovers -----------------------------------------------------------------------------
    def _marker(self, cid: str) -> tuple[Takeover | None, int]:
        """The takeover marker of ``cid`` (None if absent or unreadable) and its version (0 if absent)."""
        key = self.takeover_key(cid)
        cur = self.registry.get(key)
        if cur is None:
            return None, 0
        marker = self._open(Takeover, key, cur[0])
        if marker is not None and marker.cid != cid:
            self._bad(key, f"marker names controller {marker.cid!r}")
            marker = None
        return marker, cur[1]

    def take_over(self, cid: str, epoch: int, by: str) -> Takeover | None:
        """Mark that ``by`` takes over the work of ``cid`` at incarnation ``epoch``.

        Returns the marker in place for (cid, epoch), ours or the one another survivor wrote first; None when
        ``ctl/<cid>`` is live (the controller is back; an unreadable ``ctl/<cid>`` counts as live too, since it
        may be) or when a marker of a newer epoch exists. A marker of an older epoch (or an unreadable one) is
        replaced, atomically only while ``ctl/<cid>`` is absent.
        """
        ctl, key = self.ctl_key(cid), self.takeover_key(cid)
        for attempt in range(_MAX_RACE_RETRIES):
            if self.registry.get(ctl) is not None:
                return None
            marker, version = self._marker(cid)
            if marker is not None and marker.epoch == epoch:
                return marker
            if marker is not None and marker.epoch > epoch:
                return None
            new = Takeover(cid, epoch, by, time.time(), False, 0)
            if self.registry.write_if(key, self.seal(key, new), version=version, absent=(ctl,)):
                return new
            _backoff(attempt)
        raise DiscoveryError(f"could not write {key} at {self.registry.url}: too much contention")

    def adopt(self, cid: str, epoch: int) -> bool:
        """Join the open takeover of ``cid`` at ``epoch`` (adopters += 1); False if it is closed, absent or of
        another epoch."""
        return self._update_marker(
            cid, epoch, lambda m: None if m.closed else dataclasses.replace(m, adopters=m.adopters + 1))

    def close(self, cid: str, epoch: int) -> bool:
        """Mark the takeover of ``cid`` at ``epoch`` closed; True if it is closed now or was before, False if
        there is no marker for that epoch."""
        return self._update_marker(cid, epoch, lambda m: m if m.closed else dataclasses.replace(m, closed=True))

    def _update_marker(self, cid: str, epoch: int, change: Callable[[Takeover], Takeover | None]) -> bool:
        key = self.takeover_key(cid)
        for attempt in range(_MAX_RACE_RETRIES):
            marker, version = self._marker(cid)
            if marker is None or marker.epoch != epoch:
                return False
            new = change(marker)
            if new is None:
                return False
            if new is marker or self.registry.write_if(key, self.seal(key, new), version=version):
                return True
            _backoff(attempt)
        raise DiscoveryError(f"could not update {key} at {self.registry.url}: too much contention")

    # -- engine ids ----------------------------------------------------------------------------
    def allocate_ids(self, n: int) -> list[int]:
        """``n`` fresh engine ids, never handed out before in this cluster: a contiguous block from the
        counter (0 first in a new cluster). An unreadable counter raises :class:`DiscoveryError` rather than
        risk reusing ids."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ConfigError(f"the number of engine ids to allocate must be an int >= 0, not {n!r}")
        if n == 0:
            return []
        key = self.ids_key
        for attempt in range(_MAX_RACE_RETRIES):
            cur = self.registry.get(key)
            start, version = 0, 0
            if cur is not None:
                counter = self._open_counter(key, cur[0])
                if counter is None:
                    raise DiscoveryError(
                        f"the engine id counter {key} at {self.registry.url} is unreadable (written with another "
                        "cluster key, or tampered with): fedpar will not guess, since ids must never be reused; "
                        "restore it or start a new cluster id")
                start, version = counter, cur[1]
            if self.registry.write_if(key, self._seal_body(key, [start + n]), version=version):
                return list(range(start, start + n))
            _backoff(attempt)
        raise DiscoveryError(f"could not allocate engine ids at {key} on {self.registry.url}: too much contention")

    def _open_counter(self, key: str, value: bytes) -> int | None:
        try:
            body = self._verified(key, value)
            if not (isinstance(body, list) and len(body) == 1 and type(body[0]) is int and body[0] >= 0):
                raise ValueError(f"not a counter: {body!r:.60}")
            return int(body[0])
        except Exception as e:  # as in _open: reported, never fatal here
            self._bad(key, f"{type(e).__name__}: {e}")
            return None

    # -- housekeeping --------------------------------------------------------------------------
    # -- clean stops ---------------------------------------------------------------------------
    def stopped_key(self, cid: str) -> str:
        """Key of the mark a controller leaves when it stops cleanly (persistent)."""
        return f"{self._root}stopped/{check_controller_id(cid)}"

    def mark_stopped(self, cid: str, epoch: int) -> None:
        """Record that incarnation ``epoch`` of ``cid`` stops cleanly (write it *before* deregistering): its
        registration disappearing is then not a death, and nobody takes its work over; its unfinished tasks
        wait in its store for its next start, as with a lone controller."""
        key = self.stopped_key(cid)
        self.registry.put(key, self._seal_body(key, [cid, epoch, time.time()]))

    def stopped(self, cid: str) -> int | None:
        """The incarnation of ``cid`` that last stopped cleanly (None if none, or the mark is not authentic)."""
        key = self.stopped_key(cid)
        cur = self.registry.get(key)
        if cur is None:
            return None
        try:
            body = self._verified(key, cur[0])
            if not (isinstance(body, list) and len(body) == 3 and body[0] == cid and type(body[1]) is int):
                raise ValueError(f"not a stop mark: {body!r:.60}")
            return int(body[1])
        except Exception as e:  # as in _open: reported, never fatal here
            self._bad(key, f"{type(e).__name__}: {e}")
            return None

    def forget(self, cid: str) -> None:
        """Delete ``known/<cid>``, ``takeover/<cid>`` and ``stopped/<cid>`` (a controller retired for good)."""
        self.registry.delete(self.known_key(cid))
        self.registry.delete(self.takeover_key(cid))
        self.registry.delete(self.stopped_key(cid))

    def close_registry(self) -> None:
        """Close the underlying registry."""
        self.registry.close()


def _backoff(attempt: int) -> None:
    """After a lost race: retry at once a few times, then with a short random sleep (spreads the racers)."""
    if attempt >= 3:
        time.sleep(random.uniform(0, min(0.05, 0.002 * attempt)))
