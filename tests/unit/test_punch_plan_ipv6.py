"""punch_plan with IPv6 candidates: raced first, the birthday spray (the IPv4 path) in the second wave;
and its SYN re-send delay from our round trip to the coordinator."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from tcppunch.coordinator.control import PunchOrder, punch_plan
from tcppunch.punch.plan import RESYN_FLOOR, CandidateKind, waves
from tcppunch.wire.coord import RelayAdvice, Role
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import FilteringBehaviour, MappingBehaviour, NatReport, TcpBehaviour

RANDOM = NatReport(tcp=TcpBehaviour(MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT,
                                    FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT, False, None), behind_nat=True)
PORT_RESTRICTED = NatReport(tcp=TcpBehaviour(MappingBehaviour.ENDPOINT_INDEPENDENT,
                                             FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT, True, 0), behind_nat=True)
PEER6 = Endpoint("2001:db8:2::2", 4000)


def _order(advice: RelayAdvice) -> PunchOrder:
    return PunchOrder(session_id="s", key=b"k" * 32, role=Role.INITIATOR, peer_id="p",
                      peer_observed=Endpoint("198.51.100.102", 4000), peer_private=(), peer_nat=RANDOM,
                      fire_at=10.0, deadline=16.0, relay=Endpoint("198.51.100.10", 3478), relay_advice=advice,
                      received_at=9.0, peer_ipv6=(PEER6,), cancelled=asyncio.Event())


def test_ipv6_goes_first_and_the_birthday_spray_is_the_second_wave() -> None:
    plan = punch_plan(_order(RelayAdvice.BIRTHDAY), local=Endpoint("10.0.1.2", 4000), own_nat=PORT_RESTRICTED,
                      own_public_ip="198.51.100.101", local6=Endpoint("2001:db8:1::2", 4000))
    first, second = waves(plan)
    assert [c.endpoint for c in first.candidates] == [PEER6] and first.offset == 0.0
    assert second.offset == plan.attempt_delay and second.candidates
    assert {c.kind for c in second.candidates} == {CandidateKind.BIRTHDAY}


def test_without_an_own_ipv6_endpoint_the_peer_ipv6_is_not_raced() -> None:
    plan = punch_plan(_order(RelayAdvice.PUNCH), local=Endpoint("10.0.1.2", 4000), own_nat=PORT_RESTRICTED,
                      own_public_ip="198.51.100.101")
    assert all(not c.is_ipv6 for c in plan.candidates) and len(waves(plan)) == 1


def test_the_resend_delay_follows_the_round_trip_to_the_coordinator() -> None:
    def resyn(rtt: float | None, fire_in: float = 0.0) -> float | None:
        order = dataclasses.replace(_order(RelayAdvice.PUNCH), received_at=10.0 - fire_in)
        return punch_plan(order, local=Endpoint("10.0.1.2", 4000), own_nat=PORT_RESTRICTED,
                          own_public_ip="198.51.100.101", coordinator_rtt=rtt).resyn_after

    assert resyn(None) == resyn(0.002) == RESYN_FLOOR
    assert resyn(0.07) == pytest.approx(2 * 2 * (0.035 + 0.035))  # two bounds of the peer round trip
    # told to wait 50 ms for a farther peer: too far for a re-send (the kernel retransmits at 1 s)
    assert resyn(0.07, fire_in=0.05) is None
    assert resyn(0.12) is None  # 30 ms per WAN link in the loss lab
