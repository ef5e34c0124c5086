"""The session driver over real loopback TCP connections: streams both ways with SHA-256 checks,
half-close, reset, clean shutdown, a dead session's clear errors, garbage, and a path migration that
moves a running stream onto a second connection without losing, duplicating or reordering a byte."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from tcppunch.session.driver import MuxStream, Session, StreamResetError
from tcppunch.session.frames import MuxErrorCode
from tcppunch.session.mux import Multiplexer, SessionClosedError
from tcppunch.wire.coord import Role

Leg = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop (the suite does not use an asyncio pytest plugin)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


async def tcp_pair() -> tuple[Leg, Leg]:
    """Two ends of one real TCP connection on 127.0.0.1."""
    accepted: asyncio.Future[Leg] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await asyncio.open_connection("127.0.0.1", port)
    far = await asyncio.wait_for(accepted, 5)
    server.close()
    return client, far


async def session_pair(path: str = "direct") -> tuple[Session, Session, tuple[Leg, Leg]]:
    a_leg, b_leg = await tcp_pair()
    a = Session(*a_leg, Role.INITIATOR, path=path)
    b = Session(*b_leg, Role.RESPONDER, path=path)
    return a, b, (a_leg, b_leg)


async def chunks(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def send_all(stream: MuxStream, data: bytes) -> None:
    async for chunk in chunks(data):
        stream.write(chunk)
        await stream.drain()
    stream.write_eof()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@run_async
async def test_many_streams_both_ways_intact() -> None:
    a, b, _ = await session_pair()
    payloads = [os.urandom(300_000 + 7919 * i) for i in range(12)]

    async def echo_server() -> None:
        async def serve(stream: MuxStream) -> None:
            body = await stream.read()
            stream.write(hashlib.sha256(body).digest() + body[::-1])
            stream.write_eof()

        async with asyncio.TaskGroup() as group:
            for _ in payloads:
                group.create_task(serve(await b.accept_stream()))

    async def client(body: bytes) -> None:
        stream = await a.open_stream(body[:1000])  # 0-RTT: the first bytes ride with the open
        await send_all(stream, body[1000:])
        answer = await stream.read()
        assert answer[:32] == hashlib.sha256(body).digest()
        assert sha(answer[32:]) == sha(body[::-1])
        await asyncio.wait_for(stream.wait_closed(), 5)

    async with asyncio.timeout(60):
        await asyncio.gather(echo_server(), *(client(p) for p in payloads))
    await a.close()
    await b.wait_closed()


@run_async
async def test_half_close_then_answer_and_reset() -> None:
    a, b, _ = await session_pair()
    async with asyncio.timeout(20):
        stream = await a.open_stream()
        stream.write(b"question")
        stream.write_eof()
        far = await b.accept_stream()
        assert await far.read() == b"question"
        assert far.at_eof()
        with pytest.raises(ConnectionError):  # we half-closed: no more writing
            stream.write(b"more")
        far.write(b"answer after the peer's EOF")
        far.close()
        assert await stream.read() == b"answer after the peer's EOF"
        await stream.wait_closed()

        doomed = await a.open_stream(b"x")
        far = await b.accept_stream()
        far.reset(MuxErrorCode.CANCEL)
        with pytest.raises(StreamResetError, match="reset by peer: CANCEL"):
            while True:
                if not await doomed.read(10):
                    break
        ok = await a.open_stream(b"after a reset the session carries on")
        assert await (await b.accept_stream()).readexactly(36) == b"after a reset the session carries on"
        ok.close()
    await a.close()


@run_async
async def test_clean_shutdown_and_dead_session_errors() -> None:
    a, b, _ = await session_pair()
    async with asyncio.timeout(20):
        open_stream = await a.open_stream(b"hello")
        await (await b.accept_stream()).readexactly(5)
        await b.close()
        with pytest.raises(SessionClosedError, match="session ended: closed by the peer"):
            await open_stream.read()
        with pytest.raises(SessionClosedError, match="session ended: closed by the peer"):
            await a.open_stream()
        with pytest.raises(SessionClosedError):
            await a.accept_stream()
        await a.wait_closed()


@run_async
async def test_a_vanished_peer_gives_every_stream_a_clear_error() -> None:
    a, _b, (_, b_leg) = await session_pair()
    async with asyncio.timeout(20):
        stream = await a.open_stream(b"hello")
        b_leg[1].transport.abort()  # the path dies under the session (RST)
        with pytest.raises(SessionClosedError, match="session lost"):
            await stream.read()
        assert a.closed


@run_async
async def test_ping_measures_rtt() -> None:
    a, b, _ = await session_pair()
    async with asyncio.timeout(10):
        rtt = await a.ping()
        assert 0 < rtt < 5
        assert a.rtt == rtt
    await a.close()
    await b.wait_closed()


@run_async
async def test_garbage_ends_only_that_session() -> None:
    a, b, (_, b_leg) = await session_pair()
    c, d, _ = await session_pair()
    async with asyncio.timeout(20):
        stream = await a.open_stream(b"x")
        await (await b.accept_stream()).readexactly(1)
        b_leg[1].write(b"SSH-2.0-OpenSSH_9.6\r\n")  # someone else's protocol on this connection
        with pytest.raises(SessionClosedError, match="bad version byte 0x53"):
            await stream.read()
        # the other session is untouched
        other = await c.open_stream(b"still here")
        assert await (await d.accept_stream()).readexactly(10) == b"still here"
        other.close()
    await c.close()


@run_async
async def test_keepalive_notices_a_silent_peer() -> None:
    a_leg, b_leg = await tcp_pair()

    loop = asyncio.get_running_loop()
    mux = Multiplexer(Role.INITIATOR, loop.time(), keepalive_interval=0.2, keepalive_timeout=0.3)
    a = Session(*a_leg, Role.INITIATOR, mux=mux)
    # the far end is a connection nobody reads or answers: a path that silently died
    async with asyncio.timeout(10):
        with pytest.raises(SessionClosedError, match="keepalive ping unanswered"):
            await a.accept_stream()
    b_leg[1].close()


@pytest.mark.parametrize("size", [16 * 1024 * 1024])
@run_async
async def test_migration_keeps_every_byte_in_order(size: int) -> None:
    """A stream each way runs on the 'relay' path; mid-transfer both sides move to a second TCP
    connection ('direct'); both SHA-256 digests match and the first connection is closed."""
    a, b, (a_relay, b_relay) = await session_pair(path="relay")
    up = os.urandom(size)
    down = os.urandom(size // 2)
    a_direct, b_direct = await tcp_pair()

    async def sender_a() -> str:
        stream = await a.open_stream()
        reader = asyncio.ensure_future(stream.read())
        await send_all(stream, up)
        return sha(await reader)

    async def side_b() -> str:
        stream = await b.accept_stream()
        writer = asyncio.ensure_future(send_all(stream, down))
        got = hashlib.sha256()
        total = 0
        migrated = False
        while chunk := await stream.read(65536):
            got.update(chunk)
            total += len(chunk)
            if not migrated and total > size // 3:
                migrated = True  # switch while bytes are in flight in both directions
                await asyncio.gather(a.migrate(*a_direct, "direct"), b.migrate(*b_direct, "direct"))
        await writer
        return got.hexdigest()

    async with asyncio.timeout(120):
        down_digest, up_digest = await asyncio.gather(sender_a(), side_b())
    assert up_digest == sha(up)
    assert down_digest == sha(down)
    for session in (a, b):
        assert session.path == "direct"
        assert session.describe_history().startswith("relay → direct at ")
    async with asyncio.timeout(10):
        assert await a_relay[0].read() == b""  # the old path was closed by both sides
        assert await b_relay[0].read() == b""
    await a.close()
    await b.wait_closed()


@run_async
async def test_a_switch_without_a_new_path_here_ends_the_session_clearly() -> None:
    a_leg, b_leg = await tcp_pair()
    a = Session(*a_leg, Role.INITIATOR, path="relay")
    b = Session(*b_leg, Role.RESPONDER, path="relay", switch_timeout=0.5)
    a_direct, _b_direct = await tcp_pair()
    async with asyncio.timeout(20):
        stream = await a.open_stream(b"before")
        far = await b.accept_stream()
        assert await far.readexactly(6) == b"before"
        await a.migrate(*a_direct, "direct")  # b never takes its end of the new path
        with pytest.raises(SessionClosedError, match="switched paths but no new path arrived"):
            await far.read()
        with pytest.raises(SessionClosedError, match="peer ended the session"):
            await stream.read()
