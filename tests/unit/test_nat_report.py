"""NatReport survives a JSON round trip; unknown enum values are rejected, not guessed."""

import json

import pytest

from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import (
    FilteringBehaviour,
    Ipv6Support,
    MappingBehaviour,
    NatReport,
    PortAllocation,
    SynResponse,
    TcpBehaviour,
)


def test_round_trip_through_json_text() -> None:
    report = NatReport(
        tcp=TcpBehaviour(
            mapping=MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT,
            filtering=FilteringBehaviour.ADDRESS_DEPENDENT,
            port_preservation=False,
            port_delta=1,
            unsolicited_syn=SynResponse.RST,
            hairpin=None,
            port_allocation=PortAllocation.SEQUENTIAL,
        ),
        public=Endpoint("198.51.100.101", 20001),
        local=("10.0.1.2",),
        udp_nat_type="Symmetric NAT",
        behind_nat=True,
        verdict="direct needs port prediction",
        untested=("hairpin",),
        ipv6=Ipv6Support("2001:db8:1::2", True, "no NAT66"),
    )
    text = json.dumps(report.to_json())
    assert NatReport.from_json(json.loads(text)) == report
    assert json.loads(text)["tcp"]["mapping"] == "address-and-port-dependent"


def test_unknown_mapping_value_is_an_error() -> None:
    with pytest.raises(ValueError):
        TcpBehaviour.from_json({"mapping": "sideways"})
    with pytest.raises(ValueError):
        TcpBehaviour.from_json({"port_allocation": "lucky"})


def test_a_report_without_port_allocation_reads_as_not_measured() -> None:
    data = NatReport(tcp=TcpBehaviour(port_delta=1)).to_json()
    del data["tcp"]["port_allocation"]  # an older peer's report
    assert NatReport.from_json(data).tcp == TcpBehaviour(port_delta=1)


def test_endpoint_formats_ipv6_with_brackets() -> None:
    assert str(Endpoint("::1", 80)) == "[::1]:80"
    assert str(Endpoint("127.0.0.1", 80)) == "127.0.0.1:80"


def test_a_report_without_ipv6_reads_as_not_probed() -> None:
    data = NatReport().to_json()
    del data["ipv6"]  # an older peer's report
    assert NatReport.from_json(data).ipv6 is None
