"""STUN messages (RFC 8489 / 5389, RFC 5780 attributes, RFC 3489 classic attributes), sans-I/O.

Bytes in, typed messages out, and back. No sockets, no clock. Parsing is strict: every length, bound,
family and FINGERPRINT is checked and any defect raises :class:`StunParseError` with a message that says
what is wrong and where, so a server can drop or reject a packet and keep serving.

Two dialects share one header layout:

* RFC 5389/8489: bytes 4..8 hold the magic cookie 0x2112A442, then a 96-bit transaction id.
* RFC 3489 ("classic", what pystun3 speaks): bytes 4..20 are one 128-bit transaction id.

A parsed message keeps the dialect in the length of :attr:`StunMessage.transaction_id`: 12 bytes for
RFC 5389, 16 bytes for classic. Encoding writes it back the same way, so a reply echoes the dialect.

:class:`StunStreamDecoder` frames STUN over TCP (RFC 8489 section 6.2.2: messages back to back, each
self-delimited by its header length).
"""

from __future__ import annotations

import binascii
import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import TypeVar

from tcppunch.wire.endpoint import Endpoint

MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_LENGTH = 20
FINGERPRINT_XOR = 0x5354554E
# Largest message body we accept. A Binding exchange is well under 200 bytes; RFC 8489 bounds UDP
# messages by the path MTU, and over TCP a bound is what stops a peer from making us buffer forever.
MAX_BODY_LENGTH = 2048

_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02


class StunParseError(ValueError):
    """The bytes are not a well-formed STUN message (the text says what is wrong).

    ``header`` is set by :class:`StunStreamDecoder` when the header was sound and only the attributes
    were bad, so a server can still answer the transaction with a 400.
    """

    header: StunHeader | None = None


class MessageClass(IntEnum):
    """The two class bits of the message type, in their encoded positions (RFC 8489 section 5)."""

    REQUEST = 0x000
    INDICATION = 0x010
    SUCCESS = 0x100
    ERROR = 0x110


class StunMethod(IntEnum):
    """STUN methods we speak. Unknown methods still parse (as a plain int)."""

    BINDING = 0x001


class AttributeType(IntEnum):
    """Attribute type codes (RFC 3489, 5389, 5780, 8489) plus our private CONNECT-BACK-RESULT."""

    MAPPED_ADDRESS = 0x0001
    RESPONSE_ADDRESS = 0x0002  # RFC 3489, obsolete
    CHANGE_REQUEST = 0x0003  # RFC 3489, revived by RFC 5780
    SOURCE_ADDRESS = 0x0004  # RFC 3489, replaced by RESPONSE-ORIGIN
    CHANGED_ADDRESS = 0x0005  # RFC 3489, replaced by OTHER-ADDRESS
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    XOR_MAPPED_ADDRESS = 0x0020
    # RFC 5780 section 7.6: fills a request so that the server may answer it without amplifying (a UDP
    # server of ours answers no more bytes than the request carried).
    PADDING = 0x0026
    SOFTWARE = 0x8022
    FINGERPRINT = 0x8028
    RESPONSE_ORIGIN = 0x802B
    OTHER_ADDRESS = 0x802C
    # Private, comprehension-optional (0x8000-0xFFFF): outcome of the TCP filtering connect-back, and the
    # server's alternate port when it has no alternate address (OTHER-ADDRESS is then omitted).
    CONNECT_BACK_RESULT = 0x8055
    ALTERNATE_PORT = 0x8056


# ---------------------------------------------------------------------------------------- attributes


@dataclass(frozen=True)
class _AddressAttribute:
    address: Endpoint


@dataclass(frozen=True)
class MappedAddress(_AddressAttribute):
    """MAPPED-ADDRESS: the requester's address as the server saw it (in clear)."""


@dataclass(frozen=True)
class XorMappedAddress(_AddressAttribute):
    """XOR-MAPPED-ADDRESS: same, obfuscated so that NATs rewriting payload addresses leave it alone."""


@dataclass(frozen=True)
class ResponseOrigin(_AddressAttribute):
    """RESPONSE-ORIGIN (RFC 5780): the server address the response was sent from."""


@dataclass(frozen=True)
class OtherAddress(_AddressAttribute):
    """OTHER-ADDRESS (RFC 5780): the server's alternate address and port."""


@dataclass(frozen=True)
class SourceAddress(_AddressAttribute):
    """SOURCE-ADDRESS (RFC 3489): the classic name of RESPONSE-ORIGIN."""


@dataclass(frozen=True)
class ChangedAddress(_AddressAttribute):
    """CHANGED-ADDRESS (RFC 3489): the classic name of OTHER-ADDRESS."""


@dataclass(frozen=True)
class ResponseAddress(_AddressAttribute):
    """RESPONSE-ADDRESS (RFC 3489): parsed for completeness; our server ignores it (reflection risk)."""


@dataclass(frozen=True)
class ChangeRequest:
    """CHANGE-REQUEST: ask the server to answer from its other IP and/or other port."""

    change_ip: bool = False
    change_port: bool = False


@dataclass(frozen=True)
class StunErrorCode:
    """ERROR-CODE: a 300-699 code and a reason phrase."""

    code: int
    reason: str = ""


@dataclass(frozen=True)
class Software:
    """SOFTWARE: a description of the agent that sent the message."""

    text: str


@dataclass(frozen=True)
class UnknownAttributes:
    """UNKNOWN-ATTRIBUTES: the comprehension-required types a 420 error did not understand."""

    types: tuple[int, ...]


class ConnectBackOutcome(StrEnum):
    """What happened when the server connected back to the requester (see :class:`ConnectBackResult`)."""

    CONNECTED = "connected"  # the requester's NAT let the SYN in and the requester accepted it
    REFUSED = "refused"  # an RST came back (the NAT, or the host, rejected the SYN)
    TIMEOUT = "timeout"  # nothing came back: the SYN was dropped
    UNAVAILABLE = "unavailable"  # the server cannot send from the requested source (no alternate)


_OUTCOME_CODES = {
    ConnectBackOutcome.CONNECTED: 1,
    ConnectBackOutcome.REFUSED: 2,
    ConnectBackOutcome.TIMEOUT: 3,
    ConnectBackOutcome.UNAVAILABLE: 4,
}
_OUTCOMES_BY_CODE = {code: outcome for outcome, code in _OUTCOME_CODES.items()}


@dataclass(frozen=True)
class ConnectBackResult:
    """CONNECT-BACK-RESULT (private, 0x8055): our TCP filtering test.

    A TCP Binding request carrying CHANGE-REQUEST makes our server open a TCP connection from the
    changed source (other IP and/or other port) to the requester's mapped endpoint before answering;
    this attribute carries the outcome and the source it connected from. Value layout: one byte outcome
    code, three reserved zero bytes, then the source address encoded as in MAPPED-ADDRESS.
    """

    outcome: ConnectBackOutcome
    source: Endpoint


@dataclass(frozen=True)
class AlternatePort:
    """ALTERNATE-PORT (private, 0x8056): the server's second port, sent when it has a single address.

    RFC 5780 OTHER-ADDRESS must differ in both address and port, so a one-address server omits it; this
    attribute still lets a client run the tests that need only a second port. Value: port, 2 zero bytes.
    """

    port: int


@dataclass(frozen=True)
class OpaqueAttribute:
    """Any attribute we do not interpret (USERNAME, MESSAGE-INTEGRITY, PRIORITY, ...), kept as bytes."""

    type: int
    value: bytes


Attribute = (
    MappedAddress
    | XorMappedAddress
    | ResponseOrigin
    | OtherAddress
    | SourceAddress
    | ChangedAddress
    | ResponseAddress
    | ChangeRequest
    | StunErrorCode
    | Software
    | UnknownAttributes
    | ConnectBackResult
    | AlternatePort
    | OpaqueAttribute
)

_ADDRESS_KINDS: dict[int, type[_AddressAttribute]] = {
    AttributeType.MAPPED_ADDRESS: MappedAddress,
    AttributeType.RESPONSE_ADDRESS: ResponseAddress,
    AttributeType.SOURCE_ADDRESS: SourceAddress,
    AttributeType.CHANGED_ADDRESS: ChangedAddress,
    AttributeType.RESPONSE_ORIGIN: ResponseOrigin,
    AttributeType.OTHER_ADDRESS: OtherAddress,
}
_ADDRESS_TYPES: dict[type[_AddressAttribute], int] = {kind: code for code, kind in _ADDRESS_KINDS.items()}

# Comprehension-required attribute types (< 0x8000) this codec understands; a request carrying any other
# one gets a 420 (RFC 8489 section 6.3.1.1) from a server.
KNOWN_REQUIRED_TYPES = frozenset(int(t) for t in AttributeType if t < 0x8000)

A = TypeVar("A")


# ------------------------------------------------------------------------------------------ message


@dataclass(frozen=True)
class StunMessage:
    """A STUN message. ``transaction_id`` is 12 bytes (RFC 5389) or 16 bytes (classic RFC 3489).

    ``fingerprint``: on encoding, append a FINGERPRINT attribute; after parsing, whether one was present
    (it has been verified by then). FINGERPRINT is never in ``attributes``.
    """

    method: int
    message_class: MessageClass
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()
    fingerprint: bool = False

    @property
    def classic(self) -> bool:
        """True for an RFC 3489 message (no magic cookie)."""
        return len(self.transaction_id) == 16

    def find(self, kind: type[A]) -> A | None:
        """The first attribute of this kind, or None."""
        for attribute in self.attributes:
            if type(attribute) is kind:
                return attribute
        return None

    def mapped(self) -> Endpoint | None:
        """The reflexive address: XOR-MAPPED-ADDRESS if present, else MAPPED-ADDRESS."""
        xor = self.find(XorMappedAddress)
        if xor is not None:
            return xor.address
        plain = self.find(MappedAddress)
        return None if plain is None else plain.address

    def other(self) -> Endpoint | None:
        """The alternate server address: OTHER-ADDRESS if present, else CHANGED-ADDRESS."""
        for kind in (OtherAddress, ChangedAddress):
            found = self.find(kind)
            if found is not None:
                return found.address
        return None

    def unknown_required(self) -> tuple[int, ...]:
        """Comprehension-required attribute types in this message that we do not understand."""
        return tuple(
            a.type
            for a in self.attributes
            if isinstance(a, OpaqueAttribute) and a.type < 0x8000 and a.type not in KNOWN_REQUIRED_TYPES
        )


def binding_request(
    transaction_id: bytes, attributes: Iterable[Attribute] = (), fingerprint: bool = False
) -> StunMessage:
    """A Binding request with the given transaction id (12 bytes: RFC 5389, 16 bytes: classic)."""
    return StunMessage(StunMethod.BINDING, MessageClass.REQUEST, transaction_id, tuple(attributes), fingerprint)


def padded(data: bytes, total: int) -> bytes:
    """``data`` (one encoded STUN message without FINGERPRINT) grown to ``total`` bytes by a PADDING
    attribute, its header length updated. Unchanged when it is already that long (or nearly)."""
    room = total - len(data) - 4
    if room < 0:
        return data
    room -= room % 4
    grown = data + struct.pack("!HH", AttributeType.PADDING, room) + bytes(room)
    return grown[:2] + struct.pack("!H", len(grown) - HEADER_LENGTH) + grown[4:]


def looks_like_stun(first8: bytes) -> bool:
    """Whether the first bytes of a stream are a STUN (RFC 5389+) header: two zero bits and the cookie.

    The coordinator uses this to tell STUN from its own protocol on a shared TCP port.
    """
    return len(first8) >= 8 and first8[0] & 0xC0 == 0 and first8[4:8] == MAGIC_COOKIE_BYTES


# ------------------------------------------------------------------------------------------ encoding


def encode_message(message: StunMessage) -> bytes:
    """The wire bytes of ``message`` (FINGERPRINT appended when ``message.fingerprint``)."""
    if len(message.transaction_id) not in (12, 16):
        raise ValueError("transaction id must be 12 bytes (RFC 5389) or 16 bytes (RFC 3489)")
    if not 0 <= message.method <= 0xFFF:
        raise ValueError(f"method {message.method:#x} does not fit in 12 bits")
    magic = message.transaction_id[:4] if message.classic else MAGIC_COOKIE_BYTES
    tid_tail = message.transaction_id[4:] if message.classic else message.transaction_id
    body = b"".join(_encode_attribute(a, magic + tid_tail) for a in message.attributes)
    msg_type = _encode_type(message.method, message.message_class)
    header_tid = message.transaction_id if message.classic else MAGIC_COOKIE_BYTES + message.transaction_id
    if message.fingerprint:
        partial = struct.pack("!HH", msg_type, len(body) + 8) + header_tid + body
        crc = (binascii.crc32(partial) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        return partial + struct.pack("!HHI", AttributeType.FINGERPRINT, 4, crc)
    return struct.pack("!HH", msg_type, len(body)) + header_tid + body


def _encode_type(method: int, message_class: int) -> int:
    return (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | message_class


def _tlv(attr_type: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"attribute {attr_type:#06x} value is longer than 65535 bytes")
    return struct.pack("!HH", attr_type, len(value)) + value + b"\x00" * (-len(value) % 4)


def _encode_address(address: Endpoint, xor_pad: bytes | None = None) -> bytes:
    ip = ipaddress.ip_address(address.ip)
    family = _FAMILY_IPV4 if ip.version == 4 else _FAMILY_IPV6
    port_ip = struct.pack("!H", address.port) + ip.packed
    if xor_pad is not None:
        port_ip = bytes(b ^ p for b, p in zip(port_ip, xor_pad, strict=False))
    return struct.pack("!BB", 0, family) + port_ip


def _xor_pad(header_tid: bytes) -> bytes:
    # Port is XORed with the cookie's top 16 bits, the address with cookie (+ transaction id for IPv6):
    # the pad for the port+address bytes is therefore cookie[0:2] + cookie + tid. (For a classic message
    # the "cookie" is the first 4 bytes of its 16-byte transaction id.)
    return header_tid[0:2] + header_tid


def _encode_attribute(attribute: Attribute, header_tid: bytes) -> bytes:
    if isinstance(attribute, XorMappedAddress):
        value = _encode_address(attribute.address, _xor_pad(header_tid))
        return _tlv(AttributeType.XOR_MAPPED_ADDRESS, value)
    if isinstance(attribute, _AddressAttribute):
        return _tlv(_ADDRESS_TYPES[type(attribute)], _encode_address(attribute.address))
    if isinstance(attribute, ChangeRequest):
        flags = (0x4 if attribute.change_ip else 0) | (0x2 if attribute.change_port else 0)
        return _tlv(AttributeType.CHANGE_REQUEST, struct.pack("!I", flags))
    if isinstance(attribute, StunErrorCode):
        if not 300 <= attribute.code <= 699:
            raise ValueError(f"error code {attribute.code} is outside 300-699")
        value = struct.pack("!HBB", 0, attribute.code // 100, attribute.code % 100)
        return _tlv(AttributeType.ERROR_CODE, value + attribute.reason.encode())
    if isinstance(attribute, Software):
        return _tlv(AttributeType.SOFTWARE, attribute.text.encode())
    if isinstance(attribute, UnknownAttributes):
        return _tlv(AttributeType.UNKNOWN_ATTRIBUTES, b"".join(struct.pack("!H", t) for t in attribute.types))
    if isinstance(attribute, ConnectBackResult):
        value = struct.pack("!B3x", _OUTCOME_CODES[attribute.outcome]) + _encode_address(attribute.source)
        return _tlv(AttributeType.CONNECT_BACK_RESULT, value)
    if isinstance(attribute, AlternatePort):
        return _tlv(AttributeType.ALTERNATE_PORT, struct.pack("!H2x", attribute.port))
    return _tlv(attribute.type, attribute.value)


# ------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class StunHeader:
    """The fixed 20-byte header, checked for the two zero bits and a body length multiple of 4."""

    method: int
    message_class: MessageClass
    body_length: int
    transaction_id: bytes  # 12 bytes with the cookie, 16 bytes without


def parse_header(data: bytes, require_cookie: bool = False) -> StunHeader:
    """Parse and check the first 20 bytes of ``data``."""
    if len(data) < HEADER_LENGTH:
        raise StunParseError(f"message is {len(data)} bytes, shorter than the 20-byte STUN header")
    msg_type, body_length = struct.unpack_from("!HH", data)
    if msg_type & 0xC000:
        raise StunParseError(f"first two bits are not zero (type {msg_type:#06x}): not a STUN message")
    if body_length % 4:
        raise StunParseError(f"message length {body_length} is not a multiple of 4")
    has_cookie = data[4:8] == MAGIC_COOKIE_BYTES
    if require_cookie and not has_cookie:
        raise StunParseError(f"magic cookie is {data[4:8].hex()}, expected 2112a442")
    message_class = MessageClass(msg_type & 0x0110)
    method = (msg_type & 0x000F) | ((msg_type & 0x00E0) >> 1) | ((msg_type & 0x3E00) >> 2)
    tid = bytes(data[8:20]) if has_cookie else bytes(data[4:20])
    return StunHeader(method, message_class, body_length, tid)


def parse_message(data: bytes, require_cookie: bool = False) -> StunMessage:
    """Parse one whole STUN message (exactly ``data``, no trailing bytes).

    Classic RFC 3489 messages (no cookie) are accepted unless ``require_cookie``.
    """
    data = bytes(data)
    header = parse_header(data, require_cookie)
    if len(data) != HEADER_LENGTH + header.body_length:
        raise StunParseError(
            f"header says {header.body_length} body bytes but {len(data) - HEADER_LENGTH} follow the header"
        )
    if header.body_length > MAX_BODY_LENGTH:
        raise StunParseError(f"message length {header.body_length} exceeds the {MAX_BODY_LENGTH}-byte limit")
    header_tid = data[4:20]
    attributes: list[Attribute] = []
    fingerprint = False
    pos = HEADER_LENGTH
    while pos < len(data):
        if fingerprint:
            raise StunParseError(f"attribute at offset {pos} follows FINGERPRINT, which must be last")
        if pos + 4 > len(data):
            raise StunParseError(f"truncated attribute header at offset {pos}")
        attr_type, attr_len = struct.unpack_from("!HH", data, pos)
        end = pos + 4 + attr_len
        padded_end = end + (-attr_len % 4)
        if padded_end > len(data):
            raise StunParseError(
                f"attribute {attr_type:#06x} at offset {pos} claims {attr_len} bytes, past the end of message"
            )
        value = data[pos + 4 : end]
        if attr_type == AttributeType.FINGERPRINT:
            if attr_len != 4:
                raise StunParseError(f"FINGERPRINT is {attr_len} bytes, expected 4")
            expected = _fingerprint_of(data[:pos])
            (got,) = struct.unpack("!I", value)
            if got != expected:
                raise StunParseError(f"FINGERPRINT mismatch: got {got:#010x}, computed {expected:#010x}")
            fingerprint = True
        else:
            attributes.append(_decode_attribute(attr_type, value, header_tid))
        pos = padded_end
    return StunMessage(header.method, header.message_class, header.transaction_id, tuple(attributes), fingerprint)


def _fingerprint_of(prefix: bytes) -> int:
    # CRC over the message up to FINGERPRINT, with the header length counting the FINGERPRINT attribute.
    adjusted = prefix[:2] + struct.pack("!H", len(prefix) - HEADER_LENGTH + 8) + prefix[4:]
    return (binascii.crc32(adjusted) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def _decode_address(name: str, value: bytes, xor_pad: bytes | None = None) -> Endpoint:
    if len(value) < 4:
        raise StunParseError(f"{name} is {len(value)} bytes, too short for an address")
    family = value[1]
    if family == _FAMILY_IPV4:
        expected = 8
    elif family == _FAMILY_IPV6:
        expected = 20
    else:
        raise StunParseError(f"{name} has unknown address family {family:#04x}")
    if len(value) != expected:
        raise StunParseError(f"{name} is {len(value)} bytes, expected {expected} for its address family")
    port_ip = value[2:]
    if xor_pad is not None:
        port_ip = bytes(b ^ p for b, p in zip(port_ip, xor_pad, strict=False))
    (port,) = struct.unpack_from("!H", port_ip)
    return Endpoint(str(ipaddress.ip_address(port_ip[2:])), port)


def _decode_attribute(attr_type: int, value: bytes, header_tid: bytes) -> Attribute:
    kind = _ADDRESS_KINDS.get(attr_type)
    if kind is not None:
        return kind(_decode_address(AttributeType(attr_type).name.replace("_", "-"), value))  # type: ignore[return-value]
    if attr_type == AttributeType.XOR_MAPPED_ADDRESS:
        return XorMappedAddress(_decode_address("XOR-MAPPED-ADDRESS", value, _xor_pad(header_tid)))
    if attr_type == AttributeType.CHANGE_REQUEST:
        if len(value) != 4:
            raise StunParseError(f"CHANGE-REQUEST is {len(value)} bytes, expected 4")
        (flags,) = struct.unpack("!I", value)
        return ChangeRequest(change_ip=bool(flags & 0x4), change_port=bool(flags & 0x2))
    if attr_type == AttributeType.ERROR_CODE:
        if len(value) < 4:
            raise StunParseError(f"ERROR-CODE is {len(value)} bytes, shorter than 4")
        code = (value[2] & 0x07) * 100 + value[3]
        if not 300 <= code <= 699 or value[3] > 99:
            raise StunParseError(f"ERROR-CODE {value[2] & 0x07}/{value[3]} is not a 300-699 code")
        return StunErrorCode(code, _utf8("ERROR-CODE reason", value[4:]))
    if attr_type == AttributeType.SOFTWARE:
        return Software(_utf8("SOFTWARE", value))
    if attr_type == AttributeType.UNKNOWN_ATTRIBUTES:
        if len(value) % 2:
            raise StunParseError(f"UNKNOWN-ATTRIBUTES is {len(value)} bytes, not a multiple of 2")
        return UnknownAttributes(tuple(t for (t,) in struct.iter_unpack("!H", value)))
    if attr_type == AttributeType.CONNECT_BACK_RESULT:
        if len(value) < 4:
            raise StunParseError(f"CONNECT-BACK-RESULT is {len(value)} bytes, shorter than 4")
        outcome = _OUTCOMES_BY_CODE.get(value[0])
        if outcome is None:
            raise StunParseError(f"CONNECT-BACK-RESULT has unknown outcome code {value[0]}")
        return ConnectBackResult(outcome, _decode_address("CONNECT-BACK-RESULT source", value[4:]))
    if attr_type == AttributeType.ALTERNATE_PORT:
        if len(value) != 4:
            raise StunParseError(f"ALTERNATE-PORT is {len(value)} bytes, expected 4")
        return AlternatePort(struct.unpack_from("!H", value)[0])
    return OpaqueAttribute(attr_type, value)


def _utf8(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StunParseError(f"{name} is not valid UTF-8 (byte {exc.start})") from None


# ---------------------------------------------------------------------------------- stream framing


@dataclass
class StunStreamDecoder:
    """Frames STUN messages from a TCP byte stream (RFC 8489 section 6.2.2).

    ``receive_data(chunk)`` then ``next_message()`` until it returns None. Bytes after a message stay
    buffered for the next one. A bad header (not STUN, no cookie, length not a multiple of 4 or over
    ``max_body_length``) raises :class:`StunParseError` as soon as the 20 header bytes are in, so a
    server can close the connection without waiting for a body that may never come; after such an error
    the stream has no recoverable framing and the decoder stays failed (``failed`` is True). A message
    whose header is sound but whose attributes are malformed raises too, but is consumed: the stream
    stays in step and the next message can be read (a server answers it with 400 and carries on).
    """

    max_body_length: int = MAX_BODY_LENGTH
    _buffer: bytearray = field(default_factory=bytearray)
    _failed: StunParseError | None = None

    def receive_data(self, data: bytes) -> None:
        """Append bytes read from the stream."""
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buffer)

    def next_message(self) -> StunMessage | None:
        """The next whole message, or None if more bytes are needed."""
        if self._failed is not None:
            raise self._failed
        if len(self._buffer) < HEADER_LENGTH:
            if self._buffer and self._buffer[0] & 0xC0:
                self._failed = StunParseError("first two bits are not zero: not a STUN stream")
                raise self._failed
            return None
        try:
            header = parse_header(bytes(self._buffer[:HEADER_LENGTH]), require_cookie=True)
            if header.body_length > self.max_body_length:
                raise StunParseError(
                    f"message length {header.body_length} exceeds the {self.max_body_length}-byte limit"
                )
        except StunParseError as exc:
            self._failed = exc
            raise
        total = HEADER_LENGTH + header.body_length
        if len(self._buffer) < total:
            return None
        raw = bytes(self._buffer[:total])
        del self._buffer[:total]
        try:
            return parse_message(raw, require_cookie=True)
        except StunParseError as exc:
            exc.header = header
            raise

    @property
    def failed(self) -> bool:
        """Whether framing was lost (the stream must be closed)."""
        return self._failed is not None
