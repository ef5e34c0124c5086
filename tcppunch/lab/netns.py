"""Thin, checked wrappers around iproute2 and network-namespace entry.

Every command runs with an argument list (no shell) and a time limit; a failure raises
:class:`LabError` with the command and what it printed, so a broken lab explains itself.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_NETNS_DIR = "/run/netns"


class LabError(RuntimeError):
    """The lab could not be built, used or removed; the message says why."""


def check_supported() -> None:
    """Raise LabError with one clear reason when this machine cannot host a lab."""
    if os.geteuid() != 0:
        raise LabError("the NAT lab needs root (it creates network namespaces and nftables rules)")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            raise LabError(f"the NAT lab needs the '{tool}' command (Debian: apt-get install iproute2 nftables)")
    if not os.path.exists("/proc/self/ns/net"):
        raise LabError("this kernel has no network namespace support")


def run(argv: Sequence[str], *, timeout: float = 20.0, input_text: str | None = None) -> str:
    """Run a command, return its stdout; raise LabError on failure or time-out."""
    try:
        done = subprocess.run(
            list(argv), input=input_text, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout:.0f}s: {' '.join(argv)}") from exc
    except FileNotFoundError as exc:
        raise LabError(f"command not found: {argv[0]}") from exc
    if done.returncode != 0:
        raise LabError(f"failed ({done.returncode}): {' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def ip(*args: str, netns: str | None = None) -> str:
    """Run ``ip`` (in ``netns`` when given)."""
    prefix = ["ip", "-n", netns] if netns else ["ip"]
    return run([*prefix, *args])


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    """The argument list that runs ``argv`` inside ``netns``."""
    return ["ip", "netns", "exec", netns, *argv]


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(_NETNS_DIR, name))


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(_NETNS_DIR))
    except FileNotFoundError:
        return []


def add_netns(name: str) -> None:
    run(["ip", "netns", "add", name])
    ip("link", "set", "lo", "up", netns=name)


def netns_pids(name: str) -> list[int]:
    """PIDs of processes whose network namespace is ``name``."""
    if not netns_exists(name):
        return []
    out = run(["ip", "netns", "pids", name])
    return [int(tok) for tok in out.split() if tok.isdigit()]


def delete_netns(name: str) -> None:
    """Delete a namespace; missing is fine (teardown must be idempotent)."""
    if netns_exists(name):
        run(["ip", "netns", "del", name])


def sysctl(netns: str, key: str, value: str) -> None:
    run(in_netns(netns, ["sysctl", "-qw", f"{key}={value}"]))


def nft_load(netns: str, ruleset: str) -> None:
    """Load an nftables rule set into ``netns`` atomically (``nft -f -``)."""
    run(in_netns(netns, ["nft", "-f", "-"]), input_text=ruleset)


def disable_offloads(netns: str, dev: str) -> None:
    """Turn off checksum/segmentation offloads so frames copied by the link shaper are complete."""
    if shutil.which("ethtool") is None:
        raise LabError("link shaping needs the 'ethtool' command (Debian: apt-get install ethtool)")
    run(in_netns(netns, ["ethtool", "-K", dev, "tx", "off", "rx", "off", "tso", "off", "gso", "off", "gro", "off"]))


def call_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in the calling thread after joining ``netns``; only use from a dedicated thread.

    The network namespace is per thread on Linux, so a thread that joins one and creates sockets there
    leaves every other thread of the process where it was. Sockets keep their namespace for life.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(_NETNS_DIR, netns), os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"setns({netns}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)
    return fn()
