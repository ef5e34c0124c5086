"""Time to a granted TCP mapping behind a lab router running miniupnpd, per protocol, and our asyncio
UPnP-IGD client against miniupnpc (the C library's Python module, blocking) in the same run.

    python scripts/bench_portmap.py [--runs 20]

Each run maps a fresh port and deletes it again; the figure is the time from the call to the granted
mapping (for ours: probe + map; for miniupnpc: discover + selectigd + addportmapping, discover waiting
--discover-ms as its delay). miniupnpc is optional: ``pip install miniupnpc==2.3.3`` to include it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from tcppunch.cli.logging import configure_logging
from tcppunch.lab import Lab, LabSpec, RouterSpec
from tcppunch.portmap import PortMapper
from tcppunch.wire.natreport import PortMappingProtocol

BASE_PORT = 43000


def ours(lab: Lab, port: int, protocols: tuple[PortMappingProtocol, ...]) -> float:
    with lab.host("m").event_loop() as loop:
        mapper = PortMapper(port, protocols=protocols)
        started = time.perf_counter()
        mapping = loop.run(mapper.start())
        took = time.perf_counter() - started
        loop.run(mapper.close())
    if mapping is None:
        raise SystemExit(f"no mapping: {mapper.error}")
    return took


def miniupnpc_once(port: int, discover_ms: int) -> float:
    import miniupnpc  # type: ignore[import-not-found]  # optional, for this comparison only

    started = time.perf_counter()
    upnp = miniupnpc.UPnP()
    upnp.discoverdelay = discover_ms
    if upnp.discover() < 1:
        raise SystemExit("miniupnpc found no device")
    upnp.selectigd()
    upnp.addportmapping(port, "TCP", upnp.lanaddr, port, "tcppunch-bench", "")
    took = time.perf_counter() - started
    upnp.deleteportmapping(port, "TCP")
    return took


def series(name: str, runs: int, once: Callable[[int], float]) -> list[float]:
    times = [once(BASE_PORT + i) for i in range(runs)]
    print(f"{name:<34} median {statistics.median(times) * 1000:7.1f} ms   "
          f"min {min(times) * 1000:6.1f}   max {max(times) * 1000:6.1f}   ({runs} runs)")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--discover-ms", type=int, default=250, help="miniupnpc's discover delay")
    args = parser.parse_args()
    configure_logging("error")
    with Lab(LabSpec([RouterSpec.parse("m=symmetric-random+upnp")])) as lab:
        host = lab.host("m")
        print(f"Command: python scripts/bench_portmap.py --runs {args.runs} --discover-ms {args.discover_ms}")
        for protocol in PortMappingProtocol:
            series(f"ours, {protocol.value} only", args.runs, lambda p, pr=protocol: ours(lab, p, (pr,)))
        series("ours, all three (first answer)", args.runs, lambda p: ours(lab, p, tuple(PortMappingProtocol)))
        upnp_ours = statistics.median([ours(lab, BASE_PORT + 500 + i, (PortMappingProtocol.UPNP_IGD,))
                                       for i in range(args.runs)])
        try:
            import miniupnpc  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            print("miniupnpc not installed: no comparison")
            return 0
        theirs = series(f"miniupnpc 2.3.3, discover {args.discover_ms} ms", args.runs,
                        lambda p: host.call(miniupnpc_once, p + 1000, args.discover_ms))
        print(f"ratio miniupnpc / ours (UPnP-IGD, medians of this run): {statistics.median(theirs) / upnp_ours:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
