"""The ``fedpar`` command: background clusters, foreground controller/engine, config."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procutil import assert_no_procs, kill_pids, pid_gone

import fedpar
from fedpar.runtime import connection_file_path, read_connection_file

pytestmark = pytest.mark.timeout(60)


def fedpar_cmd(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedpar", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def unique_id(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns() % 10**9}"


def test_cluster_start_status_stop(procs, tmp_path):
    cid = unique_id("cli")
    path = connection_file_path(cid)
    pids: list[int] = []
    try:
        started = fedpar_cmd("cluster", "start", "-n", "2", "--cluster-id", cid,
                             "--state-dir", str(tmp_path / "state"), "--timeout", "30")
        if path.exists():  # whatever happened, remember what to kill
            info = read_connection_file(cid)
            pids = [info.controller_pid, *info.engine_pids]
            procs.add(*pids)
        assert started.returncode == 0, started.stderr
        assert f"cluster {cid!r} started" in started.stdout
        assert "warning" not in started.stderr

        info = read_connection_file(cid)
        assert len(info.engine_pids) == 2
        assert not any(pid_gone(p) for p in pids)
        assert (path.stat().st_mode & 0o777) == 0o600

        status = fedpar_cmd("cluster", "status", "--cluster-id", cid)
        assert status.returncode == 0, status.stderr
        assert "engines: 2" in status.stdout
        assert "tasks done: 0" in status.stdout
        for pid in info.engine_pids:
            assert f"pid {pid}" in status.stdout

        with fedpar.Client(cid) as client:  # by cluster id, through the runtime dir
            assert len(client.wait_for_engines(2, timeout=30)) == 2
            assert client.load_balanced_view().apply_sync(lambda x: x * 2, 21) == 42
            assert sorted(client[:].apply_sync(os.getpid)) == sorted(info.engine_pids)

        status = fedpar_cmd("cluster", "status", "--cluster-id", cid)
        assert status.returncode == 0, status.stderr
        assert re.search(r"tasks done: 3\b", status.stdout), status.stdout

        again = fedpar_cmd("cluster", "start", "-n", "1", "--cluster-id", cid,
                           "--state-dir", str(tmp_path / "state2"))
        assert again.returncode == 1
        assert f"runs already (controller pid {info.controller_pid}" in again.stderr and "stop it first" in again.stderr

        stopped = fedpar_cmd("cluster", "stop", "--cluster-id", cid)
        assert stopped.returncode == 0, stopped.stderr
        assert f"cluster {cid!r} stopped" in stopped.stdout
        assert "did not answer" not in stopped.stderr  # stopped by request, not by signals
        assert_no_procs(pids, timeout=15)
        assert not path.exists()
    finally:
        if path.exists() and not pids:
            info = read_connection_file(cid)
            procs.add(info.controller_pid, *info.engine_pids)


def test_cluster_start_replaces_the_connection_file_of_a_dead_cluster(procs, tmp_path):
    """A cluster killed without cleaning up leaves its connection file: the next start must not refuse."""
    cid = unique_id("stale")
    path = connection_file_path(cid)
    pids: list[int] = []
    try:
        first = fedpar_cmd("cluster", "start", "-n", "1", "--cluster-id", cid, "--state-dir", str(tmp_path / "s1"),
                           "--timeout", "30")
        assert first.returncode == 0, first.stderr
        info = read_connection_file(cid)
        pids = [info.controller_pid, *info.engine_pids]
        procs.add(*pids)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert_no_procs(pids, timeout=10)
        assert path.exists()  # nobody cleaned up

        second = fedpar_cmd("cluster", "start", "-n", "1", "--cluster-id", cid, "--state-dir", str(tmp_path / "s2"),
                            "--timeout", "30")
        info2 = read_connection_file(cid)
        pids = [info2.controller_pid, *info2.engine_pids]
        procs.add(*pids)
        assert second.returncode == 0, second.stderr
        assert f"stale connection file {path} (its controller pid {info.controller_pid} is gone)" in second.stderr
        with fedpar.Client(cid) as client:
            client.wait_for_engines(1, timeout=30)
            assert client.load_balanced_view().apply_sync(lambda: "alive") == "alive"
        stopped = fedpar_cmd("cluster", "stop", "--cluster-id", cid)
        assert stopped.returncode == 0, stopped.stderr
        assert_no_procs(pids, timeout=15)
    finally:
        if path.exists():
            path.unlink()


def test_cluster_status_and_stop_of_missing_cluster():
    cid = unique_id("missing")
    for action in ("status", "stop"):
        res = fedpar_cmd("cluster", action, "--cluster-id", cid, timeout=30)
        assert res.returncode == 1, (action, res.stdout, res.stderr)
        assert "no connection file" in res.stderr
        assert "is the cluster running" in res.stderr
        assert "Traceback" not in res.stderr


def test_cluster_status_of_dead_cluster(procs, tmp_path):
    """A connection file whose controller is gone: a clear error within seconds, not a hang."""
    c = fedpar.Cluster(n=0, log_dir=tmp_path / "logs")
    c.start()
    procs.add(c.controller_pid)
    info = c.info
    assert info is not None
    stale = tmp_path / "stale.json"
    stale.write_bytes(c.connection_file.read_bytes())
    stale.chmod(0o600)
    c.stop()
    assert_no_procs([info.controller_pid])
    t0 = time.monotonic()
    res = fedpar_cmd("cluster", "status", "--connection-file", str(stale), timeout=30)
    assert res.returncode == 1
    assert "ControllerUnavailable" in res.stderr and "did not answer" in res.stderr
    assert time.monotonic() - t0 < 15


def test_config_prints_parseable_ini(tmp_path):
    res = fedpar_cmd("config", timeout=30)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for section in ("cluster", "controller", "engines", "security", "store", "discovery"):
        assert f"[{section}]" in text
    path = tmp_path / "fedpar.ini"
    path.write_text(text)
    assert fedpar.load_config(path) == fedpar.Config()
    # the commented values are the defaults: uncommented, they parse to the same configuration
    uncommented = re.sub(r"(?m)^# ([a-z_]+ =.*)$", r"\1", text)
    assert uncommented != text
    path2 = tmp_path / "fedpar-uncommented.ini"
    path2.write_text(uncommented)
    assert fedpar.load_config(path2) == fedpar.Config()


def test_cluster_start_uses_config_file(procs, tmp_path):
    """``--config`` reaches the processes: here a config setting n, used when -n is not given."""
    cid = unique_id("cfg")
    ini = tmp_path / "c.ini"
    ini.write_text("[engines]\nn = 1\n")
    path = connection_file_path(cid)
    try:
        res = fedpar_cmd("cluster", "start", "--config", str(ini), "--cluster-id", cid,
                         "--state-dir", str(tmp_path / "state"), "--timeout", "30")
        assert res.returncode == 0, res.stderr
        info = read_connection_file(cid)
        procs.add(info.controller_pid, *info.engine_pids)
        assert len(info.engine_pids) == 1
        with fedpar.Client(cid) as client:
            assert len(client.wait_for_engines(1, timeout=30)) == 1
        res = fedpar_cmd("cluster", "stop", "--cluster-id", cid)
        assert res.returncode == 0, res.stderr
        assert_no_procs([info.controller_pid, *info.engine_pids], timeout=15)
    finally:
        if path.exists():
            info = read_connection_file(cid)
            procs.add(info.controller_pid, *info.engine_pids)


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the controller exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.05)


def test_foreground_controller_and_engines(procs, tmp_path):
    cf = tmp_path / "conn" / "fg.json"
    cf.parent.mkdir(mode=0o700)
    log = open(tmp_path / "controller.log", "wb")  # noqa: SIM115 - closed below
    try:
        ctl = procs.popen([sys.executable, "-m", "fedpar", "controller", "--cluster-id", "fg",
                           "--state-dir", str(tmp_path / "state"), "--connection-file", str(cf)],
                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_for_file(cf, ctl, 30)
        engines = [
            procs.popen([sys.executable, "-m", "fedpar", "engine", "--connection-file", str(cf)],
                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            for _ in range(2)
        ]
    finally:
        log.close()
    info = read_connection_file(cf)
    assert info.controller_pid == ctl.pid
    assert info.cluster_id == "fg"
    with fedpar.Client(str(cf)) as client:  # a path, not a cluster id
        assert len(client.wait_for_engines(2, timeout=30)) == 2
        assert sorted(client[:].apply_sync(os.getpid)) == sorted(e.pid for e in engines)
        assert client.load_balanced_view().map_sync(lambda x: x + 1, range(5)) == [1, 2, 3, 4, 5]
        assert sorted(client.shutdown(timeout=10)) == [0, 1]
    for p in [ctl, *engines]:
        assert p.wait(15) == 0
    assert not cf.exists()  # the controller removes its connection file


def _start_foreground(procs, tmp_path, name):
    cf = tmp_path / f"{name}.json"
    ctl = procs.popen([sys.executable, "-m", "fedpar", "controller", "--cluster-id", name,
                       "--state-dir", str(tmp_path / "state"), "--connection-file", str(cf)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    _wait_for_file(cf, ctl, 30)
    eng = procs.popen([sys.executable, "-m", "fedpar", "engine", "--connection-file", str(cf)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return cf, ctl, eng


def test_foreground_processes_stop_on_sigterm(procs, tmp_path):
    cf, ctl, eng = _start_foreground(procs, tmp_path, "sig")
    with fedpar.Client(cf) as client:
        client.wait_for_engines(1, timeout=30)
        assert client.load_balanced_view().apply_sync(os.getpid) == eng.pid
        eng.send_signal(signal.SIGTERM)
        assert eng.wait(10) == 0
    ctl.send_signal(signal.SIGTERM)
    assert ctl.wait(10) == 0
    assert not cf.exists()


def test_busy_engine_stops_on_sigterm(procs, tmp_path):
    cf, _ctl, eng = _start_foreground(procs, tmp_path, "busy")
    with fedpar.Client(cf) as client:
        client.wait_for_engines(1, timeout=30)
        busy = client.load_balanced_view().apply_async(time.sleep, 30)
        deadline = time.monotonic() + 10
        while client.status()["engines"][0]["load"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # inside time.sleep on the engine
        eng.send_signal(signal.SIGTERM)
        try:
            assert eng.wait(4) == 0
        finally:
            with pytest.raises(fedpar.TaskError):  # EngineError, or the interrupted task's RemoteError
                busy.get(timeout=20)


def test_cluster_of_several_controllers_from_the_cli(procs, tmp_path):
    """`fedpar cluster start --controllers 2`: a federation; status lists each controller; stop leaves nothing."""
    cid = unique_id("fedcli")
    pids: list[int] = []
    try:
        started = fedpar_cmd("cluster", "start", "-n", "4", "--controllers", "2", "--cluster-id", cid,
                             "--state-dir", str(tmp_path / "state"), "--timeout", "30")
        if connection_file_path(cid).exists():
            info = read_connection_file(cid)
            pids = [*info.controller_pids, *info.engine_pids]
            procs.add(*pids)
        assert started.returncode == 0, started.stderr
        info = read_connection_file(cid)
        assert len(info.controller_pids) == 2 and len(info.engine_pids) == 4 and info.discovery.startswith("lmdb://")
        status = fedpar_cmd("cluster", "status", "--cluster-id", cid)
        assert status.returncode == 0, status.stderr
        assert status.stdout.count("controller ") == 2 and "engines: 4" in status.stdout
        for pid in info.controller_pids:
            assert f"pid {pid} " in status.stdout
        with fedpar.Client(cid) as client:
            assert client.load_balanced_view().map_sync(abs, range(-20, 0)) == list(range(20, 0, -1))
        stopped = fedpar_cmd("cluster", "stop", "--cluster-id", cid)
        assert stopped.returncode == 0, stopped.stderr
        assert_no_procs(pids, timeout=10)
        assert not connection_file_path(cid).exists()
    finally:
        kill_pids(pids)


def test_controller_and_engine_through_a_registry_and_key_file(procs, tmp_path):
    """The foreground commands of a federation: `--discovery URL --cluster NAME --key-file F`; the first
    controller creates the key file (0600)."""
    url = f"lmdb://{tmp_path / 'registry'}"
    key = tmp_path / "cluster.key"
    common = ["--cluster", "kf", "--discovery", url, "--key-file", str(key)]
    ctl = [procs.popen([sys.executable, "-m", "fedpar", "controller", *common, "--state-dir", str(tmp_path / f"s{i}"),
                        "--connection-file", str(tmp_path / f"c{i}.json")], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    for i, p in enumerate(ctl):
        _wait_for_file(tmp_path / f"c{i}.json", p, 30)
    assert (key.stat().st_mode & 0o777) == 0o600
    for _ in range(2):
        procs.popen([sys.executable, "-m", "fedpar", "engine", *common], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with fedpar.Client(discovery=url, cluster="kf", key=key) as client:
        client.wait_for_engines(2, timeout=30)
        assert len(client.status()["controllers"]) == 2
        assert client.load_balanced_view().apply_sync(abs, -3) == 3
    key.chmod(0o644)
    with pytest.raises(fedpar.ConfigError, match="chmod 600"):
        fedpar.Client(discovery=url, cluster="kf", key=key)


def test_controller_with_an_unreachable_registry_fails_at_start(tmp_path):
    """A registry that cannot be reached is a clear typed error at start, within seconds, naming the URL."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    res = fedpar_cmd("controller", "--cluster", "unreach", "--discovery", f"etcd://127.0.0.1:{port}",
                     "--state-dir", str(tmp_path / "s"), "--connection-file", str(tmp_path / "c.json"), timeout=60)
    assert res.returncode == 1 and time.monotonic() - t0 < 20
    assert "RegistryUnavailable" in res.stderr and f"127.0.0.1:{port}" in res.stderr, res.stderr
    assert not (tmp_path / "c.json").exists()
