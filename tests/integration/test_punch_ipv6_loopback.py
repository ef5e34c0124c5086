"""Happy Eyeballs in the punch engine, on loopback: IPv6 candidates (::1) race first, IPv4 ones
(127.0.0.1/127.0.0.2) follow one attempt delay later only if IPv6 has not connected by then."""

from __future__ import annotations

import asyncio
import socket

from tcppunch.punch.engine import punch
from tcppunch.punch.plan import Candidate, CandidateKind, PunchPlan, PunchResult, Role
from tcppunch.wire.endpoint import Endpoint
from tests.integration.test_punch_loopback import KEY, exchange, listener, port_of, run


def _plan(role: Role, local: Endpoint, local6: Endpoint, peer4: Endpoint, peer6: Endpoint, fire: float,
          delay: float) -> PunchPlan:
    return PunchPlan(local=local, role=role, session_id="v6", key=KEY, fire_at=fire, deadline=fire + 5.0,
                     candidates=(Candidate(peer6, CandidateKind.IPV6), Candidate(peer4, CandidateKind.OBSERVED)),
                     local6=local6, attempt_delay=delay)


async def _pair(dead_v6: bool, delay: float) -> tuple[PunchResult, PunchResult]:
    la, lb = listener("127.0.0.1"), listener("127.0.0.2")
    # a bound, never listening socket: its port answers every SYN with a RST (a broken IPv6 path)
    hole = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    hole.bind(("::1", 0))
    try:
        a4, b4 = Endpoint("127.0.0.1", port_of(la)), Endpoint("127.0.0.2", port_of(lb))
        a6, b6 = Endpoint("::1", a4.port), Endpoint("::1", b4.port)
        dead = Endpoint("::1", port_of(hole))
        fire = asyncio.get_running_loop().time() + 0.05
        return await asyncio.gather(
            punch(_plan(Role.INITIATOR, a4, a6, b4, dead if dead_v6 else b6, fire, delay), listener=la),
            punch(_plan(Role.RESPONDER, b4, b6, a4, dead if dead_v6 else a6, fire, delay), listener=lb),
        )
    finally:
        la.close()
        lb.close()
        hole.close()


def test_ipv6_wins_and_ipv4_never_fires() -> None:
    async def go() -> None:
        ra, rb = await _pair(dead_v6=False, delay=1.0)
        for r in (ra, rb):
            assert r.candidate is not None and r.candidate.kind is CandidateKind.IPV6
            assert r.remote.ip == "::1"
        # the initiator selected over IPv6 well inside the attempt delay: no IPv4 SYN left
        assert all(a.candidate is None or a.candidate.kind is CandidateKind.IPV6 for a in ra.attempts)
        sent_a, got_b, sent_b, got_a = await exchange(ra, rb, 1_000_000)
        assert (sent_a, sent_b) == (got_b, got_a)

    run(go())


def test_ipv4_follows_after_the_attempt_delay_when_ipv6_fails() -> None:
    async def go() -> None:
        delay = 0.2
        ra, rb = await _pair(dead_v6=True, delay=delay)
        for r in (ra, rb):
            assert r.candidate is not None and r.candidate.kind is CandidateKind.OBSERVED
            v4_tries = [a.t for a in r.attempts if a.candidate is not None and not a.candidate.is_ipv6]
            assert v4_tries and min(v4_tries) >= delay  # the IPv4 wave left one attempt delay after fire
            assert any(a.candidate is not None and a.candidate.is_ipv6 for a in r.attempts)  # IPv6 went first
        sent_a, got_b, sent_b, got_a = await exchange(ra, rb, 100_000)
        assert (sent_a, sent_b) == (got_b, got_a)

    run(go())
