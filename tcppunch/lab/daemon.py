"""Background processes of a lab (link shapers, and any service a lab runs for its whole life).

A lab outlives the command that built it (``tcppunch lab up``), so its processes must not hold that
command's standard streams: a caller reading ``tcppunch lab up ... | tail`` or ``subprocess.run(...,
capture_output=True)`` waits for EOF on those pipes, and a daemon that inherited them keeps them open
for as long as the lab lives. Every daemon therefore starts in its own session, reads /dev/null, writes
its diagnostics to a log file under the lab's state directory, and tells its readiness on a private pipe
that the starter closes once it has read the line.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from tcppunch.lab.netns import LabError, in_netns


def start_daemon(netns: str, argv: Sequence[str], *, log_path: Path, ready: str | None = None,
                 ready_timeout: float = 10.0) -> subprocess.Popen[str]:
    """Start ``argv`` inside ``netns``, detached from our stdio; wait for it to print ``ready`` if given.

    Raises :class:`LabError` (after stopping the process) if it does not say ``ready`` within
    ``ready_timeout`` seconds; the message points at its log.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(in_netns(netns, argv), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if ready is not None else log, stderr=log,
                                text=True, start_new_session=True)
    if ready is None:
        return proc
    said = _first_line_within(proc, ready_timeout)
    assert proc.stdout is not None
    proc.stdout.close()  # nothing more is read; the daemon's later output (if any) goes nowhere
    if said != ready:
        proc.kill()
        proc.wait(5)
        raise LabError(f"{argv[0]} {' '.join(argv[1:4])} ... did not start (said {said!r}; log: {log_path})")
    return proc


def _first_line_within(proc: subprocess.Popen[str], seconds: float) -> str:
    """The first line a child prints, or '' if it prints none within ``seconds``."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline() if proc.stdout else ""),
                              daemon=True)
    reader.start()
    reader.join(seconds)
    return result[0].strip() if result else ""
