"""The ``tcppunch`` click group. Each sub-command lives in its own module and is added below."""

from __future__ import annotations

import click

from tcppunch import __version__
from tcppunch.cli.logging import LEVELS, configure_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tcppunch")
@click.option(
    "--log-level",
    type=click.Choice(LEVELS),
    default="warning",
    show_default=True,
    help="How much to log on stderr.",
)
@click.option("--log-json", is_flag=True, help="Log JSON lines on stderr instead of console text.")
def main(log_level: str, log_json: bool) -> None:
    """Open direct TCP connections between hosts behind NAT routers (TCP hole punching).

    \b
    Typical use:
      tcppunch server --listen 0.0.0.0:3478 --token SECRET      # on a public host
      tcppunch detect --server HOST:3478                         # what NAT am I behind?
      tcppunch listen --coordinator HOST:3478 --id bob --token SECRET
      tcppunch connect bob --coordinator HOST:3478 --id alice --token SECRET
    Try it all without a network: tcppunch lab --help
    """
    configure_logging(log_level, log_json)


def _register_commands() -> None:
    """Attach each sub-command; one module per command keeps this file small."""
    from tcppunch.cli import detect_cmd, lab_cmd, peer_cmds, server_cmd

    main.add_command(lab_cmd.lab)
    main.add_command(detect_cmd.detect_command)
    main.add_command(server_cmd.server_command)
    main.add_command(peer_cmds.connect_command)
    main.add_command(peer_cmds.listen_command)


_register_commands()
