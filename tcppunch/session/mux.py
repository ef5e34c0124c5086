"""The stream multiplexer: many ordered byte streams inside one session (sans-I/O, h11/aioquic style).

The caller moves bytes and time; this module never reads a socket or a clock::

    mux.receive_data(data, now)        # bytes from the transport
    for event in mux.events(): ...     # what they meant (StreamOpened, DataReceived, ...)
    mux.send_data(stream_id, b"...")   # queue; nothing leaves yet
    transport.write(mux.data_to_send())
    mux.get_timer() / mux.handle_timer(now)   # one timer: keepalive ping and its deadline

Each stream has a receive window per direction: a peer may have at most ``window`` unacknowledged bytes
in flight per stream, and the receiver grants more with WINDOW_UPDATE as the application consumes data
(:meth:`Multiplexer.acknowledge_received_data`). So the memory one session can make us hold is bounded
by ``max_streams × window`` plus one frame (docs/sessions.md lists every limit).

Stream ids never collide: the session's initiator opens odd ids, the responder even ones.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field

from tcppunch.session.frames import (
    MAX_PAYLOAD,
    MAX_STREAM_ID,
    Flag,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    MuxErrorCode,
    encode_frame,
    encode_header,
)
from tcppunch.wire.coord import Role

INITIAL_WINDOW = 256 * 1024  # protocol constant: what a sender may send on a new stream before any update
DEFAULT_WINDOW = 1 << 20  # our receive window per stream; 1 MiB keeps ~50 MB/s flowing at 20 ms RTT
MAX_STREAM_WINDOW = 16 << 20  # a busy stream's receive window grows up to this (see acknowledge_received_data)
GROWTH_BUDGET = 64 << 20  # all streams' growth beyond ``window`` together stays under this
DEFAULT_MAX_STREAMS = 256  # concurrently open streams the peer may open towards us
DEFAULT_FRAME_SIZE = 64 * 1024  # the largest DATA payload we send; also the round-robin quantum
DEFAULT_KEEPALIVE_INTERVAL = 15.0  # seconds of silence before we ping
DEFAULT_KEEPALIVE_TIMEOUT = 10.0  # seconds a ping may stay unanswered (while nothing else arrives)
MAX_WINDOW = (1 << 31) - 1


class SessionClosedError(ConnectionError):
    """The session is closed (or closing): no new stream, no more data."""


class StreamClosedError(ConnectionError):
    """This stream can no longer send: it was half-closed, reset, or never existed."""


# ---------------------------------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened ``stream_id``; its first data (0-RTT) follows as DataReceived."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes for a stream; acknowledge them once consumed so the peer may send more."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed ``stream_id``: no more data will come on it (we may still send)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """``stream_id`` is gone in both directions; ``remote`` says whether the peer reset it."""

    stream_id: int
    code: MuxErrorCode
    remote: bool


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    """Ping ``ping_id`` (what :meth:`Multiplexer.send_ping` returned) came back after ``rtt`` seconds."""

    rtt: float
    ping_id: int = 0


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer serves no stream above ``last_stream_id`` and accepts no new ones."""

    last_stream_id: int
    code: MuxErrorCode


@dataclass(frozen=True, slots=True)
class PathSwitched:
    """The peer's next byte comes on the new path: stop reading the old one (path migration)."""


@dataclass(frozen=True, slots=True)
class SessionTerminated:
    """The session is over: ``code`` and ``message`` say why (a peer's protocol error, keepalive, ...)."""

    code: MuxErrorCode
    message: str


Event = (
    StreamOpened
    | DataReceived
    | StreamEnded
    | StreamReset
    | PingAcknowledged
    | GoAwayReceived
    | PathSwitched
    | SessionTerminated
)


# ---------------------------------------------------------------------------------------------- state
@dataclass(slots=True)
class _Stream:
    stream_id: int
    send_window: int
    recv_window: int
    window: int = 0  # our receive window for this stream (grows while the stream is window-limited)
    last_grant: float | None = None
    pending: _Queue = field(default_factory=lambda: _Queue())
    recv_unacked: int = 0
    syn_pending: bool = False
    fin_pending: bool = False
    fin_sent: bool = False
    fin_received: bool = False

    def has_output(self) -> bool:
        if self.pending:
            return self.send_window > 0
        return self.syn_pending or (self.fin_pending and not self.fin_sent)


class _Queue:
    """Queued bytes as the chunks they were written in: taking a frame's worth copies nothing (the
    transport write joins the pieces once)."""

    __slots__ = ("_chunks", "size")

    def __init__(self) -> None:
        self._chunks: deque[memoryview] = deque()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, data: bytes) -> None:
        if data:
            # bytes are immutable: keep a view; anything else (a bytearray the caller may reuse) is copied
            self._chunks.append(memoryview(data if isinstance(data, bytes) else bytes(data)))
            self.size += len(data)

    def take(self, size: int, out: list[bytes | memoryview]) -> None:
        """Move the first ``size`` bytes into ``out`` (as views of the written chunks)."""
        self.size -= size
        while size:
            chunk = self._chunks[0]
            if len(chunk) <= size:
                out.append(self._chunks.popleft())
                size -= len(chunk)
            else:
                out.append(chunk[:size])
                self._chunks[0] = chunk[size:]
                size = 0


_U32 = struct.Struct("!I")
_GO_AWAY = struct.Struct("!II")
_PING = struct.Struct("!Q")


class Multiplexer:
    """One side of a multiplexed session (see the module docstring for the calling pattern)."""

    def __init__(
        self,
        role: Role,
        now: float,
        *,
        window: int = DEFAULT_WINDOW,
        max_streams: int = DEFAULT_MAX_STREAMS,
        frame_size: int = DEFAULT_FRAME_SIZE,
        max_payload: int = MAX_PAYLOAD,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        measure_rtt: bool = False,
    ) -> None:
        if not INITIAL_WINDOW <= window <= MAX_WINDOW or not 0 < frame_size <= max_payload:
            raise ValueError(f"need {INITIAL_WINDOW} <= window <= {MAX_WINDOW} and 0 < frame_size <= max_payload")
        self.role = role
        self.window = window
        self.max_streams = max_streams
        self.frame_size = frame_size
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self._decoder = FrameDecoder(max_payload=max_payload)
        self._streams: dict[int, _Stream] = {}
        self._ready: deque[int] = deque()
        self._in_ready: set[int] = set()
        self._control: list[bytes] = []
        self._events: deque[Event] = deque()
        self._next_id = 1 if role is Role.INITIATOR else 2
        self._last_remote_id = 0
        self._pings: dict[int, float] = {}
        self._ping_counter = 0
        self._last_received = now
        self._goaway_sent = False
        self._goaway_received = False
        self._switch_received = False
        self.closed = False
        self.close_reason: SessionTerminated | None = None
        self.rtt: float | None = None
        if measure_rtt:  # a first PING at once: window growth needs the round-trip time
            self.send_ping(now)

    # ----------------------------------------------------------------------------------- inspection
    def events(self) -> list[Event]:
        """Every event produced since the last call, oldest first."""
        out = list(self._events)
        self._events.clear()
        return out

    def next_event(self) -> Event | None:
        """The oldest pending event, or ``None``."""
        return self._events.popleft() if self._events else None

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def send_window(self, stream_id: int) -> int:
        """Bytes the peer lets us send on ``stream_id`` right now (0 for an unknown stream)."""
        stream = self._streams.get(stream_id)
        return stream.send_window if stream else 0

    @property
    def has_pending_output(self) -> bool:
        """Whether any frame or stream byte is still queued (data waiting for window included)."""
        if self._control:
            return True
        return any(s.pending or s.syn_pending or (s.fin_pending and not s.fin_sent) for s in self._streams.values())

    def send_buffered(self, stream_id: int) -> int:
        """Bytes queued on ``stream_id`` that have not left through :meth:`data_to_send` yet."""
        stream = self._streams.get(stream_id)
        return len(stream.pending) if stream else 0

    @property
    def switch_received(self) -> bool:
        """The peer's SWITCH arrived: read the new path now (then call :meth:`path_switched`)."""
        return self._switch_received

    def is_local(self, stream_id: int) -> bool:
        """Whether this side opened ``stream_id`` (by its parity)."""
        return (stream_id % 2 == 1) == (self.role is Role.INITIATOR)

    # ------------------------------------------------------------------------------------- sending
    def open_stream(self, data: bytes = b"", *, end_stream: bool = False) -> int:
        """A new stream id; its SYN leaves with ``data`` in one frame (0-RTT open)."""
        self._check_open()
        if self._goaway_sent or self._goaway_received:
            raise SessionClosedError("session is going away: no new streams")
        if self._next_id > MAX_STREAM_ID:
            raise SessionClosedError("stream ids exhausted: open a new session")
        stream_id = self._next_id
        self._next_id += 2
        stream = _Stream(stream_id, send_window=INITIAL_WINDOW, recv_window=self.window, window=self.window,
                         syn_pending=True)
        self._streams[stream_id] = stream
        stream.pending.append(data)
        stream.fin_pending = end_stream
        self._mark_ready(stream)
        return stream_id

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue ``data`` on the stream; it leaves as the peer's window allows."""
        self._check_open()
        stream = self._streams.get(stream_id)
        if stream is None or stream.fin_pending:
            raise StreamClosedError(f"stream {stream_id} is closed for sending")
        stream.pending.append(data)
        stream.fin_pending = end_stream
        self._mark_ready(stream)

    def end_stream(self, stream_id: int) -> None:
        """Half-close: a FIN follows the queued data; the peer may keep sending to us."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, code: MuxErrorCode = MuxErrorCode.CANCEL) -> None:
        """Abort the stream in both directions; queued data is dropped. Unknown ids are ignored."""
        if self.closed or self._streams.pop(stream_id, None) is None:
            return
        self._control.append(encode_frame(Frame(FrameType.RESET, Flag.NONE, stream_id, _U32.pack(code))))

    def acknowledge_received_data(self, stream_id: int, size: int, now: float | None = None) -> None:
        """The application consumed ``size`` bytes of the stream: grant them back to the peer.

        With ``now`` (and a measured RTT), a stream whose grants follow each other within two round
        trips is limited by its window, not by its reader: its window doubles, up to
        :data:`MAX_STREAM_WINDOW` and within :data:`GROWTH_BUDGET` for the whole session.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.fin_received or self.closed:
            return
        stream.recv_unacked += size
        if stream.recv_unacked >= stream.window // 2:
            increment, stream.recv_unacked = stream.recv_unacked, 0
            increment += self._grow(stream, now)
            stream.recv_window += increment
            payload = _U32.pack(increment)
            self._control.append(encode_frame(Frame(FrameType.WINDOW_UPDATE, Flag.NONE, stream_id, payload)))

    def send_ping(self, now: float) -> int:
        """Ask for a PingAcknowledged event carrying the round-trip time; returns the ping's id."""
        self._check_open()
        self._ping_counter += 1
        self._pings[self._ping_counter] = now
        self._control.append(encode_frame(Frame(FrameType.PING, Flag.NONE, 0, _PING.pack(self._ping_counter))))
        return self._ping_counter

    def close(self, code: MuxErrorCode = MuxErrorCode.NO_ERROR, message: str = "closed") -> None:
        """Send GO_AWAY and end the session; flush :meth:`data_to_send` before closing the transport."""
        if self.closed:
            return
        self._send_goaway(code)
        self._terminate(code, message)

    def go_away(self, code: MuxErrorCode = MuxErrorCode.NO_ERROR) -> None:
        """Refuse new streams from the peer; the streams already open carry on."""
        if not self.closed and not self._goaway_sent:
            self._send_goaway(code)

    def switch_path(self) -> bytes:
        """The last bytes for the old path (queued control frames, then SWITCH).

        Every byte of earlier :meth:`data_to_send` calls and these belong on the old path, in this order;
        every later byte belongs on the new one. Stream data still queued simply leaves on the new path.
        """
        self._check_open()
        out = self._control
        self._control = []
        out.append(encode_frame(Frame(FrameType.SWITCH, Flag.NONE, 0)))
        return b"".join(out)

    def data_to_send(self, limit: int | None = None) -> bytes:
        """Bytes for the transport: control frames first, then stream data round-robin, one frame each.

        ``limit`` bounds the stream data taken (at least one frame goes out if any is ready), so a driver
        can take what the transport will absorb and leave the rest queued under flow control.
        """
        out: list[bytes | memoryview] = []
        out += self._control
        self._control = []
        taken = 0
        while self._ready and (limit is None or taken < limit):
            stream_id = self._ready.popleft()
            self._in_ready.discard(stream_id)
            stream = self._streams.get(stream_id)
            if stream is None or not stream.has_output():
                continue
            taken += self._emit_frame(stream, out)
            self._mark_ready(stream)
        return b"".join(out)

    def _emit_frame(self, stream: _Stream, out: list[bytes | memoryview]) -> int:
        size = min(len(stream.pending), stream.send_window, self.frame_size)
        flags = Flag.NONE
        grant = b""
        if stream.syn_pending:
            flags |= Flag.SYN
            stream.syn_pending = False
            grant = self._initial_grant(stream.stream_id)  # after the SYN: the peer must know the stream
        stream.send_window -= size
        if stream.fin_pending and len(stream.pending) == size:  # this frame empties the queue
            flags |= Flag.FIN
            stream.fin_sent = True
        out.append(encode_header(FrameType.DATA, flags, stream.stream_id, size))
        stream.pending.take(size, out)
        if grant:
            out.append(grant)
        if stream.fin_sent and stream.fin_received:
            del self._streams[stream.stream_id]
        return size

    # ----------------------------------------------------------------------------------- receiving
    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes from the transport; the events they make wait in :meth:`events`.

        A frame that breaks the protocol ends this session (SessionTerminated with the reason, GO_AWAY
        with the code to the peer); it never raises.
        """
        if self.closed or not data:
            return
        if self._switch_received:
            self._protocol_error(MuxErrorCode.PROTOCOL_ERROR, "bytes after SWITCH on the old path")
            return
        self._last_received = now
        self._decoder.feed(data)
        try:
            while not self.closed and (frame := self._decoder.next_frame()) is not None:
                self._handle_frame(frame, now)
                if self.switch_received and self._decoder.buffered:
                    raise FrameError(MuxErrorCode.PROTOCOL_ERROR, "bytes after SWITCH on the old path")
        except FrameError as exc:
            self._protocol_error(exc.code, exc.message)

    def path_switched(self) -> None:
        """The driver now reads the new path: bytes fed from here on are the continuation."""
        self._switch_received = False

    def _handle_frame(self, frame: Frame, now: float) -> None:
        if frame.type is FrameType.DATA:
            self._on_data(frame)
        elif frame.type is FrameType.WINDOW_UPDATE:
            self._on_window_update(frame)
        elif frame.type is FrameType.RESET:
            self._on_reset(frame)
        elif frame.type is FrameType.PING:
            self._on_ping(frame, now)
        elif frame.type is FrameType.GO_AWAY:
            self._on_goaway(frame)
        else:
            self._switch_received = True
            self._events.append(PathSwitched())

    def _on_data(self, frame: Frame) -> None:
        stream = self._streams.get(frame.stream_id)
        if frame.flags & Flag.SYN:
            stream = self._accept_stream(frame.stream_id)
        elif stream is None:
            self._check_known_id(frame.stream_id)
            return  # a frame in flight when the stream was reset
        if stream is None:
            return  # refused
        if stream.fin_received:
            self._reset_locally(stream, MuxErrorCode.STREAM_CLOSED)
            return
        if len(frame.payload) > stream.recv_window:
            raise FrameError(
                MuxErrorCode.FLOW_CONTROL_ERROR,
                f"stream {stream.stream_id}: {len(frame.payload)} bytes sent into a window of {stream.recv_window}",
            )
        stream.recv_window -= len(frame.payload)
        if frame.payload:
            self._events.append(DataReceived(stream.stream_id, frame.payload))
        if frame.flags & Flag.FIN:
            stream.fin_received = True
            self._events.append(StreamEnded(stream.stream_id))
            if stream.fin_sent:
                del self._streams[stream.stream_id]

    def _accept_stream(self, stream_id: int) -> _Stream | None:
        if self.is_local(stream_id) or stream_id <= self._last_remote_id:
            raise FrameError(MuxErrorCode.PROTOCOL_ERROR, f"SYN for stream {stream_id}: wrong parity or id reused")
        self._last_remote_id = stream_id
        remote_open = sum(1 for sid in self._streams if not self.is_local(sid))
        if self._goaway_sent or remote_open >= self.max_streams:
            self._control.append(
                encode_frame(Frame(FrameType.RESET, Flag.NONE, stream_id, _U32.pack(MuxErrorCode.REFUSED_STREAM)))
            )
            return None
        stream = _Stream(stream_id, send_window=INITIAL_WINDOW, recv_window=self.window, window=self.window)
        self._streams[stream_id] = stream
        self._events.append(StreamOpened(stream_id))
        if grant := self._initial_grant(stream_id):
            self._control.append(grant)
        return stream

    def _grow(self, stream: _Stream, now: float | None) -> int:
        """How much to add to ``stream``'s window now (0 unless it is window-limited and may grow)."""
        last, stream.last_grant = stream.last_grant, now
        if now is None or last is None or self.rtt is None or now - last >= 2 * self.rtt:
            return 0
        extra = min(stream.window, MAX_STREAM_WINDOW - stream.window)
        grown = sum(s.window - self.window for s in self._streams.values())
        extra = max(0, min(extra, GROWTH_BUDGET - grown))
        stream.window += extra
        return extra

    def _initial_grant(self, stream_id: int) -> bytes:
        """A WINDOW_UPDATE raising the peer's view of our window from INITIAL_WINDOW to ours."""
        extra = self.window - INITIAL_WINDOW
        if not extra:
            return b""
        return encode_frame(Frame(FrameType.WINDOW_UPDATE, Flag.NONE, stream_id, _U32.pack(extra)))

    def _check_known_id(self, stream_id: int) -> None:
        """A frame for a stream we do not hold must name one that existed (closed since), not a future id."""
        known = stream_id < self._next_id if self.is_local(stream_id) else stream_id <= self._last_remote_id
        if not known:
            raise FrameError(MuxErrorCode.PROTOCOL_ERROR, f"frame for stream {stream_id}, which was never opened")

    def _on_window_update(self, frame: Frame) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            self._check_known_id(frame.stream_id)
            return
        (increment,) = _U32.unpack(frame.payload)
        if stream.send_window + increment > MAX_WINDOW:
            raise FrameError(MuxErrorCode.FLOW_CONTROL_ERROR, f"stream {stream.stream_id}: window above 2^31-1")
        stream.send_window += increment
        self._mark_ready(stream)

    def _on_reset(self, frame: Frame) -> None:
        if self._streams.pop(frame.stream_id, None) is None:
            self._check_known_id(frame.stream_id)
            return
        (raw,) = _U32.unpack(frame.payload)
        code = MuxErrorCode(raw) if raw in MuxErrorCode._value2member_map_ else MuxErrorCode.INTERNAL_ERROR
        self._events.append(StreamReset(frame.stream_id, code, remote=True))

    def _on_ping(self, frame: Frame, now: float) -> None:
        if not frame.flags & Flag.ACK:
            self._control.append(encode_frame(Frame(FrameType.PING, Flag.ACK, 0, frame.payload)))
            return
        (ping_id,) = _PING.unpack(frame.payload)
        sent = self._pings.pop(ping_id, None)
        if sent is not None:
            self.rtt = now - sent
            self._events.append(PingAcknowledged(self.rtt, ping_id))

    def _on_goaway(self, frame: Frame) -> None:
        last, raw = _GO_AWAY.unpack(frame.payload)
        code = MuxErrorCode(raw) if raw in MuxErrorCode._value2member_map_ else MuxErrorCode.INTERNAL_ERROR
        self._goaway_received = True
        self._events.append(GoAwayReceived(last, code))
        for stream_id in [sid for sid in self._streams if self.is_local(sid) and sid > last]:
            del self._streams[stream_id]
            self._events.append(StreamReset(stream_id, MuxErrorCode.REFUSED_STREAM, remote=True))
        if code is not MuxErrorCode.NO_ERROR:
            self._terminate(code, f"peer ended the session: {code.name}")

    # --------------------------------------------------------------------------------------- timer
    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should run next (keepalive ping or its deadline), or ``None``."""
        if self.closed:
            return None
        if self._pings:
            return max(min(self._pings.values()), self._last_received) + self.keepalive_timeout
        return self._last_received + self.keepalive_interval

    def handle_timer(self, now: float) -> None:
        """Send a keepalive ping after silence; end the session when one stays unanswered too long."""
        deadline = self.get_timer()
        if deadline is None or now < deadline:
            return
        if self._pings:
            self._terminate(
                MuxErrorCode.KEEPALIVE_TIMEOUT,
                f"peer silent for {now - self._last_received:.1f} s: keepalive ping unanswered",
            )
            self._send_goaway(MuxErrorCode.KEEPALIVE_TIMEOUT)
        else:
            self.send_ping(now)

    # ------------------------------------------------------------------------------------- helpers
    def _check_open(self) -> None:
        if self.closed:
            reason = self.close_reason.message if self.close_reason else "closed"
            raise SessionClosedError(f"session closed: {reason}")

    def _mark_ready(self, stream: _Stream) -> None:
        if stream.stream_id not in self._in_ready and stream.has_output():
            self._in_ready.add(stream.stream_id)
            self._ready.append(stream.stream_id)

    def _reset_locally(self, stream: _Stream, code: MuxErrorCode) -> None:
        self.reset_stream(stream.stream_id, code)
        self._events.append(StreamReset(stream.stream_id, code, remote=False))

    def _send_goaway(self, code: MuxErrorCode) -> None:
        self._goaway_sent = True
        payload = _GO_AWAY.pack(self._last_remote_id, code)
        self._control.append(encode_frame(Frame(FrameType.GO_AWAY, Flag.NONE, 0, payload)))

    def _protocol_error(self, code: MuxErrorCode, message: str) -> None:
        self._send_goaway(code)
        self._terminate(code, message)

    def _terminate(self, code: MuxErrorCode, message: str) -> None:
        self.closed = True
        self.close_reason = SessionTerminated(code, message)
        self._streams.clear()
        self._ready.clear()
        self._in_ready.clear()
        self._events.append(self.close_reason)
