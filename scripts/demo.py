"""`make demo`: tcppunch in a NAT lab, end to end, with the real command-line tools.

1. A lab with one router of every NAT type (unsolicited SYNs dropped), measured by the lab's own probes.
2. `tcppunch server` on the lab server; `tcppunch detect --json` on every host, compared with the truth.
3. `tcppunch listen` / `tcppunch connect` between pairs of NATed hosts, 1 MB each way, SHA-256 checked:
   direct where a hole can be punched, relayed where it cannot.

Everything runs inside network namespaces this script creates and removes; nothing touches the
machine's own network.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tcppunch.cli.logging import configure_logging
from tcppunch.lab import Lab, LabError, LabHost, LabSpec, NatType, RouterSpec, SynPolicy
from tcppunch.lab.lines import LineTimeout, wait_for_line
from tcppunch.lab.matrix import direct_expected
from tcppunch.lab.probe import probe_all
from tcppunch.lab.server_process import LAB_COORDINATOR, lab_server, stop_process

TOKEN = "demo"
# The token travels in the environment of each process, never on its command line.
TOKEN_ENV = {**os.environ, "TCPPUNCH_TOKEN": TOKEN}
COORD = str(LAB_COORDINATOR)
PY = [sys.executable, "-m", "tcppunch"]
PAIRS = [("pr", "cgn"), ("seq", "pr"), ("seq", "seqb"), ("rnd", "fc"), ("rnd", "pr")]


def main() -> int:
    configure_logging("warning")
    started = time.monotonic()
    try:
        spec = LabSpec.every_type(SynPolicy.DROP)
        # a second symmetric-seq router, so that seq <-> seq can be shown between two NATs
        lab = Lab(LabSpec([*spec.routers, RouterSpec("seqb", NatType.SYMMETRIC_SEQ, SynPolicy.DROP)])).up()
    except LabError as exc:
        print(f"demo: cannot build the NAT lab: {exc}", file=sys.stderr)
        return 1
    bad = 0
    try:
        print(f"NAT lab {lab.prefix} up in {time.monotonic() - started:.2f}s: server {lab.server.address} "
              f"(+198.51.100.11), one router of each type, unsolicited SYNs dropped\n")
        bad += show_probes(lab)
        with lab_server(lab, TOKEN):
            bad += show_detect(lab)
            bad += show_connections(lab)
    except LineTimeout as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        lab.down()
    print(f"\nlab removed; {'all as expected' if not bad else f'{bad} unexpected result(s)'} "
          f"({time.monotonic() - started:.1f}s)")
    return 1 if bad else 0


def show_probes(lab: Lab) -> int:
    print("1. The lab's own probes (same local port to 3 server endpoints; SYNs from strangers):")
    print(f"   {'host':<7}{'NAT type':<18}{'mapping':<28}{'filtering':<28}{'delta':<7}{'stranger SYN':<13}ok")
    bad = 0
    for name, r in sorted(probe_all(lab).items(), key=lambda kv: list(lab.hosts).index(kv[0])):
        h = lab.hosts[name]
        ok = (r.mapping, r.filtering, r.port_delta, r.unsolicited_syn) == (
            h.nat.mapping, h.nat.filtering, h.nat.port_delta, h.nat.unsolicited_syn(h.syn_policy))
        bad += not ok
        delta = "random" if r.port_delta is None else str(r.port_delta)
        print(f"   {name:<7}{h.nat.value:<18}{r.mapping.value:<28}{r.filtering.value:<28}{delta:<7}"
              f"{r.unsolicited_syn.value:<13}{'yes' if ok else 'NO'}")
    return bad


def show_detect(lab: Lab) -> int:
    print(f"\n2. `tcppunch detect --server {COORD} --json` on every host:")
    print(f"   {'host':<7}{'NAT type':<18}{'TCP mapping':<28}{'TCP filtering':<28}{'delta':<7}{'UDP (pystun3)':<22}"
          "ok   seconds")
    bad = 0
    for h in lab.hosts.values():
        t = time.monotonic()
        done = h.run([*PY, "detect", "--server", COORD, "--json"], timeout=30)
        took = time.monotonic() - t
        try:
            report = json.loads(done.stdout)
        except json.JSONDecodeError:
            print(f"   {h.name:<6}detect failed: {done.stderr.strip()[:80]}")
            bad += 1
            continue
        tcp = report["tcp"]
        ok = (tcp["mapping"], tcp["filtering"], tcp["port_delta"]) == (
            h.nat.mapping.value, h.nat.filtering.value, h.nat.port_delta)
        bad += not ok
        delta = "random" if tcp["port_delta"] is None else str(tcp["port_delta"])
        print(f"   {h.name:<7}{h.nat.value:<18}{tcp['mapping']:<28}{tcp['filtering']:<28}{delta:<7}"
              f"{report['udp']['nat_type']!s:<22}{'yes' if ok else 'NO ':<5}{took:.2f}")
    return bad


def show_connections(lab: Lab) -> int:
    print("\n3. `tcppunch listen` on one host, `tcppunch connect` on another, 1 MB each way:")
    print(f"   {'connect':<26}{'listen':<26}{'method':<8}{'connect ms':<12}{'bytes ok':<9}why relayed")
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for n, (a, b) in enumerate(PAIRS):
            result = run_pair(lab.host(a), lab.host(b), Path(tmp), n)
            expected = "direct" if direct_expected(lab.host(a).nat, lab.host(b).nat) else "relay"
            bad += result[0] != expected or not result[2]
            print(f"   {a + ' (' + lab.host(a).nat.value + ')':<26}{b + ' (' + lab.host(b).nat.value + ')':<26}"
                  f"{result[0]:<8}{result[1]:<12}{'yes' if result[2] else 'NO':<9}{result[3]}")
    return bad


def run_pair(a: LabHost, b: LabHost, tmp: Path, n: int) -> tuple[str, str, bool, str]:
    data = {side: os.urandom(1_000_000) for side in "ab"}
    for side in "ab":
        (tmp / f"{n}{side}.in").write_bytes(data[side])
    listen_id, connect_id = f"{b.name}-{n}-l", f"{a.name}-{n}-c"
    listener = b.popen([*PY, "listen", "--coordinator", COORD, "--id", listen_id, "--once"],
                       stdin=(tmp / f"{n}b.in").open("rb"), stdout=(tmp / f"{n}b.out").open("wb"),
                       stderr=subprocess.PIPE, text=True, env=TOKEN_ENV)
    assert listener.stderr is not None
    try:
        wait_for_line(listener.stderr, "listening as", 30)
    except LineTimeout:
        stop_process(listener)
        return "FAIL", "-", False, "listener did not register"
    report = tmp / f"{n}.json"
    done = a.run([*PY, "connect", listen_id, "--coordinator", COORD, "--id", connect_id,
                  "--report", str(report), "--quiet"], stdin=(tmp / f"{n}a.in").open("rb"),
                 stdout=(tmp / f"{n}a.out").open("wb"), capture_output=False, stderr=subprocess.PIPE, timeout=60,
                 env=TOKEN_ENV)
    if done.returncode != 0:
        listener.kill()
        listener.wait(10)
        return "FAIL", "-", False, done.stderr.strip()[:60]
    listener.wait(30)
    info = json.loads(report.read_text())
    ok = all(hashlib.sha256((tmp / f"{n}{x}.in").read_bytes()).digest()
             == hashlib.sha256((tmp / f"{n}{y}.out").read_bytes()).digest() for x, y in (("a", "b"), ("b", "a")))
    return info["method"], f"{info['timings']['total'] * 1000:.0f}", ok, (info.get("relay_reason") or "")[:70]


if __name__ == "__main__":
    sys.exit(main())
