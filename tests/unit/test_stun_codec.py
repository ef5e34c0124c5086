"""The STUN codec: RFC 5769 vectors, aioice cross-check both ways, classic messages, framing, fuzz."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import struct

import pytest
from aioice import stun as aioice_stun
from hypothesis import given, settings
from hypothesis import strategies as st

from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.stun import (
    AlternatePort,
    ChangedAddress,
    ChangeRequest,
    ConnectBackOutcome,
    ConnectBackResult,
    MappedAddress,
    MessageClass,
    OpaqueAttribute,
    OtherAddress,
    ResponseOrigin,
    Software,
    SourceAddress,
    StunErrorCode,
    StunMessage,
    StunMethod,
    StunParseError,
    StunStreamDecoder,
    UnknownAttributes,
    XorMappedAddress,
    binding_request,
    encode_message,
    looks_like_stun,
    parse_message,
)


def hexbytes(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 5769 section 2 test vectors (the SOFTWARE/USERNAME padding bytes are 0x20 on purpose).
RFC5769_TID = hexbytes("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
RFC5769_REQUEST = hexbytes(
    """00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf"""
)
RFC5769_IPV4_RESPONSE = hexbytes(
    """01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96"""
)
RFC5769_IPV6_RESPONSE = hexbytes(
    """01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c"""
)


# ----------------------------------------------------------------------------------- RFC 5769


def test_rfc5769_sample_request() -> None:
    msg = parse_message(RFC5769_REQUEST)
    assert (msg.method, msg.message_class) == (StunMethod.BINDING, MessageClass.REQUEST)
    assert msg.transaction_id == RFC5769_TID and not msg.classic
    assert msg.fingerprint
    assert msg.find(Software) == Software("STUN test client")
    opaque = {a.type: a.value for a in msg.attributes if isinstance(a, OpaqueAttribute)}
    assert opaque[0x0006] == b"evtj:h6vY"  # USERNAME
    assert opaque[0x0024] == hexbytes("6e 00 01 ff")  # PRIORITY
    # MESSAGE-INTEGRITY (short-term password) over the message up to it, length adjusted to end after it.
    mi_offset = RFC5769_REQUEST.index(hexbytes("00 08 00 14"))
    covered = RFC5769_REQUEST[:2] + struct.pack("!H", mi_offset + 24 - 20) + RFC5769_REQUEST[4:mi_offset]
    digest = hmac.new(b"VOkJxbRl1RmTxUk/WvJxBt", covered, hashlib.sha1).digest()
    assert opaque[0x0008] == digest


@pytest.mark.parametrize(
    ("vector", "address"),
    [
        (RFC5769_IPV4_RESPONSE, Endpoint("192.0.2.1", 32853)),
        (RFC5769_IPV6_RESPONSE, Endpoint("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_rfc5769_sample_responses(vector: bytes, address: Endpoint) -> None:
    msg = parse_message(vector)
    assert msg.message_class is MessageClass.SUCCESS
    assert msg.find(XorMappedAddress) == XorMappedAddress(address)
    assert msg.mapped() == address
    assert msg.find(Software) == Software("test vector")
    assert msg.fingerprint


def test_rfc5769_xor_address_encodes_to_vector_bytes() -> None:
    msg = StunMessage(
        StunMethod.BINDING,
        MessageClass.SUCCESS,
        RFC5769_TID,
        (XorMappedAddress(Endpoint("192.0.2.1", 32853)),),
    )
    assert encode_message(msg)[20:] == hexbytes("00 20 00 08 00 01 a1 47 e1 12 a6 43")


def test_fingerprint_mismatch_is_rejected() -> None:
    broken = bytearray(RFC5769_IPV4_RESPONSE)
    broken[-1] ^= 1
    with pytest.raises(StunParseError, match="FINGERPRINT mismatch"):
        parse_message(bytes(broken))


def test_fingerprint_must_be_last() -> None:
    msg = encode_message(binding_request(os.urandom(12), fingerprint=True))
    extra = msg + struct.pack("!HH", 0x8022, 4) + b"abcd"
    extra = extra[:2] + struct.pack("!H", len(extra) - 20) + extra[4:]
    with pytest.raises(StunParseError, match="follows FINGERPRINT"):
        parse_message(extra)


# ------------------------------------------------------------------------------ round trips


FULL_RESPONSE_ATTRIBUTES = (
    XorMappedAddress(Endpoint("198.51.100.7", 40000)),
    MappedAddress(Endpoint("198.51.100.7", 40000)),
    ResponseOrigin(Endpoint("198.51.100.10", 3478)),
    OtherAddress(Endpoint("198.51.100.11", 3479)),
    Software("tcppunch test"),
    ConnectBackResult(ConnectBackOutcome.REFUSED, Endpoint("198.51.100.11", 3479)),
    UnknownAttributes((0x0031, 0x0042, 0x0007)),
    AlternatePort(3479),
    StunErrorCode(420, "Unknown Attribute"),
    XorMappedAddress(Endpoint("fe80::1", 1)),
)


@pytest.mark.parametrize("fingerprint", [False, True])
def test_round_trip_every_attribute(fingerprint: bool) -> None:
    msg = StunMessage(StunMethod.BINDING, MessageClass.SUCCESS, os.urandom(12), FULL_RESPONSE_ATTRIBUTES, fingerprint)
    raw = encode_message(msg)
    assert len(raw) % 4 == 0
    assert parse_message(raw) == msg


def test_classic_message_round_trip_and_dialect() -> None:
    tid = os.urandom(16)
    request = binding_request(tid, [ChangeRequest(change_ip=True, change_port=True)])
    raw = encode_message(request)
    if raw[4:8] == b"\x21\x12\xa4\x42":  # a random id that happens to start with the cookie
        return
    assert raw[4:20] == tid  # no cookie: the whole 16 bytes are the transaction id
    parsed = parse_message(raw)
    assert parsed.classic and parsed.transaction_id == tid
    assert parsed.find(ChangeRequest) == ChangeRequest(True, True)
    with pytest.raises(StunParseError, match="magic cookie"):
        parse_message(raw, require_cookie=True)


def test_pystun3_request_bytes_parse() -> None:
    # Exactly what pystun3 2.0.0 builds for its Test 2: type, "%#04d" length, 32 hex digits, CHANGE-REQUEST.
    raw = bytes.fromhex("0001" + "0008" + "0123456789ABCDEF0123456789ABCDEF" + "0003" + "0004" + "00000006")
    msg = parse_message(raw)
    assert msg.classic and msg.find(ChangeRequest) == ChangeRequest(change_ip=True, change_port=True)


# --------------------------------------------------------------------- aioice cross-check


def test_our_bytes_parse_with_aioice() -> None:
    tid = os.urandom(12)
    ours = StunMessage(
        StunMethod.BINDING,
        MessageClass.SUCCESS,
        tid,
        (
            XorMappedAddress(Endpoint("203.0.113.5", 5555)),
            MappedAddress(Endpoint("203.0.113.5", 5555)),
            ResponseOrigin(Endpoint("198.51.100.10", 3478)),
            OtherAddress(Endpoint("198.51.100.11", 3479)),
            Software("tcppunch"),
        ),
        fingerprint=True,
    )
    theirs = aioice_stun.parse_message(encode_message(ours))  # verifies FINGERPRINT too
    assert theirs.message_method == aioice_stun.Method.BINDING
    assert theirs.message_class == aioice_stun.Class.RESPONSE
    assert theirs.transaction_id == tid
    assert theirs.attributes["XOR-MAPPED-ADDRESS"] == ("203.0.113.5", 5555)
    assert theirs.attributes["MAPPED-ADDRESS"] == ("203.0.113.5", 5555)
    assert theirs.attributes["RESPONSE-ORIGIN"] == ("198.51.100.10", 3478)
    assert theirs.attributes["OTHER-ADDRESS"] == ("198.51.100.11", 3479)
    assert theirs.attributes["SOFTWARE"] == "tcppunch"


def test_aioice_bytes_parse_with_ours() -> None:
    theirs = aioice_stun.Message(
        aioice_stun.Method.BINDING,
        aioice_stun.Class.REQUEST,
        attributes={"CHANGE-REQUEST": 0x6, "SOFTWARE": "aioice!", "XOR-MAPPED-ADDRESS": ("2001:db8::9", 9)},
    )
    theirs.add_fingerprint()
    ours = parse_message(bytes(theirs))
    assert ours.transaction_id == theirs.transaction_id and ours.fingerprint
    assert ours.find(ChangeRequest) == ChangeRequest(True, True)
    assert ours.find(Software) == Software("aioice!")
    assert ours.mapped() == Endpoint("2001:db8::9", 9)
    error = aioice_stun.Message(
        aioice_stun.Method.BINDING, aioice_stun.Class.ERROR, attributes={"ERROR-CODE": (420, "Unknown")}
    )
    assert parse_message(bytes(error)).find(StunErrorCode) == StunErrorCode(420, "Unknown")


@given(
    ip=st.ip_addresses().map(str),
    port=st.integers(0, 65535),
    tid=st.binary(min_size=12, max_size=12),
    text=st.text(max_size=40),
)
@settings(max_examples=150, deadline=None)
def test_cross_check_property(ip: str, port: int, tid: bytes, text: str) -> None:
    address = Endpoint(ip, port)
    ours = StunMessage(
        StunMethod.BINDING,
        MessageClass.SUCCESS,
        tid,
        (XorMappedAddress(address), MappedAddress(address), Software(text)),
        fingerprint=True,
    )
    theirs = aioice_stun.parse_message(encode_message(ours))
    assert theirs.attributes["XOR-MAPPED-ADDRESS"] == (ip, port)
    assert theirs.attributes["SOFTWARE"] == text
    back = aioice_stun.Message(
        aioice_stun.Method.BINDING,
        aioice_stun.Class.RESPONSE,
        transaction_id=tid,
        attributes={"XOR-MAPPED-ADDRESS": (ip, port), "SOFTWARE": text},
    )
    assert parse_message(bytes(back)) == StunMessage(
        StunMethod.BINDING, MessageClass.SUCCESS, tid, (XorMappedAddress(address), Software(text))
    )


# ---------------------------------------------------------------------------------- strictness


def _valid() -> bytes:
    return encode_message(
        StunMessage(StunMethod.BINDING, MessageClass.SUCCESS, os.urandom(12), FULL_RESPONSE_ATTRIBUTES, True)
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:19], "shorter than the 20-byte"),
        (lambda b: b"\xc0" + b[1:], "first two bits"),
        (lambda b: b[:2] + struct.pack("!H", 6) + b[4:], "not a multiple of 4"),
        (lambda b: b[:2] + struct.pack("!H", len(b) - 16) + b[4:], "body bytes"),
        (lambda b: b + b"\x00\x00\x00\x00", "body bytes"),
    ],
)
def test_header_defects(mutate: object, message: str) -> None:
    with pytest.raises(StunParseError, match=message):
        parse_message(mutate(_valid()))  # type: ignore[operator]


def _with_attribute(attr_type: int, value: bytes, declared: int | None = None) -> bytes:
    tlv = struct.pack("!HH", attr_type, len(value) if declared is None else declared) + value
    tlv += b"\x00" * (-len(tlv) % 4)
    return struct.pack("!HH", 0x0101, len(tlv)) + b"\x21\x12\xa4\x42" + os.urandom(12) + tlv


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_with_attribute(0x0001, b"\x00\x01\x00\x01\x7f\x00\x00"), "expected 8"),
        (_with_attribute(0x0020, b"\x00\x03\x00\x01\x7f\x00\x00\x01"), "unknown address family"),
        (_with_attribute(0x0001, b"\x00\x01\x00\x01", declared=40), "past the end"),
        (_with_attribute(0x0003, b"\x00\x00\x00\x06\x00\x00\x00\x00"), "CHANGE-REQUEST is 8 bytes"),
        (_with_attribute(0x0009, b"\x00\x00\x02\x00"), "not a 300-699"),
        (_with_attribute(0x8022, b"\xff\xfe\xfd"), "not valid UTF-8"),
        (_with_attribute(0x000A, b"\x00\x01\x00"), "multiple of 2"),
        (_with_attribute(0x8028, b"\x00\x00\x00\x00\x00\x00\x00\x00"), "FINGERPRINT is 8 bytes"),
        (_with_attribute(0x8055, b"\x09\x00\x00\x00"), "unknown outcome"),
    ],
)
def test_attribute_defects(raw: bytes, message: str) -> None:
    with pytest.raises(StunParseError, match=message):
        parse_message(raw)


def test_unknown_comprehension_required_attributes_are_reported() -> None:
    raw = _with_attribute(0x0031, b"abcd")
    assert parse_message(raw).unknown_required() == (0x0031,)
    assert parse_message(_with_attribute(0x8031, b"abcd")).unknown_required() == ()


def test_looks_like_stun() -> None:
    raw = encode_message(binding_request(os.urandom(12)))
    assert looks_like_stun(raw[:8])
    assert not looks_like_stun(raw[:7])
    assert not looks_like_stun(b"\x80" + raw[1:8])
    assert not looks_like_stun(b'{"type":')
    assert not looks_like_stun(b"\x00" * 8)


def test_classic_response_with_changed_and_source_address() -> None:
    tid = os.urandom(16)
    msg = StunMessage(
        StunMethod.BINDING,
        MessageClass.SUCCESS,
        tid,
        (
            MappedAddress(Endpoint("10.0.0.1", 1)),
            SourceAddress(Endpoint("127.0.0.1", 3478)),
            ChangedAddress(Endpoint("127.0.0.2", 3479)),
        ),
    )
    parsed = parse_message(encode_message(msg))
    assert parsed == msg and parsed.other() == Endpoint("127.0.0.2", 3479)


# ------------------------------------------------------------------------------- stream framing


def _three_messages() -> tuple[list[StunMessage], bytes]:
    msgs = [
        binding_request(os.urandom(12), [ChangeRequest(change_port=True)], fingerprint=True),
        binding_request(os.urandom(12), [Software("x" * 13)]),
        StunMessage(StunMethod.BINDING, MessageClass.INDICATION, os.urandom(12)),
    ]
    return msgs, b"".join(encode_message(m) for m in msgs)


def _drain(decoder: StunStreamDecoder) -> list[StunMessage]:
    out = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    return out


def test_stream_whole_buffer() -> None:
    msgs, raw = _three_messages()
    decoder = StunStreamDecoder()
    decoder.receive_data(raw)
    assert _drain(decoder) == msgs and decoder.buffered == 0


def test_stream_byte_by_byte() -> None:
    msgs, raw = _three_messages()
    decoder = StunStreamDecoder()
    got = []
    for i in range(len(raw)):
        decoder.receive_data(raw[i : i + 1])
        got.extend(_drain(decoder))
    assert got == msgs


def test_stream_trailing_data_stays_buffered() -> None:
    msgs, raw = _three_messages()
    decoder = StunStreamDecoder()
    decoder.receive_data(raw + raw[:7])
    assert _drain(decoder) == msgs and decoder.buffered == 7


def test_stream_rejects_oversized_length_at_header_time() -> None:
    decoder = StunStreamDecoder(max_body_length=512)
    decoder.receive_data(struct.pack("!HH", 0x0001, 516) + b"\x21\x12\xa4\x42" + os.urandom(12))
    with pytest.raises(StunParseError, match="exceeds"):
        decoder.next_message()
    assert decoder.failed
    with pytest.raises(StunParseError):
        decoder.next_message()


def test_stream_rejects_non_stun_first_byte_early() -> None:
    decoder = StunStreamDecoder()
    decoder.receive_data(b"GET")
    with pytest.raises(StunParseError, match="not a STUN stream"):
        decoder.next_message()


def test_stream_requires_cookie() -> None:
    decoder = StunStreamDecoder()
    decoder.receive_data(encode_message(binding_request(os.urandom(16))))
    with pytest.raises(StunParseError, match="magic cookie"):
        decoder.next_message()


def test_stream_survives_a_bad_attribute() -> None:
    bad = _with_attribute(0x0001, b"\x00\x07\x00\x01\x7f\x00\x00\x01")
    good = encode_message(binding_request(os.urandom(12)))
    decoder = StunStreamDecoder()
    decoder.receive_data(bad + good)
    with pytest.raises(StunParseError, match="address family") as caught:
        decoder.next_message()
    assert not decoder.failed
    assert caught.value.header is not None and caught.value.header.message_class is MessageClass.SUCCESS
    assert decoder.next_message() == parse_message(good)


# -------------------------------------------------------------------------------------- fuzzing


@given(st.binary(max_size=200))
@settings(max_examples=1500, deadline=None)
def test_fuzz_random_bytes_only_raise_parse_error(data: bytes) -> None:
    with contextlib.suppress(StunParseError):
        parse_message(data)


@given(st.binary(min_size=0, max_size=120), st.sampled_from([0x0001, 0x0101, 0x0111, 0x0011]))
@settings(max_examples=1500, deadline=None)
def test_fuzz_well_framed_random_attributes(body: bytes, msg_type: int) -> None:
    body = body[: len(body) - len(body) % 4]
    raw = struct.pack("!HH", msg_type, len(body)) + b"\x21\x12\xa4\x42" + bytes(12) + body
    with contextlib.suppress(StunParseError):
        parse_message(raw)


@given(st.integers(0, 200), st.binary(max_size=8))
@settings(max_examples=500, deadline=None)
def test_fuzz_truncated_and_corrupted_valid_messages(cut: int, noise: bytes) -> None:
    raw = bytearray(_valid())
    raw[cut % len(raw) : cut % len(raw) + len(noise)] = noise
    for candidate in (bytes(raw), bytes(raw[: cut % len(raw)])):
        with contextlib.suppress(StunParseError):
            parse_message(candidate)


@given(st.lists(st.binary(max_size=40), max_size=12))
@settings(max_examples=500, deadline=None)
def test_fuzz_stream_decoder(chunks: list[bytes]) -> None:
    decoder = StunStreamDecoder()
    for chunk in chunks:
        decoder.receive_data(chunk)
        try:
            _drain(decoder)
        except StunParseError:
            if decoder.failed:
                return
