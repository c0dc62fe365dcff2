"""A client's per-controller accounting: each load-balanced task takes one place of one link's capacity."""

from __future__ import annotations

import zmq

from fedpar.client.link import Link, Track
from fedpar.wire.protocol import TaskSpec


def link(capacity: int) -> Link:
    lk = Link("tcp://127.0.0.1:1", zmq.Context.instance().socket(zmq.DEALER))
    lk.ready, lk.capacity = True, capacity
    return lk


def test_a_task_counts_on_one_link_and_is_released_once() -> None:
    a, b = link(4), link(4)
    t = Track(TaskSpec("t1", "apply", None, 0, 0, {}), [])
    t.count_on(a)
    t.count_on(a)  # (sent again to the same controller after its restart: still one place)
    assert (a.lb_out, a.free) == (1, 3)
    t.count_on(b)  # (found in flight at another controller after a takeover)
    assert (a.lb_out, b.lb_out) == (0, 1)
    t.release()  # the result's head arrived ...
    t.release()  # ... and later the stream failed: no second decrement
    assert (a.lb_out, b.lb_out, b.free) == (0, 0, 4)
    for lk in (a, b):
        lk.sock.close(0)


def test_direct_tasks_take_no_capacity() -> None:
    a = link(2)
    t = Track(TaskSpec("t2", "apply", 3, 0, 0, {}), [])
    t.count_on(a)
    t.release()
    assert a.lb_out == 0 and a.free == 2
    a.sock.close(0)
