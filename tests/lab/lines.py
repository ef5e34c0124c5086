"""Waiting for a line from a process the lab tests started."""

from __future__ import annotations

import threading
from typing import IO

from tcppunch.lab.lines import Tail

__all__ = ["Tail", "wait_for_line"]


def wait_for_line(stream: IO[str], needle: str, timeout: float, seen: list[str]) -> bool:
    """Read lines (in a helper thread, bounded by ``timeout``) until one contains ``needle``; every line
    read is appended to ``seen`` (for the failure message). False at once when the stream ends first
    (the process exited)."""
    over = threading.Event()
    found: list[bool] = []

    def reader() -> None:
        try:
            for line in stream:
                seen.append(line)
                if needle in line:
                    found.append(True)
                    return
        finally:
            over.set()

    threading.Thread(target=reader, daemon=True).start()
    over.wait(timeout)
    return bool(found)
