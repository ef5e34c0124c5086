"""`tcppunch listen` (the real CLI process) on loopback, fed by an embedding peer's dedicated connections:
what listen does with a connection is what it does with a session stream."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import sys
from pathlib import Path

from tcppunch.peer import Peer
from tests.loopback import loopback_coordinator

TOKEN = "listen-loopback-secret"
WITHIN_S = 30.0


async def _line(stream: asyncio.StreamReader, needle: str, seen: list[str]) -> None:
    """Read lines until one contains ``needle`` (bounded by the caller's timeout)."""
    while True:
        line = (await stream.readline()).decode(errors="replace")
        if not line:
            raise AssertionError(f"the listener ended before {needle!r}: {''.join(seen)}")
        seen.append(line)
        if needle in line:
            return


def test_netcat_listen_outlives_a_cut_connection(tmp_path: Path) -> None:
    """A dedicated connection reset mid-way is reported and the next one is served, as for streams (before,
    a cut connection ended the whole listener)."""
    payload = os.urandom(200_000)

    async def scenario() -> None:
        async with loopback_coordinator(TOKEN) as where:
            bob = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tcppunch", "listen", "--coordinator", str(where), "--id", "bob",
                "--no-detect", "--identity", str(tmp_path / "bob.key"), "--known-peers", str(tmp_path / "bob.kp"),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "TCPPUNCH_TOKEN": TOKEN})
            assert bob.stdout is not None and bob.stderr is not None
            seen: list[str] = []
            try:
                await asyncio.wait_for(_line(bob.stderr, "listening as bob", seen), WITHIN_S)
                async with Peer(where, "alice", TOKEN, detect_nat=False, known_peers=tmp_path / "alice.kp") as alice:
                    cut = await alice.connect("bob")
                    cut.writer.write(b"first")  # once bob printed it, bob is piping this connection
                    await cut.writer.drain()
                    assert await asyncio.wait_for(bob.stdout.readexactly(5), WITHIN_S) == b"first"
                    sock = cut.writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    cut.writer.transport.abort()  # an RST: bob's read fails mid-stream
                    await asyncio.wait_for(_line(bob.stderr, "the stream was cut", seen), WITHIN_S)

                    conn = await alice.connect("bob")
                    conn.writer.write(payload)
                    await conn.writer.drain()
                    received = await asyncio.wait_for(bob.stdout.readexactly(len(payload)), WITHIN_S)
                    conn.close()
                    await conn.wait_closed()
                assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
                assert bob.returncode is None, "".join(seen)
            finally:
                if bob.returncode is None:
                    bob.terminate()
                await asyncio.wait_for(bob.wait(), 10)

    asyncio.run(asyncio.wait_for(scenario(), 90))
