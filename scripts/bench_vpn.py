#!/usr/bin/env python3
"""`tcppunch vpn` against the session it runs on, in one lab run (root).

Two hosts behind a port-restricted and a symmetric-seq NAT (a direct pair), `tcppunch server` on the lab
server. Each host runs one process with a Peer and a VPN Tunnel (what `tcppunch vpn` runs), which also
takes commands from this script. Then, on the **same session**:

* raw stream: peer A opens a second stream to B and sends ``--bytes``; B times first byte -> EOF;
* VPN: a sender process on A sends ``--bytes`` over TCP to a receiver process on B at B's VPN address;
  the receiver times first byte -> EOF. Ratio VPN / raw (goal >= 0.5).

Then, with ``--delay-ms`` one-way delay on each router's WAN link (a second lab), ping RTT over the VPN
(``ping`` to B's VPN address) against the direct path's RTT (``ping`` from A to B's router's public
address: the same path, minus B's LAN hop). Goal: VPN <= 1.2 x direct + 1 ms.

    .venv/bin/python scripts/bench_vpn.py --bytes 200MiB --reps 3 --delay-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchutil import parse_size

SCRIPT = str(Path(__file__).resolve())
CHUNK = 256 * 1024
SERVER = "198.51.100.10"
TOKEN = "bench-vpn"
PORT = 5001
WITHIN_S = 60.0
RUN_WITHIN_S = 300.0
ADDRESSES = ("10.99.0.1/24", "10.99.0.2/24")


# ------------------------------------------------------------------ roles (each runs as its own process)


def role_sink(bind: str, port: int) -> None:
    listener = socket.create_server((bind, port))
    print("ready", flush=True)
    conn, _ = listener.accept()
    buf = memoryview(bytearray(1 << 20))
    received, started = 0, None
    while n := conn.recv_into(buf):
        if started is None:
            started = time.perf_counter()
        received += n
    seconds = time.perf_counter() - (started or time.perf_counter())
    print(json.dumps({"bytes": received, "seconds": seconds}), flush=True)


def role_source(host: str, port: int, total: int) -> None:
    sock = socket.create_connection((host, port), timeout=RUN_WITHIN_S)
    block = memoryview(os.urandom(1 << 20))
    left = total
    while left > 0:
        n = min(left, len(block))
        sock.sendall(block[:n])
        left -= n
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)
    sock.close()


async def _raw_send(peer: Any, other: str, total: int) -> None:
    stream = await peer.open_stream(other)
    block = os.urandom(CHUNK)
    left = total
    while left > 0:
        n = min(left, CHUNK)
        stream.write(block[:n])
        await stream.drain()
        left -= n
    stream.write_eof()
    await stream.read()  # until the receiver closes
    stream.close()


async def _raw_receive(peer: Any) -> float:
    stream = await peer.accept_stream(timeout=WITHIN_S)
    received, started = 0, None
    loop = asyncio.get_running_loop()
    while chunk := await stream.read(1 << 20):
        if started is None:
            started = loop.time()
        received += len(chunk)
    seconds = loop.time() - (started or loop.time())
    stream.close()
    return received / seconds / 1e6


async def _side(peer_id: str, other: str, address: str) -> None:
    """One VPN end in its own process (as `tcppunch vpn` runs), taking commands on stdin: ``send N``
    (a raw stream of N bytes to the other side, on the same session), ``recv`` (time the next raw
    stream), ``stats``; answers are JSON lines on stdout."""
    from tcppunch.cli.logging import configure_logging
    from tcppunch.peer import Peer
    from tcppunch.vpn.tun import Tun
    from tcppunch.vpn.tunnel import Tunnel
    from tcppunch.wire.endpoint import Endpoint

    configure_logging("warning", False)
    loop = asyncio.get_running_loop()
    async with Peer(Endpoint(SERVER, 3478), peer_id, TOKEN) as peer:
        with Tun("tcppunch0") as tun:
            tunnel = Tunnel(peer, other, tun, ipaddress.ip_interface(address))
            running = asyncio.ensure_future(tunnel.run())
            await tunnel.wait_up(WITHIN_S)
            path = next(s.session.path for s in peer.sessions() if s.peer == other)
            print(json.dumps({"up": True, "path": path}), flush=True)
            while line := (await loop.run_in_executor(None, sys.stdin.readline)).split():
                if line[0] == "send":
                    await _raw_send(peer, other, int(line[1]))
                    print(json.dumps({"sent": int(line[1])}), flush=True)
                elif line[0] == "recv":
                    print(json.dumps({"mbps": await _raw_receive(peer)}), flush=True)
                elif line[0] == "stats":
                    st = tunnel.state.stats
                    print(json.dumps({"sent": st.sent, "sent_bytes": st.sent_bytes, "dropped": st.dropped}),
                          flush=True)
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)


# ------------------------------------------------------------------------------------------ the run


def _wait_line(stream: Any, needle: str, timeout: float = WITHIN_S) -> str:
    from tcppunch.lab.lines import LineTimeout, wait_for_line

    try:
        return wait_for_line(stream, needle, timeout)[-1]
    except LineTimeout as exc:
        raise SystemExit(str(exc)) from None


class Side:
    """A `--role side` process on a lab host."""

    def __init__(self, host: Any, peer_id: str, other: str, address: str) -> None:
        self.host = host
        self.proc = host.popen([sys.executable, SCRIPT, "--role", "side", "--id", peer_id, "--other", other,
                                "--address", address], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, command: str | None = None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = _wait_line(self.proc.stdout, "{", RUN_WITHIN_S)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _vpn_transfer(lab: Any, total: int) -> float:
    sink = lab.host("seq").popen([sys.executable, SCRIPT, "--role", "sink", "--bind", "10.99.0.2",
                                  "--port", str(PORT)], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        _wait_line(sink.stdout, "ready")
        lab.host("pr").run([sys.executable, SCRIPT, "--role", "source", "--host", "10.99.0.2", "--port", str(PORT),
                            "--bytes", str(total)], timeout=RUN_WITHIN_S, check=True)
        out, _ = sink.communicate(timeout=RUN_WITHIN_S)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait(5)
    result = json.loads(out.strip().splitlines()[-1])
    if result["bytes"] != total:
        raise SystemExit(f"VPN sink got {result['bytes']} bytes, expected {total}")
    return float(result["bytes"]) / result["seconds"] / 1e6


def _ping(host: Any, address: str, count: int) -> float:
    done = host.run(["ping", "-n", "-q", "-c", str(count), "-i", "0.1", address], timeout=60)
    match = re.search(r"= [\d.]+/([\d.]+)/", done.stdout)
    if done.returncode != 0 or match is None:
        raise SystemExit(f"ping {address} failed: {done.stdout}{done.stderr}")
    return float(match.group(1))


class VpnLab:
    """A lab with pr and seq hosts, `tcppunch server`, and a side process (Peer + Tunnel) on each host."""

    def __init__(self, delay_ms: float) -> None:
        from tcppunch.lab import Lab, LabSpec, LinkShape, NatType, RouterSpec, SynPolicy

        link = LinkShape(delay_ms=delay_ms)
        self.lab = Lab(LabSpec([RouterSpec("pr", NatType.PORT_RESTRICTED, SynPolicy.DROP, link=link),
                                RouterSpec("seq", NatType.SYMMETRIC_SEQ, SynPolicy.DROP, link=link)]))

    def __enter__(self) -> VpnLab:
        from tcppunch.lab.server_process import lab_server

        self._stack = contextlib.ExitStack()
        try:
            self._stack.enter_context(self.lab)
            self._stack.enter_context(lab_server(self.lab, TOKEN))
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        self.hosts = {name: self.lab.host(name) for name in ("pr", "seq")}
        self.a = Side(self.hosts["pr"], "a", "b", ADDRESSES[0])
        self.b = Side(self.hosts["seq"], "b", "a", ADDRESSES[1])
        self.path = str(self.a.ask()["path"])
        self.b.ask()

    def __exit__(self, *exc: object) -> None:
        for side in (getattr(self, "a", None), getattr(self, "b", None)):
            if side is not None:
                side.stop()
        self._stack.close()  # the server, then the lab

    def raw(self, total: int) -> float:
        self.b.send("recv")
        self.a.ask(f"send {total}")
        return float(self.b.ask()["mbps"])


def benchmark(total: int, reps: int, delay_ms: float, pings: int) -> dict[str, Any]:
    runs: dict[str, list[float]] = {"raw": [], "vpn": []}
    with VpnLab(0.0) as lab:
        path = lab.path
        print(f"session between the peers: {path}", flush=True)
        for rep in range(reps):
            for name in ("raw", "vpn"):
                mbps = lab.raw(total) if name == "raw" else _vpn_transfer(lab.lab, total)
                runs[name].append(mbps)
                print(f"  rep {rep + 1}/{reps} {name:4s} {mbps:8.1f} MB/s", flush=True)
        sender = lab.a.ask("stats")
        print(f"  VPN sender: {sender['sent']} packets, {sender['sent_bytes'] / max(sender['sent'], 1):.0f} bytes "
              f"each on average, {sender['dropped']} dropped", flush=True)
    with VpnLab(delay_ms) as lab:
        direct = _ping(lab.hosts["pr"], "198.51.100.102", pings)  # seq's router, public side
        over_vpn = _ping(lab.hosts["pr"], "10.99.0.2", pings)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    return {"bytes": total, "reps": reps, "path": path, "runs": runs, "medians": medians,
            "throughput_ratio": medians["vpn"] / medians["raw"], "delay_ms": delay_ms,
            "ping_direct_ms": direct, "ping_vpn_ms": over_vpn, "ping_bound_ms": 1.2 * direct + 1.0}




def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=parse_size, default=200 << 20, help="bytes per transfer (e.g. 200MiB)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay per WAN link for the ping part")
    parser.add_argument("--pings", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--role", choices=["sink", "source", "side"], help=argparse.SUPPRESS)
    parser.add_argument("--id", help=argparse.SUPPRESS)
    parser.add_argument("--other", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--bind", help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "sink":
        role_sink(args.bind, args.port)
        return
    if args.role == "source":
        role_source(args.host, args.port, args.bytes)
        return
    if args.role == "side":
        asyncio.run(_side(args.id, args.other, args.address))
        return
    from tcppunch.cli.logging import configure_logging

    configure_logging("warning", False)
    print(f"vpn benchmark: {args.bytes / 2**20:.0f} MiB x {args.reps} reps (pr <-> symmetric-seq), "
          f"ping with {args.delay_ms:g} ms one-way per WAN link", flush=True)
    # Every process of the run (server, peers) inherits the token and a throw-away config directory: fresh
    # keys, and no known-peers entry of another run (the lab server's key is new every time).
    os.environ["TCPPUNCH_TOKEN"] = TOKEN
    with tempfile.TemporaryDirectory(prefix="tcppunch-bench-") as config:
        os.environ["XDG_CONFIG_HOME"] = config
        s = benchmark(args.bytes, args.reps, args.delay_ms, args.pings)
    print(f"\nmedians: raw session stream {s['medians']['raw']:.1f} MB/s, VPN {s['medians']['vpn']:.1f} MB/s")
    print(f"ratio VPN / raw stream: {s['throughput_ratio']:.2f} (goal >= 0.5)")
    print(f"ping: direct path {s['ping_direct_ms']:.2f} ms, over the VPN {s['ping_vpn_ms']:.2f} ms, "
          f"bound 1.2 x direct + 1 ms = {s['ping_bound_ms']:.2f} ms "
          f"({'within' if s['ping_vpn_ms'] <= s['ping_bound_ms'] else 'ABOVE'})")
    if args.json:
        args.json.write_text(json.dumps(s, indent=2) + "\n")


if __name__ == "__main__":
    main()
