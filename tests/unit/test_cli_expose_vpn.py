"""`tcppunch expose`, `tcppunch vpn` and `server --expose-ports`: bad input is one clear usage error, before
anything is opened (no coordinator, no TUN device is touched)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tcppunch.cli import main

COMMON = ["--coordinator", "127.0.0.1:9", "--id", "alice"]
ENV = {"TCPPUNCH_TOKEN": "t"}


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args, env=ENV)
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize(("address", "message"), [
    ("10.99.0.1", "give the VPN subnet's prefix"),
    ("10.99.0.1/32", "give the VPN subnet's prefix"),
    ("not-an-address/24", "is not an address with a prefix"),
])
def test_vpn_address_needs_a_subnet(address: str, message: str) -> None:
    code, output = _run(["vpn", *COMMON, "--peer", "bob", "--address", address])
    assert code == 2 and message in output


def test_vpn_peer_must_be_another_id() -> None:
    code, output = _run(["vpn", *COMMON, "--peer", "alice", "--address", "10.99.0.1/24"])
    assert code == 2 and "--peer must be another id" in output


def test_vpn_route_must_be_a_network() -> None:
    code, output = _run(["vpn", *COMMON, "--peer", "bob", "--address", "10.99.0.1/24", "--route", "192.168.1.7/24"])
    assert code == 2 and "--route 192.168.1.7/24" in output and "host bits set" in output


@pytest.mark.parametrize("ports", ["9000-8000", "0-10", "80,443", "8000-70000"])
def test_server_refuses_a_bad_expose_range(ports: str) -> None:
    code, output = _run(["server", "--listen", "127.0.0.1:9", "--token", "t", "--expose-ports", ports])
    assert code == 2 and "--expose-ports" in output


def test_expose_needs_a_port_and_a_service() -> None:
    code, output = _run(["expose", *COMMON, "--remote-port", "8080"])
    assert code == 2 and "--forward" in output
    code, output = _run(["expose", *COMMON, "--remote-port", "0", "--forward", "127.0.0.1:8000"])
    assert code == 2 and "--remote-port" in output
    code, output = _run(["expose", *COMMON, "--remote-port", "8080", "--forward", "127.0.0.1:8000",
                         "--proxy-protocol", "v3"])
    assert code == 2 and "--proxy-protocol" in output


def test_help_says_what_the_commands_are_for() -> None:
    _, expose = _run(["expose", "--help"])
    assert "frp" in expose and "--expose-ports" in expose and "TLS" in expose
    _, vpn = _run(["vpn", "--help"])
    assert "--route" in vpn and "root" in vpn
