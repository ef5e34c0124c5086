"""The peer API for blocking programs: an asyncio :class:`Peer` in a background thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from tcppunch.peer.peer import Peer
from tcppunch.peer.types import Connection, ConnectionInfo, RelayMode
from tcppunch.wire.coord import PeerInfo
from tcppunch.wire.endpoint import Endpoint

T = TypeVar("T")


class BlockingPeer:
    """:class:`Peer` for blocking programs: runs the asyncio peer in a background thread and hands out
    connected, blocking ``socket.socket`` objects. Each is one end of a local socket pair whose other end
    the background loop joins to the peer connection's TLS streams, so everything a socket does works
    (``shutdown(SHUT_WR)`` becomes TLS close_notify, i.e. a half-close). Options are :class:`Peer`'s.

    >>> with BlockingPeer("198.51.100.10:3478", "alice", "s3cret") as peer:
    ...     sock, info = peer.connect("bob")
    ...     sock.sendall(b"hello")
    """

    def __init__(self, coordinator: Endpoint | str, peer_id: str, token: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tcppunch-{peer_id}", daemon=True)
        self._thread.start()
        try:
            self._peer = self._call(self._start(coordinator, peer_id, token, options), timeout=None)
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _start(coordinator: Endpoint | str, peer_id: str, token: str, options: dict[str, Any]) -> Peer:
        peer = Peer(coordinator, peer_id, token, **options)
        await peer.start()
        return peer

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 120.0) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError("tcppunch: operation timed out") from None

    def __enter__(self) -> BlockingPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def observed(self) -> Endpoint:
        return self._peer.observed

    def connect(self, peer_id: str, *, relay: RelayMode | None = None, timeout: float = 60.0
                ) -> tuple[socket.socket, ConnectionInfo]:
        """A connected blocking socket to ``peer_id`` (TLS to its checked key behind it) and what is known."""
        return self._call(_bridged(self._peer.connect(peer_id, relay=relay, timeout=timeout)), timeout + 5)

    def accept(self, timeout: float | None = None) -> tuple[socket.socket, ConnectionInfo]:
        """The next connection another peer opened to us, as a blocking socket."""
        return self._call(_bridged(self._peer.accept(timeout)), None if timeout is None else timeout + 5)

    def list_peers(self, swarm: str | None = None) -> list[PeerInfo]:
        return self._call(self._peer.list_peers(swarm))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._call(self._peer.close(), timeout=10)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


_BRIDGES: set[asyncio.Task[None]] = set()


async def _bridged(opening: Awaitable[Connection]) -> tuple[socket.socket, ConnectionInfo]:
    """A blocking socket for ``opening``'s connection: a socket pair, its loop end joined to the streams."""
    conn = await opening
    mine, theirs = socket.socketpair()
    try:
        reader, writer = await asyncio.open_connection(sock=theirs)
    except BaseException:
        mine.close()
        theirs.close()
        conn.close()
        raise
    task = asyncio.get_running_loop().create_task(_join((reader, writer), (conn.reader, conn.writer)))
    _BRIDGES.add(task)
    task.add_done_callback(_BRIDGES.discard)
    mine.setblocking(True)
    return mine, conn.info


async def _join(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(256 * 1024):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()

    try:
        await asyncio.gather(copy(a[0], b[1]), copy(b[0], a[1]))
    finally:
        for _, writer in (a, b):
            writer.close()
