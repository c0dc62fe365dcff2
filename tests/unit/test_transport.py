"""What a controller advertises for its bound endpoints: never a wildcard address."""

from __future__ import annotations

import ipaddress

from fedpar.wire.transport import advertised


def test_specific_addresses_are_published_as_bound() -> None:
    assert advertised("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    assert advertised("tcp://198.18.0.2:7") == "tcp://198.18.0.2:7"
    assert advertised("tcp://[::1]:7") == "tcp://[::1]:7"


def test_wildcards_are_published_at_a_dialable_address() -> None:
    for bound in ("tcp://0.0.0.0:5555", "tcp://[::]:5555"):
        got = advertised(bound)
        host = got.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
        assert not ipaddress.ip_address(host).is_unspecified, got
        assert got.endswith(":5555")


def test_advertise_setting_wins() -> None:
    assert advertised("tcp://0.0.0.0:9", "node7.example") == "tcp://node7.example:9"
    assert advertised("tcp://10.1.2.3:9", "fd00::5") == "tcp://[fd00::5]:9"
