"""CoordinatorServer + ControlChannel on loopback: the whole control path, misbehaving clients, the relay.

Every test runs its own server on 127.0.0.1 (port 0) in-process. Waits are on events or on conditions
polled with a bounded deadline, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from tcppunch.coordinator.auth import Tokens
from tcppunch.coordinator.control import (
    ControlChannel,
    CoordinatorError,
    PunchOrder,
    control_socket,
    open_relay,
)
from tcppunch.coordinator.protocol import CoordinatorConfig
from tcppunch.coordinator.server import CoordinatorServer
from tcppunch.session.identity import Identity
from tcppunch.session.secure import TlsEngine, context, engine_handshake, engine_recv, engine_send, engine_unwrap
from tcppunch.wire.coord import (
    Error,
    Message,
    Outcome,
    Register,
    Relay,
    RelayOk,
    Role,
    decode_message,
    encode_message,
    relay_proof,
)
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.framing import PREAMBLE, FrameDecoder, encode_frame
from tcppunch.wire.natreport import MappingBehaviour, NatReport, TcpBehaviour

T = TypeVar("T")
TOKEN = "s3cret"
CONFIG = CoordinatorConfig(
    keepalive_interval=0.2,
    stale_after=0.6,
    keepalive_timeout=5.0,
    handshake_timeout=0.5,
    punch_window=2.0,
    relay_window=10.0,
)
LOOPBACK = Endpoint("127.0.0.1", 0)


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition, polling, with a bounded deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def with_server(
    body: Callable[[CoordinatorServer], Awaitable[T]],
    *,
    config: CoordinatorConfig = CONFIG,
    tokens: Tokens | None = None,
    **kw: Any,
) -> T:
    server = CoordinatorServer("127.0.0.1", 0, tokens or Tokens(shared=TOKEN), config=config, **kw)
    async with server:
        return await body(server)


async def tls_connection(server: CoordinatorServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A hand-made client connection as the coordinator requires: TLS with this user's peer key."""
    return await asyncio.open_connection(server.address.ip, server.address.port, server_hostname="",
                                         ssl=context(Identity.load(), server_side=False))


def channel(server: CoordinatorServer, peer_id: str, token: str = TOKEN, **kw: Any) -> ControlChannel:
    kw.setdefault("local", LOOPBACK)
    return ControlChannel(server.address, peer_id, token, **kw)


async def raw_session(server: CoordinatorServer, data: bytes, *, half_close: bool = False) -> list[Message]:
    """Send ``data`` on a new connection and collect every message until the server closes."""
    reader, writer = await asyncio.open_connection(server.address.ip, server.address.port)
    writer.write(data)
    if half_close:
        writer.write_eof()
    decoder = FrameDecoder()
    messages: list[Message] = []
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 5.0):
            decoder.feed(chunk)
            while (frame := decoder.next_frame()) is not None:
                messages.append(decode_message(frame))
    finally:
        writer.close()
    return messages


async def assert_still_served(alice: ControlChannel) -> None:
    """A well-behaved peer keeps its round trips (PING/PONG) working."""
    assert await alice.ping() >= 0


def only_error(messages: list[Message]) -> Error:
    errors = [m for m in messages if isinstance(m, Error)]
    assert len(errors) == 1, messages
    return errors[0]


# ------------------------------------------------------------------------------------ happy path


def test_register_list_connect_gives_both_peers_matching_orders() -> None:
    nat = NatReport(tcp=TcpBehaviour(mapping=MappingBehaviour.ENDPOINT_INDEPENDENT), verdict="cone")

    async def body(server: CoordinatorServer) -> None:
        async with channel(server, "alice", nat=nat) as alice, channel(
            server, "bob", private=(Endpoint("10.0.2.2", 7000),)
        ) as bob:
            assert alice.registration is not None and bob.registration is not None
            # on loopback there is no NAT: the coordinator sees exactly the bound port
            assert alice.observed == alice.registration.local
            assert alice.registration.local.port != 0
            peers = await alice.list_peers()
            assert [p.id for p in peers] == ["bob"]
            assert [p.id for p in await bob.list_peers()] == ["alice"]
            assert (await bob.list_peers())[0].verdict == "cone"

            mine = await alice.connect("bob")
            theirs = await bob.next_order(timeout=5.0)
            assert mine.session_id == theirs.session_id and mine.key == theirs.key
            assert (mine.role, theirs.role) == (Role.INITIATOR, Role.RESPONDER)
            assert mine.peer_observed == bob.observed and theirs.peer_observed == alice.observed
            assert mine.peer_private == (Endpoint("10.0.2.2", 7000),)
            assert theirs.peer_nat == nat
            assert mine.relay == theirs.relay == server.address
            for order in (mine, theirs):
                assert order.received_at <= order.fire_at < order.deadline
            await alice.report_result(mine.session_id, Outcome.DIRECT, {"attempts": 1})
            await until(lambda: server.protocol.stats.results.get("direct") == 1)

    run(with_server(body))


def test_rtt_is_kept_continuously_by_keepalives() -> None:
    async def body(server: CoordinatorServer) -> None:
        async with channel(server, "alice"):
            await until(lambda: _samples(server, "alice") >= 3)

    run(with_server(body))


def _samples(server: CoordinatorServer, peer_id: str) -> int:
    record = server.protocol.registry.get(peer_id)
    return 0 if record is None else record.rtt.samples


def test_the_control_port_can_be_shared_by_the_punch() -> None:
    async def body(server: CoordinatorServer) -> None:
        async with channel(server, "alice") as alice:
            assert alice.registration is not None
            local = alice.registration.local
            # the punch engine binds the very same port again (SO_REUSEPORT) and listens on it
            sock = control_socket(local)
            try:
                sock.listen(1)
                assert sock.getsockname()[1] == local.port
            finally:
                sock.close()

    run(with_server(body))


def test_incoming_orders_iterator_and_cancel_when_the_peer_leaves() -> None:
    async def body(server: CoordinatorServer) -> None:
        async with channel(server, "alice") as alice:
            bob = channel(server, "bob")
            await bob.register()
            order = await bob.connect("alice")
            incoming: list[PunchOrder] = []
            async for got in alice.orders():
                incoming.append(got)
                break
            assert incoming[0].session_id == order.session_id
            await bob.close()
            await asyncio.wait_for(incoming[0].cancelled.wait(), 5.0)
            assert incoming[0].cancel_reason is not None and "bob" in incoming[0].cancel_reason
            await until(lambda: server.protocol.registry.get("bob") is None)
            with pytest.raises(CoordinatorError) as info:
                await alice.connect("bob")
            assert (info.value.code, info.value.fatal) == ("unknown-peer", False)
            await assert_still_served(alice)

    run(with_server(body))


# ------------------------------------------------------------------------------------ misbehaviour


def test_wrong_token_and_taken_id_are_refused_while_others_are_served() -> None:
    async def body(server: CoordinatorServer) -> None:
        async with channel(server, "alice") as alice, channel(server, "bob") as bob:
            with pytest.raises(CoordinatorError) as info:
                await channel(server, "mallory", token="guess").register()
            assert info.value.code == "bad-token"
            with pytest.raises(CoordinatorError) as info:
                await channel(server, "bob").register()
            assert info.value.code == "id-taken"
            await assert_still_served(alice)
            order = await alice.connect("bob")
            assert (await bob.next_order(timeout=5.0)).session_id == order.session_id

    run(with_server(body))


def test_per_id_tokens_file() -> None:
    tokens = Tokens(per_id={"alice": "a-key", "bob": "b-key"})

    async def body(server: CoordinatorServer) -> None:
        async with channel(server, "alice", token="a-key"):
            with pytest.raises(CoordinatorError) as info:
                await channel(server, "bob", token="a-key").register()
            assert info.value.code == "bad-token"
            async with channel(server, "bob", token="b-key") as bob:
                assert [p.id for p in await bob.list_peers()] == ["alice"]

    run(with_server(body, tokens=tokens))


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad-preamble"),
        (b"TPUNCH\x00\x07", "unsupported-version"),
        (PREAMBLE + b"\x00\x00\x00\x05hello", "bad-frame"),
        (PREAMBLE + encode_frame({"type": "warp"}), "unknown-type"),
        (PREAMBLE + encode_frame({"type": "register", "id": "x"}), "bad-field"),
        (PREAMBLE + encode_frame({"type": "list", "request_id": "1"}), "unexpected-message"),
    ],
)
def test_garbage_gets_its_error_while_a_peer_is_served(data: bytes, code: str) -> None:
    async def body(server: CoordinatorServer) -> None:
        async with channel(server, "alice") as alice:
            error = only_error(await raw_session(server, data))
            assert (error.code, error.fatal) == (code, True)
            await assert_still_served(alice)

    run(with_server(body))


def test_oversize_frame_is_refused_and_its_error_still_arrives() -> None:
    async def body(server: CoordinatorServer) -> None:
        async with channel(server, "alice") as alice:
            # a header announcing 1 MiB, followed by 200 KB of the body the server must not buffer
            data = PREAMBLE + struct.pack("!I", 1 << 20) + os.urandom(200_000)
            error = only_error(await raw_session(server, data))
            assert error.code == "frame-too-large"
            await assert_still_served(alice)

    run(with_server(body))


def test_silent_and_half_open_clients_time_out_others_are_served() -> None:
    async def body(server: CoordinatorServer) -> None:
        async with channel(server, "alice") as alice, channel(server, "bob") as bob:
            silent = asyncio.create_task(raw_session(server, b""))
            half = asyncio.create_task(raw_session(server, PREAMBLE + b"\x00\x00"))
            # while those two hang, alice and bob get everything done
            await assert_still_served(alice)
            await alice.connect("bob")
            await bob.next_order(timeout=5.0)
            assert only_error(await silent).code == "timeout"
            assert only_error(await half).code == "timeout"
            await assert_still_served(bob)

    run(with_server(body))


def test_stale_registration_is_replaced() -> None:
    async def body(server: CoordinatorServer) -> None:
        # a "crashed" alice (same key as the new one: ids belong to keys): registered, then never
        # answers a keepalive
        reader, writer = await tls_connection(server)
        writer.write(PREAMBLE + encode_message(Register("alice", TOKEN)))
        await until(lambda: server.protocol.registry.get("alice") is not None)
        record = server.protocol.registry.get("alice")
        assert record is not None
        await until(lambda: asyncio.get_running_loop().time() - record.last_heard > CONFIG.stale_after)
        async with channel(server, "alice") as alice:
            assert alice.registration is not None
            stale = await reader.read(65536)
            decoder = FrameDecoder()
            decoder.feed(stale)
            while (frame := decoder.next_frame()) is not None:
                last = decode_message(frame)
            assert isinstance(last, Error) and last.code == "replaced"
            await assert_still_served(alice)
        writer.close()

    run(with_server(body))


def test_server_stop_tells_the_peers() -> None:
    async def main() -> None:
        server = CoordinatorServer("127.0.0.1", 0, Tokens(shared=TOKEN), config=CONFIG)
        await server.start()
        alice = channel(server, "alice")
        await alice.register()
        await server.stop()
        await asyncio.wait_for(alice.wait_closed(), 5.0)
        assert alice.error is not None and alice.error.code == "shutting-down"
        with pytest.raises(CoordinatorError):
            await alice.next_order(timeout=1.0)
        await alice.close()

    run(main())


# ------------------------------------------------------------------------------------ STUN on the same port


def test_stun_is_handed_to_the_stun_handler() -> None:
    seen: list[bytes] = []

    async def fake_stun(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, prefix: bytes) -> None:
        rest = await reader.readexactly(12)
        seen.append(prefix + rest)
        writer.write(b"stun-answer")
        writer.close()

    async def body(server: CoordinatorServer) -> None:
        async with channel(server, "alice") as alice:
            binding = bytes.fromhex("000100002112a442") + bytes(range(12))
            reader, writer = await asyncio.open_connection(server.address.ip, server.address.port)
            writer.write(binding)
            assert await asyncio.wait_for(reader.read(100), 5.0) == b"stun-answer"
            writer.close()
            assert seen == [binding]
            await assert_still_served(alice)

    run(with_server(body, stun_handler=fake_stun))


def test_real_stun_service_shares_the_port() -> None:
    from tcppunch.coordinator.stun_service import StunService, StunServiceConfig
    from tcppunch.wire.stun import StunStreamDecoder, binding_request
    from tcppunch.wire.stun import encode_message as encode_stun

    async def main() -> None:
        server = CoordinatorServer("127.0.0.1", 0, Tokens(shared=TOKEN), config=CONFIG, reuse_port=True)
        await server.start()
        port = server.address.port
        stun_config = StunServiceConfig(
            "127.0.0.1",
            port,
            udp=False,
            alternate_port=0,
            external_tcp=frozenset({Endpoint("127.0.0.1", port)}),
        )
        try:
            async with StunService(stun_config) as stun:
                server.stun_handler = stun.serve_tcp_connection
                async with channel(server, "alice") as alice:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(encode_stun(binding_request(os.urandom(12))))
                    decoder = StunStreamDecoder()
                    while (answer := decoder.next_message()) is None:
                        decoder.receive_data(await asyncio.wait_for(reader.read(4096), 5.0))
                    local = writer.get_extra_info("sockname")
                    assert answer.mapped() == Endpoint("127.0.0.1", local[1])
                    writer.close()
                    await assert_still_served(alice)
        finally:
            await server.stop()

    run(main())


# ------------------------------------------------------------------------------------ relay


async def _pair(server: CoordinatorServer) -> tuple[ControlChannel, ControlChannel, PunchOrder, PunchOrder]:
    alice, bob = channel(server, "alice"), channel(server, "bob")
    await alice.register()
    await bob.register()
    mine = await alice.connect("bob")
    theirs = await bob.next_order(timeout=5.0)
    return alice, bob, mine, theirs


def test_relay_carries_bytes_both_ways_after_pairing() -> None:
    payload = os.urandom(1 << 20)

    async def body(server: CoordinatorServer) -> None:
        alice, bob, mine, theirs = await _pair(server)
        try:
            (ra, wa), (rb, wb) = await asyncio.gather(alice.open_relay(mine), bob.open_relay(theirs))

            async def send(writer: asyncio.StreamWriter) -> None:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()

            got_b, got_a, _, _ = await asyncio.gather(rb.read(), ra.read(), send(wa), send(wb))
            assert hashlib.sha256(got_b).digest() == hashlib.sha256(payload).digest()
            assert hashlib.sha256(got_a).digest() == hashlib.sha256(payload).digest()
            wa.close()
            wb.close()
            await until(lambda: len(server.relay_stats) == 1)
            assert server.protocol.active_relays("alice") == 0
        finally:
            await alice.close()
            await bob.close()

    run(with_server(body))


def test_relay_refuses_wrong_proofs_and_third_parties() -> None:
    async def body(server: CoordinatorServer) -> None:
        alice, bob, mine, theirs = await _pair(server)
        try:
            # alice's key but a wrong proof for an existing session (does not use up her join)
            with pytest.raises(CoordinatorError) as info:
                await open_relay(mine.relay, mine.session_id, bytes(32), Role.INITIATOR, timeout=5.0,
                                 **alice.relay_credentials())
            assert info.value.code == "bad-proof"
            # an unknown session
            with pytest.raises(CoordinatorError) as info:
                await open_relay(mine.relay, "00" * 16, mine.key, Role.INITIATOR, timeout=5.0,
                                 **alice.relay_credentials())
            assert info.value.code == "unknown-session"
            # the initiator waits; a third party who even knows the session key but holds another key
            waiting = asyncio.create_task(alice.open_relay(mine))
            await until(lambda: bool(server.protocol.sessions[mine.session_id].relay_waiting))
            with pytest.raises(CoordinatorError) as info:
                await open_relay(mine.relay, mine.session_id, theirs.key, Role.RESPONDER, timeout=5.0,
                                 identity=Identity.generate(), verify=lambda key: None)
            assert info.value.code == "relay-wrong-key"
            # the rightful responder still gets through
            rb, wb = await bob.open_relay(theirs)
            ra, wa = await waiting
            wa.write(b"ping")
            assert await rb.readexactly(4) == b"ping"
            wb.write(b"pong")
            assert await ra.readexactly(4) == b"pong"
            wa.close()
            wb.close()
            await assert_still_served(alice)
        finally:
            await alice.close()
            await bob.close()

    run(with_server(body))


def test_many_peers_connect_concurrently() -> None:
    async def body(server: CoordinatorServer) -> None:
        channels = [channel(server, f"p{i:02d}") for i in range(40)]
        await asyncio.gather(*(c.register() for c in channels))
        try:
            initiators, responders = channels[:20], channels[20:]
            mine = await asyncio.gather(*(a.connect(b.peer_id) for a, b in zip(initiators, responders, strict=True)))
            theirs = await asyncio.gather(*(b.next_order(timeout=5.0) for b in responders))
            for a, b, m, t in zip(initiators, responders, mine, theirs, strict=True):
                assert (m.session_id, m.key, m.peer_id, t.peer_id) == (t.session_id, t.key, b.peer_id, a.peer_id)
                assert m.peer_observed == b.observed and t.peer_observed == a.observed
            assert len({m.session_id for m in mine}) == 20
            assert len(await channels[0].list_peers()) == 39
        finally:
            await asyncio.gather(*(c.close() for c in channels))
        await until(lambda: len(server.protocol.registry) == 0)

    run(with_server(body))


def test_relay_byte_budget_per_peer_ends_the_relay() -> None:
    async def body(server: CoordinatorServer) -> None:
        alice, bob, mine, theirs = await _pair(server)
        try:
            (_, wa), (rb, wb) = await asyncio.gather(alice.open_relay(mine), bob.open_relay(theirs))
            wa.write(os.urandom(200_000))
            got = await asyncio.wait_for(rb.read(), 10.0)  # the relay ends: EOF (or reset) for bob
            assert len(got) <= 10_000
            await until(lambda: len(server.relay_stats) == 1)
            assert server.relay_stats[0].reason == "limit"
            wa.close()
            wb.close()
        finally:
            await alice.close()
            await bob.close()

    run(with_server(body, relay_bytes_per_peer=10_000))


def test_killing_one_relay_side_closes_its_partner() -> None:
    async def body(server: CoordinatorServer) -> None:
        alice, bob, mine, theirs = await _pair(server)
        try:
            (_, wa), (rb, wb) = await asyncio.gather(alice.open_relay(mine), bob.open_relay(theirs))
            wa.write(b"hello")
            assert await rb.readexactly(5) == b"hello"
            # alice vanishes: close with SO_LINGER 0, the kernel sends a RST (a plain close would be a
            # FIN: a half-close, which the relay passes on while bob may still send)
            wa.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            wa.transport.abort()
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(rb.read(), 10.0) == b""
            await until(lambda: len(server.relay_stats) == 1)
            assert server.relay_stats[0].reason == "error"
            wb.close()
        finally:
            await alice.close()
            await bob.close()

    run(with_server(body))


def test_bytes_sent_before_relay_ok_are_delivered_first_and_in_order() -> None:
    async def body(server: CoordinatorServer) -> None:
        alice, bob, mine, theirs = await _pair(server)
        try:
            # alice's join by hand: inside its TLS, bytes after RELAY (before RELAY-OK); after leaving TLS,
            # bytes in the clear stream (where the peers' own TLS would run)
            loop = asyncio.get_running_loop()
            sock = socket.create_connection((mine.relay.ip, mine.relay.port))
            sock.setblocking(False)
            tls = TlsEngine(context(alice.identity, server_side=False), server_side=False)
            await engine_handshake(tls, sock, lambda key: None)
            proof = relay_proof(mine.key, mine.session_id, Role.INITIATOR)
            await engine_send(tls, sock, PREAMBLE + encode_message(Relay(mine.session_id, Role.INITIATOR, proof))
                              + b"early")
            await until(lambda: bool(server.protocol.sessions[mine.session_id].relay_waiting))
            await engine_send(tls, sock, b"-waiting")
            await until(lambda: server.protocol.stats.relays == 0 and _raw_waiting(server, mine.session_id) == 13)
            rb, wb = await bob.open_relay(theirs)
            # alice's connection got its RELAY-OK before anything else
            data = await engine_recv(tls, sock)
            ok = decode_message(json.loads(data[4 : 4 + struct.unpack("!I", data[:4])[0]]))
            assert ok == RelayOk(mine.session_id)
            assert await engine_unwrap(tls, sock) == b""
            await loop.sock_sendall(sock, b"-after")
            sock.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(rb.read(), 10.0) == b"early-waiting-after"
            sock.close()
            wb.close()
        finally:
            await alice.close()
            await bob.close()

    run(with_server(body))


def _raw_waiting(server: CoordinatorServer, session_id: str) -> int:
    session = server.protocol.sessions.get(session_id)
    if session is None or Role.INITIATOR not in session.relay_waiting:
        return -1
    return len(server.protocol._conns[session.relay_waiting[Role.INITIATOR]].raw)
