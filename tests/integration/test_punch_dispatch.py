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


async def _dial(port: int, data: bytes) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
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
