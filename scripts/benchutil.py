"""Small pieces the benchmark scripts share: sizes on the command line, and the timed receiving end of a
bulk transfer. (Starting the lab's server and stopping a process by PID: :mod:`tcppunch.lab.server_process`,
which the tests use too.)"""

from __future__ import annotations

import argparse
import re
import socket
import time

GO = b"G"  # the receiver's start signal: the sender sends nothing before it, so the timing starts here
CHUNK = 1 << 20


def parse_size(text: str) -> int:
    """``1GiB``, ``1.5GiB``, ``512MiB``, ``64K`` or plain bytes -> bytes; a clear argparse error otherwise."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]i?B?)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1GiB, 512MiB, 1000000)")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])


def connect_retrying(host: str, port: int, within: float, timeout: float) -> socket.socket:
    """Connect, retrying (every 20 ms, for ``within`` seconds) while nothing listens yet: the relay or
    service under test is still starting. ``timeout`` is the connected socket's."""
    deadline = time.monotonic() + within
    while True:
        try:
            return socket.create_connection((host, port), timeout=timeout)
        except (ConnectionRefusedError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # polling a listener that is not there yet, with a deadline


def receive_timed(sock: socket.socket) -> dict[str, float]:
    """Send :data:`GO`, count the bytes to EOF and close: ``{"bytes": n, "seconds": s}``, timed from GO."""
    buf = memoryview(bytearray(CHUNK))
    sock.sendall(GO)
    started = time.perf_counter()
    received = 0
    while n := sock.recv_into(buf):
        received += n
    seconds = time.perf_counter() - started
    sock.close()
    return {"bytes": received, "seconds": seconds}
