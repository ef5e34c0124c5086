"""Packet framing and the drop queue of the VPN, without devices."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcppunch.vpn.packets import DropQueue, FramingError, PacketDecoder, encode_packet, encode_packets

PACKETS = [b"\x45" + bytes(19), b"\x60" + bytes(39) + b"payload", b"x" * 1400]


def test_frames_are_length_prefixed() -> None:
    assert encode_packet(b"\x45abc") == b"\x00\x00\x00\x04\x45abc"
    with pytest.raises(ValueError):
        encode_packet(b"")
    with pytest.raises(ValueError):
        encode_packet(bytes(65535 + 17))


def test_whole_buffer_byte_by_byte_and_trailing_data() -> None:
    data = b"".join(encode_packet(p) for p in PACKETS)
    assert encode_packets(PACKETS) == data
    assert PacketDecoder().feed(data) == PACKETS
    decoder, got = PacketDecoder(), []
    for i in range(len(data)):
        got += decoder.feed(data[i : i + 1])
    assert got == PACKETS and decoder.buffered == 0
    decoder = PacketDecoder()
    assert decoder.feed(data + b"\x00\x00\x00\x05ab") == PACKETS and decoder.buffered == 6
    assert decoder.feed(b"cde") == [b"abcde"]


@given(st.lists(st.binary(min_size=1, max_size=3000), max_size=20), st.lists(st.integers(0, 70000), max_size=10))
def test_any_chunking_gives_the_same_packets(packets: list[bytes], cuts: list[int]) -> None:
    data = b"".join(encode_packet(p) for p in packets)
    decoder, got, last = PacketDecoder(), [], 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        got += decoder.feed(data[last:cut])
        last = cut
    assert got == packets


@pytest.mark.parametrize("bad", [b"\x00\x00\x00\x00", b"\x00\x00\x05\xdd" + bytes(10)])
def test_zero_or_oversize_frames_are_refused(bad: bytes) -> None:
    with pytest.raises(FramingError):
        PacketDecoder(max_packet=1500).feed(bad)


def test_queue_drops_beyond_its_packet_bound_and_counts() -> None:
    queue = DropQueue(max_packets=2, max_bytes=10_000)
    assert queue.offer(b"a") and queue.offer(b"b")
    assert not queue.offer(b"c")
    assert (queue.stats.queued, queue.stats.dropped, queue.stats.dropped_bytes) == (2, 1, 1)
    assert queue.take_all() == [b"a", b"b"] and len(queue) == 0 and queue.bytes == 0
    assert queue.offer(b"d")


def test_queue_drops_beyond_its_byte_bound() -> None:
    queue = DropQueue(max_packets=100, max_bytes=3000)
    assert queue.offer(b"x" * 1400) and queue.offer(b"y" * 1400)
    assert not queue.offer(b"z" * 1400)
    assert queue.offer(b"small")  # a packet that still fits goes in: drop, do not block
    assert queue.bytes == 2805
    with pytest.raises(ValueError):
        DropQueue(max_packets=0)
