"""Processes the lab CLI tests start: the server on the lab server, stopping (by PID, bounded)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tcppunch.lab import Lab, LabSpec, NatType, RouterSpec, SynPolicy
from tests.lab.lines import wait_for_line

PY = [sys.executable, "-m", "tcppunch"]
COORD = "198.51.100.10:3478"


def four_nats(seq_hosts: int = 1) -> LabSpec:
    """Port-restricted, symmetric-seq (with ``seq_hosts`` hosts on its LAN) and two symmetric-random
    routers (drop, rst): direct pairs and a pair only the relay connects."""
    return LabSpec([RouterSpec("pr", NatType.PORT_RESTRICTED, SynPolicy.DROP),
                    RouterSpec("seq", NatType.SYMMETRIC_SEQ, SynPolicy.DROP, hosts=seq_hosts),
                    RouterSpec("rnda", NatType.SYMMETRIC_RANDOM, SynPolicy.DROP),
                    RouterSpec("rndb", NatType.SYMMETRIC_RANDOM, SynPolicy.RST)])


def token_env(token: str) -> dict[str, str]:
    """The environment of a tcppunch process: secrets travel there, never on the command line (read at call
    time: the test session points XDG_CONFIG_HOME at a throw-away directory)."""
    return {**os.environ, "TCPPUNCH_TOKEN": token}


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 10 s; waits for the process either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def lab_server(lab: Lab, token: str, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """`tcppunch server` on the lab server (both addresses), running once it said "listening on"."""
    server = lab.server.popen([*PY, "server", "--listen", COORD, "--alt-address", "198.51.100.11", *extra],
                              stderr=subprocess.PIPE, text=True, env=token_env(token))
    try:
        seen: list[str] = []
        assert server.stderr is not None
        assert wait_for_line(server.stderr, "listening on", 20, seen), seen
        yield server
    finally:
        stop(server)
