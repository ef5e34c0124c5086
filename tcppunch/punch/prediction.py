"""Which endpoints of the peer to send SYNs to, and whether a direct connection can work at all.

Pure functions of two :class:`NatReport` s and the peer's endpoints (no I/O). The reasoning behind every
rule is written out in docs/punching.md ("the pair table"). In short, what matters about a NAT is how
its *mapping* can be predicted and what its *filtering* lets in:

* endpoint-independent mapping: the peer's observed public endpoint is its mapping towards us too;
* sequential (address[-and-port]-dependent with a known port delta k): the peer's i-th next new
  connection leaves from ``observed.port + k*i``; we target a small window of those, in index order;
* random: unpredictable; direct works only if the *other* side lets a SYN from an unknown port in
  (endpoint-independent or address-dependent filtering).

IPv6 has no NAT: a peer's global IPv6 address and punch port are its public endpoint, behind at most a
stateful firewall through which a simultaneous open works (RFC 6092 REC-31). When both peers have IPv6,
direct is possible whatever their IPv4 NATs do, and the IPv6 candidates are raced first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from tcppunch.punch.plan import SLOW_RETRY, Candidate, CandidateKind, RetryPolicy
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import FilteringBehaviour, MappingBehaviour, NatReport

DEFAULT_WINDOW = 8


class MappingClass(StrEnum):
    """How predictable a NAT's public endpoint is, from the point of view of a puncher."""

    PUBLIC = "public"  # no NAT at all
    INDEPENDENT = "independent"  # the same public endpoint for every destination
    SEQUENTIAL = "sequential"  # a new port per destination, advancing by a known delta
    RANDOM = "random"  # a new port per destination, unpredictable
    UNKNOWN = "unknown"  # not measured: treated as independent (trying is cheap, the relay remains)


def classify(report: NatReport | None) -> MappingClass:
    """The :class:`MappingClass` of a NAT report (None: unknown)."""
    if report is None:
        return MappingClass.UNKNOWN
    if report.behind_nat is False:
        return MappingClass.PUBLIC
    tcp = report.tcp
    if tcp.mapping is None:
        return MappingClass.UNKNOWN
    if tcp.mapping is MappingBehaviour.ENDPOINT_INDEPENDENT:
        return MappingClass.INDEPENDENT
    if tcp.port_delta is None:
        return MappingClass.RANDOM
    if tcp.port_delta == 0:
        return MappingClass.INDEPENDENT  # dependent in name, but every mapping keeps the same port
    return MappingClass.SEQUENTIAL


def _filtering(report: NatReport | None) -> FilteringBehaviour | None:
    if report is None:
        return None
    if report.behind_nat is False:
        return FilteringBehaviour.ENDPOINT_INDEPENDENT
    return report.tcp.filtering


@dataclass(frozen=True)
class DirectVerdict:
    """Whether a direct connection between two NATs can work, and why. Truthy when possible."""

    possible: bool
    reason: str
    # Possible only by birthday punching (tcppunch.punch.birthday): one NAT maps randomly, the other keeps
    # one public endpoint but filters by port.
    birthday: bool = False

    def __bool__(self) -> bool:
        return self.possible


def direct_possible(
    a: NatReport | None, b: NatReport | None, *, ipv6: bool = False, birthday: bool = True
) -> DirectVerdict:
    """Whether punching between hosts behind NATs ``a`` and ``b`` can succeed (symmetric in a, b);
    ``ipv6``: both peers announced IPv6 candidates.

    Unknown behaviour counts as "try": a failed punch costs one deadline, a skipped one that would have
    worked costs a relay forever. ``birthday=False`` (a peer opted out of birthday punching) rules out the
    pairs that only a birthday punch can connect.
    """
    if mapped_endpoint(a) is not None or mapped_endpoint(b) is not None:
        return DirectVerdict(True, "port mapping: a router forwards the mapped port, the other side connects to it")
    if ipv6:  # direct either way; ``birthday`` still says what the IPv4 fallback (raced second) needs
        v4 = direct_possible(a, b, birthday=birthday)
        why = ("both peers have IPv6: no NAT on that path, a simultaneous open passes stateful firewalls "
               f"(RFC 6092 REC-31); over IPv4: {v4.reason}")
        return DirectVerdict(True, why, birthday=v4.birthday)
    ca, cb = classify(a), classify(b)
    if MappingClass.PUBLIC in (ca, cb):
        return DirectVerdict(True, "one side has no NAT: the other connects to its listener")
    if MappingClass.RANDOM not in (ca, cb):
        if MappingClass.SEQUENTIAL in (ca, cb):
            return DirectVerdict(True, "sequential mapping: the other side targets the predicted ports")
        return DirectVerdict(True, "both mappings are endpoint-independent (or unknown): simultaneous open")
    if ca is MappingClass.RANDOM and cb is MappingClass.RANDOM:
        return DirectVerdict(False, "both NATs map randomly: neither side can name the other's port")
    other = b if ca is MappingClass.RANDOM else a
    filtering = _filtering(other)
    if filtering is None:
        return DirectVerdict(True, "one NAT maps randomly and the other's filtering is unknown: trying")
    if filtering is FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT:
        if birthday and classify(other) is MappingClass.INDEPENDENT:
            return DirectVerdict(
                True,
                "one NAT maps randomly and the other filters by address and port but keeps one public "
                "endpoint: birthday punching (many random-side connections meet many guessed ports)",
                birthday=True,
            )
        return DirectVerdict(
            False,
            "one NAT maps randomly and the other filters by address and port: the filter can only be "
            "opened towards the random side's port, which nobody can predict",
        )
    return DirectVerdict(
        True,
        "one NAT maps randomly but the other filters "
        + ("nothing (full cone)" if filtering is FilteringBehaviour.ENDPOINT_INDEPENDENT else "by address only")
        + ": the random side connects to the other's fixed endpoint",
    )


def predicted_ports(observed_port: int, delta: int, window: int) -> list[int]:
    """``observed_port + delta*i`` for i = 1..window, skipping values outside 1..65535."""
    ports = [observed_port + delta * i for i in range(1, window + 1)]
    return [p for p in ports if 1 <= p <= 65535]


def mapped_endpoint(report: NatReport | None) -> Endpoint | None:
    """The public endpoint of the inbound mapping a peer holds on its router (port mapping), if any."""
    if report is None or report.port_mapping is None or report.port_mapping.mapping is None:
        return None
    return report.port_mapping.mapping.external


def build_candidates(
    *,
    peer_observed: Endpoint,
    peer_nat: NatReport | None,
    own_nat: NatReport | None = None,
    peer_private: Sequence[Endpoint] = (),
    own_public_ip: str | None = None,
    window: int = DEFAULT_WINDOW,
    peer_ipv6: Sequence[Endpoint] = (),
) -> tuple[Candidate, ...]:
    """The peer's candidates in the order our SYNs must leave.

    * the peer's IPv6 endpoints first (pass them only when we can send over IPv6 ourselves); the engine
      staggers the IPv4 ones after them (Happy Eyeballs);
    * private endpoints only when both peers share a public address (same NAT): otherwise the SYN
      would cross our NAT and, on a sequential NAT, consume the port the peer predicted for us;
    * the peer's port mapping, when its router granted one: its router forwards that port to the peer's
      listener, whatever either NAT does; the other candidates follow in case the mapping went stale;
    * nothing more when only we hold a mapping: the peer connects to it, and our own SYN to the peer's
      endpoint would make a NAT entry whose reply tuple equals the DNAT-ed inbound connection's, and the
      router's conntrack drops the second of the two (seen in the lab behind symmetric-random);
    * the observed endpoint unless the peer's mapping is sequential (then its observed port belongs to
      the coordinator connection only) — except when the peer's filtering is endpoint-independent;
    * predicted ports ``observed + k*i`` in index order, when the peer's NAT is sequential. When our own
      NAT is endpoint-dependent too, the list is exactly the predicted window, so that our i-th new
      mapping is made by our i-th SYN, towards the peer's i-th predicted port (lockstep).
    """
    if window < 1:
        raise ValueError("window must be at least 1")
    out = list(ipv6_candidates(peer_ipv6))
    if own_public_ip is not None and own_public_ip == peer_observed.ip:
        out.extend(Candidate(e, CandidateKind.PRIVATE) for e in peer_private if e != peer_observed)
    peer_mapped = mapped_endpoint(peer_nat)
    if peer_mapped is not None:
        out.append(Candidate(peer_mapped, CandidateKind.MAPPED))
    elif mapped_endpoint(own_nat) is not None:
        return tuple(out)
    peer_class = classify(peer_nat)
    if peer_class is not MappingClass.SEQUENTIAL:
        _add_observed(out, peer_observed)
        return tuple(out)
    assert peer_nat is not None and peer_nat.tcp.port_delta is not None
    own_dependent = classify(own_nat) in (MappingClass.SEQUENTIAL, MappingClass.RANDOM)
    if _filtering(peer_nat) is FilteringBehaviour.ENDPOINT_INDEPENDENT and not own_dependent:
        _add_observed(out, peer_observed)
    taken = {c.endpoint for c in out}
    for i, port in enumerate(predicted_ports(peer_observed.port, peer_nat.tcp.port_delta, window), start=1):
        if Endpoint(peer_observed.ip, port) not in taken:
            out.append(Candidate(Endpoint(peer_observed.ip, port), CandidateKind.PREDICTED, i))
    return tuple(out)


def ipv6_candidates(peer_ipv6: Sequence[Endpoint]) -> tuple[Candidate, ...]:
    """The peer's IPv6 endpoints as candidates (distinct, IPv6 only), raced before everything else."""
    return tuple(c for c in (Candidate(e, CandidateKind.IPV6) for e in dict.fromkeys(peer_ipv6)) if c.is_ipv6)


def _add_observed(out: list[Candidate], observed: Endpoint) -> None:
    """The observed endpoint, unless a candidate already names it (a control connection over IPv6, or a
    mapping that is the peer's observed endpoint too)."""
    if all(c.endpoint != observed for c in out):
        out.append(Candidate(observed, CandidateKind.OBSERVED))


def retry_policy_for(own_nat: NatReport | None) -> RetryPolicy:
    """Retry fast when our mapping survives a retry; slowly when each retry costs a new public port."""
    if classify(own_nat) in (MappingClass.SEQUENTIAL, MappingClass.RANDOM):
        return SLOW_RETRY
    return RetryPolicy()
