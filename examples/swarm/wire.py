"""The piece protocol between two swarm peers, sans-I/O: messages in, bytes out, and a decoder that
takes whatever bytes arrived and returns whole messages.

Frame: 4-byte big-endian length of what follows, 1-byte type, payload.

======== ==== ==========================================================
message  type payload
======== ==== ==========================================================
HANDSHAKE 0   ``TPSW`` magic, version 1, 32-byte info hash, id length, id (UTF-8)
BITFIELD  1   one bit per piece, most significant bit first
HAVE      2   u32 piece index
REQUEST   3   u32 piece index (whole pieces: the example keeps it simple)
PIECE     4   u32 piece index + the piece's bytes
CANCEL    5   u32 piece index
======== ==== ==========================================================

The decoder checks structure and sizes only (a frame larger than ``max_frame`` is refused from its header,
before its bytes are buffered); what an index means is the session's business.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"TPSW"
VERSION = 1
MAX_ID_BYTES = 64
HEADER = struct.Struct("!IB")
INDEX = struct.Struct("!I")


class WireError(ValueError):
    """The other peer broke the protocol; the connection should be closed with this message."""


class MessageType(IntEnum):
    HANDSHAKE = 0
    BITFIELD = 1
    HAVE = 2
    REQUEST = 3
    PIECE = 4
    CANCEL = 5


@dataclass(frozen=True)
class Handshake:
    info_hash: bytes
    peer_id: str


@dataclass(frozen=True)
class Bitfield:
    bits: bytes


@dataclass(frozen=True)
class Have:
    index: int


@dataclass(frozen=True)
class Request:
    index: int


@dataclass(frozen=True)
class Piece:
    index: int
    data: bytes


@dataclass(frozen=True)
class Cancel:
    index: int


Message = Handshake | Bitfield | Have | Request | Piece | Cancel


def encode(msg: Message) -> bytes:
    """One complete frame."""
    kind: MessageType
    match msg:
        case Handshake(info_hash, peer_id):
            raw_id = peer_id.encode()
            if len(info_hash) != 32 or not 0 < len(raw_id) <= MAX_ID_BYTES:
                raise ValueError("handshake: info hash must be 32 bytes and the id 1-64 bytes")
            kind, payload = MessageType.HANDSHAKE, MAGIC + bytes([VERSION]) + info_hash + bytes([len(raw_id)]) + raw_id
        case Bitfield(bits):
            kind, payload = MessageType.BITFIELD, bits
        case Have(index):
            kind, payload = MessageType.HAVE, INDEX.pack(index)
        case Request(index):
            kind, payload = MessageType.REQUEST, INDEX.pack(index)
        case Cancel(index):
            kind, payload = MessageType.CANCEL, INDEX.pack(index)
        case Piece(index, data):
            return HEADER.pack(1 + INDEX.size + len(data), MessageType.PIECE) + INDEX.pack(index) + data
    return HEADER.pack(1 + len(payload), kind) + payload


def decode_payload(kind: int, payload: bytes) -> Message:
    """The message of one frame's type and payload."""
    try:
        mtype = MessageType(kind)
    except ValueError:
        raise WireError(f"unknown message type {kind}") from None
    if mtype is MessageType.HANDSHAKE:
        if len(payload) < 38 or payload[:4] != MAGIC:
            raise WireError("handshake: not a tcppunch-swarm handshake (bad magic or too short)")
        if payload[4] != VERSION:
            raise WireError(f"handshake: protocol version {payload[4]}, this peer speaks {VERSION}")
        size = payload[37]
        raw_id = payload[38:]
        if not 0 < size <= MAX_ID_BYTES or len(raw_id) != size:
            raise WireError(f"handshake: peer id length {size} does not match its {len(raw_id)} bytes (1-64)")
        try:
            peer_id = raw_id.decode()
        except UnicodeDecodeError:
            raise WireError("handshake: peer id is not UTF-8") from None
        return Handshake(payload[5:37], peer_id)
    if mtype is MessageType.BITFIELD:
        return Bitfield(payload)
    if mtype is MessageType.PIECE:
        if len(payload) < INDEX.size:
            raise WireError("piece: shorter than its index")
        return Piece(INDEX.unpack_from(payload)[0], payload[INDEX.size:])
    if len(payload) != INDEX.size:
        raise WireError(f"{mtype.name.lower()}: payload of {len(payload)} bytes, expected 4")
    (index,) = INDEX.unpack(payload)
    if mtype is MessageType.HAVE:
        return Have(index)
    if mtype is MessageType.REQUEST:
        return Request(index)
    return Cancel(index)


class Decoder:
    """Feed bytes as they arrive; get whole messages. Raises :class:`WireError` on the first bad frame
    (and keeps raising: a stream is not resynchronised after garbage)."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._error: WireError | None = None

    def feed(self, data: bytes) -> list[Message]:
        if self._error is not None:
            raise self._error
        self._buffer += data
        messages: list[Message] = []
        try:
            while len(self._buffer) >= INDEX.size:
                (length,) = INDEX.unpack_from(self._buffer)  # the length alone decides whether to wait
                if length == 0:
                    raise WireError("frame of length 0 (no type byte)")
                if length > self.max_frame:
                    raise WireError(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
                end = 4 + length
                if len(self._buffer) < end:
                    break
                kind = self._buffer[4]
                payload = bytes(self._buffer[HEADER.size:end])
                del self._buffer[:end]
                messages.append(decode_payload(kind, payload))
        except WireError as exc:
            self._error = exc
            raise
        return messages

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def max_frame_for(piece_size: int, piece_count: int) -> int:
    """The largest legal frame in a swarm of this shape: a whole PIECE, the BITFIELD, or a HANDSHAKE."""
    return max(1 + INDEX.size + piece_size, 1 + -(-piece_count // 8), 1 + 38 + MAX_ID_BYTES)


def pack_bits(indexes: Iterable[int], count: int) -> bytes:
    out = bytearray(-(-count // 8))
    for i in indexes:
        if not 0 <= i < count:
            raise ValueError(f"piece {i} out of range 0..{count - 1}")
        out[i // 8] |= 0x80 >> (i % 8)
    return bytes(out)


def unpack_bits(bits: bytes, count: int) -> set[int]:
    """Piece indexes set in a BITFIELD; raises WireError if its size or spare bits are wrong."""
    if len(bits) != -(-count // 8):
        raise WireError(f"bitfield of {len(bits)} bytes for {count} pieces (expected {-(-count // 8)})")
    have = {i for i in range(count) if bits[i // 8] & (0x80 >> (i % 8))}
    spare = count % 8
    if spare and bits[-1] & (0xFF >> spare):
        raise WireError("bitfield sets bits past the last piece")
    return have
