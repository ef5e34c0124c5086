#!/usr/bin/env python3
"""Relay throughput: tcppunch's relay against socat configured as the same kind of relay, in one run.

Both relays are "two listening ports spliced together": the sender connects to port 1, the receiver to
port 2, and the relay pumps bytes between the two accepted connections (socat:
``socat TCP-LISTEN:p1,bind=H,reuseaddr TCP-LISTEN:p2,bind=H,reuseaddr``; ours: ``relay()`` on two
``detach()``-ed asyncio connections, the coordinator's code path). Sender, receiver and relay are
separate processes. The receiver says "go" through the relay, then times the bulk transfer from that
moment to EOF. Each variant runs ``--reps`` times, interleaved; the medians and ours/socat ratios are
printed (and written as JSON with ``--json``).

    .venv/bin/python scripts/bench_relay.py                      # loopback, 1 GiB, 5 reps
    .venv/bin/python scripts/bench_relay.py --lab --bytes 512MiB # two NATed lab hosts, relay on lab.server

With ``--lab`` (root): the sender and receiver are hosts behind two symmetric-random NAT routers (the
pair that needs a relay) and both relays run in the lab's server namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchutil import CHUNK, GO, connect_retrying, parse_size, receive_timed

SCRIPT = str(Path(__file__).resolve())
CONNECT_WITHIN_S = 15.0
RUN_WITHIN_S = 300.0


# ---------------------------------------------------------------- roles (each runs as its own process)


def connect(host: str, port: int) -> socket.socket:
    """Connect, retrying while the relay is not listening yet (socat opens port 2 only after port 1)."""
    return connect_retrying(host, port, CONNECT_WITHIN_S, RUN_WITHIN_S)


def role_send(host: str, port: int, total: int) -> None:
    sock = connect(host, port)
    if sock.recv(1) != GO:
        raise SystemExit("sender: no go signal from the receiver")
    block = memoryview(os.urandom(CHUNK))
    left = total
    while left > 0:
        n = min(left, CHUNK)
        sock.sendall(block[:n])
        left -= n
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(CHUNK):  # wait for the receiver's EOF so the relay sees both sides finish
        pass
    sock.close()


def role_recv(host: str, port: int) -> None:
    print(json.dumps(receive_timed(connect(host, port))), flush=True)


def role_relay_ours(
    bind: str, ports: Sequence[int], method: str, pipe_size: int, buffer_size: int
) -> None:
    import logging

    import structlog

    from tcppunch.relay import RelayEnd, detach, relay

    # Keep stdout for the result line; the relay's own "relay ended" log would land there by default.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    async def main() -> None:
        ends: dict[int, RelayEnd] = {}
        both = asyncio.Event()

        def handler(port: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
            def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                ends[port] = detach(reader, writer)
                if len(ends) == 2:
                    both.set()

            return handle

        servers = [
            await asyncio.start_server(handler(p), bind, p, reuse_address=True) for p in ports
        ]
        await asyncio.wait_for(both.wait(), CONNECT_WITHIN_S * 2)
        for server in servers:
            server.close()
        cpu = time.process_time()
        stats = await relay(ends[ports[0]], ends[ports[1]], method=method,  # type: ignore[arg-type]
                            pipe_size=pipe_size, buffer_size=buffer_size)
        cpu = time.process_time() - cpu
        print(json.dumps({**asdict(stats), "relay_cpu_s": cpu}), flush=True)

    asyncio.run(main())


# ---------------------------------------------------------------- orchestration


@dataclass
class Variant:
    name: str
    kind: str  # "ours" | "socat"
    method: str = "auto"
    pipe_size: int = 1 << 20
    buffer_size: int = 1 << 20
    block: int = 8192  # socat -b

    def relay_argv(self, bind: str, ports: Sequence[int]) -> list[str]:
        if self.kind == "socat":
            addrs = [f"TCP-LISTEN:{p},bind={bind},reuseaddr" for p in ports]
            return ["socat", "-b", str(self.block), *addrs]
        return [sys.executable, SCRIPT, "_relay", "--bind", bind, "--ports", *map(str, ports),
                "--method", self.method, "--pipe-size", str(self.pipe_size),
                "--buffer-size", str(self.buffer_size)]


VARIANTS = {
    "ours-splice": Variant("ours-splice", "ours", "splice"),
    "ours-copy": Variant("ours-copy", "ours", "copy"),
    "ours-splice-64k": Variant("ours-splice-64k", "ours", "splice", pipe_size=64 << 10),
    "ours-splice-4m": Variant("ours-splice-4m", "ours", "splice", pipe_size=4 << 20),
    "ours-copy-64k": Variant("ours-copy-64k", "ours", "copy", buffer_size=64 << 10),
    "ours-copy-256k": Variant("ours-copy-256k", "ours", "copy", buffer_size=256 << 10),
    "socat": Variant("socat", "socat"),  # socat's defaults (-b 8192)
    "socat-b256k": Variant("socat-b256k", "socat", block=256 << 10),
    "socat-b1m": Variant("socat-b1m", "socat", block=1 << 20),
}
DEFAULT_VARIANTS = "ours-splice,ours-copy,socat,socat-b256k,socat-b1m"


@dataclass
class Place:
    """Where the three processes run, which address the relay listens on, how ports are chosen."""

    relay_bind: str
    spawn_relay: Callable[[list[str]], subprocess.Popen[str]]
    spawn_sender: Callable[[list[str]], subprocess.Popen[str]]
    spawn_receiver: Callable[[list[str]], subprocess.Popen[str]]
    pick_ports: Callable[[], tuple[int, int]]


def local_place() -> Place:
    def spawn(argv: list[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)

    def free_ports() -> tuple[int, int]:
        """Two ports free on loopback now (others share this machine's loopback)."""
        probes = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
        ports = probes[0].getsockname()[1], probes[1].getsockname()[1]
        for probe in probes:
            probe.close()
        return ports

    return Place("127.0.0.1", spawn, spawn, spawn, free_ports)


def counting_ports(first: int) -> Callable[[], tuple[int, int]]:
    """Fresh port pairs in a namespace of our own, where nothing else binds."""
    state = [first]

    def pick() -> tuple[int, int]:
        state[0] += 2
        return state[0], state[0] + 1

    return pick


@dataclass
class Result:
    variant: str
    mbps: float
    relay_cpu_s: float  # CPU of the relay process while relaying (ours) / over its whole life (socat)
    seconds: float


def one_run(place: Place, variant: Variant, total: int, ports: Sequence[int]) -> Result:
    relay = place.spawn_relay(variant.relay_argv(place.relay_bind, ports))
    procs = [relay]
    try:
        sender = place.spawn_sender([sys.executable, SCRIPT, "_send", "--connect",
                                     f"{place.relay_bind}:{ports[0]}", "--bytes", str(total)])
        procs.append(sender)
        receiver = place.spawn_receiver([sys.executable, SCRIPT, "_recv", "--connect",
                                         f"{place.relay_bind}:{ports[1]}"])
        procs.append(receiver)
        out, _ = receiver.communicate(timeout=RUN_WITHIN_S)
        if receiver.returncode != 0:
            raise RuntimeError(f"{variant.name}: receiver failed ({receiver.returncode})")
        sender.wait(timeout=RUN_WITHIN_S)
        relay_out, cpu = _reap_with_cpu(relay, RUN_WITHIN_S)
        if relay.returncode != 0:
            raise RuntimeError(f"{variant.name}: relay failed ({relay.returncode})")
        got = json.loads(out.strip().splitlines()[-1])
        if got["bytes"] != total:
            raise RuntimeError(f"{variant.name}: receiver got {got['bytes']} of {total} bytes")
        if variant.kind == "ours":
            stats = json.loads(relay_out.strip().splitlines()[-1])
            if stats["a_to_b"] != total or stats["reason"] != "eof":
                raise RuntimeError(f"{variant.name}: relay reported {stats}")
            cpu = stats["relay_cpu_s"]  # without interpreter start-up, which socat hardly has
        return Result(variant.name, total / got["seconds"] / 1e6, cpu, got["seconds"])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def _reap_with_cpu(proc: subprocess.Popen[str], timeout: float) -> tuple[str, float]:
    """Read ``proc``'s output, reap it with wait4, return (stdout, its CPU seconds).

    ``ip netns exec`` execs the command in place, so in the lab the PID is the relay's own.
    """
    out = proc.stdout.read() if proc.stdout is not None else ""  # EOF when the relay exits
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return out, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            raise TimeoutError("relay did not exit")
        time.sleep(0.01)


def benchmark(place: Place, variants: list[Variant], total: int, reps: int) -> dict[str, Any]:
    results: dict[str, list[Result]] = {v.name: [] for v in variants}
    for rep in range(reps):
        for variant in variants:  # interleaved, so drift in machine load hits every variant alike
            r = one_run(place, variant, total, place.pick_ports())
            results[variant.name].append(r)
            print(f"  rep {rep + 1}/{reps} {variant.name:16s} {r.mbps:8.0f} MB/s  "
                  f"relay CPU {r.relay_cpu_s:5.2f} s", flush=True)
    medians = {name: statistics.median(r.mbps for r in rs) for name, rs in results.items()}
    cpu = {name: statistics.median(r.relay_cpu_s for r in rs) for name, rs in results.items()}
    return {"bytes": total, "reps": reps, "median_mbps": medians, "median_relay_cpu_s": cpu,
            "runs": {name: [asdict(r) for r in rs] for name, rs in results.items()}}


def report(summary: dict[str, Any]) -> None:
    medians: dict[str, float] = summary["median_mbps"]
    cpu: dict[str, float] = summary["median_relay_cpu_s"]
    print(f"\n{summary['bytes'] / 2**20:.0f} MiB per run, {summary['reps']} reps, medians:")
    for name, mbps in medians.items():
        print(f"  {name:16s} {mbps:8.0f} MB/s   relay CPU {cpu[name]:5.2f} s")
    socats = [n for n in medians if n.startswith("socat")]
    for ours in (n for n in medians if n.startswith("ours")):
        for ref in socats:
            print(f"  ratio {ours}/{ref}: {medians[ours] / medians[ref]:.2f}")


def run_in_lab(variants: list[Variant], total: int, reps: int) -> dict[str, Any]:
    from tcppunch.lab import Lab, LabSpec, NatType, RouterSpec, SynPolicy

    spec = LabSpec([RouterSpec("a", NatType.SYMMETRIC_RANDOM, SynPolicy.DROP),
                    RouterSpec("b", NatType.SYMMETRIC_RANDOM, SynPolicy.RST)])
    with Lab(spec) as lab:
        a, b = lab.host("a"), lab.host("b")

        def on(host: Any) -> Callable[[list[str]], subprocess.Popen[str]]:
            return lambda argv: host.popen(argv, stdout=subprocess.PIPE, text=True)

        print(f"lab {lab.prefix}: sender {a.address} (NAT {a.public_address}) -> relay "
              f"{lab.server.address} -> receiver {b.address} (NAT {b.public_address})", flush=True)
        place = Place(lab.server.address, on(lab.server), on(a), on(b), counting_ports(41000))
        return benchmark(place, variants, total, reps)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="role")
    send = sub.add_parser("_send")
    send.add_argument("--connect", required=True)
    send.add_argument("--bytes", type=parse_size, required=True)
    recv = sub.add_parser("_recv")
    recv.add_argument("--connect", required=True)
    rel = sub.add_parser("_relay")
    rel.add_argument("--bind", required=True)
    rel.add_argument("--ports", type=int, nargs=2, required=True)
    rel.add_argument("--method", default="auto")
    rel.add_argument("--pipe-size", type=int, default=1 << 20)
    rel.add_argument("--buffer-size", type=int, default=1 << 20)
    parser.add_argument("--bytes", type=parse_size, default=1 << 30, help="per run (default 1GiB)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated from {', '.join(VARIANTS)}")
    parser.add_argument("--lab", action="store_true", help="two NATed lab hosts, relay on lab.server")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)

    if args.role in ("_send", "_recv"):
        host, _, port = args.connect.rpartition(":")
        if args.role == "_send":
            role_send(host, int(port), args.bytes)
        else:
            role_recv(host, int(port))
        return
    if args.role == "_relay":
        role_relay_ours(args.bind, args.ports, args.method, args.pipe_size, args.buffer_size)
        return

    try:
        variants = [VARIANTS[name] for name in args.variants.split(",")]
    except KeyError as exc:
        parser.error(f"unknown variant {exc}")
    if not 1 <= args.reps <= 50:
        parser.error("--reps must be 1..50")
    where = "lab" if args.lab else "loopback"
    print(f"relay benchmark on {where}: {args.bytes / 2**20:.0f} MiB x {args.reps} reps, "
          f"{os.cpu_count()} CPUs, variants {args.variants}", flush=True)
    if args.lab:
        summary = run_in_lab(variants, args.bytes, args.reps)
    else:
        summary = benchmark(local_place(), variants, args.bytes, args.reps)
    summary["where"] = where
    report(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
