"""Fuzz every network parser with Hypothesis, at least 10,000 examples each, and print the counts.

    .venv/bin/python scripts/fuzz_parsers.py                  # 10,000 examples per parser
    .venv/bin/python scripts/fuzz_parsers.py --examples 50000 --only STUN

The properties live in tests/fuzzing.py (``make test`` runs them briefly): each parser may raise only
its declared error type (ProtocolError, StunParseError; the handshake and the state machine nothing).
A failure prints Hypothesis' smallest failing input and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fuzzing import TARGETS, run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="per parser (default 10,000)")
    parser.add_argument("--only", help="run only the targets whose name contains this")
    args = parser.parse_args()
    # the coordinator logs every refused input; that is not what is measured here
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    failed = 0
    total = 0
    for target in TARGETS:
        if args.only and args.only.lower() not in target.name.lower():
            continue
        started = time.monotonic()
        try:
            count = run(target, args.examples)
        except Exception as exc:  # a property failed: report it and go on with the next parser
            failed += 1
            print(f"FAIL  {target.name}: {type(exc).__name__}: {exc}", flush=True)
            continue
        total += count
        print(f"ok    {target.name}: {count:,} examples in {time.monotonic() - started:.1f} s", flush=True)
    print(f"{total:,} examples, {failed} parser(s) failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
