"""A NAT report carries port mapping (protocols answered, mapping held) through the coordinator
protocol unchanged, and a malformed port_mapping part is refused like any other bad field."""

from __future__ import annotations

from typing import Any

import pytest

from tcppunch.nat.report import Endpoint, NatReport, PortMapping, PortMappingProtocol, PortMappingSupport
from tcppunch.wire.coord import ProtocolError, Register

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
