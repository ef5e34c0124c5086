"""IP packets on a byte stream, sans-I/O: length framing, and a small queue that drops rather than buffers.

Framing: ``length:uint32be packet[length]``, 1 <= length <= ``max_packet`` (a packet may be a 64 KiB
TSO segment plus its vnet header, see :mod:`~tcppunch.vpn.tun`). :class:`PacketDecoder` takes
bytes as they arrive (whole buffer, byte by byte, with trailing data) and hands out packets.

:class:`DropQueue`: the VPN carries TCP inside TCP. When the outer connection slows down, a deep queue in
front of it would hide the loss the inner TCP needs to see, and both would back off on top of each other
(TCP-over-TCP meltdown). So packets from the TUN device wait in a queue of 256 packets or 256 KiB at most
(a few TSO segments: milliseconds at the speeds a user-space pump reaches), and a packet that does not fit
is dropped — as a router would — and counted.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

HEADER = struct.Struct("!I")
# An IP packet of 64 KiB and room for the 10-byte virtio_net_hdr in front of it.
MAX_PACKET = 65535 + 16


class FramingError(ValueError):
    """The stream does not carry valid packet frames (the other side is not a VPN peer, or broke)."""


def encode_packet(packet: bytes) -> bytes:
    """One frame: 4-byte big-endian length, then the packet."""
    if not 0 < len(packet) <= MAX_PACKET:
        raise ValueError(f"a packet of {len(packet)} bytes cannot be framed (1..{MAX_PACKET})")
    return HEADER.pack(len(packet)) + packet


def encode_packets(packets: list[bytes]) -> bytes:
    """Frames for several packets in one buffer (each packet copied once)."""
    for packet in packets:
        if not 0 < len(packet) <= MAX_PACKET:
            raise ValueError(f"a packet of {len(packet)} bytes cannot be framed (1..{MAX_PACKET})")
    return b"".join([part for packet in packets for part in (HEADER.pack(len(packet)), packet)])


class PacketDecoder:
    """Frames in, packets out. A zero length or one above ``max_packet`` raises :class:`FramingError`."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every packet it completes, in order."""
        self._buffer += data
        packets: list[bytes] = []
        view = self._buffer
        start = 0
        while len(view) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(view, start)
            if not 0 < size <= self.max_packet:
                raise FramingError(f"packet frame of {size} bytes (allowed 1..{self.max_packet})")
            end = start + HEADER.size + size
            if end > len(view):
                break
            packets.append(bytes(view[start + HEADER.size : end]))
            start = end
        del self._buffer[:start]
        return packets

    @property
    def buffered(self) -> int:
        return len(self._buffer)


@dataclass
class QueueStats:
    queued: int = 0
    dropped: int = 0
    dropped_bytes: int = 0


class DropQueue:
    """FIFO of packets bounded by count and bytes; :meth:`offer` drops the packet when either is full."""

    def __init__(self, max_packets: int = 256, max_bytes: int = 256 * 1024) -> None:
        if max_packets < 1 or max_bytes < 1:
            raise ValueError("a queue needs room for at least one packet")
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self.stats = QueueStats()
        self._packets: deque[bytes] = deque()
        self._bytes = 0

    def offer(self, packet: bytes) -> bool:
        """Queue ``packet``; False (and counted) when it does not fit."""
        if len(self._packets) >= self.max_packets or self._bytes + len(packet) > self.max_bytes:
            self.stats.dropped += 1
            self.stats.dropped_bytes += len(packet)
            return False
        self._packets.append(packet)
        self._bytes += len(packet)
        self.stats.queued += 1
        return True

    def take_all(self) -> list[bytes]:
        """Every queued packet, oldest first; the queue is empty afterwards."""
        packets = list(self._packets)
        self._packets.clear()
        self._bytes = 0
        return packets

    def __len__(self) -> int:
        return len(self._packets)

    @property
    def bytes(self) -> int:
        return self._bytes
