"""Coordinator load benchmark: rendezvous rate at 200 registered peers vs at many, in one run.

One coordinator process on loopback (the control channel in TLS 1.3, as every client speaks it); a load
generator of several processes, each connecting from its own source address in 127.0.0.0/8 (one address's
ephemeral ports would run out). Steps, in one run:

1. register 200 "active" peers; measure the rendezvous rate (a rendezvous = CONNECT sent -> the
   initiator's PUNCH received; both sides then report RESULT direct, which ends the session) with every
   active peer keeping one CONNECT in flight, then CONNECT->PUNCH latency at a paced 1,000/s;
2. register the idle peers (registrations/s; server RSS before/after -> memory per peer); every peer
   answers the server's keepalive pings all along;
3. the same two measurements again, and the ratios.

Traffic goes to 127.0.0.1 only. Every phase has a time limit, the whole run a deadline; the generator
and server processes are stopped by PID at the end. The server's soft RLIMIT_NOFILE is raised to its
hard limit; the peer count is capped by that hard limit (printed) because each peer is one TCP connection.

    python scripts/bench_coordinator.py                 # 200 vs 50,000 (or the fd cap), ~1-2 min
    python scripts/bench_coordinator.py --peers 5000 --workers 2 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import resource
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from tcppunch.wire.coord import Connect, Outcome, Register, Result, encode_message
from tcppunch.wire.framing import PREAMBLE, FrameDecoder, ProtocolError, encode_frame

TOKEN = "bench-token"  # a loopback-only benchmark secret, passed to the server through its environment
ACTIVE = 200
RUN_DEADLINE = 420.0  # seconds: the whole run stops by itself after this
PHASE_LIMIT = 240.0  # seconds: no single command to a worker may take longer (TLS registrations are slow)
# Registrations in flight per generator process (= per source address): below the server's limit of
# unauthenticated connections per source (max_unauthenticated_per_source, 64).
REGISTER_CONCURRENCY = 48


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ------------------------------------------------------------------------------------------- server


def serve(port: int, max_connections: int) -> None:
    """The coordinator under test (subprocess): default timings, logs at warning and GC settings as the CLI's."""
    from tcppunch.cli.logging import configure_logging
    from tcppunch.cli.server_cmd import tune_gc
    from tcppunch.coordinator.auth import Tokens
    from tcppunch.coordinator.server import CoordinatorServer
    from tcppunch.session.identity import Identity

    raise_nofile()
    configure_logging("warning")
    tune_gc()  # as `tcppunch server` does

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        server = CoordinatorServer("127.0.0.1", port, Tokens(shared=os.environ["BENCH_TOKEN"]),
                                   max_connections=max_connections, identity=Identity.generate())
        async with server:
            print(f"ready {server.address.port}", flush=True)
            await stop.wait()

    asyncio.run(main())


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# ------------------------------------------------------------------------------------ load generator


class PeerConn(asyncio.Protocol):
    """One registered peer: answers pings, reports RESULT direct to every PUNCH, times its CONNECTs."""

    __slots__ = ("decoder", "peer_id", "registered", "transport", "waiting", "worker")

    def __init__(self, worker: Worker, peer_id: str) -> None:
        self.worker = worker
        self.peer_id = peer_id
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.registered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # request_id -> (send time, future set at PUNCH)
        self.waiting: dict[str, tuple[float, asyncio.Future[float]]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(PREAMBLE + encode_message(Register(self.peer_id, TOKEN)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.lost += 1
        if not self.registered.done():
            self.registered.set_exception(ConnectionError(f"{self.peer_id}: closed before REGISTERED"))
        for _, future in self.waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("control connection lost"))

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        try:
            while (obj := self.decoder.next_frame()) is not None:
                self._frame(obj)
        except ProtocolError as exc:
            self.worker.errors.append(f"{self.peer_id}: {exc}")

    def _frame(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        assert self.transport is not None
        if kind == "ping":
            self.transport.write(encode_frame({"type": "pong", "seq": obj["seq"]}))
        elif kind == "registered":
            self.worker.keepalive = max(self.worker.keepalive, float(obj["keepalive_interval"]))
            if not self.registered.done():
                self.registered.set_result(None)
        elif kind == "punch":
            now = time.perf_counter()
            self.transport.write(encode_message(Result(obj["session_id"], Outcome.DIRECT)))
            waiting = self.waiting.pop(obj.get("request_id") or "", None)
            if waiting is not None and not waiting[1].done():
                waiting[1].set_result(now - waiting[0])
        elif kind == "error":
            self.worker.errors.append(f"{self.peer_id}: {obj.get('code')}: {obj.get('message')}")
            waiting = self.waiting.pop(obj.get("request_id") or "", None)
            if waiting is not None and not waiting[1].done():
                waiting[1].set_exception(RuntimeError(str(obj.get("code"))))

    def connect(self, target: str, request_id: str) -> asyncio.Future[float]:
        assert self.transport is not None
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = (time.perf_counter(), future)
        self.transport.write(encode_message(Connect(request_id, target)))
        return future


@dataclass
class Worker:
    index: int
    source_ip: str
    server_port: int
    active: list[PeerConn] = field(default_factory=list)
    idle: list[PeerConn] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lost: int = 0
    keepalive: float = 0.0  # the longest keepalive interval a REGISTERED announced
    tls: ssl.SSLContext | None = None  # the control channel's TLS (one key for every generated peer)
    _seq: int = 0

    def request_id(self) -> str:
        self._seq += 1
        return f"w{self.index}-{self._seq}"

    async def register(self, ids: list[str], concurrency: int) -> list[PeerConn]:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)
        conns: list[PeerConn] = []

        async def one(peer_id: str) -> None:
            async with gate:
                _, proto = await loop.create_connection(
                    lambda: PeerConn(self, peer_id), "127.0.0.1", self.server_port,
                    local_addr=(self.source_ip, 0), ssl=self.tls, server_hostname="" if self.tls else None,
                )
                await asyncio.wait_for(proto.registered, 30.0)
                conns.append(proto)

        results = await asyncio.gather(*(one(i) for i in ids), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            self.errors.append(f"{len(failures)} registrations failed, first: {failures[0]!r}")
        return conns

    def _pairs(self) -> list[tuple[PeerConn, str]]:
        n = len(self.active)
        return [(self.active[i], self.active[(i + 1) % n].peer_id) for i in range(n)]

    async def saturate(self, duration: float) -> dict[str, Any]:
        """Every active peer keeps one CONNECT in flight for ``duration`` seconds."""
        end = time.perf_counter() + duration
        latencies: list[float] = []

        async def loop_one(peer: PeerConn, target: str) -> None:
            while time.perf_counter() < end:
                latencies.append(await asyncio.wait_for(peer.connect(target, self.request_id()), 10.0))

        started = time.perf_counter()
        await asyncio.gather(*(loop_one(p, t) for p, t in self._pairs()))
        return {"count": len(latencies), "elapsed": time.perf_counter() - started, "latencies": latencies}

    async def paced(self, rate: float, duration: float) -> dict[str, Any]:
        """CONNECTs at ``rate``/s (open loop, each from an active peer with none in flight)."""
        idle = self._pairs()
        latencies: list[float] = []
        skipped = 0
        pending: set[asyncio.Task[None]] = set()

        async def one(peer: PeerConn, target: str) -> None:
            try:
                latencies.append(await asyncio.wait_for(peer.connect(target, self.request_id()), 10.0))
            finally:
                idle.append((peer, target))

        start = time.perf_counter()
        total = int(rate * duration)
        for k in range(total):
            delay = start + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the pacing clock of an open-loop generator, not a wait for a result
            if not idle:
                skipped += 1
                continue
            peer, target = idle.pop(0)
            task = asyncio.get_running_loop().create_task(one(peer, target))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=15.0)
        return {"count": len(latencies), "elapsed": time.perf_counter() - start, "latencies": latencies,
                "skipped": skipped}


def worker_main(index: int, source_ip: str, server_port: int, pipe: Connection) -> None:
    from tcppunch.session.identity import Identity
    from tcppunch.session.secure import context

    raise_nofile()
    tls = context(Identity.generate(), server_side=False)
    asyncio.run(_worker_loop(Worker(index, source_ip, server_port, tls=tls), pipe))


async def _worker_loop(worker: Worker, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    while True:
        command, args = await loop.run_in_executor(None, pipe.recv)
        if command == "stop":
            for peer in worker.active + worker.idle:
                if peer.transport is not None:
                    peer.transport.abort()
            pipe.send({})
            return
        started = time.perf_counter()
        try:
            if command == "register":
                ids, concurrency, active = args
                conns = await worker.register(ids, concurrency)
                (worker.active if active else worker.idle).extend(conns)
                reply: dict[str, Any] = {"count": len(conns), "elapsed": time.perf_counter() - started}
            elif command == "stats":
                reply = {}
            elif command == "saturate":
                reply = await worker.saturate(*args)
            else:
                reply = await worker.paced(*args)
        except Exception as exc:  # reported to the controller, which stops the run
            reply = {"failed": repr(exc)}
        reply["errors"], reply["lost"], reply["keepalive"] = worker.errors[:5], worker.lost, worker.keepalive
        worker.errors.clear()
        pipe.send(reply)


# ------------------------------------------------------------------------------------------ controller


class Run:
    def __init__(self, workers: int, port: int, deadline: float) -> None:
        self.deadline = deadline
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        ctx = mp.get_context("fork")
        for w in range(workers):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(w, f"127.0.{10 + w}.1", port, theirs), daemon=True)
            proc.start()
            self.pipes.append(ours)
            self.procs.append(proc)

    def each(self, command: str, args_per_worker: list[Any]) -> list[dict[str, Any]]:
        for pipe, args in zip(self.pipes, args_per_worker, strict=True):
            pipe.send((command, args))
        limit = min(PHASE_LIMIT, self.deadline - time.monotonic())
        replies = []
        for pipe in self.pipes:
            if not pipe.poll(max(limit, 0.1)):
                raise TimeoutError(f"{command}: a worker did not answer within {limit:.0f} s")
            replies.append(pipe.recv())
        for reply in replies:
            if "failed" in reply:
                raise RuntimeError(f"{command}: {reply['failed']} {reply['errors']}")
            if reply["errors"]:
                print(f"  worker errors during {command}: {reply['errors']}", file=sys.stderr)
        return replies

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop", None))
        for proc in self.procs:
            proc.join(10.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)


def split(items: list[str], parts: int) -> list[list[str]]:
    return [items[i::parts] for i in range(parts)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(run: Run, workers: int, duration: float, rate: float) -> dict[str, float]:
    sat = run.each("saturate", [(duration,)] * workers)
    count = sum(r["count"] for r in sat)
    elapsed = max(r["elapsed"] for r in sat)
    paced = run.each("paced", [(rate / workers, duration)] * workers)
    lat = [x for r in paced for x in r["latencies"]]
    return {
        "rendezvous_per_s": count / elapsed,
        "paced_rate": sum(r["count"] for r in paced) / max(r["elapsed"] for r in paced),
        "paced_skipped": sum(r["skipped"] for r in paced),
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * percentile(lat, 0.99),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=50_000, help="registered peers in the large phase")
    parser.add_argument("--workers", type=int, default=4, help="load generator processes (one source IP each)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--rate", type=float, default=1000.0, help="paced rendezvous/s for the latency figure")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-connections", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.max_connections)
        return 0
    deadline = time.monotonic() + RUN_DEADLINE
    hard = raise_nofile()
    # The server holds one fd per peer; keep room for its listener, logs and the event loop.
    peers = min(args.peers, hard - 300)
    if peers < args.peers:
        print(f"note: {args.peers} peers requested, capped at {peers}: RLIMIT_NOFILE hard limit is {hard} "
              "(raising it needs CAP_SYS_RESOURCE)", file=sys.stderr)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--max-connections", str(peers + 100)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "BENCH_TOKEN": TOKEN},
    )
    run: Run | None = None
    try:
        assert server.stdout is not None
        ready = server.stdout.readline()
        if not ready.startswith("ready"):
            raise RuntimeError(f"server did not start: {ready!r}")
        run = Run(args.workers, port, deadline)
        active = [f"a{i}" for i in range(ACTIVE)]
        rss0 = rss_kib(server.pid)
        run.each("register", [(ids, REGISTER_CONCURRENCY, True) for ids in split(active, args.workers)])
        small = measure(run, args.workers, args.duration, args.rate)
        idle = [f"i{i}" for i in range(peers - ACTIVE)]
        rss1 = rss_kib(server.pid)
        t0 = time.perf_counter()
        regs = run.each("register", [(ids, REGISTER_CONCURRENCY, False) for ids in split(idle, args.workers)])
        reg_elapsed = time.perf_counter() - t0
        registered = sum(r["count"] for r in regs)
        rss2 = rss_kib(server.pid)
        large = measure(run, args.workers, args.duration, args.rate)
        lost = sum(r["lost"] for r in run.each("stats", [None] * args.workers))
    finally:
        if run is not None:
            run.stop()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30.0)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5.0)
    result = {
        "peers_small": ACTIVE,
        "peers_large": ACTIVE + registered,
        "small": small,
        "large": large,
        "rate_ratio": large["rendezvous_per_s"] / small["rendezvous_per_s"],
        "registrations_per_s": registered / reg_elapsed,
        "rss_kib": {"start": rss0, "after_small": rss1, "after_large": rss2},
        "bytes_per_peer": (rss2 - rss1) * 1024 / max(registered, 1),
        "connections_lost": lost,
        "keepalive_interval_max": max(r["keepalive"] for r in regs),
        "workers": args.workers,
        "nofile_hard_limit": hard,
        "load_average": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


def print_table(r: dict[str, Any]) -> None:
    print("| registered peers | rendezvous/s (saturated) | CONNECT->PUNCH p50 | p99 | at paced rate |")
    print("|---|---|---|---|---|")
    for key in ("small", "large"):
        m = r[key]
        print(f"| {r['peers_' + key]:,} | {m['rendezvous_per_s']:,.0f} | {m['p50_ms']:.2f} ms | {m['p99_ms']:.2f} ms"
              f" | {m['paced_rate']:,.0f}/s (skipped {m['paced_skipped']}) |")
    print(f"rate ratio {r['peers_large']:,} / {r['peers_small']} peers: {r['rate_ratio']:.2f} (goal >= 0.8)")
    print(f"registrations/s: {r['registrations_per_s']:,.0f}")
    print(f"server memory per registered peer: {r['bytes_per_peer']:,.0f} bytes (RSS delta; goal <= 8192)")
    print(f"control connections lost during the run: {r['connections_lost']}; longest keepalive interval "
          f"announced: {r['keepalive_interval_max']:g} s (the server's keepalive budget, 1,000 pings/s)")
    print("machine load average (1, 5, 15 min) at the end: {:.1f} {:.1f} {:.1f}".format(*r["load_average"]))


if __name__ == "__main__":
    sys.exit(main())
