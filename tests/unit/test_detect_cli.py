"""``tcppunch detect`` from the command line: exit codes, JSON contract, human table."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from tcppunch.cli import main
from tcppunch.wire.natreport import NatReport
from tests.unit.test_stun_service import A1, ServiceThread, start_service


@pytest.fixture(scope="module")
def service() -> Iterator[ServiceThread]:
    running = start_service()
    yield running
    running.__exit__()


def test_json_output_is_one_nat_report(service: ServiceThread) -> None:
    result = CliRunner().invoke(main, ["detect", "--server", f"{A1}:{service.config.primary_port}", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) >= {"udp", "tcp", "public", "local", "verdict"}
    assert set(data["tcp"]) == {"mapping", "filtering", "port_preservation", "port_delta", "unsolicited_syn", "hairpin",
                                "port_allocation"}
    report = NatReport.from_json(data)
    assert report.tcp.mapping is not None and report.tcp.mapping.value == "endpoint-independent"
    assert data["udp"]["nat_type"] == "Open Internet"


def test_table_output(service: ServiceThread) -> None:
    result = CliRunner().invoke(main, ["detect", "--server", f"{A1}:{service.config.primary_port}"])
    assert result.exit_code == 0
    assert "TCP mapping        endpoint-independent" in result.stdout
    assert "No NAT in front of this host" in result.stdout


def test_unreachable_server_exits_3_with_one_line() -> None:
    with socket.socket() as sock:
        sock.bind((A1, 0))  # bound but not listening: connections are refused
        port = sock.getsockname()[1]
        result = CliRunner().invoke(main, ["detect", "--server", f"{A1}:{port}", "--timeout", "1"])
    assert result.exit_code == 3
    assert result.stderr.count("\n") == 1 and "server unreachable" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["detect"],
        ["detect", "--server", "127.0.0.1:0"],
        ["detect", "--server", "127.0.0.1:x"],
        ["detect", "--timeout", "-1"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert CliRunner().invoke(main, args).exit_code == 2


def test_help_says_what_a_one_address_server_cannot_tell() -> None:
    detect_help = " ".join(CliRunner().invoke(main, ["detect", "--help"]).output.split())
    assert "--alt-address" in detect_help and "not measured" in detect_help and "never guessed" in detect_help
    server_help = " ".join(CliRunner().invoke(main, ["server", "--help"]).output.split())
    assert "--alt-address ADDR" in server_help and "port allocation stay unknown" in server_help
