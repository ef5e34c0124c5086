"""Sockets for measurement: bound with SO_REUSEADDR + SO_REUSEPORT so many can share one local port.

The TCP tests need one local port to carry several outbound connections and a listener at once (the
mapping test compares what the NAT does for one port towards several destinations; the filtering test
listens on the port whose mapping it exposes). The STUN server uses the same helper to originate
connect-backs from the address and port it also listens on.
"""

from __future__ import annotations

import ipaddress
import socket

from tcppunch.nat.report import Endpoint


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
