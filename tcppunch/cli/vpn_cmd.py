"""``tcppunch vpn``: a TUN interface whose packets go to one other peer over the pair's session.

Progress on stderr: "vpn up: ..." when the interface carries packets, "vpn down: <why>" when the session
died (the interface is down until it comes back). Needs root (TUN device, addresses, routes).
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import click

from tcppunch.cli.peer_options import peer_from_options, peer_options, write_report
from tcppunch.cli.running import run_command, until_signal
from tcppunch.cli.secrets import key_id
from tcppunch.vpn.iface import InterfaceError
from tcppunch.vpn.tun import Tun, TunError
from tcppunch.vpn.tunnel import Address, Network, Tunnel, TunnelState


def _interface(value: str) -> Address:
    try:
        address = ipaddress.ip_interface(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an address with a prefix, like 10.99.0.1/24") from None
    if address.network.prefixlen == address.max_prefixlen:
        raise click.BadParameter(f"{value}: give the VPN subnet's prefix (e.g. /24), so the other side is on-link")
    return address


def _network(value: str) -> Network:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise click.BadParameter(f"--route {value}: {exc}") from None


@click.command("vpn")
@peer_options
@click.option("--peer", "other", required=True, help="The other peer's id (it runs `tcppunch vpn --peer <our id>`).")
@click.option("--peer-key", metavar="KEY-ID",
              help="The other peer's key (`tcppunch id` on its host): only it may join the VPN. Without it, "
                   "its key is trusted on first use (known-peers).")
@click.option("--address", required=True, help="Our address on the VPN with its prefix, e.g. 10.99.0.1/24.")
@click.option("--route", "routes", multiple=True, metavar="CIDR",
              help="A network behind the other peer to route through the VPN (repeatable), e.g. 192.168.1.0/24.")
@click.option("--interface", "name", default="tcppunch0", show_default=True, help="Name of the TUN interface.")
@click.option("--mtu", type=click.IntRange(576, 9000), default=1400, show_default=True,
              help="MTU of the interface (room for the outer TCP/IP and framing below 1500).")
def vpn_command(other: str, address: str, routes: tuple[str, ...], name: str, mtu: int, peer_key: str | None,
                **common: Any) -> None:
    """Join a two-peer VPN: any program reaches the other side at its VPN address (ping, ssh, a database
    client). Packets ride one stream of the pair's session: direct when a hole can be punched, relayed
    otherwise, and exactly as private as that session (see docs/vpn.md).

    \b
    tcppunch vpn --coordinator 198.51.100.10:3478 --id alice --peer bob --address 10.99.0.1/24
    tcppunch vpn --coordinator 198.51.100.10:3478 --id bob --peer alice --address 10.99.0.2/24
    (token in TCPPUNCH_TOKEN; root needed for the TUN interface)
    """
    # The options shared with connect/listen go to the Peer as they are (see peer_options).
    report_path: str | None = common.pop("report_path")
    quiet: bool = common["quiet"]
    peer_id: str = common["peer_id"]
    ours = _interface(address)
    networks = [_network(r) for r in routes]
    if other == peer_id:
        raise click.BadParameter("--peer must be another id than --id")
    pin = key_id(peer_key, "--peer-key")
    # With a pin, the session with the other peer must hold that key and nobody else's session is taken.
    trust: dict[str, Any] = {} if pin is None else {"peer_keys": {other: pin}, "allow": [pin]}

    def show(state: TunnelState) -> None:
        if quiet:
            return
        if state.up:
            click.echo(f"tcppunch: vpn up: {name} {ours} <-> {other} ({state.path or 'session'})", err=True)
        else:
            counts = state.stats
            click.echo(f"tcppunch: vpn down: {name}: {state.last_reason} (so far {counts.sent} packets out, "
                       f"{counts.received} in, {counts.dropped} dropped)", err=True)

    async def main() -> None:
        try:
            tun = Tun(name)
        except TunError as exc:
            raise click.ClickException(str(exc)) from None
        with tun:
            async with peer_from_options(**common, **trust) as peer:
                def changed(state: TunnelState) -> None:
                    show(state)
                    if state.up and report_path:
                        entry = next((s for s in peer.sessions() if s.peer == other), None)
                        if entry is not None:
                            write_report(report_path, peer, entry)

                tunnel = Tunnel(peer, other, tun, ours, routes=networks, mtu=mtu, on_change=changed)
                if not quiet:
                    click.echo(f"tcppunch: vpn {name} {ours}: waiting for {other} "
                               f"({'opening' if tunnel.opener else 'accepting'} the stream)", err=True)
                try:
                    await until_signal(asyncio.ensure_future(tunnel.run()))
                except InterfaceError as exc:
                    raise click.ClickException(f"cannot set up {name}: {exc}") from None

    run_command(main)

