"""A user-space link shaper: forwards Ethernet frames between two interfaces with delay, jitter, loss.

These kernels have no netem qdisc, so a lab link that needs delay is cut in two: the router's WAN veth
ends on one interface, the internet bridge's port on another, and this process carries frames between
them through AF_PACKET sockets, holding each back (``delay ± jitter``, never reordering) or dropping it
(``loss``). Offloads must be off on every interface along the way (the lab does it), else copied frames
carry unfinished checksums. Run as ``python -m tcppunch.lab.link IF_A IF_B --delay-ms D ...`` inside
the namespace that has both interfaces; it prints ``ready`` once both sockets are bound and runs until
SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import socket
from dataclasses import dataclass

_ETH_P_ALL = 0x0003
_PACKET_OUTGOING = 4
_MAX_FRAME = 65536
# Frames held back at once per direction; beyond this the link drops (a full router queue).
_QUEUE_LIMIT = 20000


@dataclass
class Direction:
    """One direction of the link: where frames come from, where they go, and when the last one leaves."""

    src: socket.socket
    dst: socket.socket
    last_departure: float = 0.0
    queued: int = 0


class Shaper:
    """Moves frames both ways between two raw sockets on one event loop."""

    def __init__(self, delay_s: float, jitter_s: float, loss: float, seed: int | None) -> None:
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self.loss = loss
        self.rng = random.Random(seed)

    def attach(self, loop: asyncio.AbstractEventLoop, direction: Direction) -> None:
        loop.add_reader(direction.src.fileno(), self._on_readable, loop, direction)

    def _on_readable(self, loop: asyncio.AbstractEventLoop, d: Direction) -> None:
        for _ in range(64):  # bounded batch, then let the other direction run
            try:
                frame, addr = d.src.recvfrom(_MAX_FRAME)
            except BlockingIOError:
                return
            if addr[2] == _PACKET_OUTGOING:
                continue  # our own transmissions on this interface
            if self.loss and self.rng.random() < self.loss:
                continue
            if d.queued >= _QUEUE_LIMIT:
                continue
            jitter = self.rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0
            departure = max(loop.time() + max(0.0, self.delay_s + jitter), d.last_departure)
            d.last_departure = departure
            d.queued += 1
            loop.call_at(departure, self._send, d, frame)

    @staticmethod
    def _send(d: Direction, frame: bytes) -> None:
        d.queued -= 1
        with contextlib.suppress(OSError):  # a full device queue is a lost frame, as on a real link
            d.dst.send(frame)


def _raw_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    sock.bind((ifname, 0))
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return sock


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    a, b = _raw_socket(args.if_a), _raw_socket(args.if_b)
    shaper = Shaper(args.delay_ms / 1000, args.jitter_ms / 1000, args.loss, args.seed)
    shaper.attach(loop, Direction(a, b))
    shaper.attach(loop, Direction(b, a))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("if_a")
    parser.add_argument("if_b")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
