"""Simulated engines: one process speaks fedpar's engine protocol for many engines (``engines_10k``).

``python -m benchmarks.simengines --count N --endpoints EP[,EP...] --status FILE`` (the cluster key in hex
on stdin) registers ``N`` engines with the controllers behind the engine endpoints and keeps them alive:

* each simulated engine has ONE DEALER socket, identity ``t:<uuid>``, used for tasks and heartbeats alike
  (the controller records the control identity from the socket heartbeats come from), so an engine costs
  one zmq socket: its mailbox fd plus one TCP connection (2 fds, see :data:`FDS_PER_ENGINE`);
* registration: ``EngineHello(engine_id=-1)`` to one controller (engines are spread over the endpoints
  round robin); a welcome with ``move_to`` is followed to the named controller (``redirected=True``), as the
  real engine does; at most ``--window`` registrations are in flight per process;
* a heartbeat per engine every ``--heartbeat`` seconds, spread evenly over the period; a heartbeat answer
  of -1 ("unknown engine") makes it register again; ``EngineMove`` moves it; ``EngineStop`` ends it;
* ``Tasks`` are answered at once with no-op results (``None``; a list of ``None`` per element for a map
  chunk), so a small map through the load-balanced view shows the engines work.

Everything sent is signed and sequenced like a real engine's (one ``Codec`` per engine). To keep the load
generator light on a small machine, heartbeat answers and membership pushes are read without checking their
MAC (``--verify`` checks every message); welcomes, moves, tasks and stops are always fully decoded.

The sockets are watched with epoll on their ``ZMQ_FD``\\s (a poll over thousands of zmq sockets would cost
O(sockets) per call): a ready fd means "look at ``ZMQ_EVENTS``", and ``ZMQ_EVENTS`` is read again after
every send on that socket, because a send may consume the wake-up of a message that arrived meanwhile.

The process writes its counters to ``--status`` (JSON, atomically, about twice a second and at exit) and
exits on SIGTERM/SIGINT or when ``--parent-pid`` is gone. :class:`SimFleet` starts and stops such processes
by pid from the benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: File descriptors one simulated engine costs: the DEALER's mailbox (eventfd) and its TCP connection
#: (measured with libzmq 4.3.5: 2.0 per engine at steady state; a redirect briefly holds a second connection).
FDS_PER_ENGINE = 2
#: Descriptors kept free per process for everything else (interpreter, epoll, zmq's own, status file).
FD_RESERVE = 256
#: Seconds a registration may wait for its welcome before the hello is sent again.
HELLO_RETRY_S = 10.0
#: Seconds between two writes of the status file.
STATUS_EVERY_S = 0.5
#: Upper edges (ms) of the heartbeat round-trip histogram buckets; a last bucket holds everything above.
LATENCY_EDGES_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

ROOT = Path(__file__).resolve().parent.parent


# -- planning (pure) -------------------------------------------------------------------------------


def plan_processes(count: int, per_process: int, fd_limit: int, fds_per_engine: int = FDS_PER_ENGINE,
                   reserve: int = FD_RESERVE) -> list[int]:
    """How many engines each simulator process runs: at most ``per_process``, and no more than the
    descriptor limit allows (``fd_limit - reserve`` over ``fds_per_engine``); as even as possible."""
    if count <= 0:
        return []
    fit = (fd_limit - reserve) // max(1, fds_per_engine)
    if fit < 1:
        raise ValueError(f"a descriptor limit of {fd_limit} leaves no room for a simulated engine")
    cap = max(1, min(per_process, fit))
    nproc = math.ceil(count / cap)
    base, extra = divmod(count, nproc)
    return [base + (1 if i < extra else 0) for i in range(nproc)]


def heartbeats_due(elapsed: float, period: float, engines: int, sent: int) -> int:
    """Heartbeats to send now so that ``engines`` engines each get one per ``period`` seconds, evenly
    spread (``sent``: sent so far since the schedule started ``elapsed`` seconds ago)."""
    if engines <= 0 or period <= 0:
        return 0
    return max(0, int(elapsed / period * engines) - sent)


def bucket_of(ms: float, edges: Sequence[float] = LATENCY_EDGES_MS) -> int:
    """Index of the histogram bucket holding ``ms`` (the first edge at or above it; ``len(edges)`` above all)."""
    for i, edge in enumerate(edges):
        if ms <= edge:
            return i
    return len(edges)


def bucket_percentile(counts: Sequence[int], q: float, edges: Sequence[float] = LATENCY_EDGES_MS) -> float | None:
    """The ``q``-th percentile (0-100) of a histogram, as the upper edge of the bucket it falls in (an upper
    bound; ``inf`` in the open last bucket). ``None`` for an empty histogram."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q / 100.0 * total
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if n and seen >= rank:
            return float(edges[i]) if i < len(edges) else math.inf
    return math.inf


def sum_statuses(statuses: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counters of several status documents summed (lists of numbers element by element); ``registered``
    and ``fds`` summed too."""
    out: dict[str, Any] = {"registered": 0, "fds": 0}
    for st in statuses:
        out["registered"] += int(st.get("registered", 0))
        out["fds"] += max(0, int(st.get("fds", 0)))
        for k, v in st.get("counters", {}).items():
            if isinstance(v, bool):
                continue
            if isinstance(v, int):
                out[k] = out.get(k, 0) + v
            elif isinstance(v, list) and all(isinstance(x, int) for x in v):
                have = out.get(k) or [0] * len(v)
                out[k] = [a + b for a, b in zip(have, v, strict=False)] + have[len(v):] + v[len(have):]
    return out


def diff_counters(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``after - before`` for every counter (lists element by element) present in ``after``."""
    out: dict[str, Any] = {}
    for k, v in after.items():
        b = before.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            out[k] = v - (b if isinstance(b, int) else 0)
        elif isinstance(v, list):
            bl = b if isinstance(b, list) else []
            out[k] = [x - (bl[i] if i < len(bl) else 0) for i, x in enumerate(v)]
    return out


def rate(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]], key: str) -> float | None:
    """Counter ``key`` per second, summed over the processes, each over the time between its own two status
    writes (a status file lags by up to ``STATUS_EVERY_S``: the caller's clock would skew short windows).
    None when no process wrote twice."""
    total, seen = 0.0, False
    for a, b in zip(before, after, strict=False):
        dt = float(b.get("written", 0.0)) - float(a.get("written", 0.0))
        if dt <= 0:
            continue
        seen = True
        total += (b.get("counters", {}).get(key, 0) - a.get("counters", {}).get(key, 0)) / dt
    return total if seen else None


# -- the simulator process -------------------------------------------------------------------------


@dataclass
class SimEngine:
    """One simulated engine's state."""

    index: int
    uuid: str
    ident: bytes
    codec: Any  # fedpar.wire.codec.Codec
    sock: Any = None  # zmq.Socket
    fd: int = -1
    engine_id: int = -1
    state: str = "new"  # new -> hello -> up (-> moving -> up) -> stopped
    home: str = ""  # id of the controller it is registered with
    epoch: int = 0
    hello_at: float = 0.0
    hb_at: float = 0.0  # when the heartbeat now awaiting its answer was sent (0: none awaited)
    registered_once: bool = False


@dataclass
class Counters:
    """What a simulator process reports (see :meth:`Simulator.status`)."""

    hellos: int = 0
    hello_retries: int = 0
    welcomes: int = 0
    redirects: int = 0
    moves: int = 0
    reregistrations: int = 0
    heartbeats_sent: int = 0
    heartbeat_acks: int = 0
    heartbeats_skipped: int = 0  # due while this process was stalled for more than a whole period
    unknown_acks: int = 0
    memberships: int = 0
    task_batches: int = 0
    tasks: int = 0
    stopped: int = 0
    bad_messages: int = 0
    other: int = 0
    errors: list[str] = field(default_factory=list)
    latency_ms: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))
    loop_ms: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))  # turns of the loop


class Simulator:
    """Many simulated engines in one process (see the module docstring)."""

    def __init__(self, key: bytes, endpoints: Sequence[str], count: int, *, first: int = 0, heartbeat: float = 1.0,
                 window: int = 1000, verify: bool = False, status_path: Path | None = None,
                 parent_pid: int | None = None) -> None:
        import zmq

        from fedpar.wire.payload import dumps_result

        self.zmq = zmq
        self.key = key
        self.endpoints = list(endpoints)
        self.count = count
        self.first = first
        self.heartbeat = heartbeat
        self.window = max(1, window)
        self.verify = verify
        self.status_path = status_path
        self.parent_pid = parent_pid
        self.ctx = zmq.Context(io_threads=1)
        self.ctx.max_sockets = count * 2 + FD_RESERVE
        self.sel = selectors.DefaultSelector()
        self.engines: list[SimEngine] = []
        self.todo: deque[int] = deque(range(count))
        self.c = Counters()
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.all_registered_s: float | None = None
        self.registered = 0
        self.running = True
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self._noop = dumps_result(None)
        self._hb_origin: float | None = None
        self._hb_sent_sched = 0
        self._hb_cursor = 0
        self._last_status = 0.0
        self._last_parent_check = 0.0

    # ------------------------------------------------------------------ sockets
    def _open(self, eng: SimEngine, endpoint: str) -> None:
        from fedpar.wire.transport import connect_dealer

        self._close(eng)
        sock = connect_dealer(self.ctx, endpoint, eng.ident)
        eng.sock = sock
        eng.fd = int(sock.getsockopt(self.zmq.FD))
        self.sel.register(eng.fd, selectors.EVENT_READ, eng)

    def _close(self, eng: SimEngine) -> None:
        if eng.sock is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(eng.fd)
        eng.sock.close(0)
        eng.sock, eng.fd = None, -1

    def _send(self, eng: SimEngine, msg: Any, frames: Sequence[Any] = ()) -> None:
        from fedpar.wire.transport import send_parts

        if eng.sock is None:
            return
        send_parts(eng.sock, eng.codec.encode(msg, frames)[0])
        self._drain(eng)  # (a send may have consumed the fd's wake-up for a message that arrived meanwhile)

    def _hello(self, eng: SimEngine, *, origin: list[Any] | None = None, redirected: bool = False) -> None:
        from fedpar.wire.protocol import EngineHello

        eng.hello_at = time.monotonic()
        self.c.hellos += 1
        self._send(eng, EngineHello(eng.uuid, self.hostname, self.pid, eng.ident, [], eng.engine_id, origin or [],
                                    redirected))

    # ------------------------------------------------------------------ receiving
    def _drain(self, eng: SimEngine) -> None:
        from fedpar.wire.transport import NOBLOCK, recv_parts

        zmq = self.zmq
        for _ in range(256):
            sock = eng.sock
            if sock is None or not (int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN):
                return
            try:
                parts = recv_parts(sock, NOBLOCK)
            except zmq.Again:
                return
            self._on_message(eng, parts)

    def _on_message(self, eng: SimEngine, parts: list[Any]) -> None:
        import msgpack

        from fedpar.errors import ProtocolError

        kind = None
        if not self.verify and len(parts) >= 3:
            try:
                head = msgpack.unpackb(parts[2], raw=False, strict_map_key=True)
                kind = head.get("kind") if isinstance(head, dict) else None
            except Exception:
                kind = None
            if kind == "heartbeat":
                self._on_heartbeat(eng, head.get("engine_id"))
                return
            if kind == "membership":
                self.c.memberships += 1
                return
        try:
            rx = eng.codec.decode(parts)
        except ProtocolError as exc:
            self.c.bad_messages += 1
            if len(self.c.errors) < 10:
                self.c.errors.append(f"engine {eng.engine_id}: {type(exc).__name__}: {exc}")
            return
        self._on_decoded(eng, rx)

    def _on_decoded(self, eng: SimEngine, rx: Any) -> None:
        from fedpar.wire.protocol import EngineMove, EngineStop, EngineWelcome, Heartbeat, Membership, Tasks

        msg = rx.msg
        if isinstance(msg, Heartbeat):
            self._on_heartbeat(eng, msg.engine_id)
        elif isinstance(msg, EngineWelcome):
            self._on_welcome(eng, msg, rx.envelope.epoch)
        elif isinstance(msg, Tasks):
            self._on_tasks(eng, msg, rx.frames)
        elif isinstance(msg, EngineMove):
            self.c.moves += 1
            origin = [eng.home, eng.epoch]
            eng.state = "moving"
            self._open(eng, msg.endpoint)
            self._hello(eng, origin=origin, redirected=True)
        elif isinstance(msg, Membership):
            self.c.memberships += 1
        elif isinstance(msg, EngineStop):
            self.c.stopped += 1
            eng.state = "stopped"
            self._close(eng)
        else:
            self.c.other += 1

    def _on_heartbeat(self, eng: SimEngine, engine_id: Any) -> None:
        if eng.hb_at:
            self.c.latency_ms[bucket_of((time.monotonic() - eng.hb_at) * 1000.0)] += 1
            eng.hb_at = 0.0
        if engine_id == -1 and eng.state == "up":  # the controller does not know us (restarted): register again
            self.c.unknown_acks += 1
            self.c.reregistrations += 1
            eng.state = "hello"
            self._hello(eng, origin=[eng.home, eng.epoch], redirected=True)
            return
        self.c.heartbeat_acks += 1

    def _on_welcome(self, eng: SimEngine, msg: Any, epoch: int) -> None:
        self.c.welcomes += 1
        eng.engine_id = msg.engine_id
        if msg.move_to:  # placement: this engine belongs to another controller
            self.c.redirects += 1
            self._open(eng, msg.move_to[1])
            self._hello(eng, redirected=True)
            return
        eng.state, eng.home, eng.epoch = "up", msg.controller, epoch
        if not eng.registered_once:
            eng.registered_once = True
            self.registered += 1
            if self.registered == self.count:
                self.all_registered_s = time.monotonic() - self.started
        self._heartbeat(eng)  # at once, as the real engine's control thread does: the controller learns its socket

    def _heartbeat(self, eng: SimEngine) -> None:
        from fedpar.wire.protocol import Heartbeat

        self.c.heartbeats_sent += 1
        eng.hb_at = time.monotonic()
        self._send(eng, Heartbeat(eng.engine_id, ""))

    def _on_tasks(self, eng: SimEngine, msg: Any, frames: list[Any]) -> None:
        from fedpar.wire.payload import dumps_result, loads
        from fedpar.wire.protocol import Results, ResultSpec

        self.c.task_batches += 1
        out: list[ResultSpec] = []
        out_frames: list[Any] = []
        pos = 0
        for spec in msg.tasks:
            tframes = frames[pos:pos + spec.nframes]
            pos += spec.nframes
            started = time.time()
            rframes = self._noop
            if spec.op == "map" and len(tframes) > 1:  # a map chunk returns one value per element
                try:
                    seqs = loads(tframes[1:])
                    rframes = dumps_result([None] * min((len(s) for s in seqs), default=0))
                except Exception as exc:  # (not ours to debug: answer with an error result)
                    out.append(ResultSpec(spec.task_id, False, eng.engine_id, started, time.time(),
                                          [type(exc).__name__, str(exc), ""], 0))
                    continue
            out.append(ResultSpec(spec.task_id, True, eng.engine_id, started, time.time(), None, len(rframes)))
            out_frames.extend(rframes)
        self.c.tasks += len(out)
        self._send(eng, Results(out), out_frames)

    # ------------------------------------------------------------------ loop
    def _start_some(self, now: float) -> None:
        """Open sockets and send hellos for new engines, keeping at most ``window`` first registrations open."""
        from fedpar.wire.codec import Codec

        while self.todo and len(self.engines) - self.registered < self.window:
            i = self.todo.popleft()
            uid = uuidlib.uuid4().hex
            eng = SimEngine(i, uid, f"t:{uid}".encode(), Codec(self.key, f"engine:{uid}:t"))
            self.engines.append(eng)
            self._open(eng, self.endpoints[(self.first + i) % len(self.endpoints)])
            eng.state = "hello"
            self._hello(eng)

    def _retry_hellos(self, now: float) -> None:
        """Send a hello again when its welcome is long overdue. Only for engines that have an id: zmq delivers
        the first hello once connected, and a second one without an id would be given a second id."""
        for eng in self.engines:
            if eng.state in ("hello", "moving") and eng.engine_id >= 0 and now - eng.hello_at > HELLO_RETRY_S:
                self.c.hello_retries += 1
                self._hello(eng, redirected=True)

    def _heartbeats(self, now: float) -> None:
        up = self.engines
        if not up:
            return
        if self._hb_origin is None:
            self._hb_origin = now
        due = heartbeats_due(now - self._hb_origin, self.heartbeat, len(up), self._hb_sent_sched)
        if due > len(up):  # (stalled for over a period: every engine gets one now, the rest is skipped)
            self.c.heartbeats_skipped += due - len(up)
        for _ in range(min(due, len(up))):
            eng = up[self._hb_cursor % len(up)]
            self._hb_cursor += 1
            if eng.state == "up":
                self._heartbeat(eng)
        self._hb_sent_sched += due

    def status(self) -> dict[str, Any]:
        """The counters, as written to the status file."""
        try:
            fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            fds = -1
        states: dict[str, int] = {}
        for e in self.engines:
            states[e.state] = states.get(e.state, 0) + 1
        return {
            "pid": self.pid, "count": self.count, "first": self.first, "started": self.started_wall,
            "written": time.time(),
            "elapsed_s": time.monotonic() - self.started, "registered": self.registered,
            "all_registered_s": self.all_registered_s, "states": states, "fds": fds,
            "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0], "running": self.running,
            "counters": self.c.__dict__,
        }

    def _write_status(self) -> None:
        if self.status_path is None:
            return
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status()))
        tmp.replace(self.status_path)

    def _parent_gone(self) -> bool:
        if self.parent_pid is None:
            return False
        try:
            os.kill(self.parent_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def run(self) -> int:
        """Serve until stopped (SIGTERM/SIGINT, or the parent gone). Returns the exit code."""
        try:
            turn = time.monotonic()
            while self.running:
                now = time.monotonic()
                self.c.loop_ms[bucket_of((now - turn) * 1000.0)] += 1  # (how stalled this process was)
                turn = now
                if self.todo:
                    self._start_some(now)
                self._heartbeats(now)
                for key, _ in self.sel.select(0.01):
                    self._drain(key.data)
                now = time.monotonic()
                if now - self._last_status >= STATUS_EVERY_S:
                    self._last_status = now
                    self._retry_hellos(now)
                    self._write_status()
                if now - self._last_parent_check >= 1.0:
                    self._last_parent_check = now
                    if self._parent_gone():
                        self.running = False
        finally:
            self.running = False
            with contextlib.suppress(Exception):
                self._write_status()
            for eng in self.engines:
                if eng.sock is not None:
                    eng.sock.close(0)
            self.sel.close()
            self.ctx.term()
        return 0

    def stop(self, *_: Any) -> None:
        self.running = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simengines",
                                     description="Simulate many fedpar engines (the cluster key in hex on stdin).")
    parser.add_argument("--count", type=int, required=True, help="engines to simulate in this process")
    parser.add_argument("--endpoints", required=True, help="comma-separated engine endpoints of the controllers")
    parser.add_argument("--first", type=int, default=0, help="index of the first engine (spreads first contacts)")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="seconds between an engine's heartbeats")
    parser.add_argument("--window", type=int, default=1000, help="registrations in flight at most")
    parser.add_argument("--status", type=Path, default=None, help="JSON status file, rewritten about twice a second")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--verify", action="store_true", help="check the MAC of every message received")
    args = parser.parse_args(list(argv) if argv is not None else None)
    key = bytes.fromhex(sys.stdin.readline().strip())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.count * FDS_PER_ENGINE + FD_RESERVE
    if soft < need <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    elif need > hard:
        print(f"simengines: {args.count} engines need about {need} descriptors; the limit is {hard}", file=sys.stderr)
        return 2
    sim = Simulator(key, [e for e in args.endpoints.split(",") if e], args.count, first=args.first,
                    heartbeat=args.heartbeat, window=args.window, verify=args.verify, status_path=args.status,
                    parent_pid=args.parent_pid)
    signal.signal(signal.SIGTERM, sim.stop)
    signal.signal(signal.SIGINT, sim.stop)
    return sim.run()


# -- the benchmark's side: start, watch and stop simulator processes by pid --------------------------


@dataclass(frozen=True)
class SimTarget:
    """What the simulated engines need to join a cluster."""

    key: bytes
    engine_endpoints: tuple[str, ...]
    heartbeat: float


class SimFleet:
    """Simulator processes for ``count`` engines, started and stopped by pid (use as a context manager)."""

    def __init__(self, target: SimTarget, count: int, per_process: int, *, window: int = 1000,
                 verify: bool = False) -> None:
        self.target = target
        self.count = count
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.plan = plan_processes(count, per_process, self.fd_limit)
        self.window = window
        self.verify = verify
        self.dir = Path(tempfile.mkdtemp(prefix="fedpar-simengines-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = 0.0

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def status_path(self, i: int) -> Path:
        return self.dir / f"sim-{i}.json"

    def start(self) -> None:
        """Spawn every simulator process (returns at once; they register in the background)."""
        self.started = time.monotonic()
        first = 0
        for i, n in enumerate(self.plan):
            cmd = [sys.executable, "-m", "benchmarks.simengines", "--count", str(n), "--first", str(first),
                   "--endpoints", ",".join(self.target.engine_endpoints), "--heartbeat", str(self.target.heartbeat),
                   "--window", str(self.window), "--status", str(self.status_path(i)),
                   "--parent-pid", str(os.getpid())]
            if self.verify:
                cmd.append("--verify")
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE)
            assert proc.stdin is not None
            proc.stdin.write(self.target.key.hex().encode() + b"\n")
            proc.stdin.close()
            self.procs.append(proc)
            first += n

    def statuses(self) -> list[dict[str, Any]]:
        """The last status each process wrote (an empty dict for one that has not written yet)."""
        out: list[dict[str, Any]] = []
        for i in range(len(self.procs)):
            try:
                out.append(json.loads(self.status_path(i).read_text()))
            except (OSError, ValueError):
                out.append({})
        return out

    def totals(self) -> dict[str, Any]:
        """Counters summed over the processes (histograms bucket by bucket), plus ``registered`` and ``fds``."""
        return sum_statuses(self.statuses())

    def dead(self) -> list[tuple[int, int]]:
        """(pid, exit code) of the simulator processes that exited."""
        return [(p.pid, p.returncode) for p in self.procs if p.poll() is not None]

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM each process by pid, SIGKILL those still alive after ``grace`` seconds; reap all."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait(5)

    def cleanup(self) -> None:
        self.stop()
        for f in self.dir.glob("*"):
            with contextlib.suppress(OSError):
                f.unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()

    def __enter__(self) -> SimFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


if __name__ == "__main__":
    sys.exit(main())
