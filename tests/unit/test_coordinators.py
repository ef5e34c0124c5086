"""--coordinator as candidates (tcppunch/peer/coordinators.py): parsing, RFC 8305 interleaving, the order
across several coordinators, errors naming the name, following a changed answer, the trust scope per name.

The resolver is the seam: these tests answer for it, so every order and error is exact; the system resolver
itself runs on ``localhost`` here and across the NAT lab in tests/lab/test_coordinator_name_lab.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import pytest

from tcppunch.peer.coordinators import (
    CoordinatorName,
    Coordinators,
    CoordinatorUnresolved,
    interleave,
    system_resolver,
)
from tcppunch.wire.endpoint import Endpoint

V4A, V4B, V4C = Endpoint("198.51.100.10", 3478), Endpoint("198.51.100.11", 3478), Endpoint("203.0.113.5", 3478)
V6A, V6B = Endpoint("2001:db8::10", 3478), Endpoint("2001:db8::11", 3478)


class Zone:
    """Answers as a DNS zone would; a name missing from it fails as getaddrinfo does (EAI_NONAME)."""

    def __init__(self, records: dict[str, list[Endpoint]]) -> None:
        self.records = records
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> Sequence[Endpoint]:
        self.asked.append((host, port))
        if host not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [Endpoint(e.ip, port) for e in self.records[host]]


def test_parse_literals_and_names() -> None:
    assert CoordinatorName.parse("198.51.100.10:3478").literal == V4A
    assert CoordinatorName.parse("[2001:DB8::10]").literal == V6A  # default port, canonical address
    name = CoordinatorName.parse("Coord.Example.:4000")
    assert (name.host, name.port, name.literal) == ("coord.example", 4000, None)
    assert str(name) == "coord.example:4000"
    assert str(CoordinatorName.parse("[2001:db8::10]:9")) == "[2001:db8::10]:9"
    assert CoordinatorName.parse(V4B) == CoordinatorName("198.51.100.11", 3478)


@pytest.mark.parametrize("bad", ["", ":3478", "coord example:1", "-coord.example", "coord..example", "a.b:0",
                                 "a.b:99999", "coord.example:port", "x" * 64 + ".example", "[::1"])
def test_parse_refuses_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        CoordinatorName.parse(bad)


def test_interleave_follows_rfc8305() -> None:
    # the first answer's family first, then turns; what one family has left comes last
    assert interleave([V6A, V6B, V4A, V4B, V4C]) == [V6A, V4A, V6B, V4B, V4C]
    assert interleave([V4A, V4B, V6A]) == [V4A, V6A, V4B]
    assert interleave([V4A, V4B, V4A]) == [V4A, V4B]  # duplicates once
    assert interleave([]) == []


def test_candidates_in_the_order_given_each_name_interleaved() -> None:
    zone = Zone({"coord.example": [V6A, V6B, V4A], "other.example": [V4A, V4C]})
    coordinators = Coordinators(["coord.example", "198.51.100.11:3478", "other.example"], resolver=zone)
    assert coordinators.candidates == (V4B,)  # literals are candidates before any resolution
    assert asyncio.run(coordinators.resolve(strict=True)) == []
    assert coordinators.candidates == (V6A, V4A, V6B, V4B, V4C)  # V4A once, at its first place
    assert sorted(zone.asked) == [("coord.example", 3478), ("other.example", 3478)]  # literals are not looked up
    # whose key: the name as given, for every address it listed first; a literal for itself
    assert {coordinators.trust_scope(e) for e in (V6A, V4A, V6B)} == {"coord.example:3478"}
    assert coordinators.trust_scope(V4B) == "198.51.100.11:3478"
    assert coordinators.trust_scope(V4C) == "other.example:3478"
    assert coordinators.scope == "coord.example:3478"


def test_literals_only_behave_as_before() -> None:
    zone = Zone({})
    coordinators = Coordinators(["198.51.100.11:3478", V4A], resolver=zone)
    assert asyncio.run(coordinators.resolve(strict=True)) == []
    assert coordinators.candidates == (V4B, V4A) and zone.asked == []
    assert coordinators.trust_scope(V4A) == str(V4A) and coordinators.scope == str(V4B)


def test_a_name_without_address_is_an_error_naming_it_at_start() -> None:
    coordinators = Coordinators(["198.51.100.10", "nosuch.example:4000"], resolver=Zone({}))
    with pytest.raises(CoordinatorUnresolved, match=r"nosuch\.example:4000: Name or service not known") as caught:
        asyncio.run(coordinators.resolve(strict=True))
    assert caught.value.name == CoordinatorName("nosuch.example", 4000)
    assert isinstance(caught.value, OSError)  # the CLI's unreachable exit; re-registration retries it


def test_later_a_failed_name_keeps_its_addresses_and_a_change_is_followed() -> None:
    zone = Zone({"coord.example": [V4A]})
    coordinators = Coordinators(["coord.example"], resolver=zone)
    asyncio.run(coordinators.resolve(strict=True))
    assert coordinators.candidates == (V4A,)
    zone.records["coord.example"] = [V4B, V4A]  # DNS changed
    assert asyncio.run(coordinators.resolve(strict=False)) == []
    assert coordinators.candidates == (V4B, V4A)
    del zone.records["coord.example"]  # DNS fails for a while
    errors = asyncio.run(coordinators.resolve(strict=False))
    assert [str(e.name) for e in errors] == ["coord.example:3478"]
    assert coordinators.candidates == (V4B, V4A)


def test_without_ipv6_a_name_lists_only_ipv4() -> None:
    zone = Zone({"coord.example": [V6A, V4A, V6B], "six.example": [V6A]})
    coordinators = Coordinators(["coord.example"], ipv6=False, resolver=zone)
    asyncio.run(coordinators.resolve(strict=True))
    assert coordinators.candidates == (V4A,)
    only6 = Coordinators(["six.example"], ipv6=False, resolver=zone)
    with pytest.raises(CoordinatorUnresolved, match="no IPv4 address"):
        asyncio.run(only6.resolve(strict=True))
    # a literal is used as given
    assert Coordinators(["[2001:db8::10]"], ipv6=False, resolver=zone).candidates == (V6A,)


def test_no_coordinator_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Coordinators([])


def test_system_resolver_reads_the_hosts_file() -> None:
    # localhost is in /etc/hosts: nsswitch answers it from "files", no DNS query leaves the host
    found = asyncio.run(system_resolver("localhost", 4000))
    assert Endpoint("127.0.0.1", 4000) in found
    assert all(e.port == 4000 for e in found)
