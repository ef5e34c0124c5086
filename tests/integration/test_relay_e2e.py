"""The relay end to end through a real coordinator: many relayed streams at once, a dying side, a
stranger with a session id but no key."""

from __future__ import annotations

import asyncio
import hashlib
import os

from tcppunch.coordinator.auth import Tokens
from tcppunch.coordinator.control import ControlChannel, CoordinatorError, open_relay
from tcppunch.coordinator.protocol import CoordinatorConfig
from tcppunch.coordinator.server import CoordinatorServer
from tcppunch.peer import ConnectFailed, Connection, Method, Peer, RelayMode
from tcppunch.session.identity import Identity

STREAMS = 100
SIZE = 1_000_000


async def _send_and_digest(conn: Connection, payload: bytes) -> bytes:
    async def send() -> None:
        conn.writer.write(payload)
        await conn.writer.drain()
        conn.writer.write_eof()

    async def receive() -> bytes:
        digest = hashlib.sha256()
        while chunk := await conn.reader.read(65536):
            digest.update(chunk)
        return digest.digest()

    _, got = await asyncio.gather(send(), receive())
    conn.close()
    return got


def test_hundred_concurrent_relayed_streams_of_1_mb() -> None:
    # 200 relay joins from one address at once: above the default per-source limits, so raised here
    config = CoordinatorConfig(max_sessions_per_peer=2 * STREAMS, max_sessions_per_pair=2 * STREAMS,
                               max_sessions_per_source_pair=2 * STREAMS,
                               max_relays_per_peer=2 * STREAMS, max_unauthenticated_per_source=4 * STREAMS)

    async def scenario() -> list[bool]:
        async with CoordinatorServer("127.0.0.1", 0, Tokens(shared="t"), config=config) as server, \
                Peer(server.address, "b", "t", detect_nat=False) as b, \
                Peer(server.address, "a", "t", detect_nat=False, relay=RelayMode.ALWAYS) as a:
            # (upload, download) per stream; each upload starts with its index, so the responder knows
            # which download belongs to it
            payloads = [(f"{i:04d}".encode() + os.urandom(SIZE), os.urandom(SIZE)) for i in range(STREAMS)]

            async def one(i: int) -> tuple[Connection, bytes]:
                conn = await a.connect("b", timeout=60)
                assert conn.method is Method.RELAY
                return conn, await _send_and_digest(conn, payloads[i][0])

            async def serve() -> dict[str, bytes]:
                # the responder side: each incoming connection echoes back the digest of what it received
                digests: dict[str, bytes] = {}

                async def handle(conn: Connection) -> None:
                    index = int((await conn.reader.readexactly(4)).decode())
                    rest_digest = hashlib.sha256()
                    while chunk := await conn.reader.read(65536):
                        rest_digest.update(chunk)
                    digests[conn.info.session_id] = rest_digest.digest()
                    conn.writer.write(payloads[index][1])
                    conn.writer.write_eof()
                    await conn.writer.drain()
                    conn.close()

                handlers = [asyncio.ensure_future(handle(await b.accept(timeout=60))) for _ in range(STREAMS)]
                await asyncio.gather(*handlers)
                return digests

            serving = asyncio.ensure_future(serve())
            results = await asyncio.gather(*(one(i) for i in range(STREAMS)))
            digests = await serving
            ok = []
            for i, (conn, got) in enumerate(results):
                ok.append(got == hashlib.sha256(payloads[i][1]).digest()
                          and digests[conn.info.session_id] == hashlib.sha256(payloads[i][0][4:]).digest())
            return ok

    assert asyncio.run(asyncio.wait_for(scenario(), 180)) == [True] * STREAMS


def test_killing_one_side_closes_its_partner_and_strangers_are_refused() -> None:
    async def scenario() -> tuple[bytes, str]:
        async with CoordinatorServer("127.0.0.1", 0, Tokens(shared="t")) as server, \
                ControlChannel(server.address, "a", "t") as a, ControlChannel(server.address, "b", "t") as b:
            order_a = await a.connect("b")
            order_b = await b.next_order(5)
            # a stranger who learned the session id and even the session key, but holds another identity key
            try:
                await open_relay(server.address, order_a.session_id, order_b.key, order_a.role.other, timeout=5,
                                 identity=Identity.generate(), verify=lambda key: None)
                refused = "accepted"
            except CoordinatorError as exc:
                refused = exc.code
            (_ra, wa), (rb, wb) = await asyncio.gather(a.open_relay(order_a), b.open_relay(order_b))
            wa.write(b"ping")
            assert await rb.readexactly(4) == b"ping"
            wa.transport.abort()  # a dies without a goodbye (RST)
            rest = await asyncio.wait_for(rb.read(), 10)  # b sees the end promptly
            wb.close()
            return rest, refused

    rest, refused = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert rest == b""
    assert refused == "relay-wrong-key"


def test_relay_limit_reaches_both_sides_at_once() -> None:
    """A relay refused for the per-peer limit: both peers hear the real reason, nobody waits 30 s."""
    config = CoordinatorConfig(max_relays_per_peer=1)

    async def scenario() -> str:
        async with CoordinatorServer("127.0.0.1", 0, Tokens(shared="t"), config=config) as server, \
                Peer(server.address, "hub", "t", detect_nat=False) as hub, \
                Peer(server.address, "first", "t", detect_nat=False, relay=RelayMode.ALWAYS) as first, \
                Peer(server.address, "second", "t", detect_nat=False, relay=RelayMode.ALWAYS) as second:
            held = await first.connect("hub")  # hub's one relay slot is now taken
            held_far = await hub.accept(timeout=10)
            try:
                await second.connect("hub", timeout=10)
            except ConnectFailed as exc:
                return str(exc)
            finally:
                held.close()
                held_far.close()
            return "connected"

    message = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert "relay-limit" in message or "relays running" in message
