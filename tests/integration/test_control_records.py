"""The control channel's switch from TLS to the record layer, over real sockets on loopback: the server
keeps no TLS object for a switched peer, sessions still work end to end, a client that does not ask stays
in TLS, and a bad record ends only its own connection."""

from __future__ import annotations

import asyncio
import hashlib
import os

from tcppunch.coordinator.control import ControlChannel
from tcppunch.coordinator.server import CoordinatorServer, _Link
from tcppunch.peer import Method, Peer
from tcppunch.session.records import HEADER, TAG_SIZE

from .test_coordinator import TOKEN, channel, run, until, with_server


def _link_of(server: CoordinatorServer, peer_id: str) -> _Link:
    record = server.protocol.registry.get(peer_id)
    assert record is not None, f"{peer_id} is not registered"
    return server._links[record.conn]


def _switched(server: CoordinatorServer, peer_id: str) -> bool:
    link = _link_of(server, peer_id)
    return link.tls is None and link.records is not None


def test_registered_peers_hold_no_tls_and_a_connect_carries_bytes() -> None:
    async def body(server: CoordinatorServer) -> None:
        async with Peer(server.address, "bob", TOKEN, detect_nat=False) as bob, \
                Peer(server.address, "alice", TOKEN, detect_nat=False) as alice:
            # the switch completes when the client's close_notify arrives: wait for it, bounded
            await until(lambda: _switched(server, "alice") and _switched(server, "bob"))
            outgoing, incoming = await asyncio.gather(alice.connect("bob"), bob.accept(timeout=15))
            assert outgoing.method is incoming.method is Method.DIRECT
            data = os.urandom(1_000_000)
            outgoing.writer.write(data)
            await outgoing.writer.drain()
            outgoing.writer.write_eof()
            received = await incoming.reader.read()
            assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
            outgoing.close()
            incoming.close()
            # the control channels still work after the session: keepalives, LIST
            assert {p.id for p in await alice.list_peers()} == {"bob"}

    run(with_server(body), timeout=60)


def test_a_client_that_does_not_ask_stays_in_tls_beside_one_that_does() -> None:
    async def body(server: CoordinatorServer) -> None:
        old, new = channel(server, "old", records=False), channel(server, "new")
        await old.register()
        await new.register()
        await until(lambda: _switched(server, "new"))
        link = _link_of(server, "old")
        assert link.tls is not None and link.records is None
        assert await old.ping() > 0 and await new.ping() > 0
        order = await old.connect("new")  # frames cross between a TLS peer and a records peer
        incoming = await new.next_order(timeout=5)
        assert incoming.session_id == order.session_id and incoming.peer_id == "old"
        await old.close()
        await new.close()

    run(with_server(body))


def test_an_altered_record_ends_only_that_connection() -> None:
    async def body(server: CoordinatorServer) -> None:
        alice, mallory = channel(server, "alice"), channel(server, "mallory")
        await alice.register()
        await mallory.register()
        await until(lambda: _switched(server, "mallory"))
        assert mallory._writer is not None
        # a record of the right shape that the key did not make: authentication fails
        mallory._writer.write(HEADER.pack(TAG_SIZE + 8) + os.urandom(TAG_SIZE + 8))
        await asyncio.wait_for(mallory.wait_closed(), 5)
        await until(lambda: server.protocol.registry.get("mallory") is None)
        assert await alice.ping() > 0  # everyone else is still served
        await alice.close()

    run(with_server(body))


def test_an_oversize_record_header_ends_the_connection_before_its_body() -> None:
    async def body(server: CoordinatorServer) -> None:
        peer: ControlChannel = channel(server, "big")
        await peer.register()
        await until(lambda: _switched(server, "big"))
        assert peer._writer is not None
        peer._writer.write(HEADER.pack(65535))  # no body follows: refused from the header alone
        await asyncio.wait_for(peer.wait_closed(), 5)
        await until(lambda: server.protocol.registry.get("big") is None)

    run(with_server(body))
