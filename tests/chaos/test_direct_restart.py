"""Direct streams across a controller restart (SIGKILL): the controller records a direct push without its
arguments (they stay with the client), so a restarted controller must re-dispatch it and the engine fetch
them from the client again."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from chaosutil import Proc

MiB = 1 << 20


def _wait(what: str, probe: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.timeout(120)
def test_direct_push_survives_a_controller_restart(procs: Proc) -> None:
    """A push to a busy engine (prefetch 1: the push waits in the controller's queue) goes direct:
    acknowledged at once, its arguments kept by the client. The controller is killed and restarted before
    the engine reaches it; the new controller re-queues the push from its store, the engine fetches the
    arguments from the client, and a direct pull brings the array back.

    (A task already *dispatched* to the engine when the controller dies is another matter, the same with or
    without direct streams: the engine drops what the dead controller sent, and with retries=0 the task
    fails with EngineError, see test_controller_kill.)"""
    procs.ini.write_text(procs.ini.read_text().replace("[engines]", "[engines]\nprefetch = 1")
                         + "\n[stream]\nthreshold = 1MiB\n")
    client = procs.cluster(1)
    eid = client.ids[0]
    view = client[eid]
    busy = view.apply_async(time.sleep, 3)
    a = np.arange(3 * MiB // 8 + 9, dtype=np.float64)
    ar = view.push({"x": a}, block=False)
    tid = ar.task_ids[0]
    io = client._io
    link = next(iter(io.links.values()))  # (one controller)
    _wait("the push to be acknowledged", lambda: tid in link.expected)
    assert io.transfers.direct is not None and io.transfers.direct.uploading(tid)
    epoch = link.epoch
    procs.restart_controller()
    _wait("the client to see the new controller", lambda: link.epoch != epoch, 30)
    assert ar.get(60) is None
    assert busy.get(60) is None
    got = view.pull("x", block=False).get(60)
    assert isinstance(got, np.ndarray) and np.array_equal(got, a)
    assert not io.transfers.direct.uploading(tid)
    # the pull went straight to the client (counted since the restart; reported once the client acknowledged it)
    _wait("the pull to be counted as delivered", lambda: client.status()["delivered_direct"] == 1, 10)
