"""Punch sessions: the pure decisions (when each peer fires, whether to punch at all) and their records.

Sans-I/O and clock-free: times are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tcppunch.nat.report import FilteringBehaviour, MappingBehaviour, NatReport
from tcppunch.wire.coord import RelayAdvice, Role

from .registry import ConnId


def schedule_fire(owd_a: float | None, owd_b: float | None, *, margin: float = 0.0) -> tuple[float, float]:
    """Delays (seconds after each peer receives its PUNCH) that make both peers fire at the same moment.

    Both PUNCH frames leave the server at the same instant t0; peer X receives its copy at t0 + owd_X and
    waits ``max(owd_a, owd_b) - owd_X`` (+ ``margin``), so both fire at t0 + max(owd) + margin. An unknown
    one-way delay (no keepalive answered yet) is taken to be the other peer's, or 0 if both are unknown.
    """
    if owd_a is None and owd_b is None:
        owd_a = owd_b = 0.0
    elif owd_a is None:
        owd_a = owd_b
    elif owd_b is None:
        owd_b = owd_a
    assert owd_a is not None and owd_b is not None
    owd_a, owd_b = max(owd_a, 0.0), max(owd_b, 0.0)
    latest = max(owd_a, owd_b)
    margin = max(margin, 0.0)
    return latest - owd_a + margin, latest - owd_b + margin


def _predictable(nat: NatReport) -> bool:
    """Can the other side know which public port this host's SYN towards it will come from?"""
    tcp = nat.tcp
    if nat.behind_nat is False or tcp.mapping is None:
        return True  # no NAT, or not measured: do not give up on it
    if tcp.mapping is MappingBehaviour.ENDPOINT_INDEPENDENT:
        return True
    return tcp.port_delta is not None or tcp.port_preservation is True


def _admits_unknown_port(nat: NatReport) -> bool:
    """Does this host's NAT let in a SYN from the peer's address whatever its source port?"""
    if nat.behind_nat is False or nat.tcp.filtering is None:
        return True
    return nat.tcp.filtering in (FilteringBehaviour.ENDPOINT_INDEPENDENT, FilteringBehaviour.ADDRESS_DEPENDENT)


def relay_advice(nat_a: NatReport | None, nat_b: NatReport | None) -> RelayAdvice:
    """``relay-now`` only when the two reports together rule a direct connection out.

    Nobody can aim a SYN at a host whose public port towards a new destination cannot be predicted
    (endpoint-dependent mapping with random ports), but that host can still reach a peer whose NAT admits
    a SYN from its address on any port (endpoint-independent or address-dependent filtering, or no NAT).
    So direct fails when both are unpredictable, or one is and the other's NAT filters by address and port.
    Unknown (unmeasured) properties count as favourable: advice never blocks a punch that might work.
    """
    if nat_a is None or nat_b is None:
        return RelayAdvice.PUNCH
    pred_a, pred_b = _predictable(nat_a), _predictable(nat_b)
    if not pred_a and not pred_b:
        return RelayAdvice.RELAY_NOW
    if not pred_a and not _admits_unknown_port(nat_b):
        return RelayAdvice.RELAY_NOW
    if not pred_b and not _admits_unknown_port(nat_a):
        return RelayAdvice.RELAY_NOW
    return RelayAdvice.PUNCH


@dataclass
class Session:
    """One punch session between an initiator and a responder, and its relay rendezvous."""

    id: str
    key: bytes
    initiator: str
    responder: str
    created_at: float
    # After ``expires_at`` the session is forgotten: no more relay joins.
    expires_at: float
    # Relay connections that proved the key and wait for their partner, by role.
    relay_waiting: dict[Role, ConnId] = field(default_factory=dict)
    relay_started: bool = False
    results: dict[str, str] = field(default_factory=dict)

    def peer_ids(self) -> tuple[str, str]:
        return self.initiator, self.responder

    def other(self, peer_id: str) -> str:
        return self.responder if peer_id == self.initiator else self.initiator
