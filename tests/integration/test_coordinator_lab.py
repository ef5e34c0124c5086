"""The coordinator across real NAT routers (the lab): observed endpoints are the routers' mappings, PUNCH
orders drive the punch engine to a verified direct connection, and the relay joins two hosts behind
random-port symmetric NATs.

The coordinator runs in the lab server's namespace (198.51.100.10), each peer in its own host's
namespace, each on its own event loop thread (one monotonic clock, so fire times compare directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tcppunch.coordinator.auth import Tokens
from tcppunch.coordinator.control import ControlChannel, PunchOrder, punch_plan
from tcppunch.coordinator.protocol import CoordinatorConfig
from tcppunch.coordinator.server import CoordinatorServer
from tcppunch.lab import Lab, LabHost, LabSpec, LinkShape, NatType, NetnsLoop, RouterSpec, SynPolicy
from tcppunch.punch.engine import punch
from tcppunch.punch.plan import PunchFailed, PunchPlan, PunchResult
from tcppunch.wire.coord import RelayAdvice, Role
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import NatReport, TcpBehaviour

pytestmark = pytest.mark.lab

COORDINATOR = Endpoint("198.51.100.10", 3478)
TOKEN = "lab-token"
CONFIG = CoordinatorConfig(keepalive_interval=0.5, punch_window=6.0)


def ground_truth(host: LabHost) -> NatReport:
    """What ``detect`` would report for this host (taken from the lab's ground truth)."""
    nat = host.nat
    if nat is NatType.NONE:
        return NatReport(behind_nat=False)
    return NatReport(
        tcp=TcpBehaviour(mapping=nat.mapping, filtering=nat.filtering, port_delta=nat.port_delta),
        behind_nat=True,
    )


@contextlib.contextmanager
def coordinator_lab(routers: list[RouterSpec]) -> Iterator[tuple[Lab, NetnsLoop, CoordinatorServer]]:
    with Lab(LabSpec(routers)) as lab, lab.server.event_loop() as srv:

        async def start() -> CoordinatorServer:
            server = CoordinatorServer(COORDINATOR.ip, COORDINATOR.port, Tokens(shared=TOKEN), config=CONFIG)
            await server.start()
            return server

        server = srv.run(start(), timeout=10)
        try:
            yield lab, srv, server
        finally:
            srv.run(server.stop(), timeout=15)


async def _register(host: LabHost, peer_id: str) -> ControlChannel:
    channel = ControlChannel(
        COORDINATOR, peer_id, TOKEN, local=Endpoint(host.address, 0), nat=ground_truth(host)
    )
    await channel.register()
    return channel


async def _observed_by_server(server: CoordinatorServer, peer_id: str) -> Endpoint:
    record = server.protocol.registry.get(peer_id)
    assert record is not None
    return record.observed


async def _relay_stats(server: CoordinatorServer) -> Any:
    for _ in range(500):  # bounded: 5 s
        if server.relay_stats:
            return server.relay_stats[0]
        await asyncio.sleep(0.01)
    raise AssertionError("the relay did not finish")


async def _close(channel: ControlChannel) -> None:
    await channel.close()


def _plan(channel: ControlChannel, order: PunchOrder) -> PunchPlan:
    """The PunchPlan a Peer builds from a PunchOrder: punch from the control connection's own port."""
    assert channel.registration is not None
    return punch_plan(order, local=channel.registration.local, own_nat=channel.nat,
                      own_public_ip=channel.observed.ip)


async def _punch_and_exchange(channel: ControlChannel, order: PunchOrder, payload: bytes) -> tuple[Any, str]:
    try:
        result = await punch(_plan(channel, order))
    except PunchFailed as exc:
        return exc, ""
    assert result.reader is not None and result.writer is not None
    result.writer.write(payload)
    result.writer.write_eof()
    got = await result.reader.read()
    result.writer.close()
    return result, hashlib.sha256(got).hexdigest()


async def _relay_exchange(channel: ControlChannel, order: PunchOrder, payload: bytes) -> str:
    reader, writer = await channel.open_relay(order, timeout=15.0)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    got, _ = await asyncio.gather(reader.read(), send())
    writer.close()
    return hashlib.sha256(got).hexdigest()


def test_observed_endpoints_orders_and_a_direct_punch_through_real_nats() -> None:
    routers = [
        RouterSpec("a", NatType.PORT_RESTRICTED, SynPolicy.DROP),
        # DROP on the sequential side: with RST, every early SYN of the peer is answered by a RST that
        # the lab's sequential NAT counts as a new mapping, shifting the predicted port (see the report).
        RouterSpec("b", NatType.SYMMETRIC_SEQ, SynPolicy.DROP),
    ]
    with coordinator_lab(routers) as (lab, srv, server):
        a, b = lab.host("a"), lab.host("b")
        with a.event_loop() as la, b.event_loop() as lb:
            alice = la.run(_register(a, "alice"))
            bob = lb.run(_register(b, "bob"))
            try:
                for channel, host in ((alice, a), (bob, b)):
                    assert channel.registration is not None
                    assert channel.registration.local.ip == host.address
                    # the coordinator sees the router's mapping, not the private address
                    assert channel.observed.ip == host.public_address != host.address
                assert srv.run(_observed_by_server(server, "bob")) == bob.observed
                mine = la.run(alice.connect("bob"))
                theirs = lb.run(bob.next_order(timeout=5.0))
                assert (mine.session_id, mine.key) == (theirs.session_id, theirs.key)
                assert mine.peer_observed == bob.observed and theirs.peer_observed == alice.observed
                assert mine.relay_advice is RelayAdvice.PUNCH
                payload_a, payload_b = os.urandom(200_000), os.urandom(200_000)
                fa = la.submit(_punch_and_exchange(alice, mine, payload_a))
                fb = lb.submit(_punch_and_exchange(bob, theirs, payload_b))
                ra, got_a = fa.result(30)
                rb, got_b = fb.result(30)
                assert isinstance(ra, PunchResult), getattr(ra, "explanation", ra)
                assert isinstance(rb, PunchResult), getattr(rb, "explanation", rb)
                assert got_a == hashlib.sha256(payload_b).hexdigest()
                assert got_b == hashlib.sha256(payload_a).hexdigest()
            finally:
                la.run(_close(alice))
                lb.run(_close(bob))


def test_relay_joins_two_random_symmetric_nats() -> None:
    routers = [
        RouterSpec("c", NatType.SYMMETRIC_RANDOM, SynPolicy.DROP),
        RouterSpec("d", NatType.SYMMETRIC_RANDOM, SynPolicy.RST),
    ]
    with coordinator_lab(routers) as (lab, srv, server):
        c, d = lab.host("c"), lab.host("d")
        with c.event_loop() as lc, d.event_loop() as ld:
            carol = lc.run(_register(c, "carol"))
            dave = ld.run(_register(d, "dave"))
            try:
                mine = lc.run(carol.connect("dave"))
                theirs = ld.run(dave.next_order(timeout=5.0))
                assert mine.relay_advice is theirs.relay_advice is RelayAdvice.RELAY_NOW
                assert (mine.role, theirs.role) == (Role.INITIATOR, Role.RESPONDER)
                assert mine.relay == COORDINATOR
                payload_c, payload_d = os.urandom(1 << 20), os.urandom(1 << 20)
                fc = lc.submit(_relay_exchange(carol, mine, payload_c))
                fd = ld.submit(_relay_exchange(dave, theirs, payload_d))
                assert fc.result(30) == hashlib.sha256(payload_d).hexdigest()
                assert fd.result(30) == hashlib.sha256(payload_c).hexdigest()
                stats = srv.run(_relay_stats(server))
                assert stats.a_to_b == stats.b_to_a == 1 << 20
            finally:
                lc.run(_close(carol))
                ld.run(_close(dave))


# ------------------------------------------------------------------------------------------ measurement


async def _rtt_samples(server: CoordinatorServer, ids: tuple[str, ...], at_least: int) -> None:
    for _ in range(1000):  # bounded: 10 s
        records = [server.protocol.registry.get(i) for i in ids]
        if all(r is not None and r.rtt.samples >= at_least for r in records):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no RTT samples")


async def _timed_connect(channel: ControlChannel, peer_id: str) -> tuple[float, PunchOrder]:
    started = asyncio.get_running_loop().time()
    return started, await channel.connect(peer_id)


def measure(delay_a: float, delay_b: float, runs: int) -> None:
    """Print, per run: how far apart the two peers fire (the schedule's error) and connect() -> selected
    against the floor's ingredients (RTT alice-coordinator + RTT alice-bob). Not a test: no assertions
    on time."""
    routers = [
        RouterSpec("a", NatType.PORT_RESTRICTED, SynPolicy.DROP, link=LinkShape(delay_ms=delay_a)),
        RouterSpec("b", NatType.PORT_RESTRICTED, SynPolicy.DROP, link=LinkShape(delay_ms=delay_b)),
    ]
    rtt_coord, rtt_peer = 2 * delay_a / 1000, 2 * (delay_a + delay_b) / 1000
    ratios = []
    with coordinator_lab(routers) as (lab, srv, server):
        a, b = lab.host("a"), lab.host("b")
        with a.event_loop() as la, b.event_loop() as lb:
            for i in range(runs):
                alice = la.run(_register(a, "alice"))
                bob = lb.run(_register(b, "bob"))
                try:
                    srv.run(_rtt_samples(server, ("alice", "bob"), 3))
                    started, mine = la.run(_timed_connect(alice, "bob"))
                    theirs = lb.run(bob.next_order(timeout=5.0))
                    fa = la.submit(_punch_and_exchange(alice, mine, b"a"))
                    fb = lb.submit(_punch_and_exchange(bob, theirs, b"b"))
                    ra, _ = fa.result(30)
                    rb, _ = fb.result(30)
                    skew = (mine.fire_at - theirs.fire_at) * 1000
                    # what the skew would be if both fired on receipt (no schedule)
                    unscheduled = (mine.received_at - theirs.received_at) * 1000
                    if isinstance(ra, PunchResult) and isinstance(rb, PunchResult):
                        total = mine.fire_at - started + ra.timings.selected
                        ratio = total / max(rtt_coord + rtt_peer, 1e-9)
                        ratios.append(ratio)
                        to_fire = (mine.fire_at - started) * 1000
                        print(
                            f"run {i}: fire skew {skew:+6.1f} ms (on receipt: {unscheduled:+6.1f})"
                            f"  connect->fire {to_fire:6.1f} ms"
                            f"  connect->selected {total * 1000:6.1f} ms  ratio to (RTTc+RTTp) {ratio:.2f}"
                        )
                    else:
                        print(f"run {i}: fire skew {skew:+6.1f} ms (on receipt: {unscheduled:+6.1f})  punch FAILED")
                finally:
                    la.run(_close(alice))
                    lb.run(_close(bob))
                srv.run(_gone(server, ("alice", "bob")))
    if ratios:
        ratios.sort()
        print(f"median ratio {ratios[len(ratios) // 2]:.2f} over {len(ratios)} runs "
              f"(RTTc {rtt_coord * 1000:.0f} ms, RTTp {rtt_peer * 1000:.0f} ms)")


async def _gone(server: CoordinatorServer, ids: tuple[str, ...]) -> None:
    for _ in range(500):
        if all(server.protocol.registry.get(i) is None for i in ids):
            return
        await asyncio.sleep(0.01)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=measure.__doc__)
    parser.add_argument("--delay-a", type=float, default=20.0, help="one-way ms on router a's WAN link")
    parser.add_argument("--delay-b", type=float, default=20.0, help="one-way ms on router b's WAN link")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    measure(args.delay_a, args.delay_b, max(1, min(args.runs, 200)))
