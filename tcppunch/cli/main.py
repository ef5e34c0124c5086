"""The ``tcppunch`` click group. Each sub-command lives in its own module, imported only when it runs
(``tcppunch detect`` does not pay for the coordinator, the relay and the lab at start-up)."""

from __future__ import annotations

import importlib

import click

from tcppunch import __version__
from tcppunch.cli.logging import LEVELS, configure_logging

# command name -> (module, attribute)
COMMANDS: dict[str, tuple[str, str]] = {
    "connect": ("tcppunch.cli.peer_cmds", "connect_command"),
    "detect": ("tcppunch.cli.detect_cmd", "detect_command"),
    "id": ("tcppunch.cli.id_cmd", "id_command"),
    "expose": ("tcppunch.cli.expose_cmd", "expose_command"),
    "lab": ("tcppunch.cli.lab_cmd", "lab"),
    "listen": ("tcppunch.cli.peer_cmds", "listen_command"),
    "server": ("tcppunch.cli.server_cmd", "server_command"),
    "vpn": ("tcppunch.cli.vpn_cmd", "vpn_command"),
}


class LazyGroup(click.Group):
    """A group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attribute = COMMANDS[cmd_name]
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    Typical use (every connection is TLS 1.3 between Ed25519 keys; docs/security.md):
      export TCPPUNCH_TOKEN=SECRET                               # or --token-file FILE (mode 0600)
      tcppunch server --listen 0.0.0.0:3478                      # on a public host; prints its key
      tcppunch detect --server HOST:3478                         # what NAT am I behind?
      tcppunch id                                                # our key id, for peers to pin
      tcppunch listen --coordinator HOST:3478 --id bob
      tcppunch connect bob --coordinator HOST:3478 --id alice --peer-key BOBS-KEY-ID
    Try it all without a network: tcppunch lab --help
    """
    configure_logging(log_level, log_json)
