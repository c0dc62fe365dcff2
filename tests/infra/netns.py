"""Simulated hosts for the infra tests: Linux network namespaces on a private bridge.

``Hosts(n)`` creates ``n`` "hosts", network namespaces named ``<prefix>1`` .. ``<prefix>n`` (the prefix holds
this process's pid and a per-process counter, e.g. ``fp4242n0h``, so sessions running side by side cannot
collide). Each host has its own loopback and an ``eth0`` with ``198.18.0.<i>/24`` (RFC 2544 benchmarking
range), and all ``eth0`` are plugged into one bridge that lives in a namespace of its own (``<prefix>sw``).
Nothing is added to the root namespace: the hosts reach each other and nothing else, and the root namespace
(the test process) cannot reach them; run a program on a host to talk to them.

``Hosts.run(i, argv)`` starts ``argv`` on host ``i`` (``ip netns exec``; with ``hostnames=True``, the default,
also in a UTS namespace of its own whose hostname is the host's name, as on a real machine) and returns the
``Popen``: ``setpriv``, ``ip``, ``unshare`` and ``sh`` all exec, so its pid is the program's pid. ``Hosts.down()``
kills every process it started (SIGKILL, by pid), then any process still inside one of its namespaces (by pid:
they can only be descendants of those), then deletes the namespaces, whatever state the test left; it also
runs from ``atexit``. Use it as a context manager. If the test process itself is killed (SIGKILL), the kernel
kills what it started (``setpriv --pdeathsig KILL``, when util-linux has it; the parent is the thread that
called ``run``, so call it from a thread that lives as long as the hosts), and the next session deletes the
namespaces left empty (``remove_stale``).

Needs root and iproute2 (``ip``); the per-host hostname also needs ``unshare`` (util-linux).
:func:`netns_problem` says why hosts cannot be made here, or None.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

SUBNET = ipaddress.IPv4Network("198.18.0.0/24")
IP_TIMEOUT = 20.0  # seconds for one `ip` command
_STALE = re.compile(r"^fp(\d+)n\d+(?:h\d+|sw)$")  # names made by Hosts with the default prefix
_counter = itertools.count()

# Sets the hostname in the new UTS namespace, then becomes the program (so the pid stays the program's).
_SET_HOSTNAME = 'hostname "$1" && shift && exec "$@"'


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be used here (not root, no iproute2, refused by the kernel, subnet in use)."""


def netns_problem() -> str | None:
    """Why :class:`Hosts` cannot work on this machine (a sentence naming what is missing), or None."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` command is missing: install iproute2 (apt-get install iproute2)"
    if shutil.which("unshare") is None or shutil.which("hostname") is None:
        return "`unshare` or `hostname` is missing: install util-linux and hostname"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` and wait (at most IP_TIMEOUT); raises NetnsUnavailable with its stderr if it fails."""
    try:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {e}") from e
    if check and r.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` exited with {r.returncode}: {r.stderr.strip()}")
    return r


def list_netns() -> list[str]:
    """Names of the network namespaces that ``ip netns`` knows."""
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    """Pids of the processes inside network namespace ``name`` (empty if it does not exist)."""
    r = _ip("netns", "pids", name, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()] if r.returncode == 0 else []


def subnet_in_use(subnet: ipaddress.IPv4Network = SUBNET) -> str | None:
    """What in the root namespace already covers ``subnet`` (an address or a route other than the default
    route), or None. Hosts on a subnet that the root namespace routes could be confused with real machines."""
    for line in json.loads(_ip("-j", "-4", "addr", "show").stdout or "[]"):
        for a in line.get("addr_info", []):
            if a.get("local") and ipaddress.IPv4Address(a["local"]) in subnet:
                return f"address {a['local']} on {line.get('ifname')}"
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = route.get("dst", "default")
        if dst == "default":
            continue
        try:
            net = ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            continue
        if net.overlaps(subnet):
            return f"route {dst} via {route.get('dev', '?')}"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete namespaces that an earlier, dead session of this module left behind (their owner pid is gone)
    and that hold no process. Namespaces still holding processes are left alone; returns what was deleted."""
    removed = []
    for name in list_netns():
        m = _STALE.match(name)
        stale = m is not None and not _alive(int(m.group(1))) and not netns_pids(name)
        if stale and _ip("netns", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed


@dataclass(frozen=True)
class Host:
    """One simulated host."""

    index: int  # 1-based
    netns: str  # network namespace name (also its hostname)
    address: str  # 198.18.0.<index>


class Hosts:
    """``n`` hosts on one bridge; see the module docstring."""

    def __init__(self, n: int, *, prefix: str | None = None, subnet: ipaddress.IPv4Network = SUBNET,
                 hostnames: bool = True):
        if not 1 <= n < subnet.num_addresses - 2:
            raise ValueError(f"cannot put {n} hosts on {subnet}")
        self.prefix = prefix or f"fp{os.getpid()}n{next(_counter)}h"
        self.subnet = subnet
        self.hostnames = hostnames
        self.switch = f"{self.prefix.removesuffix('h')}sw"
        self.hosts = [Host(i, f"{self.prefix}{i}", str(subnet.network_address + i)) for i in range(1, n + 1)]
        self.procs: list[subprocess.Popen[Any]] = []
        self._made: list[str] = []  # namespaces created, in order
        self._up = False

    # ---------------------------------------------------------------- life cycle
    def up(self) -> Hosts:
        """Create the namespaces, bridge and links; raises NetnsUnavailable (after undoing any part made)."""
        problem = netns_problem()
        if problem:
            raise NetnsUnavailable(problem)
        used = subnet_in_use(self.subnet)
        if used:
            raise NetnsUnavailable(f"refusing to simulate hosts on {self.subnet}: the root namespace has {used}")
        remove_stale()
        taken = {h.netns for h in self.hosts} | {self.switch}
        clash = taken & set(list_netns())
        if clash:
            raise NetnsUnavailable(f"network namespaces {sorted(clash)} already exist")
        atexit.register(self.down)
        self._up = True
        try:
            self._add(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for h in self.hosts:
                self._add(h.netns)
                # the veth pair is made inside the host; its peer goes straight to the switch namespace
                _ip("-n", h.netns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{h.index}",
                    "netns", self.switch)
                _ip("-n", self.switch, "link", "set", f"p{h.index}", "master", "br0")
                _ip("-n", self.switch, "link", "set", f"p{h.index}", "up")
                _ip("-n", h.netns, "addr", "add", f"{h.address}/{self.subnet.prefixlen}", "dev", "eth0")
                _ip("-n", h.netns, "link", "set", "eth0", "up")
        except BaseException:
            self.down()
            raise
        return self

    def _add(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def __enter__(self) -> Hosts:
        return self.up()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    def down(self) -> list[str]:
        """Kill every process started here, then anything left in the namespaces (SIGKILL, by pid), then delete
        the namespaces. Safe to call again. Returns notes on what had to be cleaned beyond the started processes
        (empty when all went as expected); raises RuntimeError if a namespace could not be deleted."""
        notes: list[str] = []
        for proc in self.procs:
            self.kill(proc)
        failed = []
        for name in reversed(self._made):
            for attempt in range(50):
                left = netns_pids(name)
                if not left:
                    break
                if attempt == 0:
                    notes.append(f"{name} still had pids {left} (killed)")
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)  # (a killed process leaves the namespace when it is reaped)
            if _ip("netns", "del", name, check=False).returncode != 0 and name in list_netns():
                failed.append(name)
        self._made = [n for n in self._made if n in failed]
        if self._up and not failed:
            self._up = False
            atexit.unregister(self.down)
        if failed:
            raise RuntimeError(f"could not delete network namespaces {failed}; delete them with `ip netns del`")
        return notes

    # ---------------------------------------------------------------- processes
    def host(self, i: int | Host) -> Host:
        """Host ``i`` (1-based)."""
        if isinstance(i, Host):
            return i
        if not 1 <= i <= len(self.hosts):
            raise IndexError(f"no host {i}: hosts are 1..{len(self.hosts)}")
        return self.hosts[i - 1]

    def command(self, i: int | Host, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` on host ``i``."""
        h = self.host(i)
        if not self._up:
            raise RuntimeError("the hosts are not up")
        wrap = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        wrap += ["ip", "netns", "exec", h.netns]
        if self.hostnames:
            wrap += ["unshare", "--uts", "--", "sh", "-c", _SET_HOSTNAME, "sh", h.netns]
        return [*wrap, *argv]

    def run(self, i: int | Host, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            cwd: str | Path | None = None, stdin: int | IO[Any] | None = subprocess.DEVNULL,
            stdout: int | IO[Any] | None = None, stderr: int | IO[Any] | None = None,
            text: bool = False) -> subprocess.Popen[Any]:
        """Start ``argv`` on host ``i`` in a session of its own; the Popen's pid is the program's pid. The
        process is killed by :meth:`down` unless it has ended by then."""
        proc = subprocess.Popen(self.command(i, argv), env=dict(env) if env is not None else None, cwd=cwd,
                                stdin=stdin, stdout=stdout, stderr=stderr, text=text, start_new_session=True)
        self.procs.append(proc)
        return proc

    def call(self, i: int | Host, argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on host ``i`` to the end and return its output (text); killed when ``timeout`` runs out
        (then ``subprocess.TimeoutExpired`` is raised)."""
        proc = self.run(i, argv, env=env, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        finally:
            self.kill(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    @staticmethod
    def kill(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL, wait: float = 10.0) -> None:
        """Send ``sig`` to ``proc`` by pid unless it has ended, then reap it (SIGKILL only: wait up to ``wait``)."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            if sig == signal.SIGKILL:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None and sig == signal.SIGKILL:
                with contextlib.suppress(OSError):
                    f.close()
