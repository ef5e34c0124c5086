"""PROXY protocol headers against byte vectors written out by hand from HAProxy's spec."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.proxy_protocol import V1_MAX_LINE, V2_SIGNATURE, ProxyVersion, encode, encode_v1, encode_v2

VISITOR = Endpoint("198.51.100.7", 51000)
PUBLIC = Endpoint("198.51.100.10", 8080)


def test_v1_tcp4_line() -> None:
    assert encode_v1(VISITOR, PUBLIC) == b"PROXY TCP4 198.51.100.7 198.51.100.10 51000 8080\r\n"


def test_v1_tcp6_line_uses_the_compressed_form() -> None:
    line = encode_v1(Endpoint("2001:db8::7", 443), Endpoint("2001:db8:0:0:0:0:0:10", 8443))
    assert line == b"PROXY TCP6 2001:db8::7 2001:db8::10 443 8443\r\n"


def test_v1_longest_possible_line_fits_the_spec_limit() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = encode_v1(Endpoint(full, 65535), Endpoint(full, 65535))
    # 104 bytes; the spec's 107 is the same line with "UNKNOWN" in place of "TCP6"
    assert len(line) == V1_MAX_LINE - 3
    assert line.endswith(b" 65535 65535\r\n")


def test_v1_mixed_families_become_ipv4_mapped_ipv6() -> None:
    line = encode_v1(Endpoint("198.51.100.7", 1), Endpoint("2001:db8::10", 2))
    assert line == b"PROXY TCP6 ::ffff:c633:6407 2001:db8::10 1 2\r\n"


def test_unknown_source_gives_unknown_and_local() -> None:
    assert encode_v1(None, PUBLIC) == b"PROXY UNKNOWN\r\n"
    assert encode_v2(VISITOR, None) == bytes.fromhex("0d0a0d0a000d0a515549540a" "20" "00" "0000")


def test_v2_tcp4_vector() -> None:
    expected = bytes.fromhex(
        "0d0a0d0a000d0a515549540a"  # signature
        "21"  # version 2, PROXY
        "11"  # AF_INET, STREAM
        "000c"  # 12 address bytes follow
        "c6336407"  # 198.51.100.7
        "c633640a"  # 198.51.100.10
        "c738"  # 51000
        "1f90"  # 8080
    )
    assert encode_v2(VISITOR, PUBLIC) == expected


def test_v2_tcp6_vector() -> None:
    expected = bytes.fromhex(
        "0d0a0d0a000d0a515549540a" "21" "21" "0024"
        "20010db8000000000000000000000007"
        "20010db8000000000000000000000010"
        "01bb" "20fb"
    )
    assert encode_v2(Endpoint("2001:db8::7", 443), Endpoint("2001:db8::10", 8443)) == expected


def test_dispatch_by_version() -> None:
    assert encode(ProxyVersion.V1, VISITOR, PUBLIC) == encode_v1(VISITOR, PUBLIC)
    assert encode(ProxyVersion.V2, VISITOR, PUBLIC) == encode_v2(VISITOR, PUBLIC)


@pytest.mark.parametrize("bad", [Endpoint("not-an-ip", 1), Endpoint("198.51.100.7", 70000)])
def test_bad_endpoints_raise(bad: Endpoint) -> None:
    for version in ProxyVersion:
        with pytest.raises(ValueError):
            encode(version, bad, PUBLIC)


def _parse_v2(header: bytes) -> tuple[Endpoint, Endpoint]:
    """An independent reading of a v2 header, written from the spec's struct layout."""
    assert header[:12] == V2_SIGNATURE
    ver_cmd, fam, length = struct.unpack("!BBH", header[12:16])
    assert ver_cmd == 0x21 and len(header) == 16 + length
    size = {0x11: 4, 0x21: 16}[fam]
    body = header[16:]
    src = ipaddress.ip_address(body[:size])
    dst = ipaddress.ip_address(body[size : 2 * size])
    sport, dport = struct.unpack("!HH", body[2 * size :])
    return Endpoint(str(src), sport), Endpoint(str(dst), dport)


def _parse_v1(line: bytes) -> tuple[Endpoint, Endpoint]:
    assert line.endswith(b"\r\n") and len(line) <= V1_MAX_LINE
    proxy, family, src, dst, sport, dport = line[:-2].decode("ascii").split(" ")
    assert proxy == "PROXY" and family in ("TCP4", "TCP6")
    return Endpoint(src, int(sport)), Endpoint(dst, int(dport))


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
ports = st.integers(0, 65535)


@given(addresses, ports, addresses, ports)
def test_both_versions_round_trip_same_family(src: str, sport: int, dst: str, dport: int) -> None:
    source, destination = Endpoint(src, sport), Endpoint(dst, dport)
    assume(ipaddress.ip_address(src).version == ipaddress.ip_address(dst).version)
    assert _parse_v2(encode_v2(source, destination)) == (source, destination)
    parsed = _parse_v1(encode_v1(source, destination))
    assert parsed == (Endpoint(str(ipaddress.ip_address(src)), sport), Endpoint(str(ipaddress.ip_address(dst)), dport))
