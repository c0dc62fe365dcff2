"""The discovery registry on a Consul agent (``consul://HOST:PORT[?options]``).

Options: ``scheme=https``, ``ca=PATH`` (CA bundle to verify the agent) or ``verify=false``, ``cert=PATH`` and
``key=PATH`` (client certificate), ``token_file=PATH`` (ACL token; else ``CONSUL_HTTP_TOKEN``; the token never
appears in the URL or in messages) and ``timeout=SECONDS`` (per request, default 3; connect and each read).
Talks to the agent's HTTP API through ``py-consul`` (import name ``consul``).

A lease here is not a Consul session TTL: a session's own TTL must be 10-86400 s and Consul may take up to
twice that to invalidate it, far too slow to re-home a dead controller within 10 s. Instead a lease is

* a service registered on the agent (``fedpar-<name>-<random>``) with a TTL health check of exactly the
  requested TTL (any duration, e.g. ``2500ms``), registered passing, with
  ``DeregisterCriticalServiceAfter=1m`` so the agent cleans up after a dead process;
* plus a session with ``Checks=["serfHealth", "service:<id>"]``, ``Behavior=delete``, ``LockDelay=0s`` and no
  session TTL: Consul invalidates it as soon as the check goes critical (or the node fails), and deletes
  every key the session holds.

The lease string is ``<service id>/<session id>``. ``put(..., lease=)`` acquires the key with the session
(``lock`` verb); ``renew`` passes the check (``PUT /v1/agent/check/pass/service:<id>``) and then confirms the
session still exists; ``revoke`` destroys the session (deleting its keys) and deregisters the service.
``write_if`` is one ``/v1/txn``: ``check-index`` (or ``check-not-exists`` for version 0) on the key,
``check-not-exists`` for every ``absent`` key, then ``delete`` + ``set`` (or + ``lock``): the delete makes a
plain write detach the key from any session, as a plain put does in etcd. Versions are ``ModifyIndex``.

Facts relied on (Consul's HTTP API documentation and its state store):

* A TTL check's initial status is critical unless registered with ``Status: passing``; a session cannot be
  created on a critical or missing check (HTTP 500 "Check ... is in critical state" / "Missing check ...
  registration"). The agent syncs a new service to the servers asynchronously, so ``grant`` retries the
  session for up to ``timeout`` seconds.
* After the TTL passes without a pass, the agent marks the check critical and syncs it at once; the servers
  then invalidate the session and delete its keys. So keys vanish a little after the TTL (typically well
  under a second on a healthy cluster). Renew at about TTL/3.
* A pass that arrives after the check went critical makes it passing again but cannot revive the session:
  that ``renew`` may still answer True if the servers had not yet invalidated the session; the next one
  answers False.
* A transaction answers 200 when applied and 409 with ``Errors`` (``OpIndex``, ``What``) when rolled back;
  every operation is evaluated, so a failed check and an invalid session can both be reported. ACL
  refusals are HTTP 403 ("Permission denied", "ACL not found") or "Permission denied" errors in a 409.
* Values are base64 in JSON; an empty value reads back as ``null``. A transaction holds at most 64
  operations, so ``absent`` is limited to 60 keys.
* Passing an unknown check answers 404 "Unknown check" (Consul >= 1.7) or 500 "does not have associated
  TTL" (older agents); both mean the lease is gone.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import consul
import requests  # type: ignore[import-untyped, unused-ignore]  # py-consul's HTTP library; no stubs here

from fedpar.errors import ConfigError, DiscoveryError, RegistryUnavailable
from fedpar.federation.discovery import URL_FORMS, redact_url

__all__ = ["DEFAULT_TIMEOUT", "ConsulRegistry"]

DEFAULT_TIMEOUT = 3.0  # seconds, per request
_OPTIONS = ("scheme", "ca", "verify", "cert", "key", "token_file", "timeout")
_MAX_ABSENT = 60  # Consul allows 64 operations per transaction
_SESSION_GONE = ("does not have associated TTL", "Unknown check", "unknown check")


_Ops = list[dict[str, Any]]  # an alias: inside the class, ``list`` is the method


class _Response:
    """One HTTP answer of the agent (what py-consul's callback receives)."""

    __slots__ = ("body", "code", "headers")

    def __init__(self, code: int, headers: Any, body: str):
        self.code, self.headers, self.body = code, headers, body

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def _raw(response: Any) -> _Response:
    return _Response(int(response.code), response.headers, response.body or "")


class ConsulRegistry:
    """A :class:`~fedpar.federation.discovery.Registry` on a Consul agent."""

    def __init__(self, url: str):
        self.url = redact_url(url)
        host, port, opts = _parse(url)
        self.timeout: float = opts["timeout"]
        token = _read_token(opts["token_file"], self.url) if opts["token_file"] else os.environ.get("CONSUL_HTTP_TOKEN")
        verify: bool | str = opts["ca"] or opts["verify"]
        cert = (opts["cert"], opts["key"]) if opts["cert"] else None
        self._c = consul.Consul(host=host, port=port, scheme=opts["scheme"], verify=verify, cert=cert,
                                connections_timeout=self.timeout)
        self._c.token = token or None  # py-consul would prefer CONSUL_HTTP_TOKEN even over token_file

    # -- transport ---------------------------------------------------------------------------------
    def _call(self, method: str, path: str, *, params: list[tuple[str, Any]] | None = None,
              data: str = "") -> _Response:
        http = self._c.http
        headers = self._c.prepare_headers()
        try:
            if method == "GET":
                r: _Response = http.get(_raw, path, params=params, headers=headers)
            elif method == "PUT":
                r = http.put(_raw, path, params=params, data=data, headers=headers)
            else:
                r = http.delete(_raw, path, params=params, headers=headers)
        except requests.Timeout:
            raise RegistryUnavailable(
                f"the Consul agent at {self.url} did not answer within {self.timeout:g} s: check that the agent "
                "runs and has joined a cluster with a leader, and the network to it") from None
        except requests.RequestException as e:
            raise RegistryUnavailable(
                f"cannot reach the Consul agent at {self.url} ({type(e).__name__}: {str(e)[:200]}): check that the "
                "agent runs and listens there, the network to it, and for https the ca=/cert=/key= files") from None
        if r.code in (401, 403):
            raise self._refused(f"HTTP {r.code}: {r.body.strip()[:200]}")
        return r

    def _refused(self, what: str) -> DiscoveryError:
        return DiscoveryError(
            f"the Consul agent at {self.url} refused the request ({what}): check the ACL token (token_file= or "
            "CONSUL_HTTP_TOKEN) and its policy: fedpar needs key:write on fedpar/, session:write on the node and "
            "service:write for fedpar-* services")

    def _unexpected(self, what: str, r: _Response) -> DiscoveryError:
        if "Permission denied" in r.body or "ACL not found" in r.body:
            return self._refused(f"HTTP {r.code}: {r.body.strip()[:200]}")
        if r.code >= 500:
            return RegistryUnavailable(f"the Consul agent at {self.url} failed {what} (HTTP {r.code}: "
                                       f"{r.body.strip()[:200]}): check that its cluster has a leader")
        return DiscoveryError(f"the Consul agent at {self.url} refused {what} (HTTP {r.code}: {r.body.strip()[:200]})")

    # -- leases --------------------------------------------------------------------------------------
    def grant(self, ttl: float, name: str) -> str:
        """Register a service with a TTL check of ``ttl`` s and a session bound to it; returns both ids."""
        if not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
            raise ConfigError(f"a registry lease TTL must be a finite number of seconds > 0, not {ttl!r}")
        service = "fedpar-" + (re.sub(r"[^A-Za-z0-9-]+", "-", str(name)).strip("-")[:80] or "lease")
        service_id = f"{service}-{uuid.uuid4().hex[:16]}"
        check_id = f"service:{service_id}"
        definition = {
            "Name": service, "ID": service_id, "Tags": ["fedpar"],
            "Check": {"CheckID": check_id, "Name": f"fedpar lease {name}"[:120], "TTL": _duration(ttl),
                      "Status": "passing", "DeregisterCriticalServiceAfter": "1m"},
        }
        r = self._call("PUT", "/v1/agent/service/register", data=json.dumps(definition))
        if r.code != 200:
            raise self._unexpected("a service registration", r)
        try:
            session = self._create_session(service_id, check_id)
        except BaseException:
            self._forget_service(service_id)
            raise
        return f"{service_id}/{session}"

    def _create_session(self, service_id: str, check_id: str) -> str:
        body = json.dumps({"Name": service_id, "Checks": ["serfHealth", check_id], "Behavior": "delete",
                           "LockDelay": "0s"})
        deadline = time.monotonic() + self.timeout
        while True:
            r = self._call("PUT", "/v1/session/create", data=body)
            if r.code == 200:
                try:
                    sid = r.json()["ID"]
                except (ValueError, KeyError, TypeError):
                    raise DiscoveryError(f"the Consul agent at {self.url} answered a session creation with "
                                         f"{r.body[:200]!r}") from None
                if isinstance(sid, str) and sid:
                    return sid
                raise DiscoveryError(f"the Consul agent at {self.url} answered a session creation with "
                                     f"{r.body[:200]!r}")
            syncing = "Missing check" in r.body or "critical state" in r.body
            if not syncing or time.monotonic() >= deadline:
                raise self._unexpected("a session for a new lease", r)
            time.sleep(0.05)  # the agent has not yet synced the new service's check to the servers

    def _forget_service(self, service_id: str) -> None:
        try:
            self._call("PUT", f"/v1/agent/service/deregister/{service_id}")
        except DiscoveryError:
            pass  # best effort: DeregisterCriticalServiceAfter removes it within about a minute anyway

    def renew(self, lease: str) -> bool:
        """Pass the lease's TTL check, then confirm its session still exists."""
        ids = _split(lease)
        if ids is None:
            return False
        service_id, session = ids
        r = self._call("PUT", f"/v1/agent/check/pass/service:{service_id}")
        if r.code != 200:
            if r.code == 404 or any(s in r.body for s in _SESSION_GONE):
                self._destroy(session)
                return False
            raise self._unexpected("a lease renewal (TTL check pass)", r)
        r = self._call("GET", f"/v1/session/info/{session}")
        if r.code == 404:
            info = None
        elif r.code == 200:
            try:
                info = r.json()
            except ValueError:
                raise DiscoveryError(f"the Consul agent at {self.url} answered {r.body[:200]!r} for a "
                                     "session") from None
        else:
            raise self._unexpected("a session lookup", r)
        if not info:
            self._forget_service(service_id)
            return False
        return True

    def _destroy(self, session: str) -> None:
        r = self._call("PUT", f"/v1/session/destroy/{session}")
        if r.code not in (200, 404):
            raise self._unexpected("a session destruction", r)

    def revoke(self, lease: str) -> None:
        """Destroy the session (Consul deletes its keys) and deregister the service."""
        ids = _split(lease)
        if ids is None:
            return
        service_id, session = ids
        self._destroy(session)
        r = self._call("PUT", f"/v1/agent/service/deregister/{service_id}")
        if r.code not in (200, 404) and not (r.code == 500 and "Unknown service" in r.body):
            raise self._unexpected("a service deregistration", r)

    # -- keys ------------------------------------------------------------------------------------------
    def _kv_path(self, key: str) -> str:
        if not key or key.startswith("/"):
            raise DiscoveryError(f"Consul keys must be non-empty and not start with '/': {key[:80]!r}")
        return f"/v1/kv/{key}"

    def _entries(self, r: _Response, what: str) -> _Ops:
        if r.code == 404:
            return []
        if r.code != 200:
            raise self._unexpected(what, r)
        try:
            entries = r.json() or []
        except ValueError:
            raise DiscoveryError(f"the Consul agent at {self.url} answered {what} with {r.body[:200]!r}") from None
        if not isinstance(entries, list):
            raise DiscoveryError(f"the Consul agent at {self.url} answered {what} with {r.body[:200]!r}")
        return entries

    def get(self, key: str) -> tuple[bytes, int] | None:
        """The value and ``ModifyIndex`` of ``key``."""
        for e in self._entries(self._call("GET", self._kv_path(key)), "a key read"):
            if e.get("Key") == key:
                return _value(e), int(e["ModifyIndex"])
        return None

    def list(self, prefix: str) -> dict[str, tuple[bytes, int]]:
        """Every key starting with ``prefix``."""
        path = f"/v1/kv/{prefix}" if prefix else "/v1/kv/"
        entries = self._entries(self._call("GET", path, params=[("recurse", "1")]), "a key listing")
        return {e["Key"]: (_value(e), int(e["ModifyIndex"]))
                for e in entries if str(e.get("Key", "")).startswith(prefix)}

    def _write_ops(self, key: str, value: bytes, lease: str | None) -> _Ops:
        self._kv_path(key)
        encoded = base64.b64encode(bytes(value)).decode("ascii")
        if lease is None:
            write = {"KV": {"Verb": "set", "Key": key, "Value": encoded}}
        else:
            ids = _split(lease)
            if ids is None:
                raise DiscoveryError(f"{lease!r} is not a lease of the Consul registry {self.url}")
            write = {"KV": {"Verb": "lock", "Key": key, "Value": encoded, "Session": ids[1]}}
        return [{"KV": {"Verb": "delete", "Key": key}}, write]

    def _txn(self, checks: _Ops, writes: _Ops, lease: str | None) -> bool:
        """Apply ``checks + writes`` atomically; False if a check failed; DiscoveryError if the lease lapsed."""
        r = self._call("PUT", "/v1/txn", data=json.dumps(checks + writes))
        if r.code == 200:
            return True
        if r.code != 409:
            raise self._unexpected("a transaction", r)
        try:
            errors = (r.json() or {}).get("Errors") or []
        except (ValueError, AttributeError):
            raise DiscoveryError(f"the Consul agent at {self.url} answered a transaction with "
                                 f"{r.body[:200]!r}") from None
        whats = [str(e.get("What", "")) for e in errors if isinstance(e, dict)]
        if any("Permission denied" in w or "ACL not found" in w for w in whats):
            raise self._refused("; ".join(whats)[:200])
        if any(isinstance(e, dict) and e.get("OpIndex", -1) < len(checks) for e in errors):
            return False
        if lease is not None and any("session" in w for w in whats):
            raise DiscoveryError(f"lease {lease} at {self.url} has lapsed or was revoked: register again")
        raise DiscoveryError(f"the Consul agent at {self.url} rolled back a transaction: {'; '.join(whats)[:300]}")

    def put(self, key: str, value: bytes, *, lease: str | None = None) -> None:
        """Write ``key``: acquired by the lease's session, or detached from any session."""
        self._txn([], self._write_ops(key, value, lease), lease)

    def write_if(self, key: str, value: bytes, *, version: int, absent: Sequence[str] = (),
                 lease: str | None = None) -> bool:
        """One ``/v1/txn``: check-index / check-not-exists, then delete + set (or lock)."""
        if len(absent) > _MAX_ABSENT:
            raise DiscoveryError(f"write_if on Consul takes at most {_MAX_ABSENT} absent keys, not {len(absent)}")
        writes = self._write_ops(key, value, lease)
        checks: _Ops
        if version == 0:
            checks = [{"KV": {"Verb": "check-not-exists", "Key": key}}]
        else:
            checks = [{"KV": {"Verb": "check-index", "Key": key, "Index": int(version)}}]
        for a in absent:
            self._kv_path(a)
            checks.append({"KV": {"Verb": "check-not-exists", "Key": a}})
        return self._txn(checks, writes, lease)

    def delete(self, key: str) -> None:
        """Delete ``key``."""
        r = self._call("DELETE", self._kv_path(key))
        if r.code != 200:
            raise self._unexpected("a key deletion", r)

    def close(self) -> None:
        """Close the HTTP connections (idempotent)."""
        session = getattr(self._c.http, "session", None)
        if session is not None:
            session.close()

    def __repr__(self) -> str:
        return f"ConsulRegistry({self.url!r})"


def _value(entry: dict[str, Any]) -> bytes:
    v = entry.get("Value")
    return base64.b64decode(v) if v else b""


def _split(lease: object) -> tuple[str, str] | None:
    if not isinstance(lease, str):
        return None
    service_id, sep, session = lease.partition("/")
    if not sep or not re.fullmatch(r"fedpar-[A-Za-z0-9-]+", service_id) \
            or not re.fullmatch(r"[0-9a-fA-F-]{8,64}", session):
        return None
    return service_id, session


def _duration(seconds: float) -> str:
    """A Go duration string: whole milliseconds, at least 1 ms."""
    return f"{max(1, round(seconds * 1000))}ms"


def _read_token(path: str, url: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as e:
        raise ConfigError(f"registry {url}: cannot read token_file {path}: {e.strerror}") from None
    if not token:
        raise ConfigError(f"registry {url}: token_file {path} is empty")
    return token


def _parse(url: str) -> tuple[str, int, dict[str, Any]]:
    bad = (f"registry URL {redact_url(url)!r}: Consul's form is consul://HOST:PORT[?scheme=https&ca=PATH&"
           f"verify=false&cert=PATH&key=PATH&token_file=PATH&timeout=SECONDS]; valid forms: {URL_FORMS}")
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
    opts["scheme"] = opts["scheme"] or "http"
    if opts["scheme"] not in ("http", "https"):
        raise ConfigError(f"{bad} (scheme= is http or https)")
    if opts["verify"].lower() not in ("", "true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"{bad} (verify= is true or false)")
    opts["verify"] = opts["verify"].lower() not in ("false", "0", "no")
    if bool(opts["cert"]) != bool(opts["key"]):
        raise ConfigError(f"{bad} (cert= and key= go together: a client certificate and its private key)")
    try:
        opts["timeout"] = float(opts["timeout"]) if opts["timeout"] else DEFAULT_TIMEOUT
    except ValueError:
        raise ConfigError(f"{bad} (timeout= must be a number of seconds)") from None
    if not math.isfinite(opts["timeout"]) or not 0 < opts["timeout"] <= 300:
        raise ConfigError(f"{bad} (timeout= must be in (0, 300] seconds)")
    return host, port, opts
