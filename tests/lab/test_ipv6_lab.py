"""The lab's IPv6 (``LabSpec(ipv6=True)``): no NAT66, RFC 6092 firewalls on the routers.

Checked with plain blocking sockets, independent of the punch engine: hosts reach the server over IPv6
and the server sees their own addresses; replies get back in; an unsolicited inbound SYN is dropped or
answered with a RST as the router's policy says; a simultaneous open through two firewalls works
(RFC 6092 REC-31); IPv4 NAT stays as it is.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcppunch.lab import Lab, LabHost, LabSpec, NatType, RouterSpec, SynPolicy
from tcppunch.lab.lines import wait_for_line
from tcppunch.lab.topology import SERVER_ADDRESSES6
from tests.lab.processes import COORD, PY, lab_server, stop, token_env

ECHO_PORT = 7100
_IO = 3.0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    spec = LabSpec([RouterSpec("rd", NatType.SYMMETRIC_RANDOM, SynPolicy.DROP),
                    RouterSpec("rr", NatType.SYMMETRIC_RANDOM, SynPolicy.RST),
                    RouterSpec("cg", NatType.CGNAT, SynPolicy.DROP),
                    RouterSpec("pub", NatType.NONE)], ipv6=True)
    with Lab(spec) as the_lab:
        yield the_lab


class _Observer:
    """A server listener that writes back the source address it sees."""

    def __init__(self, server: LabHost, address: str) -> None:
        self.sock = server.call(lambda: _listener(address, ECHO_PORT))
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(peer[0].encode())

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def _listener(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(16)
    return sock


def _ask(address: str, port: int) -> str:
    with socket.create_connection((address, port), timeout=_IO) as sock:
        return sock.recv(100).decode()


@pytest.fixture(scope="module")
def observer(lab: Lab) -> Iterator[_Observer]:
    obs = _Observer(lab.server, SERVER_ADDRESSES6[0])
    yield obs
    obs.close()


@pytest.mark.parametrize("name", ["rd1", "rr1", "cg1", "pub1"])
def test_host_reaches_server_without_nat66(lab: Lab, observer: _Observer, name: str) -> None:
    host = lab.hosts[name]
    assert host.address6 is not None
    assert host.call(_ask, SERVER_ADDRESSES6[0], ECHO_PORT) == host.address6  # replies got in; no NAT66


def test_ipv4_nat_unchanged(lab: Lab) -> None:
    host = lab.hosts["rd1"]
    obs = _Observer(lab.server, lab.server.address)
    try:
        assert host.call(_ask, lab.server.address, ECHO_PORT) == host.public_address != host.address
    finally:
        obs.close()


def _unsolicited(address: str, port: int) -> str:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(1.5)
    try:
        sock.connect((address, port))
        return "accept"
    except TimeoutError:
        return "drop"
    except ConnectionRefusedError:
        return "rst"
    finally:
        sock.close()


@pytest.mark.parametrize(("name", "expected"), [("rd1", "drop"), ("rr1", "rst"), ("cg1", "drop"), ("pub1", "accept")])
def test_unsolicited_inbound_syn(lab: Lab, name: str, expected: str) -> None:
    host = lab.hosts[name]
    assert host.address6 is not None
    listener = host.call(lambda: _listener(host.address6 or "", 7200))
    try:
        assert lab.server.call(_unsolicited, host.address6, 7200) == expected
    finally:
        listener.close()


def _simultaneous_open(local: str, port: int, remote: str, start: float, budget: float) -> str:
    """connect() from a fixed port to the other side's fixed port, retrying (bounded) until it opens."""
    while time.monotonic() < start:
        time.sleep(0.001)
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((local, port))
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            sock.connect((remote, port))
            sock.sendall(local.encode())
            got = sock.recv(100).decode()
            sock.close()
            return got
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ECONNREFUSED, errno.ETIMEDOUT, None):
                raise
            time.sleep(0.05)  # bounded retry pacing after a RST, not a synchronisation
    return "timeout"


def test_simultaneous_open_through_two_firewalls(lab: Lab) -> None:
    """RFC 6092 REC-31: two hosts behind drop-policy firewalls open a TCP connection by simultaneous open
    (neither listens), each seeing the other's own address."""
    a, b = lab.hosts["rd1"], lab.hosts["cg1"]
    assert a.address6 is not None and b.address6 is not None
    start = time.monotonic() + 0.3
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        fa = pool.submit(a.call, _simultaneous_open, a.address6, 7300, b.address6, start, 10.0)
        fb = pool.submit(b.call, _simultaneous_open, b.address6, 7300, a.address6, start, 10.0)
        assert (fa.result(20), fb.result(20)) == (b.address6, a.address6)


TOKEN = "ipv6-lab-token"


@pytest.fixture(scope="module")
def dual_stack_server(lab: Lab) -> Iterator[None]:
    """``tcppunch server`` with --listen given twice (IPv4 and IPv6), as a process on the lab server."""
    with lab_server(lab, TOKEN, "--listen", "[2001:db8::10]:3478", "--alt-address", "2001:db8::11"):
        yield


@pytest.mark.parametrize(("port", "works"), [(3478, True), (3999, False)], ids=["served", "nothing-there"])
def test_detect_reports_whether_ipv6_works(lab: Lab, dual_stack_server: None, port: int, works: bool) -> None:
    host = lab.hosts["rd1"]
    done = host.run([*PY, "detect", "--server", "198.51.100.10:3478", "--ipv6-server", f"[2001:db8::10]:{port}",
                     "--json", "--no-udp"], timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ipv6"]["address"] == host.address6
    assert report["ipv6"]["works"] is works, report["ipv6"]
    assert report["tcp"]["mapping"] == "address-and-port-dependent"  # the IPv4 measurement is unchanged
    assert report["public"]["ip"] == host.public_address


def test_detect_against_an_ipv6_server_measures_over_ipv6(lab: Lab, dual_stack_server: None) -> None:
    host = lab.hosts["cg1"]
    done = host.run([*PY, "detect", "--server", "[2001:db8::10]:3478", "--json", "--no-udp"], timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["public"]["ip"] == host.address6 and report["behind_nat"] is False  # no NAT66
    assert report["ipv6"]["works"] is True


@pytest.mark.parametrize(("opt_out", "candidate"), [(False, "ipv6"), (True, "birthday")], ids=["ipv6", "no-ipv6"])
def test_cli_connect_goes_over_ipv6_unless_told_not_to(lab: Lab, dual_stack_server: None, tmp_path: Path,
                                                        opt_out: bool, candidate: str) -> None:
    """symmetric-random -> cgnat with the real CLI: over IPv6 by default (the report names the candidate
    and our IPv6 endpoint); with --no-ipv6 the IPv4 path (a birthday punch) serves. SHA-256 both ways."""
    a, b = lab.hosts["rd1"], lab.hosts["cg1"]
    name = "x" if opt_out else "v"
    a_in, a_out, b_in, b_out = (tmp_path / f for f in ("a.in", "a.out", "b.in", "b.out"))
    a_in.write_bytes(os.urandom(1_000_000))
    b_in.write_bytes(os.urandom(1_000_000))
    listener = b.popen([*PY, "listen", "--coordinator", COORD, "--id", f"cg-{name}", "--once"],
                       stdin=b_in.open("rb"), stdout=b_out.open("wb"), stderr=subprocess.PIPE, text=True,
                       env=token_env(TOKEN))
    try:
        assert listener.stderr is not None
        wait_for_line(listener.stderr, "listening as", 30)
        report = tmp_path / "a.json"
        done = a.run([*PY, "connect", f"cg-{name}", "--coordinator", COORD, "--id", f"rd-{name}", "--report",
                      str(report), *(["--no-ipv6"] if opt_out else [])], stdin=a_in.open("rb"),
                     stdout=a_out.open("wb"), capture_output=False, stderr=subprocess.PIPE, timeout=120,
                     env=token_env(TOKEN))
        assert done.returncode == 0, done.stderr
        assert listener.wait(60) == 0
        assert _sha(a_in) == _sha(b_out) and _sha(b_in) == _sha(a_out)
        info = json.loads(report.read_text())
        assert (info["method"], info["candidate"]) == ("direct", candidate), info
        if opt_out:
            assert info["self"]["ipv6"] is None
        else:  # the punch left from the IPv6 endpoint we announced
            assert info["self"]["ipv6"] == info["local"] and info["local"].startswith(f"[{a.address6}]:")
    finally:
        stop(listener)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
