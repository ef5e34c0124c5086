"""`make bench`: every benchmark, each printing ratios against a reference measured in the same run.

* bench_connect.py: time to connect vs RTT_coord + RTT_peer (20 ms one-way delay per WAN link), and vs
  1.5 (RTT_coord + RTT_peer) + RTT_peer (the key exchange's budget).
* bench_crypto.py: encrypted / plaintext bulk throughput over loopback and over a direct lab path.
* bench_detect.py: detect's UDP label vs pystun3's own CLI, both against coturn, per NAT type (+ whole detect).
* bench_relay.py --lab: our relay vs socat configured as the same relay, between two NATed lab hosts.
* bench_expose.py: `tcppunch expose` vs socat as the same reverse relay (public client -> server -> NATed service).
* bench_vpn.py: TCP over `tcppunch vpn` vs a raw stream on the same session; ping over the VPN vs the direct path.
* bench_coordinator.py: one coordinator's rendezvous rate at 50,000 registered peers vs at 200 (loopback).
* bench_session.py: streams on a live session vs RTT_peer and vs a raw connection; fairness of 100 streams.
* bench_cluster_budget.py: the relay pump charged to budgets shared through Redis vs in-process ones.

Figures and the exact commands are kept in docs/benchmarks.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [
    ["bench_connect.py", "--runs", "15"],
    ["bench_crypto.py", "--mb", "200", "--reps", "3"],
    ["bench_detect.py", "--runs", "3"],
    ["bench_relay.py", "--lab", "--reps", "3", "--bytes", str(256 * 1024 * 1024),
     "--variants", "ours-splice,ours-copy,socat,socat-b1m"],
    ["bench_expose.py", "--bytes", str(256 * 1024 * 1024), "--reps", "3"],
    ["bench_vpn.py", "--bytes", str(200 * 1024 * 1024), "--reps", "5", "--delay-ms", "10"],
    ["bench_coordinator.py"],
    ["bench_session.py"],
    ["bench_cluster_budget.py", "--reps", "7"],
]


def main() -> int:
    failed = 0
    for argv in RUNS:
        print(f"\n$ python scripts/{' '.join(argv)}", flush=True)
        failed += subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:]], check=False).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
