"""Configuration: standard ``.ini`` files read once into frozen dataclasses, then passed down.

No file is needed: every value has a default. ``load_config`` reads an explicit path, else the file
named by ``$FEDPAR_CONFIG``, else nothing, then applies ``overrides`` (how CLI flags win over the
file). Unknown sections and keys are errors, so a typo never passes silently; ``[launcher:*]``
sections are accepted and ignored here (their launchers read them). Values are converted by the
field's annotated type; sizes accept ``KiB MiB GiB TiB`` (or ``K M G T``) suffixes. Ranges are checked
in ``__post_init__``, so ``dataclasses.replace`` validates too.
"""

from __future__ import annotations

import configparser
import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from fedpar.errors import ConfigError

__all__ = [
    "CONFIG_ENV", "ClusterConfig", "Config", "ControllerConfig", "DiscoveryConfig", "EnginesConfig",
    "SecurityConfig", "StoreConfig", "StreamConfig", "check_cluster_id", "default_config_text", "format_size",
    "load_config", "parse_size",
]

CONFIG_ENV = "FEDPAR_CONFIG"
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
_UNITS.update({f"{u}IB": n for u, n in _UNITS.items() if u not in ("", "B")})
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?)\s*([A-Za-z]*)")
_CLUSTER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _doc(text: str, *, size: bool = False) -> dict[str, Any]:
    return {"doc": text, "size": size}


def _check(ok: bool, section: str, key: str, value: object, why: str) -> None:
    if not ok:
        raise ConfigError(f"[{section}] {key} = {value!r}: {why}")


def _positive(section: str, key: str, value: float) -> None:
    _check(math.isfinite(value) and value > 0, section, key, value, "must be a finite number > 0")


def check_cluster_id(cluster_id: str) -> str:
    """Return ``cluster_id`` if it is usable in file names, else raise ``ConfigError``."""
    _check(
        isinstance(cluster_id, str) and _CLUSTER_ID_RE.fullmatch(cluster_id) is not None,
        "cluster", "id", cluster_id,
        "must be 1-64 characters from A-Z a-z 0-9 _ . - and start with a letter or digit",
    )
    return cluster_id


@dataclass(frozen=True)
class ClusterConfig:
    """Which cluster this process belongs to and where its connection files live."""

    id: str = field(default="default", metadata=_doc("cluster id; names the connection file"))
    runtime_dir: str = field(default="", metadata=_doc(
        "directory of connection files; empty = $FEDPAR_RUNTIME_DIR, $XDG_RUNTIME_DIR/fedpar "
        "or ~/.fedpar/runtime"))

    def __post_init__(self) -> None:
        check_cluster_id(self.id)


@dataclass(frozen=True)
class ControllerConfig:
    """The controller process."""

    host: str = field(default="127.0.0.1", metadata=_doc(
        "address to bind; non-loopback needs encryption or [security] insecure"))
    advertise: str = field(default="", metadata=_doc(
        "address or name clients, engines and other controllers dial to reach this controller; empty = the "
        "bound address, or for a wildcard bind (0.0.0.0, ::) this host's address on its default route"))
    state_dir: str = field(default="", metadata=_doc(
        "LMDB state directory; empty = ${XDG_STATE_HOME:-~/.local/state}/fedpar/<cluster id>"))
    heartbeat: float = field(default=1.0, metadata=_doc("seconds between engine heartbeats"))
    heartbeat_misses: int = field(default=5, metadata=_doc(
        "an engine is declared dead after heartbeat * heartbeat_misses seconds of silence"))
    batch: int = field(default=1024, metadata=_doc("max messages handled per loop pass"))
    weight: float = field(default=1.0, metadata=_doc(
        "in a federation, this controller's share of the engines relative to the others"))

    def __post_init__(self) -> None:
        _check(bool(self.host.strip()), "controller", "host", self.host, "must not be empty")
        _positive("controller", "heartbeat", self.heartbeat)
        _check(self.heartbeat_misses >= 1, "controller", "heartbeat_misses", self.heartbeat_misses,
               "must be >= 1")
        _check(self.batch >= 1, "controller", "batch", self.batch, "must be >= 1")
        _check(math.isfinite(self.weight) and self.weight > 0, "controller", "weight", self.weight,
               "must be a finite number > 0")


@dataclass(frozen=True)
class EnginesConfig:
    """Engine processes."""

    n: int = field(default=2, metadata=_doc(
        "engines started by `fedpar cluster start` / Cluster when n is not given"))
    prefetch: int = field(default=0, metadata=_doc(
        "max tasks queued per engine; 0 = adaptive"))
    controller_timeout: float = field(default=30.0, metadata=_doc(
        "an engine exits when the controller is silent this many seconds"))

    def __post_init__(self) -> None:
        _check(self.n >= 0, "engines", "n", self.n, "must be >= 0")
        _check(self.prefetch >= 0, "engines", "prefetch", self.prefetch, "must be >= 0 (0 = adaptive)")
        _positive("engines", "controller_timeout", self.controller_timeout)


@dataclass(frozen=True)
class SecurityConfig:
    """Message authentication and transport security."""

    replay_window: float = field(default=300.0, metadata=_doc(
        "messages whose timestamp is further than this many seconds from now are rejected"))
    insecure: bool = field(default=False, metadata=_doc(
        "allow binding a non-loopback address without encryption"))

    def __post_init__(self) -> None:
        _positive("security", "replay_window", self.replay_window)


@dataclass(frozen=True)
class StoreConfig:
    """The controller's LMDB store."""

    map_size: int = field(default=1024 * MiB, metadata=_doc(
        "initial LMDB map size (address space only: the file grows with its content)", size=True))
    max_map_size: int = field(default=1 * TiB, metadata=_doc(
        "the map grows on demand up to this size", size=True))
    sync: bool = field(default=False, metadata=_doc("fsync every commit (slower, survives power loss)"))
    retention: float = field(default=0.0, metadata=_doc("seconds results are kept; 0 = forever"))

    def __post_init__(self) -> None:
        _check(self.map_size > 0, "store", "map_size", self.map_size, "must be > 0")
        _check(self.max_map_size > 0, "store", "max_map_size", self.max_map_size, "must be > 0")
        _check(self.map_size <= self.max_map_size, "store", "map_size", self.map_size,
               f"must not exceed max_map_size ({format_size(self.max_map_size)})")
        _check(math.isfinite(self.retention) and self.retention >= 0, "store", "retention",
               self.retention, "must be a finite number >= 0 (0 = forever)")


@dataclass(frozen=True)
class StreamConfig:
    """Large payloads: sent as chunk streams with credit-based flow control (told to clients and engines)."""

    threshold: int = field(default=4 * MiB, metadata=_doc(
        "payloads (one task's arguments, one result) larger than this travel as a chunk stream", size=True))
    window: int = field(default=8 * MiB, metadata=_doc(
        "credit per stream: bytes in flight beyond what the receiver consumed (whole 1 MiB chunks)",
        size=True))
    timeout: float = field(default=30.0, metadata=_doc(
        "a stream that makes no progress for this many seconds fails with StreamTimeout"))
    direct: bool = field(default=True, metadata=_doc(
        "a client and an engine on the same host exchange large arguments of tasks sent to that engine "
        "(push, DirectView apply) and large pull results over a unix socket: the controller brokers them, "
        "the bytes skip it (so such pull results are not stored)"))

    def __post_init__(self) -> None:
        _check(self.threshold >= 0, "stream", "threshold", self.threshold, "must be >= 0")
        _check(self.window >= MiB, "stream", "window", self.window, "must be at least 1 MiB (one chunk)")
        _positive("stream", "timeout", self.timeout)


@dataclass(frozen=True)
class DiscoveryConfig:
    """The registry through which several controllers federate into one (see docs/guide.md, Federation)."""

    url: str = field(default="", metadata=_doc(
        "registry URL: lmdb:///DIR (embedded, one host), etcd://HOST:PORT, consul://HOST:PORT; empty = a lone "
        "controller (Cluster uses an embedded registry in its state directory)"))
    ttl: float = field(default=3.0, metadata=_doc(
        "seconds a controller's registration lives without renewal (renewed every ttl/3); a dead controller "
        "is noticed after about this long (etcd rounds it up to whole seconds, at least 2)"))
    poll: float = field(default=0.5, metadata=_doc("seconds between a controller's reads of the registry"))
    window: float = field(default=3.0, metadata=_doc(
        "seconds a takeover of a dead controller stays open for its engines to be adopted with the tasks "
        "they hold; clients resubmit the rest when it closes"))

    def __post_init__(self) -> None:
        _positive("discovery", "ttl", self.ttl)
        _positive("discovery", "poll", self.poll)
        _positive("discovery", "window", self.window)


@dataclass(frozen=True)
class Config:
    """The whole configuration: one frozen dataclass per ``.ini`` section."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    engines: EnginesConfig = field(default_factory=EnginesConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)

    def to_ini(self) -> str:
        """Every section and key with its current value; ``load_config`` reads it back unchanged."""
        out = ["# fedpar configuration", ""]
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            out.append(f"[{name}]")
            for f in dataclasses.fields(cls):
                out.append(f"{f.name} = {_format(getattr(section, f.name), f)}".rstrip())
            out.append("")
        return "\n".join(out)


_FieldInfo = tuple[type[Any], "dataclasses.Field[Any]"]
_SECTIONS: dict[str, type[Any]] = {f.name: get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
_FIELDS: dict[str, dict[str, _FieldInfo]] = {
    name: {f.name: (get_type_hints(cls)[f.name], f) for f in dataclasses.fields(cls)}
    for name, cls in _SECTIONS.items()
}


def parse_size(text: str) -> int:
    """``"64MiB"`` -> 67108864. Binary units; ``K M G T`` mean ``KiB MiB GiB TiB``. ``ValueError`` if bad."""
    m = _SIZE_RE.fullmatch(text.strip())
    unit = m and _UNITS.get(m.group(2).upper())
    if not m or unit is None:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * unit) if "." in m.group(1) else int(m.group(1)) * unit


def format_size(n: int) -> str:
    """The shortest exact spelling of ``n`` bytes: ``67108864`` -> ``"64MiB"``."""
    for suffix, unit in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _format(value: object, f: dataclasses.Field[Any]) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if f.metadata.get("size") and isinstance(value, int):
        return format_size(value)
    return repr(value) if isinstance(value, float) else str(value)


_EXPECTED = {bool: "true or false (also yes/no, on/off, 1/0)", int: "an integer", float: "a number",
             str: "a string"}


def _convert(section: str, key: str, value: object, origin: str) -> object:
    typ, f = _FIELDS[section][key]
    size = bool(f.metadata.get("size"))
    try:
        if isinstance(value, str):
            text = value.strip()
            if size:
                return parse_size(text)
            if typ is bool:
                return configparser.ConfigParser.BOOLEAN_STATES[text.lower()]
            if typ in (int, float, str):
                return typ(text)
        elif not isinstance(value, bool) or typ is bool:
            if typ is float and isinstance(value, int | float):
                return float(value)
            if isinstance(value, typ):
                return value
    except (ValueError, KeyError):
        pass
    where = f" (in {origin})" if origin else ""
    expected = "a size like 64MiB" if size else _EXPECTED.get(typ, typ.__name__)
    raise ConfigError(f"[{section}] {key} = {value!r}: expected {expected}{where}")


def _check_key(section: str, key: str, origin: str) -> None:
    where = f" in {origin}" if origin else ""
    if section not in _SECTIONS:
        valid = ", ".join(f"[{s}]" for s in (*_SECTIONS, "launcher:<name>"))
        hint = difflib.get_close_matches(section, _SECTIONS, n=1)
        guess = f"; did you mean [{hint[0]}]?" if hint else ""
        raise ConfigError(f"unknown section [{section}]{where}; valid sections: {valid}{guess}")
    keys = _FIELDS[section]
    if key not in keys:
        hint = difflib.get_close_matches(key, keys, n=1)
        guess = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(
            f"unknown key {key!r} in section [{section}]{where}; valid keys: {', '.join(keys)}{guess}")


def _read_file(path: str) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(
        interpolation=None, default_section="\0no-default-section", inline_comment_prefixes=("#", ";"))
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh, source=path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except configparser.Error as exc:
        raise ConfigError(f"config file {path} is not a valid .ini file: {exc}") from exc
    out: dict[str, dict[str, str]] = {}
    for section in parser.sections():
        if section.startswith("launcher:"):
            continue
        if section not in _SECTIONS:
            _check_key(section, "", path)
        out[section] = {key: parser.get(section, key) for key in parser.options(section)}
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Mapping[str, object]] | None = None,
) -> Config:
    """Read the configuration: defaults, then the file, then ``overrides``.

    ``path`` None means ``$FEDPAR_CONFIG`` if set, else no file. ``overrides`` maps section -> key ->
    value (a string to convert, or an already typed value); ``None`` values are skipped so unset CLI
    flags can be passed straight through. Raises ``ConfigError`` naming the file, section and key.
    """
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    values: dict[str, dict[str, object]] = {}
    if path is not None:
        origin = os.fspath(path)
        for section, strings in _read_file(origin).items():
            for key, text in strings.items():
                _check_key(section, key, origin)
                values.setdefault(section, {})[key] = _convert(section, key, text, origin)
    for section, items in (overrides or {}).items():
        for key, value in items.items():
            if value is not None:
                _check_key(section, key, "overrides")
                values.setdefault(section, {})[key] = _convert(section, key, value, "overrides")
    return Config(**{name: cls(**values.get(name, {})) for name, cls in _SECTIONS.items()})


def default_config_text() -> str:
    """A commented example file listing every key with its default (all commented out)."""
    out = [
        "# fedpar configuration. Every key is optional; the commented values are the defaults.",
        f"# fedpar reads the file it is given, else the one named by ${CONFIG_ENV}; none is needed.",
        "# Sizes take KiB/MiB/GiB/TiB (or K/M/G/T) suffixes; booleans take true/false, yes/no, on/off.",
        "# Launcher sections such as [launcher:ssh] and [launcher:slurm] are read by their launchers.",
        "",
    ]
    defaults = Config()
    for name, cls in _SECTIONS.items():
        out.append(f"[{name}]")
        out.append(f"# {(cls.__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(cls):
            out.append(f"# {f.metadata.get('doc', '')}")
            out.append(f"# {f.name} = {_format(getattr(getattr(defaults, name), f.name), f)}".rstrip())
        out.append("")
    return "\n".join(out)
