"""Each NAT type, with each unsolicited-SYN policy, measured by the lab's own probe against its promise."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tcppunch.lab import Lab, LabSpec, NatType, RouterSpec, SynPolicy
from tcppunch.lab.probe import ProbeResult, probe_all

CASES = [(t, p) for t in NatType for p in SynPolicy]


def _router_name(nat: NatType, policy: SynPolicy) -> str:
    return f"r{list(NatType).index(nat)}{policy.value[0]}"


@pytest.fixture(scope="module")
def measured() -> Iterator[tuple[Lab, dict[str, ProbeResult]]]:
    spec = LabSpec([RouterSpec(_router_name(t, p), t, p) for t, p in CASES])
    with Lab(spec) as lab:
        yield lab, probe_all(lab)


@pytest.mark.parametrize(("nat", "policy"), CASES, ids=[f"{t.value}-{p.value}" for t, p in CASES])
def test_type_behaves_as_promised(measured: tuple[Lab, dict[str, ProbeResult]], nat: NatType,
                                  policy: SynPolicy) -> None:
    lab, results = measured
    host = lab.host(_router_name(nat, policy))
    got = results[host.name]
    assert got.mapping is nat.mapping
    assert got.filtering is nat.filtering
    assert got.port_preservation is nat.port_preservation
    assert got.port_delta == nat.port_delta
    assert got.unsolicited_syn is nat.unsolicited_syn(policy)
    assert got.hairpin is nat.truth.hairpin
    assert {m.ip for m in got.mapped} == {host.public_address}


def test_symmetric_seq_hands_out_consecutive_ports(measured: tuple[Lab, dict[str, ProbeResult]]) -> None:
    lab, results = measured
    ports = [m.port for m in results[lab.host(_router_name(NatType.SYMMETRIC_SEQ, SynPolicy.DROP)).name].mapped]
    assert ports == list(range(ports[0], ports[0] + len(ports)))


def test_symmetric_random_ports_differ(measured: tuple[Lab, dict[str, ProbeResult]]) -> None:
    lab, results = measured
    ports = [m.port for m in results[lab.host(_router_name(NatType.SYMMETRIC_RANDOM, SynPolicy.RST)).name].mapped]
    assert len(set(ports)) == len(ports)
