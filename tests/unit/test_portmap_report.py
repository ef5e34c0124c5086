"""A NAT report carries port mapping (protocols answered, mapping held) through the coordinator
protocol unchanged, and a malformed port_mapping part is refused like any other bad field."""

from __future__ import annotations

from typing import Any

import pytest

from tcppunch.punch.plan import Candidate, CandidateKind
from tcppunch.punch.prediction import build_candidates, direct_possible
from tcppunch.wire.coord import ProtocolError, Register
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import (
    FilteringBehaviour,
    MappingBehaviour,
    NatReport,
    PortMapping,
    PortMappingProtocol,
    PortMappingSupport,
    TcpBehaviour,
)

SUPPORT = PortMappingSupport(
    (PortMappingProtocol.NAT_PMP, PortMappingProtocol.PCP),
    PortMapping(PortMappingProtocol.PCP, Endpoint("198.51.100.101", 40123), 40000, 7200),
)


def test_report_with_port_mapping_survives_register() -> None:
    report = NatReport(verdict="x", port_mapping=SUPPORT)
    decoded = Register.from_json(Register("bob", "tok", nat=report).to_json())
    assert decoded.nat == report
    assert report.to_json()["port_mapping"]["mapping"]["external"] == {"ip": "198.51.100.101", "port": 40123}
    assert NatReport.from_json(NatReport().to_json()).port_mapping is None


@pytest.mark.parametrize("bad", [
    {"protocols": "pcp"},
    {"protocols": ["telnet"]},
    {"protocols": [], "mapping": {"protocol": "pcp", "external": {"ip": "example.org", "port": 1},
                                  "internal_port": 1, "lifetime": 1}},
    {"protocols": [], "mapping": {"protocol": "pcp", "external": {"ip": "198.51.100.1", "port": 1},
                                  "internal_port": 0, "lifetime": 1}},
    {"protocols": [], "error": ["x"]},
])
def test_malformed_port_mapping_is_refused(bad: dict[str, Any]) -> None:
    nat = {**NatReport().to_json(), "port_mapping": bad}
    with pytest.raises(ProtocolError):
        Register.from_json({"id": "bob", "token": "tok", "nat": nat})


# ------------------------------------------------------------------ candidates from a port mapping
RANDOM = NatReport(tcp=TcpBehaviour(MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT,
                                    FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT, False, None), behind_nat=True)
PORT_RESTRICTED = NatReport(tcp=TcpBehaviour(MappingBehaviour.ENDPOINT_INDEPENDENT,
                                             FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT, True, 0), behind_nat=True)
MAPPED_RANDOM = RANDOM.replace(port_mapping=SUPPORT)
OBSERVED = Endpoint("198.51.100.101", 50000)


def test_mapping_makes_random_pairs_direct_without_birthday_spray() -> None:
    assert not direct_possible(RANDOM, RANDOM)
    assert direct_possible(MAPPED_RANDOM, RANDOM) and direct_possible(RANDOM, MAPPED_RANDOM)
    verdict = direct_possible(MAPPED_RANDOM, PORT_RESTRICTED)
    assert verdict and not verdict.birthday and "port mapping" in verdict.reason


def test_the_peer_targets_the_mapping_first() -> None:
    cands = build_candidates(peer_observed=OBSERVED, peer_nat=MAPPED_RANDOM, own_nat=PORT_RESTRICTED)
    assert cands[0] == Candidate(Endpoint("198.51.100.101", 40123), CandidateKind.MAPPED)
    assert [c.kind for c in cands] == [CandidateKind.MAPPED, CandidateKind.OBSERVED]


def test_the_mapped_side_only_listens() -> None:
    assert build_candidates(peer_observed=Endpoint("198.51.100.102", 4000), peer_nat=PORT_RESTRICTED,
                            own_nat=MAPPED_RANDOM) == ()


def test_both_mapped_target_each_other() -> None:
    cands = build_candidates(peer_observed=OBSERVED, peer_nat=MAPPED_RANDOM, own_nat=MAPPED_RANDOM)
    assert cands[0].kind is CandidateKind.MAPPED


def test_detect_table_says_what_the_router_does() -> None:
    from tcppunch.cli.detect_cmd import render_table

    server = Endpoint("198.51.100.10", 3478)
    assert "not measured (--port-mapping)" in render_table(NatReport(), server)
    assert "pcp mapped 198.51.100.101:40123 -> port 40000" in render_table(NatReport(port_mapping=SUPPORT), server)
    refused = PortMappingSupport((PortMappingProtocol.PCP,), None, "refused: PCP: NO_RESOURCES")
    assert "pcp answered; no mapping: refused: PCP: NO_RESOURCES" in render_table(
        NatReport(port_mapping=refused), server)
