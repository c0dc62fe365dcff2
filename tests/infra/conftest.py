"""Fixtures that start real services for the ``infra`` tests.

``etcd_server`` (session scope) runs one real single-member etcd (Debian's etcd-server 3.4, ``/usr/bin/etcd``)
on free loopback ports with a temporary data directory, waits for ``/health``, and kills it by pid at the
end, whatever happened (also from ``atexit`` if the session dies first). ``etcd_url`` is its registry URL
``etcd://127.0.0.1:PORT``. The :class:`EtcdServer` object can stop and start that etcd again on the same
ports and data directory (``stop``, ``start``, ``restart``, ``outage(seconds)``), or freeze it with SIGSTOP
so that requests hang until the client's timeout (``frozen()``).

Without an etcd binary the tests skip with the reason, except under ``FEDPAR_CI`` (set it in CI), where a
missing etcd is a failure that says what to install.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ETCD_PACKAGE_HINT = "install Debian's etcd-server package (apt-get install etcd-server), which provides /usr/bin/etcd"


def find_etcd() -> str | None:
    """The etcd binary: ``$FEDPAR_ETCD``, else ``etcd`` on PATH, else /usr/bin/etcd."""
    for candidate in (os.environ.get("FEDPAR_ETCD"), shutil.which("etcd"), "/usr/bin/etcd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (bound to port 0, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdServer:
    """One real etcd process on fixed loopback ports and a fixed data directory; restartable."""

    def __init__(self, binary: str, data_dir: Path, client_port: int, peer_port: int):
        self.binary = binary
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    @property
    def url(self) -> str:
        """The fedpar registry URL of this etcd."""
        return f"etcd://127.0.0.1:{self.client_port}"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 30) -> None:
        """Start etcd (same ports, same data) and wait until ``/health`` says true."""
        if self.proc is not None and self.proc.poll() is None:
            return
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            self.binary, "--name", "fedpar-test", "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"fedpar-test={peer}", "--initial-cluster-state", "new",
            "--log-level", "warn", "--logger", "zap",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode} at start; log {self.log_path}:\n"
                                   f"{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"etcd did not become healthy within {timeout}s; log {self.log_path}:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM etcd and wait for it (SIGKILL after ``timeout``). Data and ports stay for :meth:`start`."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a frozen etcd cannot handle SIGTERM
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL etcd by pid (no-op if it is gone)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    def restart(self) -> None:
        """Stop, then start again on the same ports and data directory."""
        self.stop()
        self.start()

    @contextlib.contextmanager
    def outage(self, seconds: float | None = None) -> Iterator[None]:
        """etcd is down inside the block (and at least ``seconds`` long); started again after it."""
        self.stop()
        t0 = time.monotonic()
        try:
            yield
        finally:
            if seconds is not None:
                time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
            self.start()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """etcd is stopped with SIGSTOP inside the block: connections open, nothing answers."""
        assert self.proc is not None and self.proc.poll() is None, "etcd is not running"
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            if self.proc is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGCONT)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/infra is an ``infra`` test, marked or not."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.infra)


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A real etcd for the whole session (see the module docstring)."""
    binary = find_etcd()
    if binary is None:
        if os.environ.get("FEDPAR_CI"):
            pytest.fail(f"etcd is not installed but FEDPAR_CI is set: {ETCD_PACKAGE_HINT}")
        pytest.skip(f"no etcd binary (infra test): {ETCD_PACKAGE_HINT}, or point FEDPAR_ETCD at one")
    base = tmp_path_factory.mktemp("etcd")
    for attempt in range(3):  # a port picked here may be taken by someone else before etcd binds it
        client_port, peer_port = free_ports(2)
        server = EtcdServer(binary, base / f"data{attempt}", client_port, peer_port)
        atexit.register(server.kill)
        try:
            server.start()
            break
        except RuntimeError:
            server.kill()
            atexit.unregister(server.kill)
            if attempt == 2 or "address already in use" not in server.log_tail():
                raise
    try:
        yield server
    finally:
        server.stop()
        server.kill()
        atexit.unregister(server.kill)


@pytest.fixture(scope="session")
def etcd_url(etcd_server: EtcdServer) -> str:
    """``etcd://127.0.0.1:PORT`` of the session's real etcd."""
    return etcd_server.url
