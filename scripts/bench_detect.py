#!/usr/bin/env python3
"""Benchmark: the classic UDP NAT label, ours against pystun3's own CLI, per NAT type, in the NAT lab.

The reference must be able to answer: pystun3's CLI sends unpadded 20-byte requests, which a server that
refuses to amplify (``tcppunch server``) leaves unanswered, so both UDP tools ask coturn, a classic RFC
3489 / RFC 5780 server on both lab server addresses (CHANGE-REQUEST answered from the other address and
port). One lab, one router per NAT type (SYN policy selectable), ``tcppunch server`` and coturn on the lab
server, each started here and stopped by PID, the lab removed by its prefix at the end. From each NAT'd
host, N rounds of three fresh processes (the order rotates each round), wall time around each process:

* pystun3:  ``pystun3 -H 198.51.100.10 -P 3490 -i HOST -p PORT``  (coturn)
* ours UDP: this script's ``--udp-once 198.51.100.10:3490``: ``tcppunch.nat.udp.classic_udp_nat_type``,
  the function ``tcppunch detect`` runs for its UDP label, with detect's default budgets  (coturn)
* detect:   ``tcppunch detect --server 198.51.100.10:3478 --json``  (our server: TCP mapping,
  filtering, SYN policy, hairpin and the UDP label; not comparable with pystun3, which does only UDP)

The ratio is pystun3 / ours UDP (like for like: same question, same server, both a fresh interpreter).
"in-process" is the engine's own time without interpreter start-up and imports (``UdpResult.seconds``;
detect's ``detect_done`` debug log line). Every label is checked against the lab's ground truth and each
disagreement is printed; the exit status is 1 if there was any. Needs root (the lab). Usage:

    .venv/bin/python scripts/bench_detect.py [--runs 3] [--policy drop|rst] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tcppunch.lab import LabHost

# Only what ``--udp-once`` needs is imported at module level: its start-up time is part of the figure.
PYSTUN3 = str(Path(sys.executable).with_name("pystun3"))
PYSTUN3_PREFIX = "NAT Type: "
Probe = Callable[[], tuple[float, str, "float | None"]]  # one fresh process: wall s, label, in-process s
# pystun3's labels (stun.OpenInternet etc.), spelled as it prints them.
OPEN, FULL_CONE, RESTRICTED, PORT_RESTRICTED, SYMMETRIC = (
    "Open Internet", "Full Cone", "Restric NAT", "Restric Port NAT", "Symmetric NAT")


def pystun3_label(stdout: str, returncode: int) -> str:
    """The label pystun3's CLI printed ("NAT Type: Full Cone" -> "Full Cone"), or why there is none."""
    for line in stdout.splitlines():
        if line.startswith(PYSTUN3_PREFIX):
            return line.removeprefix(PYSTUN3_PREFIX).strip()
    return f"exit {returncode}, no 'NAT Type:' line"


def detect_seconds(stderr: str) -> float | None:
    """The engine's own duration from ``tcppunch --log-json --log-level debug detect``'s ``detect_done`` line."""
    for line in stderr.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == "detect_done":
            return float(entry["seconds"])
    return None


def classic_label(mapping: str, filtering: str, behind_nat: bool) -> str:
    """The RFC 3489 label a NAT with these RFC 4787 behaviours (and the lab treats UDP like TCP) earns."""
    if not behind_nat:
        return OPEN
    if mapping != "endpoint-independent":
        return SYMMETRIC
    return {"endpoint-independent": FULL_CONE, "address-dependent": RESTRICTED,
            "address-and-port-dependent": PORT_RESTRICTED}[filtering]


def udp_once(server: str, per_test: float, deadline: float) -> None:
    """One run of detect's UDP label against ``server`` (HOST:PORT); one JSON line on stdout."""
    from tcppunch.nat.udp import classic_udp_nat_type
    from tcppunch.wire.endpoint import Endpoint

    host, port = server.rsplit(":", 1)
    result = asyncio.run(classic_udp_nat_type(Endpoint(host, int(port)), per_test_timeout=per_test,
                                              deadline=deadline))
    print(json.dumps({"nat_type": result.nat_type, "error": result.error, "seconds": result.seconds}))


@dataclass
class Samples:
    """One tool's wall times, in-process times and labels (with how often each came) on one NAT type."""

    wall: list[float] = field(default_factory=list)
    inside: list[float] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)

    def add(self, seconds: float, label: str, inside: float | None = None) -> None:
        self.wall.append(seconds)
        if inside is not None:
            self.inside.append(inside)
        self.labels[label] = self.labels.get(label, 0) + 1

    def summary(self) -> dict[str, Any]:
        return {"median_s": round(statistics.median(self.wall), 3),
                "in_process_s": round(statistics.median(self.inside), 3) if self.inside else None,
                "labels": self.labels}


def timed(run: Callable[[], subprocess.CompletedProcess[str]]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    done = run()
    return time.monotonic() - started, done


def run_pystun3(host: LabHost, server: str, port: int) -> tuple[float, str, None]:
    """pystun3's own CLI on ``host`` from a random source port: (wall seconds, label, no in-process time)."""
    seconds, done = timed(lambda: host.run(
        [PYSTUN3, "-H", server, "-P", str(port), "-i", host.address, "-p", str(random.randrange(40000, 60000))],
        timeout=120))
    return seconds, pystun3_label(done.stdout, done.returncode), None


def run_ours_udp(host: LabHost, server: str, budgets: list[str]) -> tuple[float, str, float | None]:
    """This script's ``--udp-once`` on ``host``: (wall seconds, label, the engine's own seconds)."""
    seconds, done = timed(lambda: host.run(
        [sys.executable, str(Path(__file__).resolve()), "--udp-once", server, "--budgets", *budgets], timeout=60))
    try:
        result = json.loads(done.stdout)
    except ValueError:
        return seconds, f"exit {done.returncode}: {done.stderr[-200:]}", None
    return seconds, result["nat_type"] or f"none: {result['error']}", result["seconds"]


def run_detect(host: LabHost, server: str) -> tuple[float, str, float | None]:
    """``tcppunch detect --server SERVER --json`` on ``host``: (wall seconds, "mapping / filtering / UDP label",
    the engine's own seconds)."""
    seconds, done = timed(lambda: host.run(
        [sys.executable, "-m", "tcppunch", "--log-level", "debug", "--log-json", "detect", "--server", server,
         "--json"], timeout=60))
    if done.returncode != 0:
        return seconds, f"exit {done.returncode}", None
    report = json.loads(done.stdout)
    tcp = report["tcp"]
    return seconds, f"{tcp['mapping']} / {tcp['filtering']} / {report['udp']['nat_type']}", detect_seconds(done.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="rounds per NAT type (default 3)")
    parser.add_argument("--policy", choices=["drop", "rst"], default="drop", help="the routers' SYN policy")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--udp-once", metavar="HOST:PORT", help=argparse.SUPPRESS)  # the child's mode
    parser.add_argument("--budgets", nargs=2, type=float, default=(0.2, 3.0), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.udp_once:
        udp_once(args.udp_once, *args.budgets)
        return 0
    if not 1 <= args.runs <= 50:
        parser.error("--runs must be 1-50")
    if not Path(PYSTUN3).exists():
        parser.error(f"pystun3's console script not found at {PYSTUN3}")
    return bench(args.runs, args.policy, args.json)


def bench(runs: int, policy_name: str, as_json: bool) -> int:
    import inspect

    from tcppunch.lab import Lab, LabSpec, NatType, RouterSpec, SynPolicy
    from tcppunch.lab import netns as ns
    from tcppunch.lab.lines import Tail
    from tcppunch.lab.portmap import STUN_PORT, coturn_argv
    from tcppunch.lab.server_process import LAB_COORDINATOR, lab_server, stop_process
    from tcppunch.lab.topology import SERVER_ADDRESSES, SHORT_NAMES
    from tcppunch.nat.detect import detect

    # detect's own UDP budgets: per test, and the whole test at the CLI's default --timeout (3 s).
    defaults = inspect.signature(detect).parameters
    per_test, overall = defaults["udp_test_timeout"].default, defaults["timeout"].default
    budgets = [str(per_test), str(max(overall, 4 * per_test + 0.5))]
    coturn = f"{SERVER_ADDRESSES[0]}:{STUN_PORT}"
    ours_server = str(LAB_COORDINATOR)
    policy = SynPolicy(policy_name)
    types = list(NatType)
    load_before = os.getloadavg()
    rows: dict[str, dict[str, Any]] = {}
    disagreements: list[str] = []
    lab = Lab(LabSpec([RouterSpec(SHORT_NAMES[t], t, policy) for t in types]))
    with lab, lab_server(lab, "bench"), tempfile.TemporaryDirectory(prefix="bench-coturn-") as state:
        proc = lab.server.popen([*coturn_argv(SERVER_ADDRESSES, Path(state)), "-v"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            assert proc.stdout is not None
            log = Tail(proc.stdout)
            for address in SERVER_ADDRESSES:
                for port in (STUN_PORT, STUN_PORT + 1):
                    if not log.wait_for(f"UDP listener opened on: {address}:{port}", 15.0):
                        raise SystemExit(f"coturn did not open {address}:{port}: {log.text[-2000:]}")
            for nat in types:
                host = lab.host(SHORT_NAMES[nat])
                tools: dict[str, tuple[Samples, Probe]] = {
                    "pystun3": (Samples(), functools.partial(run_pystun3, host, SERVER_ADDRESSES[0], STUN_PORT)),
                    "ours_udp": (Samples(), functools.partial(run_ours_udp, host, coturn, budgets)),
                    "detect": (Samples(), functools.partial(run_detect, host, ours_server))}
                order = list(tools)
                for round_ in range(runs):
                    for name in order[round_ % 3:] + order[: round_ % 3]:
                        samples, probe = tools[name]
                        samples.add(*probe())
                truth_udp = classic_label(nat.mapping.value, nat.filtering.value, nat is not NatType.NONE)
                truth_detect = f"{nat.mapping.value} / {nat.filtering.value} / {truth_udp}"
                for name, truth in (("pystun3", truth_udp), ("ours_udp", truth_udp), ("detect", truth_detect)):
                    wrong = {label: n for label, n in tools[name][0].labels.items() if label != truth}
                    if wrong:
                        disagreements.append(f"{nat.value}: {name} said {wrong}, the lab's truth is {truth!r}")
                row = {name: samples.summary() for name, (samples, _) in tools.items()}
                row["truth"] = {"udp": truth_udp, "detect": truth_detect}
                row["ratio"] = round(row["pystun3"]["median_s"] / row["ours_udp"]["median_s"], 1)
                rows[nat.value] = row
        finally:
            stop_process(proc)
    left = [n for n in ns.list_netns() if n.startswith(lab.prefix + "-")]
    load_after = os.getloadavg()
    report(rows, runs, policy.value, load_before, load_after, lab.prefix, left, disagreements)
    if as_json:
        print(json.dumps({"runs": runs, "policy": policy.value, "load_before": load_before,
                          "load_after": load_after, "rows": rows, "disagreements": disagreements}, indent=2))
    return 1 if disagreements or left else 0


def report(rows: dict[str, dict[str, Any]], runs: int, policy: str, load_before: tuple[float, ...],
           load_after: tuple[float, ...], prefix: str, left: list[str], disagreements: list[str]) -> None:
    def loads(values: tuple[float, ...]) -> str:
        return " ".join(f"{v:.2f}" for v in values)

    print(f"detect benchmark: {runs} rounds per NAT type, SYN policy {policy}, no added delay, {os.cpu_count()} "
          f"CPUs, load average (1/5/15 min) {loads(load_before)} before, {loads(load_after)} after")
    print("UDP label, like for like (both against coturn): pystun3's CLI vs ours; whole `tcppunch detect` "
          "(TCP + UDP) against our server")
    print(f"{'NAT type':17} {'pystun3 s':>9} {'ours UDP s':>10} {'in-proc':>7} {'ratio':>6} "
          f"{'detect s':>8} {'in-proc':>7}  labels: pystun3 | ours UDP | detect (mapping / filtering / UDP)")
    for name, row in rows.items():
        ours, whole = row["ours_udp"], row["detect"]
        print(f"{name:17} {row['pystun3']['median_s']:>9.3f} {ours['median_s']:>10.3f} "
              f"{_num(ours['in_process_s']):>7} {row['ratio']:>5.1f}x {whole['median_s']:>8.3f} "
              f"{_num(whole['in_process_s']):>7}  {_labels(row['pystun3'])} | {_labels(ours)} | {_labels(whole)}")
    if disagreements:
        print("DISAGREE with the lab's ground truth:")
        for line in disagreements:
            print(f"  {line}")
    else:
        print("every label of every run agrees with the lab's ground truth")
    print(f"lab {prefix} removed" if not left else f"lab {prefix}: namespaces left behind: {left}")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _labels(summary: dict[str, Any]) -> str:
    labels: dict[str, int] = summary["labels"]
    return ", ".join(label if len(labels) == 1 else f"{label} ({n}x)" for label, n in labels.items())


if __name__ == "__main__":
    sys.exit(main())
