"""Byte pipes for the CLI: stdin/stdout <-> a connection (netcat style), and connection <-> local service.

Both directions run at once; EOF on one side half-closes the other (``write_eof``), so a request/response
tool on top (``curl``, ``ssh``, ``tar | ...``) sees the end of input exactly where the sender ended it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import BinaryIO, Protocol

CHUNK = 64 * 1024


class StreamCutError(ConnectionError):
    """The connection ended before the other side's end of stream, or our end was not confirmed:
    bytes may be missing, so this is a failure, never a normal EOF."""


class ByteReader(Protocol):
    """What the pipes read from: an asyncio StreamReader or a session stream."""

    async def read(self, n: int = -1) -> bytes: ...


class ByteWriter(Protocol):
    """What the pipes write to: an asyncio StreamWriter or a session stream."""

    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...


async def _pump(next_chunk: Callable[[], Awaitable[bytes]], writer: ByteWriter) -> int:
    """Write chunks until an empty one (EOF), honouring back-pressure, then half-close ``writer``;
    return the byte count. A broken connection closes ``writer``."""
    total = 0
    try:
        while chunk := await next_chunk():
            writer.write(chunk)
            total += len(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()
    return total


async def copy_stream(reader: ByteReader, writer: ByteWriter) -> int:
    """Copy until EOF, honouring back-pressure, then half-close ``writer``; return the byte count."""
    return await _pump(lambda: reader.read(CHUNK), writer)


async def join_streams(
    a: tuple[ByteReader, ByteWriter],
    b: tuple[ByteReader, ByteWriter],
) -> tuple[int, int]:
    """Pipe a <-> b until both directions ended; close both; return (bytes a->b, bytes b->a)."""
    try:
        a_to_b, b_to_a = await asyncio.gather(copy_stream(a[0], b[1]), copy_stream(b[0], a[1]))
    finally:
        for _, w in (a, b):
            await _close(w)
    return a_to_b, b_to_a


async def _close(writer: ByteWriter) -> None:
    """Close and wait until closed; a connection that broke meanwhile is closed all the same."""
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


def _start_reader_thread(source: BinaryIO, queue: asyncio.Queue[bytes], loop: asyncio.AbstractEventLoop) -> None:
    """Read a blocking file (stdin) in a daemon thread into a small queue (back-pressure: the thread
    waits while the queue is full). A daemon thread, not the loop's executor: a read blocked on a
    terminal must not keep the process alive after the connection is over."""
    read = getattr(source, "read1", source.read)

    def run() -> None:
        while True:
            try:
                chunk = read(CHUNK)
            except (OSError, ValueError):
                chunk = b""
            try:
                asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()
            except RuntimeError:  # the loop is gone: nobody wants more input
                return
            if not chunk:
                return

    threading.Thread(target=run, name="stdin-reader", daemon=True).start()


async def _stdin_to(writer: ByteWriter, source: BinaryIO) -> int:
    """Copy a blocking binary file (stdin) into ``writer``, then half-close."""
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
    _start_reader_thread(source, queue, asyncio.get_running_loop())
    return await _pump(queue.get, writer)


async def _to_stdout(reader: ByteReader, sink: BinaryIO) -> int:
    total = 0
    while True:
        try:
            chunk = await reader.read(CHUNK)
        except (ConnectionError, OSError) as exc:
            raise StreamCutError(f"the stream was cut after {total} bytes received, before the peer's end: "
                                 f"{exc}") from exc
        if not chunk:
            return total
        sink.write(chunk)
        sink.flush()
        total += len(chunk)


async def pipe_stdio(
    reader: ByteReader,
    writer: ByteWriter,
    source: BinaryIO | None = None,
    sink: BinaryIO | None = None,
) -> tuple[int, int]:
    """netcat: stdin -> connection and connection -> stdout until both ended; return (sent, received)."""
    source = source or sys.stdin.buffer
    sink = sink or sys.stdout.buffer
    sending = asyncio.ensure_future(_stdin_to(writer, source))
    try:
        received = await _to_stdout(reader, sink)
        # The peer finished; whatever we still read from stdin has nowhere useful to go once it closes.
        sent = await sending
    finally:
        if not sending.done():
            sending.cancel()
        await _close(writer)
    return sent, received
