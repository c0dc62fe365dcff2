"""Where a client or an engine finds a federation's controllers: its connection file, then the registry.

A connection file lists the controllers at the time it was written (``ConnectionInfo.controllers``) and
the federation's registry (``ConnectionInfo.discovery``); ``endpoints`` gives every endpoint to try, the
live registry's last. ``connection_info`` makes the connection info of a federation known only by its
registry URL and cluster name (``Client(discovery=..., cluster=...)``, ``fedpar engine --discovery``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fedpar.errors import ConfigError, ControllerUnavailable, FedparError
from fedpar.federation.discovery import live_controllers
from fedpar.runtime import ConnectionInfo, read_connection_file, read_key_file

log = logging.getLogger(__name__)


def endpoints(info: ConnectionInfo, role: str) -> list[str]:
    """The ``role`` ("client" or "engine") endpoints to try: the connection file's controller(s), then the
    discovery registry's live ones (a registry that cannot be read is logged and skipped)."""
    pick = 0 if role == "client" else 1
    out = [info.client_endpoint if role == "client" else info.engine_endpoint, *(c[pick] for c in info.controllers)]
    if info.discovery:
        try:
            live = live_controllers(info.discovery, info.cluster_id, info.key)
            out.extend(e.client_endpoint if role == "client" else e.engine_endpoint for e in live)
        except FedparError as exc:
            log.warning("cannot read the discovery registry %s: %s", info.discovery, exc)
    return list(dict.fromkeys(e for e in out if e))


def connection_info(url: str, cluster: str | None, key: bytes | str | os.PathLike[str] | None) -> ConnectionInfo:
    """The connection info of the federation ``cluster`` registered at ``url``; ``key`` is the cluster key,
    a path to a file holding it, or None for the key of a connection file of that cluster on this host."""
    if not cluster:
        raise ConfigError("Client(discovery=...) needs cluster=NAME: the federation's name in the registry")
    if key is None:
        try:
            key = read_connection_file(cluster).key
        except FedparError:
            raise ConfigError(
                f"Client(discovery=..., cluster={cluster!r}) needs the cluster key: key=bytes or key=<path of a "
                "key file>, or a connection file for that cluster in the runtime directory") from None
    elif not isinstance(key, bytes):
        key = read_key_file(Path(key).expanduser())
    live = live_controllers(url, cluster, key)
    if not live:
        raise ControllerUnavailable(f"no live controller of cluster {cluster!r} is registered at {url}")
    first = live[0]
    return ConnectionInfo(
        cluster_id=cluster, key=key, client_endpoint=first.client_endpoint, engine_endpoint=first.engine_endpoint,
        controller_id=first.cid, controller_pid=first.pid, state_dir=first.state_dir, created=time.time(),
        discovery=url, controllers=tuple((e.client_endpoint, e.engine_endpoint) for e in live))
