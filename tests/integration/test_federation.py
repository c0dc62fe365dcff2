"""Several controllers as one logical controller: real controller and engine processes on loopback.

One module-scoped federation (3 controllers, 6 engines, embedded registry) serves the tests that only
read or add work; tests that change the control plane (add or stop a controller) start their own.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from procutil import assert_no_procs, cluster_pids

import fedpar
from fedpar.config import Config

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # (engines cannot import this module)


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    import time

    time.sleep(0.005)
    return x * x


def owners(client: fedpar.Client) -> dict[str, list[int]]:
    """Engine ids per live controller, from the federation's status."""
    return {c["id"]: c["engines"] for c in client.status()["controllers"]}


def federation(log_dir: Path, n: int, controllers: int, config: Config | None = None) -> Iterator[fedpar.Cluster]:
    """A started federation with every engine registered; at teardown stopped, and none of its processes
    (controllers restarted or added by a test included) may be left."""
    c = fedpar.Cluster(n=n, controllers=controllers, config=config, log_dir=log_dir)
    pids: set[int] = set()
    try:
        c.start()
        pids |= set(cluster_pids(c)) | set(c.controller_pids)
        c.wait_for_engines(n, timeout=60)
        yield c
        pids |= set(cluster_pids(c)) | set(c.controller_pids)
    finally:
        try:
            c.stop()
        finally:
            assert_no_procs(sorted(pids), timeout=10)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fedpar.Cluster]:
    yield from federation(tmp_path_factory.mktemp("fedlogs"), n=6, controllers=3)


@pytest.fixture(scope="module")
def client(fed: fedpar.Cluster) -> Iterator[fedpar.Client]:
    cl = fed.connect_client()
    try:
        cl.wait_for_engines(6, timeout=30)
        yield cl
    finally:
        cl.close()


def test_one_logical_controller_spans_every_engine(fed: fedpar.Cluster, client: fedpar.Client) -> None:
    assert len(fed.controller_pids) == 3
    st = client.status()
    ctl = st["controllers"]
    assert len(ctl) == 3 and {c["pid"] for c in ctl} == set(fed.controller_pids)
    for c in ctl:
        assert {"id", "pid", "host", "epoch", "engines", "queued", "done"} <= set(c)
    owned = [e for c in ctl for e in c["engines"]]
    assert sorted(owned) == client.ids == sorted(e["id"] for e in st["engines"])  # each engine exactly once
    assert len(client.ids) == 6 and client.ids == list(range(6))  # global ids, from the registry's counter
    assert st["done"] == sum(c["done"] for c in ctl)
    assert st["controller"] == ",".join(sorted(c["id"] for c in ctl))


def test_direct_requests_reach_engines_of_every_controller(fed: fedpar.Cluster, client: fedpar.Client) -> None:
    dview = client[:]
    assert sorted(dview.apply_sync(os.getpid)) == sorted(fed.engine_pids)
    for eid in client.ids:
        client[eid]["who"] = eid
    assert dview.pull("who", block=True) == client.ids
    dview.scatter("part", list(range(60)), block=True)
    assert dview.gather("part", block=True) == list(range(60))
    assert sorted(dview.apply_sync(len, fedpar.Reference("part"))) == [10] * 6


def test_load_balanced_work_runs_on_every_controller(client: fedpar.Client) -> None:
    before = {c["id"]: c["done"] for c in client.status()["controllers"]}
    lv = client.load_balanced_view()
    ars = [lv.apply_async(slow_square, i) for i in range(600)]
    assert [a.get(timeout=60) for a in ars] == [i * i for i in range(600)]
    assert lv.map_sync(square, range(2000)) == [i * i for i in range(2000)]
    after = {c["id"]: c["done"] for c in client.status()["controllers"]}
    ran = {cid: after[cid] - before[cid] for cid in after}
    assert all(n > 0 for n in ran.values()), ran  # no controller's engines sat idle


def test_results_queries_and_purges_span_every_store(fed: fedpar.Cluster, client: fedpar.Client) -> None:
    lv = client.load_balanced_view()
    ar = lv.map_async(square, range(60), chunksize=1)
    assert ar.get(timeout=60) == [i * i for i in range(60)]
    with fed.connect_client() as other:
        assert other.get_result(ar.task_ids, block=True, timeout=30) == [[i * i] for i in range(60)]
        done = {r.task_id for r in other.query_tasks(states=["done"], limit=100_000)}
        assert set(ar.task_ids) <= done
        assert other.purge_results(ar.task_ids[:30]) == 30
        with pytest.raises(fedpar.ResultNotFound):
            other.get_result(ar.task_ids[0], block=True, timeout=30)
        assert other.get_result(ar.task_ids[30], block=True, timeout=30) == [900]
    with pytest.raises(fedpar.ResultNotFound):
        client.get_result("nobody-ever-0", block=True, timeout=30)


def test_client_through_the_discovery_registry(fed: fedpar.Cluster) -> None:
    with fedpar.Client(discovery=fed.discovery, cluster=fed.cluster_id, key=fed.state_dir / "cluster.key") as c:
        c.wait_for_engines(6, timeout=30)
        assert len(c.status()["controllers"]) == 3
        assert c.load_balanced_view().apply_sync(square, 7) == 49
    with pytest.raises(fedpar.ConfigError, match="cluster=NAME"):
        fedpar.Client(discovery=fed.discovery)


@pytest.mark.timeout(120)
def test_add_controller_while_work_runs(tmp_path: Path) -> None:
    for c in federation(tmp_path / "logs", n=6, controllers=2):
        client = c.connect_client()
        try:
            lv = client.load_balanced_view()
            ars = [lv.apply_async(slow_square, i) for i in range(1500)]
            new = c.add_controller()
            assert new == 2 and len(c.controller_pids) == 3
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the engines whose placement names it move to it once idle
                own = owners(client)
                if len(own) == 3 and all(own.values()):
                    break
                time.sleep(0.2)
            assert len(own) == 3 and all(own.values()), own
            assert sorted(e for es in own.values() for e in es) == list(range(6))  # each engine once
            assert [a.get(timeout=60) for a in ars] == [i * i for i in range(1500)]
            assert sorted(client[:].apply_sync(os.getpid)) == sorted(c.engine_pids)
        finally:
            client.close()


@pytest.mark.timeout(120)
def test_stop_controller_hands_its_work_over(tmp_path: Path) -> None:
    for c in federation(tmp_path / "logs", n=6, controllers=3):
        client = c.connect_client()
        try:
            lv = client.load_balanced_view()
            ars = [lv.apply_async(slow_square, i) for i in range(1500)]
            time.sleep(0.5)
            leaving = c.controller_pids[1]
            c.stop_controller(1)
            assert_no_procs([leaving], timeout=5)
            assert [a.get(timeout=60) for a in ars] == [i * i for i in range(1500)]
            own = owners(client)
            assert len(own) == 2 and sorted(e for es in own.values() for e in es) == list(range(6))
            assert sorted(client[:].apply_sync(os.getpid)) == sorted(c.engine_pids)  # every engine, same ids
        finally:
            client.close()


@pytest.mark.timeout(150)
def test_federation_through_consul_with_failover(tmp_path: Path) -> None:
    """Controllers federated through Consul's HTTP API: against ``ConsulStandIn`` (a stand-in of the endpoints
    the backend uses; no Consul agent can be installed here), or a real agent when CONSUL_HTTP_ADDR is set."""
    from tests.standins.consul import ConsulStandIn

    real = os.environ.get("CONSUL_HTTP_ADDR")
    with ConsulStandIn() as standin:
        url = f"consul://{real}" if real else standin.url
        for c in federation(tmp_path / "logs", n=4, controllers=2,
                            config=Config(discovery=dataclasses.replace(Config().discovery, url=url))):
            client = c.connect_client()
            try:
                lv = client.load_balanced_view(retries=1)
                ars = [lv.apply_async(slow_square, i) for i in range(600)]
                dead = next(x for x in client.status()["controllers"] if x["engines"])
                os.kill(dead["pid"], signal.SIGKILL)
                assert [a.get(timeout=60) for a in ars] == [i * i for i in range(600)]
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    own = owners(client)
                    if dead["id"] not in own and sorted(e for es in own.values() for e in es) == list(range(4)):
                        break
                    time.sleep(0.1)
                assert dead["id"] not in own and sorted(e for es in own.values() for e in es) == list(range(4)), own
            finally:
                client.close()


@pytest.mark.timeout(120)
def test_a_clean_stop_is_not_taken_over(tmp_path: Path) -> None:
    """A controller stopped cleanly (SIGINT: a plain stop, not a handover) marks it in the registry: the others
    do not take it over, so a restart on its state directory resumes what it had queued. SIGTERM (with others
    running) is a handover instead."""
    from fedpar.federation.discovery import Discovery, open_registry

    for c in federation(tmp_path / "logs", n=4, controllers=3):
        disc = Discovery(open_registry(c.discovery), c.cluster_id, (c.state_dir / "cluster.key").read_bytes())
        try:
            stopped = c._launcher.controllers[2]  # type: ignore[union-attr]
            cid = c._infos[2].controller_id
            stopped.send_signal(signal.SIGINT)
            assert stopped.wait(15) == 0
            c.stop_controller(1)  # a handover
            handed = c._infos[1].controller_id
            time.sleep(c.config.discovery.ttl + 2 * c.config.discovery.poll + 1.0)
            marks = disc.takeovers()
            assert cid not in marks and disc.stopped(cid) == 1
            assert handed in marks and marks[handed].closed
            c.restart_controller(2)
            with c.connect_client() as client:
                assert len(client.status()["controllers"]) == 2
                assert client.load_balanced_view().map_sync(square, range(10)) == [i * i for i in range(10)]
        finally:
            disc.close_registry()
