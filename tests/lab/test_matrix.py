"""The connectivity matrix: every ordered pair of lab NAT types, both SYN policies, 10 MB each way.

Direct wherever the NAT types allow it (tcppunch.lab.matrix.direct_expected), relayed elsewhere, and the
bytes always arrive intact. Runs the public Peer API on lab hosts against a coordinator on the lab server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tcppunch.lab import Lab, NatType, SynPolicy
from tcppunch.lab.matrix import MappingSides, direct_expected, host_names, mapping_wins, matrix_spec
from tcppunch.labrun import LabRunner
from tcppunch.peer import Method
from tcppunch.punch.plan import CandidateKind

SIZE = 10_000_000
PAIRS = [(a, b) for a in NatType for b in NatType]


def _runner(policy: SynPolicy) -> Iterator[tuple[Lab, LabRunner]]:
    with Lab(matrix_spec(policy)) as lab, LabRunner(lab) as runner:
        yield lab, runner


@pytest.fixture(scope="module")
def drop_lab() -> Iterator[tuple[Lab, LabRunner]]:
    yield from _runner(SynPolicy.DROP)


@pytest.fixture(scope="module")
def rst_lab() -> Iterator[tuple[Lab, LabRunner]]:
    yield from _runner(SynPolicy.RST)


def _birthday_pair(a: NatType, b: NatType) -> bool:
    return NatType.SYMMETRIC_RANDOM in (a, b) and ({a, b} & {NatType.PORT_RESTRICTED, NatType.CGNAT}) != set()


def _check(lab: Lab, runner: LabRunner, a: NatType, b: NatType, policy: SynPolicy) -> None:
    ra, rb = host_names(a, b)
    result = runner.pair(lab.host(ra), lab.host(rb), size=SIZE)
    assert result.error is None, result.error
    assert result.ok, "SHA-256 mismatch"
    if policy is SynPolicy.RST and _birthday_pair(a, b) and result.method is Method.RELAY:
        # With rst and the rst matrix's 5 ms per link a birthday ticket and a guess must cross within
        # 10 ms: measured 70-100 % with the CPU load (scripts/bench_birthday.py --policy rst --delay-ms 5;
        # 100 % at 20 ms).
        # A miss must still be a birthday punch that was tried, then the relay.
        assert result.relay_reason is not None and result.relay_reason.startswith("punching failed")
        assert "birthday (" in result.relay_reason
        return
    # A birthday cell under drop is direct or fails, without a retry: one round of 256 tickets against
    # 1,024 guesses misses with e^(-256*1024/64512) = 1.7 % (CI hit it, twice in one run), but a hard side
    # that saw no connection opens a second round (tcppunch.punch.birthday.HARD_ROUNDS), so a cell misses
    # with e^(-2*256*1024/64512) = 0.03 %, the four of a run with 0.12 %.
    expected = Method.DIRECT if direct_expected(a, b) else Method.RELAY
    assert result.method is expected, (result.relay_reason, result.attempts[-5:])


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
def test_drop_policy(drop_lab: tuple[Lab, LabRunner], a: NatType, b: NatType) -> None:
    _check(*drop_lab, a, b, SynPolicy.DROP)


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
def test_rst_policy(rst_lab: tuple[Lab, LabRunner], a: NatType, b: NatType) -> None:
    _check(*rst_lab, a, b, SynPolicy.RST)


def test_expected_relay_pairs_are_exactly_random_facing_a_changing_port_filtering_mapping() -> None:
    relayed = {(a, b) for a, b in PAIRS if not direct_expected(a, b)}
    rnd = NatType.SYMMETRIC_RANDOM
    no_fixed_port = {NatType.SYMMETRIC_SEQ, rnd}  # port-restricted and cgnat: birthday punching
    assert relayed == {(rnd, t) for t in no_fixed_port} | {(t, rnd) for t in no_fixed_port}


# ------------------------------------------------------------------ port mapping columns (a subset here;
# the full tables: python scripts/matrix.py --port-mapping one --port-mapping both, docs/connectivity.md)
MAPPED_TYPES = (NatType.SYMMETRIC_RANDOM, NatType.SYMMETRIC_SEQ, NatType.CGNAT)
MAPPED_PAIRS = [(NatType.SYMMETRIC_RANDOM, NatType.SYMMETRIC_RANDOM), (NatType.SYMMETRIC_SEQ, NatType.SYMMETRIC_RANDOM),
                (NatType.SYMMETRIC_RANDOM, NatType.CGNAT), (NatType.CGNAT, NatType.CGNAT)]


@pytest.fixture(scope="module")
def mapped_lab() -> Iterator[tuple[Lab, LabRunner]]:
    spec = matrix_spec(SynPolicy.DROP, mapping=MappingSides.BOTH, types=MAPPED_TYPES)
    with Lab(spec) as lab, LabRunner(lab) as runner:
        yield lab, runner


@pytest.mark.parametrize(("a", "b"), MAPPED_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in MAPPED_PAIRS])
def test_port_mapping_on_both_routers(mapped_lab: tuple[Lab, LabRunner], a: NatType, b: NatType) -> None:
    """Pairs that needed the relay (or a birthday spray) go direct through a mapping; behind cgnat none
    can be had (the carrier layer), so cgnat with cgnat punches as before."""
    lab, runner = mapped_lab
    ra, rb = host_names(a, b)
    result = runner.pair(lab.host(ra), lab.host(rb), size=1_000_000, port_mapping=True)
    assert result.error is None and result.ok, result
    assert result.method is Method.DIRECT and direct_expected(a, b, MappingSides.BOTH)
    wins = mapping_wins(a, b, MappingSides.BOTH)
    assert (result.candidate is CandidateKind.MAPPED) == wins, (result.candidate, result.attempts[-5:])


def test_with_port_mapping_every_pair_is_direct() -> None:
    for mapping in (MappingSides.ONE, MappingSides.BOTH):
        assert all(direct_expected(a, b, mapping) for a, b in PAIRS)
    assert not mapping_wins(NatType.CGNAT, NatType.CGNAT, MappingSides.BOTH)
    assert not mapping_wins(NatType.SYMMETRIC_RANDOM, NatType.CGNAT, MappingSides.ONE)


# ------------------------------------------------------------------ the IPv6 column (a subset here; the full
# tables: python scripts/matrix.py --ipv6, docs/connectivity.md). Pairs that need the relay, or a birthday
# punch, over IPv4 go direct over IPv6: the IPv6 candidates race first, the spray's wave is not needed.
IPV6_TYPES = (NatType.SYMMETRIC_RANDOM, NatType.SYMMETRIC_SEQ, NatType.PORT_RESTRICTED)
IPV6_PAIRS = [(NatType.SYMMETRIC_RANDOM, NatType.SYMMETRIC_RANDOM), (NatType.SYMMETRIC_RANDOM, NatType.SYMMETRIC_SEQ),
              (NatType.SYMMETRIC_SEQ, NatType.SYMMETRIC_RANDOM), (NatType.SYMMETRIC_RANDOM, NatType.PORT_RESTRICTED)]


@pytest.fixture(scope="module")
def ipv6_lab() -> Iterator[tuple[Lab, LabRunner]]:
    with Lab(matrix_spec(SynPolicy.DROP, ipv6=True, types=IPV6_TYPES)) as lab, LabRunner(lab) as runner:
        yield lab, runner


@pytest.mark.parametrize(("a", "b"), IPV6_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in IPV6_PAIRS])
def test_ipv6_column(ipv6_lab: tuple[Lab, LabRunner], a: NatType, b: NatType) -> None:
    assert direct_expected(a, b, ipv6=True)
    lab, runner = ipv6_lab
    ra, rb = host_names(a, b)
    result = runner.pair(lab.host(ra), lab.host(rb), size=1_000_000)
    assert result.error is None and result.ok, result
    assert (result.method, result.candidate) == (Method.DIRECT, CandidateKind.IPV6), result.attempts[-5:]
