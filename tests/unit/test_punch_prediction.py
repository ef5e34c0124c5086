"""Candidate building, port prediction and the pair table (which NAT pairs can go direct)."""

from __future__ import annotations

import pytest

from tcppunch.punch.plan import SLOW_RETRY, CandidateKind, RetryPolicy
from tcppunch.punch.prediction import (
    MappingClass,
    build_candidates,
    classify,
    direct_possible,
    predicted_ports,
    retry_policy_for,
)
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import FilteringBehaviour, MappingBehaviour, NatReport, TcpBehaviour

EIM = MappingBehaviour.ENDPOINT_INDEPENDENT
APDM = MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT
EIF = FilteringBehaviour.ENDPOINT_INDEPENDENT
ADF = FilteringBehaviour.ADDRESS_DEPENDENT
APDF = FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT


def nat(mapping: MappingBehaviour | None, filtering: FilteringBehaviour | None, delta: int | None) -> NatReport:
    return NatReport(tcp=TcpBehaviour(mapping=mapping, filtering=filtering, port_delta=delta), behind_nat=True)


PUBLIC = NatReport(behind_nat=False)
FULL_CONE = nat(EIM, EIF, 0)
RESTRICTED = nat(EIM, ADF, 0)
PORT_RESTRICTED = nat(EIM, APDF, 0)
CGNAT = nat(EIM, APDF, 0)
SEQ = nat(APDM, APDF, 1)
RANDOM = nat(APDM, APDF, None)
UNKNOWN = NatReport()

TYPES = {
    "none": PUBLIC,
    "full-cone": FULL_CONE,
    "restricted": RESTRICTED,
    "port-restricted": PORT_RESTRICTED,
    "symmetric-seq": SEQ,
    "symmetric-random": RANDOM,
    "cgnat": CGNAT,
}
# The pair table of docs/punching.md: the pairs that can NOT go direct, and those only a birthday punch
# connects (impossible when a peer opts out of it).
BIRTHDAY = {
    frozenset({"symmetric-random", "port-restricted"}),
    frozenset({"symmetric-random", "cgnat"}),
}
IMPOSSIBLE = {
    frozenset({"symmetric-random"}),
    frozenset({"symmetric-random", "symmetric-seq"}),
}


def test_classify() -> None:
    assert classify(None) is MappingClass.UNKNOWN
    assert classify(UNKNOWN) is MappingClass.UNKNOWN
    assert classify(PUBLIC) is MappingClass.PUBLIC
    assert classify(PORT_RESTRICTED) is MappingClass.INDEPENDENT
    assert classify(SEQ) is MappingClass.SEQUENTIAL
    assert classify(RANDOM) is MappingClass.RANDOM
    assert classify(nat(APDM, APDF, 0)) is MappingClass.INDEPENDENT


@pytest.mark.parametrize("a", sorted(TYPES))
@pytest.mark.parametrize("b", sorted(TYPES))
def test_pair_table(a: str, b: str) -> None:
    verdict = direct_possible(TYPES[a], TYPES[b])
    assert bool(verdict) is (frozenset({a, b}) not in IMPOSSIBLE), verdict.reason
    assert verdict.birthday is (frozenset({a, b}) in BIRTHDAY)
    assert verdict.reason
    assert direct_possible(TYPES[b], TYPES[a]) == verdict  # symmetric
    opted_out = direct_possible(TYPES[a], TYPES[b], birthday=False)
    assert bool(opted_out) is (frozenset({a, b}) not in IMPOSSIBLE | BIRTHDAY)
    assert not opted_out.birthday


def test_random_needs_a_permissive_filter() -> None:
    assert direct_possible(RANDOM, FULL_CONE)
    assert direct_possible(RANDOM, RESTRICTED)
    assert "address and port" in direct_possible(RANDOM, PORT_RESTRICTED, birthday=False).reason
    assert "birthday" in direct_possible(RANDOM, PORT_RESTRICTED).reason
    assert direct_possible(RANDOM, nat(EIM, None, 0)).possible  # unknown filtering: try
    assert direct_possible(RANDOM, None).possible
    assert not direct_possible(RANDOM, RANDOM)


def test_predicted_ports() -> None:
    assert predicted_ports(20000, 1, 4) == [20001, 20002, 20003, 20004]
    assert predicted_ports(1000, -2, 3) == [998, 996, 994]
    assert predicted_ports(65534, 1, 3) == [65535]


PEER = Endpoint("198.51.100.102", 20005)


def test_candidates_eim_peer_is_its_observed_endpoint() -> None:
    cands = build_candidates(peer_observed=PEER, peer_nat=PORT_RESTRICTED, own_nat=PORT_RESTRICTED)
    assert [(c.endpoint, c.kind) for c in cands] == [(PEER, CandidateKind.OBSERVED)]


def test_candidates_sequential_peer_are_the_window_in_index_order() -> None:
    cands = build_candidates(peer_observed=PEER, peer_nat=SEQ, own_nat=PORT_RESTRICTED, window=8)
    assert [c.kind for c in cands] == [CandidateKind.PREDICTED] * 8
    assert [c.index for c in cands] == list(range(1, 9))
    assert [c.endpoint.port for c in cands] == list(range(20006, 20014))
    assert all(c.endpoint.ip == PEER.ip for c in cands)


def test_candidates_sequential_both_sides_lockstep_has_nothing_else() -> None:
    # our i-th SYN must make our i-th new mapping: nothing may cross our NAT before or between them
    fc_seq = nat(APDM, EIF, 1)  # even if the peer's filtering would also let the observed port in
    cands = build_candidates(peer_observed=PEER, peer_nat=fc_seq, own_nat=SEQ, window=5)
    assert [c.kind for c in cands] == [CandidateKind.PREDICTED] * 5
    cands2 = build_candidates(peer_observed=PEER, peer_nat=fc_seq, own_nat=PORT_RESTRICTED, window=2)
    assert [c.kind for c in cands2] == [CandidateKind.OBSERVED, CandidateKind.PREDICTED, CandidateKind.PREDICTED]


def test_candidates_random_peer_observed_opens_address_filter() -> None:
    cands = build_candidates(peer_observed=PEER, peer_nat=RANDOM, own_nat=RESTRICTED)
    assert [c.kind for c in cands] == [CandidateKind.OBSERVED]


def test_private_candidates_only_behind_the_same_nat() -> None:
    private = [Endpoint("10.0.1.3", 4000)]
    same = build_candidates(
        peer_observed=PEER, peer_nat=PORT_RESTRICTED, peer_private=private, own_public_ip=PEER.ip
    )
    assert [c.kind for c in same] == [CandidateKind.PRIVATE, CandidateKind.OBSERVED]
    other = build_candidates(
        peer_observed=PEER, peer_nat=PORT_RESTRICTED, peer_private=private, own_public_ip="198.51.100.101"
    )
    assert [c.kind for c in other] == [CandidateKind.OBSERVED]


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        build_candidates(peer_observed=PEER, peer_nat=SEQ, window=0)


def test_retry_policy_for() -> None:
    assert retry_policy_for(SEQ) == SLOW_RETRY
    assert retry_policy_for(RANDOM) == SLOW_RETRY
    assert retry_policy_for(PORT_RESTRICTED) == RetryPolicy()
    assert retry_policy_for(None) == RetryPolicy()


V6 = Endpoint("2001:db8:2::2", 4000)


def test_ipv6_candidates_come_first_and_random_pairs_become_possible() -> None:
    cands = build_candidates(peer_observed=PEER, peer_nat=RANDOM, own_nat=RANDOM, peer_ipv6=[V6, V6, PEER])
    assert [(c.endpoint, c.kind) for c in cands] == [(V6, CandidateKind.IPV6), (PEER, CandidateKind.OBSERVED)]
    assert not direct_possible(RANDOM, RANDOM)
    assert direct_possible(RANDOM, RANDOM, ipv6=True)


def test_an_observed_ipv6_endpoint_is_raced_once_as_ipv6() -> None:
    cands = build_candidates(peer_observed=V6, peer_nat=None, peer_ipv6=[V6])
    assert [(c.endpoint, c.kind) for c in cands] == [(V6, CandidateKind.IPV6)]
