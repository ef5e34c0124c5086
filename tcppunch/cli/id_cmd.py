"""``tcppunch id``: this host's public identity, the key id other peers pin (``--peer-key``, ``--allow``)."""

from __future__ import annotations

import json

import click

from tcppunch.cli.secrets import identity_option, load_identity


@click.command("id")
@identity_option("identity.key")
@click.option("--server", "server_key", is_flag=True, help="The server's identity (server.key), not a peer's.")
@click.option("--json", "as_json", is_flag=True, help="Print {\"id\": ..., \"file\": ...} instead.")
def id_command(identity_path: str | None, server_key: bool, as_json: bool) -> None:
    """Print our key id (the fingerprint of our Ed25519 key), creating the key on first use.

    \b
    tcppunch id                      # give this to peers: connect --peer-key ID / listen --allow ID
    tcppunch id --server             # what `tcppunch server` prints, for --coordinator-key
    """
    identity = load_identity(identity_path, "server.key" if server_key else "identity.key")
    if as_json:
        click.echo(json.dumps({"id": identity.fingerprint, "file": str(identity.path)}))
    else:
        click.echo(identity.fingerprint)
