"""The vocabulary of NAT behaviour (RFC 4787 / RFC 5382 terms) and the report that ``detect`` produces.

Everything that reasons about NATs speaks these types: detection writes a :class:`NatReport`, the
coordinator carries it from peer to peer, the punch engine predicts ports from it, and the lab states its
ground truth with the same enums, so a test can compare a measurement with the truth directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from tcppunch.wire.endpoint import Endpoint


class MappingBehaviour(StrEnum):
    """How the NAT chooses the public endpoint of a new outbound connection (RFC 4787 section 4.1)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


class FilteringBehaviour(StrEnum):
    """Which inbound connections the NAT lets through to a mapped endpoint (RFC 4787 section 5)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


class SynResponse(StrEnum):
    """What happens to an unsolicited inbound SYN (RFC 5382 REQ-4 recommends dropping it silently)."""

    DROP = "drop"
    RST = "rst"
    ACCEPT = "accept"


class PortAllocation(StrEnum):
    """How the NAT picks the public port of each new mapping, and how sure the measurement is of it.

    A fixed step is claimed only when two or more steps between new public ports agree: one step is
    what any allocator, random ones included, produces, so it is ``unknown``, not a step.
    """

    REUSED = "reused"  # one public port for every destination: nothing new to predict
    SEQUENTIAL = "sequential"  # new ports a fixed step apart (port_delta), seen in two or more steps
    RANDOM = "random"  # the steps between new ports disagree
    UNKNOWN = "unknown"  # fewer than two steps seen: a fixed step cannot be told from chance


class PortMappingProtocol(StrEnum):
    """How a host asks its gateway for an inbound mapping (tcppunch.portmap speaks all three)."""

    PCP = "pcp"  # RFC 6887
    NAT_PMP = "nat-pmp"  # RFC 6886
    UPNP_IGD = "upnp-igd"  # UPnP Internet Gateway Device, WANIPConnection


@dataclass(frozen=True)
class PortMapping:
    """A TCP mapping the gateway granted: connections to ``external`` reach our ``internal_port``.

    ``lifetime`` is in seconds as granted (the client renews at half of it).
    """

    protocol: PortMappingProtocol
    external: Endpoint
    internal_port: int
    lifetime: int

    def to_json(self) -> dict[str, Any]:
        return {"protocol": self.protocol.value, "external": self.external.to_json(),
                "internal_port": self.internal_port, "lifetime": self.lifetime}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PortMapping:
        return cls(PortMappingProtocol(str(data["protocol"])), Endpoint.from_json(data["external"]),
                   int(data["internal_port"]), int(data["lifetime"]))


@dataclass(frozen=True)
class PortMappingSupport:
    """What the gateway said about port mapping: the protocols it answered, and the mapping we hold.

    ``protocols`` empty means none answered within the budget; ``mapping`` is the granted mapping of the
    punch port (a peer's) or of the test port (detect, which deletes it again); ``error`` says why no
    mapping was granted when some protocol answered.
    """

    protocols: tuple[PortMappingProtocol, ...] = ()
    mapping: PortMapping | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"protocols": [p.value for p in self.protocols],
                "mapping": None if self.mapping is None else self.mapping.to_json(), "error": self.error}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PortMappingSupport:
        mapping = data.get("mapping")
        return cls(tuple(PortMappingProtocol(str(p)) for p in data.get("protocols") or ()),
                   None if mapping is None else PortMapping.from_json(mapping),
                   None if data.get("error") is None else str(data["error"]))


@dataclass(frozen=True)
class Ipv6Support:
    """Whether IPv6 is usable for direct connections: ``works`` is True when a TCP exchange with the server
    over IPv6 succeeded and the server saw ``address`` itself (no NAT66), False when this host has no
    global IPv6 address or that exchange failed or was translated, None when it was not tested."""

    address: str | None
    works: bool | None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "works": self.works, "detail": self.detail}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ipv6Support:
        address, works = data.get("address"), data.get("works")
        return cls(None if address is None else str(address), _opt_bool(works), str(data.get("detail") or ""))


@dataclass(frozen=True)
class TcpBehaviour:
    """What matters for TCP hole punching, measured over TCP. ``None`` means "not measured"."""

    mapping: MappingBehaviour | None = None
    filtering: FilteringBehaviour | None = None
    port_preservation: bool | None = None
    # Allocation step between consecutive new mappings of an endpoint-dependent NAT; None if random/unknown.
    port_delta: int | None = None
    unsolicited_syn: SynResponse | None = None
    hairpin: bool | None = None
    # Which of random and unknown a None port_delta means (None: not measured, or a report from before).
    port_allocation: PortAllocation | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "mapping": _value(self.mapping),
            "filtering": _value(self.filtering),
            "port_preservation": self.port_preservation,
            "port_delta": self.port_delta,
            "unsolicited_syn": _value(self.unsolicited_syn),
            "hairpin": self.hairpin,
            "port_allocation": _value(self.port_allocation),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TcpBehaviour:
        return cls(
            mapping=_enum(MappingBehaviour, data.get("mapping")),
            filtering=_enum(FilteringBehaviour, data.get("filtering")),
            port_preservation=_opt_bool(data.get("port_preservation")),
            port_delta=None if data.get("port_delta") is None else int(data["port_delta"]),
            unsolicited_syn=_enum(SynResponse, data.get("unsolicited_syn")),
            hairpin=_opt_bool(data.get("hairpin")),
            port_allocation=_enum(PortAllocation, data.get("port_allocation")),
        )


@dataclass(frozen=True)
class NatReport:
    """Everything ``tcppunch detect`` learned about the NAT in front of one host."""

    tcp: TcpBehaviour = field(default_factory=TcpBehaviour)
    public: Endpoint | None = None
    local: tuple[str, ...] = ()
    udp_nat_type: str | None = None
    behind_nat: bool | None = None
    verdict: str = ""
    # Tests that could not run (for example: the server has one address) and what that leaves unknown.
    untested: tuple[str, ...] = ()
    # None: not probed (``detect --no-port-mapping``, or an older peer).
    port_mapping: PortMappingSupport | None = None
    # None: not probed (an older peer).
    ipv6: Ipv6Support | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "udp": {"nat_type": self.udp_nat_type},
            "tcp": self.tcp.to_json(),
            "public": None if self.public is None else self.public.to_json(),
            "local": list(self.local),
            "behind_nat": self.behind_nat,
            "verdict": self.verdict,
            "untested": list(self.untested),
            "port_mapping": None if self.port_mapping is None else self.port_mapping.to_json(),
            "ipv6": None if self.ipv6 is None else self.ipv6.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NatReport:
        udp = data.get("udp") or {}
        public = data.get("public")
        return cls(
            tcp=TcpBehaviour.from_json(data.get("tcp") or {}),
            public=None if public is None else Endpoint.from_json(public),
            local=tuple(str(a) for a in data.get("local") or ()),
            udp_nat_type=None if udp.get("nat_type") is None else str(udp["nat_type"]),
            behind_nat=_opt_bool(data.get("behind_nat")),
            verdict=str(data.get("verdict") or ""),
            untested=tuple(str(u) for u in data.get("untested") or ()),
            port_mapping=None if data.get("port_mapping") is None
            else PortMappingSupport.from_json(data["port_mapping"]),
            ipv6=None if data.get("ipv6") is None else Ipv6Support.from_json(data["ipv6"]),
        )

    def replace(self, **changes: Any) -> NatReport:
        return dataclasses.replace(self, **changes)


def _value(member: StrEnum | None) -> str | None:
    return None if member is None else member.value


E = TypeVar("E", bound=StrEnum)


def _enum(kind: type[E], raw: Any) -> E | None:
    return None if raw is None else kind(str(raw))


def _opt_bool(raw: Any) -> bool | None:
    return None if raw is None else bool(raw)
