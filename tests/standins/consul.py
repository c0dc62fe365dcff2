"""``ConsulStandIn``: a stand-in for the few Consul agent HTTP endpoints fedpar's consul registry uses. NOT Consul.

There is no Consul agent installable on this machine (no package registry ships it), so the consul backend's
tests run against this in-process HTTP server, written from Consul's HTTP API documentation (``/v1/kv``,
``/v1/txn``, ``/v1/session``, ``/v1/agent/service/register``, ``/v1/agent/check/pass``) and the behaviour of
its state store. It keeps one node, one datacenter, everything in memory; it is not a Consul agent, has no
Raft, no gossip, no catalog sync (``sync_delay`` imitates the lag before a new service's check reaches the
servers), no blocking queries, no DNS. The same tests run against a real agent when ``CONSUL_HTTP_ADDR`` is set.

Endpoints and behaviour it implements:

* ``GET /v1/kv/<key>[?recurse]``: 200 with a JSON list of entries (``Key``, ``Value`` base64 or null,
  ``Flags``, ``Session``, ``CreateIndex``, ``ModifyIndex``, ``LockIndex``), 404 when nothing matches;
  ``X-Consul-Index`` header. ``DELETE /v1/kv/<key>``: 200 ``true``.
* ``PUT /v1/txn``: a JSON list of ``{"KV": {...}}`` operations (at most 64) with the verbs ``set``, ``cas``,
  ``lock``, ``unlock``, ``get``, ``check-index``, ``check-not-exists``, ``check-session``, ``delete``; all are
  evaluated in order, then either applied (200, ``{"Results": [...], "Errors": null}``) or rolled back (409,
  ``{"Results": null, "Errors": [{"OpIndex": i, "What": "..."}]}``). Writing a value equal to the stored one
  keeps its ``ModifyIndex``, as Consul does.
* ``PUT /v1/session/create``: ``Name``, ``Checks`` (default ``["serfHealth"]``), ``Behavior``
  (release/delete), ``LockDelay``, ``TTL`` (10s-86400s); refuses a missing or critical check with 500.
  ``PUT /v1/session/destroy/<id>``, ``GET /v1/session/info/<id>`` (200, a list: empty when unknown).
* ``PUT /v1/agent/service/register`` (``Name``, ``ID``, ``Check`` or ``Checks`` with ``TTL``, ``Status``
  (default critical), ``CheckID`` (default ``service:<id>``)), ``PUT /v1/agent/service/deregister/<id>``,
  ``PUT /v1/agent/check/pass/<check id>`` (404 "Unknown check ID" when unknown).
* ``PUT /v1/session/renew/<id>``: 200 with the session in a list; 404 "Session id '...' not found" when gone.
  A session with a ``TTL`` not renewed for ``session_ttl_factor`` times its TTL (default 2.0: Consul documents
  the TTL as a lower bound and that invalidation may take up to twice it) is invalidated.
* A TTL check not passed for its TTL turns critical; a session is invalidated when one of its checks turns
  critical or is deregistered, or when it is destroyed: with behavior ``delete`` its keys are deleted, with
  ``release`` they are unlocked. Expiry is evaluated before every request (the only way to observe it).
* ACLs: with ``acl_token`` set, a request without that token (``X-Consul-Token`` header or ``?token=``) gets
  403 ``Permission denied`` (no token) or ``ACL not found`` (another token).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["ConsulStandIn"]

_NODE_CHECK = "serfHealth"
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_MAX_TXN_OPS = 64


def _duration(text: object) -> float:
    """Seconds of a Go duration string ("2500ms", "1m30s") or a number of nanoseconds."""
    if isinstance(text, (int, float)):
        return float(text) / 1e9
    s = str(text).strip()
    if not s or s == "0":
        return 0.0
    parts = _DURATION_RE.findall(s)
    if "".join(n + u for n, u in parts) != s:
        raise ValueError(f"invalid duration {s!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _lower(d: Any) -> dict[str, Any]:
    """A JSON object with lower-cased keys (Consul decodes field names case-insensitively)."""
    return {str(k).lower(): v for k, v in d.items()} if isinstance(d, dict) else {}


class _HTTPError(Exception):
    def __init__(self, code: int, body: str):
        super().__init__(body)
        self.code, self.body = code, body


@dataclass
class _Entry:
    key: str
    value: bytes | None
    flags: int = 0
    session: str = ""
    create_index: int = 0
    modify_index: int = 0
    lock_index: int = 0

    def to_json(self, with_value: bool = True) -> dict[str, Any]:
        value = base64.b64encode(self.value).decode() if (with_value and self.value) else None
        out = {"Key": self.key, "Value": value, "Flags": self.flags, "CreateIndex": self.create_index,
               "ModifyIndex": self.modify_index, "LockIndex": self.lock_index}
        if self.session:
            out["Session"] = self.session
        return out


@dataclass
class _Check:
    check_id: str
    name: str
    service_id: str
    ttl: float | None
    status: str
    updated: float  # time.monotonic() of the last status change or pass
    visible_at: float  # when the "servers" know it (sync_delay after registration)


@dataclass
class _Session:
    id: str
    name: str
    checks: list[str]
    behavior: str
    lock_delay: float
    ttl: str
    create_index: int
    node: str = "standin-node"
    renewed: float = 0.0  # time.monotonic() of creation or the last renewal
    extra: dict[str, Any] = field(default_factory=dict)


class ConsulStandIn:
    """A stand-in for a Consul agent's HTTP API subset used by fedpar (see the module docstring). NOT Consul.

    ``with ConsulStandIn() as c:`` serves on 127.0.0.1 at a free port in a daemon thread; ``c.address`` is
    ``127.0.0.1:PORT`` and ``c.url`` the matching ``consul://`` registry URL.
    """

    def __init__(self, *, acl_token: str | None = None, node: str = "standin-node", sync_delay: float = 0.0,
                 session_ttl_factor: float = 2.0):
        self.acl_token = acl_token
        self.node = node
        self.sync_delay = sync_delay
        self.session_ttl_factor = session_ttl_factor
        self.requests = 0
        self._lock = threading.RLock()
        self._index = 1
        self._kv: dict[str, _Entry] = {}
        self._sessions: dict[str, _Session] = {}
        self._services: dict[str, dict[str, Any]] = {}
        self._checks: dict[str, _Check] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> ConsulStandIn:
        """Serve in a daemon thread on a free loopback port."""
        standin = self

        class Handler(_Handler):
            owner = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="consul-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> ConsulStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"consul://{self.address}"

    # -- inspection for tests ------------------------------------------------------------------
    def check_status(self, check_id: str) -> str | None:
        """The status of a check ("passing", "critical", ...) or None if it is not registered."""
        with self._lock:
            self._tick()
            c = self._checks.get(check_id)
            return c.status if c else None

    def session_ids(self) -> list[str]:
        """The ids of the live sessions."""
        with self._lock:
            self._tick()
            return sorted(self._sessions)

    def service_ids(self) -> list[str]:
        """The ids of the registered services."""
        with self._lock:
            return sorted(self._services)

    # -- state ---------------------------------------------------------------------------------
    def _next_index(self) -> int:
        self._index += 1
        return self._index

    def _tick(self) -> None:
        """Turn overdue TTL checks critical and invalidate the sessions that depend on them, and the sessions
        whose own TTL ran out (after ``session_ttl_factor`` times it, Consul's documented worst case)."""
        now = time.monotonic()
        for c in self._checks.values():
            if c.ttl is not None and c.status != "critical" and now - c.updated > c.ttl:
                c.status, c.updated = "critical", now
                self._invalidate_on(c.check_id)
        for sess in list(self._sessions.values()):
            if sess.ttl and now - sess.renewed > _duration(sess.ttl) * self.session_ttl_factor:
                self._destroy_session(sess.id)

    def _invalidate_on(self, check_id: str) -> None:
        for sid in [s.id for s in self._sessions.values() if check_id in s.checks]:
            self._destroy_session(sid)

    def _destroy_session(self, sid: str) -> None:
        session = self._sessions.pop(sid, None)
        if session is None:
            return
        idx = self._next_index()
        for key in [k for k, e in self._kv.items() if e.session == sid]:
            if session.behavior == "delete":
                del self._kv[key]
            else:
                entry = self._kv[key]
                entry.session, entry.modify_index = "", idx

    # -- request handling ----------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict[str, list[str]], token: str | None,
               body: bytes) -> tuple[int, Any, dict[str, str]]:
        """One request: (status, JSON-able body or text, extra headers)."""
        with self._lock:
            self.requests += 1
            self._tick()
            if self.acl_token is not None and token != self.acl_token:
                return 403, ("ACL not found" if token else "Permission denied"), {}
            try:
                return self._route(method, path, query, body)
            except _HTTPError as e:
                return e.code, e.body, {}

    def _route(self, method: str, path: str, query: dict[str, list[str]],
               body: bytes) -> tuple[int, Any, dict[str, str]]:
        if path.startswith("/v1/kv/"):
            key = unquote(path[len("/v1/kv/"):])
            if method == "GET":
                return self._kv_get(key, "recurse" in query)
            if method == "DELETE":
                self._kv_delete(key, "recurse" in query)
                return 200, True, {}
        elif path == "/v1/txn" and method == "PUT":
            return self._txn(_json(body))
        elif path == "/v1/session/create" and method == "PUT":
            return 200, {"ID": self._session_create(_lower(_json(body) or {}))}, {}
        elif path.startswith("/v1/session/destroy/") and method == "PUT":
            self._destroy_session(path.rsplit("/", 1)[1])
            return 200, True, {}
        elif path.startswith("/v1/session/renew/") and method == "PUT":
            sid = path.rsplit("/", 1)[1]
            sess = self._sessions.get(sid)
            if sess is None:
                raise _HTTPError(404, f"Session id '{sid}' not found")
            sess.renewed = time.monotonic()
            return 200, [self._session_json(sess)], {}
        elif path.startswith("/v1/session/info/") and method == "GET":
            s = self._sessions.get(path.rsplit("/", 1)[1])
            return 200, ([self._session_json(s)] if s else []), {"X-Consul-Index": str(self._index)}
        elif path == "/v1/agent/service/register" and method == "PUT":
            self._service_register(_lower(_json(body)))
            return 200, "", {}
        elif path.startswith("/v1/agent/service/deregister/") and method == "PUT":
            sid = unquote(path[len("/v1/agent/service/deregister/"):])
            if sid not in self._services:
                raise _HTTPError(404, f'Unknown service ID "{sid}". Ensure that the service ID is passed, not the '
                                      "service name.")
            self._service_deregister(sid)
            return 200, "", {}
        elif path.startswith("/v1/agent/check/pass/") and method == "PUT":
            cid = unquote(path[len("/v1/agent/check/pass/"):])
            c = self._checks.get(cid)
            if c is None:
                raise _HTTPError(404, f'Unknown check ID "{cid}". Ensure that the check ID is passed, not the check '
                                      "name.")
            if c.ttl is None:
                raise _HTTPError(500, f'CheckID "{cid}" does not have associated TTL')
            c.status, c.updated = "passing", time.monotonic()
            return 200, "", {}
        else:
            raise _HTTPError(404, f"stand-in: no handler for {method} {path} (ConsulStandIn implements only the "
                                  "endpoints fedpar uses)")
        raise _HTTPError(405, f"method {method} not allowed")

    # -- kv ------------------------------------------------------------------------------------
    def _kv_get(self, key: str, recurse: bool) -> tuple[int, Any, dict[str, str]]:
        headers = {"X-Consul-Index": str(self._index)}
        if recurse:
            entries = [e.to_json() for k, e in sorted(self._kv.items()) if k.startswith(key)]
        else:
            entries = [self._kv[key].to_json()] if key in self._kv else []
        return (200, entries, headers) if entries else (404, "", headers)

    def _kv_delete(self, key: str, recurse: bool) -> None:
        keys = [k for k in self._kv if k.startswith(key)] if recurse else [key]
        if any(k in self._kv for k in keys):
            self._next_index()
        for k in keys:
            self._kv.pop(k, None)

    def _txn(self, ops: Any) -> tuple[int, Any, dict[str, str]]:
        if not isinstance(ops, list):
            raise _HTTPError(400, "Failed to parse body: expected a JSON array of operations")
        if len(ops) > _MAX_TXN_OPS:
            raise _HTTPError(413, f"Transaction contains too many operations ({len(ops)} > {_MAX_TXN_OPS})")
        kv_ops = []
        for op in ops:
            kv = _lower(_lower(op).get("kv"))
            if not kv:
                raise _HTTPError(400, "stand-in: only KV operations are implemented")
            value = kv.get("value")
            try:
                kv["value"] = base64.b64decode(value, validate=True) if value is not None else None
            except (ValueError, TypeError) as e:
                raise _HTTPError(400, f"Failed to parse body: failed to decode value: {e}") from None
            kv_ops.append(kv)
        saved_kv = {k: _Entry(**vars(e)) for k, e in self._kv.items()}
        saved_index = self._index
        idx = self._next_index()
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for i, kv in enumerate(kv_ops):
            try:
                result = self._txn_op(kv, idx)
            except _TxnOpError as e:
                errors.append({"OpIndex": i, "What": str(e)})
                continue
            if result is not None:
                results.append({"KV": result})
        if errors:
            self._kv, self._index = saved_kv, saved_index  # roll back
            return 409, {"Results": None, "Errors": errors}, {}
        return 200, {"Results": results, "Errors": None}, {"X-Consul-Index": str(idx)}

    def _txn_op(self, kv: dict[str, Any], idx: int) -> dict[str, Any] | None:
        verb, key = kv.get("verb"), str(kv.get("key", ""))
        value, flags, index = kv.get("value"), int(kv.get("flags") or 0), int(kv.get("index") or 0)
        session = str(kv.get("session") or "")
        existing = self._kv.get(key)
        if verb == "set":
            return self._set(key, value, flags, idx, session=None).to_json(with_value=False)
        if verb == "cas":
            if (index == 0 and existing is not None) or (index != 0 and (existing is None or
                                                                         existing.modify_index != index)):
                raise _TxnOpError(f'failed to set key "{key}", index is stale')
            return self._set(key, value, flags, idx, session=None).to_json(with_value=False)
        if verb == "lock":
            if not session:
                raise _TxnOpError("missing session")
            if session not in self._sessions:
                raise _TxnOpError(f'invalid session "{session}"')
            if existing is not None and existing.session and existing.session != session:
                raise _TxnOpError(f'failed to lock key "{key}", lock is already held')
            lock_index = (existing.lock_index if existing and existing.session == session
                          else (existing.lock_index + 1 if existing else 1))
            entry = self._set(key, value, flags, idx, session=session)
            entry.lock_index = lock_index
            return entry.to_json(with_value=False)
        if verb == "unlock":
            if existing is None or existing.session != session or not session:
                raise _TxnOpError(f'failed to unlock key "{key}", lock isn\'t held, or is held by another session')
            return self._set(key, value, flags, idx, session="").to_json(with_value=False)
        if verb == "get":
            if existing is None:
                raise _TxnOpError(f'key "{key}" doesn\'t exist')
            return existing.to_json()
        if verb == "check-index":
            if existing is None:
                raise _TxnOpError(f'failed to check index, key "{key}" doesn\'t exist')
            if existing.modify_index != index:
                raise _TxnOpError(f'failed index check for key "{key}", current modify index '
                                  f"{existing.modify_index} != {index}")
            return existing.to_json(with_value=False)
        if verb == "check-session":
            if existing is None:
                raise _TxnOpError(f'failed to check session, key "{key}" doesn\'t exist')
            if existing.session != session:
                raise _TxnOpError(f'failed session check for key "{key}", current session '
                                  f'"{existing.session}" != "{session}"')
            return existing.to_json(with_value=False)
        if verb == "check-not-exists":
            if existing is not None:
                raise _TxnOpError(f'key "{key}" exists')
            return None
        if verb == "delete":
            self._kv.pop(key, None)
            return None
        raise _TxnOpError(f'unknown KV verb "{verb}"')

    def _set(self, key: str, value: bytes | None, flags: int, idx: int, *, session: str | None) -> _Entry:
        """Consul's kvsSetTxn: keeps the existing session unless ``session`` is given; an unchanged entry keeps
        its ModifyIndex."""
        existing = self._kv.get(key)
        new_session = (existing.session if existing else "") if session is None else session
        if existing is not None and (existing.value or None) == (value or None) and existing.flags == flags \
                and existing.session == new_session:
            return existing
        entry = _Entry(key, value or None, flags, new_session, existing.create_index if existing else idx, idx,
                       existing.lock_index if existing else 0)
        self._kv[key] = entry
        return entry

    # -- sessions and agent ----------------------------------------------------------------------
    def _session_create(self, body: dict[str, Any]) -> str:
        checks = body.get("checks")
        checks = [_NODE_CHECK] if checks is None else [str(c) for c in checks]
        behavior = str(body.get("behavior") or "release")
        if behavior not in ("release", "delete"):
            raise _HTTPError(400, f"Invalid Behavior setting '{behavior}'")
        ttl = str(body.get("ttl") or "")
        try:
            lock_delay = _duration(body.get("lockdelay", "15s"))
            if ttl and not 10 <= _duration(ttl) <= 86400:
                raise _HTTPError(400, f"Invalid Session TTL '{_duration(ttl) * 1e9:.0f}', must be between "
                                      "[10s=24h0m0s]")
        except ValueError as e:
            raise _HTTPError(400, f"Request decode failed: {e}") from None
        now = time.monotonic()
        for cid in checks:
            if cid == _NODE_CHECK:
                continue
            c = self._checks.get(cid)
            if c is None or c.visible_at > now:
                raise _HTTPError(500, f"Missing check '{cid}' registration")
            if c.status == "critical":
                raise _HTTPError(500, f"Check '{cid}' is in critical state")
        sid = str(uuid.uuid4())
        self._sessions[sid] = _Session(sid, str(body.get("name") or ""), checks, behavior, lock_delay, ttl,
                                       self._next_index(), node=self.node, renewed=now)
        return sid

    def _session_json(self, s: _Session) -> dict[str, Any]:
        return {"ID": s.id, "Name": s.name, "Node": s.node, "Checks": s.checks, "NodeChecks": None,
                "ServiceChecks": None, "LockDelay": int(s.lock_delay * 1e9), "Behavior": s.behavior, "TTL": s.ttl,
                "CreateIndex": s.create_index, "ModifyIndex": s.create_index}

    def _service_register(self, body: dict[str, Any]) -> None:
        name = str(body.get("name") or "")
        if not name:
            raise _HTTPError(400, "Missing service name")
        sid = str(body.get("id") or name)
        checks = [_lower(c) for c in (body.get("checks") or [])]
        if body.get("check"):
            checks.insert(0, _lower(body["check"]))
        if sid in self._services:
            self._service_deregister(sid, invalidate=False)
        now = time.monotonic()
        ids = []
        for i, c in enumerate(checks):
            status = str(c.get("status") or "critical")
            if status not in ("passing", "warning", "critical"):
                raise _HTTPError(400, "Status for checks must 'passing', 'warning', 'critical'")
            try:
                ttl = _duration(c["ttl"]) if c.get("ttl") else None
            except ValueError as e:
                raise _HTTPError(400, f"Request decode failed: {e}") from None
            check_id = str(c.get("checkid") or c.get("id") or
                           (f"service:{sid}" if len(checks) == 1 else f"service:{sid}:{i + 1}"))
            self._checks[check_id] = _Check(check_id, str(c.get("name") or f"Service '{name}' check"), sid, ttl,
                                            status, now, now + self.sync_delay)
            ids.append(check_id)
        self._services[sid] = {"ID": sid, "Service": name, "Checks": ids, "Tags": body.get("tags") or []}

    def _service_deregister(self, sid: str, invalidate: bool = True) -> None:
        service = self._services.pop(sid)
        for check_id in service["Checks"]:
            self._checks.pop(check_id, None)
            if invalidate:
                self._invalidate_on(check_id)


class _TxnOpError(Exception):
    """One transaction operation failed (reported in ``Errors``)."""


def _json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError as e:
        raise _HTTPError(400, f"Request decode failed: {e}") from None


class _Handler(BaseHTTPRequestHandler):
    owner: ConsulStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        token = self.headers.get("X-Consul-Token") or (query.get("token") or [None])[0]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        code, payload, headers = self.owner.handle(method, parts.path, query, token, body)
        if isinstance(payload, str):
            data, ctype = payload.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")
