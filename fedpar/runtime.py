"""The per-user runtime directory, state directories and connection files.

A connection file (``<runtime dir>/cluster-<id>.json``) tells clients and engines where a cluster's
controller listens and holds its key, so it is written atomically with mode 0600 inside a 0700
directory: no reader ever sees a partial file, and no other user can read it even briefly.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import fcntl
import json
import logging
import os
import secrets
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fedpar.config import Config, check_cluster_id
from fedpar.errors import ClusterError, ConfigError, ConnectionFileError

__all__ = [
    "CONNECTION_FILE_ENV",
    "RUNTIME_DIR_ENV",
    "ConnectionInfo",
    "check_state_dir_free",
    "connection_file_path",
    "key_file",
    "lock_state_dir",
    "new_cluster_id",
    "read_connection_file",
    "read_key_file",
    "remove_connection_file",
    "runtime_dir",
    "state_dir",
    "state_dir_holder",
    "write_connection_file",
]

log = logging.getLogger(__name__)

RUNTIME_DIR_ENV = "FEDPAR_RUNTIME_DIR"
CONNECTION_FILE_ENV = "FEDPAR_CONNECTION_FILE"
_MIN_KEY_BYTES = 16
KEY_FILE = "cluster.key"  # a controller's state directory keeps its cluster key there


@dataclass(frozen=True)
class ConnectionInfo:
    """What a client or engine needs to join a cluster. ``key`` is the cluster key: keep it secret."""

    cluster_id: str
    key: bytes
    client_endpoint: str
    engine_endpoint: str
    controller_id: str
    controller_pid: int
    state_dir: str
    created: float
    engine_pids: tuple[int, ...] = ()
    discovery: str = ""  # the federation's registry URL ("" for a lone controller)
    controllers: tuple[tuple[str, str], ...] = ()  # (client, engine) endpoints of every controller at writing
    controller_pids: tuple[int, ...] = ()  # every controller's pid when several were started together

    def __repr__(self) -> str:  # never print the key by accident
        shown = ", ".join(
            f"{f.name}={'<hidden>' if f.name == 'key' else repr(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
        )
        return f"ConnectionInfo({shown})"


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def new_cluster_id() -> str:
    """A short random cluster id (8 hex characters)."""
    return secrets.token_hex(4)


def _secure_dir(path: Path, what: str) -> Path:
    """Create ``path`` (mode 0700) or tighten an existing one we own; refuse one owned by someone else."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # exists but is not a directory: reported below
    except OSError as exc:
        raise ConnectionFileError(f"cannot create the {what} {path}: {exc}") from exc
    try:
        st = path.stat()
    except OSError as exc:
        raise ConnectionFileError(f"cannot inspect the {what} {path}: {exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise ConnectionFileError(f"the {what} {path} exists but is not a directory")
    if sys.platform == "win32":
        return path
    if st.st_uid != os.getuid():
        raise ConnectionFileError(
            f"the {what} {path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}): another "
            "user could read or replace cluster keys there. Use a directory of your own "
            f"(set ${RUNTIME_DIR_ENV} or [cluster] runtime_dir / [controller] state_dir)"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        try:
            path.chmod(0o700)
        except OSError as exc:
            raise ConnectionFileError(
                f"the {what} {path} has mode {stat.S_IMODE(st.st_mode):#o} and cannot be set to 0700: {exc}"
            ) from exc
    return path


def _env_dir(name: str) -> Path | None:
    value = os.environ.get(name, "")
    return Path(value) if value and os.path.isabs(value) else None


def runtime_dir(config: Config | None = None) -> Path:
    """The per-user directory of connection files, created with mode 0700.

    ``[cluster] runtime_dir`` if set, else ``$FEDPAR_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/fedpar`` when
    that directory exists, else ``~/.fedpar/runtime``. An existing directory with group/other
    permissions is tightened to 0700; one owned by another user raises ``ConnectionFileError``.
    """
    if config is not None and config.cluster.runtime_dir:
        path = Path(config.cluster.runtime_dir).expanduser()
    elif os.environ.get(RUNTIME_DIR_ENV):
        path = Path(os.environ[RUNTIME_DIR_ENV]).expanduser()
    elif (xdg := _env_dir("XDG_RUNTIME_DIR")) is not None and xdg.is_dir():
        path = xdg / "fedpar"
    else:
        path = Path.home() / ".fedpar" / "runtime"
    return _secure_dir(path, "runtime directory")


def state_dir(config: Config | None, cluster_id: str) -> Path:
    """The controller's state directory (LMDB), created with mode 0700.

    ``[controller] state_dir`` if set, else ``${XDG_STATE_HOME:-~/.local/state}/fedpar/<cluster_id>``.
    """
    if config is not None and config.controller.state_dir:
        path = Path(config.controller.state_dir).expanduser()
    else:
        base = _env_dir("XDG_STATE_HOME") or Path.home() / ".local" / "state"
        path = base / "fedpar" / check_cluster_id(cluster_id)
    return _secure_dir(path, "state directory")


LOCK_FILE = "controller.lock"


def lock_state_dir(path: Path, *, wait: float = 0.0) -> IO[str]:
    """Take the state directory's controller lock and return the open lock file: keep it open for as long
    as the controller runs (the kernel releases the lock when the process ends, however it ends).

    One controller per state directory: a second one would recover the first one's unfinished tasks as its
    own and run them again. Waits up to ``wait`` seconds for a previous controller to finish exiting, then
    raises ``ClusterError`` naming the process that holds it.
    """
    f = open(path / LOCK_FILE, "a+")  # noqa: SIM115 - the caller keeps it open
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _holder_pid(f)
                f.close()
                raise ClusterError(_in_use(path, holder)) from None
            time.sleep(0.05)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def state_dir_holder(path: Path) -> int | None:
    """The pid of the controller holding ``path``'s lock (0 if unknown), or None when no controller does."""
    try:
        f = open(path / LOCK_FILE)  # noqa: SIM115
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_pid(f)
        return None  # (closing the file drops the shared lock)


def check_state_dir_free(path: Path, *, wait: float = 0.0) -> None:
    """Raise ``ClusterError`` if a controller still holds ``path`` after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while (holder := state_dir_holder(path)) is not None:
        if time.monotonic() >= deadline:
            raise ClusterError(_in_use(path, holder))
        time.sleep(0.05)


def _holder_pid(f: IO[str]) -> int:
    try:
        f.seek(0)
        return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _in_use(path: Path, holder: int) -> str:
    who = f"controller pid {holder}" if holder else "another controller"
    return (f"state directory {path} is in use by {who}: one controller per state directory (a second one "
            "would run the first one's tasks again); stop that cluster, or give this one its own state_dir")


def connection_file_path(cluster_id: str, config: Config | None = None) -> Path:
    """``<runtime dir>/cluster-<cluster_id>.json`` (creates the runtime directory if needed)."""
    check_cluster_id(cluster_id)
    return runtime_dir(config) / f"cluster-{cluster_id}.json"


def _to_json(info: ConnectionInfo) -> str:
    data: dict[str, Any] = dataclasses.asdict(info)
    data["key"] = base64.b64encode(info.key).decode("ascii")
    data["engine_pids"] = list(info.engine_pids)
    data["controllers"] = [list(c) for c in info.controllers]
    data["controller_pids"] = list(info.controller_pids)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_connection_file(
    info: ConnectionInfo, path: Path | None = None, config: Config | None = None
) -> Path:
    """Write ``info`` atomically with mode 0600 and return the path.

    The default path is ``connection_file_path(info.cluster_id, config)``. The data goes to a fresh
    0600 temporary file in the same directory, is fsynced, then renamed over the target, so readers
    see either the old file or the complete new one.
    """
    if path is None:
        path = connection_file_path(info.cluster_id, config)
    else:
        path = Path(path)
        if not path.parent.exists():
            _secure_dir(path.parent, "connection file directory")
    data = _to_json(info).encode("utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise ConnectionFileError(f"cannot write connection file {path}: {exc}") from exc
    try:
        try:
            if sys.platform != "win32":
                os.fchmod(fd, 0o600)  # exact mode whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConnectionFileError(f"cannot write connection file {path}: {exc}") from exc
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (best effort: not every platform or filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _resolve(path_or_cluster_id: str | Path | None, config: Config | None) -> Path:
    if isinstance(path_or_cluster_id, Path):
        return path_or_cluster_id
    if path_or_cluster_id is None:
        if os.environ.get(CONNECTION_FILE_ENV):
            return Path(os.environ[CONNECTION_FILE_ENV])
        path_or_cluster_id = config.cluster.id if config is not None else "default"
    elif os.sep in path_or_cluster_id or "/" in path_or_cluster_id or path_or_cluster_id.endswith(".json"):
        return Path(path_or_cluster_id)
    try:
        return connection_file_path(path_or_cluster_id, config)
    except ConfigError as exc:
        raise ConnectionFileError(
            f"{path_or_cluster_id!r} is neither a file path nor a cluster id: {exc}"
        ) from exc


def _field(data: dict[str, Any], name: str, types: type | tuple[type, ...], path: Path) -> Any:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, types):
        raise ConnectionFileError(f"connection file {path}: field {name!r} has the wrong type ({value!r})")
    return value


def read_connection_file(
    path_or_cluster_id: str | Path | None = None, config: Config | None = None
) -> ConnectionInfo:
    """Read a connection file given by path, by cluster id (looked up in the runtime directory), or
    ``None`` (``$FEDPAR_CONNECTION_FILE`` if set, else the configured cluster id, ``"default"``).

    A string containing a path separator or ending in ``.json`` is a path; any other string is a
    cluster id. Raises ``ConnectionFileError`` if the file is missing or malformed.
    """
    path = _resolve(path_or_cluster_id, config)
    try:
        with open(path, "rb") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            raw = fh.read()
    except FileNotFoundError:
        raise ConnectionFileError(
            f"no connection file at {path}: is the cluster running? start one with `fedpar cluster start`"
        ) from None
    except OSError as exc:
        raise ConnectionFileError(f"cannot read connection file {path}: {exc}") from exc
    if mode & 0o077 and sys.platform != "win32":
        log.warning("connection file %s is readable by other users (mode %#o); it holds the cluster key: "
                    "chmod 600 it", path, mode)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConnectionFileError(f"connection file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConnectionFileError(f"connection file {path} does not hold a JSON object")
    required = [f.name for f in dataclasses.fields(ConnectionInfo) if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConnectionFileError(f"connection file {path} lacks field(s): {', '.join(missing)}")
    try:
        key = base64.b64decode(_field(data, "key", str, path), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConnectionFileError(f"connection file {path}: 'key' is not valid base64: {exc}") from exc
    if len(key) < _MIN_KEY_BYTES:
        raise ConnectionFileError(
            f"connection file {path}: the key has {len(key)} bytes, at least {_MIN_KEY_BYTES} are needed")
    pids = data.get("engine_pids", [])
    cpids = data.get("controller_pids", [])
    for name, value in (("engine_pids", pids), ("controller_pids", cpids)):
        if not isinstance(value, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in value):
            raise ConnectionFileError(f"connection file {path}: {name!r} must be a list of integers")
    discovery = data.get("discovery", "")
    controllers = data.get("controllers", [])
    if not isinstance(discovery, str) or not isinstance(controllers, list) or not all(
            isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c) for c in controllers):
        raise ConnectionFileError(f"connection file {path}: 'discovery' must be a string and 'controllers' a list "
                                  "of [client endpoint, engine endpoint] pairs")
    return ConnectionInfo(
        discovery=discovery,
        controllers=tuple((c[0], c[1]) for c in controllers),
        cluster_id=_field(data, "cluster_id", str, path),
        key=key,
        client_endpoint=_field(data, "client_endpoint", str, path),
        engine_endpoint=_field(data, "engine_endpoint", str, path),
        controller_id=_field(data, "controller_id", str, path),
        controller_pid=_field(data, "controller_pid", int, path),
        state_dir=_field(data, "state_dir", str, path),
        created=float(_field(data, "created", (int, float), path)),
        engine_pids=tuple(pids),
        controller_pids=tuple(cpids),
    )


def read_key_file(path: Path) -> bytes:
    """A cluster key from a file (raw bytes, at least 16; the ``cluster.key`` of a state directory has 32).

    Refuses a file other users can read or write: whoever holds the key can run code on the engines."""
    try:
        with open(path, "rb") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            key = fh.read(4097)
    except OSError as exc:
        raise ConfigError(f"cannot read the cluster key file {path}: {exc}") from exc
    if mode & 0o077 and sys.platform != "win32":
        raise ConfigError(f"the cluster key file {path} has mode {mode:#o}: other users could read it; "
                          f"chmod 600 {path}")
    if not _MIN_KEY_BYTES <= len(key) <= 4096:
        raise ConfigError(f"the cluster key file {path} holds {len(key)} bytes; a key has 16 to 4096 (fedpar makes "
                          "32-byte keys)")
    return key


def key_file(path: Path, *, create: bool = False) -> bytes:
    """The cluster key kept in ``path`` (checked as ``read_key_file`` does). With ``create``, a new key is
    written there first if there is none: mode 0600 from its first byte, and atomically (linked into place),
    so processes starting together all read the one key that won."""
    if create and not path.exists():
        from fedpar.wire.signing import new_cluster_key

        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(new_cluster_key())
            os.link(tmp, path)
        except FileExistsError:
            pass  # (another process made it first: use that one)
        finally:
            tmp.unlink(missing_ok=True)
    return read_key_file(path)


def remove_connection_file(path: str | Path) -> None:
    """Delete a connection file; a missing file is fine."""
    Path(path).unlink(missing_ok=True)
