"""Secrets and keys on the command line: tokens from the environment or a file (never a visible argument),
identity key files, and the errors both can raise, for every command that needs them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tcppunch.session.identity import (
    Identity,
    IdentityError,
    check_private,
    config_dir,
    parse_fingerprint,
    read_token,
)

TOKEN_ENV = "TCPPUNCH_TOKEN"


def token_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--token-file`` and the deprecated ``--token`` (the environment variable is read by :func:`token_from`)."""
    fn = click.option("--token", "token_arg", metavar="SECRET",
                      help=f"Deprecated: visible to every user in `ps`. Use env {TOKEN_ENV} or --token-file.")(fn)
    return click.option("--token-file", type=click.Path(dir_okay=False),
                        help=f"File holding the shared secret (mode 0600). Default: env {TOKEN_ENV}.")(fn)


DEPRECATED_TOKEN = (f"tcppunch: warning: --token is deprecated (other users see it in `ps`); set {TOKEN_ENV} "
                    "or use --token-file")


def token_from(token_file: str | None, token_arg: str | None, *, required: bool = True,
               warn: bool = True) -> str | None:
    """The token: --token-file, else env TCPPUNCH_TOKEN, else the deprecated --token (with a warning on
    stderr, unless ``warn`` is false: then the caller prints :data:`DEPRECATED_TOKEN` itself)."""
    try:
        token = read_token(env=TOKEN_ENV, file=token_file)
    except IdentityError as exc:
        raise click.UsageError(str(exc)) from None
    if token is None and token_arg is not None:
        if token_arg == "":
            raise click.UsageError("--token must not be empty")
        if warn:
            click.echo(DEPRECATED_TOKEN, err=True)
        token = token_arg
    if token is None and required:
        raise click.UsageError(f"no token: set {TOKEN_ENV} or give --token-file")
    return token


def identity_option(default_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--identity", "identity_path", type=click.Path(dir_okay=False),
                        help=f"Our key file (Ed25519, created on first use, mode 0600). "
                             f"Default: $XDG_CONFIG_HOME/tcppunch/{default_name}.")


def load_identity(path: str | None, default_name: str = "identity.key") -> Identity:
    try:
        return Identity.load(path if path is not None else config_dir() / default_name)
    except (IdentityError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


def key_id(value: str | None, option: str) -> str | None:
    """A key id given on the command line, in canonical form."""
    if value is None:
        return None
    try:
        return parse_fingerprint(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def private_path(path: str, what: str) -> Path:
    """A secret file that exists and is not readable by group or others."""
    try:
        check_private(Path(path))
    except IdentityError as exc:
        raise click.UsageError(f"{what}: {exc}") from None
    return Path(path)
