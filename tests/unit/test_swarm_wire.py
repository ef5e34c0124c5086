"""The swarm example's piece protocol codec (examples/swarm/wire.py): every message round-trips, whole
buffer and byte by byte, and bad frames are refused with a clear WireError before being buffered."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from examples.swarm.wire import (
    Bitfield,
    Cancel,
    Decoder,
    Handshake,
    Have,
    Message,
    Piece,
    Request,
    WireError,
    encode,
    max_frame_for,
    pack_bits,
    unpack_bits,
)

HASH = bytes(range(32))
MESSAGES: list[Message] = [
    Handshake(HASH, "peer-1"),
    Handshake(HASH, "é" * 32),
    Bitfield(b"\xf0"),
    Have(0),
    Have(2**32 - 1),
    Request(7),
    Cancel(7),
    Piece(3, b"data" * 100),
    Piece(4, b""),
]


def test_round_trip_whole_buffer_byte_by_byte_and_with_trailing_data() -> None:
    stream = b"".join(encode(m) for m in MESSAGES)
    assert Decoder(1000).feed(stream) == MESSAGES
    slow = Decoder(1000)
    out: list[Message] = []
    for i in range(len(stream)):
        out += slow.feed(stream[i:i + 1])
    assert out == MESSAGES
    partial = Decoder(1000)
    extra = encode(Have(1))
    assert partial.feed(stream + extra[:3]) == MESSAGES
    assert partial.buffered == 3
    assert partial.feed(extra[3:]) == [Have(1)]


@given(st.lists(st.one_of(
    st.builds(Have, st.integers(0, 2**32 - 1)),
    st.builds(Request, st.integers(0, 2**32 - 1)),
    st.builds(Piece, st.integers(0, 2**32 - 1), st.binary(max_size=300)),
    st.builds(Bitfield, st.binary(max_size=50)),
    st.builds(Handshake, st.binary(min_size=32, max_size=32), st.text("abc-1", min_size=1, max_size=64)),
), max_size=20), st.integers(1, 64))
def test_any_message_sequence_round_trips_in_any_chunking(messages: list[Message], chunk: int) -> None:
    stream = b"".join(encode(m) for m in messages)
    decoder = Decoder(400)
    out: list[Message] = []
    for i in range(0, len(stream), chunk):
        out += decoder.feed(stream[i:i + chunk])
    assert out == messages


@given(st.binary(max_size=200))
def test_garbage_gives_messages_or_a_wire_error_never_anything_else(data: bytes) -> None:
    decoder = Decoder(100)
    try:
        messages = decoder.feed(data)
    except WireError as exc:
        assert str(exc)
    else:
        assert all(isinstance(m, Handshake | Bitfield | Have | Request | Piece | Cancel) for m in messages)


def _frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("!IB", 1 + len(payload), kind) + payload


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (struct.pack("!IB", 10_000_000, 4), "frame of 10000000 bytes exceeds the limit of 1000"),
        (b"\0\0\0\0", "frame of length 0"),
        (_frame(9, b""), "unknown message type 9"),
        (_frame(2, b"\0\0\0"), "have: payload of 3 bytes, expected 4"),
        (_frame(3, b"\0" * 5), "request: payload of 5 bytes"),
        (_frame(4, b"\0\0"), "piece: shorter than its index"),
        (_frame(0, b"XXXX" + bytes(40)), "bad magic"),
        (_frame(0, b"TPSW\x02" + HASH + b"\x01a"), "protocol version 2"),
        (_frame(0, b"TPSW\x01" + HASH + b"\x05ab"), "peer id length 5 does not match its 2 bytes"),
        (_frame(0, b"TPSW\x01" + HASH + b"\x00"), "peer id length 0"),
        (_frame(0, b"TPSW\x01" + HASH + b"\x02\xff\xfe"), "not UTF-8"),
    ],
)
def test_malformed_frames_are_refused_with_a_clear_error(data: bytes, message: str) -> None:
    decoder = Decoder(1000)
    with pytest.raises(WireError, match=message):
        decoder.feed(data)
    with pytest.raises(WireError, match=message):  # the stream stays failed: no resynchronising on garbage
        decoder.feed(encode(Have(1)))


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    decoder = Decoder(max_frame_for(16384, 10))
    with pytest.raises(WireError, match="exceeds the limit"):
        decoder.feed(encode(Piece(0, bytes(16385)))[:5])
    assert decoder.buffered == 5  # nothing more was waited for


def test_largest_legal_frames_fit() -> None:
    limit = max_frame_for(16384, 200_000)
    assert Decoder(limit).feed(encode(Piece(0, bytes(16384)))) == [Piece(0, bytes(16384))]
    bits = Bitfield(bytes(25_000))
    assert Decoder(limit).feed(encode(bits)) == [bits]


def test_encoder_refuses_what_the_decoder_would() -> None:
    with pytest.raises(ValueError):
        encode(Handshake(b"short", "a"))
    with pytest.raises(ValueError):
        encode(Handshake(HASH, "x" * 65))


def test_bitfield_packing() -> None:
    assert pack_bits({0, 9}, 10) == b"\x80\x40"
    assert unpack_bits(b"\x80\x40", 10) == {0, 9}
    with pytest.raises(WireError, match="bitfield of 1 bytes for 10 pieces"):
        unpack_bits(b"\x80", 10)
    with pytest.raises(WireError, match="past the last piece"):
        unpack_bits(b"\x80\x20", 10)
    with pytest.raises(ValueError):
        pack_bits({10}, 10)
