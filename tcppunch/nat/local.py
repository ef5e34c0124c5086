"""This host's own view of its network (netifaces): interfaces, addresses, default gateway.

Detect compares these addresses with the public endpoint the server saw: equal means no NAT in between
(the peer's candidates then need no private address), different means translation somewhere.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import netifaces

from tcppunch.wire.endpoint import routable_ipv6


@dataclass(frozen=True)
class LocalInterface:
    """One network interface and its IP addresses (IPv6 link-local scope suffixes removed)."""

    name: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class LocalNetwork:
    """Interfaces plus the default IPv4 gateway and the interface it is reached through."""

    interfaces: tuple[LocalInterface, ...]
    default_gateway: str | None
    gateway_interface: str | None

    def addresses(self, include_loopback: bool = False, include_link_local: bool = False) -> tuple[str, ...]:
        """Every address of every interface, in interface order; by default no loopback or link-local."""
        out: list[str] = []
        for interface in self.interfaces:
            for address in interface.addresses:
                ip = ipaddress.ip_address(address)
                if ip.is_loopback and not include_loopback:
                    continue
                if ip.is_link_local and not include_link_local:
                    continue
                out.append(address)
        return tuple(out)

    def global_ipv6(self) -> tuple[str, ...]:
        """This host's IPv6 addresses that others across the internet can reach (see
        :func:`~tcppunch.wire.endpoint.routable_ipv6`), in interface order: its IPv6 candidates."""
        return tuple(a for a in self.addresses() if routable_ipv6(a))

    def owns(self, address: str) -> bool:
        """Whether ``address`` is one of this host's own addresses."""
        try:
            wanted = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ipaddress.ip_address(a) == wanted for i in self.interfaces for a in i.addresses)


def local_network() -> LocalNetwork:
    """Read interfaces, addresses and the default gateway from the kernel (never raises)."""
    interfaces: list[LocalInterface] = []
    try:
        names = netifaces.interfaces()
    except Exception:  # netifaces raises plain ValueError/OSError on odd systems
        names = []
    for name in names:
        try:
            by_family: dict[int, list[dict[str, Any]]] = netifaces.ifaddresses(name)
        except Exception:
            continue
        addresses: list[str] = []
        for family in (netifaces.AF_INET, netifaces.AF_INET6):
            for entry in by_family.get(family, []):
                raw = str(entry.get("addr", "")).split("%", 1)[0]
                try:
                    addresses.append(str(ipaddress.ip_address(raw)))
                except ValueError:
                    continue
        interfaces.append(LocalInterface(str(name), tuple(addresses)))
    gateway: str | None = None
    gateway_interface: str | None = None
    try:
        default = netifaces.gateways().get("default", {})
        entry = default.get(netifaces.AF_INET)
        if entry:
            gateway, gateway_interface = str(entry[0]), str(entry[1])
    except Exception:
        pass
    return LocalNetwork(tuple(interfaces), gateway, gateway_interface)
