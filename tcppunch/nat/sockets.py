"""Sockets for measurement: bound with SO_REUSEADDR + SO_REUSEPORT so many can share one local port.

The TCP tests need one local port to carry several outbound connections and a listener at once (the
mapping test compares what the NAT does for one port towards several destinations; the filtering test
listens on the port whose mapping it exposes). The STUN server uses the same helper to originate
connect-backs from the address and port it also listens on.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from tcppunch.wire.endpoint import Endpoint


def family_of(ip: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 address, else AF_INET."""
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def reuse_port_socket(kind: socket.SocketKind, local: Endpoint) -> socket.socket:
    """A non-blocking socket bound to ``local`` (port 0: any free port) with SO_REUSEADDR + SO_REUSEPORT."""
    sock = socket.socket(family_of(local.ip), kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind((local.ip, local.port))
    except BaseException:
        sock.close()
        raise
    return sock


def endpoint_of(sockaddr: object) -> Endpoint:
    """An :class:`Endpoint` from a socket address tuple (IPv4-mapped IPv6 addresses unwrapped)."""
    if not isinstance(sockaddr, tuple) or len(sockaddr) < 2:
        raise ValueError(f"not an IP socket address: {sockaddr!r}")
    ip = str(sockaddr[0])
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[len("::ffff:") :]
    return Endpoint(ip, int(sockaddr[1]))


def route_source_ip(destination: str) -> str:
    """The local address the kernel would use to reach ``destination`` (a UDP connect sends nothing)."""
    with socket.socket(family_of(destination), socket.SOCK_DGRAM) as probe:
        probe.connect((destination, 9))
        return str(probe.getsockname()[0])


_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_TCPI_RTT_OFFSET = 68  # struct tcp_info: u32 tcpi_rtt (microseconds) after 8 bytes of u8 fields and 15 u32s


def smoothed_rtt(sock: socket.socket) -> float | None:
    """The kernel's smoothed RTT estimate of a connected TCP socket in seconds (TCP_INFO), or None.

    Available right after the handshake (both sides take a sample from it), so it sizes timeouts that
    must outlast a round trip on slow paths without slowing down fast ones.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCPI_RTT_OFFSET + 4:
        return None
    (rtt_us,) = struct.unpack_from("I", info, _TCPI_RTT_OFFSET)
    return rtt_us / 1e6 if rtt_us else None
