"""The engine process: runs tasks in its main thread; heartbeats and moves from a side thread.

The main thread owns the task socket and executes tasks straight from it (no thread hand-off per
task). While a batch of short tasks keeps arriving, results are sent back in batches too. The control
thread (``control``) owns a second socket for heartbeats, membership and moves, so ``EngineStop``,
liveness and re-homing stay responsive while user code runs; large payloads go through ``streams``.

Moving to another controller: the control thread connects a new task socket and raises the generation
under ``_epoch_lock``; the main thread switches to that socket at its next step, and drops any batch read
from the old one (it is not in the list of held tasks the new controller was given). A task batch is
either listed in a (re-)registration or never run.
"""

from __future__ import annotations

import _thread
import builtins
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid as uuidlib
from collections import OrderedDict, deque
from typing import Any

import zmq

from fedpar.engine.control import Control, Home
from fedpar.engine.streams import StreamIO
from fedpar.errors import ControllerUnavailable, ProtocolError, StreamError
from fedpar.federation.membership import View
from fedpar.federation.seeds import endpoints
from fedpar.runtime import ConnectionInfo
from fedpar.wire.codec import Codec
from fedpar.wire.direct import EngineLinks
from fedpar.wire.payload import FunctionCache, describe_exception, dumps, dumps_result, loads
from fedpar.wire.protocol import REGISTER_WAIT, EngineHello, EngineStop, EngineWelcome, Results, ResultSpec, Tasks
from fedpar.wire.streams import StreamSettings, should_stream
from fedpar.wire.transport import connect_dealer, readable, recv_parts, send_parts

log = logging.getLogger(__name__)

RESULT_BATCH = 64
RESULT_BATCH_SECONDS = 0.002
RECENT_RESULTS = 1024  # results kept after sending, to resend if the controller dies before storing them
RECENT_BYTES = 64 << 20


class Reference:
    """An argument that names a variable in the engine's namespace, resolved when the task runs."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"Reference({self.name!r})"


class Engine:
    """One engine: register, then run tasks until told to stop or no controller answers."""

    _sock: zmq.Socket[Any]

    def __init__(self, info: ConnectionInfo, *, controller_timeout: float = 30.0, replay_window: float = 300.0,
                 index: int | None = None):
        self.info = info
        self.index = index  # this engine's number in its launch: first contact round-robin (None: at random)
        self.controller_timeout = controller_timeout
        self.replay_window = replay_window
        self.uuid = uuidlib.uuid4().hex
        self.engine_id = -1
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self._functions = FunctionCache(rebind=self.namespace)
        self.stop_event = threading.Event()
        self._busy = False
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.task_ident = f"t:{self.uuid}".encode()
        self._holding: set[str] = set()  # task ids received whose results are not sent yet
        self._recent: OrderedDict[str, tuple[ResultSpec, list[Any]]] = OrderedDict()  # sent, kept a while
        self._recent_bytes = 0
        self._resend: deque[str] = deque()  # ids a re-registration asked for again
        self._dropped: set[str] = set()  # held tasks a new controller did not adopt: never run or report them
        self._epoch = 0  # incarnation of the controller this engine is registered with
        self._gen = 0  # raised by every move to another socket
        self._swap: tuple[zmq.Socket[Any], int] | None = None  # a new task socket for the main thread
        self._sock_gen = 0  # generation of the main thread's task socket ``_sock`` (set once registered)
        # Taken while the main thread checks a task batch's epoch and generation and records its ids as held,
        # and while the control thread raises either: a batch is listed in the next registration or never run.
        self._epoch_lock = threading.Lock()
        self.current = ""  # id of the task being executed (read by the heartbeat)
        self.moving = False  # registering with a new controller: results wait until it welcomes us
        self._deferred: list[tuple[list[ResultSpec], list[Any]]] = []  # results held back while moving
        self.view = View()  # the federation, as our controller last told us
        self._links = EngineLinks(self.ctx, f"d:{self.uuid}".encode())  # direct streams (fedpar.wire.direct)
        self.streams = StreamIO(self._links, self.stop_event.is_set, self._holding.discard, self._send_results)

    # ------------------------------------------------------------------ main thread
    def run(self, register_timeout: float = 30.0) -> int:
        """Serve until stopped. Returns the process exit code."""
        codec = Codec(self.info.key, f"engine:{self.uuid}:t", replay_window=self.replay_window)
        try:
            self._sock, home, heartbeat = self._register(codec, register_timeout)
            control = Control(self, home, heartbeat)
            threading.Thread(target=control.run, name="fedpar-engine-control", daemon=True).start()
            self._serve(self._sock, codec)
            return 0
        except ControllerUnavailable as exc:
            log.error("%s", exc)
            return 3
        finally:
            self.stop_event.set()
            self._links.close()
            with self._epoch_lock:
                swap, self._swap = self._swap, None
            for s in (getattr(self, "_sock", None), swap[0] if swap else None):
                if s is not None:
                    s.close(0)

    def _register(self, codec: Codec, timeout: float) -> tuple[zmq.Socket[Any], Home, float]:
        """Register with a controller (the one placement picks), trying each known endpoint in turn."""
        deadline = time.monotonic() + timeout
        candidates = endpoints(self.info, "engine")
        if self.index is None:  # (engines spread their first hello over the controllers: placement moves fewer)
            random.shuffle(candidates)
        else:
            k = self.index % len(candidates)
            candidates = candidates[k:] + candidates[:k]
        tried = 0
        endpoint = candidates[0]
        redirected = False
        while time.monotonic() < deadline:
            sock = connect_dealer(self.ctx, endpoint, self.task_ident)
            hello = EngineHello(self.uuid, socket.gethostname(), os.getpid(), self.task_ident, [], self.engine_id,
                                [], redirected)
            send_parts(sock, codec.encode(hello)[0])
            welcome: EngineWelcome | None = None
            epoch = 0
            if sock.poll(int(REGISTER_WAIT * 1000)):
                try:
                    rx = codec.decode(recv_parts(sock))
                except ProtocolError as exc:
                    sock.close(0)
                    raise ControllerUnavailable(f"controller answered with a bad message: {exc}") from exc
                if isinstance(rx.msg, EngineWelcome):
                    welcome, epoch = rx.msg, rx.envelope.epoch
            if welcome is None:
                sock.close(0)
                tried += 1
                endpoint = candidates[tried % len(candidates)]
                continue
            self.engine_id = welcome.engine_id
            if welcome.move_to:  # placement: this engine belongs to another controller
                sock.close(0)
                endpoint, redirected = welcome.move_to[1], True
                continue
            with self._epoch_lock:
                self._epoch = epoch
            self.streams.settings = StreamSettings.from_wire(welcome.stream)
            if welcome.membership:
                self.view = View.from_wire(welcome.membership)
            log.info("registered as engine %d with controller %s", self.engine_id, welcome.controller)
            return sock, Home(welcome.controller, epoch, endpoint), welcome.heartbeat
        raise ControllerUnavailable(f"no controller answered at {', '.join(candidates)} within {timeout:.0f}s")

    def _serve(self, sock: zmq.Socket[Any], codec: Codec) -> None:
        results: list[ResultSpec] = []
        frames: list[Any] = []
        first_pending = 0.0
        self._sock = sock
        self._sock_gen = self._gen
        backlog = self.streams.backlog
        while not self.stop_event.is_set():
            if self._swap is not None:  # moved to another controller: continue on the new socket
                self._take_swap()
            if self._deferred and not self.moving:
                deferred, self._deferred = self._deferred, []
                for held_results, held_frames in deferred:
                    self._send_results(self._sock, codec, held_results, held_frames)
            sock, gen = self._sock, self._sock_gen
            if self._resend:
                self._resend_results(sock, codec)
            if backlog:
                rx = backlog.popleft()
            else:
                if not (readable(sock) or (not results and sock.poll(200))):
                    if results:
                        self._send_results(sock, codec, results, frames)
                        results, frames = [], []
                    continue
                try:
                    rx = codec.decode(recv_parts(sock))
                except ProtocolError as exc:
                    log.warning("dropped a bad message on the task socket: %s", exc)
                    continue
            if isinstance(rx.msg, EngineStop):
                break
            if not isinstance(rx.msg, Tasks):
                continue
            with self._epoch_lock:
                stale = gen != self._gen or rx.envelope.epoch < self._epoch
                if not stale:
                    self._holding.update(spec.task_id for spec in rx.msg.tasks)
            if stale:
                # Sent by a controller we left (or one that died before we read it): we registered again since
                # without listing these tasks, so they were retried or resubmitted elsewhere: never run them.
                log.info("dropping %d task(s) from a controller this engine no longer serves", len(rx.msg.tasks))
                continue
            if not results:
                first_pending = time.monotonic()
            pos = 0
            for spec in rx.msg.tasks:
                tframes = rx.frames[pos:pos + spec.nframes]
                pos += spec.nframes
                if self._dropped and spec.task_id in self._dropped:
                    self._forget(spec.task_id)
                    continue
                head = spec.spec.get("stream")
                if head is not None:  # large arguments: received into their final memory first
                    try:
                        tframes = self.streams.receive_args(sock, codec, head, spec.spec)
                    except StreamError as exc:
                        now = time.time()
                        results.append(ResultSpec(spec.task_id, False, self.engine_id, now, now,
                                                  [f"fedpar.{type(exc).__name__}", str(exc), ""], 0))
                        continue
                res, rframes = self._run_task(spec.task_id, spec.op, spec.spec, tframes)
                if should_stream(rframes, self.streams.settings.threshold):  # a large result: sent as a stream
                    if results:
                        self._send_results(sock, codec, results, frames)
                        results, frames = [], []
                    direct = self._links.socket_for(spec.spec) if spec.op == "pull" else None
                    self._await_welcome()
                    self.streams.stream_result(self._take_swap(), codec, res, rframes, direct)
                    continue
                results.append(res)
                frames.extend(rframes)
            if len(results) >= RESULT_BATCH or time.monotonic() - first_pending > RESULT_BATCH_SECONDS:
                self._send_results(sock, codec, results, frames)
                results, frames = [], []
        if results:
            self._send_results(self._sock, codec, results, frames)

    def _take_swap(self) -> zmq.Socket[Any]:
        """The task socket to use now: the new one if the control thread prepared a move (main thread)."""
        if self._swap is not None:
            with self._epoch_lock:
                swap, self._swap = self._swap, None
            if swap is not None:
                self._sock.close(0)
                self._sock, self._sock_gen = swap
                self.streams.backlog.clear()
        return self._sock

    def _await_welcome(self) -> None:
        """While moving, wait for the new controller's welcome (a large result streamed to a controller that
        does not know its task yet would be refused as a duplicate)."""
        deadline = time.monotonic() + self.controller_timeout
        while self.moving and not self.stop_event.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _forget(self, task_id: str) -> None:
        self._dropped.discard(task_id)
        self._holding.discard(task_id)

    def _send_results(self, sock: zmq.Socket[Any], codec: Codec, results: list[ResultSpec], frames: list[Any]) -> None:
        if self.moving:  # a controller that has not welcomed us would drop them as unknown: later
            self._deferred.append((results, frames))
            return
        if self._swap is not None and sock is self._sock:  # (moving: results go to the new controller)
            sock = self._take_swap()
        if self._dropped:  # (results of tasks a new controller did not adopt: nobody may count them)
            keep = [i for i, r in enumerate(results) if r.task_id not in self._dropped]
            if len(keep) != len(results):
                offsets = [0]
                for r in results:
                    offsets.append(offsets[-1] + r.nframes)
                for r in results:
                    if r.task_id in self._dropped:
                        self._forget(r.task_id)
                frames = [f for i in keep for f in frames[offsets[i]:offsets[i + 1]]]
                results = [results[i] for i in keep]
                if not results:
                    return
        parts, _ = codec.encode(Results(results), frames)
        send_parts(sock, parts)
        pos = 0
        recent = self._recent
        for r in results:
            fr = frames[pos:pos + r.nframes]
            pos += r.nframes
            recent[r.task_id] = (r, fr)
            self._recent_bytes += sum(len(f) for f in fr)
            self._holding.discard(r.task_id)
        while recent and (len(recent) > RECENT_RESULTS or self._recent_bytes > RECENT_BYTES):
            _, (_, fr) = recent.popitem(last=False)
            self._recent_bytes -= sum(len(f) for f in fr)

    def _resend_results(self, sock: zmq.Socket[Any], codec: Codec) -> None:
        """Send again the results a (new or restarted) controller asked for. One this engine no longer holds
        nor remembers (sent as a stream, or pushed out of the recent window) is reported unavailable, so the
        controller does not wait for it for ever."""
        again: list[ResultSpec] = []
        frames: list[Any] = []
        while self._resend:
            tid = self._resend.popleft()
            got = self._recent.get(tid)
            if got is not None:
                again.append(got[0])
                frames.extend(got[1])
            elif tid not in self._holding:
                now = time.time()
                again.append(ResultSpec(tid, False, self.engine_id, None, now, [
                    "fedpar.ResultUnavailable", f"engine {self.engine_id} sent the result of task {tid} to a "
                    "controller that died, and no longer has it: it comes back if that controller's state directory "
                    "runs again", ""], 0))
        if again:
            send_parts(sock, codec.encode(Results(again), frames)[0])

    # ------------------------------------------------------------------ for the control thread
    def holding_now(self) -> set[str]:
        """Ids of the tasks this engine holds (received, result not sent)."""
        with self._epoch_lock:
            return set(self._holding) - self._dropped

    def recent_ids(self) -> set[str]:
        return set(self._recent.copy())

    def raise_epoch(self, epoch: int) -> None:
        """The controller restarted: batches of older incarnations are not started from now on."""
        with self._epoch_lock:
            self._epoch = max(self._epoch, epoch)

    def switch(self, endpoint: str, *, with_recent: bool) -> list[str]:
        """Move: a new task socket to ``endpoint`` for the main thread; batches of the old one are dropped.
        Returns the tasks held (and, ``with_recent``, the results sent lately) at the very moment the
        generation rises, so a batch is either in that list or never run. Results wait until a controller
        welcomes this engine (``welcomed``)."""
        new = connect_dealer(self.ctx, endpoint, self.task_ident)
        with self._epoch_lock:
            old, self._swap = self._swap, None
            self._gen += 1
            self._epoch = 0
            self._swap = (new, self._gen)
            self.moving = True
            held = set(self._holding) - self._dropped
        if old is not None:
            old[0].close(0)
        if with_recent:
            held |= set(self._recent.copy())
        return sorted(held)

    def welcomed(self, msg: EngineWelcome, epoch: int) -> None:
        """A controller registered this engine (again): its epoch, settings, what to resend, what to drop
        (held tasks it did not adopt: never run or reported; results of those it forgets). Results held back
        while moving go out now."""
        with self._epoch_lock:
            self._epoch = epoch
            self._dropped.update(t for t in msg.drop if t in self._holding)
            self.moving = False
        for tid in msg.drop:
            got = self._recent.pop(tid, None)
            if got is not None:
                self._recent_bytes -= sum(len(f) for f in got[1])
        self.streams.settings = StreamSettings.from_wire(msg.stream)
        self._resend.extend(msg.resend)

    # ------------------------------------------------------------------ tasks
    def _run_task(self, task_id: str, op: str, spec: dict[str, Any], frames: list[Any]) -> tuple[ResultSpec, list[Any]]:
        started = time.time()
        self._busy = True
        self.current = task_id
        try:
            value = self._execute(op, spec, frames)
            out = dumps_result(value)
            return ResultSpec(task_id, True, self.engine_id, started, time.time(), None, len(out)), out
        except BaseException as exc:  # user code may raise anything, KeyboardInterrupt included
            if self.stop_event.is_set() and isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise  # the engine is being stopped: not a failure of the task
            err = describe_exception(exc)
            return ResultSpec(task_id, False, self.engine_id, started, time.time(), err, 0), []
        finally:
            self._busy = False
            self.current = ""

    def _execute(self, op: str, spec: dict[str, Any], frames: list[Any]) -> Any:
        ns = self.namespace
        if op == "apply":
            fn = self._functions.load(frames[0])
            args, kwargs = loads(frames[1:])
            args, kwargs = self._resolve(args, kwargs)
            return fn(*args, **kwargs)
        if op == "map":
            fn = self._functions.load(frames[0])
            seqs = loads(frames[1:])
            return [fn(*a) for a in zip(*seqs, strict=False)]
        if op == "execute":
            code = spec.get("code")
            if not isinstance(code, str):
                raise TypeError("execute needs a code string")
            exec(compile(code, "<fedpar-execute>", "exec"), ns)
            return None
        if op == "push":
            ns.update(loads(frames))
            return None
        if op == "pull":
            names = spec.get("names")
            if isinstance(names, str):
                return _lookup(ns, names)
            if isinstance(names, list):
                return [_lookup(ns, n) for n in names]
            raise TypeError("pull needs a name or a list of names")
        raise ValueError(f"unknown task operation {op!r}")

    def _resolve(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Replace ``Reference`` arguments (positional or keyword) by the engine variables they name."""
        ns = self.namespace
        if any(type(a) is Reference for a in args):
            args = tuple(_lookup(ns, a.name) if type(a) is Reference else a for a in args)
        if kwargs and any(type(v) is Reference for v in kwargs.values()):
            kwargs = {k: _lookup(ns, v.name) if type(v) is Reference else v for k, v in kwargs.items()}
        return args, kwargs

    def terminate(self) -> None:
        """Stop now (SIGTERM): interrupt user code if a task runs; the task is not reported."""
        self.stop_event.set()
        if self._busy:
            _thread.interrupt_main()

    def halt(self) -> None:
        """Stop the main thread: at once if idle, by interrupting user code if busy, else hard exit."""
        self.stop_event.set()
        deadline = time.monotonic() + 1.0
        while self._busy and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._busy:
            _thread.interrupt_main()
            time.sleep(1.0)
            os._exit(0)


def _lookup(ns: dict[str, Any], name: str) -> Any:
    try:
        return ns[name]
    except KeyError:
        raise NameError(f"name {name!r} is not defined on this engine") from None


def run_engine(info: ConnectionInfo, *, controller_timeout: float = 30.0, replay_window: float = 300.0,
               index: int | None = None) -> int:
    """Entry point of ``fedpar engine``."""
    engine = Engine(info, controller_timeout=controller_timeout, replay_window=replay_window, index=index)
    signal.signal(signal.SIGTERM, lambda *_: engine.terminate())
    try:
        return engine.run()
    except KeyboardInterrupt:
        return 0


__all__ = ["Engine", "Reference", "dumps", "run_engine"]
