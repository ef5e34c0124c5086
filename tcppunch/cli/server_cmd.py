"""``tcppunch server``: the public side. The coordinator (registration, punch scheduling, relay) and
STUN (TCP + UDP) on every address and port, the coordinator sharing the primary TCP port with STUN.

Structure: :func:`serve` enters every service into one AsyncExitStack, prints one "listening on ..." line
to stderr once everything is bound (scripts and tests wait for it), and waits for SIGTERM/SIGINT. The
coordinator owns the primary TCP listener: it accepts, sniffs the first 8 bytes, and hands STUN
connections to ``StunService.serve_tcp_connection`` (the primary endpoint is listed in the STUN
config's ``external_tcp`` so that STUN does not bind it twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import ipaddress
import signal
import socket
import sys
from collections.abc import Mapping, Sequence

import click
from redis.exceptions import RedisError

from tcppunch.cli.params import EndpointType
from tcppunch.cli.secrets import (
    DEPRECATED_TOKEN,
    identity_option,
    load_identity,
    private_path,
    token_from,
    token_options,
)
from tcppunch.coordinator.auth import Tokens, TokensFileError
from tcppunch.coordinator.cluster import RedisCluster
from tcppunch.coordinator.expose import ExposeConfig, PortRange
from tcppunch.coordinator.metrics import MetricsEndpoint
from tcppunch.coordinator.protocol import CoordinatorConfig
from tcppunch.coordinator.server import MAX_CONNECTIONS, CoordinatorServer, StunHandler
from tcppunch.coordinator.stun_service import StunService, StunServiceConfig
from tcppunch.relay.limits import RelayLimits
from tcppunch.session.identity import Identity, IdentityError, read_authorized_keys
from tcppunch.wire.endpoint import Endpoint


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an IP address") from None


LIMITS_EPILOG = """\b
Limits (docs/protocol.md, "Limits", has them all):
  connections        --max-connections (4096; lowered to fit the fd limit, whose soft
                     value is raised at start); 64 unauthenticated per source address
                     (IPv4 address or IPv6 /64), 5 s to send REGISTER/RELAY
  authentication     10 failures (wrong token, bad relay proof) per source, then
                     1 more every 2 s; meanwhile 'throttled'
  control frames     64 KiB, each complete within 10 s of its first byte; a peer is
                     alive while it answers PING (15 s)
  sessions           64 per peer, 16 per requester and target (32 per requesting address)
  answers            PEERS <= 100 entries and <= 64 KiB (truncated: true); NAT reports
                     <= 16 KiB with bounded lists and strings
  relay              per source address and per token per hour: --relay-source-mb (512),
                     --relay-token-mb (4096); --relay-max-minutes (60) per relay;
                     300 s idle; 8 relays per peer id
  STUN over UDP      20 datagrams/s per source (burst 100); never answers more bytes
                     than the request carried (pad it: RFC 5780 PADDING)
  STUN over TCP      each message complete within 5 s; idle connections closed after 10 s;
                     64 connections per source
"""


def _mib(value: float) -> int | None:
    """MiB -> bytes; 0 means unlimited."""
    return None if value == 0 else int(value * (1 << 20))


@click.command("server", epilog=LIMITS_EPILOG)
@click.option(
    "--listen",
    "listens",
    type=EndpointType(default_port=None, resolve=False),
    required=True,
    multiple=True,
    help="Address and port (TCP and UDP), e.g. 198.51.100.10:3478. Give it twice, once per address family, "
    "to serve IPv4 and IPv6 (e.g. --listen [2001:db8::10]:3478; the first is the primary); [::]:PORT alone "
    "listens on both families.",
)
@click.option("--alt-address", "alt_addresses", multiple=True, metavar="ADDR",
              help="A second address of this host, one per --listen family. Without it `tcppunch detect` "
                   "cannot tell some NAT types apart (mapping, filtering and port allocation stay unknown).")
@click.option("--alt-port", type=click.IntRange(1, 65535), help="Second port. Default: the listen port + 1.")
@token_options
@click.option("--tokens-file", type=click.Path(dir_okay=False),
              help="JSON object of peer id -> secret (mode 0600); besides or instead of the shared token.")
@identity_option("server.key")
@click.option("--authorized-keys", type=click.Path(dir_okay=False),
              help="Lines 'ID KEY-ID' (mode 0600): these ids may register only with these keys. Any other id "
                   "belongs to the key that registers it first.")
@click.option("--relay-max-mb", type=click.FloatRange(0.001), help="Relay byte budget per peer id (MB). Default: none.")
@click.option("--expose-ports", metavar="LOW-HIGH",
              help="Let peers expose these ports of the listen address (`tcppunch expose`). Default: none.")
@click.option("--expose-max-ports", type=click.IntRange(1), default=4, show_default=True,
              help="Ports one peer id may expose at once.")
@click.option("--expose-max-connections", type=click.IntRange(1), default=64, show_default=True,
              help="Visitor connections one peer id may have at once (waiting or carried).")
@click.option("--expose-max-mb", type=click.FloatRange(0.001),
              help="Bytes one peer id's exposed ports may carry over the server's life (MB). Default: none.")
@click.option("--max-connections", type=click.IntRange(16), default=MAX_CONNECTIONS, show_default=True,
              help="Connections at once (control, relay, STUN over TCP); more are refused with server-busy.")
@click.option("--relay-source-mb", type=click.FloatRange(0), default=512, show_default=True,
              help="Relay bytes per source address per hour (MiB, both directions; 0: unlimited).")
@click.option("--relay-token-mb", type=click.FloatRange(0), default=4096, show_default=True,
              help="Relay bytes per token per hour (MiB; a shared token: the whole server; 0: unlimited).")
@click.option("--relay-max-minutes", type=click.FloatRange(0), default=60, show_default=True,
              help="Longest a single relay runs (0: unlimited).")
@click.option("--udp-change-request/--no-udp-change-request", default=True, show_default=True,
              help="Answer RFC 5780 / RFC 3489 CHANGE-REQUEST over UDP from the other address or port "
              "(the classic UDP NAT test of `detect` needs it). Answers never exceed their request.")
@click.option(
    "--connect-back-timeout",
    type=click.FloatRange(0.05, 10.0),
    default=0.4,
    show_default=True,
    help="How long the TCP filtering test waits for a connect-back to open.",
)
@click.option("--redis", "redis_url", envvar="TCPPUNCH_REDIS", metavar="redis://HOST:PORT/N",
              help="Share one registry with the other servers using this Redis (a cluster): ids are unique across "
                   "it and peers registered at different servers connect to each other. A password belongs in "
                   "the TCPPUNCH_REDIS environment variable, not on the command line. Default: this process alone.")
@click.option("--keepalive-interval", type=click.FloatRange(0.2, 300.0), default=5.0, show_default=True,
              help="Seconds between keepalive pings; a peer silent 3x this long is removed (and in a cluster "
                   "its id becomes free after that long when its server dies).")
@click.option("--metrics", "metrics_listen", type=EndpointType(default_port=None, resolve=False), metavar="ADDR:PORT",
              help="Serve Prometheus metrics over HTTP here (registered peers, rendezvous, outcomes by NAT type "
                   "pair, time to connect, relay bytes, refusals). Default: off.")
def server_command(
    listens: tuple[Endpoint, ...],
    alt_addresses: tuple[str, ...],
    alt_port: int | None,
    token_file: str | None,
    token_arg: str | None,
    tokens_file: str | None,
    identity_path: str | None,
    authorized_keys: str | None,
    connect_back_timeout: float,
    relay_max_mb: float | None,
    expose_ports: str | None,
    expose_max_ports: int,
    expose_max_connections: int,
    expose_max_mb: float | None,
    redis_url: str | None,
    keepalive_interval: float,
    max_connections: int,
    relay_source_mb: float,
    relay_token_mb: float,
    relay_max_minutes: float,
    udp_change_request: bool,
    metrics_listen: Endpoint | None,
) -> None:
    """Run the public server: the coordinator peers register with (it schedules their punches and relays
    when punching cannot work) and STUN over TCP and UDP on every address/port combination, so that one
    HOST:PORT serves both `tcppunch detect --server` and `tcppunch connect --coordinator`.

    Every client connection is TLS 1.3 to the server's key (printed at start: clients pin it with
    --coordinator-key, or trust it on first use). The shared token comes from env TCPPUNCH_TOKEN or
    --token-file.

    Stops cleanly on SIGTERM or SIGINT.
    """
    # The first stderr line stays "listening on ..." (scripts wait for it): warnings come after it.
    token = token_from(token_file, token_arg, required=tokens_file is None, warn=False)
    notes = [DEPRECATED_TOKEN] if token_arg is not None and token == token_arg else []
    configs = [dataclasses.replace(c, udp_change_request=udp_change_request)
               for c in stun_configs(listens, alt_addresses, alt_port, connect_back_timeout)]
    try:
        if tokens_file:
            private_path(tokens_file, "--tokens-file")
        tokens = Tokens.from_file(tokens_file, shared=token) if tokens_file else Tokens(shared=token)
        owners = read_authorized_keys(private_path(authorized_keys, "--authorized-keys")) if authorized_keys else None
    except (OSError, TokensFileError, ValueError, IdentityError) as exc:
        raise click.UsageError(f"tokens: {exc}") from exc
    identity = load_identity(identity_path, "server.key")
    budget = None if relay_max_mb is None else int(relay_max_mb * 1_000_000)
    expose = None
    if expose_ports is not None:
        try:
            ports = PortRange.parse(expose_ports)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--expose-ports") from None
        expose = ExposeConfig(ports, max_ports_per_id=expose_max_ports, max_connections_per_id=expose_max_connections,
                              max_bytes_per_id=None if expose_max_mb is None else int(expose_max_mb * 1_000_000))
    try:
        relay_limits = RelayLimits(max_bytes_per_source=_mib(relay_source_mb),
                                   max_bytes_per_token=_mib(relay_token_mb),
                                   max_duration=None if relay_max_minutes == 0 else relay_max_minutes * 60)
        config = CoordinatorConfig(expose=expose, keepalive_interval=keepalive_interval, relay_limits=relay_limits,
                                   stale_after=1.5 * keepalive_interval, keepalive_timeout=3.0 * keepalive_interval)
        tune_gc()
        asyncio.run(serve(configs, tokens, budget, config, redis_url, metrics_listen,
                          max_connections=max_connections, identity=identity, authorized_keys=owners,
                          notes=notes))
    except RedisError as exc:
        click.echo(f"tcppunch server: cannot use the Redis of --redis: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"tcppunch server: cannot listen: {exc.strerror or exc}", err=True)
        sys.exit(1)


def _family(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def stun_configs(listens: Sequence[Endpoint], alt_addresses: Sequence[str], alt_port: int | None,
                 connect_back_timeout: float = 0.4) -> list[StunServiceConfig]:
    """One STUN service configuration per listen address (at most one per address family; ``[::]``
    alone means both families), each with the --alt-address of its family; UsageError when they do not fit."""
    if len(listens) == 1 and listens[0].ip == "::":
        listens = [Endpoint("0.0.0.0", listens[0].port), listens[0]]
    if len({_family(e.ip) for e in listens}) != len(listens):
        raise click.UsageError("give at most one --listen per address family (one IPv4, one IPv6)")
    alternates = [_ip(a) for a in alt_addresses]
    if len({_family(a) for a in alternates}) != len(alternates):
        raise click.UsageError("give at most one --alt-address per address family")
    families = {_family(e.ip) for e in listens}
    if any(_family(a) not in families for a in alternates):
        raise click.UsageError("each --alt-address needs a --listen address of the same family")
    configs = []
    for listen in listens:
        alternate = next((a for a in alternates if _family(a) == _family(listen.ip)), None)
        if alternate is not None and ipaddress.ip_address(listen.ip).is_unspecified:
            raise click.UsageError("with --alt-address, --listen must be a specific address, not a wildcard")
        if alternate is not None and alternate == listen.ip:
            raise click.UsageError("--alt-address must differ from the --listen address")
        port2 = listen.port + 1 if alt_port is None else alt_port
        if port2 == listen.port or port2 > 65535:
            raise click.UsageError("the second port must differ from the listen port (and be at most 65535)")
        configs.append(StunServiceConfig(
            primary_address=listen.ip,
            primary_port=listen.port,
            alternate_address=alternate,
            alternate_port=port2,
            connect_back_timeout=connect_back_timeout,
            external_tcp=frozenset({Endpoint(listen.ip, listen.port)}),
        ))
    return configs


def _by_family(handlers: dict[int, StunHandler]) -> StunHandler:
    """One STUN-over-TCP handler for the coordinator's listeners: the service of the connection's family."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, prefix: bytes) -> None:
        family = 6 if writer.get_extra_info("socket").family == socket.AF_INET6 else 4
        await handlers[family](reader, writer, prefix)

    return handle


# A server holds tens of objects per connected peer for as long as the peer stays: with the default
# thresholds (700, 10, 10) the collector walks that whole heap again and again (full collections of
# 200-450 ms at 20,000 peers, each one a stall for every peer). Young generations collected 70x less
# often keep cyclic garbage bounded all the same; measured in docs/benchmarks.md.
GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """The server's garbage collector settings (a process-wide choice: the CLI's, never the library's)."""
    gc.freeze()  # what start-up allocated (modules, the CLI) is never garbage: out of every collection
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(configs: Sequence[StunServiceConfig], tokens: Tokens, relay_bytes_per_peer: int | None = None,
                coordinator_config: CoordinatorConfig | None = None, redis_url: str | None = None,
                metrics_listen: Endpoint | None = None, *, max_connections: int = MAX_CONNECTIONS,
                identity: Identity | None = None, authorized_keys: Mapping[str, frozenset[str]] | None = None,
                notes: Sequence[str] = ()) -> None:
    """Run until SIGTERM/SIGINT: STUN on every configuration, the coordinator on every primary endpoint."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    cfg = coordinator_config or CoordinatorConfig()
    cluster = None if redis_url is None else RedisCluster(
        redis_url, ttl=cfg.keepalive_timeout, refresh_interval=cfg.keepalive_interval
    )
    async with contextlib.AsyncExitStack() as stack:
        stuns = [await stack.enter_async_context(StunService(config)) for config in configs]
        first = configs[0]
        coordinator = await stack.enter_async_context(
            CoordinatorServer(first.primary_address, first.primary_port, tokens,
                              stun_handler=_by_family({_family(c.primary_address): s.serve_tcp_connection
                                                       for c, s in zip(configs, stuns, strict=True)}),
                              relay_bytes_per_peer=relay_bytes_per_peer, config=coordinator_config,
                              max_connections=max_connections,
                              also=[Endpoint(c.primary_address, c.primary_port) for c in configs[1:]],
                              cluster=cluster, identity=identity, authorized_keys=authorized_keys)
        )
        for stun in stuns:
            stun.on_binding = coordinator.stun_seen  # OBSERVED may name ports STUN saw
        endpoints = ", ".join(str(e) for e in [*coordinator.addresses, *(e for s in stuns for e in s.tcp_endpoints)])
        coordinators = ", ".join(str(e) for e in coordinator.addresses)
        clustered = "" if cluster is None else f"; cluster node {cluster.node}"
        if metrics_listen is not None:
            metrics = await stack.enter_async_context(MetricsEndpoint(metrics_listen, coordinator))
            clustered += f"; metrics on http://{metrics.address}/metrics"
        print(f"listening on {endpoints} (coordinator on {coordinators}; STUN over TCP and UDP{clustered})",
              file=sys.stderr, flush=True)
        print(f"coordinator key {coordinator.identity.fingerprint} (clients pin it with --coordinator-key)",
              *notes, sep="\n", file=sys.stderr, flush=True)
        await stop.wait()
