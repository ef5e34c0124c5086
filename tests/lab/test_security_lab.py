"""Issue 9 across the NAT lab, with the real command-line tools:

- nothing readable on the wire: tcpdump on the lab's internet bridge during a direct and a relayed
  transfer of a known random payload finds neither the payload nor the token (and does find a
  plain-text probe sent beside them, so the search itself works);
- a wrong ``--peer-key``: the connect fails with both key ids named and a non-zero exit, and the
  listener receives none of its bytes;
- an impostor: with the shared token but another key, 'bob' cannot be registered after bob left.
"""

from __future__ import annotations

import io
import os
import secrets
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcppunch.lab import Lab, LabHost
from tcppunch.lab.lines import Tail, wait_for_line
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
    assert proc.stderr is not None
    wait_for_line(proc.stderr, "listening as", 30)
    return proc


def _connect(host: LabHost, peer_id: str, own_id: str, payload: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return host.run([*PY, "connect", peer_id, "--coordinator", COORD, "--id", own_id, *extra],
                    stdin=payload.open("rb"), stdout=subprocess.DEVNULL, capture_output=False,
                    stderr=subprocess.PIPE, timeout=120, env=token_env(TOKEN))


class Capture:
    """tcpdump on the internet bridge (inside the lab's inet namespace), started and stopped by PID; the
    packets come through a pipe (``-w -``) into memory, read by a thread."""

    def __init__(self, lab: Lab) -> None:
        # -U: every packet written at once; -B: a 64 MiB kernel buffer, so that a busy machine drops nothing
        self.proc = subprocess.Popen(["ip", "netns", "exec", lab.inet, "tcpdump", "-i", "br0", "-U", "-s", "0",
                                      "-B", "65536", "-w", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.data = bytearray()
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.proc.stderr is not None
        self.tail = Tail(io.TextIOWrapper(self.proc.stderr))
        assert self.tail.wait_for("listening on br0", 10), self.tail.text  # capturing from here on

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(1 << 16):
            with self._changed:
                self.data += chunk
                self._changed.notify_all()

    def wait_for(self, marker: bytes, timeout: float) -> bool:
        """True once ``marker`` was captured: tcpdump has passed on every packet before it."""
        with self._changed:
            return self._changed.wait_for(lambda: marker in self.data, timeout)

    def stop(self) -> tuple[bytes, str]:
        """The capture and tcpdump's own summary (it says how many packets the kernel dropped)."""
        stop(self.proc)  # SIGTERM: tcpdump flushes and exits
        assert self.tail.wait_for("dropped by kernel", 10), self.tail.text
        with self._changed:
            return bytes(self.data), self.tail.text


def _slices(data: bytes, count: int = 24, size: int = 48) -> list[bytes]:
    """Short pieces from all over ``data``: any one of them in a packet would mean plaintext."""
    step = (len(data) - size) // count
    return [data[i * step : i * step + size] for i in range(count)]


def _send_plaintext_probe(lab: Lab) -> None:
    """A plain TCP connection from a NATed host to the server carrying PROBE: the capture must show it."""
    listener = lab.server.popen(["python3", "-c", "import socket;s=socket.create_server(('198.51.100.10',9999));"
                                 "print('ready',flush=True);c,_=s.accept();c.recv(4096)"],
                                stdout=subprocess.PIPE, text=True)
    assert listener.stdout is not None
    wait_for_line(listener.stdout, "ready", 10)
    sent = lab.host("pr").run(["python3", "-c", "import socket,sys;c=socket.create_connection(('198.51.100.10',9999));"
                               f"c.sendall({PROBE!r});c.close()"], timeout=20)
    assert sent.returncode == 0, sent.stderr
    assert listener.wait(20) == 0


@pytest.mark.parametrize(("a", "b", "method"), [("seq", "pr", "direct"), ("rnda", "rndb", "relay")])
def test_nothing_readable_on_the_wire(lab: Lab, tmp_path: Path, a: str, b: str, method: str) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(2_000_000))
    received = tmp_path / "received"
    capture = Capture(lab)
    try:
        listener = _listen(lab.host(b), f"{b}-sec", received)
        done = _connect(lab.host(a), f"{b}-sec", f"{a}-sec", payload, "--peer-key", _key_id(),
                        "--report", str(tmp_path / "report.json"))
        assert done.returncode == 0, done.stderr
        assert listener.wait(60) == 0
        _send_plaintext_probe(lab)
        # the probe came last: once it is in the file, so is every packet of the transfer before it
        assert capture.wait_for(PROBE, 60), "tcpdump never wrote the plain-text probe"
    finally:
        wire, summary = capture.stop()
    assert received.read_bytes() == payload.read_bytes()
    assert f'"method": "{method}"' in (tmp_path / "report.json").read_text()
    assert "\n0 packets dropped by kernel" in "\n" + summary, summary  # nothing escaped the search
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
