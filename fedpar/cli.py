"""The ``fedpar`` command (also ``python -m fedpar``).

    fedpar cluster start -n 4        start a controller and 4 engines in the background
    fedpar cluster status            engines, queue depth, tasks done
    fedpar cluster stop              stop them
    fedpar controller / engine       run one process in the foreground (what launchers start)
    fedpar config                    print a commented default .ini
    fedpar bench ...                 run the benchmark harness (from a source checkout)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from fedpar.config import Config, default_config_text, load_config
from fedpar.errors import ConnectionFileError, FedparError
from fedpar.runtime import pid_alive


def _config(args: argparse.Namespace) -> Config:
    overrides: dict[str, dict[str, object]] = {}
    if getattr(args, "host", None):
        overrides.setdefault("controller", {})["host"] = args.host
    if getattr(args, "cluster_id", None):
        overrides.setdefault("cluster", {})["id"] = args.cluster_id
    if getattr(args, "discovery", None):
        overrides.setdefault("discovery", {})["url"] = args.discovery
    return load_config(args.config, overrides)


def _key(args: argparse.Namespace) -> bytes | None:
    """The cluster key given on stdin (``--key-stdin``, hex) or in a file (``--key-file``), else None."""
    from fedpar.runtime import key_file

    if getattr(args, "key_stdin", False):
        return bytes.fromhex(sys.stdin.readline().strip())
    if getattr(args, "key_file", None):  # (the first controller of a federation makes the key)
        return key_file(Path(args.key_file).expanduser(), create=args.command == "controller")
    return None


def _conn_path(args: argparse.Namespace, cfg: Config) -> Path:
    from fedpar.runtime import connection_file_path

    if args.connection_file:
        return Path(args.connection_file)
    return connection_file_path(cfg.cluster.id, cfg)


def cmd_controller(args: argparse.Namespace) -> int:
    from fedpar.launch.controller import run_controller
    from fedpar.runtime import state_dir

    cfg = _config(args)
    key = _key(args)
    sd = Path(args.state_dir) if args.state_dir else state_dir(cfg, cfg.cluster.id)
    return run_controller(cfg, cluster_id=cfg.cluster.id, state_dir=sd, key=key,
                          connection_file=_conn_path(args, cfg), parent_pid=args.parent_pid)


def cmd_engine(args: argparse.Namespace) -> int:
    from fedpar.engine.engine import run_engine
    from fedpar.runtime import read_connection_file

    cfg = _config(args)
    if args.discovery:  # find the controllers through the registry (the key from --key-file or a connection file)
        from fedpar.federation.seeds import connection_info

        info = connection_info(args.discovery, cfg.cluster.id, _key(args))
    else:
        info = read_connection_file(_conn_path(args, cfg), cfg)
    return run_engine(info, controller_timeout=cfg.engines.controller_timeout,
                      replay_window=cfg.security.replay_window, index=args.index)


def cmd_cluster_start(args: argparse.Namespace) -> int:
    from fedpar.client.client import Client
    from fedpar.launch.local import LocalLauncher
    from fedpar.runtime import read_connection_file, remove_connection_file, state_dir, write_connection_file

    cfg = _config(args)
    path = _conn_path(args, cfg)
    if path.exists():
        try:
            old_pid: int | None = read_connection_file(path, cfg).controller_pid
        except ConnectionFileError:
            old_pid = None
        if old_pid is not None and pid_alive(old_pid) and _is_fedpar(old_pid):
            print(f"a cluster {cfg.cluster.id!r} runs already (controller pid {old_pid}, {path}); stop it first",
                  file=sys.stderr)
            return 1
        # Left behind by a cluster that died without cleaning up (killed, machine rebooted): not a reason to refuse.
        print(f"note: replacing the stale connection file {path} (its controller "
              f"{'pid ' + str(old_pid) + ' is gone' if old_pid is not None else 'is unknown: unreadable file'})",
              file=sys.stderr)
        remove_connection_file(path)
    n = cfg.engines.n if args.n is None else args.n
    k = args.controllers
    if k < 1:
        print("--controllers must be at least 1", file=sys.stderr)
        return 2
    sd = (Path(args.state_dir) if args.state_dir else state_dir(cfg, cfg.cluster.id)).resolve()
    discovery = cfg.discovery.url or (f"lmdb://{sd / 'registry'}" if k > 1 else "")
    key = None
    if discovery:
        from fedpar.runtime import KEY_FILE, key_file

        key = key_file(sd / KEY_FILE, create=True)
    launcher = LocalLauncher(cluster_id=cfg.cluster.id, connection_file=path, state_dir=sd,
                             config_file=args.config, log_dir=sd / "logs", discovery=discovery, key=key)
    infos = [launcher.wait_controller(i, wait=30) for i in [launcher.spawn_controller() for _ in range(k)]]
    info = replace(infos[0], discovery=discovery,
                   controllers=tuple((x.client_endpoint, x.engine_endpoint) for x in infos) if discovery else ())
    write_connection_file(info, path)
    pids = launcher.start_engines(n)
    info = replace(info, engine_pids=tuple(pids), controller_pids=tuple(x.controller_pid for x in infos))
    write_connection_file(info, path)
    with Client(info) as client:
        try:
            client.wait_for_engines(n, timeout=args.timeout)
        except FedparError as exc:
            print(f"warning: {exc}; logs in {sd / 'logs'}", file=sys.stderr)
    ctl = ", ".join(str(x.controller_pid) for x in infos)
    print(f"cluster {cfg.cluster.id!r} started: controller pid{'s' if k > 1 else ''} {ctl}, {n} engines")
    print(f"connection file: {path}")
    return 0


def cmd_cluster_stop(args: argparse.Namespace) -> int:
    from fedpar.client.client import Client
    from fedpar.runtime import read_connection_file, remove_connection_file

    cfg = _config(args)
    path = _conn_path(args, cfg)
    info = read_connection_file(path, cfg)
    try:
        with Client(info, timeout=5) as client:
            client.shutdown(timeout=5)
    except FedparError as exc:
        print(f"controller did not answer ({exc}); signalling the processes", file=sys.stderr)
    pids = [p for p in (info.controller_pid, *info.controller_pids, *info.engine_pids) if _is_fedpar(p)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            if pid_alive(p):
                os.kill(p, sig)
        time.sleep(0.5 if sig == signal.SIGTERM else 0)
    remove_connection_file(path)
    print(f"cluster {info.cluster_id!r} stopped")
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    from fedpar.client.client import Client

    cfg = _config(args)
    with Client(_conn_path(args, cfg), timeout=5) as client:
        st = client.status()
    for c in st["controllers"]:
        print(f"controller {c['id']} (epoch {c['epoch']}, pid {c['pid']} on {c['host']}): {len(c['engines'])} "
              f"engine(s), {c['queued']} queued, {c['done']} done")
    print(f"engines: {len(st['engines'])}")
    for e in st["engines"]:
        print(f"  engine {e['id']}: pid {e['pid']} on {e['host']}, {e['load']} task(s) assigned")
    print(f"queue depth: {st['queued']}   in flight: {st['in_flight']}")
    print(f"tasks done: {st['done']}   failed: {st['failed']}")
    return 0


def _is_fedpar(pid: int) -> bool:
    """True if ``pid`` is a fedpar process (a stale connection file may name pids reused since)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"fedpar" in f.read()
    except OSError:
        return False



def cmd_config(_args: argparse.Namespace) -> int:
    print(default_config_text())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    try:
        bench_main = importlib.import_module("benchmarks.cli").main
    except ImportError:
        print("the benchmark harness ships with the source checkout: run from its top directory",
              file=sys.stderr)
        return 2
    return int(bench_main(args.rest) or 0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpar", description="fedpar: parallel Python on many cores and machines")
    p.add_argument("--log-level", default=os.environ.get("FEDPAR_LOG_LEVEL", "WARNING"))
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="an .ini file (default: $FEDPAR_CONFIG, else built-in defaults)")
        sp.add_argument("--cluster-id", "--cluster", dest="cluster_id",
                        help="cluster name (default: [cluster] id, 'default')")
        sp.add_argument("--connection-file", help="path of the connection file")

    def federated(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--discovery", help="registry URL of a federation: lmdb:///DIR, etcd://HOST:PORT, "
                                            "consul://HOST:PORT (default: [discovery] url)")
        sp.add_argument("--key-file", help="the cluster key, shared by every process of a federation (a "
                                           "controller creates it, 0600, when it does not exist)")

    c = sub.add_parser("controller", help="run a controller in the foreground")
    common(c)
    federated(c)
    c.add_argument("--state-dir", help="store directory; an existing one is resumed")
    c.add_argument("--host", help="address to bind (default 127.0.0.1)")
    c.add_argument("--parent-pid", type=int, help="stop when this process dies")
    c.add_argument("--key-stdin", action="store_true", help="read the cluster key (hex) from stdin")
    c.set_defaults(func=cmd_controller)

    e = sub.add_parser("engine", help="run an engine in the foreground")
    common(e)
    federated(e)
    e.add_argument("--index", type=int, help="this engine's number in its launch: with several controllers, "
                   "engine i registers first with controller i mod k, so a launch starts balanced")
    e.set_defaults(func=cmd_engine)

    cl = sub.add_parser("cluster", help="start, stop or inspect a background cluster")
    clsub = cl.add_subparsers(dest="action", required=True)
    s = clsub.add_parser("start", help="start a controller and engines in the background")
    common(s)
    s.add_argument("-n", type=int, help="number of engines (default: [engines] n)")
    s.add_argument("--controllers", type=int, default=1, help="controllers federated as one (default 1)")
    s.add_argument("--discovery", help="registry URL for the federation (default: an embedded one in the state "
                                       "directory when --controllers > 1)")
    s.add_argument("--state-dir")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the engines")
    s.set_defaults(func=cmd_cluster_start)
    st = clsub.add_parser("stop", help="stop a background cluster")
    common(st)
    st.set_defaults(func=cmd_cluster_stop)
    ss = clsub.add_parser("status", help="engines, queue depth, tasks done")
    common(ss)
    ss.set_defaults(func=cmd_cluster_status)

    cf = sub.add_parser("config", help="print a commented default configuration")
    cf.set_defaults(func=cmd_config)
    b = sub.add_parser("bench", help="run the benchmark harness (see benchmarks/)")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except FedparError as exc:
        print(f"fedpar: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
