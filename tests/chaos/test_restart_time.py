"""How long a controller holding N stored results takes to come back after SIGKILL.

Measured (and printed), asserted only against a generous sanity bound. N is 20,000 in the default suite;
set ``FEDPAR_CHAOS_RESTART_N=100000`` for the figure the issue asks for.
"""

from __future__ import annotations

import os
import random
import time

import pytest
from chaosutil import Proc

import fedpar

N = int(os.environ.get("FEDPAR_CHAOS_RESTART_N", "20000"))
CHUNK = 2000


def square(x: int) -> int:
    return x * x


@pytest.mark.timeout(240)
def test_restart_time_with_many_stored_results(procs: Proc) -> None:
    client = procs.cluster(2)
    view = client.load_balanced_view()
    t0 = time.monotonic()
    ids: list[str] = []
    for start in range(0, N, CHUNK):  # one task (one stored result) per element, in chunks of submissions
        ars = [view.apply_async(square, i) for i in range(start, min(start + CHUNK, N))]
        for ar in ars:
            ar.wait(120)
        ids.extend(ar.task_ids[0] for ar in ars)
    fill_time = time.monotonic() - t0
    assert client.status()["done"] == N
    store_mb = sum(f.stat().st_size for f in (procs.state / "store").iterdir()) / 1e6
    old = random.Random(1).sample(range(N), 20)

    # SIGKILL, restart on the same state dir, then time until an old result is served again
    t_kill = time.monotonic()
    procs.kill_controller()
    procs.start_controller()
    t_up = time.monotonic() - t_kill  # process started, store opened, recovered, connection file published
    assert client.get_result(ids[old[0]], block=True, timeout=60) == old[0] ** 2
    t_client = time.monotonic() - t_kill  # the existing client reconnected and got an answer
    t1 = time.monotonic()
    with fedpar.Client(procs.conn, timeout=30) as fresh:
        assert fresh.get_result(ids[old[1]], block=True, timeout=60) == old[1] ** 2
    t_fresh = time.monotonic() - t1
    assert client.get_result([ids[i] for i in old], block=True, timeout=60) == [i * i for i in old]
    print(f"\n[restart] {N} stored results ({store_mb:.1f} MB store, filled in {fill_time:.1f}s): "
          f"SIGKILL -> controller serving {t_up:.2f}s; -> get_result answered on the existing client "
          f"{t_client:.2f}s; fresh client connect + get_result {t_fresh:.2f}s")
    assert t_client < 30
