"""Coordinator load benchmark: rendezvous rate at 200 registered peers vs at many, in one run.

One coordinator process on loopback (the control channel authenticated in TLS 1.3, then in the record layer
as tcppunch's client switches to it after REGISTERED; --tls-only keeps TLS throughout); a load
generator of several processes, each connecting from its own source address in 127.0.0.0/8 (one address's
ephemeral ports would run out). Steps, in one run:

1. register 200 "active" peers; measure the rendezvous rate (a rendezvous = CONNECT sent -> the
   initiator's PUNCH received; both sides then report RESULT direct, which ends the session) with every
   active peer keeping one CONNECT in flight, then CONNECT->PUNCH latency at a paced 1,000/s; each in
   several windows (median and spread, since one window on a shared machine says little);
2. register the idle peers (registrations/s; server RSS before/after -> memory per peer); every peer
   answers the server's keepalive pings all along;
3. the same two measurements again, and the ratios.

Trust the figures only as far as the machine let them be measured: every generator process measures its
own event loop's lag (a late generator inflates the latencies it reports), and the server reports its own
loop lag and garbage-collection pauses per phase. --pin puts the server on one CPU and the generator on
the others: cleaner on a quiet machine, worse on a shared one (a pinned server cannot move away from
other people's work: its loop lag went from 1.5 ms to 400 ms at a load average of 5 on 2 CPUs).
--breakdown traces the server's Python allocations (tracemalloc, slower) to split the memory per peer into
asyncio, ssl.py, coordinator and the rest (C allocations: OpenSSL and the allocators' overhead).

Traffic goes to 127.0.0.1 only. Every phase has a time limit, the whole run a deadline; the generator
and server processes are stopped by PID at the end. The server's soft RLIMIT_NOFILE is raised to its
hard limit; the peer count is capped by that hard limit (printed) because each peer is one TCP connection.

    python scripts/bench_coordinator.py                 # 200 vs 50,000 (or the fd cap), ~2-4 min
    python scripts/bench_coordinator.py --peers 5000 --workers 2 --json
    python scripts/bench_coordinator.py --peers 2000 --breakdown   # where the memory per peer goes
    python scripts/bench_coordinator.py --core     # the sans-I/O cost per rendezvous at 200 .. 50,000 peers
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import os
import resource
import select
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from tcppunch.lab.server_process import stop_process
from tcppunch.session.records import KeyShare, RecordChannel, RecordError
from tcppunch.session.secure import TlsEngine, peer_fingerprint
from tcppunch.wire.coord import Connect, ErrorCode, Outcome, Register, Result, encode_message
from tcppunch.wire.framing import PREAMBLE, FrameDecoder, ProtocolError, encode_frame

TOKEN = "bench-token"  # a loopback-only benchmark secret, passed to the server through its environment
ACTIVE = 200
RUN_DEADLINE = 420.0  # seconds: the whole run stops by itself after this
PHASE_LIMIT = 240.0  # seconds: no single command to a worker may take longer (TLS registrations are slow)
# Registrations in flight per generator process (= per source address): below the server's limit of
# unauthenticated connections per source (max_unauthenticated_per_source, 64).
REGISTER_CONCURRENCY = 48
REPORT_TIMEOUT = 30.0  # seconds the server may take to answer SIGUSR1
LAG_PROBE = 0.005  # seconds between two wake-ups of an event loop lag probe


class LagProbe:
    """How late an event loop runs a callback: a wake-up every LAG_PROBE s, lateness recorded. A loop that
    is late by L delays every message it handles by up to L, so the latencies it reports carry that too."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_PROBE
            await asyncio.sleep(LAG_PROBE)  # the probe itself: how late this wake-up comes is the figure
            self.lags.append(max(0.0, loop.time() - due))

    def take(self) -> dict[str, float]:
        """p99 and max lag (ms) since the last take."""
        lags, self.lags = self.lags, []
        if not lags:
            return {"p99_ms": 0.0, "max_ms": 0.0}
        return {"p99_ms": 1000 * percentile(lags, 0.99), "max_ms": 1000 * max(lags)}


class GcPauses:
    """The server's garbage collections (gc.callbacks): how many, the longest, the total, since the last take."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._started)

    def take(self) -> dict[str, float]:
        pauses, self.pauses = self.pauses, []
        return {"count": len(pauses), "max_ms": 1000 * max(pauses, default=0.0), "total_ms": 1000 * sum(pauses)}


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ------------------------------------------------------------------------------------------- server


def serve(port: int, max_connections: int, cpus: set[int] | None, breakdown: bool) -> None:
    """The coordinator under test (subprocess): default timings, logs at warning and GC settings as the CLI's.

    Each SIGUSR1 prints one JSON line: its loop lag and GC pauses since the last one (and with
    ``breakdown``, its traced Python memory by where it was allocated)."""
    from tcppunch.cli.logging import configure_logging
    from tcppunch.cli.server_cmd import tune_gc
    from tcppunch.coordinator.auth import Tokens
    from tcppunch.coordinator.server import CoordinatorServer
    from tcppunch.session.identity import Identity

    raise_nofile()
    if cpus:
        os.sched_setaffinity(0, cpus)
    configure_logging("warning")
    tune_gc()  # as `tcppunch server` does
    if breakdown:
        tracemalloc.start()
    pauses = GcPauses()

    def report(probe: LagProbe) -> None:
        line: dict[str, Any] = {"lag": probe.take(), "gc": pauses.take()}
        if breakdown:
            line["traced"] = traced_by_origin()
        print(json.dumps(line), flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        probe = LagProbe()
        probe.start()
        loop.add_signal_handler(signal.SIGUSR1, report, probe)
        server = CoordinatorServer("127.0.0.1", port, Tokens(shared=os.environ["BENCH_TOKEN"]),
                                   max_connections=max_connections, identity=Identity.generate())
        async with server:
            print(f"ready {server.address.port}", flush=True)
            await stop.wait()

    asyncio.run(main())


ORIGINS = (("asyncio", "/asyncio/"), ("ssl.py", "/ssl.py"), ("socket.py", "/socket.py"),
           ("coordinator", "/tcppunch/coordinator/"), ("tcppunch other", "/tcppunch/"))


def traced_by_origin() -> dict[str, int]:
    """Bytes of live Python allocations by where they were made (tracemalloc), after a full collection."""
    gc.collect()
    totals: dict[str, int] = {}
    for stat in tracemalloc.take_snapshot().statistics("filename"):
        name = stat.traceback[0].filename
        origin = next((label for label, part in ORIGINS if part in name), "other")
        totals[origin] = totals.get(origin, 0) + stat.size
    return totals


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# ------------------------------------------------------------------------------------ load generator


class PeerConn(asyncio.Protocol):
    """One registered peer: answers pings, reports RESULT direct to every PUNCH, times its CONNECTs.

    TLS through a memory-BIO engine, so that after REGISTERED the connection can leave TLS for the record
    layer as tcppunch's own client does (docs/protocol.md); with ``--tls-only`` it stays in TLS."""

    __slots__ = ("decoder", "peer_id", "records", "registered", "share", "tls", "transport", "waiting", "worker")

    def __init__(self, worker: Worker, peer_id: str) -> None:
        self.worker = worker
        self.peer_id = peer_id
        self.transport: asyncio.Transport | None = None
        assert worker.tls is not None
        self.tls: TlsEngine | None = TlsEngine(worker.tls, server_side=False)
        self.share = KeyShare() if worker.records else None
        self.records: RecordChannel | None = None
        self.decoder = FrameDecoder()
        self.registered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # request_id -> (send time, future set at PUNCH)
        self.waiting: dict[str, tuple[float, asyncio.Future[float]]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport) and self.tls is not None
        self.transport = transport
        self.tls.handshake()
        transport.write(self.tls.outgoing())

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.records is not None:
            self.transport.write(self.records.seal(data))
        elif self.tls is not None:
            self.tls.write(data)
            self.transport.write(self.tls.outgoing())

    def _plain(self, data: bytes) -> bytes:
        """Application bytes in ``data``: the handshake (then REGISTER), TLS, leaving TLS, or records."""
        tls = self.tls
        assert self.transport is not None
        if tls is None:
            return self.records.open(data) if self.records is not None else b""
        if self.records is not None:  # waiting for the server's close_notify
            rest = tls.leave(data)
            self.transport.write(tls.outgoing())
            if rest is None:
                return b""
            self.tls = None
            return self.records.open(rest)
        tls.feed(data)
        if not tls.established:
            if not tls.handshake():
                self.transport.write(tls.outgoing())
                return b""
            records = None if self.share is None else self.share.public
            tls.write(PREAMBLE + encode_message(Register(self.peer_id, TOKEN, records=records)))
        plain = tls.read()
        self.transport.write(tls.outgoing())
        return plain

    def _switch(self, server_public: str) -> None:
        """REGISTERED carried the server's key: derive ours, leave TLS (the frames after it are records)."""
        assert self.share is not None and self.tls is not None and self.transport is not None
        keys = self.share.derive(bytes.fromhex(server_public), is_client=True, client_key=self.worker.fingerprint,
                                 server_key=peer_fingerprint(self.tls.ssl))
        self.records = RecordChannel(keys)
        rest = self.tls.leave()  # None unless the server's close_notify came with REGISTERED
        self.transport.write(self.tls.outgoing())
        if rest is not None:
            self.tls = None
            self.decoder.feed(self.records.open(rest))

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.lost += 1
        if not self.registered.done():
            self.registered.set_exception(ConnectionError(f"{self.peer_id}: closed before REGISTERED"))
        for _, future in self.waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("control connection lost"))

    def data_received(self, data: bytes) -> None:
        try:
            self.decoder.feed(self._plain(data))
            while (obj := self.decoder.next_frame()) is not None:
                self._frame(obj)
        except (ProtocolError, RecordError, ssl.SSLError) as exc:
            self.worker.errors.append(f"{self.peer_id}: {exc}")
            assert self.transport is not None
            self.transport.abort()

    def _frame(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        assert self.transport is not None
        if kind == "ping":
            self.worker.pings += 1
            self._write(encode_frame({"type": "pong", "seq": obj["seq"]}))
        elif kind == "registered":
            if self.share is not None:
                if not obj.get("records"):
                    raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "the server did not switch to records")
                self._switch(obj["records"])
            self.worker.keepalive = max(self.worker.keepalive, float(obj["keepalive_interval"]))
            if not self.registered.done():
                self.registered.set_result(None)
        elif kind == "punch":
            now = time.perf_counter()
            self._write(encode_message(Result(obj["session_id"], Outcome.DIRECT)))
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
        self._write(encode_message(Connect(request_id, target)))
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
    pings: int = 0  # keepalive PINGs received (all peers of this process), reported per command
    keepalive: float = 0.0  # the longest keepalive interval a REGISTERED announced
    tls: ssl.SSLContext | None = None  # the control channel's TLS (one key for every generated peer)
    fingerprint: str = ""  # that key's id (bound into the record keys)
    records: bool = True  # leave TLS for the record layer after REGISTERED (--tls-only: False)
    lag: LagProbe = field(default_factory=LagProbe)
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
                    local_addr=(self.source_ip, 0),
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


def worker_main(index: int, source_ip: str, server_port: int, pipe: Connection, cpus: set[int] | None,
                records: bool) -> None:
    from tcppunch.session.identity import Identity
    from tcppunch.session.secure import context

    raise_nofile()
    if cpus:
        os.sched_setaffinity(0, cpus)
    identity = Identity.generate()
    tls = context(identity, server_side=False)
    worker = Worker(index, source_ip, server_port, tls=tls, fingerprint=identity.fingerprint, records=records)
    asyncio.run(_worker_loop(worker, pipe))


async def _worker_loop(worker: Worker, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    worker.lag.start()
    while True:
        command, args = await loop.run_in_executor(None, pipe.recv)
        if command == "stop":
            for peer in worker.active + worker.idle:
                if peer.transport is not None:
                    peer.transport.abort()
            pipe.send({})
            return
        started = time.perf_counter()
        worker.lag.take()  # lag and pings are reported per command
        worker.pings = 0
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
        reply["lag"] = worker.lag.take()
        reply["pings_per_s"] = worker.pings / max(time.perf_counter() - started, 1e-9)
        worker.pings = 0
        worker.errors.clear()
        pipe.send(reply)


# ------------------------------------------------------------------------------------------ controller


class Run:
    def __init__(self, workers: int, port: int, deadline: float, cpus: set[int] | None = None,
                 records: bool = True) -> None:
        self.deadline = deadline
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        ctx = mp.get_context("fork")
        for w in range(workers):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(w, f"127.0.{10 + w}.1", port, theirs, cpus, records),
                               daemon=True)
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


def schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of a process's main thread so far."""
    with open(f"/proc/{pid}/schedstat") as stat:
        on_cpu, waiting, _ = stat.read().split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9


class ServerProbe:
    """The server's own report (SIGUSR1 -> one JSON line on its stdout: loop lag, GC pauses, traced
    memory) and, from /proc, the share of the wall time since the last take it ran on a CPU and the share
    it was ready to run but waited for one (the machine's other processes, the generator included)."""

    def __init__(self, server: subprocess.Popen[str]) -> None:
        self.server = server
        self._since = (time.monotonic(), *schedstat(server.pid))

    def take(self) -> dict[str, Any]:
        assert self.server.stdout is not None
        self.server.send_signal(signal.SIGUSR1)
        # one line per signal, so nothing waits in the pipe's buffer: select() on its fd bounds the wait
        if not select.select([self.server.stdout], [], [], REPORT_TIMEOUT)[0]:
            raise TimeoutError(f"the server did not report within {REPORT_TIMEOUT:g} s")
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError("the server ended")
        report: dict[str, Any] = json.loads(line)
        now, on_cpu, waiting = time.monotonic(), *schedstat(self.server.pid)
        wall = max(now - self._since[0], 1e-9)
        report["cpu_pct"] = 100 * (on_cpu - self._since[1]) / wall
        report["cpu_wait_pct"] = 100 * (waiting - self._since[2]) / wall
        self._since = (now, on_cpu, waiting)
        return report


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def worst_lag(replies: list[dict[str, Any]]) -> dict[str, float]:
    """The generator's lag over all its processes: the worst p99 and the worst single delay."""
    return {"p99_ms": max(r["lag"]["p99_ms"] for r in replies), "max_ms": max(r["lag"]["max_ms"] for r in replies)}


def measure(run: Run, probe: ServerProbe, workers: int, windows: int, duration: float, rate: float) -> dict[str, Any]:
    """``windows`` saturated windows (rendezvous/s each), then ``windows`` paced ones (latency each)."""
    probe.take()  # start the server's lag and GC figures here
    rates, sat_lags = [], []
    for _ in range(windows):
        sat = run.each("saturate", [(duration,)] * workers)
        rates.append(sum(r["count"] for r in sat) / max(r["elapsed"] for r in sat))
        sat_lags.append(worst_lag(sat))
    server_sat = probe.take()
    lat: list[float] = []
    p99s, paced_rates, skipped, paced_lags, pings = [], [], 0, [], []
    for _ in range(windows):
        paced = run.each("paced", [(rate / workers, duration)] * workers)
        window = [x for r in paced for x in r["latencies"]]
        lat += window
        p99s.append(1000 * percentile(window, 0.99))
        paced_rates.append(sum(r["count"] for r in paced) / max(r["elapsed"] for r in paced))
        skipped += sum(r["skipped"] for r in paced)
        paced_lags.append(worst_lag(paced))
        pings.append(sum(r["pings_per_s"] for r in paced))
    server_paced = probe.take()
    return {
        "rendezvous_per_s": spread(rates),
        "windows": windows,
        "window_s": duration,
        "paced_rate": statistics.median(paced_rates),
        "paced_skipped": skipped,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * percentile(lat, 0.99),
        "p99_ms_per_window": spread(p99s),
        "generator_lag_ms": {"saturated": max(x["p99_ms"] for x in sat_lags),
                             "paced": max(x["p99_ms"] for x in paced_lags),
                             "max": max(x["max_ms"] for x in sat_lags + paced_lags)},
        "server": {"saturated": server_sat, "paced": server_paced},
        # the mean, not the median: peers that registered together are pinged together, in bursts
        "keepalive_pings_per_s": statistics.fmean(pings),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------- sans-I/O core cost

CORE_PEERS = (200, 5_000, 19_700, 50_000)


def core_cost(peers: int, rounds: int = 5, per_round: int = 2_000) -> dict[str, float]:
    """CPU time of one rendezvous (CONNECT, two PUNCH, two RESULT) in the sans-I/O protocol with ``peers``
    registered: no sockets, no TLS, so no fd limit either; 50,000 peers fit. Median and min of ``rounds``."""
    from tcppunch.coordinator.auth import Tokens
    from tcppunch.coordinator.protocol import CoordinatorProtocol, Send
    from tcppunch.wire.coord import Punch, decode_message
    from tcppunch.wire.endpoint import Endpoint

    proto = CoordinatorProtocol(Tokens(shared=TOKEN))
    server, now = Endpoint("127.0.0.1", 3478), 100.0
    for i in range(peers):
        conn = i + 1
        proto.connection_made(conn, Endpoint(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 40000), server, now)
        proto.connection_authenticated(conn, "BENCH-KEY")
        proto.data_received(conn, PREAMBLE + encode_message(Register(f"p{i}", TOKEN)), now)

    def session_of(actions: list[Any]) -> str:
        for action in actions:
            if isinstance(action, Send):
                decoder = FrameDecoder()
                decoder.feed(action.data)
                frame = decoder.next_frame()
                message = None if frame is None else decode_message(frame)
                if isinstance(message, Punch):
                    return message.session_id
        raise RuntimeError("no PUNCH")

    costs = []
    for _ in range(rounds):
        spent = 0.0
        for k in range(per_round):
            a, b = 1 + k % ACTIVE, 1 + (k + 1) % ACTIVE
            started = time.perf_counter()
            actions = proto.data_received(a, encode_message(Connect(f"r{k}", f"p{b - 1}")), now)
            spent += time.perf_counter() - started
            session = session_of(actions)  # the generator's part: not timed
            result = encode_message(Result(session, Outcome.DIRECT))
            started = time.perf_counter()
            proto.data_received(a, result, now)
            proto.data_received(b, result, now)
            spent += time.perf_counter() - started
        costs.append(spent / per_round * 1e6)
    return {"median_us": statistics.median(costs), "min_us": min(costs)}


def core_main(as_json: bool) -> int:
    from tcppunch.cli.logging import configure_logging

    configure_logging("warning")
    gc.freeze()
    results = {str(n): core_cost(n) for n in CORE_PEERS}
    if as_json:
        print(json.dumps(results, indent=2))
        return 0
    print("sans-I/O rendezvous cost (CONNECT, 2 PUNCH, 2 RESULT; no sockets, no TLS), median [min] of 5 x 2,000:")
    for n, cost in results.items():
        print(f"  {int(n):>6,} registered peers: {cost['median_us']:.0f} us [{cost['min_us']:.0f}]")
    base = results[str(CORE_PEERS[0])]["min_us"]
    ratios = ", ".join(f"{int(n):,}: {c['min_us'] / base:.2f}" for n, c in results.items())
    print(f"  ratio of the mins to 200 peers: {ratios}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=50_000, help="registered peers in the large phase")
    parser.add_argument("--workers", type=int, default=4, help="load generator processes (one source IP each)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement window")
    parser.add_argument("--windows", type=int, default=5, help="measurement windows per figure (median, spread)")
    parser.add_argument("--pin", action="store_true",
                        help="pin the server to one CPU and the generator to the others (on a quiet machine: the "
                             "generator cannot take the server's CPU; on a shared one it can make the server wait)")
    parser.add_argument("--breakdown", action="store_true",
                        help="trace the server's Python allocations (slower) to split the memory per peer")
    parser.add_argument("--rate", type=float, default=1000.0, help="paced rendezvous/s for the latency figure")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--tls-only", action="store_true",
                        help="the generated peers keep their control connections in TLS instead of switching to "
                             "the record layer after REGISTERED (the memory per peer before the switch existed)")
    parser.add_argument("--core", action="store_true",
                        help="only the sans-I/O protocol's cost per rendezvous at 200 to 50,000 peers (no fd cap)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-connections", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cpus", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.max_connections, {int(c) for c in args.cpus.split(",") if c}, args.breakdown)
        return 0
    if args.core:
        return core_main(args.json)
    deadline = time.monotonic() + RUN_DEADLINE
    hard = raise_nofile()
    load_before = os.getloadavg()
    # The server holds one fd per peer; keep room for its listener, logs and the event loop.
    peers = min(args.peers, hard - 300)
    cap = None
    if peers < args.peers:
        cap = (f"{args.peers:,} peers requested, capped at {peers:,}: the RLIMIT_NOFILE hard limit is {hard:,} and "
               "every peer is one TCP connection of the one server process (raising it needs CAP_SYS_RESOURCE)")
        print(f"note: {cap}", file=sys.stderr)
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, worker_cpus = (set(cpus[:1]), set(cpus[1:])) if len(cpus) >= 2 and args.pin else (None, None)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--max-connections", str(peers + 100),
         "--cpus", ",".join(map(str, sorted(server_cpus or ()))), *(["--breakdown"] if args.breakdown else [])],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "BENCH_TOKEN": TOKEN},
    )
    run: Run | None = None
    try:
        assert server.stdout is not None
        ready = server.stdout.readline()
        if not ready.startswith("ready"):
            raise RuntimeError(f"server did not start: {ready!r}")
        run = Run(args.workers, port, deadline, worker_cpus, records=not args.tls_only)
        probe = ServerProbe(server)
        active = [f"a{i}" for i in range(ACTIVE)]
        rss0 = rss_kib(server.pid)
        run.each("register", [(ids, REGISTER_CONCURRENCY, True) for ids in split(active, args.workers)])
        small = measure(run, probe, args.workers, args.windows, args.duration, args.rate)
        idle = [f"i{i}" for i in range(peers - ACTIVE)]
        before = probe.take()
        rss1 = rss_kib(server.pid)
        t0 = time.perf_counter()
        regs = run.each("register", [(ids, REGISTER_CONCURRENCY, False) for ids in split(idle, args.workers)])
        reg_elapsed = time.perf_counter() - t0
        registered = sum(r["count"] for r in regs)
        after = probe.take()
        rss2 = rss_kib(server.pid)
        large = measure(run, probe, args.workers, args.windows, args.duration, args.rate)
        lost = sum(r["lost"] for r in run.each("stats", [None] * args.workers))
    finally:
        if run is not None:
            run.stop()
        stop_process(server, grace=30.0)  # telling ~20,000 clients it is shutting down takes a while
    result = {
        "peers_small": ACTIVE,
        "peers_large": ACTIVE + registered,
        "peer_cap": cap,
        "small": small,
        "large": large,
        "rate_ratio": large["rendezvous_per_s"]["median"] / small["rendezvous_per_s"]["median"],
        "rate_ratio_range": [large["rendezvous_per_s"]["min"] / small["rendezvous_per_s"]["max"],
                             large["rendezvous_per_s"]["max"] / small["rendezvous_per_s"]["min"]],
        "registrations_per_s": registered / reg_elapsed,
        "rss_kib": {"start": rss0, "after_small": rss1, "after_large": rss2},
        "bytes_per_peer": (rss2 - rss1) * 1024 / max(registered, 1),
        "control_channel": "tls" if args.tls_only else "records",
        "registration_server": after,
        "connections_lost": lost,
        "keepalive_interval_max": max(r["keepalive"] for r in regs),
        "workers": args.workers,
        "pinning": ({"server_cpus": sorted(server_cpus), "generator_cpus": sorted(worker_cpus or ())}
                    if server_cpus else None),
        "nofile_hard_limit": hard,
        "load_average": {"start": load_before, "end": os.getloadavg()},
    }
    if args.breakdown:
        result["traced_bytes_per_peer"] = {
            origin: (after["traced"].get(origin, 0) - before["traced"].get(origin, 0)) / max(registered, 1)
            for origin in sorted(set(after["traced"]) | set(before["traced"]))
        }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


def print_table(r: dict[str, Any]) -> None:
    m0 = r["small"]
    print(f"{m0['windows']} windows of {m0['window_s']:g} s per figure; rendezvous/s as median [min-max] of the "
          "saturated windows; latency at the paced rate over all its windows")
    print("| registered peers | rendezvous/s (saturated) | CONNECT->PUNCH p50 | p99 | p99 per window | at paced rate "
          "| generator loop lag p99 | server loop lag p99 / max | server GC pauses (n, longest) "
          "| server on CPU / waiting for a CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in ("small", "large"):
        m = r[key]
        rate, p99w, srv = m["rendezvous_per_s"], m["p99_ms_per_window"], m["server"]["paced"]
        gen = m["generator_lag_ms"]
        print(f"| {r['peers_' + key]:,} | {rate['median']:,.0f} [{rate['min']:,.0f}-{rate['max']:,.0f}] "
              f"| {m['p50_ms']:.2f} ms | {m['p99_ms']:.2f} ms "
              f"| {p99w['median']:.1f} [{p99w['min']:.1f}-{p99w['max']:.1f}] ms "
              f"| {m['paced_rate']:,.0f}/s (skipped {m['paced_skipped']}) "
              f"| {gen['paced']:.1f} ms (saturated {gen['saturated']:.1f}) "
              f"| {srv['lag']['p99_ms']:.1f} / {srv['lag']['max_ms']:.1f} ms "
              f"| {srv['gc']['count']}, {srv['gc']['max_ms']:.1f} ms "
              f"| {srv['cpu_pct']:.0f} % / {srv['cpu_wait_pct']:.0f} % |")
    lo, hi = r["rate_ratio_range"]
    print(f"rate ratio {r['peers_large']:,} / {r['peers_small']} peers: {r['rate_ratio']:.2f} "
          f"(medians; {lo:.2f}-{hi:.2f} from the windows' extremes; goal >= 0.8)")
    if r["peer_cap"]:
        print(f"peer cap: {r['peer_cap']}")
    reg = r["registration_server"]
    print(f"registrations/s: {r['registrations_per_s']:,.0f} (server loop lag p99 {reg['lag']['p99_ms']:.1f} ms, "
          f"{reg['gc']['count']} GC pauses, longest {reg['gc']['max_ms']:.1f} ms, on CPU {reg['cpu_pct']:.0f} %, "
          f"waiting for a CPU {reg['cpu_wait_pct']:.0f} %)")
    print("(the latency columns are from the paced phase; the saturated phase's server figures are in --json)")
    print(f"server memory per registered peer: {r['bytes_per_peer']:,.0f} bytes (RSS delta; goal <= 8192; "
          f"control channel: {r['control_channel']})")
    if "traced_bytes_per_peer" in r:
        traced = r["traced_bytes_per_peer"]
        python = sum(traced.values())
        parts = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(traced.items(), key=lambda kv: -kv[1]))
        print(f"  Python objects (tracemalloc): {python:,.0f} B/peer ({parts}); the rest of the RSS delta, "
              f"{r['bytes_per_peer'] - python:,.0f} B/peer, is C memory: OpenSSL and the allocators' overhead "
              "(tracemalloc's own bookkeeping inflates RSS in this mode; take the RSS figure from a run without it)")
    print(f"keepalive PINGs/s the server sent during the paced phase: {r['small']['keepalive_pings_per_s']:,.0f} at "
          f"{r['peers_small']} peers, {r['large']['keepalive_pings_per_s']:,.0f} at {r['peers_large']:,} (each a "
          "record out and a PONG record in: work that grows with the peer count)")
    print(f"control connections lost during the run: {r['connections_lost']}; longest keepalive interval "
          f"announced: {r['keepalive_interval_max']:g} s (the server's keepalive budget, 1,000 pings/s)")
    pin = r["pinning"]
    print("CPUs: " + (f"server pinned to {pin['server_cpus']}, generator to {pin['generator_cpus']}" if pin else
                      "not pinned (see --pin): server and generator share the CPUs"))
    la, lb = r["load_average"]["start"], r["load_average"]["end"]
    print("machine load average (1, 5, 15 min): at the start {:.1f} {:.1f} {:.1f}, at the end {:.1f} {:.1f} {:.1f} "
          "(other processes compete with this run when it is above the CPU count)".format(*la, *lb))
    print("a generator loop lag of L ms means its latencies may be up to L ms late on their own: trust p99 only "
          "well above the generator's lag")


if __name__ == "__main__":
    sys.exit(main())
