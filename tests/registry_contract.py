"""The contract every discovery registry backend honours (``fedpar.federation.discovery.Registry``).

Not collected by itself: a backend's test module subclasses :class:`RegistryContract` and provides two
fixtures, ``registry`` (an open registry, closed after the test; parametrise it to run the contract on
several servers) and ``unreachable_urls`` (URLs of that backend where nothing usable answers). Every key a
test writes is under a fresh random prefix, so the contract can run against a shared real service.

Leases are 2 s (etcd's minimum with default settings); a backend may take up to ``LAPSE_GRACE`` seconds past
the TTL to delete a lapsed lease's keys (etcd and Consul revoke on their own schedule), so each lease test
waits at most TTL + LAPSE_GRACE.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from fedpar.errors import DiscoveryError, RegistryUnavailable
from fedpar.federation.discovery import Registry, open_registry

_T = TypeVar("_T")
TTL = 2.0
LAPSE_GRACE = 4.0
UNREACHABLE_WITHIN = 5.0  # seconds: an unreachable registry must fail at least this fast


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``pred`` until it is true (True) or ``timeout`` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def version_of(registry: Registry, key: str) -> int:
    """The version of ``key``, which must exist."""
    got = registry.get(key)
    assert got is not None, f"{key} is absent"
    return got[1]


def race(n: int, fn: Callable[[int], _T], timeout: float = 30) -> list[_T]:
    """Run ``fn(0) ... fn(n-1)`` in ``n`` threads released together; their results (fails if one hangs)."""
    barrier = threading.Barrier(n)
    results: list[_T] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        barrier.wait(timeout)
        r = fn(i)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert len(results) == n, "a racing thread did not finish"
    return results


def closed_port() -> int:
    """A loopback TCP port where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A loopback port that accepts TCP connections (the kernel does, from the backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    try:
        yield int(s.getsockname()[1])
    finally:
        s.close()


class RegistryContract:
    """Contract tests; subclass with ``registry`` and ``unreachable_urls`` fixtures."""

    @pytest.fixture
    def prefix(self) -> str:
        return f"fedpar-test/{uuid.uuid4().hex[:12]}/"

    @pytest.fixture
    def silent_port(self) -> Iterator[int]:
        with silent_listener() as port:
            yield port

    # -- plain keys ------------------------------------------------------------------------------
    def test_put_get_delete(self, registry: Registry, prefix: str) -> None:
        k = prefix + "a"
        assert registry.get(k) is None
        registry.put(k, b"one")
        got = registry.get(k)
        assert got is not None and got[0] == b"one" and got[1] > 0
        registry.put(k, b"two")
        again = registry.get(k)
        assert again is not None and again[0] == b"two" and again[1] != got[1]
        registry.delete(k)
        assert registry.get(k) is None
        registry.delete(k)  # deleting an absent key is no error

    def test_binary_and_empty_values(self, registry: Registry, prefix: str) -> None:
        every_byte = bytes(range(256)) * 3
        registry.put(prefix + "bin", every_byte)
        registry.put(prefix + "empty", b"")
        got_bin = registry.get(prefix + "bin")
        assert got_bin is not None and got_bin[0] == every_byte
        got = registry.get(prefix + "empty")
        assert got is not None and got[0] == b""

    def test_list_by_prefix(self, registry: Registry, prefix: str) -> None:
        for k in ("a/1", "a/2", "a/sub/3", "ab/4", "b/5"):
            registry.put(prefix + k, k.encode())
        listed = registry.list(prefix + "a/")
        assert sorted(listed) == [prefix + "a/1", prefix + "a/2", prefix + "a/sub/3"]
        assert all(v == k[len(prefix):].encode() and ver > 0 for k, (v, ver) in listed.items())
        assert registry.list(prefix + "nothing/") == {}
        assert len(registry.list(prefix)) == 5

    # -- leases ----------------------------------------------------------------------------------
    def test_lease_lapses_without_renew(self, registry: Registry, prefix: str) -> None:
        lease = registry.grant(TTL, "contract")
        registry.put(prefix + "leased", b"x", lease=lease)
        registry.put(prefix + "kept", b"y")
        t0 = time.monotonic()
        assert registry.get(prefix + "leased") is not None
        time.sleep(TTL / 2)
        assert registry.get(prefix + "leased") is not None, "gone before its TTL"
        assert wait_until(lambda: registry.get(prefix + "leased") is None, TTL + LAPSE_GRACE), "lease never lapsed"
        assert time.monotonic() - t0 >= TTL * 0.9
        assert sorted(registry.list(prefix)) == [prefix + "kept"]

    def test_renew_keeps_lease_alive(self, registry: Registry, prefix: str) -> None:
        lease = registry.grant(TTL, "contract")
        registry.put(prefix + "leased", b"x", lease=lease)
        end = time.monotonic() + 2 * TTL + 1
        while time.monotonic() < end:
            assert registry.renew(lease) is True
            assert registry.get(prefix + "leased") is not None
            time.sleep(TTL / 3)
        registry.revoke(lease)

    def test_renew_after_lapse_is_false(self, registry: Registry, prefix: str) -> None:
        lease = registry.grant(TTL, "contract")
        registry.put(prefix + "leased", b"x", lease=lease)
        assert wait_until(lambda: registry.get(prefix + "leased") is None, TTL + LAPSE_GRACE)
        assert registry.renew(lease) is False
        assert registry.get(prefix + "leased") is None, "a renew after the lapse revived the key"
        registry.revoke(lease)  # no error

    def test_revoke_deletes_now(self, registry: Registry, prefix: str) -> None:
        lease = registry.grant(30, "contract")
        registry.put(prefix + "a", b"1", lease=lease)
        registry.put(prefix + "b", b"2", lease=lease)
        registry.revoke(lease)
        assert registry.get(prefix + "a") is None and registry.list(prefix) == {}
        assert registry.renew(lease) is False
        registry.revoke(lease)  # twice: no error

    def test_unknown_leases(self, registry: Registry) -> None:
        for bogus in ("", "no-such-lease", "0", "123456789", "x" * 40):
            assert registry.renew(bogus) is False
            registry.revoke(bogus)

    def test_writes_under_revoked_lease_raise(self, registry: Registry, prefix: str) -> None:
        lease = registry.grant(30, "contract")
        registry.revoke(lease)
        with pytest.raises(DiscoveryError) as err:
            registry.put(prefix + "a", b"1", lease=lease)
        assert not isinstance(err.value, RegistryUnavailable)
        with pytest.raises(DiscoveryError):
            registry.write_if(prefix + "a", b"1", version=0, lease=lease)
        registry.put(prefix + "b", b"1")
        # a refused condition is decided before the lease is looked at
        assert registry.write_if(prefix + "b", b"2", version=0, lease=lease) is False
        assert registry.get(prefix + "a") is None

    def test_put_without_lease_detaches_key(self, registry: Registry, prefix: str) -> None:
        lease = registry.grant(30, "contract")
        registry.put(prefix + "k", b"leased", lease=lease)
        registry.put(prefix + "k", b"mine")
        registry.revoke(lease)
        got = registry.get(prefix + "k")
        assert got is not None and got[0] == b"mine"

    def test_rewrite_moves_key_to_the_new_lease(self, registry: Registry, prefix: str) -> None:
        first, second = registry.grant(30, "contract"), registry.grant(30, "contract")
        registry.put(prefix + "p", b"1", lease=first)
        registry.put(prefix + "w", b"1", lease=first)
        registry.put(prefix + "p", b"2", lease=second)
        assert registry.write_if(prefix + "w", b"2", version=version_of(registry, prefix + "w"), lease=second)
        registry.revoke(first)
        assert sorted(registry.list(prefix)) == [prefix + "p", prefix + "w"], "the old lease took the keys along"
        registry.revoke(second)
        assert registry.list(prefix) == {}

    # -- write_if ----------------------------------------------------------------------------------
    def test_write_if_create(self, registry: Registry, prefix: str) -> None:
        k = prefix + "c"
        assert registry.write_if(k, b"first", version=0) is True
        assert registry.write_if(k, b"second", version=0) is False
        got = registry.get(k)
        assert got is not None and got[0] == b"first"

    def test_write_if_compare_and_set(self, registry: Registry, prefix: str) -> None:
        k = prefix + "cas"
        registry.put(k, b"v1")
        ver = version_of(registry, k)
        assert registry.write_if(k, b"v2", version=ver) is True
        assert registry.write_if(k, b"v3", version=ver) is False, "a stale version was accepted"
        got = registry.get(k)
        assert got is not None and got[0] == b"v2" and got[1] != ver
        assert registry.write_if(k, b"v3", version=got[1]) is True
        assert registry.write_if(prefix + "absent", b"x", version=got[1]) is False
        assert registry.get(prefix + "absent") is None

    def test_write_if_absent_keys(self, registry: Registry, prefix: str) -> None:
        k, other = prefix + "marker", prefix + "live"
        registry.put(other, b"here")
        assert registry.write_if(k, b"m", version=0, absent=[other]) is False
        assert registry.get(k) is None
        registry.delete(other)
        assert registry.write_if(k, b"m", version=0, absent=[other, prefix + "never"]) is True

    def test_write_if_under_lease(self, registry: Registry, prefix: str) -> None:
        lease = registry.grant(30, "contract")
        assert registry.write_if(prefix + "e", b"x", version=0, lease=lease) is True
        ver = version_of(registry, prefix + "e")
        assert registry.write_if(prefix + "e", b"y", version=ver, lease=lease) is True
        registry.revoke(lease)
        assert registry.get(prefix + "e") is None

    def test_lapsed_keys_count_as_absent(self, registry: Registry, prefix: str) -> None:
        lease = registry.grant(TTL, "contract")
        registry.put(prefix + "k", b"old", lease=lease)
        registry.put(prefix + "o", b"old", lease=lease)
        assert registry.write_if(prefix + "k", b"new", version=0) is False
        assert wait_until(lambda: registry.get(prefix + "o") is None, TTL + LAPSE_GRACE)
        assert registry.write_if(prefix + "k", b"new", version=0, absent=[prefix + "o"]) is True
        got = registry.get(prefix + "k")
        assert got is not None and got[0] == b"new"

    def test_threads_racing_write_if(self, registry: Registry, prefix: str) -> None:
        k = prefix + "race"
        registry.put(k, b"0")
        for rnd in range(10):
            ver = version_of(registry, k)

            def attempt(i: int, ver: int = ver, fresh: str = f"{prefix}new{rnd}") -> tuple[bool, bool]:
                return (registry.write_if(k, str(i).encode(), version=ver),
                        registry.write_if(fresh, str(i).encode(), version=0))

            results = race(2, attempt)
            assert sorted(r[0] for r in results) == [False, True], f"round {rnd}: {results}"
            assert sorted(r[1] for r in results) == [False, True], f"round {rnd}: {results}"

    # -- failures ----------------------------------------------------------------------------------
    def test_unreachable_raises_quickly(self, unreachable_urls: list[str]) -> None:
        for url in unreachable_urls:
            for op in ("get", "grant"):
                t0 = time.monotonic()
                with pytest.raises(RegistryUnavailable) as err:
                    reg = open_registry(url)
                    try:
                        reg.get("fedpar/x") if op == "get" else reg.grant(TTL, "x")
                    finally:
                        reg.close()
                elapsed = time.monotonic() - t0
                assert elapsed < UNREACHABLE_WITHIN, f"{url} {op}: {elapsed:.1f}s"
                assert url.split("?")[0] in str(err.value), str(err.value)
