"""`make demo`: a NAT lab with one router of every type, measured by the lab's own probes.

Later stages (detect, connect) are added here as they land. Everything runs inside namespaces this
script creates and removes; nothing touches the machine's own network.
"""

from __future__ import annotations

import sys
import time

from tcppunch.cli.logging import configure_logging
from tcppunch.lab import Lab, LabError, LabSpec, SynPolicy
from tcppunch.lab.probe import probe_all


def main() -> int:
    configure_logging("warning")
    spec = LabSpec.every_type(SynPolicy.DROP)
    started = time.monotonic()
    try:
        lab = Lab(spec).up()
    except LabError as exc:
        print(f"demo: cannot build the NAT lab: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"NAT lab {lab.prefix} up in {time.monotonic() - started:.2f}s: server {lab.server.address} "
              f"(+198.51.100.11), one router of each type, unsolicited SYNs dropped\n")
        print(f"{'host':<6}{'address':<16}{'public':<16}{'NAT type':<18}")
        for h in lab.hosts.values():
            print(f"{h.name:<6}{h.address:<16}{h.public_address:<16}{h.nat.value:<18}")
        print("\nmeasured by the lab's probes (same local port to 3 server endpoints; SYNs from strangers):")
        print(f"{'host':<6}{'mapping':<28}{'filtering':<28}{'keeps port':<11}{'delta':<7}{'stranger SYN':<13}ok")
        results = probe_all(lab)
        bad = 0
        for name, r in sorted(results.items()):
            h = lab.hosts[name]
            ok = (r.mapping, r.filtering, r.port_preservation, r.port_delta, r.unsolicited_syn) == (
                h.nat.mapping, h.nat.filtering, h.nat.port_preservation, h.nat.port_delta,
                h.nat.unsolicited_syn(h.syn_policy))
            bad += not ok
            delta = "random" if r.port_delta is None else str(r.port_delta)
            print(f"{name:<6}{r.mapping.value:<28}{r.filtering.value:<28}{r.port_preservation!s:<11}{delta:<7}"
                  f"{r.unsolicited_syn.value:<13}{'yes' if ok else 'NO'}")
    finally:
        lab.down()
    print(f"\nlab removed; {len(results) - bad}/{len(results)} hosts behave as their NAT type promises")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
