#!/usr/bin/env python3
"""What cluster-wide relay budgets cost the relay: the same relay pump, charged against plain in-process
budgets and against budgets shared through Redis (``server --redis``, leased in chunks), in one run.

A relay with three budgets (source address, token, peer id: what a relay in a cluster is charged to)
carries ``--bytes`` from a sender to a receiver over loopback, all in one process; each variant runs
``--reps`` times, interleaved. Prints the medians, the shared/plain ratio and the leases each GiB took
(Redis round trips on the relay's side). The script starts its own redis-server on loopback and stops
it by PID.

    .venv/bin/python scripts/bench_cluster_budget.py                  # 1 GiB, 5 reps
    .venv/bin/python scripts/bench_cluster_budget.py --bytes 256MiB --reps 3 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchutil import parse_size

from tcppunch.coordinator.cluster import RedisCluster, SharedBudget
from tcppunch.lab.server_process import stop_process
from tcppunch.relay import ByteBudget, RelayEnd, relay

CHUNK = 1 << 20
ACCOUNTS = ("source:127.0.0.1", "token:shared", "peer:bench")
LIMIT = 1 << 50  # never reached: the cost of leasing, not a limit, is measured


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian package redis-server)")
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
                             "no", "--dir", workdir, "--protected-mode", "no", "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10.0
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise SystemExit("redis-server did not start")
        time.sleep(0.05)  # polling readiness with a deadline


async def one_run(total: int, budgets: list[ByteBudget]) -> float:
    """Seconds to carry ``total`` bytes through relay() charged to ``budgets``."""
    loop = asyncio.get_running_loop()
    send_app, send_relay = socket.socketpair()
    recv_relay, recv_app = socket.socketpair()
    for s in (send_app, recv_app):
        s.setblocking(False)
    block = b"x" * CHUNK

    async def send() -> None:
        left = total
        while left:
            n = min(left, CHUNK)
            await loop.sock_sendall(send_app, block[:n])
            left -= n
        send_app.shutdown(socket.SHUT_WR)

    async def receive() -> int:
        got = 0
        buf = bytearray(CHUNK)
        while n := await loop.sock_recv_into(recv_app, buf):
            got += n
        return got

    started = time.perf_counter()
    pump = asyncio.create_task(relay(RelayEnd(send_relay, b""), RelayEnd(recv_relay, b""), budgets=budgets))
    recv_app.shutdown(socket.SHUT_WR)  # nothing flows back
    _, got, _ = await asyncio.gather(send(), receive(), pump)
    elapsed = time.perf_counter() - started
    for s in (send_app, recv_app):
        s.close()
    if got != total:
        raise SystemExit(f"the relay carried {got} of {total} bytes")
    return elapsed


async def main(args: argparse.Namespace) -> dict[str, object]:
    workdir = tempfile.mkdtemp(prefix="tcppunch-bench-redis-")
    proc, url = start_redis(workdir)
    cluster = RedisCluster(url, ttl=15.0, refresh_interval=5.0)
    try:
        await cluster.start(lambda _forward: None, lambda *_answer: None, lambda: [])
        times: dict[str, list[float]] = {"plain": [], "shared": []}
        leases = 0
        for rep in range(args.reps):
            plain = [ByteBudget(LIMIT) for _ in ACCOUNTS]
            times["plain"].append(await one_run(args.bytes, plain))
            shared = [SharedBudget(cluster, f"{account}:{rep}", LIMIT, 3600.0) for account in ACCOUNTS]
            times["shared"].append(await one_run(args.bytes, shared))
            leases += sum(b.leases for b in shared)
        gib = args.bytes * args.reps / (1 << 30)
        plain_s, shared_s = statistics.median(times["plain"]), statistics.median(times["shared"])
        return {
            "bytes": args.bytes,
            "reps": args.reps,
            "lease_bytes": SharedBudget(cluster, "x", LIMIT, None).lease_size,
            "budgets_per_relay": len(ACCOUNTS),
            "plain_mb_per_s": round(args.bytes / plain_s / 1e6, 1),
            "shared_mb_per_s": round(args.bytes / shared_s / 1e6, 1),
            "shared_over_plain": round(plain_s / shared_s, 3),
            "leases_per_gib": round(leases / gib, 1),
        }
    finally:
        await cluster.close()
        stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=parse_size, default=1 << 30, help="bytes per run (default 1GiB)")
    parser.add_argument("--reps", type=int, default=5, help="runs per variant, interleaved (default 5)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    figures = asyncio.run(main(args))
    for key, value in figures.items():
        print(f"{key:>20}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
