"""Issue 9's hardening findings against a real CoordinatorServer on loopback (real sockets, real clients).

Sources are told apart by loopback address: 127.0.0.1 and 127.0.0.2 are different sources to the server.
Waits are bounded; the only pacing is the slow client's own trickle, which is the behaviour under test.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from tcppunch.coordinator.protocol import CoordinatorConfig
from tcppunch.coordinator.server import CoordinatorServer
from tcppunch.wire.coord import Error, Register, Registered, decode_message, encode_message
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.framing import PREAMBLE, FrameDecoder

from .test_coordinator import TOKEN, assert_still_served, channel, run, tls_connection, until, with_server

OTHER_SOURCE = Endpoint("127.0.0.2", 0)


async def read_messages(reader: asyncio.StreamReader, count: int) -> list[object]:
    decoder, out = FrameDecoder(), []
    while len(out) < count:
        chunk = await asyncio.wait_for(reader.read(65536), 5.0)
        if not chunk:
            break
        decoder.feed(chunk)
        while (frame := decoder.next_frame()) is not None:
            out.append(decode_message(frame))
    return out


def test_idle_unauthenticated_connections_from_one_source_do_not_lock_out_another() -> None:
    """Finding 3: 300 idle sockets without a token made a real peer get server-busy."""
    config = CoordinatorConfig(handshake_timeout=30.0, max_unauthenticated_per_source=64)

    async def body(server: CoordinatorServer) -> None:
        idle: list[socket.socket] = []
        try:
            for _ in range(120):
                sock = socket.create_connection((server.address.ip, server.address.port), 5.0)
                idle.append(sock)
            # the server keeps 64 of them and refuses the rest with server-busy
            await until(lambda: len(server._links) == 64)
            refused = idle[-1]
            refused.settimeout(5.0)
            data = await asyncio.to_thread(refused.recv, 65536)
            decoder = FrameDecoder()
            decoder.feed(data)
            frame = decoder.next_frame()
            assert frame is not None and decode_message(frame) == Error(
                "server-busy", "too many unauthenticated connections from your address (limit 64)")
            async with channel(server, "alice", local=OTHER_SOURCE) as alice:
                assert alice.observed.ip == "127.0.0.2"
                await assert_still_served(alice)
        finally:
            for sock in idle:
                sock.close()

    run(with_server(body, config=config, max_connections=100))


def test_a_slow_peer_trickling_into_an_unfinished_frame_is_dropped() -> None:
    """Finding 5: a registered peer that trickles bytes into a frame that never ends (and answers no
    PING) no longer stays listed."""
    config = CoordinatorConfig(keepalive_interval=0.3, stale_after=0.5, keepalive_timeout=1.5,
                               frame_timeout=1.0, handshake_timeout=2.0)

    async def body(server: CoordinatorServer) -> None:
        reader, writer = await tls_connection(server)
        writer.write(PREAMBLE + encode_message(Register("slow", TOKEN)))
        (registered, *_) = await read_messages(reader, 1)
        assert isinstance(registered, Registered)
        trickle = struct.pack("!I", 500) + b'{"type":"list","request_id":"' + b"x" * 60
        closed_at = None
        async with channel(server, "watcher", local=OTHER_SOURCE) as watcher:
            for i, byte in enumerate(trickle):
                writer.write(bytes([byte]))
                try:
                    if await asyncio.wait_for(reader.read(65536), 0.2) == b"":
                        closed_at = i
                        break
                except TimeoutError:
                    pass
            assert closed_at is not None, "the server kept a peer that only trickled bytes"
            await until(lambda: server.protocol.registry.get("slow") is None)
            assert [p.id for p in await watcher.list_peers()] == []
        writer.close()

    run(with_server(body, config=config))


def test_a_peer_answering_pings_stays_registered_while_idle() -> None:
    """The other side of finding 5: liveness is answering PING; a quiet but healthy peer stays."""
    config = CoordinatorConfig(keepalive_interval=0.2, stale_after=0.5, keepalive_timeout=0.8)

    async def body(server: CoordinatorServer) -> None:
        async with channel(server, "quiet") as quiet:
            record = server.protocol.registry.get("quiet")
            assert record is not None
            # 6 answered pings span more than keepalive_timeout: only the answers kept it registered
            await until(lambda: record.rtt.samples >= 6)
            assert server.protocol.registry.get("quiet") is record
            await assert_still_served(quiet)

    run(with_server(body, config=config))


def test_wrong_tokens_from_one_source_are_throttled_and_another_source_registers() -> None:
    """Finding 4 over real sockets: 7,132 wrong tokens in 2 s from one address were neither throttled
    nor logged."""

    async def body(server: CoordinatorServer) -> None:
        codes = []
        for _ in range(40):
            reader, writer = await tls_connection(server)
            writer.write(PREAMBLE + encode_message(Register("alice", "guess")))
            (error, *_) = await read_messages(reader, 1)
            assert isinstance(error, Error)
            codes.append(error.code)
            writer.close()
        assert codes.count("bad-token") == CoordinatorConfig().auth_failure_burst
        assert codes[-1] == "throttled"
        async with channel(server, "alice", local=OTHER_SOURCE) as alice:
            await assert_still_served(alice)

    run(with_server(body, config=CoordinatorConfig()))
