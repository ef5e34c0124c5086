"""Waiting, bounded, for a line from a process started on a lab host (benchmarks and demos)."""

from __future__ import annotations

import queue
import threading
import time
from typing import IO


class LineTimeout(RuntimeError):
    """The process did not print the line in time, or ended first; the message quotes what it printed."""


def wait_for_line(stream: IO[str], needle: str, timeout: float) -> list[str]:
    """Read ``stream`` until a line contains ``needle``; return the lines read. Raises :class:`LineTimeout`
    after ``timeout`` seconds or at EOF. A helper thread reads (a silent process cannot block the caller
    past the deadline, and lines already buffered by the stream are not missed) and stops at the needle."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
            if needle in line:
                return
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        said = "".join(seen)[-2000:]
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise LineTimeout(f"no {needle!r} within {timeout:g} s; the process said: {said!r}") from None
        if line is None:
            raise LineTimeout(f"the process ended before saying {needle!r}: {said!r}")
        seen.append(line)
        if needle in line:
            return seen
