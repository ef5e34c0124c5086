"""``tcppunch lab``: build, inspect, use and remove NAT laboratories from the shell."""

from __future__ import annotations

import json
import os
import sys

import click

from tcppunch.lab import Lab, LabError, LabSpec, LinkShape, NatType, RouterSpec, running_labs
from tcppunch.lab.lab import remove_namespaces
from tcppunch.lab.probe import probe_all

_TYPES = ", ".join(t.value for t in NatType)


@click.group()
def lab() -> None:
    """A NAT laboratory: real Linux NAT routers (nftables) in network namespaces.

    Everything lives in namespaces named tpXXXXXX-*; nothing touches this machine's own network.
    Needs root. See docs/lab.md.
    """


@lab.command("up")
@click.option("--router", "routers", multiple=True, metavar="NAME=TYPE[+upnp][:drop|rst][xHOSTS]",
              help=f"A NAT router and its hosts, e.g. a=port-restricted:rst or b=cgnat x2. Types: {_TYPES}. "
                   "+upnp: the router runs miniupnpd (UPnP-IGD, NAT-PMP, PCP), e.g. c=symmetric-random+upnp. "
                   "Repeat for more. Default: one router of each type.")
@click.option("--delay-ms", type=float, default=0.0, show_default=True, help="One-way delay on every WAN link.")
@click.option("--jitter-ms", type=float, default=0.0, show_default=True, help="± jitter on every WAN link.")
@click.option("--loss", type=float, default=0.0, show_default=True, help="Loss fraction (0-1) on every WAN link.")
@click.option("--ipv6", is_flag=True,
              help="IPv6 too (2001:db8::/32, no NAT66): routers are RFC 6092 stateful firewalls for it, with "
                   "the router's SYN policy; IPv4 NAT types stay as they are. See docs/lab.md.")
@click.option("--probe", is_flag=True, help="Measure each host's mapping and filtering and show it.")
@click.option("--json", "as_json", is_flag=True, help="Print the lab description as JSON.")
def up(routers: tuple[str, ...], delay_ms: float, jitter_ms: float, loss: float, ipv6: bool, probe: bool,
       as_json: bool) -> None:
    """Build a lab and leave it running (remove it with `tcppunch lab down PREFIX`)."""
    try:
        link = LinkShape(delay_ms, jitter_ms, loss)
        specs = [RouterSpec.parse(r, link) for r in routers]
        spec = LabSpec(specs, ipv6=ipv6) if specs else LabSpec.every_type(link=link, ipv6=ipv6)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    the_lab = Lab(spec)
    try:
        the_lab.up()
    except LabError as exc:
        raise click.ClickException(str(exc)) from exc
    the_lab.leave_running()
    desc = the_lab.describe()
    if as_json:
        click.echo(json.dumps(desc, indent=2))
    else:
        _print_table(desc)
    if probe:
        _print_probe(the_lab)
    click.echo(f"\nremove with: tcppunch lab down {the_lab.prefix}", err=True)


@lab.command("down")
@click.argument("prefix", required=False)
@click.option("--all", "everything", is_flag=True, help="Remove every lab on this machine.")
def down(prefix: str | None, everything: bool) -> None:
    """Stop every process in a lab's namespaces and delete them."""
    _need_root()
    if everything == (prefix is not None):
        raise click.UsageError("give a PREFIX or --all")
    targets = running_labs() if everything else [prefix or ""]
    for p in targets:
        try:
            Lab.attach(p).down()
        except LabError:
            remove_namespaces(p)  # no state file: still remove what carries its name
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
        click.echo(f"removed {p}")


@lab.command("status")
@click.argument("prefix", required=False)
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
def status(prefix: str | None, as_json: bool) -> None:
    """List running labs, or describe one."""
    if prefix is None:
        labs = running_labs()
        click.echo(json.dumps(labs) if as_json else ("\n".join(labs) or "no labs running"))
        return
    try:
        desc = Lab.attach(prefix).describe()
    except (LabError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(desc, indent=2)) if as_json else _print_table(desc)


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("prefix")
@click.argument("host")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(prefix: str, host: str, argv: tuple[str, ...]) -> None:
    """Run a command on a lab host: tcppunch lab exec PREFIX HOST -- CMD ARGS...

    HOST is a host name from `tcppunch lab status PREFIX` (e.g. a1) or `srv` for the server.
    """
    try:
        the_lab = Lab.attach(prefix)
    except (LabError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    target = the_lab.server if host == "srv" else the_lab.hosts.get(host)
    if target is None:
        raise click.BadParameter(f"no host {host!r}; hosts: srv, {', '.join(the_lab.hosts)}")
    argv_list = list(argv[1:] if argv and argv[0] == "--" else argv)
    sys.stdout.flush()
    os.execvp(target.command(argv_list)[0], target.command(argv_list))


def _need_root() -> None:
    if os.geteuid() != 0:
        raise click.ClickException("the NAT lab needs root")


def _print_table(desc: dict[str, object]) -> None:
    click.echo(f"lab {desc['prefix']}: server {', '.join(desc['server']['addresses'])}")  # type: ignore[index]
    v6 = bool(desc.get("ipv6"))
    col6 = f"{'ipv6':<19}" if v6 else ""
    click.echo(f"{'host':<8}{'address':<17}{'public':<17}{col6}{'nat':<18}{'syn':<6}namespace")
    for h in desc["hosts"]:  # type: ignore[attr-defined]
        addr6 = f"{h.get('address6') or '-':<19}" if v6 else ""
        click.echo(f"{h['name']:<8}{h['address']:<17}{h['public']:<17}{addr6}{h['nat']:<18}{h['syn_policy']:<6}"
                   f"{h['netns']}")


def _print_probe(the_lab: Lab) -> None:
    results = probe_all(the_lab)
    click.echo(f"\n{'host':<8}{'mapping':<28}{'filtering':<28}{'preserve':<10}{'delta':<7}{'unsol. SYN':<11}hairpin")
    for name, r in results.items():
        delta = "random" if r.port_delta is None else str(r.port_delta)
        click.echo(f"{name:<8}{r.mapping.value:<28}{r.filtering.value:<28}{r.port_preservation!s:<10}"
                   f"{delta:<7}{r.unsolicited_syn.value:<11}{r.hairpin}")
