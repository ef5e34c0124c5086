"""Addresses, MTU, state and routes of the VPN interface, with iproute2's ``ip`` in the namespace this
process (or thread) runs in. Each call is one short ``ip`` command; errors carry its stderr."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Sequence

IP = "ip"
TIMEOUT = 10.0


class InterfaceError(RuntimeError):
    """An ``ip`` command failed; the message is its own error line."""


def _ip(*args: str) -> None:
    try:
        done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InterfaceError(f"ip {' '.join(args)}: {exc}") from None
    if done.returncode != 0:
        raise InterfaceError(f"ip {' '.join(args)}: {done.stderr.strip() or f'exit {done.returncode}'}")


def configure(name: str, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface, mtu: int,
              routes: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> None:
    """Give ``name`` its address (with prefix, so the VPN subnet is on-link) and MTU, bring it up, and
    route ``routes`` (networks behind the other peer) through it."""
    _ip("address", "add", str(address), "dev", name)
    _ip("link", "set", "dev", name, "mtu", str(mtu), "up")
    for network in routes:
        _ip("route", "replace", str(network), "dev", name)


def set_up(name: str, up: bool) -> None:
    """Bring ``name`` up or down. Down removes its routes from the table; :func:`restore_routes` puts
    them back after bringing it up again."""
    _ip("link", "set", "dev", name, "up" if up else "down")


def restore_routes(name: str, routes: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
    for network in routes:
        _ip("route", "replace", str(network), "dev", name)


def delete(name: str) -> None:
    """Remove interface ``name`` if it still exists (cleanup by name)."""
    done = subprocess.run([IP, "link", "show", "dev", name], capture_output=True, timeout=TIMEOUT, check=False)
    if done.returncode == 0:
        _ip("link", "delete", "dev", name)
