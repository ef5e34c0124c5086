"""Two hosts behind symmetric-random IPv4 NATs (the pair that otherwise needs the relay) connect DIRECT
over IPv6 through two RFC 6092 firewalls, with the Peer API, and move bytes both ways (SHA-256).
Both SYN policies: under ``rst`` the SYNs must cross in flight, so those routers get the matrix's delay."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tcppunch.lab import Lab, LabSpec, LinkShape, NatType, RouterSpec, SynPolicy
from tcppunch.lab.matrix import RST_MATRIX_DELAY_MS
from tcppunch.labrun import LabRunner
from tcppunch.peer import Method
from tcppunch.punch.plan import CandidateKind


@pytest.fixture(scope="module")
def runner() -> Iterator[LabRunner]:
    rst_link = LinkShape(delay_ms=RST_MATRIX_DELAY_MS)
    spec = LabSpec([RouterSpec("da", NatType.SYMMETRIC_RANDOM, SynPolicy.DROP),
                    RouterSpec("db", NatType.SYMMETRIC_RANDOM, SynPolicy.DROP),
                    RouterSpec("ra", NatType.SYMMETRIC_RANDOM, SynPolicy.RST, link=rst_link),
                    RouterSpec("rb", NatType.SYMMETRIC_RANDOM, SynPolicy.RST, link=rst_link)], ipv6=True)
    with Lab(spec) as lab, LabRunner(lab) as run:
        yield run


@pytest.mark.parametrize("policy", ["d", "r"], ids=["drop", "rst"])
def test_symmetric_random_pair_goes_direct_over_ipv6(runner: LabRunner, policy: str) -> None:
    a, b = runner.lab.host(f"{policy}a"), runner.lab.host(f"{policy}b")
    result = runner.pair(a, b, size=2_000_000)
    assert result.ok, result
    assert result.method is Method.DIRECT, result
    assert result.candidate is CandidateKind.IPV6, result
    # the IPv4 wave was never needed: IPv6 won within the Happy-Eyeballs attempt delay
    assert all("(ipv6)" in line for line in result.attempts if "(incoming)" not in line), result.attempts
