"""Birthday punching in the lab: success rate and time to connect, per NAT pair and SYN policy.

For each pair (symmetric-random with port-restricted, symmetric-random with cgnat) and each SYN policy,
--trials fresh pairs of peers (the public Peer API, a coordinator on the lab server, real `detect`) connect
and move --size bytes each way (SHA-256 checked); the direction alternates (the random side connects in
even trials, listens in odd ones). Prints per row: direct / trials, median time from connect() to a usable
connection (direct trials), and the probability the defaults promise (1 - exp(-M*N/R) per round of
tickets, two rounds on the hard side).

    python scripts/bench_birthday.py [--trials 20] [--delay-ms 20] [--policy drop --policy rst]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from tcppunch.cli.logging import configure_logging
from tcppunch.lab import Lab, LabSpec, LinkShape, NatType, RouterSpec, SynPolicy
from tcppunch.labrun import LabRunner, PairResult
from tcppunch.peer import Method
from tcppunch.punch.birthday import DEFAULT_LIMITS, HARD_ROUNDS, success_probability

RND = NatType.SYMMETRIC_RANDOM
EASY = {"pr": NatType.PORT_RESTRICTED, "cgn": NatType.CGNAT}


def spec(policies: list[SynPolicy], delay_ms: float) -> LabSpec:
    link = LinkShape(delay_ms=delay_ms)
    routers = []
    for policy in policies:
        p = policy.value[0]
        routers.append(RouterSpec(f"rnd{p}", RND, policy, link=link))
        routers += [RouterSpec(f"{short}{p}", nat, policy, link=link) for short, nat in EASY.items()]
    return LabSpec(routers)


def row(results: list[PairResult]) -> tuple[int, int, float | None, int]:
    direct = [r for r in results if r.ok and r.method is Method.DIRECT]
    times = [r.connect_seconds for r in direct if r.connect_seconds is not None]
    broken = sum(1 for r in results if not r.ok)
    return len(direct), len(results), (statistics.median(times) if times else None), broken


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay on every WAN link")
    parser.add_argument("--policy", action="append", choices=[p.value for p in SynPolicy],
                        help="SYN policy of every router (repeat; default: both)")
    parser.add_argument("--pair", action="append", choices=sorted(EASY), help="easy side (default: both)")
    parser.add_argument("--size", type=int, default=100_000, help="bytes each way per trial")
    args = parser.parse_args()
    if not 1 <= args.trials <= 1000:
        parser.error("--trials must be 1..1000")
    configure_logging("error")
    policies = [SynPolicy(p) for p in (args.policy or [p.value for p in SynPolicy])]
    pairs = args.pair or sorted(EASY)
    limits = DEFAULT_LIMITS
    one, expected = (success_probability(limits.sockets * k, limits.probes) for k in (1, HARD_ROUNDS))
    print(f"M = {limits.sockets} sockets, N = {limits.probes} guesses, budget {limits.max_syns} SYNs, "
          f"{limits.rate:g} SYN/s; 1 - exp(-MN/R) = {one:.1%}, with {HARD_ROUNDS} hard rounds {expected:.2%}; "
          f"{args.delay_ms:g} ms per WAN link")
    print("| pair | SYN policy | direct | median connect | relayed | broken |")
    print("|---|---|---|---|---|---|")
    failures = 0
    started = time.monotonic()
    with Lab(spec(policies, args.delay_ms)) as lab, LabRunner(lab) as runner:
        for policy in policies:
            p = policy.value[0]
            for short in pairs:
                rnd, easy = lab.host(f"rnd{p}"), lab.host(f"{short}{p}")
                results = []
                for n in range(args.trials):
                    a, b = (rnd, easy) if n % 2 == 0 else (easy, rnd)
                    results.append(runner.pair(a, b, size=args.size, timeout=30))
                for r in results:
                    if not (r.ok and r.method is Method.DIRECT):
                        print(f"    {r.initiator} -> {r.responder}: {r.error or r.relay_reason}", flush=True)
                direct, total, median, broken = row(results)
                failures += broken
                ms = f"{median * 1000:.0f} ms" if median is not None else "-"
                print(f"| symmetric-random ↔ {EASY[short].value} | {policy.value} | {direct}/{total} "
                      f"({direct / total:.0%}) | {ms} | {total - direct - broken} | {broken} |", flush=True)
    print(f"({time.monotonic() - started:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
