"""One side of a relay, and how to take a TCP connection out of an asyncio stream pair to make one.

The coordinator reads and writes its authentication messages through an asyncio ``StreamReader`` /
``StreamWriter``; the relay then needs the bare socket (for ``splice``) plus any bytes the reader had
already pulled off the socket beyond the last message. :func:`detach` does that hand-over without
closing, resetting, or reordering anything on the wire.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass


@dataclass
class RelayEnd:
    """A connected TCP socket given to the relay, which owns (and finally closes) it.

    ``pending`` holds bytes already read from this socket that must reach the other end before anything
    the relay reads later.
    """

    sock: socket.socket
    pending: bytes = b""


class DetachError(RuntimeError):
    """The stream pair cannot be handed over without losing or reordering bytes."""


def detach(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> RelayEnd:
    """Take the TCP connection out of ``reader``/``writer`` as a :class:`RelayEnd`.

    Order matters:

    1. Refuse if the transport still holds unsent bytes (they would be flushed later, interleaved with
       the relay's). A caller that has just written makes sure they are gone first with
       ``writer.transport.set_write_buffer_limits(0)`` and ``await writer.drain()``.
    2. Duplicate the file descriptor. A TCP connection is closed (FIN) only when its last descriptor is;
       the duplicate keeps it open while asyncio closes its own.
    3. ``transport.close()``: it unregisters the socket from the loop at once (asyncio reads nothing more
       into the reader after this line) and closes the original descriptor on the next loop turn. The
       selector transport never calls ``shutdown()``, so no FIN or RST is sent.
    4. Collect what the reader had buffered, with public API only: ``feed_eof()`` then ``read()``, which
       returns the buffer without suspending once EOF is set (no private ``reader._buffer``). If the
       peer had already sent EOF, the duplicate socket reads EOF again and the relay passes it on.

    The reader and writer must not be used afterwards.
    """
    transport = writer.transport
    if transport.is_closing():
        raise DetachError("the stream is already closing")
    if transport.get_extra_info("sslcontext") is not None:
        raise DetachError("cannot detach a TLS stream: its bytes are not the socket's bytes")
    if transport.get_write_buffer_size():
        raise DetachError(
            "the writer still holds unsent bytes; set_write_buffer_limits(0) and await drain() first"
        )
    transport_sock = writer.get_extra_info("socket")
    if transport_sock is None or transport_sock.type != socket.SOCK_STREAM:
        raise DetachError("the stream has no TCP socket")
    sock = transport_sock.dup()
    try:
        sock.setblocking(False)
        transport.close()
        pending = _take_buffered(reader)
    except BaseException:
        sock.close()
        raise
    return RelayEnd(sock, pending)


def _take_buffered(reader: asyncio.StreamReader) -> bytes:
    """Everything in ``reader``'s buffer, read through its public API without an event loop turn."""
    reader.feed_eof()
    read = reader.read()
    try:
        read.send(None)
    except StopIteration as done:
        data: bytes = done.value
        return data
    read.close()
    raise DetachError("the stream reader wanted to wait after EOF (another reader is active?)")
