"""The embedded LMDB registry: the shared contract, plus several processes sharing one directory."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedpar.errors import ConfigError, DiscoveryError
from fedpar.federation.discovery import Discovery, Registry, open_registry
from fedpar.federation.lmdb_registry import LmdbRegistry
from tests.registry_contract import RegistryContract

KEY = bytes(range(32))


def lmdb_url(path: Path) -> str:
    return f"lmdb://{path}"


class TestLmdbContract(RegistryContract):
    @pytest.fixture
    def registry(self, tmp_path: Path) -> Iterator[Registry]:
        reg = open_registry(lmdb_url(tmp_path / "reg"))
        try:
            yield reg
        finally:
            reg.close()

    @pytest.fixture
    def unreachable_urls(self, tmp_path: Path) -> list[str]:
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        return [lmdb_url(blocker / "reg")]


def test_url_forms(tmp_path: Path) -> None:
    for bad in ("lmdb://relative/dir", "lmdb://somehost/abs/dir", f"lmdb://{tmp_path}?x=1", "lmdb:", "lmdb://"):
        with pytest.raises(ConfigError) as err:
            open_registry(bad)
        assert "lmdb:///ABSOLUTE/DIRECTORY" in str(err.value)
    reg = open_registry(f"lmdb://localhost{tmp_path}/ok")
    assert isinstance(reg, LmdbRegistry) and reg.path == str(tmp_path / "ok")
    reg.close()


def test_directory_is_private(tmp_path: Path) -> None:
    reg = open_registry(lmdb_url(tmp_path / "private"))
    reg.close()
    assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o700
    for f in (tmp_path / "private").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f


def test_two_handles_share_leases_and_keys(tmp_path: Path) -> None:
    a, b = open_registry(lmdb_url(tmp_path / "r")), open_registry(lmdb_url(tmp_path / "r"))
    try:
        lease = a.grant(30, "shared")
        a.put("k/1", b"x", lease=lease)
        assert b.get("k/1") is not None
        assert b.renew(lease) is True
        b.revoke(lease)
        assert a.get("k/1") is None and a.renew(lease) is False
    finally:
        a.close()
        b.close()


def test_lapsed_leases_are_purged_by_the_next_write(tmp_path: Path) -> None:
    reg = open_registry(lmdb_url(tmp_path / "r"))
    assert isinstance(reg, LmdbRegistry)
    try:
        lease = reg.grant(0.2, "short")
        reg.put("k/1", b"x", lease=lease)
        time.sleep(0.3)
        assert reg.get("k/1") is None  # absent at once, before any purge
        reg.put("other", b"y")  # any write transaction purges
        with reg._env.begin() as txn:
            assert txn.get(b"k/1", db=reg._kv) is None
            assert txn.get(lease.encode(), db=reg._leases) is None
            assert list(txn.cursor(reg._lease_keys)) == []
    finally:
        reg.close()


def test_map_grows_on_demand(tmp_path: Path) -> None:
    reg = open_registry(lmdb_url(tmp_path / "r"))
    try:
        blob = os.urandom(1 << 20)
        for i in range(20):  # 20 MiB > the 8 MiB initial map
            reg.put(f"big/{i}", blob)
        assert len(reg.list("big/")) == 20
    finally:
        reg.close()


def test_closed_registry_refuses(tmp_path: Path) -> None:
    reg = open_registry(lmdb_url(tmp_path / "r"))
    reg.close()
    reg.close()
    with pytest.raises(DiscoveryError):
        reg.get("k")


def test_bad_ttl_and_keys(tmp_path: Path) -> None:
    reg = open_registry(lmdb_url(tmp_path / "r"))
    try:
        for ttl in (0, -1, float("nan"), float("inf")):
            with pytest.raises(ConfigError):
                reg.grant(ttl, "x")
        for key in ("", "x" * 401, "a\x00b"):
            with pytest.raises(DiscoveryError):
                reg.put(key, b"v")
    finally:
        reg.close()


# -- several processes ---------------------------------------------------------------------------------------


def _allocate_worker(url: str, rounds: int, start: Any, out: Any) -> None:
    reg = open_registry(url)
    try:
        d = Discovery(reg, "mp", KEY)
        start.wait(60)
        blocks = [d.allocate_ids(3) for _ in range(rounds)]
        out.put(blocks)
    finally:
        reg.close()


def _increment_worker(url: str, key: str, rounds: int, start: Any, out: Any) -> None:
    reg = open_registry(url)
    lost = 0
    try:
        start.wait(60)
        for _ in range(rounds):
            while True:
                got = reg.get(key)
                assert got is not None
                if reg.write_if(key, str(int(got[0]) + 1).encode(), version=got[1]):
                    break
                lost += 1
        out.put(lost)
    finally:
        reg.close()


def _run_processes(target: Any, args: tuple[Any, ...], n: int = 2) -> list[Any]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, start, out)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        start.set()
        results = [out.get(timeout=90) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def test_processes_allocate_unique_contiguous_ids(tmp_path: Path) -> None:
    url = lmdb_url(tmp_path / "r")
    open_registry(url).close()
    results = _run_processes(_allocate_worker, (url, 40))
    blocks = [b for r in results for b in r]
    assert all(b == list(range(b[0], b[0] + 3)) for b in blocks)
    ids = sorted(i for b in blocks for i in b)
    assert ids == list(range(2 * 40 * 3)), "ids reused or skipped"


def test_processes_racing_write_if_lose_no_update(tmp_path: Path) -> None:
    url = lmdb_url(tmp_path / "r")
    reg = open_registry(url)
    reg.put("counter", b"0")
    try:
        _run_processes(_increment_worker, (url, "counter", 100))
        got = reg.get("counter")
        assert got is not None and got[0] == b"200"
    finally:
        reg.close()
