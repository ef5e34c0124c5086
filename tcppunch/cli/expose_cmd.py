"""``tcppunch expose``: make a local TCP service reachable by anyone at a port of the server's address.

One line on stderr once the port is open ("exposed ... at HOST:PORT"; scripts wait for it), one per
finished visitor unless ``--quiet``, and a clear error and exit code 1 when the server refuses. When the
coordinator goes away later, a line says so and the port is asked for again with back-off.
"""

from __future__ import annotations

import asyncio
import json

import click

from tcppunch.cli.params import COORDINATOR_HELP, CoordinatorType, EndpointType
from tcppunch.cli.running import run_command, until_signal
from tcppunch.cli.secrets import identity_option, key_id, load_identity, token_from, token_options
from tcppunch.coordinator.control import ControlChannel
from tcppunch.peer.coordinators import CoordinatorName, Coordinators
from tcppunch.peer.expose import VisitorDone, keep_exposed, registered_channel
from tcppunch.session.identity import KnownPeers, TrustPolicy
from tcppunch.wire.coord import Exposed
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.proxy_protocol import ProxyVersion


@click.command("expose")
@click.option("--coordinator", type=CoordinatorType(), required=True, multiple=True,
              help="The tcppunch server, HOST:PORT (port 3478 if omitted); it must allow --remote-port. Repeat it "
                   "for the servers of a cluster: we expose at the first that answers. " + COORDINATOR_HELP)
@click.option("--id", "peer_id", required=True, help="Our name at the coordinator.")
@token_options
@identity_option("identity.key")
@click.option("--coordinator-key", metavar="KEY-ID",
              help="The coordinator's key (printed by `tcppunch server`); else trusted on first use.")
@click.option("--known-peers", type=click.Path(dir_okay=False),
              help="Keys seen before (trust on first use). Default: $XDG_CONFIG_HOME/tcppunch/known_peers.")
@click.option("--remote-port", type=click.IntRange(1, 65535), required=True,
              help="The port of the server's address that visitors connect to (within its --expose-ports).")
@click.option("--forward", type=EndpointType(default_port=None, resolve=False), required=True,
              help="The local TCP service each visitor is carried to, e.g. 127.0.0.1:8000.")
@click.option("--proxy-protocol", type=click.Choice([v.value for v in ProxyVersion]),
              help="Send a PROXY protocol header (v1 text, v2 binary) to the service before the visitor's "
                   "bytes, so it learns the visitor's address. The service must expect it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per event on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
def expose_command(coordinator: tuple[CoordinatorName, ...], peer_id: str, token_file: str | None,
                   token_arg: str | None, identity_path: str | None, coordinator_key: str | None,
                   known_peers: str | None, remote_port: int, forward: Endpoint, proxy_protocol: str | None,
                   as_json: bool, quiet: bool) -> None:
    """Expose the local service --forward at --remote-port of the server, for any TCP client (curl, a
    browser, a webhook), like frp's tcp proxy. Runs until interrupted; the port closes when it stops.

    The server sees the visitors' bytes: serve TLS from the local service if they are private.

    \b
    TCPPUNCH_TOKEN=S tcppunch server --listen 198.51.100.10:3478 --expose-ports 8000-9000   # public host
    TCPPUNCH_TOKEN=S tcppunch expose --coordinator 198.51.100.10:3478 --id web \\
                    --remote-port 8080 --forward 127.0.0.1:8000                     # behind NAT
    curl http://198.51.100.10:8080/                                                 # anyone
    """
    version = None if proxy_protocol is None else ProxyVersion(proxy_protocol)
    token = token_from(token_file, token_arg)
    assert token is not None
    identity = load_identity(identity_path)
    pin = key_id(coordinator_key, "--coordinator-key")
    trust = TrustPolicy(known=KnownPeers(known_peers) if known_peers else KnownPeers.default())

    coordinators = Coordinators(coordinator)
    started = False

    def channel_for(where: Endpoint) -> ControlChannel:
        """The control connection: TLS with our key, the coordinator's key pinned or known (per name)."""
        scope = coordinators.trust_scope(where)
        return ControlChannel(where, peer_id, token, identity=identity,
                              verify_coordinator=lambda key: trust.check_coordinator(scope, key, pin))

    async def channel() -> ControlChannel:
        nonlocal started
        strict, started = not started, True  # a name without an address is an error at start only
        return await registered_channel(coordinators, channel_for, strict=strict)

    def report(done: VisitorDone) -> None:
        if as_json:
            stats = done.stats
            click.echo(json.dumps({"event": "visitor", "visitor": str(done.visitor), "error": done.error,
                                   "to_service": None if stats is None else stats.a_to_b,
                                   "to_visitor": None if stats is None else stats.b_to_a}))
        if not quiet:
            what = done.error or (f"{done.stats.a_to_b} bytes to the service, {done.stats.b_to_a} to the visitor"
                                  if done.stats else "")
            click.echo(f"tcppunch: visitor {done.visitor}: {what}", err=True)

    def exposed(where: Exposed) -> None:
        if as_json:
            click.echo(json.dumps({"event": "exposed", "address": str(where.address), "forward": str(forward)}))
        click.echo(f"tcppunch: exposed {forward} at {where.address}", err=True)

    def lost(reason: str, retry_in: float) -> None:
        if as_json:
            click.echo(json.dumps({"event": "lost", "reason": reason, "retry_in": retry_in}))
        click.echo(f"tcppunch: lost the coordinator ({reason}); exposing again in {retry_in:g} s", err=True)

    async def main() -> None:
        work = keep_exposed(channel, remote_port, forward,
                            proxy_protocol=version, on_exposed=exposed, on_lost=lost, on_done=report)
        await until_signal(asyncio.ensure_future(work))

    run_command(main)
