"""``expose`` on loopback: a real CoordinatorServer with exposed ports, an Exposer, visitors with plain
sockets; bytes checked end to end (SHA-256), PROXY headers as the local service receives them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest

from tcppunch.coordinator.auth import Tokens
from tcppunch.coordinator.control import ControlChannel, CoordinatorError
from tcppunch.coordinator.expose import ExposeConfig, PortRange
from tcppunch.coordinator.protocol import CoordinatorConfig
from tcppunch.coordinator.server import CoordinatorServer
from tcppunch.peer.coordinators import Coordinators
from tcppunch.peer.expose import Exposer, VisitorDone, keep_exposed, registered_channel
from tcppunch.wire.coord import Exposed
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.proxy_protocol import ProxyVersion, encode
from tests.loopback import free_port

TOKEN = "expose-token"
PROMPT = 20.0
Service = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _sync(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in its own event loop."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def _setup(
    service: Service, *, proxy: ProxyVersion | None = None, max_connections: int = 64, max_bytes: int | None = None
) -> AsyncIterator[tuple[CoordinatorServer, Exposer, int, list[VisitorDone]]]:
    port = free_port()
    config = CoordinatorConfig(expose=ExposeConfig(PortRange(port, port), max_connections_per_id=max_connections,
                                                   max_bytes_per_id=max_bytes))
    local = await asyncio.start_server(service, "127.0.0.1", 0)
    forward = Endpoint("127.0.0.1", local.sockets[0].getsockname()[1])
    done: list[VisitorDone] = []
    async with (local, CoordinatorServer("127.0.0.1", 0, Tokens(shared=TOKEN), config=config) as server,
                ControlChannel(server.address, "web", TOKEN) as channel):
        exposer = Exposer(channel, forward, proxy_protocol=proxy, on_done=done.append)
        serving = asyncio.ensure_future(exposer.serve())
        try:
            yield server, exposer, port, done
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving


async def _visit(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        for i in range(0, len(payload), 1 << 16):
            writer.write(payload[i : i + (1 << 16)])
            await writer.drain()
        writer.write_eof()

    _, received = await asyncio.gather(send(), reader.read())
    writer.close()
    return received


@_sync
async def test_visitors_reach_the_local_service_through_the_exposed_port() -> None:
    async with _setup(_echo) as (_, exposer, port, done):
        exposed = await exposer.expose(port)
        assert exposed.address == Endpoint("127.0.0.1", port)
        payloads = [os.urandom(1_000_000 + i) for i in range(8)]
        echoes = await asyncio.wait_for(asyncio.gather(*(_visit(port, p) for p in payloads)), PROMPT)
        assert [hashlib.sha256(e).digest() for e in echoes] == [hashlib.sha256(p).digest() for p in payloads]
        await _until(lambda: len(done) == 8)
        assert all(d.error is None for d in done) and exposer.carried == 8


async def _until(condition: Callable[[], bool], timeout: float = PROMPT) -> None:
    """Wait for ``condition`` (something another task does), checking on every loop turn, bounded."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("version", list(ProxyVersion))
@_sync
async def test_the_proxy_header_tells_the_service_the_visitors_address(version: ProxyVersion) -> None:
    heard: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.set_result(await reader.read())
        writer.close()

    async with _setup(service, proxy=version) as (_, exposer, port, _done):
        await exposer.expose(port)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        me = writer.get_extra_info("sockname")
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        writer.write_eof()
        got = await asyncio.wait_for(heard, PROMPT)
        writer.close()
    header = encode(version, Endpoint(me[0], me[1]), Endpoint("127.0.0.1", port))
    assert got == header + b"GET / HTTP/1.0\r\n\r\n"


@_sync
async def test_a_port_outside_the_range_is_refused_with_a_clear_error() -> None:
    async with _setup(_echo) as (_, exposer, port, _done):
        outside = 22 if port != 22 else 23
        with pytest.raises(CoordinatorError) as info:
            await exposer.expose(outside)
        assert info.value.code == "expose-port-refused"
        assert info.value.message == f"port {outside} is not in --expose-ports {port}"
        assert not exposer.channel.closed  # the channel goes on: the allowed port still works
        await exposer.expose(port)


@_sync
async def test_the_port_closes_when_the_exposing_peer_leaves() -> None:
    async with _setup(_echo) as (server, exposer, port, _done):
        await exposer.expose(port)
        assert await _visit(port, b"ping") == b"ping"
        await exposer.channel.close()
        await _until(lambda: not server.protocol.expose.ports)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)


@_sync
async def test_a_visitor_beyond_the_connection_limit_is_closed_and_the_others_go_on() -> None:
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        await _echo(reader, writer)

    async with _setup(slow, max_connections=1) as (_, exposer, port, _done):
        await exposer.expose(port)
        first = asyncio.ensure_future(_visit(port, b"first"))
        await _until(lambda: exposer.active == 1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), PROMPT) == b""  # closed at once, not held
        writer.close()
        release.set()
        assert await asyncio.wait_for(first, PROMPT) == b"first"



@_sync
async def test_the_port_is_exposed_again_after_the_server_restarts() -> None:
    port, coord_port = free_port(), free_port()
    dead = socket.socket()  # bound, never listening: connections to it are refused
    dead.bind(("127.0.0.1", 0))
    config = CoordinatorConfig(expose=ExposeConfig(PortRange(port, port)))
    local = await asyncio.start_server(_echo, "127.0.0.1", 0)
    forward = Endpoint("127.0.0.1", local.sockets[0].getsockname()[1])
    exposed: list[Exposed] = []
    lost: list[str] = []
    changed = asyncio.Event()

    def on_exposed(where: Exposed) -> None:
        exposed.append(where)
        changed.set()

    async def connect() -> ControlChannel:
        # a dead address first, then the server by host name: each (re)connect gets past the dead one
        coordinators = Coordinators([Endpoint("127.0.0.1", dead.getsockname()[1]), f"localhost:{coord_port}"])
        return await registered_channel(coordinators, lambda where: ControlChannel(where, "web", TOKEN),
                                        strict=True)

    async def wait_exposed(count: int) -> None:
        async with asyncio.timeout(PROMPT):
            while len(exposed) < count:
                changed.clear()
                await changed.wait()

    async with local:
        server = CoordinatorServer("127.0.0.1", coord_port, Tokens(shared=TOKEN), config=config)
        await server.start()
        keeping = asyncio.ensure_future(keep_exposed(connect, port, forward, on_exposed=on_exposed,
                                                     on_lost=lambda why, _: lost.append(why), retry_first=0.05))
        try:
            await wait_exposed(1)
            assert await _visit(port, b"before") == b"before"
            await server.stop()
            server = CoordinatorServer("127.0.0.1", coord_port, Tokens(shared=TOKEN), config=config)
            await server.start()
            await wait_exposed(2)
            assert lost and await _visit(port, b"after") == b"after"
        finally:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)
            await server.stop()
            dead.close()


@_sync
async def test_a_permanent_refusal_is_raised_not_retried() -> None:
    async with _setup(_echo) as (server, _exposer, port, _done):
        outside = 22 if port != 22 else 23

        async def connect() -> ControlChannel:
            channel = ControlChannel(server.address, "other", TOKEN)
            await channel.register()
            return channel

        with pytest.raises(CoordinatorError) as info:
            await asyncio.wait_for(keep_exposed(connect, outside, Endpoint("127.0.0.1", 9)), PROMPT)
        assert info.value.code == "expose-port-refused"


@_sync
async def test_the_byte_budget_of_an_id_cuts_its_visitors_once_used_up() -> None:
    budget = 300_000
    async with _setup(_echo, max_bytes=budget) as (server, exposer, port, _done):
        await exposer.expose(port)
        first = await asyncio.wait_for(_visit_until_cut(port, os.urandom(1_000_000)), PROMPT)
        assert first < budget  # both directions count: the echo is cut well before 1 MB came back
        # the budget is the id's, over the server's life: the next visitor is cut at once
        assert await asyncio.wait_for(_visit_until_cut(port, b"more"), PROMPT) == 0
        assert [s.reason.value for s in list(server.relay_stats)[-2:]] == ["limit", "limit"]


async def _visit_until_cut(port: int, payload: bytes) -> int:
    """Bytes echoed back before the connection ended (EOF or reset: a cut relay may reset it)."""
    try:
        return len(await _visit(port, payload))
    except ConnectionResetError:
        return 0


@_sync
async def test_a_visitor_is_closed_at_once_when_the_local_service_is_down() -> None:
    async def unused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with _setup(unused) as (server, exposer, port, done):
        exposer.forward = Endpoint("127.0.0.1", free_port())  # nothing listens there
        await exposer.expose(port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), PROMPT) == b""
        writer.close()
        # closed by the owner's join-and-close (a relay ran), not left to the server's join timeout
        await _until(lambda: len(done) == 1 and len(server.relay_stats) == 1)
        assert not server.protocol.expose.pending
        assert done[0].stats is None and done[0].error is not None and str(exposer.forward) in done[0].error
