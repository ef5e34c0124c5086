"""PCP, the Port Control Protocol (RFC 6887), sans-I/O: MAP and ANNOUNCE requests and responses.

Only what a host needs to open one inbound TCP mapping on its gateway. Layout (RFC 6887 sections 7.1,
7.2, 11.1): every message starts with a 24-byte header; a MAP request or response carries 36 more bytes
(96-bit nonce, protocol, 24 reserved bits, internal port, external port, a 128-bit external address).
IPv4 addresses travel as IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``). Options are not sent; options
in a response are skipped (their lengths are still checked).

Bytes in, dataclasses out; every defect raises :class:`PcpParseError` with what was wrong, so a client
drops a bad datagram and keeps waiting for a good one.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

VERSION = 2
SERVER_PORT = 5351  # the gateway listens here (shared with NAT-PMP)
CLIENT_PORT = 5350  # where ANNOUNCE is multicast from the server after a restart
MAX_MESSAGE = 1100  # RFC 6887 section 7: no PCP message is longer
HEADER_LENGTH = 24
MAP_LENGTH = 36
NONCE_LENGTH = 12
RESPONSE_BIT = 0x80
PROTOCOL_TCP = 6
PROTOCOL_UDP = 17

_REQUEST_HEADER = struct.Struct("!BBHI16s")
_RESPONSE_HEADER = struct.Struct("!BBBBII12s")
_MAP = struct.Struct("!12sB3sHH16s")
_OPTION = struct.Struct("!BBH")
E = TypeVar("E", bound=IntEnum)


class Opcode(IntEnum):
    """PCP opcodes (RFC 6887 section 19.2); PEER is not used here."""

    ANNOUNCE = 0
    MAP = 1
    PEER = 2


class ResultCode(IntEnum):
    """PCP result codes (RFC 6887 section 7.4)."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13

    @property
    def is_long_lived(self) -> bool:
        """Errors the RFC calls long lifetime: asking again soon will not help (section 7.4)."""
        return self in _LONG_LIVED


_LONG_LIVED = frozenset({ResultCode.UNSUPP_VERSION, ResultCode.NOT_AUTHORIZED, ResultCode.MALFORMED_REQUEST,
                         ResultCode.UNSUPP_OPCODE, ResultCode.UNSUPP_OPTION, ResultCode.MALFORMED_OPTION,
                         ResultCode.UNSUPP_PROTOCOL, ResultCode.ADDRESS_MISMATCH})


class PcpParseError(ValueError):
    """The bytes are not a well-formed PCP response (the text says what is wrong)."""


@dataclass(frozen=True)
class MapRequest:
    """Ask for (lifetime > 0) or delete (lifetime 0) a mapping of ``internal_port`` (RFC 6887 section 11.1)."""

    nonce: bytes
    client_ip: str
    internal_port: int
    lifetime: int
    protocol: int = PROTOCOL_TCP
    suggested_port: int = 0
    suggested_ip: str = "0.0.0.0"

    def __post_init__(self) -> None:
        if len(self.nonce) != NONCE_LENGTH:
            raise ValueError(f"a PCP nonce is {NONCE_LENGTH} bytes")
        if not 0 <= self.lifetime <= 0xFFFFFFFF:
            raise ValueError("lifetime must fit 32 bits")
        for port in (self.internal_port, self.suggested_port):
            if not 0 <= port <= 0xFFFF:
                raise ValueError(f"port {port} out of range")
        if self.internal_port == 0 and self.protocol != 0:
            raise ValueError("internal port 0 means all ports and needs protocol 0")

    def encode(self) -> bytes:
        header = _REQUEST_HEADER.pack(VERSION, Opcode.MAP, 0, self.lifetime, _pack_ip(self.client_ip))
        body = _MAP.pack(self.nonce, self.protocol, bytes(3), self.internal_port, self.suggested_port,
                         _pack_ip(self.suggested_ip))
        return header + body


def announce_request(client_ip: str) -> bytes:
    """An ANNOUNCE request (RFC 6887 section 14.1): the cheapest "do you speak PCP?" probe."""
    return _REQUEST_HEADER.pack(VERSION, Opcode.ANNOUNCE, 0, 0, _pack_ip(client_ip))


@dataclass(frozen=True)
class MapResult:
    """The MAP-specific part of a response: what the server assigned."""

    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_ip: str


@dataclass(frozen=True)
class Response:
    """A PCP response. ``epoch`` is the server's epoch time (seconds since its state began);
    ``mapping`` is set for MAP responses."""

    opcode: Opcode
    result: ResultCode
    lifetime: int
    epoch: int
    mapping: MapResult | None = None

    @property
    def ok(self) -> bool:
        return self.result is ResultCode.SUCCESS


def parse_response(data: bytes) -> Response:
    """Parse one PCP response datagram; raise :class:`PcpParseError` on any defect."""
    if len(data) < HEADER_LENGTH:
        raise PcpParseError(f"{len(data)} bytes: shorter than the {HEADER_LENGTH}-byte PCP header")
    if len(data) > MAX_MESSAGE or len(data) % 4:
        raise PcpParseError(f"{len(data)} bytes: a PCP message is a multiple of 4 bytes, at most {MAX_MESSAGE}")
    version, r_op, _, raw_result, lifetime, epoch, _ = _RESPONSE_HEADER.unpack_from(data)
    if version != VERSION:
        raise PcpParseError(f"version {version}, not {VERSION}")
    if not r_op & RESPONSE_BIT:
        raise PcpParseError("R bit clear: a request, not a response")
    opcode = _enum(Opcode, r_op & 0x7F, "opcode")
    result = _enum(ResultCode, raw_result, "result code")
    offset = HEADER_LENGTH
    mapping = None
    if opcode is Opcode.MAP and len(data) >= HEADER_LENGTH + MAP_LENGTH:
        nonce, protocol, _, internal, external, ip = _MAP.unpack_from(data, offset)
        mapping = MapResult(nonce, protocol, internal, external, _unpack_ip(ip))
        offset += MAP_LENGTH
    elif opcode is Opcode.MAP and result is ResultCode.SUCCESS:
        raise PcpParseError("a successful MAP response without its 36-byte MAP body")
    elif opcode is Opcode.MAP:
        offset = len(data)  # an error response may be a bare header (RFC 6887 section 8.3)
    _check_options(data, offset)
    return Response(opcode, result, lifetime, epoch, mapping)


def _check_options(data: bytes, offset: int) -> None:
    while offset < len(data):
        if len(data) - offset < _OPTION.size:
            raise PcpParseError(f"truncated option header at byte {offset}")
        _, _, length = _OPTION.unpack_from(data, offset)
        padded = (length + 3) & ~3
        offset += _OPTION.size + padded
        if offset > len(data):
            raise PcpParseError(f"option of {length} bytes runs past the end of the message")


def _enum(kind: type[E], raw: int, what: str) -> E:
    try:
        return kind(raw)
    except ValueError:
        raise PcpParseError(f"unknown {what} {raw}") from None


def _pack_ip(text: str) -> bytes:
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed).packed
    return address.packed


def _unpack_ip(raw: bytes) -> str:
    address = ipaddress.IPv6Address(raw)
    return str(address.ipv4_mapped) if address.ipv4_mapped is not None else str(address)


def epoch_consistent(previous_epoch: int, previous_at: float, epoch: int, now: float) -> bool:
    """RFC 6887 section 8.5, the client's check: False when the server's epoch jumped back or drifted
    from our clock by more than 1/16 plus 2 s, i.e. it lost its state and every mapping must be redone."""
    if epoch + 1 < previous_epoch:
        return False
    client_delta = now - previous_at
    server_delta = epoch - previous_epoch
    if client_delta + 2 < server_delta - server_delta / 16:
        return False
    return not server_delta + 2 < client_delta - client_delta / 16
