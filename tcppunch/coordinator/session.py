"""Punch sessions: the pure decisions (when each peer fires, whether to punch at all) and their records.

Sans-I/O and clock-free: times are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tcppunch.punch.prediction import direct_possible
from tcppunch.wire.coord import RelayAdvice, Role
from tcppunch.wire.natreport import NatReport

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


def relay_advice(nat_a: NatReport | None, nat_b: NatReport | None, *, ipv6: bool = False, birthday: bool = True
                 ) -> tuple[RelayAdvice, str]:
    """``relay-now`` only when the two reports together rule a direct connection out, ``birthday`` when
    only a birthday punch can make one, and why (``ipv6``: both peers have IPv6 endpoints, which no NAT
    stands in front of).

    The rule is the punch engine's own (:func:`tcppunch.punch.prediction.direct_possible`), so the
    coordinator never advises against a punch the engine would attempt: direct fails when both NATs map
    randomly, or one does and the other filters by address and port and maps unpredictably too; one
    random and one endpoint-independent port-filtering NAT need a birthday punch (unless a peer opted out:
    ``birthday=False``). Unknown properties count as "try".
    """
    verdict = direct_possible(nat_a, nat_b, ipv6=ipv6, birthday=birthday)
    if not verdict.possible:
        return RelayAdvice.RELAY_NOW, verdict.reason
    return (RelayAdvice.BIRTHDAY if verdict.birthday else RelayAdvice.PUNCH), verdict.reason


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
    # Relay budget accounts of the two peers' secrets ("token:..."), charged if the session is relayed.
    accounts: tuple[str, ...] = ()
    # Where the CONNECT came from (source_key), for the per-source session limit.
    initiator_source: str = ""
    # The key each role must join the relay with (its control connection's key), and the roles that
    # joined already: a join is single-use, so a replayed or second join is refused.
    keys: dict[Role, str | None] = field(default_factory=dict)
    relay_joined: set[Role] = field(default_factory=set)
    results: dict[str, str] = field(default_factory=dict)
    # The two NAT types (for the outcome counters) and whether the outcome was counted already.
    nat_pair: str = "unknown/unknown"
    counted: bool = False

    def peer_ids(self) -> tuple[str, str]:
        return self.initiator, self.responder

    def other(self, peer_id: str) -> str:
        return self.responder if peer_id == self.initiator else self.initiator
