"""A Linux TUN interface from the standard library: ``ioctl(TUNSETIFF)`` on ``/dev/net/tun``.

The device lives in the network namespace of the thread that opens it, and only as long as its file
descriptor is open (not persistent): closing the :class:`Tun` removes the interface. One ``read`` gives
one packet (``IFF_NO_PI``: no packet-information prefix). The descriptor is non-blocking, so the event
loop can watch it (:meth:`Tun.attach`) and drain every packet that is ready without waiting.

Offloads (``offload=True``, the default): with ``IFF_VNET_HDR`` every packet starts with a 10-byte
``virtio_net_hdr``, and ``TUNSETOFFLOAD`` lets the kernel hand over TCP segments of up to 64 KiB (TSO)
with the checksum left to the receiver, and take them back the same way on the other side. A VPN then
moves a few large packets instead of forty-odd MTU-sized ones, which is what a user-space pump needs to
keep up with the stream under it. Both ends of a link must use the same mode: the header travels with the
packet, untouched. The interface MTU still applies to everything else (ping, UDP, forwarded traffic).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import re
import struct
from collections.abc import Callable

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
# struct virtio_net_hdr (no mergeable buffers): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_SIZE = 10
IFNAMSIZ = 16
# The largest packet a read returns: an IP packet of 64 KiB (a TSO segment) plus the vnet header.
MAX_PACKET = 65535 + VNET_HDR_SIZE
# Packets drained per readiness callback before yielding to the loop (other work, the other direction).
_BURST = 64
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class TunError(OSError):
    """The TUN device could not be opened (no /dev/net/tun, not root, bad or taken name)."""


class Tun:
    """An open TUN interface ``name``; :meth:`close` removes it. ``offload``: vnet headers and TSO (see
    the module docstring); ``self.offload`` says whether the kernel took the offloads."""

    def __init__(self, name: str, *, offload: bool = True) -> None:
        if not _NAME.match(name):
            raise ValueError(f"interface name {name!r}: 1-15 characters of A-Z a-z 0-9 _ . -")
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(exc.errno, f"cannot open {TUN_DEVICE}: {exc.strerror} (root and Linux needed)") from None
        try:
            flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
            answer = fcntl.ioctl(fd, TUNSETIFF, struct.pack(f"{IFNAMSIZ}sH", name.encode(), flags))
        except OSError as exc:
            os.close(fd)
            raise TunError(exc.errno, f"cannot create TUN interface {name!r}: {exc.strerror}") from None
        self.vnet_header = offload
        self.offload = False
        if offload:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
                self.offload = True
            except OSError:  # an old kernel: vnet headers without segmentation offload still work
                pass
        self.fd: int | None = fd
        self.name = answer[:IFNAMSIZ].rstrip(b"\0").decode()
        self._loop: asyncio.AbstractEventLoop | None = None

    def fileno(self) -> int:
        if self.fd is None:
            raise ValueError(f"TUN interface {self.name} is closed")
        return self.fd

    def read_packets(self, limit: int = _BURST) -> list[bytes]:
        """Up to ``limit`` packets that are ready now (never blocks; empty when none is)."""
        packets: list[bytes] = []
        fd = self.fileno()
        while len(packets) < limit:
            try:
                packets.append(os.read(fd, MAX_PACKET))
            except BlockingIOError:
                break
        return packets

    def write(self, packet: bytes) -> bool:
        """Hand one IP packet to the kernel; False when it was dropped (queue full, or the kernel refused
        it as a malformed packet). Never blocks."""
        try:
            os.write(self.fileno(), packet)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EIO, errno.ENOBUFS):
                return False
            raise
        return True

    def attach(self, on_packets: Callable[[list[bytes]], None]) -> None:
        """Call ``on_packets`` from the running loop whenever packets are ready to read."""
        loop = asyncio.get_running_loop()

        def readable() -> None:
            packets = self.read_packets()
            if packets:
                on_packets(packets)

        loop.add_reader(self.fileno(), readable)
        self._loop = loop

    def detach(self) -> None:
        if self._loop is not None and self.fd is not None:
            self._loop.remove_reader(self.fd)
        self._loop = None

    def close(self) -> None:
        """Stop watching and close the descriptor: the kernel removes the interface."""
        if self.fd is None:
            return
        self.detach()
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> Tun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
