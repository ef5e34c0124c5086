"""PortDispatcher: one listener, many sessions; each connection reaches the punch its HELLO names."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from tcppunch.punch import dispatch
from tcppunch.punch.dispatch import PortDispatcher
from tcppunch.punch.handshake import Handshake
from tcppunch.punch.plan import Role
from tcppunch.wire.endpoint import Endpoint


async def _dial(port: int, data: bytes, ip: str = "127.0.0.1") -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    sock.setblocking(False)
    await loop.sock_connect(sock, (ip, port))
    if data:
        await loop.sock_sendall(sock, data)
    return sock


def _hello(session: str) -> bytes:
    return Handshake(role=Role.INITIATOR, session_id=session, key=os.urandom(32), nonce=os.urandom(16)).hello()


def test_connections_are_routed_by_session_and_strangers_are_closed() -> None:
    async def scenario() -> tuple[bool, bool, bytes, int]:
        dispatcher = PortDispatcher(Endpoint("127.0.0.1", 0))
        dispatcher.start()
        try:
            qa, qb = dispatcher.register("session-a"), dispatcher.register("session-b")
            port = dispatcher.local.port
            hello_b, hello_a = _hello("session-b"), _hello("session-a")
            clients = [await _dial(port, hello_b), await _dial(port, hello_a),
                       await _dial(port, b"GET / HTTP/1.1\r\n\r\n"), await _dial(port, _hello("nobody"))]
            got_a = await asyncio.wait_for(qa.get(), 5)
            got_b = await asyncio.wait_for(qb.get(), 5)
            # the HELLO is still unread: the punch's own handshake reads it
            first_a = got_a.recv(len(hello_a))
            first_b = got_b.recv(len(hello_b))
            loop = asyncio.get_running_loop()
            closed = await asyncio.wait_for(loop.sock_recv(clients[2], 10), 5)
            await asyncio.wait_for(loop.sock_recv(clients[3], 10), 5)
            for s in [*clients, got_a, got_b]:
                s.close()
            return first_a == hello_a, first_b == hello_b, closed, dispatcher.rejected
        finally:
            await dispatcher.close()

    a, b, closed, rejected = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert a and b
    assert closed == b""
    assert rejected == 2


def test_silent_connection_is_dropped_after_the_peek_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "PEEK_TIMEOUT", 0.2)

    async def scenario() -> bytes:
        dispatcher = PortDispatcher(Endpoint("127.0.0.1", 0))
        dispatcher.start()
        try:
            silent = await _dial(dispatcher.local.port, b"")
            return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(silent, 10), 5)
        finally:
            await dispatcher.close()

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == b""


def test_one_route_table_for_the_ipv4_and_the_ipv6_listener() -> None:
    """Our IPv6 endpoint (same port) is served by the same dispatcher: a session's connections arrive on
    one queue whichever family they came in over."""

    async def scenario() -> list[str]:
        dispatcher = _dual_dispatcher()
        port = dispatcher.local.port
        dispatcher.start()
        try:
            queue = dispatcher.register("both")
            clients = [await _dial(port, _hello("both")), await _dial(port, _hello("both"), "::1")]
            got = [await asyncio.wait_for(queue.get(), 5) for _ in clients]
            families = sorted(str(s.getsockname()[0]) for s in got)
            for s in [*clients, *got]:
                s.close()
            return families
        finally:
            await dispatcher.close()

    assert asyncio.run(asyncio.wait_for(scenario(), 20)) == ["127.0.0.1", "::1"]


def _dual_dispatcher(tries: int = 5) -> PortDispatcher:
    """A dispatcher on 127.0.0.1 and ::1 with one free port number (bounded retries if ::1 has it taken)."""
    for _ in range(tries):
        with socket.socket(socket.AF_INET) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        try:
            return PortDispatcher(Endpoint("127.0.0.1", port), also=[Endpoint("::1", port)])
        except OSError:
            continue
    raise AssertionError("no port free on both 127.0.0.1 and ::1")
