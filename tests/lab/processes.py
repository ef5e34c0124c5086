"""What the lab CLI tests share: the command, the coordinator's address, a four-NAT lab, the token's
environment, a page to serve and the client that fetches its SHA-256; the server on the lab server and
stopping by PID come from :mod:`tcppunch.lab.server_process`."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from tcppunch.lab import LabSpec, NatType, RouterSpec, SynPolicy
from tcppunch.lab.server_process import LAB_COORDINATOR, lab_server
from tcppunch.lab.server_process import stop_process as stop

__all__ = ["COORD", "FETCH_SHA256", "PY", "four_nats", "lab_server", "random_page", "stop", "token_env"]

PY = [sys.executable, "-m", "tcppunch"]
COORD = str(LAB_COORDINATOR)
# ``python -c FETCH_SHA256 URL TIMEOUT``: an HTTP client that prints the SHA-256 (hex) of what URL returned.
FETCH_SHA256 = ("import hashlib,sys,urllib.request;"
                "print(hashlib.sha256(urllib.request.urlopen(sys.argv[1],timeout=float(sys.argv[2])).read()).hexdigest())")


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


def random_page(folder: Path, size: int) -> str:
    """``folder/page.bin`` of ``size`` random bytes (for a web server to serve); its SHA-256 (hex)."""
    page = os.urandom(size)
    (folder / "page.bin").write_bytes(page)
    return hashlib.sha256(page).hexdigest()
