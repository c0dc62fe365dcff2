"""``Cluster``: start a controller and engines from the user's own script, and stop them cleanly.

    with fedpar.Cluster(n=4) as client:
        print(client[:].apply_sync(os.getpid))

The ``with`` block yields a connected ``Client`` once ``n`` engines are up, and on exit (normal, an
exception, or Ctrl-C) stops every process it started: a shutdown request first, then SIGTERM, then
SIGKILL for anything still alive. An ``atexit`` hook and the controller's parent watch cover scripts
that never reach ``stop()``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fedpar.client.client import Client
from fedpar.config import Config, load_config
from fedpar.errors import ClusterError, FedparError
from fedpar.launch.local import LocalLauncher
from fedpar.runtime import ConnectionInfo, connection_file_path, new_cluster_id


class Cluster:
    """A controller plus ``n`` engines on this machine, owned by this Python process.

    ``state_dir`` keeps the controller's store (results, task records) across runs; by default a fresh
    temporary one is used and deleted on ``stop()``. ``config`` is a ``Config`` or a path to an ``.ini``.
    """

    def __init__(
        self,
        n: int | None = None,
        *,
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
        self.cluster_id = cluster_id or new_cluster_id()
        self._own_state = state_dir is None
        self.state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix=f"fedpar-{self.cluster_id}-"))
        self.connection_file = connection_file_path(self.cluster_id, self.config)
        self.log_dir = Path(log_dir) if log_dir else self.state_dir / "logs"
        self._launcher: LocalLauncher | None = None
        self._client: Client | None = None
        self.info: ConnectionInfo | None = None
        self._started = 0  # engines started (n plus add_engines)

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> Cluster:
        """Start the controller and the engines (returns at once; see ``wait_for_engines``)."""
        if self._launcher is not None:
            raise ClusterError("this cluster is already started")
        config_file = self._config_file
        if config_file is None:  # a Config object (or defaults): hand the children the same settings
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = self.state_dir / "fedpar.ini"
            path.write_text(self.config.to_ini())
            config_file = str(path)
        self._launcher = LocalLauncher(
            cluster_id=self.cluster_id, connection_file=self.connection_file, state_dir=self.state_dir,
            config_file=config_file, log_dir=self.log_dir, parent_pid=os.getpid(),
        )
        atexit.register(self.stop)
        try:
            self.info = self._launcher.start_controller(wait=timeout)
            self._launcher.start_engines(self.n)
            self._started = self.n
        except BaseException:
            self.stop()
            raise
        return self

    def add_engines(self, n: int) -> list[int]:
        """Start ``n`` more engines; returns their pids."""
        if self._launcher is None:
            raise ClusterError("start the cluster first")
        pids = self._launcher.start_engines(n)
        self._started += n
        return pids

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
        if self._launcher is not None and self._launcher.controller is not None:
            code = self._launcher.controller.poll()
            if code is not None:
                raise ClusterError(f"the controller exited with code {code}; see {self.log_dir / 'controller.log'}")

    @property
    def controller_pid(self) -> int | None:
        c = self._launcher.controller if self._launcher else None
        return c.pid if c is not None else None

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
            if launcher.pids() and self.info is not None:
                try:
                    with Client(self.info, timeout=2.0) as c:
                        c.shutdown(timeout=2.0)
                except FedparError:
                    pass  # the signals below finish the job
            launcher.stop(grace=grace)
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
        return f"<fedpar.Cluster {self.cluster_id} n={self.n} {state}>"
