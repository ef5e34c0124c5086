"""The connectivity matrix's lab: two routers of every NAT type, so that every ordered pair of types
(including a type with itself) has its own two NATs. Ground truth of which pairs can go direct lives here
too, derived from the types' behaviour alone (not from the punch engine's own rule), so that tests
compare the engine with an independent statement.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from tcppunch.lab.nat_types import NatType, SynPolicy
from tcppunch.lab.topology import SHORT_NAMES, LabSpec, LinkShape, RouterSpec
from tcppunch.wire.natreport import FilteringBehaviour, MappingBehaviour

# With the rst policy a SYN that arrives before the peer's own SYN has left is answered with a RST, which
# also closes the sender's NAT entry (Linux conntrack then treats the peer's SYN as invalid). Punching then
# needs the two SYNs to cross in flight: the window is the one-way delay between the NATs. Real paths
# have milliseconds; the lab's bridge has ~0.1 ms, so rst matrices run with this much delay per WAN link.
RST_MATRIX_DELAY_MS = 5.0


class MappingSides(StrEnum):
    """Which routers of a matrix run miniupnpd (the matrix's port-mapping columns)."""

    NONE = "none"
    ONE = "one"  # the listening side's router (side b) only
    BOTH = "both"

    def sides(self) -> str:
        return {MappingSides.NONE: "", MappingSides.ONE: "b", MappingSides.BOTH: "ab"}[self]


def matrix_spec(policy: SynPolicy, delay_ms: float | None = None, *, mapping: MappingSides = MappingSides.NONE,
                types: Iterable[NatType] = tuple(NatType), ipv6: bool = False) -> LabSpec:
    """Routers ``<short>a`` and ``<short>b`` for every NAT type (e.g. ``pra``, ``prb``), those of
    ``mapping``'s sides with port mapping (miniupnpd; a 'none' host has no router to run it on);
    ``ipv6``: the lab's IPv6 too (RFC 6092 firewalls, no NAT66), the matrix's IPv6 column."""
    if delay_ms is None:
        delay_ms = RST_MATRIX_DELAY_MS if policy is SynPolicy.RST else 0.0
    link = LinkShape(delay_ms=delay_ms)
    return LabSpec([RouterSpec(f"{SHORT_NAMES[t]}{side}", t, policy, link=link,
                               port_mapping=side in mapping.sides() and t is not NatType.NONE)
                    for t in types for side in "ab"], ipv6=ipv6)


def can_map(t: NatType) -> bool:
    """Whether a host behind ``t`` can get a mapping from its router: not behind cgnat, whose carrier layer
    (which nobody asks) filters; a 'none' host needs none."""
    return t not in (NatType.NONE, NatType.CGNAT)


def mapping_wins(a: NatType, b: NatType, mapping: MappingSides) -> bool:
    """Whether the pair has a port mapping to connect through (so the winning candidate is the mapping)."""
    return (mapping is MappingSides.BOTH and can_map(a)) or (mapping is not MappingSides.NONE and can_map(b))


def host_names(initiator: NatType, responder: NatType) -> tuple[str, str]:
    """Router names of the initiator's (side a) and the responder's (side b) NAT."""
    return f"{SHORT_NAMES[initiator]}a", f"{SHORT_NAMES[responder]}b"


def direct_expected(a: NatType, b: NatType, mapping: MappingSides = MappingSides.NONE, *, ipv6: bool = False
                    ) -> bool:
    """Can two hosts behind ``a`` and ``b`` reach each other directly (with port mapping on ``mapping``'s
    sides; ``ipv6``: both have IPv6 too)?

    IPv6 makes any pair direct: there is no NAT on that path, and a stateful firewall lets a simultaneous
    open through (RFC 6092 REC-31). A mapping makes any pair direct: the other side connects to the
    mapped port, whatever the NATs do. Without one (or behind cgnat, where none can be had) the NAT types decide:

    A side whose NAT maps each connection to an unguessable port (random) is reached directly when the
    other side's filter opens towards an address, not a port (full cone, restricted, no NAT), or, by
    birthday punching, when the other side keeps one public port for everything (endpoint-independent
    mapping: port-restricted, cgnat): the random side opens many connections to that fixed port, the
    other sends SYNs to many guessed ports, and one guess meets one connection (98 % per try with the
    defaults, by 1 - exp(-M*N/R)). Two random sides, or a random side and a symmetric-seq one (whose
    mapping is new per destination and which filters by port), have no port to meet at. Everything
    else has a port the other side can name: its fixed mapping, or (symmetric-seq) a predictable next port.
    """

    def random_mapping(t: NatType) -> bool:
        return t.mapping is not MappingBehaviour.ENDPOINT_INDEPENDENT and t.port_delta is None

    def closed_to_random(t: NatType) -> bool:
        """Filters by port and has no fixed public port a birthday punch could aim at."""
        return (t.filtering is FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT
                and t.mapping is not MappingBehaviour.ENDPOINT_INDEPENDENT)

    if ipv6 or mapping_wins(a, b, mapping):
        return True
    if random_mapping(a) and closed_to_random(b):
        return False
    return not (random_mapping(b) and closed_to_random(a))
