"""``tcppunch detect`` in the NAT lab: every NAT type x SYN policy against ground truth, plus interop.

One lab for the whole module (one router per type x policy, one server running ``tcppunch server`` on
both addresses, a second one on one address only, and coturn), so the suite costs one lab build and one
detect run per case.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import stun as pystun

from tcppunch.lab import Lab, LabHost, LabSpec, NatType, RouterSpec, SynPolicy
from tcppunch.lab.lines import Tail
from tcppunch.lab.server_process import lab_server, stop_process
from tcppunch.nat.udp import REQUEST_SIZE
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.stun import padded

SERVER = "198.51.100.10"
ALT = "198.51.100.11"
PORT = 3478
COTURN_PORT = 3480
ONE_ADDRESS_PORT = 3490  # a second `tcppunch server`, without --alt-address
TOKEN = "lab-secret"
CASES = [(t, p) for t in NatType for p in SynPolicy]
READY_TIMEOUT = 15.0

# The classic label pystun3 should give each type (the lab's rule sets treat UDP like TCP).
UDP_LABEL = {
    NatType.NONE: pystun.OpenInternet,
    NatType.FULL_CONE: pystun.FullCone,
    NatType.RESTRICTED: pystun.RestricNAT,
    NatType.PORT_RESTRICTED: pystun.RestricPortNAT,
    NatType.SYMMETRIC_SEQ: pystun.SymmetricNAT,
    NatType.SYMMETRIC_RANDOM: pystun.SymmetricNAT,
    NatType.CGNAT: pystun.RestricPortNAT,
}


def router_name(nat: NatType, policy: SynPolicy) -> str:
    return f"d{list(NatType).index(nat)}{policy.value[0]}"


@dataclass
class DetectLab:
    lab: Lab
    reports: dict[tuple[str, str], dict[str, Any]]

    def detect(self, host: LabHost, target: str) -> dict[str, Any]:
        """``tcppunch detect <target> --json`` on ``host``, cached per (host, target)."""
        key = (host.name, target)
        if key not in self.reports:
            option, endpoint = target.split(" ", 1)
            result = host.run([sys.executable, "-m", "tcppunch", "detect", option, endpoint, "--json"], timeout=30)
            assert result.returncode == 0, result.stderr
            self.reports[key] = json.loads(result.stdout)
        return self.reports[key]


def _coturn(workdir: Path) -> list[str]:
    return ["turnserver", "-n", "--no-auth", "--stun-only", "--listening-ip", SERVER, "--listening-ip", ALT,
            "--listening-port", str(COTURN_PORT), "--alt-listening-port", str(COTURN_PORT + 1), "--no-tls",
            "--no-dtls", "--no-cli", "--log-file", "stdout", "--simple-log",
            "--pidfile", str(workdir / "turnserver.pid"), "--userdb", str(workdir / "turndb"), "-v"]


@pytest.fixture(scope="module")
def detect_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DetectLab]:
    spec = LabSpec([RouterSpec(router_name(t, p), t, p) for t, p in CASES])
    workdir = Path(tmp_path_factory.mktemp("coturn"))
    with Lab(spec) as lab, lab_server(lab, TOKEN), \
            lab_server(lab, TOKEN, listen=Endpoint(SERVER, ONE_ADDRESS_PORT), alt_address=None):
        coturn = lab.server.popen(_coturn(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert coturn.stdout is not None
            log = Tail(coturn.stdout)
            listeners = [f"{a}:{p}" for a in (SERVER, ALT) for p in (COTURN_PORT, COTURN_PORT + 1)]
            for needle in [*(f"TCP listener opened on : {x}" for x in listeners),
                           *(f"UDP listener opened on: {x}" for x in listeners)]:
                assert log.wait_for(needle, READY_TIMEOUT), f"never saw {needle!r}: {log.text[-2000:]}"
            yield DetectLab(lab, {})
        finally:
            stop_process(coturn)


@pytest.mark.parametrize(("nat", "policy"), CASES, ids=[f"{t.value}-{p.value}" for t, p in CASES])
def test_detect_matches_ground_truth(detect_lab: DetectLab, nat: NatType, policy: SynPolicy) -> None:
    host = detect_lab.lab.host(router_name(nat, policy))
    report = detect_lab.detect(host, f"--server {SERVER}:{PORT}")
    tcp = report["tcp"]
    assert tcp["mapping"] == nat.mapping.value
    assert tcp["filtering"] == nat.filtering.value
    assert tcp["port_preservation"] is nat.port_preservation
    assert tcp["port_delta"] == nat.port_delta
    assert tcp["port_allocation"] == {0: "reused", 1: "sequential", None: "random"}[nat.port_delta]
    assert tcp["unsolicited_syn"] == nat.unsolicited_syn(policy).value
    assert tcp["hairpin"] is nat.truth.hairpin
    assert report["public"]["ip"] == host.public_address
    assert report["behind_nat"] is (nat is not NatType.NONE)
    assert report["udp"]["nat_type"] == UDP_LABEL[nat]
    assert host.address in report["local"]
    assert report["untested"] == []
    assert report["verdict"]


@pytest.mark.parametrize("nat", [NatType.SYMMETRIC_SEQ, NatType.SYMMETRIC_RANDOM], ids=lambda t: t.value)
def test_one_address_server_does_not_guess_a_port_step(detect_lab: DetectLab, nat: NatType) -> None:
    """A server without --alt-address gives the mapping test two new ports, one step apart, whichever
    allocator made them: no step is claimed (a random NAT used to read as "sequential, +N")."""
    host = detect_lab.lab.host(router_name(nat, SynPolicy.DROP))
    report = detect_lab.detect(host, f"--server {SERVER}:{ONE_ADDRESS_PORT}")
    tcp = report["tcp"]
    assert tcp["mapping"] == "address-and-port-dependent"
    assert tcp["port_delta"] is None and tcp["port_allocation"] == "unknown", tcp
    assert any(item.startswith("port allocation") for item in report["untested"]), report["untested"]
    assert "could not be measured" in report["verdict"]


@pytest.mark.parametrize("nat", list(NatType), ids=[t.value for t in NatType])
def test_coturn_gives_the_same_mapping(detect_lab: DetectLab, nat: NatType) -> None:
    host = detect_lab.lab.host(router_name(nat, SynPolicy.DROP))
    theirs = detect_lab.detect(host, f"--stun {SERVER}:{COTURN_PORT}")
    ours = detect_lab.detect(host, f"--server {SERVER}:{PORT}")
    for key in ("mapping", "port_preservation", "port_delta", "port_allocation"):
        assert theirs["tcp"][key] == ours["tcp"][key], key
    assert theirs["tcp"]["mapping"] == nat.mapping.value
    assert theirs["tcp"]["filtering"] is None  # coturn cannot run our TCP connect-back
    assert any("filtering" in item for item in theirs["untested"])
    # the guarded pystun3 run reads coturn's UDP answers correctly too
    assert theirs["udp"]["nat_type"] == UDP_LABEL[nat]


class _PaddingSocket:
    """A UDP socket whose requests carry RFC 5780 PADDING: our server answers no more bytes than a
    request carried (issue 9 finding 6), and pystun3's own requests are 20-28 bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        self._sock.sendto(padded(data, REQUEST_SIZE), address)
        return len(data)

    def recvfrom(self, size: int) -> tuple[bytes, object]:
        return self._sock.recvfrom(size)


def _raw_pystun3(address: str, pad: bool = True) -> tuple[str, str | None]:
    """pystun3 itself (no guard, only padding), with a short socket timeout, against our server's UDP side."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.bind((address, 0))
        port = sock.getsockname()[1]
        client = _PaddingSocket(sock) if pad else sock
        nat_type, result = pystun.get_nat_type(client, address, port, stun_host=SERVER, stun_port=PORT)
        return str(nat_type), result.get("ExternalIP")


@pytest.mark.parametrize("nat", list(NatType), ids=[t.value for t in NatType])
def test_pystun3_reads_our_udp_answers(detect_lab: DetectLab, nat: NatType) -> None:
    host = detect_lab.lab.host(router_name(nat, SynPolicy.DROP))
    label, _ = host.call(_raw_pystun3, host.address, timeout=30)
    assert label == UDP_LABEL[nat]


def test_unpadded_udp_requests_get_no_amplified_answer(detect_lab: DetectLab) -> None:
    """A 20-byte request cannot be answered without amplifying: pystun3 unpadded sees no server."""
    host = detect_lab.lab.host(router_name(NatType.FULL_CONE, SynPolicy.DROP))
    label, _ = host.call(_raw_pystun3, host.address, False, timeout=30)
    assert label == "Blocked"
