"""One address type for the whole stack, and its one HOST:PORT parser.

STUN attributes, NAT reports, coordinator messages, punch candidates and the CLI all speak
:class:`Endpoint`; it lives in the lowest layer so nothing above has to convert.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Endpoint:
    """An IP address (v4 or v6, canonical text form) and a port."""

    ip: str
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return {"ip": self.ip, "port": self.port}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Endpoint:
        return cls(ip=str(data["ip"]), port=int(data["port"]))

    @classmethod
    def parse(cls, text: str, default_port: int | None = None, *, resolve: bool = False) -> Endpoint:
        """``HOST:PORT``, ``[V6]:PORT`` or ``HOST`` (with ``default_port``) -> Endpoint; ValueError if malformed.

        Addresses come back in canonical form. Host names are refused unless ``resolve`` (then the first
        IPv4 answer wins, else the first IPv6 one): the stack below the CLI only ever handles IP literals.
        """
        text = text.strip()
        host, port = split_host_port(text, default_port)
        try:
            return cls(str(ipaddress.ip_address(host)), port)
        except ValueError:
            if not resolve:
                raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
        return cls(_resolve(host, port), port)


_ULA = ipaddress.ip_network("fc00::/7")


def routable_ipv6(ip: str) -> bool:
    """Whether ``ip`` is an IPv6 unicast address another host across the internet could reach: not
    loopback, link-local, site-local, unique-local (fc00::/7), multicast, unspecified or IPv4-mapped.
    (The documentation prefix 2001:db8::/32 counts as routable: the lab uses it.)"""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if not isinstance(addr, ipaddress.IPv6Address):
        return False
    return not (addr.is_loopback or addr.is_link_local or addr.is_site_local or addr.is_multicast
                or addr.is_unspecified or addr.ipv4_mapped is not None or addr in _ULA)


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``HOST`` (with ``default_port``) -> (host, port), the host unchecked;
    ValueError if malformed. The one HOST:PORT grammar: :meth:`Endpoint.parse` and host names use it."""
    text = text.strip()
    host, port_text = _split(text)
    port = _port(text, port_text, default_port)
    if not host:
        raise ValueError(f"{text!r}: missing host")
    return host, port


def _split(text: str) -> tuple[str, str]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
        return host, rest[1:]
    if text.count(":") == 1:
        host, port_text = text.split(":")
        return host, port_text
    return text, ""


def _port(text: str, port_text: str, default_port: int | None) -> int:
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r}: port must be 1-65535")
        return int(port_text)
    if default_port is None:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return default_port


def _resolve(host: str, port: int) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc.strerror}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])
