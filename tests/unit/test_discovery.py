"""``Discovery``: signed controller records, takeovers and engine ids, on the embedded LMDB registry."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from fedpar.errors import ConfigError, DiscoveryError
from fedpar.federation.discovery import (
    ControllerEntry,
    Discovery,
    KnownController,
    Registry,
    live_controllers,
    open_registry,
)
from tests.registry_contract import wait_until

KEY = bytes(range(32))


def entry(cid: str, epoch: int = 1, weight: float = 1.0) -> ControllerEntry:
    return ControllerEntry(cid=cid, epoch=epoch, client_endpoint=f"tcp://127.0.0.1:1{epoch}00",
                           engine_endpoint=f"tcp://127.0.0.1:1{epoch}01", host="hostA", pid=4242,
                           state_dir=f"/var/lib/fedpar/{cid}", weight=weight, started=1700000000.5)


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    r = open_registry(f"lmdb://{tmp_path}/registry")
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def d(reg: Registry) -> Discovery:
    return Discovery(reg, "c1", KEY)


def lapse(d: Discovery, cid: str) -> None:
    assert wait_until(lambda: all(e.cid != cid for e in d.controllers()), 5), f"{cid} never lapsed"


# -- registration ------------------------------------------------------------------------------------------


def test_register_controllers_known(d: Discovery) -> None:
    la = d.register(entry("b"), ttl=30)
    lb = d.register(entry("a"), ttl=30)
    assert [e.cid for e in d.controllers()] == ["a", "b"]
    assert d.controllers()[0] == entry("a")
    known = d.known()
    assert sorted(known) == ["a", "b"]
    assert isinstance(known["a"], KnownController) and known["a"].state_dir == "/var/lib/fedpar/a"
    assert known["a"].host == "hostA" and known["a"].first_seen > 0
    d.deregister(la)
    assert [e.cid for e in d.controllers()] == ["a"]
    assert sorted(d.known()) == ["a", "b"], "known records are persistent"
    assert d.renew(lb) is True and d.renew(la) is False
    assert d.bad_entries == 0


def test_second_register_of_live_cid_refused(d: Discovery, reg: Registry) -> None:
    lease = d.register(entry("a"), ttl=30)
    with pytest.raises(DiscoveryError) as err:
        d.register(replace(entry("a", epoch=2), pid=999), ttl=30)
    msg = str(err.value)
    assert "controller a" in msg and "pid 4242" in msg and "hostA" in msg and reg.url in msg
    assert d.controllers() == [entry("a")]
    d.deregister(lease)
    d.register(entry("a", epoch=3), ttl=30)
    assert d.controllers()[0].epoch == 3


def test_register_again_after_lapse_keeps_first_seen(d: Discovery) -> None:
    d.register(entry("a"), ttl=0.5)
    first = d.known()["a"].first_seen
    lapse(d, "a")
    d.register(entry("a", epoch=2), ttl=30)
    assert d.controllers()[0].epoch == 2
    assert d.known()["a"].first_seen == first


def test_replace_takes_over_an_older_incarnations_entry(d: Discovery) -> None:
    old_lease = d.register(entry("a", epoch=1), ttl=30)
    with pytest.raises(DiscoveryError):
        d.register(entry("a", epoch=2), ttl=30)
    lease = d.register(entry("a", epoch=2), ttl=30, replace=True)
    assert d.controllers() == [entry("a", epoch=2)]
    d.deregister(old_lease)  # the old incarnation's lease no longer holds the key
    assert d.controllers() == [entry("a", epoch=2)]
    for epoch in (1, 2):
        with pytest.raises(DiscoveryError):
            d.register(entry("a", epoch=epoch), ttl=30, replace=True)
    assert d.renew(lease) is True
    d.deregister(lease)
    d.register(entry("a", epoch=3), ttl=30, replace=True)  # nothing to replace: a plain registration


def test_reclaim_after_own_lapse(d: Discovery) -> None:
    d.register(entry("a", epoch=1), ttl=0.5)
    lapse(d, "a")
    lease = d.reclaim(entry("a", epoch=1), ttl=30)
    assert lease is not None and d.controllers() == [entry("a", epoch=1)] and d.renew(lease)
    assert d.reclaim(entry("a", epoch=1), ttl=30) is None, "someone (here: itself) holds ctl/a"
    assert d.controllers() == [entry("a", epoch=1)]


def test_reclaim_refused_after_takeover(d: Discovery) -> None:
    d.register(entry("a", epoch=1), ttl=0.5)
    lapse(d, "a")
    assert d.take_over("a", 1, by="b") is not None
    assert d.reclaim(entry("a", epoch=1), ttl=30) is None
    assert d.controllers() == []
    assert d.reclaim(entry("a", epoch=2), ttl=30) is not None, "a marker of an older epoch does not block"


def test_live_controllers(tmp_path: Path, d: Discovery, reg: Registry) -> None:
    d.register(entry("a"), ttl=30)
    assert live_controllers(reg.url, "c1", KEY) == [entry("a")]
    assert live_controllers(reg.url, "other", KEY) == []


def test_update_rewrites_entry(d: Discovery) -> None:
    lease = d.register(entry("a"), ttl=30)
    d.update(lease, entry("a", weight=0.25))
    assert d.controllers()[0].weight == 0.25
    d.deregister(lease)
    with pytest.raises(DiscoveryError):
        d.update(lease, entry("a", weight=0.5))
    assert d.controllers() == []


def test_bad_arguments(reg: Registry, d: Discovery) -> None:
    for cluster in ("", "a/b", "-x", "x" * 65):
        with pytest.raises(ConfigError):
            Discovery(reg, cluster, KEY)
    with pytest.raises(ConfigError):
        Discovery(reg, "c1", b"short")
    for cid in ("", "a/b", "-a", "a b", "x" * 129):
        with pytest.raises(ConfigError):
            d.register(entry(cid), ttl=30)
    with pytest.raises(ConfigError):
        d.allocate_ids(-1)


# -- takeovers ---------------------------------------------------------------------------------------------


def test_take_over_only_when_dead(d: Discovery) -> None:
    d.register(entry("a", epoch=1), ttl=0.5)
    assert d.take_over("a", 1, by="b") is None, "taken over while live"
    assert d.takeovers() == {}
    lapse(d, "a")
    mine = d.take_over("a", 1, by="b")
    assert mine is not None and (mine.cid, mine.epoch, mine.by, mine.closed, mine.adopters) == ("a", 1, "b", False, 0)
    theirs = d.take_over("a", 1, by="c")
    assert theirs == mine, "a second survivor must get the marker already in place"
    assert d.takeovers() == {"a": mine}
    assert d.take_over("a", 0, by="c") is None, "an older epoch must not replace a newer marker"
    newer = d.take_over("a", 2, by="c")
    assert newer is not None and newer.epoch == 2 and newer.by == "c"
    assert d.take_over("a", 1, by="b") is None
    assert d.takeovers()["a"] == newer


def test_take_over_refused_when_controller_is_back(d: Discovery) -> None:
    d.register(entry("a", epoch=1), ttl=0.5)
    lapse(d, "a")
    assert d.take_over("a", 1, by="b") is not None
    d.register(entry("a", epoch=2), ttl=30)
    assert d.take_over("a", 1, by="c") is None
    assert d.take_over("a", 2, by="c") is None


def test_take_over_race_has_one_winner(d: Discovery) -> None:
    results = []
    barrier = threading.Barrier(4)

    def survivor(name: str) -> None:
        barrier.wait(10)
        results.append(d.take_over("dead", 7, by=name))

    threads = [threading.Thread(target=survivor, args=(f"s{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4 and all(r is not None for r in results)
    assert len({r.by for r in results if r is not None}) == 1


def test_adopt_and_close(d: Discovery) -> None:
    assert d.adopt("a", 1) is False and d.close("a", 1) is False
    assert d.take_over("a", 1, by="b") is not None
    assert d.adopt("a", 1) is True
    assert d.adopt("a", 1) is True
    assert d.takeovers()["a"].adopters == 2
    assert d.adopt("a", 2) is False
    assert d.close("a", 2) is False
    assert d.close("a", 1) is True
    assert d.close("a", 1) is True, "close is idempotent"
    assert d.adopt("a", 1) is False, "adopted after close"
    marker = d.takeovers()["a"]
    assert marker.closed and marker.adopters == 2


def test_concurrent_adopters_are_all_counted(d: Discovery) -> None:
    assert d.take_over("a", 3, by="b") is not None
    threads = [threading.Thread(target=d.adopt, args=("a", 3)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert d.takeovers()["a"].adopters == 8


def test_forget(d: Discovery) -> None:
    lease = d.register(entry("a"), ttl=30)
    d.deregister(lease)
    assert d.take_over("a", 1, by="b") is not None
    d.forget("a")
    assert d.known() == {} and d.takeovers() == {}
    d.forget("a")


# -- engine ids --------------------------------------------------------------------------------------------


def test_allocate_ids_from_zero(d: Discovery) -> None:
    assert d.allocate_ids(0) == []
    assert d.allocate_ids(3) == [0, 1, 2]
    assert d.allocate_ids(1) == [3]
    other = Discovery(d.registry, "c2", KEY)
    assert other.allocate_ids(2) == [0, 1], "each cluster has its own counter"


def test_allocate_ids_across_threads(d: Discovery) -> None:
    blocks: list[list[int]] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(25):
            b = d.allocate_ids(2)
            with lock:
                blocks.append(b)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(blocks) == 100
    assert all(b == [b[0], b[0] + 1] for b in blocks)
    assert sorted(i for b in blocks for i in b) == list(range(200))


# -- bad records -------------------------------------------------------------------------------------------


def test_tampered_record_is_ignored(d: Discovery, reg: Registry) -> None:
    lease = d.register(entry("a"), ttl=30)
    d.register(entry("b"), ttl=30)
    key = d.ctl_key("a")
    raw = reg.get(key)
    assert raw is not None
    value = bytearray(raw[0])
    i = value.index(b"hostA")
    value[i:i + 5] = b"evilA"
    reg.put(key, bytes(value), lease=lease)
    assert [e.cid for e in d.controllers()] == ["b"]
    assert d.bad_entries == 1
    mac_flipped = bytearray(raw[0])
    mac_flipped[-1] ^= 1
    reg.put(key, bytes(mac_flipped), lease=lease)
    assert [e.cid for e in d.controllers()] == ["b"]
    assert d.bad_entries == 2


def test_record_copied_to_another_key_is_ignored(d: Discovery, reg: Registry) -> None:
    d.register(entry("a"), ttl=30)
    ctl, known = reg.get(d.ctl_key("a")), reg.get(d.known_key("a"))
    assert ctl is not None and known is not None
    reg.put(d.ctl_key("zz"), ctl[0])
    reg.put(d.known_key("zz"), known[0])
    reg.put(d.takeover_key("a"), known[0])
    assert [e.cid for e in d.controllers()] == ["a"]
    assert sorted(d.known()) == ["a"]
    assert d.takeovers() == {}
    assert d.bad_entries == 3


def test_garbage_is_ignored_and_counted(d: Discovery, reg: Registry) -> None:
    d.register(entry("a"), ttl=30)
    body = msgpack.packb({"cid": "g"})
    for sub in ("ctl", "known", "takeover"):
        reg.put(f"fedpar/c1/{sub}/g", b"garbage")
        reg.put(f"fedpar/c1/{sub}/h", b"")
        reg.put(f"fedpar/c1/{sub}/i", body + d._mac(f"fedpar/c1/{sub}/i", body))  # signed but missing fields
    assert [e.cid for e in d.controllers()] == ["a"]
    assert sorted(d.known()) == ["a"]
    assert d.takeovers() == {}
    assert d.bad_entries == 9
    assert d.adopt("g", 1) is False and d.close("g", 1) is False
    marker = d.take_over("g", 1, by="b")
    assert marker is None, "an unreadable ctl/<cid> counts as live: it may be"
    reg.delete("fedpar/c1/ctl/g")
    marker = d.take_over("g", 1, by="b")
    assert marker is not None and d.takeovers()["g"] == marker, "an unreadable marker is replaced"


def test_unreadable_counter_refuses_to_guess(d: Discovery, reg: Registry) -> None:
    assert d.allocate_ids(2) == [0, 1]
    reg.put(d.ids_key, b"\x00" * 40)
    with pytest.raises(DiscoveryError) as err:
        d.allocate_ids(1)
    assert "engine id counter" in str(err.value)
    assert d.bad_entries == 1


def test_other_cluster_key_sees_nothing(d: Discovery, reg: Registry) -> None:
    d.register(entry("a"), ttl=30)
    stranger = Discovery(reg, "c1", bytes(32))
    assert stranger.controllers() == [] and stranger.known() == {}
    assert stranger.bad_entries == 2
    with pytest.raises(DiscoveryError):
        stranger.register(entry("a"), ttl=30)


def test_bad_records_logged_first_ten_then_every_hundredth(d: Discovery, reg: Registry,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    reg.put(d.ctl_key("g"), b"garbage")
    with caplog.at_level(logging.WARNING, logger="fedpar.federation.discovery"):
        for _ in range(250):
            assert d.controllers() == []
    assert d.bad_entries == 250
    warnings = [r for r in caplog.records if "ignoring registry record" in r.getMessage()]
    assert len(warnings) == 12
    assert "fedpar/c1/ctl/g" in warnings[0].getMessage()


def test_lease_lapse_takes_the_entry_away(d: Discovery) -> None:
    lease = d.register(entry("a"), ttl=0.6)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5:
        assert d.renew(lease) is True
        time.sleep(0.2)
    assert [e.cid for e in d.controllers()] == ["a"]
    lapse(d, "a")
    assert d.renew(lease) is False


# -- URLs --------------------------------------------------------------------------------------------------


def test_open_registry_rejects_bad_urls() -> None:
    for bad in ("", "http://x:1", "redis://h:1", "etcd://", "etcd://h", "etcd://h:1/path", "etcd://h:1?bogus=1",
                "etcd://h:1?cert=/c", "etcd://h:1?timeout=0", "consul://h", "consul://h:1?scheme=ftp",
                "consul://h:1?key=/k", "consul://user:secret@h:1", "consul://h:1?timeout=abc", "lmdb://rel/dir"):
        with pytest.raises(ConfigError) as err:
            open_registry(bad)
        assert "lmdb:///" in str(err.value) and "etcd://" in str(err.value), bad
        assert "secret" not in str(err.value)
