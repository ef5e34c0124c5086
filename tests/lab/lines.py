"""Waiting for a line from a process the lab tests started."""

from __future__ import annotations

import threading
from typing import IO


def wait_for_line(stream: IO[str], needle: str, timeout: float, seen: list[str]) -> bool:
    """Read lines (in a helper thread, bounded by ``timeout``) until one contains ``needle``; every line
    read is appended to ``seen`` (for the failure message)."""
    found = threading.Event()

    def reader() -> None:
        for line in stream:
            seen.append(line)
            if needle in line:
                found.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    return found.wait(timeout)
