"""Federations whose controllers find each other through a real etcd (started by the test setup).

Failover through etcd, and etcd stopped for 30 s under load: controllers stop starting new tasks while they
cannot prove their registration alive, resume when etcd is back (it gives every lease its full TTL again on
restart), and nothing fails or runs twice.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import fedpar
from fedpar.runtime import new_cluster_id

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # (engines cannot import this module)


def record(i: int, exec_dir: str, sleep: float = 0.0) -> int:
    if sleep:
        time.sleep(sleep)
    fd = os.open(f"{exec_dir}/exec-{os.getpid()}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{i}\n".encode())
    finally:
        os.close(fd)
    return i * 7


def executions(exec_dir: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in exec_dir.glob("exec-*.log"):
        for line in f.read_text().split():
            out[line] = out.get(line, 0) + 1
    return out


@pytest.fixture
def etcd_fed(etcd_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[fedpar.Cluster]:
    """3 controllers and 6 engines federated through the session's etcd (a cluster name of its own)."""
    monkeypatch.setenv("FEDPAR_RUNTIME_DIR", str(tmp_path / "runtime"))
    c = fedpar.Cluster(n=6, controllers=3, discovery=etcd_server.url, cluster_id=new_cluster_id(),
                       log_dir=tmp_path / "logs")
    seen: set[int] = set()
    try:
        c.start()
        seen |= set(c.pids())
        c.wait_for_engines(6, timeout=60)
        yield c
    finally:
        if c._launcher is not None:
            seen |= {p.pid for p in (*c._launcher.controllers, *c._launcher.engines)}
        c.stop(grace=2.0)
        for pid in seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.timeout(180)
def test_federation_and_failover_through_etcd(etcd_fed: fedpar.Cluster, etcd_server: Any, tmp_path: Path) -> None:
    exec_dir = tmp_path / "exec"
    exec_dir.mkdir()
    with fedpar.Client(discovery=etcd_server.url, cluster=etcd_fed.cluster_id,
                       key=etcd_fed.state_dir / "cluster.key") as client:
        client.wait_for_engines(6, timeout=30)
        st = client.status()["controllers"]
        assert len(st) == 3 and sorted(e for c in st for e in c["engines"]) == list(range(6))
        lv = client.load_balanced_view(retries=1)
        ars = [lv.apply_async(record, i, str(exec_dir), 0.002) for i in range(1500)]
        dead = next(c for c in st if c["engines"])
        time.sleep(0.5)
        os.kill(dead["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        while True:
            own = {c["id"]: c["engines"] for c in client.status()["controllers"]}
            if dead["id"] not in own and sorted(e for es in own.values() for e in es) == list(range(6)):
                break
            assert time.monotonic() - t0 < 10, f"not re-homed within 10 s: {own}"
            time.sleep(0.1)
        assert [a.get(timeout=120) for a in ars] == [i * 7 for i in range(1500)]
        assert max(executions(exec_dir).values()) <= 2


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_etcd_down_for_30s_under_load_fails_nothing(etcd_fed: fedpar.Cluster, etcd_server: Any,
                                                    tmp_path: Path) -> None:
    exec_dir = tmp_path / "exec"
    exec_dir.mkdir()
    client = etcd_fed.connect_client()
    ars: list[fedpar.AsyncResult] = []
    stop = threading.Event()

    def submit() -> None:  # load all along: before, during and after the outage
        lv = client.load_balanced_view()
        i = 0
        while not stop.is_set():
            ars.append(lv.apply_async(record, i, str(exec_dir), 0.001))
            i += 1
            time.sleep(0.005)

    pids = etcd_fed.controller_pids
    loader = threading.Thread(target=submit)
    loader.start()
    try:
        time.sleep(2.0)
        with etcd_server.outage(30.0):
            pass
        time.sleep(5.0)
    finally:
        stop.set()
        loader.join(10)
    try:
        values = [a.get(timeout=120) for a in ars]
        assert values == [i * 7 for i in range(len(ars))]
        assert len(ars) > 1000
        runs = executions(exec_dir)
        assert set(runs) == {str(i) for i in range(len(ars))} and max(runs.values()) == 1  # each ran exactly once
        assert etcd_fed.controller_pids == pids  # no controller stepped down or died
        assert len(client.status()["controllers"]) == 3 and len(client.ids) == 6
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_engine_started_while_etcd_is_down_registers_once_it_is_back(etcd_fed: fedpar.Cluster,
                                                                      etcd_server: Any) -> None:
    """A new engine needs a global id from the registry: while etcd is down its controllers cannot allocate
    one, so it waits (trying each controller in turn) and registers, exactly once, when etcd is back."""
    with etcd_fed.connect_client() as client:
        with etcd_server.outage(6.0):
            etcd_fed.add_engines(1)
            time.sleep(3.0)
            assert len(client.ids) == 6  # (no id without the registry)
        client.wait_for_engines(7, timeout=30)
        time.sleep(3.0)  # a controller that registered it too would show a phantom engine by now
        st = client.status()
        owned = sorted(e for c in st["controllers"] for e in c["engines"])
        # (ids are unique, not dense: an id allocated for a hello whose engine had moved on is kept for the next)
        assert owned == client.ids and len(owned) == 7 and owned[:6] == list(range(6)), st["controllers"]
        assert sorted(client[:].apply_sync(os.getpid)) == sorted(etcd_fed.engine_pids)
