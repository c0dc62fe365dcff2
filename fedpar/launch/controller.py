"""``fedpar controller``: assemble the store, sockets, gateway, housekeeper and federation, then serve.

The cluster key lives in the state directory (``cluster.key``, 0600), so a controller restarted on
the same state directory keeps its key and clients and engines can reconnect. So does the controller's
id (``controller.id``): in a federation it names the controller in the discovery registry across
restarts, the store's epoch telling its incarnations apart.

With a discovery URL the controller registers before it serves (an unreachable registry is a clear error
at start), and if the survivors took over its previous incarnation while it was down, it drops the
unfinished tasks that incarnation left in its store instead of running them again: their clients
resubmitted them elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import Any

import zmq

from fedpar.actors.engines import FederationLink
from fedpar.actors.federation import Federation, Settings
from fedpar.actors.gateway import Gateway
from fedpar.actors.housekeeper import Housekeeper
from fedpar.actors.journal import Journal
from fedpar.config import Config
from fedpar.control.registry import EngineRegistry
from fedpar.control.scheduler import Scheduler
from fedpar.errors import ConfigError
from fedpar.federation.discovery import Discovery, open_registry
from fedpar.federation.membership import Fence, Tracker
from fedpar.federation.records import ControllerEntry
from fedpar.runtime import (
    KEY_FILE,
    ConnectionInfo,
    key_file,
    lock_state_dir,
    remove_connection_file,
    write_connection_file,
)
from fedpar.store.lmdb_store import LmdbStore
from fedpar.wire.codec import Codec
from fedpar.wire.protocol import CHUNK_BYTES
from fedpar.wire.streams import StreamSettings
from fedpar.wire.transport import advertised, bind_router, is_loopback

log = logging.getLogger(__name__)

ID_FILE = "controller.id"
ENDPOINTS_FILE = "endpoints.json"
STEPPED_DOWN = 4  # exit code of a controller whose registration lapsed and was taken over
LOCK_WAIT = 10.0  # seconds a controller waits for the previous one on its state directory to finish exiting


def _previous_ports(state_dir: Path) -> dict[str, int]:
    """Ports this state directory's controller used last time (reused so peers reconnect by themselves)."""
    try:
        data = json.loads((state_dir / ENDPOINTS_FILE).read_text())
        return {k: int(v) for k, v in data.items() if k in ("client", "engine")}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def load_or_create_key(state_dir: Path, given: bytes | None = None) -> bytes:
    """The cluster key: ``given`` (then saved), else the one saved in ``state_dir``, else a new one (saved)."""
    path = state_dir / KEY_FILE
    if given is None:
        return key_file(path, create=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(given)
    return given


def controller_identity(state_dir: Path, cluster_id: str) -> str:
    """The controller's id, kept in ``state_dir`` (made once: ``<cluster id>.<6 hex>``)."""
    path = state_dir / ID_FILE
    try:
        cid = path.read_text().strip()
        if cid:
            return cid
    except FileNotFoundError:
        pass
    cid = f"{cluster_id}.{secrets.token_hex(3)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(cid + "\n")
    return cid


def drop_taken_over(store: LmdbStore, discovery: Discovery, cid: str) -> int:
    """If the survivors took over this controller's last registered incarnation, delete the unfinished tasks
    it left (their clients resubmitted them elsewhere; running them here would run them twice)."""
    previous = store.counters().get("registered_epoch", 0)
    marker = discovery.takeovers().get(cid)
    if not previous or marker is None or marker.epoch < previous:
        return 0
    ids = [r.task_id for r in store.unfinished_tasks()]
    if ids:
        batch = store.batch()
        batch.delete_results(ids)
        store.commit(batch)
        log.warning("incarnation %d of this controller was taken over while it was down; dropped the %d "
                    "unfinished task(s) it left (their clients resubmitted them elsewhere)", marker.epoch, len(ids))
    return len(ids)


def drop_partial_streams(store: LmdbStore) -> int:
    """Delete the chunks of streams a previous controller left half written; returns how many."""
    partial = store.partial_streams()
    if partial:
        batch = store.batch()
        for kind, task_id in partial:
            batch.drop_stream(kind, task_id)
        store.commit(batch)
        log.info("deleted %d partly received stream(s) left by the previous controller", len(partial))
    return len(partial)


def run_controller(
    config: Config,
    *,
    cluster_id: str,
    state_dir: Path,
    key: bytes | None = None,
    connection_file: Path | None = None,
    parent_pid: int | None = None,
) -> int:
    """Run a controller until it is stopped (SIGTERM, SIGINT, a client's shutdown request).

    With ``[discovery] url`` set it joins that federation. SIGTERM while other controllers are live hands
    its work over to them (its engines move, clients resubmit its queued tasks) before it exits. Returns 0,
    or ``STEPPED_DOWN`` when its registration lapsed and the survivors took it over."""
    host = config.controller.host
    if not is_loopback(host) and not config.security.insecure:
        raise ConfigError(
            f"[controller] host = {host} is not a loopback address and encryption is not available yet; "
            "set [security] insecure = true to accept unencrypted traffic on this network"
        )
    if not is_loopback(host):
        log.warning("binding %s without encryption ([security] insecure = true): anyone who can reach this "
                    "address can read the traffic; only the cluster key protects the engines", host)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state_dir, 0o700)
    lock = lock_state_dir(state_dir, wait=LOCK_WAIT)  # held until this process ends
    try:
        return _serve(config, cluster_id=cluster_id, state_dir=state_dir, key=key, connection_file=connection_file,
                      parent_pid=parent_pid, host=host)
    finally:
        lock.close()


def _serve(config: Config, *, cluster_id: str, state_dir: Path, key: bytes | None, connection_file: Path | None,
           parent_pid: int | None, host: str) -> int:
    key = load_or_create_key(state_dir, key)
    store = LmdbStore(
        state_dir / "store", map_size=config.store.map_size, max_map_size=config.store.max_map_size,
        sync=config.store.sync,
    )
    epoch = store.next_epoch()
    controller_id = controller_identity(state_dir, cluster_id)
    ctx: zmq.Context[Any] = zmq.Context()
    previous = _previous_ports(state_dir)
    client_sock, client_ep = bind_router(ctx, host, previous.get("client"))
    engine_sock, engine_ep = bind_router(ctx, host, previous.get("engine"))
    (state_dir / ENDPOINTS_FILE).write_text(json.dumps({"client": _port(client_ep), "engine": _port(engine_ep)}))
    client_ep = advertised(client_ep, config.controller.advertise)
    engine_ep = advertised(engine_ep, config.controller.advertise)

    codec = Codec(key, f"controller:{controller_id}:{epoch}", epoch=epoch,
                  replay_window=config.security.replay_window, marks=store.marks())
    fed = _join(config, store, key, cluster_id, ControllerEntry(
        controller_id, epoch, client_ep, engine_ep, socket.gethostname(), os.getpid(), str(state_dir),
        config.controller.weight, time.time())) if config.discovery.url else None
    engines = store.engines()
    registry = EngineRegistry(config.controller.heartbeat * config.controller.heartbeat_misses,
                              next_id=max((e.engine_id for e in engines), default=-1) + 1)
    gateway = Gateway(
        controller_id=controller_id, codec=codec, client_sock=client_sock, engine_sock=engine_sock,
        journal=Journal(store), registry=registry, scheduler=Scheduler(config.engines.prefetch),
        heartbeat=config.controller.heartbeat, batch=config.controller.batch,
        stream=StreamSettings(config.stream.threshold, max(1, config.stream.window // CHUNK_BYTES),
                              config.stream.timeout, config.stream.direct),
        fence=fed.fence if fed else None, federation=fed.link if fed else None, pid=os.getpid(),
        host=socket.gethostname(),
    )
    drop_partial_streams(store)
    timeout = config.controller.heartbeat * config.controller.heartbeat_misses
    gateway.recover(store.unfinished_tasks(), engines, time.time(), grace=max(2 * timeout, 10.0))
    info = ConnectionInfo(
        cluster_id=cluster_id, key=key, client_endpoint=client_ep, engine_endpoint=engine_ep,
        controller_id=controller_id, controller_pid=os.getpid(), state_dir=str(state_dir),
        created=time.time(), discovery=config.discovery.url,
    )
    cf = write_connection_file(info, connection_file, config)
    actor = fed.start(gateway) if fed else None

    def on_signal(signum: int, _frame: object) -> None:
        if actor is not None and signum == signal.SIGTERM:
            if not gateway.leaving:
                log.info("controller got SIGTERM; handing its work over if other controllers run")
                gateway.leaving = True  # (this handler runs on the gateway's thread: nothing starts from now on)
                actor.tell(("term", gateway))
            return
        log.info("controller got signal %d; stopping", signum)
        gateway.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    housekeeper = Housekeeper.start(gateway, retention=config.store.retention, parent_pid=parent_pid)
    log.info("controller %s (epoch %d) serving clients at %s, engines at %s%s", controller_id, epoch,
             client_ep, engine_ep, f", federated through {config.discovery.url}" if fed else "")
    ran = False
    try:
        gateway.run()
        ran = True
    finally:
        housekeeper.stop()
        if actor is not None:
            if ran and not gateway.stepped_down:  # (after a crash the lease lapses: the others take over)
                actor.ask(("deregister",), timeout=10)
            actor.stop()
        client_sock.close(0)
        engine_sock.close(0)
        ctx.term()
        store.sync()
        store.close()
        remove_connection_file(cf)
        log.info("controller %s %s", controller_id, "stepped down" if gateway.stepped_down else "stopped")
    return STEPPED_DOWN if gateway.stepped_down else 0


class _Joined:
    """A controller's membership of a federation before its gateway runs: registration, fence, tracker."""

    def __init__(self, config: Config, discovery: Discovery, entry: ControllerEntry, lease: str, fence: Fence,
                 tracker: Tracker):
        self.config = config
        self.discovery = discovery
        self.entry = entry
        self.lease = lease
        self.fence = fence
        self.tracker = tracker
        self._actor: Any = None
        self.link = FederationLink(
            allocate=lambda n, reply: self._actor.tell(("allocate", n, reply)),
            adopt=lambda cid, epoch, reply: self._actor.tell(("adopt", cid, epoch, reply)),
        )

    def start(self, gateway: Gateway) -> Any:
        d = self.config.discovery
        gateway.desk.view = self.tracker.view
        self._actor = Federation.start(self.discovery, self.entry, self.lease, self.fence, self.tracker,
                                       Settings(d.ttl, d.poll, d.window), gateway.call_soon, gateway.desk.on_view,
                                       lambda: len(gateway.registry))
        return self._actor


def _join(config: Config, store: LmdbStore, key: bytes, cluster_id: str, entry: ControllerEntry) -> _Joined:
    """Register in the discovery registry (raises ``RegistryUnavailable`` / ``DiscoveryError`` if it cannot)."""
    d = config.discovery
    discovery = Discovery(open_registry(d.url), cluster_id, key)
    sent = time.monotonic()
    lease = discovery.register(entry, d.ttl, replace=True)
    drop_taken_over(store, discovery, entry.cid)  # (after registering: no takeover can start from now on)
    batch = store.batch()
    batch.set_meta("registered_epoch", entry.epoch)
    store.commit(batch)
    fence = Fence(d.ttl)
    fence.renewed(sent)
    tracker = Tracker(entry.cid, window=d.window)
    tracker.observe(discovery.controllers(), discovery.known().values(), discovery.takeovers().values(),
                    time.time(), time.monotonic())
    return _Joined(config, discovery, entry, lease, fence, tracker)
