"""fedpar demo: start a local cluster from this script, run real work on it, stop it.

    python examples/demo.py [n_engines]
"""

import os
import random
import socket
import sys
import time

import fedpar


def sample_pi(n: int, seed: int) -> int:
    """Count random points of the unit square that fall inside the quarter circle."""
    rng = random.Random(seed)
    return sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(n))


def where() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    t0 = time.perf_counter()
    with fedpar.Cluster(n=n) as client:
        print(f"cluster up with engines {client.ids} in {time.perf_counter() - t0:.2f}s")
        dview, lview = client[:], client.load_balanced_view()

        for eid, w in zip(client.ids, dview.apply_sync(where), strict=True):
            print(f"  engine {eid}: {w}")

        per_task, tasks = 200_000, 4 * n
        t = time.perf_counter()
        hits = lview.map_sync(sample_pi, [per_task] * tasks, range(tasks))
        print(f"pi ~ {4 * sum(hits) / (per_task * tasks):.5f} from {per_task * tasks:,} samples "
              f"in {time.perf_counter() - t:.2f}s on {n} engines")

        dview.scatter("chunk", list(range(1, 101)), block=True)
        dview.execute("partial = sum(x * x for x in chunk)", block=True)
        print(f"sum of squares 1..100 = {sum(dview['partial'])} (partial sums {dview['partial']})")

        t = time.perf_counter()
        ars = [lview.apply_async(pow, i, 2) for i in range(5000)]
        squares = [ar.get() for ar in ars]
        dt = time.perf_counter() - t
        print(f"5,000 single tasks: {5000 / dt:,.0f} tasks/s; last result {squares[-1]}")

        try:
            lview.apply_sync(lambda: 1 / 0)
        except fedpar.RemoteError as exc:
            print(f"remote failure comes back as data: {exc.ename}: {exc.evalue} (engine {exc.engine_id})")

        first_id = ars[0].task_ids[0]
        print(f"stored result of task {first_id}: {client.get_result(first_id).get()}")
        st = client.status()
        print(f"controller: {st['done']} tasks done, {st['failed']} failed, queue depth {st['queued']}")
    print("cluster stopped; all engine and controller processes exited")


if __name__ == "__main__":
    main()
