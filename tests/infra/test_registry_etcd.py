"""The etcd registry backend against a real etcd 3.4: the shared contract, etcd's lease minimum, an etcd that
stops or hangs, and ``Discovery`` end to end."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from fedpar.errors import RegistryUnavailable
from fedpar.federation.discovery import ControllerEntry, Discovery, Registry, open_registry
from fedpar.federation.etcd_registry import EtcdRegistry
from tests.infra.conftest import EtcdServer
from tests.registry_contract import RegistryContract, closed_port, wait_until

pytestmark = pytest.mark.infra


class TestEtcdContract(RegistryContract):
    @pytest.fixture
    def registry(self, etcd_url: str) -> Iterator[Registry]:
        reg = open_registry(etcd_url)
        try:
            yield reg
        finally:
            reg.close()

    @pytest.fixture
    def unreachable_urls(self, silent_port: int) -> list[str]:
        return [f"etcd://127.0.0.1:{closed_port()}", f"etcd://127.0.0.1:{silent_port}"]


def lease_ttl(server: EtcdServer, lease: str) -> tuple[int, int]:
    """(granted TTL, remaining TTL) of an etcd lease, straight from etcd."""
    r = requests.post(f"{server.endpoint}/v3/lease/timetolive", json={"ID": int(lease)}, timeout=5).json()
    return int(r["grantedTTL"]), int(r["TTL"])


def test_short_lease_is_raised_to_etcds_minimum(etcd_server: EtcdServer) -> None:
    reg = open_registry(etcd_server.url)
    try:
        lease = reg.grant(0.5, "short")
        granted, _ = lease_ttl(etcd_server, lease)
        assert granted == 2
        reg.put("fedpar-test/short", b"x", lease=lease)
        time.sleep(1.2)
        assert reg.get("fedpar-test/short") is not None, "a 0.5 s lease must live etcd's minimum of 2 s"
        assert wait_until(lambda: reg.get("fedpar-test/short") is None, 5)
        assert lease_ttl(etcd_server, reg.grant(2.2, "rounded"))[0] == 3, "TTLs round up to whole seconds"
    finally:
        reg.close()


def test_frozen_etcd_times_out(etcd_server: EtcdServer) -> None:
    reg = open_registry(etcd_server.url + "?timeout=1")
    assert isinstance(reg, EtcdRegistry)
    try:
        reg.put("fedpar-test/frozen", b"x")  # connected (and the API path discovered) before the freeze
        with etcd_server.frozen():
            for op in (lambda: reg.get("fedpar-test/frozen"), lambda: reg.renew("12345")):
                t0 = time.monotonic()
                with pytest.raises(RegistryUnavailable) as err:
                    op()
                assert time.monotonic() - t0 < 3
                assert "within 1 s" in str(err.value) and etcd_server.url in str(err.value)
        assert reg.get("fedpar-test/frozen") is not None
    finally:
        reg.close()


def test_etcd_restart_keeps_keys_and_refreshes_leases(etcd_server: EtcdServer) -> None:
    reg = open_registry(etcd_server.url)
    try:
        lease = reg.grant(4, "restart")
        reg.put("fedpar-test/restart/leased", b"x", lease=lease)
        reg.put("fedpar-test/restart/kept", b"y")
        with etcd_server.outage(seconds=1):
            t0 = time.monotonic()
            with pytest.raises(RegistryUnavailable):
                reg.get("fedpar-test/restart/kept")
            assert time.monotonic() - t0 < 5
        assert reg.get("fedpar-test/restart/kept") is not None
        # etcd cannot know how long it was down: the lease is alive again with its full TTL
        assert reg.get("fedpar-test/restart/leased") is not None
        assert reg.renew(lease) is True
        reg.revoke(lease)
    finally:
        reg.close()


def test_discovery_end_to_end(etcd_url: str) -> None:
    reg = open_registry(etcd_url)
    survivor = open_registry(etcd_url)  # another controller's connection
    cluster = f"e2e{int(time.time() * 1000) % 10**9}"
    d, other = Discovery(reg, cluster, bytes(range(32))), Discovery(survivor, cluster, bytes(range(32)))
    try:
        a = ControllerEntry("a", 1, "tcp://h:1", "tcp://h:2", "h", 11, "/s/a", 1.0, 1.0)
        b = ControllerEntry("b", 1, "tcp://h:3", "tcp://h:4", "h", 12, "/s/b", 2.0, 1.0)
        la = d.register(a, ttl=2)
        lb = other.register(b, ttl=30)
        assert other.controllers() == [a, b] and sorted(other.known()) == ["a", "b"]
        assert other.take_over("a", 1, by="b") is None
        assert wait_until(lambda: other.controllers() == [b], 7), "a did not lapse"
        assert d.renew(la) is False
        marker = other.take_over("a", 1, by="b")
        assert marker is not None and d.take_over("a", 1, by="c") == marker
        assert other.adopt("a", 1) and d.adopt("a", 1) and other.close("a", 1)
        assert other.takeovers()["a"].adopters == 2
        assert d.allocate_ids(3) == [0, 1, 2] and other.allocate_ids(2) == [3, 4]
        other.update(lb, ControllerEntry("b", 1, "tcp://h:3", "tcp://h:4", "h", 12, "/s/b", 0.5, 1.0))
        assert d.controllers()[0].weight == 0.5
        other.deregister(lb)
        assert d.controllers() == []
        d.forget("a")
        d.forget("b")
        assert d.known() == {} and d.bad_entries == 0 and other.bad_entries == 0
    finally:
        d.close_registry()
        other.close_registry()
