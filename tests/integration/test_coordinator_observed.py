"""OBSERVED: a peer behind a sequential NAT moves its public port; it can never move its address."""

from __future__ import annotations

import asyncio

from tcppunch.coordinator.auth import Tokens
from tcppunch.coordinator.control import ControlChannel
from tcppunch.coordinator.server import CoordinatorServer
from tcppunch.nat.report import MappingBehaviour, NatReport, TcpBehaviour
from tcppunch.wire.endpoint import Endpoint

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
