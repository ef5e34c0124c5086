"""PROXY protocol headers (HAProxy's "PROXY protocol" spec, versions 1 and 2), encoder only.

``tcppunch expose`` carries a visitor's connection through the server to a local service, which would
otherwise see every visitor as 127.0.0.1. With ``--proxy-protocol v1|v2`` the exposing peer writes one of
these headers before the visitor's first byte, so that a service that speaks it (nginx ``proxy_protocol``,
HAProxy ``accept-proxy``, ...) learns the visitor's address and the public address it reached.

Pure functions: endpoints in, bytes out. Only the ``PROXY`` command over TCP is produced (and ``LOCAL``
/ ``UNKNOWN`` when no addresses are known); no TLVs.
"""

from __future__ import annotations

import ipaddress
import struct
from enum import StrEnum

from tcppunch.wire.endpoint import Endpoint

# Version 2: 12 fixed bytes no text protocol can start with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21  # version 2 (high nibble), command PROXY (low nibble)
_V2_LOCAL = 0x20  # version 2, command LOCAL: no addresses follow
_V2_TCP4 = 0x11  # AF_INET, SOCK_STREAM
_V2_TCP6 = 0x21  # AF_INET6, SOCK_STREAM
# Version 1: the longest line the spec allows, CRLF included.
V1_MAX_LINE = 107


class ProxyVersion(StrEnum):
    """Which header ``--proxy-protocol`` asks for."""

    V1 = "v1"
    V2 = "v2"


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _pair(source: Endpoint, destination: Endpoint) -> tuple[Address, Address]:
    """Both addresses in one family: an IPv4 one next to an IPv6 one becomes IPv4-mapped IPv6."""
    src, dst = ipaddress.ip_address(source.ip), ipaddress.ip_address(destination.ip)
    if src.version != dst.version:
        src, dst = _as_v6(src), _as_v6(dst)
    return src, dst


def _as_v6(address: Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)


def encode_v1(source: Endpoint | None, destination: Endpoint | None) -> bytes:
    """``PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n`` (TCP6 for IPv6); ``PROXY UNKNOWN\\r\\n`` without
    addresses. Raises ValueError for an address that is not an IP literal or a port outside 0..65535."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = _pair(source, destination)
    _check_ports(source, destination)
    family = "TCP4" if src.version == 4 else "TCP6"
    line = f"PROXY {family} {src} {dst} {source.port} {destination.port}\r\n".encode("ascii")
    assert len(line) <= V1_MAX_LINE
    return line


def encode_v2(source: Endpoint | None, destination: Endpoint | None) -> bytes:
    """The binary header: signature, version/command, family/transport, length, addresses, ports.
    Without addresses, the ``LOCAL`` command (the receiver then uses the connection's own addresses)."""
    if source is None or destination is None:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, 0x00, 0)
    src, dst = _pair(source, destination)
    _check_ports(source, destination)
    family = _V2_TCP4 if src.version == 4 else _V2_TCP6
    body = src.packed + dst.packed + struct.pack("!HH", source.port, destination.port)
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(body)) + body


def encode(version: ProxyVersion, source: Endpoint | None, destination: Endpoint | None) -> bytes:
    """The header of ``version`` for a connection from ``source`` (the visitor) to ``destination`` (the
    public address and port it connected to)."""
    return encode_v1(source, destination) if version is ProxyVersion.V1 else encode_v2(source, destination)


def _check_ports(*endpoints: Endpoint) -> None:
    for endpoint in endpoints:
        if not 0 <= endpoint.port <= 65535:
            raise ValueError(f"port {endpoint.port} is outside 0..65535")
