"""The asyncio driver of the multiplexer: one :class:`Session` over a reader/writer pair (a punched TCP
connection, a relay leg, or TLS over either), handing out :class:`MuxStream` objects.

It is a thin shell: two tasks move bytes (one reads the current path into the multiplexer, one writes the
multiplexer's output), one timer serves the keepalive; every decision is the multiplexer's. A session can
move to a new path (:meth:`Session.migrate`) without losing, duplicating or reordering a byte: the writer
ends the old path with a SWITCH frame and continues on the new one; the reader drains the old path up to
the peer's SWITCH before reading the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from dataclasses import dataclass

import structlog

from tcppunch.session.frames import MuxErrorCode
from tcppunch.session.mux import (
    DataReceived,
    Event,
    GoAwayReceived,
    Multiplexer,
    PingAcknowledged,
    SessionClosedError,
    SessionTerminated,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from tcppunch.wire.coord import Role

log = structlog.get_logger(__name__)

READ_SIZE = 256 * 1024
WRITE_BATCH = 256 * 1024  # stream data taken from the multiplexer per transport write
DRAIN_HIGH_WATER = 256 * 1024  # a stream's drain() waits while more than this is queued in the multiplexer
SWITCH_TIMEOUT = 15.0  # the peer's SWITCH came but our new path did not (or the reverse): give up
CLOSE_LINGER = 10.0  # close() lets queued stream data leave for this long before GO_AWAY
CLOSE_FLUSH_TIMEOUT = 2.0  # a closing session's last frames (GO_AWAY) get this long to leave, then abort
CLOSE_DRAIN_TIMEOUT = 10.0  # a graceful close waits this long for the other side's end, reading meanwhile


class StreamResetError(ConnectionResetError):
    """The stream was reset (by the peer or by us); ``code`` says why."""

    def __init__(self, stream_id: int, code: MuxErrorCode, remote: bool) -> None:
        who = "peer" if remote else "us"
        super().__init__(f"stream {stream_id} reset by {who}: {code.name}")
        self.code = code
        self.remote = remote


@dataclass(frozen=True, slots=True)
class PathChange:
    """One entry of a session's history: from ``at`` seconds after the start, it ran on ``path``."""

    path: str
    at: float


class MuxStream:
    """One stream of a session, shaped like asyncio's StreamReader and StreamWriter in one object.

    Reading consumes the receive window and grants it back; ``write`` queues without limit and
    ``drain`` waits until the stream's queue is below :data:`DRAIN_HIGH_WATER`; ``write_eof``/``close``
    half-close (the peer may keep sending); ``close`` is done with the stream (half-close, and what still
    arrives is dropped); ``reset`` aborts both directions.
    """

    def __init__(self, session: Session, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self._chunks: deque[bytes] = deque()  # received, not yet read: the frames' own payloads, no copy
        self._buffered = 0
        self._eof = False
        self._eof_sent = False
        self._discard = False
        self._error: BaseException | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._done = asyncio.Event()

    # ------------------------------------------------------------------------------------- reading
    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all until EOF for ``n < 0``); ``b""`` at EOF. Raises the stream's error."""
        if n < 0:
            chunks = []
            while chunk := await self.read(READ_SIZE):
                chunks.append(chunk)
            return b"".join(chunks)
        while not self._chunks:
            if self._eof or n == 0:  # the FIN arrived: every byte is here, whatever happened since
                return b""
            if self._error is not None:
                raise self._error
            self._readable.clear()
            await self._readable.wait()
        data = self._take(n)
        self._session._consumed(self.stream_id, len(data))
        return data

    def _take(self, n: int) -> bytes:
        first = self._chunks[0]
        if len(first) <= n:
            self._chunks.popleft()
            parts = [first]
            size = len(first)
            while self._chunks and size + len(self._chunks[0]) <= n:
                chunk = self._chunks.popleft()
                parts.append(chunk)
                size += len(chunk)
            data = first if len(parts) == 1 else b"".join(parts)
        else:
            data, self._chunks[0] = first[:n], first[n:]
        self._buffered -= len(data)
        return data

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or :class:`asyncio.IncompleteReadError` at an early EOF."""
        parts = bytearray()
        while len(parts) < n:
            chunk = await self.read(n - len(parts))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(parts), n)
            parts += chunk
        return bytes(parts)

    @property
    def peer(self) -> str:
        """The other side's id (the session's label)."""
        return self._session.peer

    @property
    def session(self) -> Session:
        """The session carrying this stream (to close it and learn whether the other side confirmed)."""
        return self._session

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    # ------------------------------------------------------------------------------------- writing
    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._session._send(self.stream_id, data, end=False)

    async def drain(self) -> None:
        """Wait until the queued data of this stream is below the high-water mark."""
        while True:
            if self._error is not None:
                raise self._error
            if self._session._buffered(self.stream_id) <= DRAIN_HIGH_WATER:
                return
            self._writable.clear()
            await self._writable.wait()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Half-close: a FIN follows the queued data."""
        if self._eof_sent or self._error is not None:
            return
        self._eof_sent = True
        self._session._send(self.stream_id, b"", end=True)
        self._check_done()

    def close(self) -> None:
        """Done with the stream: half-close, and drop (while granting window for) whatever still arrives."""
        self.write_eof()
        self._discard = True
        self._session._consumed(self.stream_id, self._buffered)
        self._chunks.clear()
        self._buffered = 0
        self._done.set()

    async def wait_closed(self) -> None:
        """Wait until both directions ended, the stream was reset, or :meth:`close` was called."""
        await self._done.wait()

    def reset(self, code: MuxErrorCode = MuxErrorCode.CANCEL) -> None:
        """Abort both directions at once; queued data is dropped, the peer sees a reset."""
        if self._error is None:
            self._session._reset(self.stream_id, code)
            self._fail(StreamResetError(self.stream_id, code, remote=False))

    def get_extra_info(self, name: str, default: object = None) -> object:
        """``peername``/``sockname`` of the session's current path, like a StreamWriter."""
        return self._session.get_extra_info(name, default)

    # --------------------------------------------------------------------------- driven by Session
    def _feed(self, data: bytes) -> None:
        if self._discard:
            self._session._consumed(self.stream_id, len(data))
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._readable.set()

    def _feed_eof(self) -> None:
        self._eof = True
        self._readable.set()
        self._check_done()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._readable.set()
        self._writable.set()
        self._done.set()
        self._session._forget(self.stream_id)

    def _check_done(self) -> None:
        if self._eof and self._eof_sent:
            self._done.set()
            self._session._forget(self.stream_id)


class Session:
    """A multiplexed session over one path at a time; see the module docstring."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        role: Role,
        *,
        path: str = "direct",
        peer: str = "",
        mux: Multiplexer | None = None,
        switch_timeout: float = SWITCH_TIMEOUT,
    ) -> None:
        self.peer = peer  # a label for logs and streams: the other side's id
        self.switch_timeout = switch_timeout
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._mux = mux or Multiplexer(role, self._loop.time(), measure_rtt=True)
        self._reader = reader
        self._writer = writer
        _no_nagle(writer)
        self._streams: dict[int, MuxStream] = {}
        self._incoming: asyncio.Queue[MuxStream | None] = asyncio.Queue()
        self._wake_writer = asyncio.Event()
        self._flushed = asyncio.Event()  # set when the writer wrote something or bytes arrived: progress
        self._writing = False
        self._pings: dict[int, asyncio.Future[float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._new_path: tuple[asyncio.StreamReader, asyncio.StreamWriter, str] | None = None
        self._new_path_ready = asyncio.Event()
        self._switch_sent = asyncio.Event()
        self._writer_before_switch: asyncio.StreamWriter | None = None
        self._goaway_received = False
        self._goaway_code: MuxErrorCode | None = None
        self._closed = asyncio.Event()
        self._graceful = False  # our close(NO_ERROR): drain and wait for the other side's end
        self._drain_timeout = CLOSE_DRAIN_TIMEOUT
        self._peer_ended = asyncio.Event()  # the transport delivered EOF or failed: nothing more to read
        self.error: SessionClosedError | None = None
        self.close_error: str | None = None  # why a graceful close could not confirm the other side's end
        self.history = [PathChange(path, 0.0)]
        self._log = log.bind(role=role.value, remote_peer=peer) if peer else log.bind(role=role.value)
        self._tasks = [
            asyncio.ensure_future(self._read_loop()),
            asyncio.ensure_future(self._write_loop()),
        ]
        self._arm_timer()

    # ------------------------------------------------------------------------------------ public API
    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def close_code(self) -> MuxErrorCode | None:
        """Why the session ended, None while it runs: ``NO_ERROR`` for a close by either side (ours, or the
        peer's GO_AWAY and end), ``KEEPALIVE_TIMEOUT`` when the path went silent, ``INTERNAL_ERROR`` when
        the transport failed or the peer hung up without GO_AWAY, or the peer's error code."""
        reason = self._mux.close_reason
        if reason is None or not self.closed:
            return None
        if reason.code is MuxErrorCode.INTERNAL_ERROR and self._goaway_code is MuxErrorCode.NO_ERROR:
            return MuxErrorCode.NO_ERROR  # the peer said goodbye, then ended the transport
        return reason.code

    @property
    def path(self) -> str:
        """What carries the session now (``direct``, ``relay``, ...)."""
        return self.history[-1].path

    @property
    def rtt(self) -> float | None:
        """The last measured round-trip time (keepalive or :meth:`ping`), in seconds."""
        return self._mux.rtt

    def describe_history(self) -> str:
        """For reports: ``relay``, or ``relay → direct at 1.2 s`` (seconds since the session started)."""
        parts = [self.history[0].path]
        parts += [f"{change.path} at {change.at:.1f} s" for change in self.history[1:]]
        return " → ".join(parts)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._writer.get_extra_info(name, default)

    async def open_stream(self, data: bytes = b"") -> MuxStream:
        """A new stream; ``data`` leaves in the opening frame (0-RTT). Raises SessionClosedError."""
        self._check_alive()
        stream_id = self._mux.open_stream(data)
        stream = self._streams[stream_id] = MuxStream(self, stream_id)
        self._kick()
        return stream

    async def accept_stream(self) -> MuxStream:
        """The next stream the peer opened; raises SessionClosedError once the session is over."""
        stream = await self._incoming.get()
        if stream is None:
            self._incoming.put_nowait(None)  # every later caller hears it too
            self._check_alive()
            raise SessionClosedError("session closed")
        return stream

    async def ping(self) -> float:
        """The round-trip time of one PING over the current path."""
        self._check_alive()
        waiter: asyncio.Future[float] = self._loop.create_future()
        self._pings[self._mux.send_ping(self._loop.time())] = waiter
        self._kick()
        return await waiter

    async def migrate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> None:
        """Move onto a new path (the peer does the same with its end); returns once we write on it.

        The old path is closed once both SWITCH frames went through it.
        """
        self._check_alive()
        if self._new_path is not None:
            raise RuntimeError("a path migration is already under way")
        _no_nagle(writer)
        self._new_path = (reader, writer, path)
        self._new_path_ready.set()
        self._kick()
        await self._switch_sent.wait()
        self._check_alive()

    async def close(self, code: MuxErrorCode = MuxErrorCode.NO_ERROR, *, linger: float = CLOSE_LINGER,
                    drain: float = CLOSE_DRAIN_TIMEOUT) -> None:
        """End the session: what streams queued leaves first (up to ``linger`` seconds), then GO_AWAY and
        our end of the transport; every stream still open fails.

        With NO_ERROR the socket is closed only once the other side ended its direction too (at most
        ``drain`` seconds), and what arrives meanwhile is read and dropped: closing a socket with unread
        bytes makes the kernel answer with a RST, which destroys our last bytes still in flight. The
        other side's end comes after it read all of ours, so it confirms delivery; without it (or with
        data still queued after ``linger``) :attr:`close_error` says what may be lost.
        """
        if not self.closed and code is MuxErrorCode.NO_ERROR:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(linger):
                    while not self.closed and (self._mux.has_pending_output or self._writing):
                        self._flushed.clear()
                        self._kick()
                        await self._flushed.wait()
            if not self.closed and self._mux.has_pending_output:
                self.close_error = f"stream data still queued after {linger:g} s: the peer stopped reading"
        if not self.closed:
            self._graceful = code is MuxErrorCode.NO_ERROR
            self._drain_timeout = drain
            self._mux.close(code, "closed by this side")
            self._handle_events()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        await self._closed.wait()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ----------------------------------------------------------------------------- used by streams
    def _consumed(self, stream_id: int, size: int) -> None:
        if not self.closed:
            self._mux.acknowledge_received_data(stream_id, size, self._loop.time())
            self._kick()

    def _send(self, stream_id: int, data: bytes, *, end: bool) -> None:
        self._check_alive()
        self._mux.send_data(stream_id, data, end_stream=end)
        self._kick()

    def _buffered(self, stream_id: int) -> int:
        return self._mux.send_buffered(stream_id)

    def _reset(self, stream_id: int, code: MuxErrorCode) -> None:
        self._mux.reset_stream(stream_id, code)
        self._kick()

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    # --------------------------------------------------------------------------------- the engine
    def _check_alive(self) -> None:
        if self.error is not None:
            raise self.error

    def _kick(self) -> None:
        self._wake_writer.set()
        self._arm_timer()

    async def _read_loop(self) -> None:
        try:
            await self._read_until_end()
        finally:
            self._peer_ended.set()

    async def _read_until_end(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_SIZE)
                if self.closed:  # closing gracefully: drain until the other side's end, drop the bytes
                    if not data:
                        return
                    continue
                if not data:
                    if self._goaway_received:
                        self._lost("closed by the peer", prefix="session ended")
                    else:
                        self._lost("the peer hung up without GO_AWAY")
                    return
                self._mux.receive_data(data, self._loop.time())
                self._handle_events()
                if self._mux.switch_received:
                    await self._follow_switch()
        except TimeoutError:  # (an OSError: it comes first) only _follow_switch has a deadline here
            self._lost(f"the peer switched paths but no new path arrived here within {self.switch_timeout:g} s")
        except (ConnectionError, OSError) as exc:
            if self._graceful and self.close_error is None:  # a RST while we closed: it may have cut our bytes
                self.close_error = f"connection lost while closing: {exc!r}"
            self._lost(f"connection lost: {exc!r}")

    async def _follow_switch(self) -> None:
        """The peer's SWITCH arrived: read the new path from here on."""
        async with asyncio.timeout(self.switch_timeout):
            await self._new_path_ready.wait()
            await self._switch_sent.wait()
        assert self._new_path is not None and self._writer_before_switch is not None
        old_writer = self._writer_before_switch
        self._reader = self._new_path[0]
        self._mux.path_switched()
        self._log.info("session.path_switched", path=self._new_path[2])
        old_writer.close()  # both SWITCH frames went through it: the old path is done

    async def _write_loop(self) -> None:
        try:
            while not self.closed:
                await self._wake_writer.wait()
                self._wake_writer.clear()
                await self._flush()
                if self._new_path is not None and not self._switch_sent.is_set() and not self.closed:
                    await self._send_switch()
            async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                await self._flush()  # the GO_AWAY
            if self._graceful:
                await self._end_and_wait()
        except (ConnectionError, OSError, TimeoutError) as exc:
            self._lost(f"connection lost: {exc!r}")
            if self._graceful and self.close_error is None:
                self.close_error = f"connection lost while closing: {exc!r}"
        finally:
            if self._tasks[0] is not asyncio.current_task():
                self._tasks[0].cancel()
            for writer in (self._writer, self._writer_before_switch):
                if writer is not None:
                    writer.close()

    async def _end_and_wait(self) -> None:
        """Our end of the transport (FIN, close_notify under TLS), then the other side's (bounded)."""
        if self._writer.can_write_eof() and not self._writer.transport.is_closing():
            self._writer.write_eof()
        try:
            async with asyncio.timeout(self._drain_timeout):
                await self._peer_ended.wait()
        except TimeoutError:
            self.close_error = self.close_error or (
                f"the peer did not end the session within {self._drain_timeout:g} s: our last bytes may be lost")
            self._log.warning("session.close_unconfirmed", reason=self.close_error)

    async def _flush(self) -> None:
        self._writing = True
        wrote = False
        try:
            while data := self._mux.data_to_send(WRITE_BATCH):
                wrote = True
                self._writer.write(data)
                await self._writer.drain()
                for stream in list(self._streams.values()):
                    if self._mux.send_buffered(stream.stream_id) <= DRAIN_HIGH_WATER:
                        stream._writable.set()
        finally:
            self._writing = False
            if wrote:
                self._flushed.set()

    async def _send_switch(self) -> None:
        assert self._new_path is not None
        self._writer.write(self._mux.switch_path())
        await self._writer.drain()
        self._writer_before_switch = self._writer
        self._writer = self._new_path[1]
        self.history.append(PathChange(self._new_path[2], self._loop.time() - self._started))
        self._switch_sent.set()
        self._wake_writer.set()  # stream data still queued now leaves on the new path

    def _handle_events(self) -> None:
        self._flushed.set()
        for event in self._mux.events():
            self._dispatch(event)
        self._kick()

    def _dispatch(self, event: Event) -> None:
        stream = self._streams.get(getattr(event, "stream_id", 0))
        if isinstance(event, StreamOpened):
            stream = self._streams[event.stream_id] = MuxStream(self, event.stream_id)
            self._incoming.put_nowait(stream)
        elif isinstance(event, DataReceived) and stream:
            stream._feed(event.data)
        elif isinstance(event, StreamEnded) and stream:
            stream._feed_eof()
        elif isinstance(event, StreamReset) and stream:
            stream._fail(StreamResetError(event.stream_id, event.code, event.remote))
        elif isinstance(event, PingAcknowledged):
            waiter = self._pings.pop(event.ping_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event.rtt)
        elif isinstance(event, GoAwayReceived):
            self._goaway_received = True
            self._goaway_code = event.code
            self._log.info("session.go_away", code=event.code.name, last_stream_id=event.last_stream_id)
        elif isinstance(event, SessionTerminated):
            self._end(f"session ended: {event.message} ({event.code.name})")
            if event.code is MuxErrorCode.KEEPALIVE_TIMEOUT:
                self._drop_dead_path()
        # PathSwitched is the read loop's (it asks mux.switch_received); data, ends and resets for a stream
        # this side already closed and forgot need nothing.

    def _lost(self, reason: str, *, prefix: str = "session lost") -> None:
        if not self.closed:
            self._mux.close(MuxErrorCode.INTERNAL_ERROR, reason)  # closed: nothing more will be read
            self._mux.events()
            self._end(f"{prefix}: {reason}")

    def _end(self, reason: str) -> None:
        if self.closed:
            return
        self.error = SessionClosedError(reason)
        self._log.info("session.closed", reason=reason, history=self.describe_history())
        for stream in list(self._streams.values()):
            stream._fail(self.error)
        self._incoming.put_nowait(None)
        for waiter in self._pings.values():
            if not waiter.done():
                waiter.set_exception(self.error)
        self._switch_sent.set()
        self._flushed.set()
        self._closed.set()
        self._wake_writer.set()  # flush the GO_AWAY, then close the transport
        if self._timer:
            self._timer.cancel()
        if self._graceful:  # the reader drains until the other side's end; the writer waits for it
            self._loop.call_later(CLOSE_FLUSH_TIMEOUT + self._drain_timeout + 0.5, self._abort)
            return
        if self._tasks and self._tasks[0] is not asyncio.current_task():
            self._tasks[0].cancel()  # the reader: nothing more is read
        self._loop.call_later(CLOSE_FLUSH_TIMEOUT + 0.5, self._abort)

    def _drop_dead_path(self) -> None:
        """The path went silent past the keepalive: nothing (not even GO_AWAY) will get through it. Drop
        the transports at once with a RST (SO_LINGER 0) so that the kernel frees the 4-tuple now: a
        punched connection's 4-tuple is exactly what the next punch to this peer connects on, and a
        socket left retransmitting into a dead NAT mapping would hold it for minutes ("busy")."""
        for writer in (self._writer, self._writer_before_switch):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None and sock.type == socket.SOCK_STREAM:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    def _abort(self) -> None:
        """The writer is stuck (a dead peer stopped reading): drop the transports."""
        for task in self._tasks:
            task.cancel()
        for writer in (self._writer, self._writer_before_switch):
            if writer is not None:
                writer.transport.abort()

    def _arm_timer(self) -> None:
        """One timer: armed at the multiplexer's next deadline; a later deadline re-arms it when it fires."""
        when = self._mux.get_timer()
        if when is None or (self._timer_at is not None and self._timer_at <= when):
            return
        if self._timer:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self._mux.handle_timer(self._loop.time())
        self._handle_events()


def _no_nagle(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY under a session: its writer already batches, and a small frame (a stream's opening
    frame, a window update, an echo) must not wait for the previous one's delayed ACK."""
    sock = writer.get_extra_info("socket")  # asyncio's TransportSocket, also under TLS
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
