"""``fedpar.Cluster`` starts and, whatever happens to the script that owns it, stops every process."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from procutil import assert_no_procs, cluster_pids, pid_gone, read_json_line

import fedpar

CHILD_SCRIPT = """
import json, os, sys, time
import fedpar

c = fedpar.Cluster(n=2)
with c as client:
    assert client.load_balanced_view().apply_sync(os.getpid) in c.engine_pids
    print(json.dumps([c.controller_pid, *c.engine_pids]), flush=True)
    time.sleep(60)
print("not reached", flush=True)
"""


@pytest.fixture
def child_script(tmp_path):
    path = tmp_path / "fedpar_child_cluster.py"
    path.write_text(textwrap.dedent(CHILD_SCRIPT))
    return path


def start_child(procs, script, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the child's cluster state dir lands in tmp_path
    proc = procs.popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env,
                       start_new_session=True)  # keep terminal signals meant for pytest away from it
    pids = read_json_line(proc, timeout=40)
    assert isinstance(pids, list) and len(pids) == 3
    procs.add(*pids)
    assert not any(pid_gone(p) for p in pids)
    return proc, pids


@pytest.mark.timeout(60)
def test_with_block_normal_exit_stops_everything(procs, tmp_path):
    c = fedpar.Cluster(n=2, log_dir=tmp_path / "logs")
    with c as client:
        pids = cluster_pids(c)
        procs.add(*pids)
        assert len(pids) == 3
        assert sorted(client.ids) == client.ids and len(client.ids) == 2
        assert sorted(client[:].apply_sync(os.getpid)) == sorted(c.engine_pids)
        assert c.connection_file.exists()
        assert "running" in repr(c)
    assert_no_procs(pids, timeout=10)
    assert c.pids() == []
    assert not c.connection_file.exists()
    assert not c.state_dir.exists()  # its own temporary state dir is removed
    assert "stopped" in repr(c)


@pytest.mark.timeout(60)
def test_with_block_exception_stops_everything(procs, tmp_path):
    c = fedpar.Cluster(n=2, log_dir=tmp_path / "logs")
    pids: list[int] = []

    class Boom(Exception):
        pass

    with pytest.raises(Boom, match="from the body"), c as client:
        pids = cluster_pids(c)
        procs.add(*pids)
        client.load_balanced_view().apply_sync(os.getpid)
        raise Boom("from the body")
    assert len(pids) == 3
    assert_no_procs(pids, timeout=10)


@pytest.mark.timeout(60)
def test_ctrl_c_in_owner_script_stops_everything(procs, child_script, tmp_path):
    proc, pids = start_child(procs, child_script, tmp_path)
    os.kill(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail("the script did not exit within 15s of Ctrl-C")
    assert code != 0  # KeyboardInterrupt propagated out of the with block
    assert_no_procs(pids, timeout=15)
    assert proc.stdout is not None and b"not reached" not in proc.stdout.read()


@pytest.mark.timeout(60)
def test_owner_script_killed_stops_everything(procs, child_script, tmp_path):
    """SIGKILL leaves no chance to clean up: the controller's parent watch must stop the controller,
    and the controller stops its engines on the way out."""
    proc, pids = start_child(procs, child_script, tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(5)  # reap it, so its pid is really gone for the parent watch
    t0 = time.monotonic()
    assert_no_procs(pids, timeout=40)
    took = time.monotonic() - t0
    # The housekeeper checks the parent every second and engines are told to stop, so a few seconds;
    # (engines alone would only notice after [engines] controller_timeout = 30 s).
    assert took < 10, f"cluster took {took:.1f}s to stop after its owner was killed"


@pytest.mark.timeout(60)
def test_stop_twice_and_restart_refused(procs, tmp_path):
    c = fedpar.Cluster(n=1, log_dir=tmp_path / "logs")
    c.start()
    procs.add(*cluster_pids(c))
    with pytest.raises(fedpar.ClusterError):
        c.start()
    assert c.wait_for_engines(1, timeout=30) == [0]
    pids = cluster_pids(c)
    procs.add(*pids)
    c.stop()
    c.stop()  # second stop is a no-op
    assert_no_procs(pids, timeout=10)
    with pytest.raises(fedpar.ClusterError):
        c.add_engines(1)
    assert c.pids() == []


@pytest.mark.timeout(60)
def test_stop_before_start_is_safe(tmp_path):
    c = fedpar.Cluster(n=1, state_dir=tmp_path / "state")
    c.stop()
    assert c.pids() == []


@pytest.mark.timeout(60)
def test_add_engines(procs, tmp_path):
    c = fedpar.Cluster(n=2, log_dir=tmp_path / "logs")
    try:
        c.start()
        procs.add(*cluster_pids(c))
        assert len(c.wait_for_engines(2, timeout=30)) == 2
        new = c.add_engines(1)
        procs.add(*new)
        assert len(new) == 1 and new[0] in c.engine_pids
        ids = c.wait_for_engines(3, timeout=30)
        assert len(ids) == 3
        with c.connect_client() as client:
            client.wait_for_engines(3, timeout=30)
            assert sorted(client[:].apply_sync(os.getpid)) == sorted(c.engine_pids)
            assert len(client.status()["engines"]) == 3
        pids = cluster_pids(c)
        assert len(pids) == 4
    finally:
        c.stop()
    assert_no_procs(pids, timeout=10)


@pytest.mark.timeout(60)
def test_state_dir_keeps_results_across_clusters(procs, tmp_path):
    """With a state_dir of its own, a second cluster on it serves results computed by the first."""
    state = tmp_path / "state"
    c1 = fedpar.Cluster(n=1, state_dir=state, log_dir=tmp_path / "logs1")
    with c1 as client:
        procs.add(*cluster_pids(c1))
        ar = client.load_balanced_view().apply_async(lambda: "kept")
        assert ar.get(10) == "kept"
        tid = ar.task_ids[0]
    assert state.exists()  # not removed: it is the user's
    c2 = fedpar.Cluster(n=0, state_dir=state, log_dir=tmp_path / "logs2")
    with c2 as client:
        procs.add(*cluster_pids(c2))
        assert client.get_result(tid, block=True, timeout=10) == "kept"



@pytest.mark.timeout(60)
def test_second_cluster_on_a_busy_state_dir_is_refused(procs, tmp_path):
    """One controller per state directory: a second would recover the first one's unfinished tasks as its own
    and run them again. It is refused with a ClusterError naming the holder; the first keeps working."""
    state = tmp_path / "state"
    c1 = fedpar.Cluster(n=1, state_dir=state, log_dir=tmp_path / "logs1")
    with c1 as client:
        procs.add(*cluster_pids(c1))
        c2 = fedpar.Cluster(n=1, state_dir=state, log_dir=tmp_path / "logs2")
        with pytest.raises(fedpar.ClusterError, match=f"in use by controller pid {c1.controller_pid}"):
            c2.start()
        assert c2.controller_pid is None  # nothing was started
        assert client.load_balanced_view().apply_sync(lambda: 41 + 1) == 42
    c3 = fedpar.Cluster(n=0, state_dir=state, log_dir=tmp_path / "logs3")  # free again once c1 stopped
    with c3:
        procs.add(*cluster_pids(c3))


ATEXIT_SCRIPT = """
import json, sys
import fedpar

c = fedpar.Cluster(n=1)
c.start()
c.wait_for_engines(1, timeout=30)
print(json.dumps([c.controller_pid, *c.engine_pids]), flush=True)
sys.stdin.readline()
if sys.argv[1] == "raise":
    raise RuntimeError("script failed without stopping its cluster")
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["exit", "raise"])
def test_script_that_never_stops_its_cluster(procs, tmp_path, how):
    """The atexit hook stops a cluster whose script ends (normally or by an exception) without stop()."""
    script = tmp_path / "fedpar_child_atexit.py"
    script.write_text(ATEXIT_SCRIPT)
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = procs.popen([sys.executable, str(script), how], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=env, start_new_session=True)
    pids = read_json_line(proc, timeout=40)
    procs.add(*pids)
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    code = proc.wait(20)
    assert (code == 0) == (how == "exit")
    assert_no_procs(pids, timeout=10)


@pytest.mark.timeout(60)
def test_close_does_not_wait_for_a_silent_controller(procs, tmp_path, caplog):
    """With the controller stopped (SIGSTOP), ``close()`` gives up on confirming the submissions after a few
    seconds of silence, says so, and fails what was pending; it neither hangs nor waits its whole timeout."""
    c = fedpar.Cluster(n=1, log_dir=tmp_path / "logs")
    try:
        client = c.start_and_connect()
        procs.add(*cluster_pids(c))
        ctrl = c.pids()[0]
        os.kill(ctrl, signal.SIGSTOP)
        try:
            ar = client.load_balanced_view().apply_async(len, b"abc")
            t0 = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="fedpar.client.client"):
                client.close(timeout=30)
            took = time.monotonic() - t0
        finally:
            os.kill(ctrl, signal.SIGCONT)
        assert 2 < took < 15, took
        assert ar.done()
        with pytest.raises(fedpar.ControllerUnavailable):
            ar.get(timeout=1)
        assert "has not confirmed" in caplog.text and "silent" in caplog.text
    finally:
        c.stop()
