"""Byte framing of the coordinator protocol: an 8-byte preamble, then length-prefixed JSON frames.

Sans-I/O: :class:`FrameDecoder` takes bytes as they arrive (whole buffer, byte by byte, with trailing
data) and hands out JSON objects; it never reads a socket or a clock.

The preamble ``b"TPUNCH" + version(2 bytes)`` starts every connection a client opens to the coordinator
port. Its first byte ``T`` (0x54) has the top two bits ``01``; a STUN message always starts with ``00``
and carries the magic cookie at bytes 4..8, so one TCP port can serve both protocols: the server looks at
the first 8 bytes and knows which one it got (:func:`looks_like_stun`).
"""

from __future__ import annotations

import json
import struct
from enum import Enum
from typing import Any

MAGIC = b"TPUNCH"
VERSION = 1
PREAMBLE = MAGIC + struct.pack("!H", VERSION)
PREAMBLE_SIZE = len(PREAMBLE)
HEADER_SIZE = 4
# Large enough for a REGISTER with a full NAT report and a PEERS list of a hundred peers; small enough that
# a client cannot make the server buffer much before it is refused.
MAX_FRAME_SIZE = 64 * 1024

class ProtocolError(Exception):
    """The peer broke the protocol; ``code`` is the error code sent back in an ERROR frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def encode_frame(obj: dict[str, Any]) -> bytes:
    """One frame: 4-byte big-endian payload length, then the compact UTF-8 JSON payload."""
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(payload) > MAX_FRAME_SIZE:
        raise ValueError(f"frame of {len(payload)} bytes exceeds the limit of {MAX_FRAME_SIZE}")
    return struct.pack("!I", len(payload)) + payload


class _Stage(Enum):
    PREAMBLE = "preamble"
    FRAMES = "frames"
    FAILED = "failed"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_payload(payload: bytes) -> dict[str, Any]:
    """Decode one frame payload into a JSON object with a string ``type``."""
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("bad-frame", f"payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad-frame", "payload is not a JSON object")
    if not isinstance(obj.get("type"), str):
        raise ProtocolError("bad-frame", "payload has no string field 'type'")
    return obj


class FrameDecoder:
    """Incremental decoder: ``feed(bytes)`` then ``next_frame()`` until it returns ``None``.

    With ``expect_preamble`` the first 8 bytes must be :data:`PREAMBLE`. A frame longer than
    ``max_frame_size`` is refused from its header alone, before any of its body is buffered. After an
    error the decoder stays failed: the connection is to be closed.
    """

    def __init__(self, *, expect_preamble: bool = False, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._buffer = bytearray()
        self._stage = _Stage.PREAMBLE if expect_preamble else _Stage.FRAMES
        self._max = max_frame_size

    def feed(self, data: bytes) -> None:
        if self._stage is not _Stage.FAILED:
            self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed as a frame (bounded by header + max frame size)."""
        return len(self._buffer)

    def missing(self) -> int:
        """At least how many more bytes the next frame needs (0: call :meth:`next_frame`).

        Reading exactly this many never reads past the frame, which a relay join needs: every byte after
        its RELAY-OK belongs to the other peer.
        """
        if self._stage is _Stage.PREAMBLE:
            return max(0, PREAMBLE_SIZE - len(self._buffer))
        if len(self._buffer) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buffer)
        (size,) = struct.unpack("!I", self._buffer[:HEADER_SIZE])
        return 0 if size > self._max else max(0, HEADER_SIZE + size - len(self._buffer))

    def take_rest(self) -> bytes:
        """Hand over the unparsed bytes (a relay connection turns into a raw byte pipe after its frame)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    def next_frame(self) -> dict[str, Any] | None:
        """The next complete frame as a JSON object, ``None`` if more bytes are needed.

        Raises :class:`ProtocolError` on a bad preamble, an oversize or empty frame, or a bad payload.
        """
        try:
            return self._next()
        except ProtocolError:
            self._stage = _Stage.FAILED
            self._buffer.clear()
            raise

    def _next(self) -> dict[str, Any] | None:
        if self._stage is _Stage.FAILED:
            raise ProtocolError("bad-frame", "decoder already failed")
        if self._stage is _Stage.PREAMBLE:
            have = bytes(self._buffer[:PREAMBLE_SIZE])
            if not MAGIC.startswith(have[: len(MAGIC)]):
                raise ProtocolError("bad-preamble", f"connection does not start with {MAGIC!r}")
            if len(have) < PREAMBLE_SIZE:
                return None
            (version,) = struct.unpack("!H", have[len(MAGIC) :])
            if version != VERSION:
                raise ProtocolError(
                    "unsupported-version", f"protocol version {version} is not supported (want {VERSION})"
                )
            del self._buffer[:PREAMBLE_SIZE]
            self._stage = _Stage.FRAMES
        if len(self._buffer) < HEADER_SIZE:
            return None
        (size,) = struct.unpack("!I", self._buffer[:HEADER_SIZE])
        if size > self._max:
            raise ProtocolError("frame-too-large", f"frame of {size} bytes exceeds {self._max}")
        if size == 0:
            raise ProtocolError("bad-frame", "empty frame")
        if len(self._buffer) < HEADER_SIZE + size:
            return None
        payload = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + size])
        del self._buffer[: HEADER_SIZE + size]
        return parse_payload(payload)
