"""Issue 9 across the NAT lab, with the real command-line tools:

- nothing readable on the wire: tcpdump on the lab's internet bridge during a direct and a relayed
  transfer of a known random payload finds neither the payload nor the token (and does find a
  plain-text probe sent beside them, so the search itself works);
- a wrong ``--peer-key``: the connect fails with both key ids named and a non-zero exit, and the
  listener receives none of its bytes;
- an impostor: with the shared token but another key, 'bob' cannot be registered after bob left.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcppunch.lab import Lab, LabHost
from tests.lab.lines import wait_for_line
from tests.lab.processes import COORD, PY, four_nats, lab_server, stop, token_env

pytestmark = pytest.mark.lab

TOKEN = "security-lab-" + secrets.token_hex(8)
PROBE = b"PLAINTEXT-PROBE-" + secrets.token_hex(16).encode()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(four_nats()) as the_lab, lab_server(the_lab, TOKEN):
        yield the_lab


def _key_id(identity: Path | None = None) -> str:
    extra = [] if identity is None else ["--identity", str(identity)]
    return subprocess.run([*PY, "id", *extra], capture_output=True, text=True, check=True).stdout.strip()


def _listen(host: LabHost, peer_id: str, out: Path, *extra: str) -> subprocess.Popen[str]:
    proc = host.popen([*PY, "listen", "--coordinator", COORD, "--id", peer_id, "--once", *extra],
                      stdin=subprocess.DEVNULL, stdout=out.open("wb"), stderr=subprocess.PIPE, text=True,
                      env=token_env(TOKEN))
    seen: list[str] = []
    assert proc.stderr is not None and wait_for_line(proc.stderr, "listening as", 30, seen), seen
    return proc


def _connect(host: LabHost, peer_id: str, own_id: str, payload: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return host.run([*PY, "connect", peer_id, "--coordinator", COORD, "--id", own_id, *extra],
                    stdin=payload.open("rb"), stdout=subprocess.DEVNULL, capture_output=False,
                    stderr=subprocess.PIPE, timeout=120, env=token_env(TOKEN))


class Capture:
    """tcpdump on the internet bridge (inside the lab's inet namespace), started and stopped by PID."""

    def __init__(self, lab: Lab, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(["ip", "netns", "exec", lab.inet, "tcpdump", "-i", "br0", "-U", "-s", "0",
                                      "-w", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen: list[str] = []
        assert self.proc.stderr is not None
        assert wait_for_line(self.proc.stderr, "listening on br0", 10, seen), seen  # capturing from here on

    def stop(self) -> bytes:
        stop(self.proc)  # SIGTERM: tcpdump flushes and exits
        return self.path.read_bytes()


def _slices(data: bytes, count: int = 24, size: int = 48) -> list[bytes]:
    """Short pieces from all over ``data``: any one of them in a packet would mean plaintext."""
    step = (len(data) - size) // count
    return [data[i * step : i * step + size] for i in range(count)]


def _send_plaintext_probe(lab: Lab) -> None:
    """A plain TCP connection from a NATed host to the server carrying PROBE: the capture must show it."""
    listener = lab.server.popen(["python3", "-c", "import socket;s=socket.create_server(('198.51.100.10',9999));"
                                 "print('ready',flush=True);c,_=s.accept();c.recv(4096)"],
                                stdout=subprocess.PIPE, text=True)
    assert listener.stdout is not None and wait_for_line(listener.stdout, "ready", 10, [])
    sent = lab.host("pr").run(["python3", "-c", "import socket,sys;c=socket.create_connection(('198.51.100.10',9999));"
                               f"c.sendall({PROBE!r});c.close()"], timeout=20)
    assert sent.returncode == 0, sent.stderr
    assert listener.wait(20) == 0


@pytest.mark.parametrize(("a", "b", "method"), [("seq", "pr", "direct"), ("rnda", "rndb", "relay")])
def test_nothing_readable_on_the_wire(lab: Lab, tmp_path: Path, a: str, b: str, method: str) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(2_000_000))
    received = tmp_path / "received"
    capture = Capture(lab, tmp_path / "wire.pcap")
    try:
        listener = _listen(lab.host(b), f"{b}-sec", received)
        done = _connect(lab.host(a), f"{b}-sec", f"{a}-sec", payload, "--peer-key", _key_id(),
                        "--report", str(tmp_path / "report.json"))
        assert done.returncode == 0, done.stderr
        assert listener.wait(60) == 0
        _send_plaintext_probe(lab)
    finally:
        wire = capture.stop()
    assert received.read_bytes() == payload.read_bytes()
    assert f'"method": "{method}"' in (tmp_path / "report.json").read_text()
    assert PROBE in wire  # the capture saw the traffic and the search finds plaintext
    assert TOKEN.encode() not in wire
    found = [s for s in _slices(payload.read_bytes()) if s in wire]
    assert found == [], f"{len(found)} pieces of the payload crossed the {method} path in clear"


def test_wrong_peer_key_fails_before_any_byte(lab: Lab, tmp_path: Path) -> None:
    stranger = _key_id(tmp_path / "stranger.key")  # a key bob does not hold
    received = tmp_path / "received"
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(100_000))
    listener = _listen(lab.host("pr"), "bob-wk", received)
    try:
        done = _connect(lab.host("seq"), "bob-wk", "alice-wk", payload, "--peer-key", stranger)
    finally:
        stop(listener)
    assert done.returncode == 1, done.stderr
    assert "peer-key-mismatch" in done.stderr or "expects" in done.stderr
    assert stranger in done.stderr and _key_id() in done.stderr  # both fingerprints named
    assert "Traceback" not in done.stderr
    assert received.read_bytes() == b""


def test_an_impostor_with_the_token_cannot_become_bob(lab: Lab, tmp_path: Path) -> None:
    bob_key, eve_key = tmp_path / "bob.key", tmp_path / "eve.key"
    bob = _listen(lab.host("pr"), "bob-id", tmp_path / "bob.out", "--identity", str(bob_key))
    stop(bob)  # bob leaves: his id is free, but it stays his key's
    eve = lab.host("seq").run([*PY, "listen", "--coordinator", COORD, "--id", "bob-id", "--identity", str(eve_key),
                               "--once", "--no-detect"], stdin=subprocess.DEVNULL, timeout=60, env=token_env(TOKEN))
    assert eve.returncode == 1, eve.stderr
    assert "id-owned" in eve.stderr and _key_id(bob_key) in eve.stderr
    # nobody is 'bob-id' now: a connect cannot reach the impostor
    lost = _connect(lab.host("rnda"), "bob-id", "carol-id", tmp_path / "bob.out", "--no-detect")
    assert lost.returncode == 1 and "unknown-peer" in lost.stderr
    # the real bob comes back
    again = _listen(lab.host("pr"), "bob-id", tmp_path / "bob2.out", "--identity", str(bob_key))
    stop(again)
