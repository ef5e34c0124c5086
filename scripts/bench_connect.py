"""Time to connect, against the floor set by the network, measured in the same run.

Two hosts behind port-restricted NATs (or --types), D ms one-way delay on every WAN link (default 20, as
in issue 4). For each run: fresh registered peers, then time `connect()` to a verified direct
connection, and measure in the same run the round trips that bound it: RTT to the coordinator (a PING
on the control connection) and RTT between the peers (a 1-byte ping-pong over the punched connection).
Prints the median ratio  t_connect / (RTT_coord + RTT_peer), and (issue 9: connect() now includes TLS 1.3
between the peers' keys) t_connect / (1.5 (RTT_coord + RTT_peer) + RTT_peer), goal <= 1; --plaintext
measures the same without the TLS (a reference only). The floor is about RTT_coord + 1.5 RTT_peer
(CONNECT->PUNCH, then the SYNs cross, then HELLO/SELECT), so a ratio of about 1.25 is the best possible.
--same-peers keeps one pair of peers for all runs (--gap seconds apart): every connect after the first
relies on what the previous session left behind (behind a sequential NAT: the refreshed port prediction).

    python scripts/bench_connect.py [--runs 15] [--delay-ms 20] [--types port-restricted port-restricted]
                                    [--same-peers [--gap 0.5]] [--plaintext]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import sys
import time

from tcppunch.cli.logging import configure_logging
from tcppunch.lab import Lab, LabSpec, LinkShape, NatType, RouterSpec, SynPolicy
from tcppunch.labrun import COORDINATOR, TOKEN, LabRunner
from tcppunch.peer import Connection, Method, Peer
from tcppunch.wire.natreport import NatReport

Row = tuple[float, float, float, Method]
ENCRYPT = True  # --plaintext: both peers skip the TLS between them (a reference for its cost; never for use)


async def _responder(peer_id: str, nat: NatReport, registered: concurrent.futures.Future[None],
                     connections: int = 1) -> float:
    async with Peer(COORDINATOR, peer_id, TOKEN, nat=nat, encrypt=ENCRYPT) as peer:
        registered.set_result(None)
        for _ in range(connections):
            conn = await peer.accept(timeout=30)
            for _ in range(5):  # echo the initiator's pings
                conn.writer.write(await conn.reader.readexactly(1))
                await conn.writer.drain()
            conn.close()
        return 0.0


async def _initiator(peer_id: str, target: str, nat: NatReport, registered: concurrent.futures.Future[None],
                     runs: int = 1, gap: float = 0.0) -> list[Row]:
    await asyncio.wait_for(asyncio.wrap_future(registered), 30)
    rows = []
    async with Peer(COORDINATOR, peer_id, TOKEN, nat=nat, encrypt=ENCRYPT) as peer:
        for n in range(runs):
            if n:
                await asyncio.sleep(gap)  # the pause between two sessions of a user
            rows.append(await _one_connect(peer, target))
    return rows


async def _one_connect(peer: Peer, target: str) -> Row:
    rtt_coord = min([await peer.ping() for _ in range(3)])
    loop = asyncio.get_running_loop()
    started = loop.time()
    conn: Connection = await peer.connect(target, timeout=30)
    t_connect = loop.time() - started
    rtts = []
    for _ in range(5):
        t = loop.time()
        conn.writer.write(b"p")
        await conn.writer.drain()
        await conn.reader.readexactly(1)
        rtts.append(loop.time() - t)
    conn.close()
    return t_connect, rtt_coord, min(rtts), conn.method


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--policy", choices=[p.value for p in SynPolicy], default="drop")
    parser.add_argument("--types", nargs=2, default=["port-restricted", "port-restricted"],
                        choices=[t.value for t in NatType])
    parser.add_argument("--same-peers", action="store_true", help="one pair of peers for all runs")
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between runs with --same-peers")
    parser.add_argument("--plaintext", action="store_true",
                        help="peers without TLS between them: the cost of the key exchange by difference")
    args = parser.parse_args()
    global ENCRYPT
    ENCRYPT = not args.plaintext
    if not 1 <= args.runs <= 1000 or not 0 <= args.gap <= 60:
        parser.error("--runs must be 1..1000 and --gap 0..60")
    configure_logging("error")
    link = LinkShape(delay_ms=args.delay_ms)
    spec = LabSpec([RouterSpec("a", NatType(args.types[0]), SynPolicy(args.policy), link=link),
                    RouterSpec("b", NatType(args.types[1]), SynPolicy(args.policy), link=link)])
    rows = []
    with Lab(spec) as lab, LabRunner(lab) as runner:
        a, b = lab.host("a"), lab.host("b")
        nat_a, nat_b = runner.detect(a), runner.detect(b)
        pairs = [(args.runs, 1)] if args.same_peers else [(1, n) for n in range(args.runs)]
        for runs, n in pairs:
            registered: concurrent.futures.Future[None] = concurrent.futures.Future()
            resp = runner.loop(b).submit(_responder(f"b{n}", nat_b, registered, runs))
            rows += runner.loop(a).run(_initiator(f"a{n}", f"b{n}", nat_a, registered, runs, args.gap),
                                       timeout=60 * runs)
            resp.result(30)
    ratios = [t / (rc + rp) for t, rc, rp, _ in rows]
    # issue 9: with the key exchange (TLS 1.3 between the peers' keys) the budget is one more RTT_peer
    secure = [t / (1.5 * (rc + rp) + rp) for t, rc, rp, _ in rows]
    print(f"{args.types[0]} -> {args.types[1]}, SYN policy {args.policy}, {args.delay_ms:g} ms one-way per WAN link, "
          f"{args.runs} runs{', one pair of peers' if args.same_peers else ''} ({time.strftime('%Y-%m-%d')})")
    print(f"{'run':>4} {'connect ms':>11} {'RTT coord':>10} {'RTT peer':>9} {'ratio':>6} {'secure':>7} method")
    for i, ((t, rc, rp, m), r, sr) in enumerate(zip(rows, ratios, secure, strict=True)):
        print(f"{i:>4} {t * 1000:>11.1f} {rc * 1000:>10.1f} {rp * 1000:>9.1f} {r:>6.2f} {sr:>7.2f} {m.value}")
    med = statistics.median(ratios)
    floor = statistics.median([(rc + 1.5 * rp) / (rc + rp) for _, rc, rp, _ in rows])
    print(f"median connect {statistics.median(r[0] for r in rows) * 1000:.1f} ms; median ratio to "
          f"(RTT_coord + RTT_peer) = {med:.2f} (goal <= 1.5; the network's floor is {floor:.2f})")
    print(f"median ratio to 1.5 x (RTT_coord + RTT_peer) + 1 RTT_peer (the key exchange's budget, issue 9) = "
          f"{statistics.median(secure):.2f} (goal <= 1.0)")
    return 0 if all(m is Method.DIRECT for *_, m in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
