"""The multiplexer's frame codec: round trips, every reader fed whole / byte by byte / with trailing data,
exact errors for broken frames, and Hypothesis fuzzing (any bytes give frames or a FrameError, never
another exception)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcppunch.session.frames import (
    HEADER_SIZE,
    VERSION,
    Flag,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    MuxErrorCode,
    encode_frame,
    encode_header,
)

SAMPLES = [
    Frame(FrameType.DATA, Flag.SYN, 1, b"hello"),
    Frame(FrameType.DATA, Flag.FIN, 2, b""),
    Frame(FrameType.DATA, Flag.SYN | Flag.FIN, 3, b"x" * 1000),
    Frame(FrameType.WINDOW_UPDATE, Flag.NONE, 5, (65536).to_bytes(4, "big")),
    Frame(FrameType.RESET, Flag.NONE, 7, (6).to_bytes(4, "big")),
    Frame(FrameType.PING, Flag.NONE, 0, (42).to_bytes(8, "big")),
    Frame(FrameType.PING, Flag.ACK, 0, (42).to_bytes(8, "big")),
    Frame(FrameType.GO_AWAY, Flag.NONE, 0, bytes(8)),
    Frame(FrameType.SWITCH, Flag.NONE, 0),
]
WIRE = b"".join(encode_frame(f) for f in SAMPLES)


def drain(decoder: FrameDecoder) -> list[Frame]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def test_header_layout() -> None:
    raw = encode_frame(Frame(FrameType.DATA, Flag.SYN, 0x01020304, b"ab"))
    assert raw == bytes([VERSION, 0, 1, 0, 1, 2, 3, 4, 0, 0, 0, 2]) + b"ab"
    assert HEADER_SIZE == 12


def test_whole_buffer() -> None:
    decoder = FrameDecoder()
    decoder.feed(WIRE)
    assert drain(decoder) == SAMPLES
    assert decoder.buffered == 0


def test_byte_by_byte() -> None:
    decoder = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(WIRE)):
        decoder.feed(WIRE[i : i + 1])
        got += drain(decoder)
    assert got == SAMPLES


def test_trailing_partial_frame_waits() -> None:
    decoder = FrameDecoder()
    tail = encode_frame(Frame(FrameType.DATA, Flag.NONE, 9, b"0123456789"))
    decoder.feed(WIRE + tail[:15])
    assert drain(decoder) == SAMPLES
    assert decoder.buffered == 15
    decoder.feed(tail[15:])
    assert drain(decoder) == [Frame(FrameType.DATA, Flag.NONE, 9, b"0123456789")]


@pytest.mark.parametrize(
    ("raw", "code", "words"),
    [
        (b"GET / HTTP/1.1\r\n", MuxErrorCode.PROTOCOL_ERROR, "bad version byte 0x47"),
        (bytes([VERSION, 9, 0, 0]) + bytes(8), MuxErrorCode.PROTOCOL_ERROR, "unknown frame type 9"),
        (encode_header(FrameType.DATA, Flag.NONE, 1, 1 << 21), MuxErrorCode.FRAME_TOO_LARGE, "exceeds the limit"),
        (encode_header(FrameType.DATA, Flag.ACK, 1, 0), MuxErrorCode.PROTOCOL_ERROR, "DATA frame with flags 0x4"),
        (encode_header(FrameType.PING, Flag.NONE, 3, 8) + bytes(8), MuxErrorCode.PROTOCOL_ERROR, "belongs on stream 0"),
        (encode_header(FrameType.DATA, Flag.NONE, 0, 0), MuxErrorCode.PROTOCOL_ERROR, "a stream id > 0"),
        (encode_header(FrameType.RESET, Flag.NONE, 1, 2) + bytes(2), MuxErrorCode.PROTOCOL_ERROR, "expected 4"),
    ],
)
def test_broken_frames_have_exact_errors(raw: bytes, code: MuxErrorCode, words: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(SAMPLES[0]) + raw)
    assert decoder.next_frame() == SAMPLES[0]
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code is code
    assert words in str(info.value)
    with pytest.raises(FrameError):  # stays failed
        decoder.next_frame()


def test_oversized_frame_refused_from_header_alone() -> None:
    decoder = FrameDecoder(max_payload=100)
    decoder.feed(encode_header(FrameType.DATA, Flag.NONE, 1, 101))
    with pytest.raises(FrameError, match="101 bytes exceeds the limit of 100"):
        decoder.next_frame()


@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_fuzz_decoder_only_raises_frame_error(data: bytes, chunk: int) -> None:
    decoder = FrameDecoder(max_payload=256)
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(data[i : i + chunk])
            for frame in drain(decoder):
                assert encode_frame(frame) in data
    except FrameError as exc:
        assert exc.message


frames = st.builds(
    Frame,
    st.just(FrameType.DATA),
    st.sampled_from([Flag.NONE, Flag.SYN, Flag.FIN, Flag.SYN | Flag.FIN]),
    st.integers(min_value=1, max_value=(1 << 32) - 1),
    st.binary(max_size=300),
)


@given(st.lists(frames, max_size=8), st.integers(min_value=1, max_value=64))
def test_fuzz_round_trip_in_any_chunking(sample: list[Frame], chunk: int) -> None:
    wire = b"".join(encode_frame(f) for f in sample)
    decoder = FrameDecoder()
    got: list[Frame] = []
    for i in range(0, len(wire), chunk):
        decoder.feed(wire[i : i + chunk])
        got += drain(decoder)
    assert got == sample
