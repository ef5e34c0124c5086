"""Registration time while thousands of idle, unauthenticated connections are open (issue 9 finding 3).

    .venv/bin/python scripts/bench_idle_connections.py                # 2,000 idle connections, 20 registrations
    .venv/bin/python scripts/bench_idle_connections.py --idle 4000 --registrations 50

Runs the real `tcppunch server` on loopback as a child process whose soft fd limit is 1024 (the issue's
`ulimit -n 1024`; the server raises it at start). Then, in the same run:

1. reference: registrations (REGISTER -> REGISTERED, a fresh connection each) with nothing else open;
2. spread: ``--idle`` idle connections (no preamble, no token) from 127.0.0.2..127.0.0.N, at most 60 per
   source (under the per-source limit of 64), all open while the registrations are timed;
3. one source: ``--idle`` connections attempted from 127.0.0.1 alone: the server keeps 64, refuses the
   rest at once, and registrations from another source are timed again.

Prints the registration times (median, max) of each phase, their ratio to the reference, how many idle
connections were open, and how many lines and bytes the server logged. Idle connections are closed by
the server after its 5 s handshake timeout, so each phase opens them, then measures at once. Loopback
only: the server listens on 127.0.0.1, sources are 127.0.0.0/8 addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import structlog

from tcppunch.coordinator.control import ControlChannel
from tcppunch.wire.endpoint import Endpoint

PER_SOURCE = 60
SERVER_FD_LIMIT = 1024
READY_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(port: int, secret_dir: Path, token: str) -> subprocess.Popen[bytes]:
    """`tcppunch server` with a soft fd limit of 1024; returns once it printed 'listening on'."""
    tokens = secret_dir / "tokens.json"
    tokens.write_text("{" + ", ".join(f'"r{i}": "{token}"' for i in range(1000)) + "}")
    tokens.chmod(0o600)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_FD_LIMIT, hard))

    server = subprocess.Popen(
        [sys.executable, "-m", "tcppunch", "server", "--listen", f"127.0.0.1:{port}", "--tokens-file", str(tokens)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, preexec_fn=limit,
    )
    assert server.stderr is not None
    deadline = time.monotonic() + READY_TIMEOUT
    seen = b""
    while b"listening on" not in seen:
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError(f"the server did not start: {seen.decode(errors='replace')}")
        seen += server.stderr.readline()
    return server


async def register_times(port: int, token: str, count: int, first: int, source: str) -> list[float]:
    """Milliseconds from connect to REGISTERED, one fresh control connection each."""
    times = []
    for i in range(first, first + count):
        started = time.perf_counter()
        channel = ControlChannel(Endpoint("127.0.0.1", port), f"r{i}", token, local=Endpoint(source, 0))
        await asyncio.wait_for(channel.register(), 10.0)
        times.append((time.perf_counter() - started) * 1000)
        await channel.close()
    return times


def open_idle(port: int, sources: list[str], per_source: int) -> list[socket.socket]:
    """Idle connections (connected, nothing sent), ``per_source`` from each source address."""
    socks = []
    for source in sources:
        for _ in range(per_source):
            sock = socket.socket()
            sock.bind((source, 0))
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
            socks.append(sock)
    return socks


TCP_ESTABLISHED = 1


def still_open(socks: list[socket.socket]) -> int:
    """How many of ``socks`` are established and got neither a refusal nor an EOF from the server."""
    count = 0
    for sock in socks:
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            if state != TCP_ESTABLISHED:
                continue
            sock.recv(1024)  # data (a server-busy ERROR) or b"" (closed): not an open idle connection
        except BlockingIOError:
            count += 1
        except OSError:
            continue
    return count


def wait_open(socks: list[socket.socket], want: int) -> int:
    """Poll until ``want`` of ``socks`` are open idle connections (at most 2 s, well inside the server's
    5 s handshake timeout); return how many are."""
    deadline = time.monotonic() + 2.0
    count = still_open(socks)
    while count < want and time.monotonic() < deadline:
        time.sleep(0.05)
        count = still_open(socks)
    return count


def settled(socks: list[socket.socket]) -> int:
    """:func:`still_open` once the server has dealt with every connection (two equal counts in a row,
    at most 5 s)."""
    last, deadline = -1, time.monotonic() + 5.0
    while time.monotonic() < deadline:
        now = still_open(socks)
        if now == last:
            return now
        last = now
        time.sleep(0.2)
    return last


def summary(name: str, times: list[float], reference: list[float] | None, idle_open: int | None) -> str:
    median = statistics.median(times)
    text = f"{name:<34} median {median:7.2f} ms  max {max(times):7.2f} ms"
    if reference is not None:
        text += f"  ratio to reference {median / statistics.median(reference):5.2f}"
    if idle_open is not None:
        text += f"  idle connections open {idle_open}"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=2000, help="idle connections per phase (default 2000)")
    parser.add_argument("--registrations", type=int, default=20, help="timed registrations per phase")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.idle + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.idle + 256), hard))
    token = os.urandom(16).hex()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(port, Path(tmp), token)
        log_bytes = bytearray()
        assert server.stderr is not None
        stderr = server.stderr
        # drain the server's log as it comes (a full pipe would stall the server)
        def pump() -> None:
            while chunk := stderr.read1(65536):
                log_bytes.extend(chunk)

        drain = threading.Thread(target=pump, daemon=True)
        drain.start()
        try:
            n = args.registrations
            reference = asyncio.run(register_times(port, token, n, 0, "127.0.0.1"))
            print(summary("reference (nothing else open)", reference, None, None), flush=True)

            sources = [f"127.0.0.{2 + i}" for i in range(-(-args.idle // PER_SOURCE))]
            idle = open_idle(port, sources, PER_SOURCE)[: args.idle]
            before = wait_open(idle, len(idle))
            spread = asyncio.run(register_times(port, token, n, n, "127.0.0.250"))
            after = still_open(idle)
            print(summary(f"{len(idle)} idle from {len(sources)} sources", spread, reference, min(before, after)),
                  flush=True)
            for sock in idle:
                sock.close()

            one = open_idle(port, ["127.0.0.1"], args.idle)
            kept = settled(one)
            lonely = asyncio.run(register_times(port, token, n, 2 * n, "127.0.0.251"))
            print(summary(f"{len(one)} tried from one source", lonely, reference, kept), flush=True)
            for sock in one:
                sock.close()
        finally:
            server.terminate()
            server.wait(timeout=10)
            drain.join(timeout=10)
        lines = log_bytes.count(b"\n")
        print(f"server log: {lines} lines, {len(log_bytes)} bytes (whole run)", flush=True)
        goal = max(statistics.median(spread), statistics.median(lonely))
        print(f"registration under 100 ms with idle connections open: {'yes' if goal < 100 else 'NO'} "
              f"(worst median {goal:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
