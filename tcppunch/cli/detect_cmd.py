"""``tcppunch detect``: what NAT is this host behind, and what does that mean for direct TCP?"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap

import click

from tcppunch.cli.params import EndpointType
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import NatReport, PortAllocation, TcpBehaviour

EXIT_UNREACHABLE = 3


@click.command("detect")
@click.option("--server", type=EndpointType(),
              help="A tcppunch server (all tests; all answers need one started with --alt-address). Port "
                   "defaults to 3478.")
@click.option(
    "--stun",
    "stun",
    type=EndpointType(),
    multiple=True,
    help="A plain STUN server (mapping only; RFC 5780 servers such as coturn give more). Repeatable.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 60.0),
    default=3.0,
    show_default=True,
    help="Bound on each network step, in seconds (a healthy run takes well under a second).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the NatReport) instead of a table.")
@click.option("--no-udp", is_flag=True, help="Skip the classic UDP label (pystun3).")
@click.option("--ipv6-server", type=EndpointType(),
              help="The server's IPv6 endpoint, e.g. [2001:db8::10]:3478: check that TCP over IPv6 works and is "
                   "not translated (reported as 'ipv6'). Default: the --server itself when it is an IPv6 one.")
@click.option("--port-mapping", is_flag=True,
              help="Also ask the default gateway whether it maps ports (PCP, NAT-PMP, UPnP-IGD, 250 ms) and "
                   "request a test mapping of a free port, deleted again (reported as 'port_mapping'). Off by "
                   "default: it talks to the router and briefly opens a port on it.")
def detect_command(
    server: Endpoint | None, stun: tuple[Endpoint, ...], timeout: float, as_json: bool, no_udp: bool,
    ipv6_server: Endpoint | None, port_mapping: bool,
) -> None:
    """Measure the NAT in front of this host over TCP and say what it means for direct connections.

    What the server's setup or the evidence cannot tell is listed as "not measured" with the reason
    ("untested" in --json), never guessed.

    \b
    tcppunch detect --server 198.51.100.10:3478
    Exit status: 0 measured, 2 usage error, 3 server unreachable.
    """
    if server is None and not stun:
        raise click.UsageError("give --server HOST:PORT (a tcppunch server) or --stun HOST:PORT")
    from tcppunch.nat.detect import ServerUnreachable, detect  # here: other commands start faster

    try:
        report = asyncio.run(detect(server, stun, timeout=timeout, udp=not no_udp, ipv6_server=ipv6_server))
    except ServerUnreachable as exc:
        click.echo(f"tcppunch detect: server unreachable: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    if port_mapping:
        from tcppunch.portmap.client import check_gateway

        public = None if report.public is None else report.public.ip
        report = report.replace(port_mapping=asyncio.run(check_gateway(public)))
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        click.echo(render_table(report, server or stun[0]))


def _text(value: object) -> str:
    if value is None:
        return "not measured"
    if value is True:
        return "yes"
    if value is False:
        return "no"
    return str(value)


def _ipv6_text(report: NatReport) -> str:
    six = report.ipv6
    if six is None:
        return "not measured"
    works = {True: "works", False: "does not work", None: "not tested"}[six.works]
    return f"{works} ({six.address or 'no global address'}): {six.detail}"


def _port_mapping_text(report: NatReport) -> str:
    support = report.port_mapping
    if support is None:
        return "not measured (--port-mapping)"
    heard = ", ".join(p.value for p in support.protocols) or "no protocol"
    if support.mapping is not None:
        m = support.mapping
        return f"{heard} answered; {m.protocol.value} mapped {m.external} -> port {m.internal_port} (deleted again)"
    return f"{heard} answered; no mapping: {support.error}" if support.protocols else f"none: {support.error}"


def _delta_text(tcp: TcpBehaviour) -> str:
    if tcp.port_delta is not None:
        return str(tcp.port_delta)
    if tcp.port_allocation is PortAllocation.UNKNOWN:
        return "unknown (too few new ports to tell a step from random)"
    return "random" if tcp.port_allocation is PortAllocation.RANDOM or tcp.mapping is not None else "not measured"


def render_table(report: NatReport, server: Endpoint) -> str:
    """The human output: a short table, what was not measured, and the verdict."""
    tcp = report.tcp
    rows = [
        ("TCP mapping", _text(tcp.mapping)),
        ("TCP filtering", _text(tcp.filtering)),
        ("port preservation", _text(tcp.port_preservation)),
        ("port delta", _delta_text(tcp)),
        ("unsolicited SYN", _text(tcp.unsolicited_syn)),
        ("hairpin", _text(tcp.hairpin)),
        ("public endpoint", _text(report.public)),
        ("behind NAT", _text(report.behind_nat)),
        ("local addresses", ", ".join(report.local) or "none"),
        ("UDP (classic)", _text(report.udp_nat_type)),
        ("IPv6", _ipv6_text(report)),
        ("port mapping", _port_mapping_text(report)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"NAT behaviour measured against {server}"]
    lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
    for item in report.untested:
        lines.append(textwrap.fill(f"not measured: {item}", 100, initial_indent="  ", subsequent_indent="    "))
    lines.append("")
    lines.append(textwrap.fill(report.verdict, 100))
    return "\n".join(lines)
