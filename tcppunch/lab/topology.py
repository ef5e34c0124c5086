"""What a lab is made of (the spec) and where every address goes (the plan).

Address plan, used only inside the lab's own namespaces:

* the "internet": one bridge in namespace ``<prefix>-inet``, 198.51.100.0/24 (TEST-NET-2);
* the server host ``<prefix>-srv``: 198.51.100.10 and 198.51.100.11 (two addresses, as RFC 5780 needs);
* router number k (0-based, in spec order): WAN 198.51.100.(101+k), LAN 10.0.(k+1).0/24 with the
  router on .1 and its hosts on .2, .3, ...; a cgnat router's carrier side is 100.64.(k+1).0/24
  (carrier router .1, home router .2);
* hosts of a ``none`` router sit on the internet directly: 198.51.100.(151+k*4+j).

With ``LabSpec(ipv6=True)`` every node also gets IPv6 (no NAT66, RFC 6092 firewalls instead), inside
2001:db8::/32 (documentation): the internet is 2001:db8::/64 with a core router 2001:db8::1 (in the
internet namespace) that routes every LAN; the server has 2001:db8::10 and ::11; router k's WAN is
2001:db8::(101+k) and its LAN 2001:db8:(k+1)::/64 (router ::1, hosts ::2, ::3, ...); a cgnat router's
carrier-home link is 2001:db8:c(k+1)::/64 (carrier ::1, home ::2); ``none`` hosts get
2001:db8::(151+k*4+j). The groups are the decimal numbers written as hex digits, like the IPv4 plan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tcppunch.lab.nat_types import NatType, SynPolicy

SERVER_ADDRESSES = ("198.51.100.10", "198.51.100.11")
INTERNET_PREFIXLEN = 24
SERVER_ADDRESSES6 = ("2001:db8::10", "2001:db8::11")
CORE_ROUTER6 = "2001:db8::1"
PREFIXLEN6 = 64
MAX_ROUTERS = 24
MAX_HOSTS_PER_ROUTER = 4
_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")


@dataclass(frozen=True)
class LinkShape:
    """Delay, jitter and loss added to a router's WAN link, each way (netem-like, done in user space)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0

    @property
    def is_shaped(self) -> bool:
        return self.delay_ms > 0 or self.jitter_ms > 0 or self.loss > 0

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.delay_ms > 10_000 or self.jitter_ms > 10_000:
            raise ValueError("delay and jitter must be between 0 and 10000 ms")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError("loss is a fraction from 0 up to (not including) 1")


@dataclass(frozen=True)
class RouterSpec:
    """One NAT router and the hosts on its LAN."""

    name: str
    nat: NatType = NatType.PORT_RESTRICTED
    syn_policy: SynPolicy = SynPolicy.DROP
    hosts: int = 1
    link: LinkShape = field(default_factory=LinkShape)
    # The router runs miniupnpd: UPnP-IGD, NAT-PMP and PCP on its LAN (a cgnat's home router only).
    port_mapping: bool = False

    def __post_init__(self) -> None:
        if self.port_mapping and self.nat is NatType.NONE:
            raise ValueError(f"router {self.name}: a 'none' host has no router to map ports on")
        if not _NAME.match(self.name):
            raise ValueError(f"router name {self.name!r}: 1-8 characters, a-z then a-z/0-9")
        if not 1 <= self.hosts <= MAX_HOSTS_PER_ROUTER:
            raise ValueError(f"router {self.name}: 1 to {MAX_HOSTS_PER_ROUTER} hosts")

    @classmethod
    def parse(cls, text: str, link: LinkShape | None = None) -> RouterSpec:
        """Parse ``NAME=TYPE[+upnp][:POLICY][xHOSTS]``, e.g. ``a=symmetric-seq:rst``, ``b=cgnat x2`` or
        ``c=symmetric-random+upnp`` (the router runs miniupnpd: UPnP-IGD, NAT-PMP and PCP)."""
        name, sep, rest = text.partition("=")
        if not sep:
            raise ValueError(f"{text!r}: expected NAME=TYPE[+upnp][:drop|rst][xHOSTS]")
        rest = rest.replace(" ", "")
        port_mapping = "+upnp" in rest
        rest = rest.replace("+upnp", "")
        hosts = 1
        if "x" in rest.rsplit(":", 1)[-1] and re.search(r"x\d+$", rest):
            rest, count = rest.rsplit("x", 1)
            hosts = int(count)
        kind, _, policy = rest.partition(":")
        return cls(
            name=name.strip(),
            nat=NatType(kind),
            syn_policy=SynPolicy(policy or SynPolicy.DROP.value),
            hosts=hosts,
            link=link or LinkShape(),
            port_mapping=port_mapping,
        )


@dataclass(frozen=True)
class LabSpec:
    """A whole lab: routers (with their hosts) around one server on the lab internet."""

    routers: tuple[RouterSpec, ...]
    server_link: LinkShape = field(default_factory=LinkShape)
    ipv6: bool = False  # IPv6 everywhere too: routers are RFC 6092 firewalls for it (no NAT66)

    def __init__(
        self, routers: list[RouterSpec] | tuple[RouterSpec, ...], server_link: LinkShape | None = None,
        *, ipv6: bool = False,
    ) -> None:
        object.__setattr__(self, "routers", tuple(routers))
        object.__setattr__(self, "server_link", server_link or LinkShape())
        object.__setattr__(self, "ipv6", ipv6)
        names = [r.name for r in self.routers]
        if len(set(names)) != len(names):
            raise ValueError("router names must be unique")
        if len(names) > MAX_ROUTERS:
            raise ValueError(f"at most {MAX_ROUTERS} routers")

    @classmethod
    def every_type(cls, policy: SynPolicy = SynPolicy.DROP, link: LinkShape | None = None, *,
                   ipv6: bool = False) -> LabSpec:
        """One router of each NAT type (names are the types' initials, e.g. ``pr`` for port-restricted)."""
        return cls([RouterSpec(SHORT_NAMES[t], t, policy, link=link or LinkShape()) for t in NatType], ipv6=ipv6)


SHORT_NAMES: dict[NatType, str] = {
    NatType.NONE: "pub",
    NatType.FULL_CONE: "fc",
    NatType.RESTRICTED: "rc",
    NatType.PORT_RESTRICTED: "pr",
    NatType.SYMMETRIC_SEQ: "seq",
    NatType.SYMMETRIC_RANDOM: "rnd",
    NatType.CGNAT: "cgn",
}


def wan_address(index: int) -> str:
    return f"198.51.100.{101 + index}"


def lan_address(index: int, host: int) -> str:
    """Address of host number ``host`` (0-based) on router ``index``'s LAN; the router is .1."""
    return f"10.0.{index + 1}.{2 + host}"


def lan_gateway(index: int) -> str:
    return f"10.0.{index + 1}.1"


def lan_subnet(index: int) -> str:
    return f"10.0.{index + 1}.0/24"


def carrier_address(index: int, home: bool) -> str:
    return f"100.64.{index + 1}.{2 if home else 1}"


def public_host_address(index: int, host: int) -> str:
    return f"198.51.100.{151 + index * MAX_HOSTS_PER_ROUTER + host}"


def wan_address6(index: int) -> str:
    return f"2001:db8::{101 + index}"


def lan_prefix6(index: int) -> str:
    """Router ``index``'s LAN, 2001:db8:(index+1)::/64."""
    return f"2001:db8:{index + 1}::/{PREFIXLEN6}"


def lan_address6(index: int, host: int) -> str:
    return f"2001:db8:{index + 1}::{2 + host}"


def lan_gateway6(index: int) -> str:
    return f"2001:db8:{index + 1}::1"


def carrier_address6(index: int, home: bool) -> str:
    return f"2001:db8:c{index + 1}::{2 if home else 1}"


def public_host_address6(index: int, host: int) -> str:
    return f"2001:db8::{151 + index * MAX_HOSTS_PER_ROUTER + host}"
