"""Frame codec of the stream multiplexer (sans-I/O: bytes in, frames out; no sockets, no clock).

Every frame is a 12-byte header and a payload (docs/sessions.md has the full table)::

    0         1       2       3       4               8               12
    +---------+-------+-------+-------+---------------+---------------+---------
    | version | type  | flags | 0     | stream id u32 | length u32    | payload
    +---------+-------+-------+-------+---------------+---------------+---------

All integers are big-endian. ``length`` is the payload length; a frame longer than the decoder's
``max_payload`` is refused from its header alone, before any of its body is buffered, so a peer cannot
make us buffer more than one frame of the documented size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

VERSION = 1
HEADER = struct.Struct("!BBBxII")
HEADER_SIZE = HEADER.size
# The largest payload a decoder accepts by default (the sender cuts DATA into smaller frames).
MAX_PAYLOAD = 1 << 20
MAX_STREAM_ID = (1 << 32) - 1


class FrameType(IntEnum):
    """What a frame carries; the payload of each is fixed by its type (see :func:`check_frame`)."""

    DATA = 0  # stream bytes; SYN opens the stream (0-RTT: it may carry data), FIN half-closes it
    WINDOW_UPDATE = 1  # payload: u32 increment of the stream's send window
    RESET = 2  # payload: u32 MuxErrorCode; the stream is gone in both directions
    PING = 3  # stream 0; payload: 8 opaque bytes, echoed back with ACK
    GO_AWAY = 4  # stream 0; payload: u32 last stream id the sender will serve, u32 MuxErrorCode
    SWITCH = 5  # stream 0; empty: "my next byte comes on the new path" (path migration)


class Flag(IntFlag):
    """Frame flags; which ones a type allows is checked by :func:`check_frame`."""

    NONE = 0
    SYN = 0x1
    FIN = 0x2
    ACK = 0x4


class MuxErrorCode(IntEnum):
    """Why a stream was reset or a session ended (carried in RESET and GO_AWAY)."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    FLOW_CONTROL_ERROR = 2
    FRAME_TOO_LARGE = 3
    REFUSED_STREAM = 4
    STREAM_CLOSED = 5
    CANCEL = 6
    KEEPALIVE_TIMEOUT = 7
    INTERNAL_ERROR = 8


class FrameError(Exception):
    """The peer sent a frame that breaks the protocol; ``code`` says which rule."""

    def __init__(self, code: MuxErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame."""

    type: FrameType
    flags: Flag
    stream_id: int
    payload: bytes = b""


_ALLOWED_FLAGS = {
    FrameType.DATA: Flag.SYN | Flag.FIN,
    FrameType.WINDOW_UPDATE: Flag.NONE,
    FrameType.RESET: Flag.NONE,
    FrameType.PING: Flag.ACK,
    FrameType.GO_AWAY: Flag.NONE,
    FrameType.SWITCH: Flag.NONE,
}
_PAYLOAD_SIZE = {
    FrameType.WINDOW_UPDATE: 4,
    FrameType.RESET: 4,
    FrameType.PING: 8,
    FrameType.GO_AWAY: 8,
    FrameType.SWITCH: 0,
}
_SESSION_TYPES = (FrameType.PING, FrameType.GO_AWAY, FrameType.SWITCH)
_TYPES = frozenset(int(t) for t in FrameType)


def encode_header(ftype: FrameType, flags: Flag, stream_id: int, length: int) -> bytes:
    """The 12-byte header alone (DATA payloads are appended by the caller without a copy)."""
    return HEADER.pack(VERSION, ftype, flags, stream_id, length)


def encode_frame(frame: Frame) -> bytes:
    """Header and payload of ``frame`` as bytes."""
    return encode_header(frame.type, frame.flags, frame.stream_id, len(frame.payload)) + frame.payload


def check_frame(frame: Frame) -> None:
    """Raise :class:`FrameError` unless ``frame`` has the flags, stream id and payload its type requires."""
    name = frame.type.name
    if frame.flags & ~_ALLOWED_FLAGS[frame.type]:
        raise FrameError(MuxErrorCode.PROTOCOL_ERROR, f"{name} frame with flags {int(frame.flags):#x}")
    if (frame.type in _SESSION_TYPES) != (frame.stream_id == 0):
        where = "stream 0" if frame.type in _SESSION_TYPES else "a stream id > 0"
        message = f"{name} frame on stream {frame.stream_id}; it belongs on {where}"
        raise FrameError(MuxErrorCode.PROTOCOL_ERROR, message)
    size = _PAYLOAD_SIZE.get(frame.type)
    if size is not None and len(frame.payload) != size:
        raise FrameError(MuxErrorCode.PROTOCOL_ERROR, f"{name} payload of {len(frame.payload)} bytes, expected {size}")


class FrameDecoder:
    """Incremental decoder: ``feed(bytes)``, then ``next_frame()`` until it returns ``None``.

    After an error the decoder stays failed and raises the same error again: the session is to be closed.
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD) -> None:
        self._buffer = bytearray()
        self._pos = 0  # start of the first unread byte; the buffer is compacted on feed()
        self._max = max_payload
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out as frames."""
        return len(self._buffer) - self._pos

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or ``None`` until more bytes arrive. Raises :class:`FrameError`."""
        if self._error is not None:
            raise self._error
        if self.buffered < HEADER_SIZE:
            return None
        try:
            frame = self._parse()
        except FrameError as exc:
            self._error = exc
            raise
        return frame

    def _parse(self) -> Frame | None:
        version, ftype, flags, stream_id, length = HEADER.unpack_from(self._buffer, self._pos)
        if version != VERSION:
            raise FrameError(
                MuxErrorCode.PROTOCOL_ERROR,
                f"bad version byte {version:#04x} (expected {VERSION}): not a tcppunch session stream?",
            )
        if ftype not in _TYPES:
            raise FrameError(MuxErrorCode.PROTOCOL_ERROR, f"unknown frame type {ftype}")
        if length > self._max:
            raise FrameError(
                MuxErrorCode.FRAME_TOO_LARGE, f"frame payload of {length} bytes exceeds the limit of {self._max}"
            )
        start = self._pos + HEADER_SIZE
        if len(self._buffer) < start + length:
            return None
        payload = bytes(self._buffer[start : start + length])
        self._pos = start + length
        frame = Frame(FrameType(ftype), Flag(flags), stream_id, payload)
        check_frame(frame)
        return frame
