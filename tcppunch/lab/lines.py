"""Waiting, bounded, for a line from a process started on a lab host (tests, benchmarks and demos)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
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


class Tail:
    """Every line of a process's text stream, read by a thread; wait (bounded) for one to appear.

    Reading goes on to the end of the stream, so a process that logs a lot never blocks on a full pipe;
    a wait ends early, unfulfilled, once the stream has ended (the process is gone: nothing more will come).
    """

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def _wait(self, done: Callable[[], bool], timeout: float) -> bool:
        with self._changed:
            self._changed.wait_for(lambda: done() or self.ended, timeout)
            return done()

    def wait_for(self, needle: str, timeout: float) -> bool:
        """Wait (bounded) until a line contains ``needle``; False after ``timeout`` or at the end of the stream."""
        return self._wait(lambda: any(needle in line for line in self.lines), timeout)

    def wait_for_any(self, needles: tuple[str, ...], timeout: float) -> bool:
        """Wait (bounded) until a line contains one of ``needles``."""
        return self._wait(lambda: any(n in line for line in self.lines for n in needles), timeout)

    def wait_for_count(self, needle: str, count: int, timeout: float) -> bool:
        """Wait (bounded) until ``count`` lines contain ``needle``."""
        return self._wait(lambda: sum(needle in line for line in self.lines) >= count, timeout)

    def count(self, needle: str) -> int:
        with self._changed:
            return sum(needle in line for line in self.lines)

    @property
    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)
