"""Tests for fedpar.config: defaults, parsing, conversion, validation, overrides, round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedpar.config import (
    CONFIG_ENV,
    ClusterConfig,
    Config,
    ControllerConfig,
    EnginesConfig,
    StoreConfig,
    check_cluster_id,
    default_config_text,
    format_size,
    load_config,
    parse_size,
)
from fedpar.errors import ConfigError, FedparError

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


@pytest.fixture(autouse=True)
def _no_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)


def write(tmp_path: Path, text: str, name: str = "fedpar.ini") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.cluster.id == "default"
    assert cfg.cluster.runtime_dir == ""
    assert cfg.controller.host == "127.0.0.1"
    assert cfg.controller.state_dir == ""
    assert cfg.controller.heartbeat == 1.0
    assert cfg.controller.heartbeat_misses == 5
    assert cfg.controller.batch == 1024
    assert cfg.engines.n == 2
    assert cfg.engines.prefetch == 0
    assert cfg.engines.controller_timeout == 30.0
    assert cfg.security.replay_window == 300.0
    assert cfg.security.insecure is False
    assert cfg.store.map_size == 1024 * MiB
    assert cfg.store.max_map_size == TiB
    assert cfg.store.sync is False
    assert cfg.store.retention == 0.0
    assert cfg.discovery.url == ""


def test_dataclasses_are_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.controller.heartbeat = 2.0  # type: ignore[misc]


FULL = """
# a comment
[cluster]
id = lab-1
runtime_dir = /tmp/fedpar-rt

[controller]
host = 0.0.0.0
state_dir = /var/tmp/state  ; inline comment
heartbeat = 0.5
heartbeat_misses = 3
batch = 256

[engines]
n = 8
prefetch = 4
controller_timeout = 12.5

[security]
replay_window = 60
insecure = yes

[store]
map_size = 256MiB
max_map_size = 2G
sync = on
retention = 3600

[discovery]
url = consul://localhost:8500

[launcher:ssh]
hosts = a, b, c
"""


def test_full_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.cluster == ClusterConfig(id="lab-1", runtime_dir="/tmp/fedpar-rt")
    assert cfg.controller == ControllerConfig(
        host="0.0.0.0", state_dir="/var/tmp/state", heartbeat=0.5, heartbeat_misses=3, batch=256
    )
    assert cfg.engines == EnginesConfig(n=8, prefetch=4, controller_timeout=12.5)
    assert cfg.security.replay_window == 60.0
    assert isinstance(cfg.security.replay_window, float)
    assert cfg.security.insecure is True
    assert cfg.store == StoreConfig(map_size=256 * MiB, max_map_size=2 * GiB, sync=True, retention=3600.0)
    assert cfg.discovery.url == "consul://localhost:8500"


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[engines]\nn = 0\n"))
    assert cfg.engines.n == 0
    assert cfg.controller == ControllerConfig()


def test_percent_signs_are_not_interpolated(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[discovery]\nurl = http://h/%(x)s%20\n"))
    assert cfg.discovery.url == "http://h/%(x)s%20"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", 1024),
        ("1KiB", 1024),
        ("1K", 1024),
        ("64MiB", 64 * MiB),
        ("64 MiB", 64 * MiB),
        ("64mib", 64 * MiB),
        ("64M", 64 * MiB),
        ("3GiB", 3 * GiB),
        ("3G", 3 * GiB),
        ("1TiB", TiB),
        ("1T", TiB),
        ("1.5GiB", 3 * GiB // 2),
        ("100B", 100),
    ],
)
def test_sizes(tmp_path: Path, text: str, expected: int) -> None:
    assert parse_size(text) == expected
    cfg = load_config(write(tmp_path, f"[store]\nmap_size = {text}\n"))
    assert cfg.store.map_size == expected


@pytest.mark.parametrize("text", ["abc", "", "12XB", "MiB", "-5MiB", "1KB", "5 Mi B"])
def test_bad_sizes(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)
    path = write(tmp_path, f"[store]\nmap_size = {text}\n")
    with pytest.raises(ConfigError, match=r"\[store\] map_size = .*: expected a size like 64MiB"):
        load_config(path)


def test_bad_size_message_is_exact() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"store": {"map_size": "abc"}})
    assert str(info.value).startswith("[store] map_size = 'abc': expected a size like 64MiB")


def test_format_size() -> None:
    assert format_size(64 * MiB) == "64MiB"
    assert format_size(TiB) == "1TiB"
    assert format_size(3 * 1024) == "3KiB"
    assert format_size(1536) == "1536"
    assert format_size(1000) == "1000"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("Yes", True), ("on", True), ("1", True),
     ("false", False), ("NO", False), ("off", False), ("0", False)],
)
def test_bool_values(tmp_path: Path, text: str, expected: bool) -> None:
    cfg = load_config(write(tmp_path, f"[security]\ninsecure = {text}\n[store]\nsync = {text}\n"))
    assert cfg.security.insecure is expected
    assert cfg.store.sync is expected


def test_bad_bool(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[security\] insecure = 'maybe': expected true or false"):
        load_config(write(tmp_path, "[security]\ninsecure = maybe\n"))


def test_unknown_section_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[stor]\nmap_size = 1GiB\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "[stor]" in msg
    assert str(path) in msg
    assert "[store]" in msg and "[controller]" in msg  # lists the valid sections
    assert "did you mean [store]" in msg


def test_default_section_is_not_special(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown section \[DEFAULT\]"):
        load_config(write(tmp_path, "[DEFAULT]\nn = 3\n"))


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[controller]\nheartbeats = 2\n"))
    msg = str(info.value)
    assert "'heartbeats'" in msg and "[controller]" in msg
    for key in ("host", "state_dir", "heartbeat", "heartbeat_misses", "batch"):
        assert key in msg
    assert "did you mean 'heartbeat'" in msg


def test_launcher_sections_are_ignored(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[launcher:slurm]\nanything = goes\n[launcher:ssh]\nx = 1\n"))
    assert cfg == Config()


def test_missing_explicit_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ini"
    with pytest.raises(ConfigError, match=r"nope\.ini"):
        load_config(missing)


def test_malformed_ini(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not a valid \.ini"):
        load_config(write(tmp_path, "no section header\n"))
    with pytest.raises(ConfigError, match=r"not a valid \.ini"):
        load_config(write(tmp_path, "[engines]\nn = 1\nn = 2\n"))


@pytest.mark.parametrize(
    ("section", "key", "value", "pattern"),
    [
        ("engines", "n", "two", r"\[engines\] n = 'two': expected an integer"),
        ("engines", "n", "2.5", r"\[engines\] n = '2.5': expected an integer"),
        ("controller", "heartbeat", "fast", r"\[controller\] heartbeat = 'fast': expected a number"),
        ("controller", "batch", 3.0, r"\[controller\] batch = 3.0: expected an integer"),
        ("engines", "n", True, r"\[engines\] n = True: expected an integer"),
        ("security", "insecure", 1, r"\[security\] insecure = 1: expected true or false"),
        ("discovery", "url", 5, r"\[discovery\] url = 5: expected a string"),
    ],
)
def test_bad_values(section: str, key: str, value: object, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides={section: {key: value}})


def test_bad_value_in_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[engines]\nn = lots\n")
    with pytest.raises(ConfigError, match=r"\[engines\] n = 'lots': expected an integer") as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("controller", "heartbeat", "0"),
        ("controller", "heartbeat", "-1"),
        ("controller", "heartbeat", "nan"),
        ("controller", "heartbeat", "inf"),
        ("controller", "heartbeat_misses", "0"),
        ("controller", "batch", "0"),
        ("controller", "host", ""),
        ("controller", "host", "   "),
        ("engines", "n", "-1"),
        ("engines", "prefetch", "-2"),
        ("engines", "controller_timeout", "0"),
        ("security", "replay_window", "0"),
        ("store", "map_size", "0"),
        ("store", "max_map_size", "0"),
        ("store", "retention", "-1"),
        ("cluster", "id", ""),
        ("cluster", "id", "../evil"),
        ("cluster", "id", "a/b"),
        ("cluster", "id", ".hidden"),
    ],
)
def test_range_checks(tmp_path: Path, section: str, key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"\[{section}\] {key}"):
        load_config(write(tmp_path, f"[{section}]\n{key} = {value}\n"))


def test_map_size_must_not_exceed_max(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[store\] map_size .*max_map_size"):
        load_config(write(tmp_path, "[store]\nmap_size = 2GiB\nmax_map_size = 1GiB\n"))


def test_validation_applies_to_replace() -> None:
    cfg = Config()
    assert dataclasses.replace(cfg.engines, n=5).n == 5
    with pytest.raises(ConfigError, match="heartbeat"):
        dataclasses.replace(cfg.controller, heartbeat=0.0)
    new = dataclasses.replace(cfg, engines=EnginesConfig(n=7))
    assert new.engines.n == 7 and new.controller == cfg.controller


def test_overrides_win_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[engines]\nn = 8\nprefetch = 2\n[store]\nmap_size = 1GiB\n")
    cfg = load_config(
        path,
        overrides={
            "engines": {"n": 3, "prefetch": None},  # None = flag not given: the file value stays
            "store": {"map_size": "128MiB", "sync": True},
            "controller": {"heartbeat": 2, "host": "10.0.0.1"},
            "security": {"insecure": "true"},
        },
    )
    assert cfg.engines.n == 3
    assert cfg.engines.prefetch == 2
    assert cfg.store.map_size == 128 * MiB and cfg.store.sync is True
    assert cfg.controller.heartbeat == 2.0 and isinstance(cfg.controller.heartbeat, float)
    assert cfg.controller.host == "10.0.0.1"
    assert cfg.security.insecure is True


def test_unknown_override_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"'workers'.*\[engines\]"):
        load_config(overrides={"engines": {"workers": 3}})
    with pytest.raises(ConfigError, match=r"unknown section \[engine\]"):
        load_config(overrides={"engine": {"n": 3}})


def test_to_ini_round_trip(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL))
    cfg = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, map_size=12345, retention=0.25))
    text = cfg.to_ini()
    for section in ("cluster", "controller", "engines", "security", "store", "discovery"):
        assert f"[{section}]" in text
    assert "max_map_size = 2GiB" in text
    assert load_config(write(tmp_path, text, "again.ini")) == cfg


def test_to_ini_of_defaults_round_trips(tmp_path: Path) -> None:
    text = Config().to_ini()
    assert "map_size = 1GiB" in text
    assert load_config(write(tmp_path, text)) == Config()


def test_default_config_text_is_loadable_and_documented(tmp_path: Path) -> None:
    text = default_config_text()
    for section in ("cluster", "controller", "engines", "security", "store", "discovery"):
        assert f"[{section}]" in text
    assert "# heartbeat = 1.0" in text
    assert "# map_size = 1GiB" in text
    assert "seconds between engine heartbeats" in text
    assert load_config(write(tmp_path, text)) == Config()


def test_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[engines]\nn = 6\n")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert load_config().engines.n == 6
    # an explicit path wins over the environment
    other = write(tmp_path, "[engines]\nn = 1\n", "other.ini")
    assert load_config(other).engines.n == 1


def test_env_var_pointing_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "gone.ini"))
    with pytest.raises(ConfigError, match=r"gone\.ini"):
        load_config()


def test_empty_env_var_means_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, "")
    assert load_config() == Config()


def test_check_cluster_id() -> None:
    assert check_cluster_id("abc-1.2_x") == "abc-1.2_x"
    with pytest.raises(ConfigError):
        check_cluster_id("x" * 65)


def test_config_error_is_a_fedpar_error() -> None:
    assert issubclass(ConfigError, FedparError)
