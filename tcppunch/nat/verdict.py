"""A sentence a person understands, derived from the measured TCP behaviour.

The rules follow from how TCP simultaneous open gets through NATs:

* A peer's SYN gets in only if our NAT already has a mapping for the peer's endpoint (our own SYN went
  out first) or our filter lets strangers in. Both peers send SYNs at the same fire time, so with
  endpoint-independent mapping each side can aim at the other's known public endpoint: cone <-> cone
  works directly, and so does anything towards a host with no NAT or endpoint-independent filtering.
* With endpoint-dependent mapping ("symmetric") our public port for the peer is not the one the server
  saw; the peer must aim at a predicted port. A fixed allocation step makes that practical (the port is
  the last observed one plus the step, plus whatever other traffic took meanwhile); a random allocator
  makes it a lottery: against a peer that keeps one public port but filters by port, many connections
  meet many guessed ports (birthday punching); two symmetric NATs need the relay.
* An RST for unsolicited SYNs does not stop punching but kills early SYNs: the connector must retry
  until the deadline. A dropped SYN is the friendly case.
"""

from __future__ import annotations

from collections.abc import Sequence

from tcppunch.wire.natreport import FilteringBehaviour, MappingBehaviour, PortAllocation, SynResponse, TcpBehaviour


def verdict(tcp: TcpBehaviour, behind_nat: bool | None, untested: Sequence[str] = ()) -> str:
    """One paragraph: which peers this host can reach directly, when prediction is needed, when a relay."""
    parts: list[str] = []
    mapping, filtering = tcp.mapping, tcp.filtering
    if behind_nat is False and filtering in (None, FilteringBehaviour.ENDPOINT_INDEPENDENT):
        parts.append(
            "No NAT in front of this host: it is reachable directly, so every peer can open a TCP connection "
            "to it, whatever NAT the peer is behind."
        )
    elif filtering is FilteringBehaviour.ENDPOINT_INDEPENDENT and mapping is MappingBehaviour.ENDPOINT_INDEPENDENT:
        parts.append(
            "Full-cone NAT (endpoint-independent mapping and filtering): peers can reach this host's public "
            "endpoint directly, so direct TCP works with any peer, even one behind a symmetric NAT."
        )
    elif mapping is MappingBehaviour.ENDPOINT_INDEPENDENT:
        if filtering is FilteringBehaviour.ADDRESS_DEPENDENT:
            kind = "restricted-cone NAT (address-dependent filtering)"
        elif filtering is FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT:
            kind = "port-restricted cone NAT (address-and-port-dependent filtering)"
        else:
            kind = "cone NAT (endpoint-independent mapping; filtering not measured)"
        parts.append(
            f"{kind[0].upper()}{kind[1:]}: the public port stays the same for every destination, so TCP hole "
            "punching (simultaneous open) works directly with peers that have no NAT or a cone NAT, and with "
            "a symmetric peer whose next port can be predicted (sequential allocation). Against a symmetric "
            "NAT with random ports: directly if this NAT filters by address only, by birthday punching "
            "(hundreds of SYNs to guessed ports, opt out with --no-birthday) if it filters by port."
        )
    elif mapping in (MappingBehaviour.ADDRESS_DEPENDENT, MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT):
        if tcp.port_delta is not None and tcp.port_delta != 0:
            parts.append(
                f"Symmetric NAT with sequential ports (each new connection takes the next port, step "
                f"{tcp.port_delta:+d}): peers must aim at a predicted port, which tcppunch does. Direct TCP "
                "works with peers that have no NAT, a full-cone NAT, or a cone NAT (with prediction); with "
                "another symmetric NAT it is unlikely, so expect the relay."
            )
        elif tcp.port_allocation is PortAllocation.UNKNOWN:
            parts.append(
                "Symmetric NAT whose port allocation could not be measured (too few samples to tell a fixed "
                "step from random ports), so tcppunch predicts nothing and treats it as random: direct TCP "
                "works with peers that have no NAT, a full-cone or a restricted-cone NAT; with a port-restricted "
                "cone NAT (or CGNAT) by birthday punching; with another symmetric NAT only the relay will do."
            )
        else:
            parts.append(
                "Symmetric NAT with random port allocation: this host's public port cannot be predicted, so "
                "direct TCP works with peers that have no NAT, a full-cone or a restricted-cone NAT; with a "
                "port-restricted cone NAT (or CGNAT) by birthday punching (hundreds of connections against "
                "hundreds of guessed ports); with another symmetric NAT only the relay will do."
            )
    else:
        parts.append(
            "The TCP mapping could not be measured, so tcppunch will try direct TCP and fall back to the relay."
        )
    if tcp.unsolicited_syn is SynResponse.RST:
        parts.append(
            "The NAT answers unsolicited SYNs with RST, so a peer's early SYN is refused; tcppunch keeps "
            "retrying until the punch deadline."
        )
    elif tcp.unsolicited_syn is SynResponse.DROP:
        parts.append("Unsolicited SYNs are dropped silently, the friendly case for simultaneous open.")
    if tcp.hairpin is False and behind_nat:
        parts.append("No hairpinning: peers behind this same NAT must be reached on their private addresses.")
    if untested:
        parts.append(f"Not measured: {'; '.join(untested)}.")
    return " ".join(parts)
