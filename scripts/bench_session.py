"""Streams on a live session against the network and a raw connection, measured in the same run.

Two hosts behind port-restricted NATs in the lab, D ms one-way delay on each WAN link (default 10). One
session between them (punched, direct), and beside it a dedicated connection over the same kind of
punched path as the reference. Prints:

* first-byte latency: open a stream with one byte in its opening frame (0-RTT), time until the echo
  arrives, over RTT_peer (a 1-byte ping-pong on the raw connection); goal <= 1.1;
* bulk: one stream's throughput over the raw connection's for the same byte count; goal >= 0.7;
* 8 x 5 MB at once vs one 40 MB stream (issue 10's "8 fetches within 1.5x one 40 MB fetch");
* fairness: 100 streams sending at once for a few seconds; the smallest share over the fair share
  (total / 100); goal >= 0.5;
* CPU cost, without the lab's link shaper: one stream of a session over a loopback TCP connection vs
  the raw loopback connection, same byte count (``--loopback-bytes``).

    python scripts/bench_session.py [--delay-ms 10] [--bytes 67108864] [--streams 100] [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import struct
import sys
import tempfile
import time
from typing import Any

from tcppunch.cli.logging import configure_logging
from tcppunch.lab import Lab, LabSpec, LinkShape, NatType, RouterSpec, SynPolicy
from tcppunch.labrun import COORDINATOR, TOKEN, LabRunner
from tcppunch.peer import Peer
from tcppunch.session.driver import MuxStream, Session
from tcppunch.wire.coord import Role
from tcppunch.wire.natreport import NatReport

CHUNK = 256 * 1024
ECHO, SINK = b"e", b"s"  # a stream's or connection's first byte says what the responder does with it


async def _serve(reader: Any, writer: Any) -> None:
    """ECHO: send back every byte; SINK: count bytes to EOF, answer the count (8 bytes)."""
    mode = await reader.readexactly(1)
    if mode == ECHO:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    else:
        total = 0
        while data := await reader.read(CHUNK):
            total += len(data)
        writer.write(struct.pack("!Q", total))
        await writer.drain()
    writer.close()


async def _responder(peer_id: str, nat: NatReport, registered: concurrent.futures.Future[None],
                     done: concurrent.futures.Future[None]) -> None:
    async with Peer(COORDINATOR, peer_id, TOKEN, nat=nat) as peer:
        tasks: set[asyncio.Task[None]] = set()

        async def accept_streams() -> None:
            while True:
                stream = await peer.accept_stream()
                task = asyncio.ensure_future(_serve(stream, stream))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        async def accept_connections() -> None:
            while True:
                conn = await peer.accept()
                task = asyncio.ensure_future(_serve(conn.reader, conn.writer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        workers = [asyncio.ensure_future(accept_streams()), asyncio.ensure_future(accept_connections())]
        registered.set_result(None)
        await asyncio.wrap_future(done)
        for worker in workers:
            worker.cancel()


async def _send_sink(reader: Any, writer: Any, size: int) -> float:
    """Send ``size`` bytes after SINK, wait for the count; seconds taken."""
    block = bytes(CHUNK)
    started = time.perf_counter()
    writer.write(SINK)
    for _ in range(size // CHUNK):
        writer.write(block)
        await writer.drain()
    writer.write_eof()
    (count,) = struct.unpack("!Q", await reader.readexactly(8))
    assert count == size // CHUNK * CHUNK, count
    return time.perf_counter() - started


async def _stream_sink(peer: Peer, target: str, size: int) -> float:
    stream = await peer.open_stream(target)
    return await _send_sink(stream, stream, size)


async def _fair_share(peer: Peer, target: str, count: int, seconds: float) -> list[int]:
    """``count`` streams send as fast as they may for ``seconds``; the bytes each one got through."""
    streams = [await peer.open_stream(target, SINK) for _ in range(count)]
    block = bytes(64 * 1024)
    stop = time.perf_counter() + seconds

    async def pump(stream: MuxStream) -> int:
        while time.perf_counter() < stop:
            stream.write(block)
            await stream.drain()
        stream.write_eof()
        (got,) = struct.unpack("!Q", await stream.readexactly(8))
        return int(got)

    return list(await asyncio.gather(*(pump(s) for s in streams)))


async def _initiator(peer_id: str, target: str, nat: NatReport, registered: concurrent.futures.Future[None],
                     args: argparse.Namespace) -> dict[str, Any]:
    await asyncio.wait_for(asyncio.wrap_future(registered), 30)
    async with Peer(COORDINATOR, peer_id, TOKEN, nat=nat) as peer:
        warm = await peer.open_stream(target, ECHO + b"w")  # sets the session up (one punch)
        await warm.readexactly(1)
        warm.close()
        (entry,) = peer.sessions()
        raw = await peer.connect(target, timeout=30)
        raw.writer.write(ECHO)
        rtts, first_bytes = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            raw.writer.write(b"p")
            await raw.writer.drain()
            await raw.reader.readexactly(1)
            rtts.append(time.perf_counter() - t)
            t = time.perf_counter()
            stream = await peer.open_stream(target, ECHO + b"x")
            await stream.readexactly(1)
            first_bytes.append(time.perf_counter() - t)
            stream.close()
        raw.close()
        raws, streams = [], []
        for _ in range(args.reps):  # alternating, medians: the shared machine's load comes and goes
            raw2 = await peer.connect(target, timeout=30)
            raws.append(await _send_sink(raw2.reader, raw2.writer, args.bytes))
            raw2.close()
            streams.append(await _stream_sink(peer, target, args.bytes))
        t_raw, t_stream = statistics.median(raws), statistics.median(streams)
        t_one_40 = await _stream_sink(peer, target, 40_000_000)
        started = time.perf_counter()
        await asyncio.gather(*(_stream_sink(peer, target, 5_000_000) for _ in range(8)))
        t_eight_5 = time.perf_counter() - started
        shares = await _fair_share(peer, target, args.streams, args.seconds)
        return {"rtt_peer": statistics.median(rtts), "first_byte": statistics.median(first_bytes),
                "t_raw": t_raw, "t_stream": t_stream, "t_one_40": t_one_40, "t_eight_5": t_eight_5,
                "shares": shares, "method": entry.to_json()["method"], "history": entry.session.describe_history()}


async def _loopback(size: int) -> tuple[float, float]:
    """Seconds to move ``size`` bytes over a raw loopback TCP connection, then over one session stream."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    raw = await asyncio.open_connection("127.0.0.1", port)
    far = await accepted.get()
    serving = asyncio.ensure_future(_serve(*far))
    t_raw = await _send_sink(raw[0], raw[1], size)
    await serving
    near = await asyncio.open_connection("127.0.0.1", port)
    far = await accepted.get()
    a, b = Session(*near, Role.INITIATOR), Session(*far, Role.RESPONDER)

    async def serve_one() -> None:
        stream = await b.accept_stream()
        await _serve(stream, stream)

    serving = asyncio.ensure_future(serve_one())
    stream = await a.open_stream()
    t_stream = await _send_sink(stream, stream, size)
    await serving
    await a.close()
    await b.wait_closed()
    server.close()
    return t_raw, t_stream


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=float, default=10.0)
    parser.add_argument("--bytes", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--loopback-bytes", type=int, default=256 * 1024 * 1024)
    parser.add_argument("--reps", type=int, default=3, help="bulk runs of each kind (medians)")
    args = parser.parse_args()
    configure_logging("error")
    # Throw-away keys and known peers for this run: every lab run has a new coordinator key, which a
    # known_peers file kept across runs would refuse as an impostor (and the user's own must stay clean).
    os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="bench-session-")
    link = LinkShape(delay_ms=args.delay_ms)
    spec = LabSpec([RouterSpec("a", NatType.PORT_RESTRICTED, SynPolicy.DROP, link=link),
                    RouterSpec("b", NatType.PORT_RESTRICTED, SynPolicy.DROP, link=link)])
    with Lab(spec) as lab, LabRunner(lab) as runner:
        a, b = lab.host("a"), lab.host("b")
        nat_a, nat_b = runner.detect(a), runner.detect(b)
        registered: concurrent.futures.Future[None] = concurrent.futures.Future()
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        responder = runner.loop(b).submit(_responder("sb", nat_b, registered, done))
        try:
            r = runner.loop(a).run(_initiator("sa", "sb", nat_a, registered, args), timeout=600)
        finally:
            done.set_result(None)
            responder.result(30)
    loops = [asyncio.run(_loopback(args.loopback_bytes)) for _ in range(args.reps)]
    t_lo_raw, t_lo_stream = statistics.median(x[0] for x in loops), statistics.median(x[1] for x in loops)
    mb = args.bytes / 1e6
    fair = sum(r["shares"]) / len(r["shares"])
    print(f"port-restricted <-> port-restricted, {args.delay_ms:g} ms one-way per WAN link "
          f"({time.strftime('%Y-%m-%d')}); session {r['method']} ({r['history']})")
    print(f"first byte on a live session: {r['first_byte'] * 1000:.1f} ms, RTT_peer {r['rtt_peer'] * 1000:.1f} ms: "
          f"ratio {r['first_byte'] / r['rtt_peer']:.2f} (goal <= 1.1)")
    print(f"bulk {mb:.0f} MB (median of {args.reps}): stream {mb / r['t_stream']:.1f} MB/s, "
          f"raw connection {mb / r['t_raw']:.1f} MB/s: "
          f"ratio {r['t_raw'] / r['t_stream']:.2f} (goal >= 0.7)")
    print(f"8 x 5 MB at once {r['t_eight_5']:.2f} s vs one 40 MB stream {r['t_one_40']:.2f} s: "
          f"ratio {r['t_eight_5'] / r['t_one_40']:.2f} (goal <= 1.5)")
    rate = sum(r["shares"]) / 1e6 / args.seconds
    print(f"{len(r['shares'])} streams for {args.seconds:g} s: {rate:.1f} MB/s in all, "
          f"smallest share {min(r['shares']) / fair:.2f} of the fair share, largest {max(r['shares']) / fair:.2f} "
          f"(goal: smallest >= 0.5)")
    lo = args.loopback_bytes / 1e6
    print(f"loopback, no shaper, {lo:.0f} MB (median of {args.reps}): stream {lo / t_lo_stream:.0f} MB/s, "
          f"raw TCP {lo / t_lo_raw:.0f} MB/s: "
          f"ratio {t_lo_raw / t_lo_stream:.2f} (the multiplexer's CPU cost in Python)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
