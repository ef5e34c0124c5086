"""detach(): a connection served through asyncio streams is handed to the relay without losing a byte.

The server side mimics the coordinator: it reads an authentication line through a StreamReader, answers
through the StreamWriter, then detaches and relays. Bytes the peer sent right behind the line (and that
the StreamReader has already pulled in) must come out first at the other end, and the connection must
survive asyncio closing its transport (no FIN, no RST).
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from tcppunch.relay import DetachError, EndReason, RelayEnd, detach, relay

PROMPT = 10.0


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
    return client, server


async def serve_one(
    handler_result: asyncio.Future[tuple[bytes, RelayEnd]],
) -> asyncio.Server:
    """A server that reads one line, answers OK, detaches, waits until asyncio closed its side."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.write(b"OK\n")
        writer.transport.set_write_buffer_limits(0)
        await writer.drain()  # with a zero high-water mark: returns once nothing is left unsent
        end = detach(reader, writer)
        await writer.wait_closed()  # the original descriptor is closed now; only the dup remains
        handler_result.set_result((line, end))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("method", ["auto", "copy"])
def test_bytes_behind_the_auth_line_go_first_and_the_connection_survives(method: str) -> None:
    async def main() -> None:
        handed: asyncio.Future[tuple[bytes, RelayEnd]] = asyncio.get_running_loop().create_future()
        server = await serve_one(handed)
        port = server.sockets[0].getsockname()[1]
        reader_a, writer_a = await asyncio.open_connection("127.0.0.1", port)
        writer_a.write(b"AUTH session-1\nEXTRA;")  # one segment: the reader buffers the tail too
        line, end_a = await asyncio.wait_for(handed, PROMPT)
        assert line == b"AUTH session-1\n"
        assert b"EXTRA;".startswith(end_a.pending)
        assert await reader_a.readexactly(3) == b"OK\n"

        client_b, server_b = tcp_pair()
        reader_b, writer_b = await asyncio.open_connection(sock=client_b)
        task = asyncio.create_task(relay(end_a, RelayEnd(server_b), method=method))  # type: ignore[arg-type]
        writer_a.write(b"after-detach")
        writer_a.write_eof()
        assert await asyncio.wait_for(reader_b.read(), PROMPT) == b"EXTRA;after-detach"
        writer_b.write(b"reply")
        writer_b.write_eof()
        # "reply" arriving after "OK\n" proves asyncio's close sent neither FIN nor RST to peer a.
        assert await asyncio.wait_for(reader_a.read(), PROMPT) == b"reply"
        stats = await asyncio.wait_for(task, PROMPT)
        assert stats.reason is EndReason.EOF
        assert (stats.a_to_b, stats.b_to_a) == (len(b"EXTRA;after-detach"), len(b"reply"))
        writer_a.close()
        writer_b.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_eof_seen_before_detach_is_passed_on() -> None:
    async def main() -> None:
        handed: asyncio.Future[tuple[bytes, RelayEnd]] = asyncio.get_running_loop().create_future()
        server = await serve_one(handed)
        port = server.sockets[0].getsockname()[1]
        reader_a, writer_a = await asyncio.open_connection("127.0.0.1", port)
        writer_a.write(b"AUTH\nlast words")
        writer_a.write_eof()
        _, end_a = await asyncio.wait_for(handed, PROMPT)
        client_b, server_b = tcp_pair()
        reader_b, writer_b = await asyncio.open_connection(sock=client_b)
        task = asyncio.create_task(relay(end_a, RelayEnd(server_b)))
        assert await asyncio.wait_for(reader_b.read(), PROMPT) == b"last words"
        writer_b.write_eof()
        assert await asyncio.wait_for(reader_a.read(), PROMPT) == b"OK\n"
        assert (await asyncio.wait_for(task, PROMPT)).reason is EndReason.EOF
        writer_a.close()
        writer_b.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_detach_refuses_while_the_writer_holds_unsent_bytes() -> None:
    async def main() -> None:
        outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(bytes(64 << 20))  # far more than the socket buffers take: most stays queued
            try:
                detach(reader, writer)
            except DetachError as exc:
                outcome.set_result(exc)
            else:
                outcome.set_result(None)
            writer.transport.abort()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        exc = await asyncio.wait_for(outcome, PROMPT)
        assert isinstance(exc, DetachError)
        assert "unsent" in str(exc)
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
