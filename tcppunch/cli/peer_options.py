"""The options every peer command (connect, listen, vpn) shares, the Peer they describe, and its --report.

One place, so that a new peer option reaches all three commands and means the same in each.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from tcppunch.cli.params import COORDINATOR_HELP, CoordinatorType
from tcppunch.cli.secrets import identity_option, key_id, load_identity, token_from, token_options
from tcppunch.peer import Connection, Peer, RelayMode
from tcppunch.peer.coordinators import CoordinatorName
from tcppunch.peer.sessions import PeerSession
from tcppunch.punch.birthday import DEFAULT_LIMITS
from tcppunch.session.identity import IdentityError
from tcppunch.wire.natreport import NatReport


def peer_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: the options shared by connect, listen and vpn (they reach :func:`peer_from_options`)."""
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option("--coordinator", type=CoordinatorType(), required=True, multiple=True,
                     help="The tcppunch server, HOST:PORT (port 3478 if omitted). Repeat it for the servers of a "
                          "cluster: we register at the first that answers and move to the next if it fails. "
                          + COORDINATOR_HELP),
        click.option("--id", "peer_id", required=True, help="Our name at the coordinator."),
        token_options,
        identity_option("identity.key"),
        click.option("--known-peers", type=click.Path(dir_okay=False),
                     help="Keys seen before, trusted on first use (like SSH's known_hosts). "
                          "Default: $XDG_CONFIG_HOME/tcppunch/known_peers."),
        click.option("--coordinator-key", metavar="KEY-ID",
                     help="The coordinator's key (printed by `tcppunch server`); else trusted on first use."),
        click.option("--trust-coordinator", is_flag=True,
                     help="A peer met for the first time must hold the key the coordinator bound to its id "
                          "(the coordinator's word; a pin or a known key is always checked first)."),
        click.option("--relay", type=click.Choice([m.value for m in RelayMode]), default=RelayMode.AUTO.value,
                     show_default=True, help="auto: punch, relay if that fails; never: punch only; always: relay."),
        click.option("--port", type=click.IntRange(0, 65535), default=0,
                     help="Local port to punch from (default: any free port)."),
        click.option("--nat-report", type=click.Path(exists=True, dir_okay=False),
                     help="Use this `tcppunch detect --json` output instead of measuring at start."),
        click.option("--no-detect", is_flag=True, help="Do not measure the NAT at start (peers then cannot "
                     "predict ports, and the relay is used only after a failed punch)."),
        click.option("--no-birthday", is_flag=True, help="Never spray SYNs for birthday punching (random-"
                     "port NAT facing a port-filtering one): such connections use the relay instead."),
        click.option("--no-ipv6", is_flag=True, help="Do not announce or race this host's global IPv6 address "
                     "(by default it is raced first, Happy-Eyeballs style: IPv6 has no NAT)."),
        click.option("--port-mapping", is_flag=True, help="Ask the router to map the punch port (PCP, NAT-PMP, "
                     "UPnP-IGD) so peers can connect in whatever the NATs do; renewed while running, deleted on "
                     "exit. Off by default: it opens a port on the router."),
        click.option("--report", "report_path", type=click.Path(dir_okay=False),
                     help="Write a JSON report (method, addresses, attempts, timings) to this file."),
        click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _progress(quiet: bool) -> Callable[[str, dict[str, Any]], None] | None:
    if quiet:
        return None

    def show(stage: str, data: dict[str, Any]) -> None:
        if stage in ("direct", "relayed"):
            total = data.get("timings", {}).get("total")
            extra = f" in {total * 1000:.0f} ms" if isinstance(total, float) else ""
            line = f"{stage}: {data.get('local')} <-> {data.get('remote')} with {data.get('peer')}{extra}"
            if data.get("relay_reason"):
                line += f" ({data['relay_reason']})"
        else:
            line = f"{stage}: " + " ".join(f"{k}={v}" for k, v in data.items())
        click.echo(f"tcppunch: {line}", err=True)

    return show


def peer_from_options(*, coordinator: Sequence[CoordinatorName], peer_id: str, token_file: str | None,
          token_arg: str | None, identity_path: str | None, known_peers: str | None, coordinator_key: str | None,
          trust_coordinator: bool, relay: str, port: int, nat_report: str | None, no_detect: bool,
          no_birthday: bool, quiet: bool, port_mapping: bool = False, no_ipv6: bool = False, **trust: Any) -> Peer:
    """A Peer from the options every peer command shares; ``trust``: peer_keys / allow for this command."""
    token = token_from(token_file, token_arg)
    assert token is not None
    nat = None
    if nat_report:
        try:
            nat = NatReport.from_json(json.loads(Path(nat_report).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise click.BadParameter(f"cannot read NAT report {nat_report}: {exc}") from exc
    try:
        return Peer(coordinator, peer_id, token, port=port, nat=nat, detect_nat=not no_detect,
                    relay=RelayMode(relay), on_stage=_progress(quiet),
                    birthday=None if no_birthday else DEFAULT_LIMITS, port_mapping=port_mapping, ipv6=not no_ipv6,
                    identity=load_identity(identity_path),
                    known_peers=known_peers or "default", trust_coordinator=trust_coordinator,
                    coordinator_key=key_id(coordinator_key, "--coordinator-key"), **trust)
    except IdentityError as exc:
        raise click.ClickException(str(exc)) from None


def write_report(path: str | None, peer: Peer, conn: Connection | PeerSession) -> None:
    """The --report JSON; for a session ``method`` is where it runs now and ``history`` how it got there."""
    if not path:
        return
    report = conn.to_json() if isinstance(conn, PeerSession) else conn.info.to_json()
    report["timings"] = {**{k: round(v, 6) for k, v in peer.timings.items()}, **report["timings"]}
    report["self"] = {"id": peer.peer_id, "observed": str(peer.observed), "local": str(peer.local),
                      "ipv6": None if peer.local6 is None else str(peer.local6),
                      "nat": None if peer.nat is None else peer.nat.to_json(),
                      "coordinator": str(peer.coordinator), "register_attempts": peer.register_attempts}
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
