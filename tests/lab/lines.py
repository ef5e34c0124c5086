"""Waiting for a line from a process the lab tests started."""

from __future__ import annotations

import threading
from typing import IO


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


class Tail:
    """Every line of a process's text stream, read by a thread; wait (bounded) for one to appear."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, needle: str, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: any(needle in line for line in self.lines), timeout)

    def wait_for_any(self, needles: tuple[str, ...], timeout: float) -> bool:
        """Wait (bounded) until a line contains one of ``needles``."""
        with self._changed:
            return self._changed.wait_for(lambda: any(n in line for line in self.lines for n in needles), timeout)

    def wait_for_count(self, needle: str, count: int, timeout: float) -> bool:
        """Wait (bounded) until ``count`` lines contain ``needle``."""
        with self._changed:
            return self._changed.wait_for(lambda: sum(needle in line for line in self.lines) >= count, timeout)

    def count(self, needle: str) -> int:
        with self._changed:
            return sum(needle in line for line in self.lines)

    @property
    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)
