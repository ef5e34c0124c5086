"""The one HOST:PORT parser (:meth:`Endpoint.parse`): forms, canonical addresses, refusals."""

from __future__ import annotations

import pytest

from tcppunch.wire.endpoint import Endpoint


def test_forms() -> None:
    assert Endpoint.parse("198.51.100.10:3478") == Endpoint("198.51.100.10", 3478)
    assert Endpoint.parse("198.51.100.10", 3478) == Endpoint("198.51.100.10", 3478)
    assert Endpoint.parse("[2001:db8::1]:9") == Endpoint("2001:db8::1", 9)
    assert Endpoint.parse(" [2001:DB8:0::1]:9 ") == Endpoint("2001:db8::1", 9)
    assert Endpoint.parse("2001:db8::1", 7) == Endpoint("2001:db8::1", 7)


def test_names_only_when_resolving() -> None:
    assert Endpoint.parse("localhost:5", resolve=True) == Endpoint("127.0.0.1", 5)
    with pytest.raises(ValueError, match="not an IP address"):
        Endpoint.parse("localhost:5")


@pytest.mark.parametrize("bad", ["", ":5", "1.2.3.4:70000", "1.2.3.4:0", "[::1", "[::1]x", "host:port", "1.2.3.4:-1"])
def test_refusals(bad: str) -> None:
    with pytest.raises(ValueError):
        Endpoint.parse(bad, resolve=True)


def test_port_required_without_default() -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        Endpoint.parse("198.51.100.10")


def test_text_and_json_round_trip() -> None:
    for ep in (Endpoint("198.51.100.10", 1), Endpoint("2001:db8::1", 65535)):
        assert Endpoint.parse(str(ep)) == ep
        assert Endpoint.from_json(ep.to_json()) == ep
