"""``python -m examples.swarm``: create a metainfo file, run a peer, or run the NAT-lab demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import structlog


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.swarm", description=__doc__)
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    create = sub.add_parser("create", help="hash a file into a metainfo (JSON) file")
    create.add_argument("file", type=Path)
    create.add_argument("--swarm", required=True, help="the name peers register under")
    create.add_argument("--piece-size", type=int, default=256 * 1024)
    create.add_argument("-o", "--output", type=Path, help="default: FILE.swarm.json")

    peer = sub.add_parser("peer", help="join a swarm: seed what DIR has, download the rest into DIR")
    peer.add_argument("metainfo", type=Path)
    peer.add_argument("--coordinator", required=True, help="HOST:PORT of `tcppunch server`")
    peer.add_argument("--id", required=True, help="this peer's id")
    peer.add_argument("--token", default=os.environ.get("TCPPUNCH_TOKEN"),
                      help="the coordinator's token (default: env TCPPUNCH_TOKEN; a visible argument is not a secret)")
    peer.add_argument("--dir", type=Path, required=True, help="where the file is (or goes)")
    peer.add_argument("--relay", choices=["auto", "never", "always"], default="auto")
    peer.add_argument("--pipeline", type=int, default=4, help="requests in flight per connection")
    peer.add_argument("--max-peers", type=int, default=32)
    peer.add_argument("--parallel-dials", action="store_true", help="dial peers concurrently (default: one at a time)")
    peer.add_argument("--upload-rate", type=float, help="upload cap, bytes/s (default: none)")
    peer.add_argument("--seed-for", type=float, help="once complete, seed this many seconds, then exit "
                      "(default: until SIGTERM/SIGINT)")
    peer.add_argument("--run-timeout", type=float, default=3600.0, help="give up after this many seconds")

    demo = sub.add_parser("demo", help="run a seeder and leechers across NAT types in the NAT lab (root)")
    demo.add_argument("--size-mb", type=float, default=20.0)
    demo.add_argument("--piece-size", type=int, default=256 * 1024)
    demo.add_argument("--seeder", default="port-restricted", help="the seeder's NAT type")
    demo.add_argument("--leechers", default="full-cone,restricted,symmetric-seq,symmetric-random,cgnat",
                      help="comma-separated NAT types, one leecher each")
    demo.add_argument("--upload-rate", type=float, default=5e6,
                      help="per-peer upload cap, bytes/s, like a home uplink (default: 5e6; 0: none)")
    demo.add_argument("--parallel-dials", action="store_true")
    demo.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay on every router's WAN link")
    demo.add_argument("--syn-policy", choices=["drop", "rst"], default="drop",
                      help="what the routers do with unsolicited SYNs (rst wants --delay-ms 5 or more)")
    demo.add_argument("--kill", help="SIGKILL the peer behind this NAT type mid-transfer (once it has uploaded "
                      "a piece, as the next request for one arrives)")
    demo.add_argument("--timeout", type=float, default=300.0)
    demo.add_argument("--workdir", type=Path, help="keep files here (default: a temporary directory)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON after the table")

    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    if args.command == "create":
        return _create(args)
    if args.command == "peer":
        return _peer(args)
    return _demo(args)


def _configure_logging(level: str) -> None:
    """Logs to stderr: stdout carries the JSON event lines."""
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="%H:%M:%S.%f"),
                    structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


def _create(args: argparse.Namespace) -> int:
    from examples.swarm.metainfo import MetainfoError, create_metainfo

    try:
        meta = create_metainfo(args.file, swarm=args.swarm, piece_size=args.piece_size)
    except (OSError, MetainfoError) as exc:
        print(f"create: {exc}", file=sys.stderr)
        return 2
    out = args.output or args.file.with_name(args.file.name + ".swarm.json")
    meta.save(out)
    print(f"{out}: {meta.piece_count} pieces of {meta.piece_size} bytes, info hash {meta.info_hash.hex()[:16]}")
    return 0


def _peer(args: argparse.Namespace) -> int:
    from examples.swarm.client import ClientConfig, SwarmClient
    from examples.swarm.metainfo import Metainfo, MetainfoError
    from examples.swarm.storage import PieceStore
    from tcppunch.peer import ConnectFailed, CoordinatorError, RelayMode

    try:
        meta = Metainfo.load(args.metainfo)
    except (OSError, MetainfoError) as exc:
        print(f"peer: {args.metainfo}: {exc}", file=sys.stderr)
        return 2
    if not args.token:
        print("peer: no token: set TCPPUNCH_TOKEN (or --token)", file=sys.stderr)
        return 2
    config = ClientConfig(args.coordinator, args.id, args.token, relay=RelayMode(args.relay), pipeline=args.pipeline,
                          max_peers=args.max_peers, serial_dials=not args.parallel_dials,
                          upload_rate=args.upload_rate, seed_for=args.seed_for, run_timeout=args.run_timeout)

    def emit(event: dict[str, Any]) -> None:
        print(json.dumps({"peer": args.id, **event}), flush=True)

    async def run() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        store = PieceStore(meta, args.dir)
        return await SwarmClient(meta, store, config, emit).run(stop)

    try:
        stats = asyncio.run(run())
    except ConnectFailed as exc:  # the coordinator is unreachable
        print(f"peer: {exc}", file=sys.stderr)
        return 1
    except CoordinatorError as exc:  # a refused registration (bad token, id taken)
        print(f"peer: cannot join: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    emit({"event": "stats", **stats})
    return 0 if stats["complete"] else 3


def _demo(args: argparse.Namespace) -> int:
    from examples.swarm.demo import DemoConfig, format_table, run_demo
    from tcppunch.lab import LabError, SynPolicy

    config = DemoConfig(size=int(args.size_mb * 1_000_000), piece_size=args.piece_size, seeder=args.seeder,
                        leechers=[t for t in args.leechers.split(",") if t], upload_rate=args.upload_rate or None,
                        serial_dials=not args.parallel_dials, kill=args.kill, timeout=args.timeout,
                        workdir=args.workdir, delay_ms=args.delay_ms, syn_policy=SynPolicy(args.syn_policy))
    try:
        result = run_demo(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (LabError, ValueError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
