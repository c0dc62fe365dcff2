"""The Consul registry backend: the shared contract against ``ConsulStandIn`` (a stand-in of the few Consul HTTP
endpoints the backend uses, not Consul), and against a real agent when ``CONSUL_HTTP_ADDR`` is set; plus the
stand-in's session and ACL behaviour as the backend relies on it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from fedpar.errors import ConfigError, DiscoveryError, RegistryUnavailable
from fedpar.federation.consul_registry import ConsulRegistry
from fedpar.federation.discovery import ControllerEntry, Discovery, Registry, open_registry
from tests.registry_contract import RegistryContract, closed_port, wait_until
from tests.standins.consul import ConsulStandIn


@pytest.fixture(scope="module")
def standin() -> Iterator[ConsulStandIn]:
    with ConsulStandIn() as s:
        yield s


def agent_url() -> str:
    """The registry URL of the real agent named by CONSUL_HTTP_ADDR (skips the test when it is unset)."""
    addr = os.environ.get("CONSUL_HTTP_ADDR", "")
    if not addr:
        pytest.skip("CONSUL_HTTP_ADDR is not set: no real Consul agent to run the contract against "
                    "(set it to host:port, or https://host:port, of an agent)")
    if "://" not in addr:
        addr = "http://" + addr
    scheme, hostport = addr.split("://", 1)
    return f"consul://{hostport.rstrip('/')}" + ("?scheme=https" if scheme == "https" else "")


class TestConsulContract(RegistryContract):
    @pytest.fixture(params=["standin", "agent"])
    def registry(self, request: pytest.FixtureRequest, standin: ConsulStandIn) -> Iterator[Registry]:
        url = standin.url if request.param == "standin" else agent_url()
        reg = open_registry(url)
        try:
            yield reg
        finally:
            reg.close()

    @pytest.fixture
    def unreachable_urls(self, silent_port: int) -> list[str]:
        return [f"consul://127.0.0.1:{closed_port()}", f"consul://127.0.0.1:{silent_port}"]


# -- the stand-in's behaviour as the backend relies on it ---------------------------------------------------


def test_session_invalidated_when_ttl_check_goes_critical(standin: ConsulStandIn) -> None:
    reg = ConsulRegistry(standin.url)
    try:
        lease = reg.grant(1.0, "crit")
        service_id, session = lease.split("/")
        assert standin.check_status(f"service:{service_id}") == "passing"
        assert session in standin.session_ids()
        reg.put("crit/k", b"v", lease=lease)
        entry = requests.get(f"http://{standin.address}/v1/kv/crit/k", timeout=5).json()[0]
        assert entry["Session"] == session
        assert wait_until(lambda: standin.check_status(f"service:{service_id}") == "critical", 3)
        assert session not in standin.session_ids()
        assert reg.get("crit/k") is None, "behavior=delete must delete the session's keys"
        assert reg.renew(lease) is False
        assert service_id not in standin.service_ids(), "a lapsed lease's service is deregistered by renew"
    finally:
        reg.close()


def test_revoke_destroys_session_and_deregisters_service(standin: ConsulStandIn) -> None:
    reg = ConsulRegistry(standin.url)
    try:
        lease = reg.grant(30, "rev")
        service_id, session = lease.split("/")
        assert service_id in standin.service_ids()
        reg.revoke(lease)
        assert service_id not in standin.service_ids() and session not in standin.session_ids()
    finally:
        reg.close()


def test_grant_waits_for_the_check_to_reach_the_servers() -> None:
    with ConsulStandIn(sync_delay=0.5) as lagging:
        reg = ConsulRegistry(lagging.url)
        try:
            t0 = time.monotonic()
            lease = reg.grant(5, "lag")
            assert time.monotonic() - t0 >= 0.5
            assert reg.renew(lease) is True
        finally:
            reg.close()


def test_session_create_on_critical_check_is_refused(standin: ConsulStandIn) -> None:
    r = requests.put(f"http://{standin.address}/v1/agent/service/register", timeout=5,
                     json={"Name": "x", "ID": "x1", "Check": {"TTL": "10s"}})  # Status defaults to critical
    assert r.status_code == 200
    r = requests.put(f"http://{standin.address}/v1/session/create", timeout=5,
                     json={"Checks": ["serfHealth", "service:x1"]})
    assert r.status_code == 500 and "critical" in r.text
    requests.put(f"http://{standin.address}/v1/agent/service/deregister/x1", timeout=5)


def test_acl_token_refused_is_discovery_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    with ConsulStandIn(acl_token="s3cret-token") as guarded:
        good, bad = tmp_path / "good", tmp_path / "bad"
        good.write_text("s3cret-token\n")
        bad.write_text("wrong-token")
        for url in (guarded.url, f"{guarded.url}?token_file={bad}"):
            reg = open_registry(url)
            try:
                for op in (lambda r: r.get("k"), lambda r: r.grant(5, "x"), lambda r: r.put("k", b"v"),
                           lambda r: r.write_if("k", b"v", version=0)):
                    with pytest.raises(DiscoveryError) as err:
                        op(reg)
                    assert not isinstance(err.value, RegistryUnavailable)
                    assert "ACL token" in str(err.value) and "s3cret" not in str(err.value)
            finally:
                reg.close()
        reg = open_registry(f"{guarded.url}?token_file={good}")
        try:
            reg.put("k", b"v")
            assert reg.get("k") is not None
        finally:
            reg.close()
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cret-token")
        reg = open_registry(guarded.url)  # the token from the environment when there is no token_file
        try:
            assert reg.renew(reg.grant(5, "env")) is True
        finally:
            reg.close()
        reg = open_registry(f"{guarded.url}?token_file={bad}")  # token_file wins over the environment
        try:
            with pytest.raises(DiscoveryError):
                reg.get("k")
        finally:
            reg.close()


def test_url_options(tmp_path: Path) -> None:
    reg = open_registry("consul://127.0.0.1:8500?timeout=1.5&scheme=https&verify=false")
    assert isinstance(reg, ConsulRegistry) and reg.timeout == 1.5
    reg.close()
    with pytest.raises(ConfigError):
        open_registry(f"consul://127.0.0.1:8500?token_file={tmp_path}/missing")
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ConfigError):
        open_registry(f"consul://127.0.0.1:8500?token_file={empty}")
    with pytest.raises(ConfigError):
        open_registry("consul://127.0.0.1:8500?verify=maybe")


def test_discovery_on_the_standin(standin: ConsulStandIn) -> None:
    reg = open_registry(standin.url)
    d = Discovery(reg, "consul-e2e", bytes(range(32)))
    try:
        e = ControllerEntry("a", 1, "tcp://h:1", "tcp://h:2", "h", 7, "/s/a", 1.0, 1.5)
        lease = d.register(e, ttl=1.0)
        with pytest.raises(DiscoveryError):
            d.register(e, ttl=1.0)
        assert d.controllers() == [e] and d.take_over("a", 1, by="b") is None
        assert wait_until(lambda: d.controllers() == [], 4)
        marker = d.take_over("a", 1, by="b")
        assert marker is not None and d.adopt("a", 1) and d.close("a", 1)
        assert d.allocate_ids(2) == [0, 1] and d.allocate_ids(1) == [2]
        assert d.renew(lease) is False
    finally:
        d.close_registry()


def test_a_session_ttl_may_take_twice_its_value_which_is_why_leases_use_a_ttl_check() -> None:
    """Consul documents a session's TTL as a lower bound (at least 10 s) that may take up to twice its value to
    expire: too slow to notice a dead controller within seconds. The backend's leases are therefore a TTL
    health check (critical right at its TTL) with the session bound to it; this pins both behaviours."""
    import json
    import urllib.request

    with ConsulStandIn(session_ttl_factor=2.0) as s:
        base = f"http://{s.address}"

        def put(path: str, body: object = None) -> object:
            req = urllib.request.Request(base + path, method="PUT",
                                         data=json.dumps(body).encode() if body is not None else b"")
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.loads(r.read() or b"null")

        sid = put("/v1/session/create", {"TTL": "10s", "Behavior": "delete"})["ID"]  # type: ignore[index]
        sess = s._sessions[sid]
        sess.renewed -= 15.0  # 15 s without renewal: past the TTL, within twice it: still alive
        put(f"/v1/session/renew/{sid}")
        assert sid in s.session_ids()
        sess.renewed -= 21.0  # past twice the TTL: gone
        try:
            put(f"/v1/session/renew/{sid}")
        except urllib.error.HTTPError as e:
            assert e.code == 404
        else:
            raise AssertionError("a session past twice its TTL must be gone")
    with ConsulStandIn() as s:
        reg = ConsulRegistry(s.url)
        lease = reg.grant(1.0, "twice")
        reg.put("fedpar/t/k", b"v", lease=lease)
        time.sleep(1.3)  # a lease (TTL check) lapses right after its TTL, not twice it
        assert reg.get("fedpar/t/k") is None
        reg.close()
