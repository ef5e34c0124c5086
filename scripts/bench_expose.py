#!/usr/bin/env python3
"""`tcppunch expose` throughput against socat doing the same reverse relay, in one lab run (root).

The path is the same for both: a client on a public lab host connects to the lab server, the server
carries the connection to a host behind a symmetric-random NAT, which carries it to a local service
(127.0.0.1:8000 there) that sends ``--bytes`` after the client's "go" byte.

* expose: ``tcppunch server --expose-ports`` on the server, ``tcppunch expose --remote-port 8080
  --forward 127.0.0.1:8000`` behind the NAT; the client connects to server:8080.
* socat: ``socat TCP-LISTEN:9001 TCP-LISTEN:8081`` on the server (the NATed side dials in first, as an
  frp work connection would), ``socat TCP:server:9001 TCP:127.0.0.1:8000`` behind the NAT; the client
  connects to server:8081. Twice: with socat's default 8 KiB buffer, and with ``-b 1048576``.

The client times from its "go" byte to EOF. Variants alternate for ``--reps`` runs; the medians and the
expose/socat ratios are printed.

    .venv/bin/python scripts/bench_expose.py --bytes 256MiB --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchutil import CHUNK, GO, connect_retrying, parse_size, receive_timed

from tcppunch.lab.server_process import stop_process

SCRIPT = str(Path(__file__).resolve())
SERVER = "198.51.100.10"
TOKEN = "bench-expose"
SERVICE_PORT = 8000
WITHIN_S = 20.0
RUN_WITHIN_S = 300.0


# ------------------------------------------------------------------ roles (each runs as its own process)


def role_source(port: int, total: int) -> None:
    """The local service: for each connection, wait for the go byte, send ``total`` bytes, close."""
    listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
    print("ready", flush=True)
    block = memoryview(os.urandom(CHUNK))
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(RUN_WITHIN_S)
            if conn.recv(1) != GO:
                continue
            left = total
            while left > 0:
                n = min(left, CHUNK)
                conn.sendall(block[:n])
                left -= n
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(CHUNK):
                pass


def role_client(host: str, port: int) -> None:
    """Connect (retrying while the relay is not there yet), send go, count bytes to EOF, print the time."""
    sock = connect_retrying(host, port, WITHIN_S, RUN_WITHIN_S)
    print(json.dumps(receive_timed(sock)), flush=True)


# ------------------------------------------------------------------------------------------ the run


def _wait_line(proc: subprocess.Popen[str], needle: str, stream: str = "stderr") -> None:
    from tcppunch.lab.lines import LineTimeout, wait_for_line

    try:
        wait_for_line(getattr(proc, stream), needle, WITHIN_S)
    except LineTimeout as exc:
        raise SystemExit(str(exc)) from None


def _client(lab: Any, port: int, total: int) -> float:
    proc = lab.host("pub").popen([sys.executable, SCRIPT, "--role", "client", "--host", SERVER,
                                  "--port", str(port)], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=RUN_WITHIN_S)
    result = json.loads(out.strip().splitlines()[-1])
    if result["bytes"] != total:
        raise SystemExit(f"client got {result['bytes']} bytes, expected {total}")
    return float(result["bytes"]) / result["seconds"] / 1e6


def run_expose(lab: Any, total: int) -> float:
    exposer = lab.host("rnd").popen([sys.executable, "-m", "tcppunch", "expose", "--coordinator",
                                     f"{SERVER}:3478", "--id", "bench", "--remote-port", "8080", "--forward",
                                     f"127.0.0.1:{SERVICE_PORT}", "--quiet"],
                                    stderr=subprocess.PIPE, text=True)
    try:
        _wait_line(exposer, "exposed")
        return _client(lab, 8080, total)
    finally:
        stop_process(exposer)


def run_socat(lab: Any, total: int, buffer: list[str] | None = None) -> float:
    """socat as the same reverse relay; ``buffer`` e.g. ["-b", "1048576"] (socat's default is 8 KiB)."""
    extra = buffer or []
    relay = lab.server.popen(["socat", *extra, f"TCP-LISTEN:9001,bind={SERVER},reuseaddr",
                              f"TCP-LISTEN:8081,bind={SERVER},reuseaddr"])
    worker = lab.host("rnd").popen(["socat", *extra, f"TCP:{SERVER}:9001,retry=400,interval=0.05",
                                    f"TCP:127.0.0.1:{SERVICE_PORT}"])
    try:
        return _client(lab, 8081, total)
    finally:
        stop_process(worker)
        stop_process(relay)


def run_socat_b1m(lab: Any, total: int) -> float:
    return run_socat(lab, total, ["-b", str(1 << 20)])


VARIANTS = (("expose", run_expose), ("socat", run_socat), ("socat-b1m", run_socat_b1m))


def benchmark(total: int, reps: int) -> dict[str, Any]:
    from tcppunch.lab import Lab, LabSpec, NatType, RouterSpec, SynPolicy
    from tcppunch.lab.server_process import lab_server

    spec = LabSpec([RouterSpec("rnd", NatType.SYMMETRIC_RANDOM, SynPolicy.DROP), RouterSpec("pub", NatType.NONE)])
    with Lab(spec) as lab, lab_server(lab, TOKEN, "--expose-ports", "8080"):
        source = lab.host("rnd").popen([sys.executable, SCRIPT, "--role", "source", "--port", str(SERVICE_PORT),
                                        "--bytes", str(total)], stdout=subprocess.PIPE, text=True)
        try:
            _wait_line(source, "ready", "stdout")
            runs: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
            for rep in range(reps):
                for name, run in VARIANTS:
                    mbps = run(lab, total)
                    runs[name].append(mbps)
                    print(f"  rep {rep + 1}/{reps} {name:9s} {mbps:8.0f} MB/s", flush=True)
        finally:
            stop_process(source)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    ratios = {ref: medians["expose"] / medians[ref] for ref in medians if ref != "expose"}
    return {"bytes": total, "reps": reps, "runs": runs, "medians": medians, "ratios": ratios}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=parse_size, default=256 << 20, help="bytes per run (e.g. 256MiB)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--role", choices=["source", "client"], help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "source":
        role_source(args.port, args.bytes)
        return
    if args.role == "client":
        role_client(args.host, args.port)
        return
    print(f"expose benchmark: {args.bytes / 2**20:.0f} MiB x {args.reps} reps, client on a public lab host, "
          f"service behind a symmetric-random NAT", flush=True)
    # Every process of the run (server, peers) inherits the token and a throw-away config directory: fresh
    # keys, and no known-peers entry of another run (the lab server's key is new every time).
    os.environ["TCPPUNCH_TOKEN"] = TOKEN
    with tempfile.TemporaryDirectory(prefix="tcppunch-bench-") as config:
        os.environ["XDG_CONFIG_HOME"] = config
        summary = benchmark(args.bytes, args.reps)
    print("\nmedians: " + ", ".join(f"{name} {mbps:.0f} MB/s" for name, mbps in summary["medians"].items()))
    for ref, ratio in summary["ratios"].items():
        print(f"ratio expose/{ref}: {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
