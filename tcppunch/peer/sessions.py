"""One multiplexed session per pair of peers, inside the :class:`~tcppunch.peer.Peer`.

The first stream to a peer sets the session up (one punch, or the relay); every later stream rides on it
with no coordinator round trip and no punch. A dead session (the path died, keepalive gave up) fails its
streams with a clear error and is set up again by the next ``open_stream``.

Which connections carry a session: the initiator of every peer-to-peer connection sends an 8-byte
preface first (:data:`PREFACE_SESSION` or :data:`PREFACE_DEDICATED`), so that the accepting side knows
whether to run a session on it or to hand it out from ``accept()`` as a dedicated connection. A session
that started on the relay while the punch went on moves to the punched connection when it wins: the
initiator sends :data:`PREFACE_UPGRADE` on it and both sides migrate (docs/sessions.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from tcppunch.nat.sockets import endpoint_of
from tcppunch.peer.types import Connection, ConnectionInfo
from tcppunch.session.driver import MuxStream, Session
from tcppunch.session.frames import MuxErrorCode
from tcppunch.session.mux import DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT, Multiplexer, SessionClosedError

log = structlog.get_logger("tcppunch.peer")

PREFACE_SIZE = 8
PREFACE_SESSION = b"TPCONN1S"  # a multiplexed session follows
PREFACE_DEDICATED = b"TPCONN1D"  # the application's own byte stream follows
PREFACE_UPGRADE = b"TPCONN1U"  # the direct path for the session that started on this punch session's relay
PREFACE_TIMEOUT = 10.0


@dataclass
class PeerSession:
    """A live (or finished) session with one peer and how it was made."""

    peer: str
    session: Session
    info: ConnectionInfo

    def to_json(self) -> dict[str, Any]:
        """For reports: the connection's facts, plus where the session runs now and its history."""
        report = self.info.to_json()
        report["method"] = self.session.path
        for key, name in (("local", "sockname"), ("remote", "peername")):  # the current path's ends
            address = self.session.get_extra_info(name)
            if isinstance(address, tuple):
                report[key] = str(endpoint_of(address))
        report["history"] = self.session.describe_history()
        report["closed"] = self.session.closed
        if self.session.rtt is not None:
            report["rtt"] = round(self.session.rtt, 6)
        return report


class SessionPool:
    """Sessions by peer id; ``connect(peer_id)`` makes a new one (a Connection that sent the preface)."""

    def __init__(self, connect: Callable[[str], Awaitable[Connection]],
                 on_session: Callable[[PeerSession], None] | None = None, *,
                 on_lost: Callable[[PeerSession], None] | None = None,
                 keepalive: tuple[float, float] = (DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT)) -> None:
        self._connect = connect
        self._on_session = on_session
        self._on_lost = on_lost  # a session ended by an error (keepalive timeout, lost transport), not a close
        self.keepalive = keepalive  # (interval, timeout): a dead path is noticed within their sum
        self._sessions: dict[str, PeerSession] = {}  # the one new streams to that peer go on
        self._all: list[PeerSession] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._incoming: asyncio.Queue[MuxStream | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def sessions(self) -> list[PeerSession]:
        """Every session we run or ran, one per peer (the one new streams go on)."""
        return list(self._sessions.values())

    def get(self, peer_id: str) -> PeerSession | None:
        return self._sessions.get(peer_id)

    def by_connection(self, session_id: str) -> PeerSession | None:
        """The session running on the connection of punch session ``session_id``."""
        return next((e for e in self._all if e.info.session_id == session_id), None)

    async def open_stream(self, peer_id: str, data: bytes = b"") -> MuxStream:
        """A new stream to ``peer_id`` on its live session, setting one up first if there is none."""
        for attempt in (1, 2):
            current = await self.session(peer_id)
            try:
                return await current.session.open_stream(data)
            except SessionClosedError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def session(self, peer_id: str) -> PeerSession:
        """The live session with ``peer_id``; only one caller at a time sets a new one up."""
        if self._closed:
            raise SessionClosedError("the peer is closed")
        current = self._sessions.get(peer_id)
        if current is not None and not current.session.closed:
            return current
        async with self._locks.setdefault(peer_id, asyncio.Lock()):
            current = self._sessions.get(peer_id)
            if current is not None and not current.session.closed:
                return current
            return self.add(await self._connect(peer_id))

    def add(self, conn: Connection) -> PeerSession:
        """Run a session on ``conn`` (ours or one the peer opened) and serve the streams the peer opens."""
        interval, timeout = self.keepalive
        mux = Multiplexer(conn.info.role, asyncio.get_running_loop().time(), keepalive_interval=interval,
                          keepalive_timeout=timeout, measure_rtt=True)
        session = Session(conn.reader, conn.writer, conn.info.role, path=conn.info.method.value, peer=conn.peer,
                          mux=mux)
        entry = PeerSession(conn.peer, session, conn.info)
        self._all = [e for e in self._all if not e.session.closed] + [entry]
        # The newest session takes new streams: the peer set one up because it had none it trusted (ours
        # may be dead without our keepalive knowing yet). An older one keeps serving its streams; when
        # both sides opened at once, both sessions serve both directions.
        self._sessions[conn.peer] = entry
        task = asyncio.get_running_loop().create_task(self._accept_from(entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("peer.session", remote_peer=conn.peer, method=conn.info.method.value,
                 session=conn.info.session_id, role=conn.info.role.value)
        if self._on_session is not None:
            self._on_session(entry)
        return entry

    async def _accept_from(self, entry: PeerSession) -> None:
        with contextlib.suppress(SessionClosedError):
            while True:
                self._incoming.put_nowait(await entry.session.accept_stream())
        code = entry.session.close_code
        lost = code is not None and code is not MuxErrorCode.NO_ERROR
        if lost and not self._closed and self._on_lost is not None:
            self._on_lost(entry)

    async def accept_stream(self, timeout: float | None = None) -> MuxStream:
        """The next stream any peer opened to us (``stream.peer`` says who)."""
        stream = await asyncio.wait_for(self._incoming.get(), timeout)
        if stream is None:
            self._incoming.put_nowait(None)
            raise SessionClosedError("the peer is closed")
        return stream

    async def close(self) -> None:
        self._closed = True
        for entry in self._all:
            await entry.session.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._incoming.put_nowait(None)
