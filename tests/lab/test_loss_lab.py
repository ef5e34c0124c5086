"""30 ms and 5 % loss on every WAN link (each router's and the server's): detecting, registering and
punching survive lost SYNs (every client connection to the coordinator retries within its budget),
every pair that can go direct connects directly, and 10 MB arrive intact (SHA-256 at the receiver,
sent back and compared by the sender).

The peers are Peer API processes on the lab hosts (``tcppunch.peer``), one dedicated connection each;
then the real CLI in netcat mode (``connect`` < file, ``listen --once`` > file) carries 10 MB on a session
stream and both exit 0 only with every byte delivered (a close used to RST away the tail, exit 0 both).
Pairs: port-restricted -> restricted (both NATs keep the port) and port-restricted -> symmetric-seq
(the sender predicts the receiver's next ports). Both fell back to the relay now and then (2 of 40 and
1 of 16 runs) until the punch stopped re-sending SYNs from fresh sockets to far peers (docs/punching.md
"Loss"); since, 50 of 50 and 16 of 16 went direct.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcppunch.lab import Lab, LabSpec, LinkShape, NatType, RouterSpec, SynPolicy
from tcppunch.lab.lines import LineTimeout, wait_for_line
from tests.lab.processes import COORD, PY, lab_server, stop, token_env

TOKEN = "loss-lab-token"
LOSSY = LinkShape(delay_ms=30, loss=0.05)
SIZE = 10_000_000

PEER = """
import asyncio, hashlib, json, os, random, sys
from tcppunch.peer import Peer

async def main(role, coordinator, me, other, size):
    async with Peer(coordinator, me, os.environ["TOKEN"]) as peer:
        if role == "accept":
            print("registered", flush=True)
            conn = await peer.accept(timeout=120)
            digest, count = hashlib.sha256(), 0
            while chunk := await conn.reader.read(1 << 16):
                digest.update(chunk)
                count += len(chunk)
            conn.writer.write(digest.hexdigest().encode())
            conn.writer.write_eof()
            await conn.writer.drain()
            await conn.reader.read()
            print(json.dumps({"method": conn.method.value, "bytes": count}), flush=True)
        else:
            conn = await peer.connect(other)
            data = random.Random(size).randbytes(size)
            conn.writer.write(data)
            conn.writer.write_eof()
            await conn.writer.drain()
            echo = (await conn.reader.read()).decode()
            print(json.dumps({"method": conn.method.value, "sent": hashlib.sha256(data).hexdigest(),
                              "received": echo, "attempts": [str(a) for a in conn.info.attempts]}), flush=True)
        conn.close()

asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])), 200))
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    spec = LabSpec([RouterSpec("pr", NatType.PORT_RESTRICTED, SynPolicy.DROP, link=LOSSY),
                    RouterSpec("rc", NatType.RESTRICTED, SynPolicy.DROP, link=LOSSY),
                    RouterSpec("seq", NatType.SYMMETRIC_SEQ, SynPolicy.DROP, link=LOSSY)], server_link=LOSSY)
    with Lab(spec) as the_lab, lab_server(the_lab, TOKEN):
        yield the_lab


# One direction per pair keeps the suite's time in bounds (a 10 MB transfer at 5 % loss takes 15-25 s here).
@pytest.mark.parametrize(("a", "b"), [("pr", "rc"), ("pr", "seq")])
def test_direct_pairs_connect_directly_and_10_mb_arrive_intact(lab: Lab, a: str, b: str) -> None:
    env = {**os.environ, "TOKEN": TOKEN}
    receiver = lab.host(b).popen([sys.executable, "-c", PEER, "accept", COORD, f"{b}-r", "", str(SIZE)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert receiver.stdout is not None and receiver.stderr is not None
        try:
            wait_for_line(receiver.stdout, "registered", 90)
        except LineTimeout as exc:
            stop(receiver)
            pytest.fail(f"receiver not registered (exit {receiver.returncode}): {exc}\n"
                        f"{receiver.stderr.read()[-3000:]}")
        sender = lab.host(a).run([sys.executable, "-c", PEER, "connect", COORD, f"{a}-s", f"{b}-r", str(SIZE)],
                                 timeout=220, env=env)
        assert sender.returncode == 0, sender.stderr[-3000:]
        out, err = receiver.communicate(timeout=60)
        assert receiver.returncode == 0, err[-3000:]
    finally:
        stop(receiver)
    sent = json.loads(sender.stdout.strip().splitlines()[-1])
    got = json.loads(out.strip().splitlines()[-1])
    assert got["bytes"] == SIZE
    assert sent["received"] == sent["sent"] == hashlib.sha256(random.Random(SIZE).randbytes(SIZE)).hexdigest()
    # On a relay fallback: both peers' punch logs (their stdout), for the attempts on either side.
    assert sent["method"] == got["method"] == "direct", f"RECEIVER:\n{out}\nSENDER:\n{sender.stdout}"


def test_cli_netcat_mode_delivers_every_byte_over_lossy_links(lab: Lab, tmp_path: Path) -> None:
    """The sender's stdin ends, its session closes at once: the listener must still get all 10 MB."""
    src, dst, empty = tmp_path / "in", tmp_path / "out", tmp_path / "empty"
    src.write_bytes(os.urandom(SIZE))
    empty.write_bytes(b"")
    env = token_env(TOKEN)
    listener = lab.host("rc").popen([*PY, "listen", "--coordinator", COORD, "--id", "rc-l", "--once"],
                                    stdin=empty.open("rb"), stdout=dst.open("wb"), stderr=subprocess.PIPE,
                                    text=True, env=env)
    try:
        assert listener.stderr is not None
        wait_for_line(listener.stderr, "listening as", 90)
        sender = lab.host("pr").run([*PY, "connect", "rc-l", "--coordinator", COORD, "--id", "pr-c"],
                                    stdin=src.open("rb"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    capture_output=False, timeout=120, env=env)
        try:
            _, err = listener.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            stop(listener)
            pytest.fail(f"listener still running; sender exit {sender.returncode}: {sender.stderr[-3000:]}\n"
                        f"listener: {listener.stderr.read()[-3000:]}")
    finally:
        stop(listener)
    assert sender.returncode == 0, sender.stderr[-3000:]
    assert listener.returncode == 0, err[-3000:]
    assert dst.stat().st_size == SIZE
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
