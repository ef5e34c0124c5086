"""``tcppunch vpn`` across the lab, as processes with TUN interfaces inside the lab hosts' namespaces:
port-restricted <-> symmetric-seq (direct) and symmetric-random <-> symmetric-random (relayed) pairs ping
each other at their VPN addresses; 100 MB of ordinary TCP (socat) crosses the VPN intact; when one side
quits, the other's interface goes down with a clear line, and comes back up when it returns; --route
reaches a machine on the LAN behind the other peer."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcppunch.lab import Lab, LabHost
from tcppunch.lab.lines import LineTimeout, Tail
from tests.lab.processes import COORD, PY, four_nats, lab_server, stop, token_env

TOKEN = "vpn-lab-token"
UP_WITHIN = 60.0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # seq has a second host: a LAN machine reached through the VPN with --route
    with Lab(four_nats(seq_hosts=2)) as the_lab, lab_server(the_lab, TOKEN):
        yield the_lab


class Vpn:
    """One `tcppunch vpn` process and the lines it printed."""

    def __init__(self, host: LabHost, me: str, other: str, address: str, report: Path, *extra: str) -> None:
        self.host, self.report = host, report
        self.proc: subprocess.Popen[str] = host.popen(
            [*PY, "vpn", "--coordinator", COORD, "--id", me, "--peer", other, "--address", address,
             "--report", str(report), *extra], stderr=subprocess.PIPE, text=True, env=token_env(TOKEN))
        assert self.proc.stderr is not None
        self.out = Tail(self.proc.stderr)  # every line, read to the end whether or not a test waits
        self._waited: dict[str, int] = {}  # needle -> how many of its lines the waits have consumed

    def wait(self, needle: str, timeout: float = UP_WITHIN) -> None:
        """Wait for the NEXT line containing ``needle`` (one not consumed by an earlier wait)."""
        want = self._waited.get(needle, 0) + 1
        if not self.out.wait_for_count(needle, want, timeout):
            raise LineTimeout(f"no new line with {needle!r} within {timeout:.0f} s; printed:\n{self.out.text}")
        self._waited[needle] = want

    def link_flags(self) -> str:
        out = self.host.run(["ip", "-o", "link", "show", "dev", "tcppunch0"]).stdout
        return out.split("<", 1)[1].split(">", 1)[0]

    def stop(self) -> None:
        stop(self.proc)


@pytest.fixture
def pair(request: pytest.FixtureRequest, lab: Lab, tmp_path: Path) -> Iterator[tuple[Vpn, Vpn]]:
    a_name, b_name = request.param
    a = Vpn(lab.host(a_name), f"{a_name}-v", f"{b_name}-v", "10.99.0.1/24", tmp_path / "a.json")
    b = Vpn(lab.host(b_name), f"{b_name}-v", f"{a_name}-v", "10.99.0.2/24", tmp_path / "b.json")
    try:
        a.wait("vpn up")
        b.wait("vpn up")
        yield a, b
    finally:
        a.stop()
        b.stop()
    for side in (a, b):  # the TUN device left with its process
        assert "tcppunch0" not in side.host.run(["ip", "-o", "link"]).stdout


def _ping(host: LabHost, address: str) -> None:
    done = host.run(["ping", "-n", "-c", "3", "-i", "0.2", "-W", "3", address], timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("pair", "method"), [(("pr", "seq"), "direct"), (("rnda", "rndb"), "relay")],
                         indirect=["pair"])
def test_peers_ping_each_other_at_their_vpn_addresses(pair: tuple[Vpn, Vpn], method: str) -> None:
    a, b = pair
    _ping(a.host, "10.99.0.2")
    _ping(b.host, "10.99.0.1")
    assert json.loads(a.report.read_text())["method"] == method


@pytest.mark.parametrize("pair", [("pr", "seq")], indirect=True)
def test_100_mb_of_tcp_crosses_the_vpn_intact(pair: tuple[Vpn, Vpn], tmp_path: Path) -> None:
    a, b = pair
    payload, received = tmp_path / "payload.bin", tmp_path / "received.bin"
    payload.write_bytes(os.urandom(100_000_000))
    sink = b.host.popen(["socat", "-u", "TCP-LISTEN:5001,bind=10.99.0.2,reuseaddr", f"CREATE:{received}"])
    try:
        sent = a.host.run(["socat", "-u", f"FILE:{payload}", "TCP:10.99.0.2:5001,retry=50,interval=0.1"],
                          timeout=240)
        assert sent.returncode == 0, sent.stderr
        assert sink.wait(60) == 0
    finally:
        stop(sink)
    assert hashlib.sha256(received.read_bytes()).digest() == hashlib.sha256(payload.read_bytes()).digest()


@pytest.mark.parametrize("pair", [("pr", "seq")], indirect=True)
def test_the_interface_goes_down_when_the_session_dies_and_up_when_it_returns(
        pair: tuple[Vpn, Vpn], lab: Lab, tmp_path: Path) -> None:
    a, b = pair
    assert "UP" in a.link_flags().split(",")
    b.stop()
    a.wait("vpn down: tcppunch0:")
    assert "UP" not in a.link_flags().split(",")
    assert a.host.run(["ping", "-n", "-c", "1", "-W", "1", "10.99.0.2"], timeout=10).returncode != 0
    back = Vpn(b.host, "seq-v", "pr-v", "10.99.0.2/24", tmp_path / "b2.json")
    try:
        back.wait("vpn up")
        a.wait("vpn up")
        _ping(a.host, "10.99.0.2")
    finally:
        back.stop()


def test_route_reaches_a_lan_machine_behind_the_other_peer(lab: Lab, tmp_path: Path) -> None:
    a, b, lan = lab.host("pr"), lab.host("seq"), lab.host("seq", 1)
    lan_net = str(ipaddress.ip_interface(f"{b.address}/24").network)
    # b forwards between the VPN and its LAN; the LAN machine sends VPN replies back through b
    assert b.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"]).returncode == 0
    assert lan.run(["ip", "route", "replace", "10.99.0.0/24", "via", b.address]).returncode == 0
    key = _key_id()  # every lab process shares one identity here: each side pins it for the other
    far = Vpn(a, "pr-r", "seq-r", "10.99.0.1/24", tmp_path / "a.json", "--route", lan_net, "--peer-key", key)
    near = Vpn(b, "seq-r", "pr-r", "10.99.0.2/24", tmp_path / "b.json", "--peer-key", key)
    try:
        far.wait("vpn up")
        near.wait("vpn up")
        assert "dev tcppunch0" in a.run(["ip", "route", "show", lan_net]).stdout
        _ping(a, lan.address)
    finally:
        far.stop()
        near.stop()
        lan.run(["ip", "route", "del", "10.99.0.0/24"])


def _key_id(*identity: str) -> str:
    return subprocess.run([*PY, "id", *identity], capture_output=True, text=True, check=True,
                          env=token_env(TOKEN)).stdout.strip()


def test_a_peer_without_the_pinned_key_never_gets_the_vpn(lab: Lab, tmp_path: Path) -> None:
    wrong = _key_id("--identity", str(tmp_path / "someone-else.key"))
    a = Vpn(lab.host("pr"), "pr-k", "seq-k", "10.99.0.1/24", tmp_path / "a.json", "--peer-key", wrong)
    b = Vpn(lab.host("seq"), "seq-k", "pr-k", "10.99.0.2/24", tmp_path / "b.json")
    try:
        a.wait(f"--peer-key expects {wrong}")  # the opener refuses the key it met (retries until then)
        b.wait("registered")  # b's side of the story so far is in b.out, not only a's
        assert "vpn up" not in a.out.text + b.out.text, a.out.text + b.out.text
        assert "UP" not in a.link_flags().split(",")
    finally:
        a.stop()
        b.stop()
