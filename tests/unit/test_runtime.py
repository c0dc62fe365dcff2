"""Tests for fedpar.runtime: runtime/state directories and connection files (real files in tmp_path)."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fedpar.config import ClusterConfig, Config, ControllerConfig
from fedpar.errors import ClusterError, ConfigError, ConnectionFileError
from fedpar.runtime import (
    CONNECTION_FILE_ENV,
    RUNTIME_DIR_ENV,
    ConnectionInfo,
    check_state_dir_free,
    connection_file_path,
    key_file,
    lock_state_dir,
    new_cluster_id,
    read_connection_file,
    remove_connection_file,
    runtime_dir,
    state_dir,
    state_dir_holder,
    write_connection_file,
)
from fedpar.wire.signing import new_cluster_key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every directory fedpar might use into tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in (RUNTIME_DIR_ENV, CONNECTION_FILE_ENV, "XDG_RUNTIME_DIR", "XDG_STATE_HOME", "FEDPAR_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def rt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "rt"
    monkeypatch.setenv(RUNTIME_DIR_ENV, str(path))
    return path


def make_info(cluster_id: str = "default", **changes: object) -> ConnectionInfo:
    info = ConnectionInfo(
        cluster_id=cluster_id,
        key=new_cluster_key(),
        client_endpoint="tcp://127.0.0.1:40001",
        engine_endpoint="tcp://127.0.0.1:40002",
        controller_id="ctl-1",
        controller_pid=os.getpid(),
        state_dir="/tmp/state",
        created=1700000000.5,
    )
    return dataclasses.replace(info, **changes)  # type: ignore[arg-type]


# ---- runtime directory -------------------------------------------------------------------------


def test_runtime_dir_falls_back_to_home(_isolated_env: Path) -> None:
    path = runtime_dir()
    assert path == _isolated_env / ".fedpar" / "runtime"
    assert path.is_dir() and mode(path) == 0o700


def test_runtime_dir_uses_xdg_when_it_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert runtime_dir() == Path.home() / ".fedpar" / "runtime"  # not there yet: ignored
    xdg.mkdir()
    assert runtime_dir() == xdg / "fedpar"
    assert mode(xdg / "fedpar") == 0o700


def test_runtime_dir_env_beats_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rt: Path) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert runtime_dir() == rt
    assert mode(rt) == 0o700


def test_runtime_dir_config_beats_env(tmp_path: Path, rt: Path) -> None:
    cfg = Config(cluster=ClusterConfig(runtime_dir=str(tmp_path / "from-config")))
    assert runtime_dir(cfg) == tmp_path / "from-config"
    assert not rt.exists()


def test_runtime_dir_mode_ignores_umask(rt: Path) -> None:
    old = os.umask(0o022)
    try:
        runtime_dir()
    finally:
        os.umask(old)
    assert mode(rt) == 0o700


def test_loose_existing_runtime_dir_is_tightened(rt: Path) -> None:
    rt.mkdir(mode=0o755)
    rt.chmod(0o777)
    assert runtime_dir() == rt
    assert mode(rt) == 0o700


def test_runtime_dir_that_is_a_file(rt: Path) -> None:
    rt.write_text("x")
    with pytest.raises(ConnectionFileError, match="not a directory"):
        runtime_dir()


def test_runtime_dir_owned_by_someone_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)  # as root we can hand it to "nobody"
        owner = "65534"
    else:
        foreign, owner = Path("/"), "0"  # owned by root, never by a normal test user
    monkeypatch.setenv(RUNTIME_DIR_ENV, str(foreign))
    with pytest.raises(ConnectionFileError, match=f"owned by uid {owner}, not by you"):
        runtime_dir()


# ---- state directory ---------------------------------------------------------------------------


def test_state_dir_default(_isolated_env: Path) -> None:
    path = state_dir(None, "abc")
    assert path == _isolated_env / ".local" / "state" / "fedpar" / "abc"
    assert mode(path) == 0o700


def test_state_dir_xdg_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xs"))
    assert state_dir(Config(), "c1") == tmp_path / "xs" / "fedpar" / "c1"
    cfg = Config(controller=ControllerConfig(state_dir=str(tmp_path / "explicit")))
    assert state_dir(cfg, "c1") == tmp_path / "explicit"
    assert mode(tmp_path / "explicit") == 0o700


def test_state_dir_rejects_path_like_cluster_id() -> None:
    with pytest.raises(Exception, match="cluster"):
        state_dir(None, "../escape")


# ---- connection files --------------------------------------------------------------------------


def test_new_cluster_id() -> None:
    ids = {new_cluster_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 8 and int(i, 16) >= 0 for i in ids)


def test_connection_file_path(rt: Path) -> None:
    assert connection_file_path("abc") == rt / "cluster-abc.json"
    with pytest.raises(Exception, match="cluster"):
        connection_file_path("a/b")


def test_write_and_read_round_trip(rt: Path) -> None:
    info = make_info("abc", engine_pids=(11, 12))
    path = write_connection_file(info)
    assert path == rt / "cluster-abc.json"
    assert mode(path) == 0o600
    assert mode(rt) == 0o700
    assert read_connection_file(path) == info
    assert read_connection_file(str(path)) == info
    data = json.loads(path.read_text())
    assert base64.b64decode(data["key"]) == info.key
    assert data["engine_pids"] == [11, 12]


def test_mode_is_0600_whatever_the_umask(rt: Path) -> None:
    old = os.umask(0)
    try:
        path = write_connection_file(make_info())
    finally:
        os.umask(old)
    assert mode(path) == 0o600


def test_lookup_by_cluster_id(rt: Path) -> None:
    info = make_info("c0ffee12")
    write_connection_file(info)
    assert read_connection_file("c0ffee12") == info


def test_default_lookup(rt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = make_info("default")
    write_connection_file(info)
    assert read_connection_file() == info
    # with a config, None means that config's cluster id
    other = make_info("other")
    write_connection_file(other)
    assert read_connection_file(None, Config(cluster=ClusterConfig(id="other"))) == other
    # the environment variable wins
    explicit = write_connection_file(make_info("x"), tmp_path / "elsewhere" / "conn.json")
    monkeypatch.setenv(CONNECTION_FILE_ENV, str(explicit))
    assert read_connection_file().cluster_id == "x"


def test_explicit_path_creates_private_parent(tmp_path: Path) -> None:
    path = write_connection_file(make_info(), tmp_path / "new" / "c.json")
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700


def test_atomic_replace(rt: Path) -> None:
    first = make_info("abc", controller_pid=1)
    path = write_connection_file(first)
    inode = path.stat().st_ino
    second = make_info("abc", controller_pid=2, engine_pids=(5,))
    assert write_connection_file(second) == path
    assert read_connection_file(path) == second
    assert path.stat().st_ino != inode  # a new file was renamed over the old one
    assert mode(path) == 0o600
    assert sorted(p.name for p in rt.iterdir()) == ["cluster-abc.json"]  # no temp files left


def test_failed_write_leaves_old_file_and_no_temp(rt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_connection_file(make_info("abc", controller_pid=1))

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(ConnectionFileError, match="disk on fire"):
        write_connection_file(make_info("abc", controller_pid=2))
    monkeypatch.undo()
    assert read_connection_file(path).controller_pid == 1
    assert [p.name for p in rt.iterdir()] == ["cluster-abc.json"]


def test_missing_file(rt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConnectionFileError, match="is the cluster running") as info:
        read_connection_file("nosuch")
    assert str(rt / "cluster-nosuch.json") in str(info.value)
    assert "fedpar cluster start" in str(info.value)
    with pytest.raises(ConnectionFileError, match="no connection file at"):
        read_connection_file(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"cluster_id": "x"}', "lacks field.*key"),
    ],
)
def test_corrupt_file(tmp_path: Path, content: str | bytes, pattern: str) -> None:
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConnectionFileError, match=pattern) as info:
        read_connection_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("key", "!!!not base64!!!", "not valid base64"),
        ("key", base64.b64encode(b"short").decode(), "at least 16"),
        ("key", 12, "'key' has the wrong type"),
        ("controller_pid", "12", "'controller_pid' has the wrong type"),
        ("controller_pid", True, "'controller_pid' has the wrong type"),
        ("created", None, "'created' has the wrong type"),
        ("engine_pids", [1, "2"], "engine_pids"),
        ("client_endpoint", None, "'client_endpoint' has the wrong type"),
    ],
)
def test_bad_fields(tmp_path: Path, field: str, value: object, pattern: str) -> None:
    path = write_connection_file(make_info(), tmp_path / "c.json")
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ConnectionFileError, match=pattern):
        read_connection_file(path)


def test_unknown_fields_are_tolerated_and_pids_optional(tmp_path: Path) -> None:
    info = make_info()
    path = write_connection_file(info, tmp_path / "c.json")
    data = json.loads(path.read_text())
    data["future_field"] = 1
    del data["engine_pids"]
    path.write_text(json.dumps(data))
    assert read_connection_file(path) == info


def test_warns_when_readable_by_others(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_connection_file(make_info(), tmp_path / "c.json")
    with caplog.at_level(logging.WARNING, logger="fedpar.runtime"):
        read_connection_file(path)
    assert not caplog.records
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="fedpar.runtime"):
        read_connection_file(path)
    assert any("readable by other users" in r.getMessage() for r in caplog.records)


def test_repr_hides_the_key() -> None:
    info = make_info()
    assert info.key.hex() not in repr(info)
    assert repr(info.key) not in repr(info)
    assert "<hidden>" in repr(info)


def test_remove_connection_file(rt: Path) -> None:
    path = write_connection_file(make_info())
    remove_connection_file(path)
    assert not path.exists()
    remove_connection_file(path)  # missing is fine
    remove_connection_file(str(path))


HOLD_LOCK = """
import sys, time
from pathlib import Path
from fedpar.runtime import lock_state_dir
lock = lock_state_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def _holder(tmp_path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.timeout(30)
def test_state_dir_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    assert state_dir_holder(tmp_path) is None
    proc = _holder(tmp_path)
    try:
        assert state_dir_holder(tmp_path) == proc.pid
        with pytest.raises(ClusterError, match=f"in use by controller pid {proc.pid}"):
            lock_state_dir(tmp_path)
        with pytest.raises(ClusterError, match="one controller per state directory"):
            check_state_dir_free(tmp_path, wait=0.2)
    finally:
        proc.kill()  # SIGKILL: no clean-up code runs, the kernel drops the lock
        proc.wait(10)
    assert state_dir_holder(tmp_path) is None
    lock = lock_state_dir(tmp_path)
    try:
        assert state_dir_holder(tmp_path) == os.getpid()
    finally:
        lock.close()


@pytest.mark.timeout(30)
def test_state_dir_lock_waits_for_a_holder_that_is_exiting(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    threading.Timer(0.5, proc.kill).start()
    try:
        lock = lock_state_dir(tmp_path, wait=10.0)
    finally:
        proc.kill()
        proc.wait(10)
    lock.close()


def test_key_file_is_made_once_private_and_shared_by_racing_processes(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cluster.key"
    with pytest.raises(ConfigError, match="cannot read"):
        key_file(path)  # (only ``create`` makes one)
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda: got.append(key_file(path, create=True))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1 and len(got[0]) == 32  # every racer reads the winner's key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["cluster.key"]  # no temporary left
    assert key_file(path, create=True) == got[0]  # kept, not replaced
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="other users could read it"):
        key_file(path)
