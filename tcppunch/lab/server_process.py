"""``tcppunch server`` as a process on a lab's server host, for tests, benchmarks and demos; stopping by PID.

One start-up for all of them: the command line (both server addresses unless told otherwise), the token in
the environment (never on the command line), readiness as the server's own "listening on" line (bounded),
its whole log read by a thread (a long run never fills the stderr pipe, and a failure can quote it), and
SIGTERM, then SIGKILL, by PID at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tcppunch.lab.lines import LineTimeout, Tail
from tcppunch.lab.topology import SERVER_ADDRESSES
from tcppunch.wire.endpoint import Endpoint

if TYPE_CHECKING:
    from tcppunch.lab.lab import Lab

# Where the lab's server listens: the first server address, the default STUN port; the second address is
# its --alt-address (RFC 5780 needs two for the mapping and filtering tests).
LAB_COORDINATOR = Endpoint(SERVER_ADDRESSES[0], 3478)
ALT_ADDRESS = SERVER_ADDRESSES[1]
READY_TIMEOUT = 20.0


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; waits for the process either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class LabServer:
    """A running ``tcppunch server``: the process and every line it logged so far."""

    proc: subprocess.Popen[str]
    log: Tail


@contextmanager
def lab_server(lab: Lab, token: str, *extra: str, listen: Endpoint = LAB_COORDINATOR,
               alt_address: str | None = ALT_ADDRESS, alt_port: int | None = None,
               ready_timeout: float = READY_TIMEOUT) -> Iterator[LabServer]:
    """``tcppunch server --listen LISTEN [--alt-address ALT [--alt-port PORT]] EXTRA...`` on ``lab.server``,
    once it is listening.

    ``alt_address=None`` runs a one-address server; ``alt_port`` None: the server's default. EXTRA is any
    other server option (``--redis URL``, ``--keepalive-interval S``, ...). Raises :class:`LineTimeout`
    (quoting the log) when the server does not say "listening on" within ``ready_timeout`` seconds; stopped
    by PID on the way out (a server the caller killed already is only waited for).
    """
    argv = [sys.executable, "-m", "tcppunch", "server", "--listen", str(listen)]
    argv += ["--alt-address", alt_address] if alt_address is not None else []
    argv += ["--alt-port", str(alt_port)] if alt_port is not None else []
    proc = lab.server.popen([*argv, *extra], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TCPPUNCH_TOKEN": token})
    try:
        assert proc.stderr is not None
        log = Tail(proc.stderr)
        if not log.wait_for("listening on", ready_timeout):
            why = "ended" if log.ended else f"did not say 'listening on' within {ready_timeout:g} s"
            raise LineTimeout(f"tcppunch server {why}: {log.text[-2000:]!r}")
        yield LabServer(proc, log)
    finally:
        stop_process(proc)
