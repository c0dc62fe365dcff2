"""The discovery registry on etcd v3 (``etcd://HOST:PORT[?ca=PATH&cert=PATH&key=PATH&timeout=SECONDS]``).

Talks to etcd's v3 JSON gateway (``/v3/`` since etcd 3.4; keys and values base64) through ``etcd3gw``.
``ca``, ``cert`` and ``key`` switch to https (``cert`` and ``key`` together: a client certificate, which etcd
with ``--client-cert-auth`` maps to a user by its CN). Every request times out after ``timeout`` seconds
(default 3; it bounds the connect and each read): then :class:`RegistryUnavailable`.

Facts relied on (checked against etcd 3.4.23 in ``tests/infra``):

* A lease's TTL is whole seconds, and etcd raises any TTL below its minimum to that minimum:
  ``ceil(1.5 * election timeout)``, 2 s with default settings (``--election-timeout 1000`` ms). This module
  asks for ``max(2, ceil(ttl))``. Renew at about TTL/3.
* etcd deletes a lapsed lease's keys itself, within about half a second of the expiry, on the leader.
* ``/v3/lease/keepalive`` answers 200 without a ``TTL`` field (``etcd3gw`` reports -1) for a lease that
  lapsed or never existed: that is ``renew() -> False``.
* ``/v3/lease/revoke``, ``/v3/kv/put`` and a transaction whose chosen branch puts under a lapsed lease answer
  404 ``etcdserver: requested lease not found`` (gRPC code 5). A transaction whose compare fails never looks
  at the lease: conditions are decided first.
* Versions are ``mod_revision`` (global, never reused); ``create_revision == 0`` in a compare means "the
  key does not exist".
* When etcd restarts, or the leader changes, every lease gets its full TTL again (etcd cannot know how long
  it was down): a controller that died during an etcd outage is seen dead only a TTL after etcd is back.
* Permission refusals are gRPC codes 7 (PermissionDenied) and 16 (Unauthenticated), HTTP 403/401.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import etcd3gw
import requests  # type: ignore[import-untyped, unused-ignore]  # etcd3gw's HTTP library; no stubs here
from etcd3gw import exceptions as etcd_exc

from fedpar.errors import ConfigError, DiscoveryError, RegistryUnavailable
from fedpar.federation.discovery import URL_FORMS, redact_url

__all__ = ["DEFAULT_TIMEOUT", "MIN_LEASE_TTL", "EtcdRegistry"]

DEFAULT_TIMEOUT = 3.0  # seconds, per request
MIN_LEASE_TTL = 2  # seconds: etcd's minimum with default election settings
_OPTIONS = ("ca", "cert", "key", "timeout")


_KVs = list[dict[str, Any]]  # an alias: inside the class, ``list`` is the method


class _LeaseNotFound(Exception):
    """etcd says the lease does not exist (lapsed, revoked or never granted)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _range_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix`` (b"\\0": to the end of the key space)."""
    p = prefix.rstrip(b"\xff")
    return p[:-1] + bytes([p[-1] + 1]) if p else b"\x00"


class EtcdRegistry:
    """A :class:`~fedpar.federation.discovery.Registry` on etcd v3 through its JSON gateway."""

    def __init__(self, url: str):
        self.url = url
        host, port, opts = _parse(url)
        self.timeout = opts["timeout"]
        tls = any(opts[o] for o in ("ca", "cert", "key"))
        self._client = etcd3gw.Etcd3Client(
            host=host, port=port, protocol="https" if tls else "http", ca_cert=opts["ca"] or None,
            cert_key=opts["key"] or None, cert_cert=opts["cert"] or None, timeout=self.timeout)

    # -- transport ---------------------------------------------------------------------------------
    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            result = self._client.post(self._client.get_url(path), json=payload)
        except etcd_exc.ConnectionTimeoutError as e:
            raise RegistryUnavailable(
                f"etcd at {self.url} did not answer within {self.timeout:g} s ({_detail(e)}): check that etcd runs "
                "and is healthy (it has a leader), and the network to it") from None
        except etcd_exc.ConnectionFailedError as e:
            raise RegistryUnavailable(
                f"cannot reach etcd at {self.url} ({_detail(e)}): check that etcd runs and listens there, the "
                "network to it, and for TLS the ca=/cert=/key= files") from None
        except etcd_exc.Etcd3Exception as e:
            self._raise(e)
        except requests.RequestException as e:
            raise RegistryUnavailable(f"talking to etcd at {self.url} failed ({type(e).__name__}: {e}): check "
                                      "that etcd runs there and the network to it") from None
        except ValueError as e:  # an answer that is not JSON: not etcd's gateway
            raise DiscoveryError(f"etcd at {self.url} sent an unreadable answer ({e}): is it etcd >= 3.4 "
                                 "with its v3 gateway?") from None
        if not isinstance(result, dict):
            raise DiscoveryError(f"etcd at {self.url} sent an unexpected answer to {path}: {result!r:.200}")
        return result

    def _raise(self, e: etcd_exc.Etcd3Exception) -> NoReturn:
        code, message = None, _detail(e)
        try:
            body = json.loads(e.detail_text or "")
            code, message = body.get("code"), str(body.get("message") or body.get("error") or message)
        except (ValueError, AttributeError):
            pass
        if code == 5 and "lease not found" in message:
            raise _LeaseNotFound(message)
        if code in (7, 16):
            raise DiscoveryError(f"etcd at {self.url} refused the request: {message}; check the user and roles of "
                                 "the client certificate (cert=/key=) for the fedpar/ prefix") from None
        if code in (4, 14):
            raise RegistryUnavailable(f"etcd at {self.url} is unavailable: {message}; check that the etcd "
                                      "cluster has a leader") from None
        raise DiscoveryError(f"etcd at {self.url} failed the request: {message}") from None

    def _lease_id(self, lease: str) -> int | None:
        try:
            n = int(lease)
        except (TypeError, ValueError):
            return None
        return n if 0 < n < 1 << 63 else None

    # -- leases --------------------------------------------------------------------------------------
    def grant(self, ttl: float, name: str) -> str:
        """A new etcd lease of ``max(2, ceil(ttl))`` seconds (``name`` is not stored: etcd leases have none)."""
        if not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
            raise ConfigError(f"a registry lease TTL must be a finite number of seconds > 0, not {ttl!r}")
        seconds = max(MIN_LEASE_TTL, math.ceil(ttl))
        try:
            r = self._post("/lease/grant", {"TTL": seconds, "ID": 0})
        except _LeaseNotFound as e:
            raise DiscoveryError(f"etcd at {self.url} refused a lease: {e}") from None
        if r.get("error") or self._lease_id(r.get("ID", "")) is None:
            raise DiscoveryError(f"etcd at {self.url} refused a lease of {seconds} s: {r.get('error') or r!r:.200}")
        return str(int(r["ID"]))

    def renew(self, lease: str) -> bool:
        """One keepalive; False when etcd reports the lease gone."""
        lid = self._lease_id(lease)
        if lid is None:
            return False
        try:
            r = self._post("/lease/keepalive", {"ID": lid})
        except _LeaseNotFound:
            return False
        result = r.get("result")
        if not isinstance(result, dict):
            error = r.get("error")
            if error and "lease not found" in str(error):
                return False
            raise DiscoveryError(f"etcd at {self.url} failed a lease keepalive: {error or r!r:.200}")
        try:
            return int(result.get("TTL", -1)) > 0
        except (TypeError, ValueError):
            return False

    def revoke(self, lease: str) -> None:
        """Revoke the lease; etcd deletes its keys in the same step."""
        lid = self._lease_id(lease)
        if lid is None:
            return
        try:
            self._post("/lease/revoke", {"ID": lid})
        except _LeaseNotFound:
            pass

    # -- keys ------------------------------------------------------------------------------------------
    def get(self, key: str) -> tuple[bytes, int] | None:
        """The value and ``mod_revision`` of ``key``."""
        kvs = self._range({"key": _b64(_key(key))})
        if not kvs:
            return None
        return _unb64(kvs[0].get("value")), int(kvs[0]["mod_revision"])

    def list(self, prefix: str) -> dict[str, tuple[bytes, int]]:
        """Every key starting with ``prefix``."""
        p = prefix.encode("utf-8")
        start = p or b"\x00"
        kvs = self._range({"key": _b64(start), "range_end": _b64(_range_end(p))})
        return {_unb64(kv["key"]).decode("utf-8"): (_unb64(kv.get("value")), int(kv["mod_revision"]))
                for kv in kvs}

    def _range(self, payload: dict[str, Any]) -> _KVs:
        try:
            r = self._post("/kv/range", payload)
        except _LeaseNotFound as e:  # not for a range; treat like any refusal
            raise DiscoveryError(f"etcd at {self.url} failed a read: {e}") from None
        kvs = r.get("kvs") or []
        if not isinstance(kvs, list):
            raise DiscoveryError(f"etcd at {self.url} sent an unexpected range answer: {r!r:.200}")
        return kvs

    def _put_op(self, key: bytes, value: bytes, lease: str | None) -> dict[str, Any]:
        op: dict[str, Any] = {"key": _b64(key), "value": _b64(bytes(value))}
        if lease is not None:
            lid = self._lease_id(lease)
            if lid is None:
                raise DiscoveryError(f"{lease!r} is not an etcd lease id of {self.url}")
            op["lease"] = lid
        return op

    def put(self, key: str, value: bytes, *, lease: str | None = None) -> None:
        """Put ``key`` (attached to ``lease``, or to none)."""
        try:
            self._post("/kv/put", self._put_op(_key(key), value, lease))
        except _LeaseNotFound:
            raise DiscoveryError(f"lease {lease} at {self.url} has lapsed or was revoked: register again") from None

    def write_if(self, key: str, value: bytes, *, version: int, absent: Sequence[str] = (),
                 lease: str | None = None) -> bool:
        """One etcd transaction: compare versions (``create_revision == 0`` for absent keys), then put."""
        k = _key(key)
        if version == 0:
            compare = [{"key": _b64(k), "target": "CREATE", "result": "EQUAL", "create_revision": 0}]
        else:
            compare = [{"key": _b64(k), "target": "MOD", "result": "EQUAL", "mod_revision": int(version)}]
        compare += [{"key": _b64(_key(a)), "target": "CREATE", "result": "EQUAL", "create_revision": 0}
                    for a in absent]
        txn = {"compare": compare, "success": [{"request_put": self._put_op(k, value, lease)}], "failure": []}
        try:
            r = self._post("/kv/txn", txn)
        except _LeaseNotFound:
            raise DiscoveryError(f"lease {lease} at {self.url} has lapsed or was revoked: register again") from None
        return bool(r.get("succeeded", False))

    def delete(self, key: str) -> None:
        """Delete ``key``."""
        try:
            self._post("/kv/deleterange", {"key": _b64(_key(key))})
        except _LeaseNotFound as e:
            raise DiscoveryError(f"etcd at {self.url} failed a delete: {e}") from None

    def close(self) -> None:
        """Close the HTTP connections (idempotent)."""
        self._client.session.close()

    def __repr__(self) -> str:
        return f"EtcdRegistry({self.url!r})"


def _detail(e: etcd_exc.Etcd3Exception) -> str:
    text = (e.detail_text or "").strip() or " ".join(str(a) for a in e.args) or type(e).__name__
    return text[:300]


def _key(key: str) -> bytes:
    k = key.encode("utf-8")
    if not k:
        raise DiscoveryError("a registry key must not be empty")
    return k


def _parse(url: str) -> tuple[str, int, dict[str, Any]]:
    bad = f"registry URL {redact_url(url)!r}: etcd's form is etcd://HOST:PORT[?ca=PATH&cert=PATH&key=PATH&" \
          f"timeout=SECONDS]; valid forms: {URL_FORMS}"
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as e:
        raise ConfigError(f"{bad} ({e})") from None
    if not host or port is None or parts.path not in ("", "/") or parts.fragment or "@" in parts.netloc:
        raise ConfigError(bad)
    unknown = sorted(set(query) - set(_OPTIONS))
    if unknown or any(len(v) != 1 for v in query.values()):
        raise ConfigError(f"{bad} (unknown or repeated option(s): {', '.join(unknown or sorted(query))})")
    opts: dict[str, Any] = {o: query.get(o, [""])[0] for o in _OPTIONS}
    if bool(opts["cert"]) != bool(opts["key"]):
        raise ConfigError(f"{bad} (cert= and key= go together: a client certificate and its private key)")
    try:
        opts["timeout"] = float(opts["timeout"]) if opts["timeout"] else DEFAULT_TIMEOUT
    except ValueError:
        raise ConfigError(f"{bad} (timeout= must be a number of seconds)") from None
    if not math.isfinite(opts["timeout"]) or not 0 < opts["timeout"] <= 300:
        raise ConfigError(f"{bad} (timeout= must be in (0, 300] seconds)")
    return host, port, opts
