"""The lab's NAT types: each a real nftables rule set, each with the behaviour it promises.

Linux NAT (conntrack + SNAT) is, left alone, endpoint-independent in mapping (it keeps the source port
whenever the resulting 5-tuple is free) and address-and-port-dependent in filtering (only packets of a
tracked connection get back in): a "port-restricted cone". The other types are built on top:

* full-cone / restricted: every new outbound connection records, in dynamic nftables maps, which
  internal endpoint owns the public port (and, for restricted, which remote address was contacted);
  inbound new connections that match are DNAT-ed to the owner. That gives endpoint-independent or
  address-dependent filtering, which Linux does not do natively.
* symmetric-seq: every new connection gets the next port from a counter (``numgen inc``) through a map
  (numgen yields host byte order, so a map turns it into a port): address-and-port-dependent mapping
  with a predictable step of +1.
* symmetric-random: ``snat ... fully-random`` over 1024-65535: a fresh random port per connection.
* cgnat: two port-restricted layers (home router, then carrier router on 100.64.0.0/10).

Unsolicited inbound SYNs (no mapping, or filtered) are dropped or answered with RST per router
(:class:`SynPolicy`); full-cone lets them in by design, none has no NAT at all.
The lab's own probes (tcppunch.lab.probe) measure each promise; its tests assert them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tcppunch.wire.natreport import FilteringBehaviour, MappingBehaviour, SynResponse

# Public ports handed out by symmetric-seq: SEQ_BASE, SEQ_BASE+1, ... wrapping after SEQ_SPAN.
SEQ_BASE = 20000
SEQ_SPAN = 8192
# How long full-cone / restricted remember a mapping for inbound use (RFC 5382 REQ-5: at least 124 min
# for established connections; the lab keeps it short so that runs stay independent).
MAPPING_TIMEOUT_S = 600


class SynPolicy(StrEnum):
    """What a router does with an unsolicited inbound SYN."""

    DROP = "drop"
    RST = "rst"


class NatType(StrEnum):
    """A NAT behaviour the lab can build. Values are the names used on the command line."""

    NONE = "none"
    FULL_CONE = "full-cone"
    RESTRICTED = "restricted"
    PORT_RESTRICTED = "port-restricted"
    SYMMETRIC_SEQ = "symmetric-seq"
    SYMMETRIC_RANDOM = "symmetric-random"
    CGNAT = "cgnat"

    @property
    def truth(self) -> NatTruth:
        """The behaviour this type promises (RFC 4787/5382 terms)."""
        return _TRUTH[self]

    @property
    def mapping(self) -> MappingBehaviour:
        return self.truth.mapping

    @property
    def filtering(self) -> FilteringBehaviour:
        return self.truth.filtering

    @property
    def port_preservation(self) -> bool:
        return self.truth.port_preservation

    @property
    def port_delta(self) -> int | None:
        return self.truth.port_delta

    def unsolicited_syn(self, policy: SynPolicy) -> SynResponse:
        """What an unsolicited SYN from a stranger meets behind this type with ``policy``."""
        if self in (NatType.NONE, NatType.FULL_CONE):
            return SynResponse.ACCEPT
        return SynResponse(policy.value)


@dataclass(frozen=True)
class NatTruth:
    """Ground truth of a NAT type.

    ``port_delta`` is the step between the public ports of consecutive new connections from one local
    port: 0 when the mapping is reused (endpoint-independent), 1 for symmetric-seq, None when random.
    ``hairpin``: whether a host reaches its own public endpoint (lab routers do not hairpin).
    """

    mapping: MappingBehaviour
    filtering: FilteringBehaviour
    port_preservation: bool
    port_delta: int | None
    hairpin: bool
    layers: int


_EIM = MappingBehaviour.ENDPOINT_INDEPENDENT
_APDM = MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT
_EIF = FilteringBehaviour.ENDPOINT_INDEPENDENT
_ADF = FilteringBehaviour.ADDRESS_DEPENDENT
_APDF = FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT

_TRUTH: dict[NatType, NatTruth] = {
    NatType.NONE: NatTruth(_EIM, _EIF, True, 0, True, 0),
    NatType.FULL_CONE: NatTruth(_EIM, _EIF, True, 0, False, 1),
    NatType.RESTRICTED: NatTruth(_EIM, _ADF, True, 0, False, 1),
    NatType.PORT_RESTRICTED: NatTruth(_EIM, _APDF, True, 0, False, 1),
    NatType.SYMMETRIC_SEQ: NatTruth(_APDM, _APDF, False, 1, False, 1),
    NatType.SYMMETRIC_RANDOM: NatTruth(_APDM, _APDF, False, None, False, 1),
    NatType.CGNAT: NatTruth(_EIM, _APDF, True, 0, False, 2),
}


def router_ruleset(nat: NatType, policy: SynPolicy, *, wan_if: str, wan_ip: str,
                   stun_server: tuple[str, str, int] | None = None) -> str:
    """The complete nftables rule set of one NAT router (for cgnat: of each of its two layers,
    which are port-restricted). ``stun_server`` (first address, last address, first port): UDP answers
    from there (that port and the next) reach the router itself, which miniupnpd's STUN check needs."""
    if nat is NatType.NONE:
        raise ValueError("a 'none' host has no router")
    kind = NatType.PORT_RESTRICTED if nat is NatType.CGNAT else nat
    return "\n".join(
        [
            "flush ruleset",
            "table ip tcppunch_nat {",
            *_maps(kind),
            *_prerouting(kind, wan_if),
            *_postrouting(kind, wan_if, wan_ip),
            *_recorder(kind, wan_if),
            *_unsolicited(policy, wan_if, stun_server),
            "}",
            "",
        ]
    )


def _maps(kind: NatType) -> list[str]:
    lines: list[str] = []
    if kind is NatType.SYMMETRIC_SEQ:
        elements = ", ".join(f"{i} : {SEQ_BASE + i}" for i in range(SEQ_SPAN))
        lines.append(f"  map seq_ports {{ typeof numgen inc mod {SEQ_SPAN} : tcp sport; elements = {{ {elements} }} }}")
    if kind in (NatType.FULL_CONE, NatType.RESTRICTED):
        lines.append(
            "  map owner { typeof meta l4proto . th dport : ip saddr . th sport; "
            f"flags dynamic, timeout; timeout {MAPPING_TIMEOUT_S}s; }}"
        )
    if kind is NatType.RESTRICTED:
        lines.append(
            "  set contacted { typeof meta l4proto . th dport . ip saddr; "
            f"flags dynamic, timeout; timeout {MAPPING_TIMEOUT_S}s; }}"
        )
    return lines


def _prerouting(kind: NatType, wan_if: str) -> list[str]:
    if kind is NatType.FULL_CONE:
        match = ""
    elif kind is NatType.RESTRICTED:
        match = "meta l4proto . th dport . ip saddr @contacted "
    else:
        return []
    return [
        "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;",
        f'    iifname "{wan_if}" meta l4proto {{ tcp, udp }} {match}dnat ip to meta l4proto . th dport map @owner',
        "  }",
    ]


def _postrouting(kind: NatType, wan_if: str, wan_ip: str) -> list[str]:
    if kind is NatType.SYMMETRIC_SEQ:
        snat = f"snat ip to {wan_ip} : numgen inc mod {SEQ_SPAN} map @seq_ports"
    elif kind is NatType.SYMMETRIC_RANDOM:
        snat = f"snat ip to {wan_ip}:1024-65535 fully-random"
    else:
        snat = f"snat ip to {wan_ip}"
    # Only forwarded traffic is translated: the router's own packets (the RSTs of the rst policy above all)
    # must neither consume a symmetric-seq port nor get a random source port.
    return [
        "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;",
        f'    oifname "{wan_if}" ip saddr != {wan_ip} meta l4proto {{ tcp, udp }} {snat}',
        f'    oifname "{wan_if}" ip saddr != {wan_ip} snat ip to {wan_ip}',
        "  }",
    ]


def _recorder(kind: NatType, wan_if: str) -> list[str]:
    """After SNAT, remember which internal endpoint owns each public port (and whom it contacted)."""
    if kind not in (NatType.FULL_CONE, NatType.RESTRICTED):
        return []
    lines = [
        "  chain record { type filter hook postrouting priority srcnat + 10; policy accept;",
        f'    oifname "{wan_if}" ct state new meta l4proto {{ tcp, udp }} update @owner '
        "{ meta l4proto . ct reply proto-dst : ct original ip saddr . ct original proto-src }",
    ]
    if kind is NatType.RESTRICTED:
        lines.append(
            f'    oifname "{wan_if}" ct state new meta l4proto {{ tcp, udp }} update @contacted '
            "{ meta l4proto . ct reply proto-dst . ip daddr }"
        )
    lines.append("  }")
    return lines


def _unsolicited(policy: SynPolicy, wan_if: str, stun_server: tuple[str, str, int] | None = None) -> list[str]:
    """Inbound connections nobody asked for: to the router itself (input) or routed inward (forward)."""
    if policy is SynPolicy.DROP:
        tcp_verdict, udp_verdict = "drop", "drop"
    else:
        tcp_verdict, udp_verdict = "reject with tcp reset", "reject"
    trusted = []
    if stun_server is not None:
        first, last, port = stun_server
        trusted.append(f'    iifname "{wan_if}" ip saddr {first}-{last} udp sport {port}-{port + 1} accept')
    return [
        "  chain input { type filter hook input priority filter; policy accept;",
        *trusted,
        f'    iifname "{wan_if}" ct state new meta l4proto tcp {tcp_verdict}',
        f'    iifname "{wan_if}" ct state new meta l4proto udp {udp_verdict}',
        "  }",
        "  chain forward { type filter hook forward priority filter; policy accept;",
        f'    iifname "{wan_if}" ct state new ct status dnat accept',
        f'    iifname "{wan_if}" ct state new meta l4proto tcp {tcp_verdict}',
        f'    iifname "{wan_if}" ct state new drop',
        "  }",
    ]
