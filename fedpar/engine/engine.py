"""The engine process: runs tasks in its main thread, heartbeats from a side thread.

The main thread owns the task socket and executes tasks straight from it (no thread hand-off per
task). While a batch of short tasks keeps arriving, results are sent back in batches too. The side
thread owns a second socket for heartbeats and control, so ``EngineStop`` and liveness stay
responsive while user code runs.

(About 520 lines, just over the soft cap: the stream loops here run inline on the main thread between tasks,
over the task socket or a direct-stream socket, and share its codec, backlog and stop flag; their pure
bookkeeping is in ``streams`` and the direct-stream connections in ``direct``.)
"""

from __future__ import annotations

import _thread
import builtins
import itertools
import logging
import os
import signal
import socket
import threading
import time
import uuid as uuidlib
from collections import OrderedDict, deque
from typing import Any

import zmq

from fedpar.errors import (
    ControllerUnavailable,
    ProtocolError,
    StreamAborted,
    StreamCorrupted,
    StreamError,
    StreamTimeout,
)
from fedpar.runtime import ConnectionInfo
from fedpar.wire.codec import Codec, Received
from fedpar.wire.direct import OFFER, EngineLinks
from fedpar.wire.payload import FunctionCache, describe_exception, dumps, dumps_result, loads
from fedpar.wire.protocol import (
    Chunk,
    Credit,
    EngineHello,
    EngineStop,
    EngineWelcome,
    Heartbeat,
    Results,
    ResultSpec,
    StreamAbort,
    Tasks,
)
from fedpar.wire.streams import (
    DELIVERED,
    Receiver,
    Sender,
    StreamSettings,
    frame_size,
    memory_source,
    parse_head,
    should_stream,
    untrusted_chunk_sid,
)
from fedpar.wire.transport import connect_dealer, readable, recv_parts, send_parts

log = logging.getLogger(__name__)

RESULT_BATCH = 64
RESULT_BATCH_SECONDS = 0.002
RECENT_RESULTS = 1024  # results kept after sending, to resend if the controller dies before storing them
RECENT_BYTES = 64 << 20
DIRECT_FIRST_WAIT = 5.0  # seconds a client offering a direct stream has to answer (else: via the controller)


class Reference:
    """An argument that names a variable in the engine's namespace, resolved when the task runs."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"Reference({self.name!r})"


class Engine:
    """One engine: register, then run tasks until told to stop or the controller goes silent."""

    def __init__(self, info: ConnectionInfo, *, controller_timeout: float = 30.0, replay_window: float = 300.0):
        self.info = info
        self.controller_timeout = controller_timeout
        self.uuid = uuidlib.uuid4().hex
        self.engine_id = -1
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self._functions = FunctionCache(rebind=self.namespace)
        self._stop = threading.Event()
        self._busy = False
        self._ctx = zmq.Context()
        self._replay_window = replay_window
        self._task_ident = f"t:{self.uuid}".encode()
        self._holding: set[str] = set()  # task ids received whose results are not sent yet
        self._recent: OrderedDict[str, tuple[ResultSpec, list[Any]]] = OrderedDict()  # sent, kept a while
        self._recent_bytes = 0
        self._resend: deque[str] = deque()  # ids a re-registration asked for again
        self._epoch = 0  # incarnation of the controller this engine is registered with
        # Taken while the main thread checks a task batch's epoch and records its ids as held, and while the
        # control thread raises the epoch: a batch is either listed in the re-registration or never run.
        self._epoch_lock = threading.Lock()
        self._current = ""  # id of the task being executed (read by the heartbeat)
        self._stream = StreamSettings()  # the cluster's, from the controller's welcome
        self._sids = itertools.count(1)
        self._backlog: deque[Received] = deque()  # messages read while a stream was in progress
        self._links = EngineLinks(self._ctx, f"d:{self.uuid}".encode())  # direct streams (fedpar.wire.direct)

    # ------------------------------------------------------------------ main thread
    def run(self, register_timeout: float = 30.0) -> int:
        """Serve until stopped. Returns the process exit code."""
        task_ident = self._task_ident
        sock = connect_dealer(self._ctx, self.info.engine_endpoint, task_ident)
        codec = Codec(self.info.key, f"engine:{self.uuid}:t", replay_window=self._replay_window)
        try:
            heartbeat = self._register(sock, codec, task_ident, register_timeout)
            ctl = threading.Thread(target=self._control_loop, args=(heartbeat,), name="fedpar-engine-control",
                                   daemon=True)
            ctl.start()
            self._serve(sock, codec)
            return 0
        except ControllerUnavailable as exc:
            log.error("%s", exc)
            return 3
        finally:
            self._stop.set()
            self._links.close()
            sock.close(0)

    def _register(self, sock: zmq.Socket[Any], codec: Codec, task_ident: bytes, timeout: float) -> float:
        hello = EngineHello(self.uuid, socket.gethostname(), os.getpid(), task_ident)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            parts, _rid = codec.encode(hello)
            send_parts(sock, parts)
            if sock.poll(1000):
                try:
                    rx = codec.decode(recv_parts(sock))
                except ProtocolError as exc:
                    raise ControllerUnavailable(f"controller answered with a bad message: {exc}") from exc
                if isinstance(rx.msg, EngineWelcome):
                    self.engine_id = rx.msg.engine_id
                    self._epoch = rx.envelope.epoch
                    self._stream = StreamSettings.from_wire(rx.msg.stream)
                    log.info("registered as engine %d with controller %s", self.engine_id, rx.msg.controller)
                    return rx.msg.heartbeat
        raise ControllerUnavailable(
            f"no controller answered at {self.info.engine_endpoint} within {timeout:.0f}s"
        )

    def _serve(self, sock: zmq.Socket[Any], codec: Codec) -> None:
        results: list[ResultSpec] = []
        frames: list[Any] = []
        first_pending = 0.0
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            if self._resend:
                self._resend_results(sock, codec)
            if self._backlog:
                rx = self._backlog.popleft()
            else:
                if not (readable(sock) or (not results and poller.poll(200))):
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
                stale = rx.envelope.epoch < self._epoch
                if not stale:
                    self._holding.update(spec.task_id for spec in rx.msg.tasks)
            if stale:
                # Sent by a controller that died before we read it; we registered again since without
                # listing these tasks, so the new controller has retried or failed them: never run them.
                log.info("dropping %d task(s) from controller epoch %d", len(rx.msg.tasks), rx.envelope.epoch)
                continue
            if not results:
                first_pending = time.monotonic()
            pos = 0
            for spec in rx.msg.tasks:
                tframes = rx.frames[pos:pos + spec.nframes]
                pos += spec.nframes
                head = spec.spec.get("stream")
                if head is not None:  # large arguments: received into their final memory first
                    try:
                        tframes = self._receive_args(sock, codec, head, spec.spec)
                    except StreamError as exc:
                        now = time.time()
                        results.append(ResultSpec(spec.task_id, False, self.engine_id, now, now,
                                                  [f"fedpar.{type(exc).__name__}", str(exc), ""], 0))
                        continue
                res, rframes = self._run_task(spec.task_id, spec.op, spec.spec, tframes)
                if should_stream(rframes, self._stream.threshold):  # a large result: sent as a stream
                    if results:
                        self._send_results(sock, codec, results, frames)
                        results, frames = [], []
                    direct = self._links.socket_for(spec.spec) if spec.op == "pull" else None
                    self._stream_result(sock, codec, res, rframes, direct)
                    continue
                results.append(res)
                frames.extend(rframes)
            if len(results) >= RESULT_BATCH or time.monotonic() - first_pending > RESULT_BATCH_SECONDS:
                self._send_results(sock, codec, results, frames)
                results, frames = [], []
        if results:
            self._send_results(sock, codec, results, frames)

    def _send_results(self, sock: zmq.Socket[Any], codec: Codec, results: list[ResultSpec], frames: list[Any]) -> None:
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

    # ------------------------------------------------------------------ streams
    def _next_message(self, sock: zmq.Socket[Any], codec: Codec, sid: int, deadline: float,
                      backlog: bool = True) -> Received | None:
        """The next message of stream ``sid`` (a chunk, credit or abort) within ``deadline``; other messages
        go to the backlog (``backlog``: the task socket) or are dropped (a direct-stream socket). None on
        timeout. Raises ``StreamCorrupted`` for a chunk failing authentication."""
        while True:
            left = deadline - time.monotonic()
            if self._stop.is_set():
                raise StreamAborted("the engine is stopping")
            if left <= 0 or not sock.poll(int(min(left, 0.2) * 1000) + 1):
                if left <= 0:
                    return None
                if not backlog and self._links.gone(sock):
                    raise StreamAborted("the client's direct-stream connection closed (it died or closed)")
                continue
            parts = recv_parts(sock)
            try:
                rx = codec.decode(parts)
            except ProtocolError as exc:
                if untrusted_chunk_sid(parts) == sid:
                    raise StreamCorrupted(f"a chunk of stream {sid} failed authentication ({exc})") from None
                log.warning("dropped a bad message on the task socket: %s", exc)
                continue
            msg = rx.msg
            if isinstance(msg, (Chunk, Credit, StreamAbort)):
                if msg.sid == sid:
                    return rx
                continue  # a stream that is over
            if backlog:
                self._backlog.append(rx)

    def _receive_args(self, sock: zmq.Socket[Any], codec: Codec, head: Any, spec: dict[str, Any]) -> list[Any]:
        """A task's streamed arguments: from the controller, or straight from the client if it offered them."""
        if OFFER not in spec:
            return self._receive_stream(sock, codec, head)
        direct = self._links.socket_for(spec)
        if direct is None:
            raise StreamAborted("the client offering the task's arguments directly is gone (or on another host)")
        try:
            return self._receive_stream(direct, codec, head, backlog=False)
        except StreamError:
            self._links.forget(direct)
            raise

    def _receive_stream(self, sock: zmq.Socket[Any], codec: Codec, head: Any, backlog: bool = True) -> list[Any]:
        """Receive a task's streamed arguments into their final memory (one bytearray per frame)."""
        sid, sizes = parse_head(head)
        timeout = self._stream.timeout
        rec = Receiver(sid, sizes, self._stream.window, time.monotonic())
        try:
            while not rec.done:
                upto = rec.credit()
                if upto is not None:
                    send_parts(sock, codec.encode(Credit(sid, upto))[0])
                rx = self._next_message(sock, codec, sid, rec.touched + timeout, backlog)
                if rx is None:
                    raise StreamTimeout(f"no chunk of the task's arguments for {timeout:.0f}s "
                                        f"({rec.next} of {len(rec)} received)")
                msg = rx.msg
                if isinstance(msg, StreamAbort):
                    raise StreamAborted(f"the sender abandoned the arguments' stream: {msg.ename}: {msg.evalue}")
                if isinstance(msg, Chunk):
                    rec.accept(msg.index, rx.frames[0], time.monotonic())
        except StreamError as exc:
            if not isinstance(exc, StreamAborted):
                send_parts(sock, codec.encode(StreamAbort(sid, type(exc).__name__, str(exc)))[0])
            raise
        return rec.frames()

    def _stream_result(self, sock: zmq.Socket[Any], codec: Codec, res: ResultSpec, frames: list[Any],
                       direct: zmq.Socket[Any] | None = None) -> None:
        """Send a large result as a stream: straight to the client on ``direct`` if given (the controller is
        then told it was ``DELIVERED``), else, or if that fails, through the controller."""
        if direct is not None:
            why = self._send_stream(direct, codec, res, frames, min(DIRECT_FIRST_WAIT, self._stream.timeout), False,
                                    acknowledged=True)
            if why is None:
                sizes = [frame_size(f) for f in frames]
                send_parts(sock, codec.encode(Results([res._replace(nframes=0, stream=[DELIVERED, sizes])]))[0])
                self._holding.discard(res.task_id)
                return
            log.info("direct stream of task %s's result failed (%s: %s); sending it through the controller",
                     res.task_id, *why)
            self._links.forget(direct)
        why = self._send_stream(sock, codec, res, frames, self._stream.timeout, True)
        if why is not None and not why[1].startswith("duplicate"):  # report the failure, so the task does not hang
            ename, evalue = why
            log.warning("could not stream the result of task %s: %s: %s", res.task_id, ename, evalue)
            err = res._replace(ok=False, nframes=0, stream=None,
                               error=[f"fedpar.{ename}", f"the result stream failed: {ename}: {evalue}", ""])
            self._send_results(sock, codec, [err], [])
            return
        self._holding.discard(res.task_id)  # (a "duplicate" abort: the task is finished already, nothing is lost)

    def _send_stream(self, sock: zmq.Socket[Any], codec: Codec, res: ResultSpec, frames: list[Any],
                     first_wait: float, backlog: bool, acknowledged: bool = False) -> tuple[str, str] | None:
        """Send ``res``'s head then its chunks as credit arrives; (error class, message) if it fails.

        ``acknowledged`` (a direct stream): done only when the receiver confirms it took every chunk (a
        ``Credit`` covering the whole stream, arriving after the last chunk was sent)."""
        sid = next(self._sids)
        sizes = [frame_size(f) for f in frames]
        timeout = self._stream.timeout
        sender = Sender(sid, sizes, memory_source(frames), time.monotonic())
        send_parts(sock, codec.encode(Results([res._replace(nframes=0, stream=[sid, sizes])]))[0])
        try:
            while not sender.done:
                wait = timeout if sender.upto else first_wait
                rx = self._next_message(sock, codec, sid, sender.touched + wait, backlog)
                if rx is None:
                    return "StreamTimeout", f"the receiver granted no credit for {wait:.0f}s"
                msg = rx.msg
                if isinstance(msg, StreamAbort):
                    return msg.ename, msg.evalue
                if isinstance(msg, Credit):
                    sender.grant(msg.upto, time.monotonic())
                    for index, data in sender.ready():
                        send_parts(sock, codec.encode(Chunk(sid, index), [data])[0])
            while acknowledged:
                rx = self._next_message(sock, codec, sid, time.monotonic() + first_wait, backlog)
                if rx is None:
                    return "StreamTimeout", f"the receiver did not acknowledge the stream within {first_wait:.0f}s"
                if isinstance(rx.msg, StreamAbort):
                    return rx.msg.ename, rx.msg.evalue
                if isinstance(rx.msg, Credit) and rx.msg.upto >= len(sender):
                    break
        except StreamError as exc:
            return type(exc).__name__, str(exc)
        return None

    def _resend_results(self, sock: zmq.Socket[Any], codec: Codec) -> None:
        """Send again the results a restarted controller asked for (those still remembered)."""
        again: list[ResultSpec] = []
        frames: list[Any] = []
        while self._resend:
            got = self._recent.get(self._resend.popleft())
            if got is not None:
                again.append(got[0])
                frames.extend(got[1])
        if again:
            send_parts(sock, codec.encode(Results(again), frames)[0])

    # ------------------------------------------------------------------ tasks
    def _run_task(self, task_id: str, op: str, spec: dict[str, Any], frames: list[Any]) -> tuple[ResultSpec, list[Any]]:
        started = time.time()
        self._busy = True
        self._current = task_id
        try:
            value = self._execute(op, spec, frames)
            out = dumps_result(value)
            return ResultSpec(task_id, True, self.engine_id, started, time.time(), None, len(out)), out
        except BaseException as exc:  # user code may raise anything, KeyboardInterrupt included
            if self._stop.is_set() and isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise  # the engine is being stopped: not a failure of the task
            err = describe_exception(exc)
            return ResultSpec(task_id, False, self.engine_id, started, time.time(), err, 0), []
        finally:
            self._busy = False
            self._current = ""

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

    # ------------------------------------------------------------------ control thread
    def _control_loop(self, heartbeat: float) -> None:
        """Heartbeats both ways; re-registers when a restarted controller does not know this engine;
        stops on ``EngineStop`` or after ``controller_timeout`` seconds of silence."""
        sock = connect_dealer(self._ctx, self.info.engine_endpoint, f"c:{self.uuid}".encode())
        codec = Codec(self.info.key, f"engine:{self.uuid}:c", replay_window=self._replay_window)
        last_ack = time.monotonic()
        last_hello = 0.0
        reason = ""
        try:
            while not self._stop.is_set() and not reason:
                parts, _ = codec.encode(Heartbeat(self.engine_id, self._current))
                send_parts(sock, parts)
                deadline = time.monotonic() + heartbeat
                unknown = False
                while not reason and (left := deadline - time.monotonic()) > 0:
                    if not sock.poll(int(left * 1000) + 1):
                        break
                    try:
                        rx = codec.decode(recv_parts(sock))
                    except ProtocolError as exc:
                        log.warning("dropped a bad control message: %s", exc)
                        continue
                    msg = rx.msg
                    if isinstance(msg, Heartbeat):
                        last_ack = time.monotonic()
                        unknown = msg.engine_id == -1
                        if unknown:
                            # From now on, tasks of older incarnations are not started (see _serve): what
                            # the main thread took before this point is in _holding and listed below.
                            with self._epoch_lock:
                                self._epoch = max(self._epoch, rx.envelope.epoch)
                    elif isinstance(msg, EngineWelcome):
                        last_ack = time.monotonic()
                        with self._epoch_lock:
                            self._epoch = rx.envelope.epoch
                        self._stream = StreamSettings.from_wire(msg.stream)
                        self._resend.extend(msg.resend)
                        if msg.engine_id != self.engine_id:
                            log.info("engine %d is now engine %d", self.engine_id, msg.engine_id)
                        self.engine_id = msg.engine_id
                    elif isinstance(msg, EngineStop):
                        reason = msg.reason or "stop requested"
                if unknown and time.monotonic() - last_hello > heartbeat:
                    # The controller restarted (or lost us): register again and say what we still hold.
                    last_hello = time.monotonic()
                    held = self._holding.copy() | set(self._recent.copy())
                    hello = EngineHello(self.uuid, socket.gethostname(), os.getpid(), self._task_ident, sorted(held))
                    send_parts(sock, codec.encode(hello)[0])
                    log.info("engine %d registering again (holding %d task(s))", self.engine_id, len(hello.running))
                if not reason and time.monotonic() - last_ack > self.controller_timeout:
                    reason = f"controller silent for {self.controller_timeout:.0f}s"
        finally:
            sock.close(0)
        if reason:
            log.info("engine %d stopping: %s", self.engine_id, reason)
            self._halt()

    def terminate(self) -> None:
        """Stop now (SIGTERM): interrupt user code if a task runs; the task is not reported."""
        self._stop.set()
        if self._busy:
            _thread.interrupt_main()

    def _halt(self) -> None:
        """Stop the main thread: at once if idle, by interrupting user code if busy, else hard exit."""
        self._stop.set()
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


def run_engine(info: ConnectionInfo, *, controller_timeout: float = 30.0, replay_window: float = 300.0) -> int:
    """Entry point of ``fedpar engine``."""
    engine = Engine(info, controller_timeout=controller_timeout, replay_window=replay_window)
    signal.signal(signal.SIGTERM, lambda *_: engine.terminate())
    try:
        return engine.run()
    except KeyboardInterrupt:
        return 0


__all__ = ["Engine", "Reference", "dumps", "run_engine"]
