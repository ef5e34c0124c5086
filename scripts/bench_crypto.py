"""What the end-to-end encryption costs in bulk throughput (issue 9), against plaintext in the same run.

Two paths, each measured encrypted and in plaintext, interleaved, medians of --reps:

* loopback: two processes, one TCP connection on 127.0.0.1; encrypted = the peers' secure channel
  (``secure_streams``: TLS 1.3 between two Ed25519 keys, BIND, our TLS transport) on that connection;
* lab direct path: two lab hosts behind port-restricted NATs, each a process running a :class:`Peer`;
  a direct (punched) connection, with the TLS between the peers or with ``encrypt=False``.

The sender writes --mb MB in 256 KiB chunks and waits for the receiver's 1-byte acknowledgement; the
time from the first write to the acknowledgement gives MB/s. Prints encrypted / plaintext per path
(goal over the lab path: >= 0.5).

    python scripts/bench_crypto.py [--mb 200] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tcppunch.cli.logging import configure_logging
from tcppunch.lab import Lab, LabSpec, NatType, RouterSpec, SynPolicy
from tcppunch.labrun import COORDINATOR, TOKEN, LabRunner
from tcppunch.peer import Method, Peer, RelayMode
from tcppunch.session.identity import Identity
from tcppunch.session.secure import ChannelSpec, secure_streams

CHUNK = 256 * 1024
HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------------- both ends


async def _send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, total: int) -> float:
    """Seconds from the first byte written to the receiver's acknowledgement."""
    chunk = os.urandom(CHUNK)
    started = time.perf_counter()
    sent = 0
    while sent < total:
        writer.write(chunk[: total - sent])
        sent += min(CHUNK, total - sent)
        await writer.drain()
    await reader.readexactly(1)
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed


async def _receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, total: int) -> None:
    got = 0
    while got < total:
        data = await reader.read(1 << 20)
        if not data:
            raise ConnectionError(f"ended after {got} of {total} bytes")
        got += len(data)
    writer.write(b"k")
    await writer.drain()
    writer.close()


def _spec(role: str) -> ChannelSpec:
    other = "responder" if role == "initiator" else "initiator"
    return ChannelSpec(Identity.generate(), "bench", role, role, other, lambda key: None)


async def loopback_worker(role: str, port: int, total: int, encrypt: bool) -> float:
    if role == "responder":
        listener = socket.create_server(("127.0.0.1", port))
        print("ready", flush=True)
        sock, _ = await asyncio.get_running_loop().sock_accept(listener)
        listener.close()
    else:
        sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if encrypt:
        reader, writer, _ = await secure_streams(sock, _spec(role))
    else:
        reader, writer = await asyncio.open_connection(sock=sock)
    if role == "responder":
        await _receive(reader, writer, total)
        return 0.0
    return await _send(reader, writer, total)


async def peer_worker(role: str, peer_id: str, other: str, total: int, encrypt: bool) -> float:
    async with Peer(COORDINATOR, peer_id, TOKEN, encrypt=encrypt, relay=RelayMode.NEVER) as peer:
        if role == "responder":
            print("ready", flush=True)
            conn = await peer.accept(timeout=60)
            await _receive(conn.reader, conn.writer, total)
            return 0.0
        conn = await peer.connect(other, timeout=60)
        if conn.method is not Method.DIRECT:
            raise RuntimeError(f"not direct: {conn.method}")
        return await _send(conn.reader, conn.writer, total)


# ------------------------------------------------------------------------------------- driver


def _pair(start: Callable[[list[str]], subprocess.Popen[str]],
          run: Callable[[list[str]], subprocess.CompletedProcess[str]], responder: list[str], initiator: list[str]
          ) -> float:
    """Start the responder, wait for its 'ready', run the initiator; MB/s from the initiator's report."""
    me = [sys.executable, str(HERE), "--worker"]
    resp = start([*me, *responder])
    try:
        assert resp.stdout is not None and resp.stdout.readline().strip() == "ready"
        done = run([*me, *initiator])
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        result: float = json.loads(done.stdout.strip().splitlines()[-1])["mb_per_s"]
        resp.wait(60)
        return result
    finally:
        if resp.poll() is None:
            resp.kill()
            resp.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args.worker)
    if not 1 <= args.mb <= 10_000 or not 1 <= args.reps <= 50:
        parser.error("--mb must be 1..10000 and --reps 1..50")
    configure_logging("error")
    total = args.mb * 1_000_000
    results: dict[tuple[str, bool], list[float]] = {}
    port = 40000 + os.getpid() % 20000
    for _ in range(args.reps):
        for encrypt in (True, False):
            flags = [str(total), str(int(encrypt))]
            mbs = _pair(lambda argv: subprocess.Popen(argv, stdout=subprocess.PIPE, text=True),
                        lambda argv: subprocess.run(argv, capture_output=True, text=True, timeout=300),
                        ["loop", "responder", str(port), *flags], ["loop", "initiator", str(port), *flags])
            results.setdefault(("loopback", encrypt), []).append(mbs)
            port += 1
    spec = LabSpec([RouterSpec("a", NatType.PORT_RESTRICTED, SynPolicy.DROP),
                    RouterSpec("b", NatType.PORT_RESTRICTED, SynPolicy.DROP)])
    with Lab(spec) as lab, LabRunner(lab):
        a, b = lab.host("a"), lab.host("b")
        for rep in range(args.reps):
            for encrypt in (True, False):
                ids, flags = [f"a{rep}{int(encrypt)}", f"b{rep}{int(encrypt)}"], [str(total), str(int(encrypt))]
                mbs = _pair(lambda argv: b.popen(argv, stdout=subprocess.PIPE, text=True),
                            lambda argv: a.run(argv, timeout=300),
                            ["peer", "responder", ids[1], ids[0], *flags],
                            ["peer", "initiator", ids[0], ids[1], *flags])
                results.setdefault(("lab direct", encrypt), []).append(mbs)
    print(f"{args.mb} MB one way, {args.reps} reps, medians ({time.strftime('%Y-%m-%d')})")
    print(f"{'path':<12} {'encrypted MB/s':>15} {'plaintext MB/s':>15} {'ratio':>6}")
    for path in ("loopback", "lab direct"):
        enc, plain = statistics.median(results[(path, True)]), statistics.median(results[(path, False)])
        goal = " (goal >= 0.5)" if path == "lab direct" else ""
        print(f"{path:<12} {enc:>15.1f} {plain:>15.1f} {enc / plain:>6.2f}{goal}")
    return 0


def _worker(argv: list[str]) -> int:
    configure_logging("error")  # stdout carries 'ready' and the result only
    kind, role, *rest = argv
    if kind == "loop":
        port, total, encrypt = int(rest[0]), int(rest[1]), rest[2] == "1"
        elapsed = asyncio.run(loopback_worker(role, port, total, encrypt))
    else:
        peer_id, other, total, encrypt = rest[0], rest[1], int(rest[2]), rest[3] == "1"
        elapsed = asyncio.run(peer_worker(role, peer_id, other, total, encrypt))
    if role == "initiator":
        print(json.dumps({"mb_per_s": total / 1e6 / elapsed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
