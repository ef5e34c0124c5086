#!/usr/bin/env python3
"""Benchmark: ``tcppunch detect`` against pystun3's own CLI, per NAT type, in the NAT lab.

One lab, one router per NAT type (SYN policy selectable), one ``tcppunch server`` on the lab server.
From each NAT'd host, N runs of each tool against the same server, interleaved, wall time measured
around the whole process (both start a Python interpreter, so start-up cost is in both figures):

* ours:     tcppunch detect --server 198.51.100.10:3478 --json
* pystun3:  pystun3 -H 198.51.100.10 -P 3478 -i HOST_ADDRESS -p RANDOM_PORT   (our server's UDP side)

Prints per-type medians and the ratio pystun3/ours, plus the labels each tool reported, so a speed-up
never hides a wrong answer. "in-process" is the detect engine's own time (its ``detect_done`` debug log
line), i.e. without interpreter start-up and imports. Needs root (the lab). Usage:

    .venv/bin/python scripts/bench_detect.py [--runs 3] [--policy drop|rst] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

from tcppunch.lab import Lab, LabSpec, NatType, RouterSpec, SynPolicy
from tcppunch.lab.server_process import lab_server
from tcppunch.lab.topology import SHORT_NAMES

SERVER, PORT = "198.51.100.10", 3478
PYSTUN3 = str(Path(sys.executable).with_name("pystun3"))


def _detect_seconds(stderr: str) -> list[float]:
    """The engine's own duration from the ``detect_done`` debug log line (JSON), without start-up."""
    for line in stderr.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == "detect_done":
            return [float(entry["seconds"])]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per tool and NAT type (default 3)")
    parser.add_argument("--policy", choices=[p.value for p in SynPolicy], default="drop")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    if not 1 <= args.runs <= 50:
        parser.error("--runs must be 1-50")
    if not Path(PYSTUN3).exists() and shutil.which("pystun3") is None:
        parser.error("pystun3 console script not found next to this interpreter")
    policy = SynPolicy(args.policy)
    types = list(NatType)
    spec = LabSpec([RouterSpec(SHORT_NAMES[t], t, policy) for t in types])
    results: dict[str, dict[str, object]] = {}
    with Lab(spec) as lab, lab_server(lab, "bench"):
        for nat in types:
            host = lab.host(SHORT_NAMES[nat])
            ours: list[float] = []
            inside: list[float] = []
            theirs: list[float] = []
            our_labels: set[str] = set()
            their_labels: set[str] = set()
            for _ in range(args.runs):
                started = time.monotonic()
                done = host.run(
                    [
                        sys.executable,
                        "-m",
                        "tcppunch",
                        "--log-level",
                        "debug",
                        "--log-json",
                        "detect",
                        "--server",
                        f"{SERVER}:{PORT}",
                        "--json",
                    ],
                    timeout=60,
                )
                ours.append(time.monotonic() - started)
                inside.extend(_detect_seconds(done.stderr))
                if done.returncode == 0:
                    report = json.loads(done.stdout)
                    tcp = report["tcp"]
                    our_labels.add(f"{tcp['mapping']}/{tcp['filtering']}/udp={report['udp']['nat_type']}")
                else:
                    our_labels.add(f"exit {done.returncode}")
                started = time.monotonic()
                done = host.run(
                    [
                        PYSTUN3,
                        "-H",
                        SERVER,
                        "-P",
                        str(PORT),
                        "-i",
                        host.address,
                        "-p",
                        str(random.randrange(40000, 60000)),
                    ],
                    timeout=120,
                )
                theirs.append(time.monotonic() - started)
                first = done.stdout.splitlines()[0] if done.stdout else f"exit {done.returncode}"
                their_labels.add(first.removeprefix("NAT Type: "))
            ours_median, theirs_median = statistics.median(ours), statistics.median(theirs)
            results[nat.value] = {
                "ours_s": round(ours_median, 3),
                "ours_in_process_s": round(statistics.median(inside), 3) if inside else None,
                "pystun3_s": round(theirs_median, 3),
                "ratio": round(theirs_median / ours_median, 1),
                "ours_result": sorted(our_labels),
                "pystun3_result": sorted(their_labels),
            }
    print(f"detect benchmark: {args.runs} runs per tool and type, SYN policy {policy.value}, no added delay")
    print(
        f"{'NAT type':18} {'ours (s)':>9} {'in-process':>10} {'pystun3 (s)':>12} {'ratio':>7}  results (ours | pystun3)"
    )
    for name, row in results.items():
        in_process = row["ours_in_process_s"]
        print(
            f"{name:18} {row['ours_s']:>9.3f} {in_process if in_process is not None else float('nan'):>10.3f} "
            f"{row['pystun3_s']:>12.3f} {row['ratio']:>6.1f}x  "
            f"{', '.join(row['ours_result'])} | {', '.join(row['pystun3_result'])}"
        )
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
