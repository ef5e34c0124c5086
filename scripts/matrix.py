"""Print the connectivity matrix: every ordered pair of lab NAT types, both SYN policies.

Each cell: D (direct) or R (relayed), and the time from connect() to a usable connection, for a fresh
pair of peers moving --size bytes each way (SHA-256 checked). Rows connect, columns listen.

With ``--port-mapping one`` (the listening side's router runs miniupnpd) or ``--port-mapping both``
(both routers do; repeatable, ``none`` is the plain matrix) the peers ask their routers for a mapping
first, and each direct cell also names the kind of candidate that won: pm = port mapping, bd = birthday,
ob = observed, pd = predicted, v6 = IPv6, pv = private.

With ``--ipv6`` (the IPv6 column) every host has IPv6 too (RFC 6092 firewalls, no NAT66), and each
direct cell names the winning candidate as well (v6 when IPv6 won).

    python scripts/matrix.py [--size 10000000] [--policy drop] [--port-mapping one --port-mapping both]
                             [--ipv6] [--markdown docs/matrix.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tcppunch.cli.logging import configure_logging
from tcppunch.lab import Lab, NatType, SynPolicy
from tcppunch.lab.matrix import MappingSides, direct_expected, host_names, matrix_spec
from tcppunch.lab.topology import SHORT_NAMES
from tcppunch.labrun import LabRunner, PairResult
from tcppunch.punch.plan import CandidateKind

KIND_CODES = {CandidateKind.MAPPED: "pm", CandidateKind.BIRTHDAY: "bd", CandidateKind.OBSERVED: "ob",
              CandidateKind.PREDICTED: "pd", CandidateKind.IPV6: "v6", CandidateKind.PRIVATE: "pv"}


def run_policy(policy: SynPolicy, size: int, mapping: MappingSides, ipv6: bool = False
               ) -> dict[tuple[NatType, NatType], PairResult]:
    results: dict[tuple[NatType, NatType], PairResult] = {}
    with Lab(matrix_spec(policy, mapping=mapping, ipv6=ipv6)) as lab, LabRunner(lab) as runner:
        for a in NatType:
            for b in NatType:
                ra, rb = host_names(a, b)
                results[(a, b)] = runner.pair(lab.host(ra), lab.host(rb), size=size,
                                              port_mapping=mapping is not MappingSides.NONE)
    return results


def cell(result: PairResult, expected_direct: bool, show_kind: bool) -> str:
    if not result.ok or result.method is None:
        return "FAIL"
    mark = "D" if result.method.value == "direct" else "R"
    flag = "" if (mark == "D") == expected_direct else "!"
    ms = f"{result.connect_seconds * 1000:.0f}" if result.connect_seconds is not None else "?"
    kind = f" {KIND_CODES.get(result.candidate, '?') if result.candidate else '?'}" if show_kind and mark == "D" else ""
    return f"{mark}{flag}{kind} {ms} ms"


def table(policy: SynPolicy, mapping: MappingSides, results: dict[tuple[NatType, NatType], PairResult],
          ipv6: bool = False) -> list[str]:
    names = [SHORT_NAMES[t] for t in NatType]
    label = policy.value if mapping is MappingSides.NONE else f"{policy.value}, mapping: {mapping.value}"
    label += ", IPv6" if ipv6 else ""
    lines = [f"| {label} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in NatType:
        row = [cell(results[(a, b)], direct_expected(a, b, mapping, ipv6=ipv6),
                    ipv6 or mapping is not MappingSides.NONE)
               for b in NatType]
        lines.append(f"| **{SHORT_NAMES[a]}** | " + " | ".join(row) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10_000_000, help="bytes each way per pair")
    parser.add_argument("--policy", action="append", choices=[p.value for p in SynPolicy],
                        help="SYN policy (repeatable; default: both)")
    parser.add_argument("--port-mapping", action="append", choices=[m.value for m in MappingSides],
                        help="routers with miniupnpd: none, one (the listener's), both (repeatable; default: none)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--ipv6", action="store_true", help="the IPv6 column: labs with IPv6 on every host too")
    args = parser.parse_args()
    configure_logging("error")
    policies = [SynPolicy(p) for p in args.policy] if args.policy else list(SynPolicy)
    mappings = [MappingSides(m) for m in args.port_mapping] if args.port_mapping else [MappingSides.NONE]
    command = " ".join(sys.argv[1:])
    out = [f"Command: `python scripts/matrix.py {command}` ({time.strftime('%Y-%m-%d')})", ""]
    failures = 0
    for mapping in mappings:
        for policy in policies:
            started = time.monotonic()
            results = run_policy(policy, args.size, mapping, args.ipv6)
            failures += sum(1 for (a, b), r in results.items()
                            if not r.ok or (r.method is not None and (r.method.value == "direct")
                                            != direct_expected(a, b, mapping, ipv6=args.ipv6)))
            delay = matrix_spec(policy).routers[0].link.delay_ms
            where = {MappingSides.NONE: "no port mapping", MappingSides.ONE: "port mapping on the listener's router",
                     MappingSides.BOTH: "port mapping on both routers"}[mapping]
            where += ", IPv6 on every host (RFC 6092 firewalls)" if args.ipv6 else ""
            out += [f"SYN policy `{policy.value}`, {where}, {delay:g} ms one-way delay per WAN link, "
                    f"{len(results)} pairs in {time.monotonic() - started:.0f} s:", ""]
            out += [*table(policy, mapping, results, args.ipv6), ""]
    out.append("D = direct, R = relayed, ! = not what the NAT types predict, FAIL = bytes did not arrive intact.")
    if mappings != [MappingSides.NONE] or args.ipv6:
        out.append("Winning candidate: pm = port mapping, bd = birthday, ob = observed, pd = predicted, "
                   "v6 = IPv6, pv = private.")
    print("\n".join(out))
    if args.markdown:
        args.markdown.write_text("\n".join(out) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
