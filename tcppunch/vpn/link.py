"""Carry IP packets between a TUN interface and a byte stream (a session stream, or any TCP stream).

TUN -> stream: packets the kernel routes into the interface are written as length-prefixed frames at
once, from the readiness callback, while the stream is not backed up. After each write a drainer task
waits for the stream to drain; meanwhile new packets go into a :class:`DropQueue` and are dropped beyond
its bound, so the outer TCP never builds a deep queue (TCP over TCP); the drainer writes the queue out
when the stream has room. Stream -> TUN: frames are decoded and written to the interface at once.

The link ends when the stream ends (EOF, error, bad framing): :func:`carry` returns why, and leaves the
TUN device open for the next stream.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from tcppunch.vpn.packets import DropQueue, FramingError, PacketDecoder, encode_packets
from tcppunch.vpn.tun import Tun

READ_SIZE = 256 * 1024


class PacketReader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class PacketWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def get_extra_info(self, name: str, default: object = None) -> object: ...


@dataclass
class LinkStats:
    """Counts of one link's life."""

    sent: int = 0
    received: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    dropped: int = 0  # at the drop queue (TUN -> stream)
    rejected: int = 0  # packets from the stream the kernel would not take


async def carry(tun: Tun, reader: PacketReader, writer: PacketWriter, *, queue: DropQueue | None = None,
                stats: LinkStats | None = None) -> str:
    """Move packets both ways between ``tun`` and the stream until the stream ends; return why."""
    queue = queue or DropQueue()
    stats = stats or LinkStats()
    wake = asyncio.Event()
    # ``stats`` may span several links (a tunnel passes its own): counts add up across them.
    dropped_before = queue.stats.dropped - stats.dropped
    draining = False

    def flush() -> None:
        packets = queue.take_all()
        if packets:
            data = encode_packets(packets)
            writer.write(data)
            stats.sent += len(packets)
            stats.sent_bytes += len(data)
            wake.set()  # the drainer checks the stream's buffer

    def from_tun(packets: list[bytes]) -> None:
        for packet in packets:
            queue.offer(packet)
        # Latency: while the stream is not backed up, packets leave from this callback, without waiting
        # for another task's turn; while it is, they wait in the (bounded) queue for the drainer.
        if not draining:
            flush()
        stats.dropped = queue.stats.dropped - dropped_before

    async def send() -> str:
        nonlocal draining
        while True:
            await wake.wait()
            wake.clear()
            draining = True
            try:
                await writer.drain()
            finally:
                draining = False
            flush()

    async def receive() -> str:
        decoder = PacketDecoder()
        while data := await reader.read(READ_SIZE):
            stats.received_bytes += len(data)
            for packet in decoder.feed(data):
                stats.received += 1
                if not tun.write(packet):
                    stats.rejected += 1
        return "the other side closed the stream"

    queue.take_all()  # packets of an earlier link are stale
    tun.attach(from_tun)
    tasks = [asyncio.ensure_future(receive()), asyncio.ensure_future(send())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        try:
            return first.result()
        except FramingError as exc:
            return f"bad packet framing from the other side: {exc}"
        except (ConnectionError, OSError) as exc:
            return str(exc) or exc.__class__.__name__
    finally:
        tun.detach()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stats.dropped = queue.stats.dropped - dropped_before
