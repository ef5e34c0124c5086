"""One listener for many concurrent punches on one port.

Two listening sockets bound to the same port with SO_REUSEPORT split incoming connections between them
by hash, so a peer that runs several punches at once from its one punch port (a swarm client) would see
connections land in the wrong punch and be rejected. The dispatcher owns the port's only listener,
peeks at the first bytes of every accepted connection (the HELLO carries a tag of its session, see
:mod:`tcppunch.punch.handshake`) without consuming them, and hands the socket to that session's punch.
Connections that say nothing in time, or name no running session, are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence

import structlog

from tcppunch.nat.sockets import endpoint_of
from tcppunch.punch.handshake import MAGIC_HELLO, TAG_SIZE, session_tag
from tcppunch.punch.sockets import close_quietly, reuse_listener
from tcppunch.wire.endpoint import Endpoint

_log = structlog.get_logger(__name__)

_HEADER = len(MAGIC_HELLO) + 1 + TAG_SIZE  # magic, role byte, session tag
PEEK_TIMEOUT = 3.0
MAX_UNIDENTIFIED = 64


class PortDispatcher:
    """Accepts on ``local`` (and on the ``also`` endpoints, e.g. our IPv6 address with the same port) and
    routes each connection to the punch whose session its HELLO names."""

    def __init__(self, local: Endpoint, *, backlog: int = 64, also: Sequence[Endpoint] = ()) -> None:
        self.listener = reuse_listener(local, backlog)
        self.listeners = [self.listener]
        try:
            self.listeners += [reuse_listener(extra, backlog) for extra in also]
        except BaseException:
            for listener in self.listeners:
                listener.close()
            raise
        for listener in self.listeners:
            listener.setblocking(False)
        self.local = endpoint_of(self.listener.getsockname())
        self._routes: dict[bytes, asyncio.Queue[socket.socket]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._identifying: set[asyncio.Task[None]] = set()
        self.rejected = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._accept_loop(listener)) for listener in self.listeners]

    def register(self, session_id: str) -> asyncio.Queue[socket.socket]:
        """The queue on which connections for ``session_id`` arrive (pass it to ``punch(inbound=...)``)."""
        queue: asyncio.Queue[socket.socket] = asyncio.Queue()
        self._routes[session_tag(session_id)] = queue
        return queue

    def unregister(self, session_id: str) -> None:
        queue = self._routes.pop(session_tag(session_id), None)
        while queue is not None and not queue.empty():
            close_quietly(queue.get_nowait())

    async def close(self) -> None:
        for task in [*self._tasks, *self._identifying]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for listener in self.listeners:
            listener.close()
        for session_tag_ in list(self._routes):
            queue = self._routes.pop(session_tag_)
            while not queue.empty():
                close_quietly(queue.get_nowait())

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and the like: note it, keep serving
                _log.warning("dispatch.accept_error", error=str(exc))
                await asyncio.sleep(0.05)
                continue
            if len(self._identifying) >= MAX_UNIDENTIFIED:
                self.rejected += 1
                close_quietly(conn)
                continue
            task = loop.create_task(self._identify(conn))
            self._identifying.add(task)
            task.add_done_callback(self._identifying.discard)

    async def _identify(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            async with asyncio.timeout(PEEK_TIMEOUT):
                header = await _peek(conn, _HEADER)
        except (TimeoutError, OSError):
            header = b""
        queue = self._routes.get(header[len(MAGIC_HELLO) + 1 :]) if header.startswith(MAGIC_HELLO) else None
        if queue is None:
            self.rejected += 1
            _log.debug("dispatch.unrouted", remote=_peer_name(conn), header=header.hex())
            close_quietly(conn)
            return
        queue.put_nowait(conn)


async def _peek(conn: socket.socket, size: int) -> bytes:
    """The first ``size`` bytes of ``conn`` without consuming them (fewer if the peer closes first)."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()
    loop.add_reader(conn.fileno(), lambda: None if readable.done() else readable.set_result(None))
    try:
        await readable
    finally:
        loop.remove_reader(conn.fileno())
    data = b""
    # A HELLO comes in one segment; should its header arrive in pieces, peeked bytes keep the socket
    # readable, so look again a little later (bounded; the caller's time-out applies as well).
    for _ in range(300):
        data = conn.recv(size, socket.MSG_PEEK)
        if len(data) >= size or not data:
            return data
        await asyncio.sleep(0.01)
    return data


def _peer_name(conn: socket.socket) -> str:
    try:
        return str(endpoint_of(conn.getpeername()))
    except OSError:
        return "?"
