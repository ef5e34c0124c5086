"""NAT-PMP (RFC 6886), sans-I/O: the external-address request and the TCP mapping request.

Layout (RFC 6886 sections 3.2 and 3.3): requests are 2 bytes (version 0, opcode 0) or 12 bytes
(version, opcode 2 for TCP, 16 reserved bits, internal port, suggested external port, lifetime);
responses set bit 7 of the opcode and carry a 16-bit result code and the seconds since the gateway's
epoch began, then the external IPv4 address (12 bytes in all) or the ports and lifetime (16 bytes).
A mapping request with lifetime 0 deletes the mapping (section 3.4).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

VERSION = 0
SERVER_PORT = 5351
RESPONSE_BIT = 0x80

_ADDRESS_RESPONSE = struct.Struct("!BBHI4s")
_MAP_REQUEST = struct.Struct("!BBHHHI")
_MAP_RESPONSE = struct.Struct("!BBHIHHI")


class Opcode(IntEnum):
    EXTERNAL_ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2


class ResultCode(IntEnum):
    """NAT-PMP result codes (RFC 6886 section 3.5)."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2  # refused: the gateway supports NAT-PMP but it is turned off or not allowed
    NETWORK_FAILURE = 3  # e.g. the gateway has no external address yet
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


class NatPmpParseError(ValueError):
    """The bytes are not a well-formed NAT-PMP response (the text says what is wrong)."""


def external_address_request() -> bytes:
    return bytes([VERSION, Opcode.EXTERNAL_ADDRESS])


def map_request(internal_port: int, lifetime: int, suggested_port: int = 0) -> bytes:
    """A TCP mapping request; ``lifetime`` 0 (with suggested port 0) deletes the mapping."""
    if not 1 <= internal_port <= 0xFFFF or not 0 <= suggested_port <= 0xFFFF:
        raise ValueError("ports must be 1..65535 (suggested: 0..65535)")
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError("lifetime must fit 32 bits")
    return _MAP_REQUEST.pack(VERSION, Opcode.MAP_TCP, 0, internal_port, suggested_port, lifetime)


@dataclass(frozen=True)
class AddressResponse:
    result: ResultCode
    epoch: int
    external_ip: str


@dataclass(frozen=True)
class MapResponse:
    result: ResultCode
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int
    opcode: Opcode = Opcode.MAP_TCP


def parse_response(data: bytes) -> AddressResponse | MapResponse:
    """Parse one NAT-PMP response datagram; raise :class:`NatPmpParseError` on any defect.

    An error response may be cut short after the epoch (RFC 6886 section 3.5 lets a gateway answer an
    unsupported version or opcode with just the header); it parses with zero fields.
    """
    if len(data) < 8:
        raise NatPmpParseError(f"{len(data)} bytes: shorter than the 8-byte NAT-PMP response header")
    version, r_op, raw_result, epoch = struct.unpack_from("!BBHI", data)
    if version != VERSION:
        raise NatPmpParseError(f"version {version}, not {VERSION}")
    if not r_op & RESPONSE_BIT:
        raise NatPmpParseError("opcode without bit 7: a request, not a response")
    try:
        opcode, result = Opcode(r_op & 0x7F), ResultCode(raw_result)
    except ValueError as exc:
        raise NatPmpParseError(str(exc)) from None
    if opcode is Opcode.EXTERNAL_ADDRESS:
        return _address(data, result, epoch)
    return _mapping(data, opcode, result, epoch)


def _address(data: bytes, result: ResultCode, epoch: int) -> AddressResponse:
    if len(data) == 8 and result is not ResultCode.SUCCESS:
        return AddressResponse(result, epoch, "0.0.0.0")
    if len(data) != _ADDRESS_RESPONSE.size:
        raise NatPmpParseError(f"external address response of {len(data)} bytes, expected 12")
    raw = _ADDRESS_RESPONSE.unpack(data)[4]
    return AddressResponse(result, epoch, str(ipaddress.IPv4Address(raw)))


def _mapping(data: bytes, opcode: Opcode, result: ResultCode, epoch: int) -> MapResponse:
    if len(data) == 8 and result is not ResultCode.SUCCESS:
        return MapResponse(result, epoch, 0, 0, 0, opcode)
    if len(data) != _MAP_RESPONSE.size:
        raise NatPmpParseError(f"mapping response of {len(data)} bytes, expected 16")
    _, _, _, _, internal, external, lifetime = _MAP_RESPONSE.unpack(data)
    return MapResponse(result, epoch, internal, external, lifetime, opcode)
