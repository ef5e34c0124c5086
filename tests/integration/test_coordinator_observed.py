"""OBSERVED: a peer behind a sequential NAT moves its public port; it can never move its address."""

from __future__ import annotations

import asyncio
import random

from tcppunch.coordinator.auth import Tokens
from tcppunch.coordinator.control import ControlChannel
from tcppunch.coordinator.server import CoordinatorServer
from tcppunch.coordinator.stun_service import StunService, StunServiceConfig
from tcppunch.nat.tcp_tests import TcpStunConnection, mapped_endpoint
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import MappingBehaviour, NatReport, TcpBehaviour

SEQUENTIAL = NatReport(tcp=TcpBehaviour(mapping=MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT, port_delta=1))


def test_port_moves_but_address_cannot() -> None:
    async def scenario() -> tuple[Endpoint, Endpoint, Endpoint]:
        async with CoordinatorServer("127.0.0.1", 0, Tokens(shared="t")) as server:
            where = server.address
            # a sequential NAT (port_delta 1): OBSERVED may move the port within its predicted window
            async with ControlChannel(where, "mover", "t", nat=SEQUENTIAL) as mover, \
                    ControlChannel(where, "asker", "t") as asker:
                real = mover.observed
                moved = Endpoint(real.ip, real.port + 7)
                await mover.update_observed(moved)
                first = (await asker.connect("mover")).peer_observed
                await mover.update_observed(Endpoint("127.0.0.2", 22))  # somebody else's address: refused
                await mover.update_observed(Endpoint(real.ip, 22))  # its own address, an unseen port: refused
                second = (await asker.connect("mover")).peer_observed
                return moved, first, second

    moved, first, second = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert first == moved
    assert second == moved


async def _stun_and_coordinator_on_a_free_pair() -> tuple[StunService, CoordinatorServer, int]:
    """A STUN service and a coordinator (started) sharing a free pair of ports P, P+1. Both binds are
    retried (bounded): a port below the kernel's ephemeral range (32768-60999 by default) can still be
    taken by another test's listener, and either bind may be the one that finds it taken."""
    for _ in range(20):
        port = random.randrange(20000, 32000, 2)
        stun = StunService(StunServiceConfig("127.0.0.1", port, external_tcp=frozenset(
            {Endpoint("127.0.0.1", port)}), udp=False))
        try:
            await stun.start()
        except OSError:
            continue
        server = CoordinatorServer("127.0.0.1", port, Tokens(shared="t"), stun_handler=stun.serve_tcp_connection)
        try:
            await server.start()
        except OSError:
            await stun.close()
            continue
        return stun, server, port
    raise AssertionError("no free port pair in 20 tries")


def test_observed_may_name_a_port_the_servers_stun_saw() -> None:
    """Issue 9 finding 8 end to end: a peer without a sequential NAT report may move its port only to one
    the server's STUN service saw it bind from (the refresh a Peer does before OBSERVED)."""

    async def scenario() -> tuple[Endpoint, Endpoint, Endpoint]:
        stun, server, port = await _stun_and_coordinator_on_a_free_pair()
        try:
            stun.on_binding = server.stun_seen
            async with ControlChannel(server.address, "mover", "t") as mover, \
                    ControlChannel(server.address, "asker", "t") as asker:
                registered = mover.observed
                conn = await TcpStunConnection.open(Endpoint("127.0.0.1", 0), Endpoint("127.0.0.1", port + 1))
                try:
                    seen = mapped_endpoint(await conn.request(timeout=2.0))
                finally:
                    conn.close()
                await mover.update_observed(Endpoint(seen.ip, seen.port + 1))  # never seen: refused
                await mover.ping()
                first = (await asker.connect("mover")).peer_observed
                await mover.update_observed(seen)
                await mover.ping()
                second = (await asker.connect("mover")).peer_observed
                return registered, first, second
        finally:
            await server.stop()
            await stun.close()

    registered, first, second = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert first == registered
    assert second != registered and second.ip == registered.ip
