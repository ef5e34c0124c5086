"""Print the connectivity matrix: every ordered pair of lab NAT types, both SYN policies.

Each cell: D (direct) or R (relayed), and the time from connect() to a usable connection, for a fresh
pair of peers moving --size bytes each way (SHA-256 checked). Rows connect, columns listen.

    python scripts/matrix.py [--size 10000000] [--markdown docs/matrix.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tcppunch.cli.logging import configure_logging
from tcppunch.lab import Lab, NatType, SynPolicy
from tcppunch.lab.matrix import direct_expected, host_names, matrix_spec
from tcppunch.lab.topology import SHORT_NAMES
from tcppunch.labrun import LabRunner, PairResult


def run_policy(policy: SynPolicy, size: int) -> dict[tuple[NatType, NatType], PairResult]:
    results: dict[tuple[NatType, NatType], PairResult] = {}
    with Lab(matrix_spec(policy)) as lab, LabRunner(lab) as runner:
        for a in NatType:
            for b in NatType:
                ra, rb = host_names(a, b)
                results[(a, b)] = runner.pair(lab.host(ra), lab.host(rb), size=size)
    return results


def cell(result: PairResult, expected_direct: bool) -> str:
    if not result.ok or result.method is None:
        return "FAIL"
    mark = "D" if result.method.value == "direct" else "R"
    flag = "" if (mark == "D") == expected_direct else "!"
    ms = f"{result.connect_seconds * 1000:.0f}" if result.connect_seconds is not None else "?"
    return f"{mark}{flag} {ms} ms"


def table(policy: SynPolicy, results: dict[tuple[NatType, NatType], PairResult]) -> list[str]:
    names = [SHORT_NAMES[t] for t in NatType]
    lines = [f"| {policy.value} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in NatType:
        row = [cell(results[(a, b)], direct_expected(a, b)) for b in NatType]
        lines.append(f"| **{SHORT_NAMES[a]}** | " + " | ".join(row) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10_000_000, help="bytes each way per pair")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args()
    configure_logging("error")
    out = [f"Command: `python scripts/matrix.py --size {args.size}` ({time.strftime('%Y-%m-%d')})", ""]
    failures = 0
    for policy in SynPolicy:
        started = time.monotonic()
        results = run_policy(policy, args.size)
        failures += sum(1 for (a, b), r in results.items()
                        if not r.ok or (r.method is not None and (r.method.value == "direct") != direct_expected(a, b)))
        delay = matrix_spec(policy).routers[0].link.delay_ms
        out += [f"SYN policy `{policy.value}`, {delay:g} ms one-way delay per WAN link, "
                f"{len(results)} pairs in {time.monotonic() - started:.0f} s:", ""]
        out += [*table(policy, results), ""]
    out.append("D = direct, R = relayed, ! = not what the NAT types predict, FAIL = bytes did not arrive intact.")
    print("\n".join(out))
    if args.markdown:
        args.markdown.write_text("\n".join(out) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
