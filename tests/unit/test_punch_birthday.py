"""Birthday punching's pure parts: the odds, which side does what, the candidates, the SYN pacer."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcppunch.punch.birthday import (
    DEFAULT_LIMITS,
    HARD_ROUNDS,
    MAX_SYNS,
    RANDOM_PORT_HIGH,
    RANDOM_PORT_LOW,
    RANDOM_PORT_SPACE,
    BirthdayLimits,
    BirthdayPlan,
    BirthdaySide,
    BirthdayStats,
    SynPacer,
    birthday_candidates,
    birthday_side,
    fresh_tickets,
    guess_ports,
    success_probability,
)
from tcppunch.punch.plan import Candidate, CandidateKind, PunchPlan, Role, explain_failure
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import FilteringBehaviour, MappingBehaviour, NatReport, TcpBehaviour

EIM = MappingBehaviour.ENDPOINT_INDEPENDENT
APDM = MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT


def nat(mapping: MappingBehaviour, filtering: FilteringBehaviour, delta: int | None) -> NatReport:
    return NatReport(tcp=TcpBehaviour(mapping=mapping, filtering=filtering, port_delta=delta), behind_nat=True)


RANDOM = nat(APDM, FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT, None)
PORT_RESTRICTED = nat(EIM, FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT, 0)
FULL_CONE = nat(EIM, FilteringBehaviour.ENDPOINT_INDEPENDENT, 0)
SEQ = nat(APDM, FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT, 1)
PEER = Endpoint("203.0.113.7", 40000)


def test_tailscales_numbers() -> None:
    assert RANDOM_PORT_SPACE == 64_512
    assert success_probability(256, 256) == pytest.approx(0.64, abs=0.005)
    assert success_probability(256, 1024) == pytest.approx(0.98, abs=0.005)
    assert success_probability(256, 2048) == pytest.approx(0.9997, abs=0.0001)
    assert success_probability(0, 1024) == 0.0
    with pytest.raises(ValueError):
        success_probability(-1, 5)


@pytest.mark.parametrize(
    "kwargs",
    [{"sockets": 0}, {"sockets": 1025}, {"probes": 0}, {"probes": 4097}, {"max_syns": 0},
     {"max_syns": MAX_SYNS + 1}, {"rate": 0}, {"rate": 50_001}, {"burst": 0}],
)
def test_limits_refuse_what_is_out_of_bounds(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BirthdayLimits(**kwargs)  # type: ignore[arg-type]


def test_first_round_never_exceeds_the_budget() -> None:
    limits = BirthdayLimits(sockets=300, probes=1000, max_syns=500)
    assert limits.first_syns(BirthdaySide.HARD) == 300
    assert limits.first_syns(BirthdaySide.EASY) == 500


def test_sides() -> None:
    assert birthday_side(RANDOM, PORT_RESTRICTED) is BirthdaySide.HARD
    assert birthday_side(PORT_RESTRICTED, RANDOM) is BirthdaySide.EASY
    assert birthday_side(RANDOM, FULL_CONE) is None  # the random side's SYN gets in anyway
    assert birthday_side(RANDOM, SEQ) is None  # the other side's mapping is new per destination too
    assert birthday_side(RANDOM, RANDOM) is None
    assert birthday_side(PORT_RESTRICTED, PORT_RESTRICTED) is None
    assert birthday_side(None, RANDOM) is None  # unknown: an ordinary punch is tried


@given(st.integers(0, 5000), st.integers(0, 2**32))
def test_guesses_are_distinct_ports_in_the_random_range(count: int, seed: int) -> None:
    ports = guess_ports(count, random.Random(seed))
    assert len(ports) == len(set(ports)) == count
    assert all(RANDOM_PORT_LOW <= p <= RANDOM_PORT_HIGH for p in ports)


def test_guess_count_is_bounded() -> None:
    with pytest.raises(ValueError):
        guess_ports(RANDOM_PORT_SPACE + 1, random.Random(1))


def test_hard_side_candidates_are_m_tickets_to_the_peers_fixed_endpoint() -> None:
    plan = BirthdayPlan(BirthdaySide.HARD, BirthdayLimits(sockets=50))
    cands = birthday_candidates(plan, peer_observed=PEER, rng=random.Random(1))
    assert [c.index for c in cands] == list(range(1, 51))
    assert {c.endpoint for c in cands} == {PEER}
    assert {c.kind for c in cands} == {CandidateKind.BIRTHDAY}


def test_easy_side_candidates_are_n_guesses_on_the_peers_address() -> None:
    plan = BirthdayPlan(BirthdaySide.EASY, BirthdayLimits(probes=700))
    cands = birthday_candidates(plan, peer_observed=PEER, rng=random.Random(2))
    assert len(cands) == len({c.endpoint for c in cands}) == 700
    assert {c.endpoint.ip for c in cands} == {PEER.ip}
    assert str(cands[0]).endswith(" (birthday #1)")


def test_fresh_tickets_continue_the_indices_towards_the_same_endpoint() -> None:
    plan = BirthdayPlan(BirthdaySide.HARD, BirthdayLimits(sockets=50))
    private = Candidate(Endpoint("10.0.0.9", 4000), CandidateKind.PRIVATE)
    first = (private, *birthday_candidates(plan, peer_observed=PEER, rng=random.Random(1)))
    assert fresh_tickets(first, 1) == first[1:]
    second, third = fresh_tickets(first, 2), fresh_tickets(first, 3)
    assert [c.index for c in second] == list(range(51, 101)) and [c.index for c in third] == list(range(101, 151))
    assert {c.endpoint for c in second + third} == {PEER} and {c.kind for c in second} == {CandidateKind.BIRTHDAY}
    with pytest.raises(ValueError):
        fresh_tickets(first, 0)
    with pytest.raises(ValueError):
        fresh_tickets((private,), 2)


def test_two_hard_rounds_fit_the_default_budget_and_miss_with_0_03_percent() -> None:
    # M·HARD_ROUNDS tickets from a budget of 2,048, and the miss rate the docs and the matrix test rely on
    assert DEFAULT_LIMITS.sockets * HARD_ROUNDS <= DEFAULT_LIMITS.max_syns
    miss = 1 - success_probability(DEFAULT_LIMITS.sockets * HARD_ROUNDS, DEFAULT_LIMITS.probes)
    assert miss == pytest.approx(0.0003, abs=0.0001)


def test_private_candidates_first_behind_the_same_nat_only() -> None:
    plan = BirthdayPlan(BirthdaySide.EASY, BirthdayLimits(probes=3))
    private = (Endpoint("10.0.0.5", 4000),)
    same = birthday_candidates(plan, peer_observed=PEER, rng=random.Random(3), peer_private=private,
                               own_public_ip=PEER.ip)
    assert same[0] == Candidate(private[0], CandidateKind.PRIVATE) and len(same) == 4
    other = birthday_candidates(plan, peer_observed=PEER, rng=random.Random(3), peer_private=private,
                                own_public_ip="198.51.100.1")
    assert all(c.kind is CandidateKind.BIRTHDAY for c in other) and len(other) == 3


def test_pacer_grants_a_burst_then_the_rate_then_stops_at_the_budget() -> None:
    pacer = SynPacer(BirthdayLimits(rate=1000, burst=10, max_syns=25), now=0.0)
    assert pacer.grant(100, 0.0) == 10
    assert pacer.grant(100, 0.0) == 0
    assert pacer.wait(0.0) == pytest.approx(0.001)
    assert pacer.grant(100, 0.005) == 5  # 5 ms at 1000/s
    assert pacer.grant(100, 1.0) == 10  # never more than the burst at once
    assert pacer.remaining == 0
    assert pacer.grant(1, 2.0) == 0
    assert pacer.wait(2.0) is None


@given(st.lists(st.tuples(st.floats(0, 0.01), st.integers(0, 300)), max_size=60))
def test_pacer_never_exceeds_rate_burst_or_budget(steps: list[tuple[float, int]]) -> None:
    limits = BirthdayLimits(rate=2000, burst=50, max_syns=400)
    pacer, now, granted = SynPacer(limits, 0.0), 0.0, 0
    for dt, wanted in steps:
        now += dt
        got = pacer.grant(wanted, now)
        assert 0 <= got <= wanted
        granted += got
        assert granted <= limits.burst + limits.rate * now + 1e-6
    assert granted <= limits.max_syns


def test_birthday_candidates_need_a_birthday_plan() -> None:
    cand = Candidate(PEER, CandidateKind.BIRTHDAY, 1)
    common = {"local": Endpoint("10.0.0.2", 0), "role": Role.INITIATOR, "session_id": "s", "key": b"k" * 32,
              "candidates": (cand,), "fire_at": 1.0, "deadline": 2.0}
    with pytest.raises(ValueError, match="birthday"):
        PunchPlan(**common)  # type: ignore[arg-type]
    plan = PunchPlan(**common, birthday=BirthdayPlan(BirthdaySide.HARD))  # type: ignore[arg-type]
    stats = BirthdayStats(BirthdaySide.HARD, syns=256, refused=250, unanswered=6)
    text = explain_failure(plan, (), "no verified connection", stats)
    assert "birthday (hard side): 256 SYNs, 0 connected, 250 refused, 6 unanswered" in text
    assert "#1" not in text  # the spray is one line, not one per ticket
