"""``Cluster``: start controllers and engines from the user's own script, and stop them cleanly.

    with fedpar.Cluster(n=4) as client:
        print(client[:].apply_sync(os.getpid))

    with fedpar.Cluster(n=6, controllers=3) as client:     # three controllers federated as one
        ...

The ``with`` block yields a connected ``Client`` once ``n`` engines are up, and on exit (normal, an
exception, or Ctrl-C) stops every process it started: a shutdown request first, then signals, then
SIGKILL for anything still alive. An ``atexit`` hook and the controllers' parent watch cover scripts
that never reach ``stop()``.

The controllers federate through a discovery registry: by default an embedded one in the cluster's state
directory (``lmdb://<state_dir>/registry``), so controllers can be added and stopped while work runs.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fedpar.client.client import Client
from fedpar.config import Config, load_config
from fedpar.errors import ClusterError, FedparError
from fedpar.launch.local import LocalLauncher
from fedpar.runtime import (
    KEY_FILE,
    ConnectionInfo,
    connection_file_path,
    key_file,
    new_cluster_id,
    remove_connection_file,
    write_connection_file,
)


class Cluster:
    """Controllers plus ``n`` engines on this machine, owned by this Python process.

    ``controllers`` controller processes federate into one logical controller (``add_controller`` and
    ``stop_controller`` change that while work runs). ``discovery`` is the registry URL they federate through
    (default ``[discovery] url``, else an embedded registry in the state directory). ``state_dir`` keeps the
    controllers' stores (results, task records) across runs; by default a fresh temporary one is used and
    deleted on ``stop()``. ``config`` is a ``Config`` or a path to an ``.ini``.
    """

    def __init__(
        self,
        n: int | None = None,
        *,
        controllers: int = 1,
        discovery: str | None = None,
        cluster_id: str | None = None,
        config: Config | str | os.PathLike[str] | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
    ):
        self.config = config if isinstance(config, Config) else load_config(config)
        self._config_file = None if isinstance(config, Config) or config is None else os.fspath(config)
        self.n = self.config.engines.n if n is None else n
        if self.n < 0:
            raise ValueError("n must be >= 0")
        if controllers < 1:
            raise ValueError("controllers must be >= 1")
        self.controllers = controllers
        self.cluster_id = cluster_id or new_cluster_id()
        self._own_state = state_dir is None
        self.state_dir = (Path(state_dir).resolve() if state_dir
                          else Path(tempfile.mkdtemp(prefix=f"fedpar-{self.cluster_id}-")))
        self.discovery = discovery or self.config.discovery.url or f"lmdb://{self.state_dir / 'registry'}"
        self.connection_file = connection_file_path(self.cluster_id, self.config)
        self.log_dir = Path(log_dir) if log_dir else self.state_dir / "logs"
        self._launcher: LocalLauncher | None = None
        self._client: Client | None = None
        self.info: ConnectionInfo | None = None
        self._infos: dict[int, ConnectionInfo] = {}  # controller number -> its connection info
        self._started = 0  # engines started (n plus add_engines)

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> Cluster:
        """Start the controllers and the engines (returns once the controllers serve; see ``wait_for_engines``)."""
        if self._launcher is not None:
            raise ClusterError("this cluster is already started")
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        config_file = self._config_file
        if config_file is None:  # a Config object (or defaults): hand the children the same settings
            path = self.state_dir / "fedpar.ini"
            path.write_text(self.config.to_ini())
            config_file = str(path)
        self._launcher = LocalLauncher(
            cluster_id=self.cluster_id, connection_file=self.connection_file, state_dir=self.state_dir,
            config_file=config_file, log_dir=self.log_dir, parent_pid=os.getpid(), discovery=self.discovery,
            key=key_file(self.state_dir / KEY_FILE, create=True),  # (its first controller's, if it ran before)
        )
        atexit.register(self.stop)
        try:
            started = [self._launcher.spawn_controller() for _ in range(self.controllers)]
            for i in started:
                self._infos[i] = self._launcher.wait_controller(i, wait=timeout)
            self._publish()
            self._launcher.start_engines(self.n)
            self._started = self.n
        except BaseException:
            self.stop()
            raise
        return self

    def _publish(self) -> None:
        """Write the cluster's connection file: every live controller, the registry, the key."""
        launcher = self._launcher
        assert launcher is not None
        live = [i for i in sorted(self._infos) if launcher.controllers[i].poll() is None]
        if not live:
            return
        first = self._infos[live[0]]
        self.info = dataclasses.replace(
            first, discovery=self.discovery,
            controllers=tuple((self._infos[i].client_endpoint, self._infos[i].engine_endpoint) for i in live),
            engine_pids=tuple(p.pid for p in launcher.engines))
        write_connection_file(self.info, self.connection_file)

    def add_engines(self, n: int) -> list[int]:
        """Start ``n`` more engines; returns their pids."""
        if self._launcher is None:
            raise ClusterError("start the cluster first")
        pids = self._launcher.start_engines(n)
        self._started += n
        return pids

    def add_controller(self, timeout: float = 30.0) -> int:
        """Start one more controller, which joins the federation while work runs (engines whose placement
        now names it move to it once idle). Returns its number (for ``stop_controller``)."""
        if self._launcher is None:
            raise ClusterError("start the cluster first")
        i = self._launcher.spawn_controller()
        self._infos[i] = self._launcher.wait_controller(i, wait=timeout)
        self._publish()
        return i

    def restart_controller(self, i: int, timeout: float = 30.0) -> None:
        """Start controller number ``i`` again on its state directory (after it died or was stopped): the
        results it stored become retrievable again, and it rejoins the federation."""
        if self._launcher is None:
            raise ClusterError("start the cluster first")
        self._launcher.spawn_controller(i)
        self._infos[i] = self._launcher.wait_controller(i, wait=timeout)
        self._publish()

    def stop_controller(self, i: int, grace: float = 30.0) -> None:
        """Stop controller number ``i`` while the others run: it hands its work over (its engines move to the
        others with what they hold, clients resubmit its queued tasks) and exits."""
        if self._launcher is None or not 0 <= i < len(self._launcher.controllers):
            raise ClusterError(f"no controller number {i} in this cluster")
        self._launcher.stop_controller(i, grace=grace)
        self._publish()

    def connect_client(self, timeout: float = 10.0) -> Client:
        """A new ``Client`` connected to this cluster."""
        if self.info is None:
            raise ClusterError("start the cluster first")
        return Client(self.info, timeout=timeout)

    def wait_for_engines(self, n: int | None = None, timeout: float | None = 60.0) -> list[int]:
        """Block until ``n`` (default: all started) engines are registered; returns their ids."""
        if self._client is None:
            self._client = self.connect_client()
        try:
            return self._client.wait_for_engines(self._started if n is None else n, timeout)
        except FedparError:
            self._check_alive()
            raise

    def start_and_connect(self, n: int | None = None, timeout: float | None = 60.0) -> Client:
        """Start, wait for the engines, and return a connected client."""
        self.start()
        client = self.connect_client()
        try:
            client.wait_for_engines(self.n if n is None else n, timeout)
        except BaseException:
            client.close()
            self._check_alive()
            raise
        return client

    def _check_alive(self) -> None:
        if self._launcher is None or not self._launcher.controllers:
            return
        if all(p.poll() is not None for p in self._launcher.controllers):
            code = self._launcher.controllers[0].returncode
            raise ClusterError(f"the controller exited with code {code}; see {self._launcher.controller_log(0)}")

    @property
    def controller_pid(self) -> int | None:
        """The pid of the first live controller (see ``controller_pids``)."""
        pids = self.controller_pids
        return pids[0] if pids else None

    @property
    def controller_pids(self) -> list[int]:
        """Pids of the live controller processes."""
        return self._launcher.controller_pids() if self._launcher else []

    @property
    def engine_pids(self) -> list[int]:
        return [p.pid for p in self._launcher.engines] if self._launcher else []

    def pids(self) -> list[int]:
        """Pids of every live process this cluster started."""
        return self._launcher.pids() if self._launcher else []

    def stop(self, grace: float = 5.0) -> None:
        """Stop everything this cluster started; safe to call twice."""
        atexit.unregister(self.stop)
        if self._client is not None:
            self._client.close()
            self._client = None
        launcher, self._launcher = self._launcher, None
        if launcher is not None:
            if launcher.controller_pids() and self.info is not None:
                try:
                    with Client(self.info, timeout=2.0) as c:
                        c.shutdown(timeout=2.0)
                except FedparError:
                    pass  # the signals below finish the job
            launcher.stop(grace=grace)
            remove_connection_file(self.connection_file)
        if self._own_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Client:
        self.start()
        try:
            self._client = self.connect_client()
            self._client.wait_for_engines(self.n)
        except BaseException:
            self.stop()
            raise
        return self._client

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._launcher else "stopped"
        return f"<fedpar.Cluster {self.cluster_id} n={self.n} controllers={self.controllers} {state}>"



