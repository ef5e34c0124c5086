"""The connections one punch session yields, as each becomes available: a punched one, a relayed one,
or both (the relay first, then the punch that kept running).

A session uses the first to start at once and moves onto a later direct one (relay → direct); a
dedicated connection takes the first and cancels the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Coroutine
from typing import Any

from tcppunch.peer.types import ConnectionInfo

Established = tuple[socket.socket, ConnectionInfo]
# How long a punch may run before the session starts on the relay beside it (the punch goes on).
RELAY_AFTER = 1.5


class ConnectionRace:
    """Attempts run as tasks; :meth:`next` hands out their connections in the order they arrive.

    An attempt returns a connection, or anything else (``None``, a reason string) for "nothing"; its
    exception is kept and raised by :meth:`next` if no attempt gave a connection at all.
    """

    def __init__(self) -> None:
        self._results: asyncio.Queue[Established | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self._error: BaseException | None = None
        self._delivered = 0

    def start(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self._tasks.append(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            result = None
        elif (exc := task.exception()) is not None:
            self._error = self._error or exc
            result = None
        else:
            result = task.result()
        self._results.put_nowait(result if isinstance(result, tuple) else None)

    @property
    def running(self) -> bool:
        return any(not task.done() for task in self._tasks)

    async def next(self) -> Established | None:
        """The next connection; ``None`` once every attempt ended (or raises the first attempt's error
        when none gave a connection)."""
        while self.running or not self._results.empty():
            result = await self._results.get()
            if result is not None:
                self._delivered += 1
                return result
        if self._delivered == 0 and self._error is not None:
            raise self._error
        return None

    async def cancel(self) -> None:
        """Stop every attempt; connections that arrive meanwhile are closed."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        while not self._results.empty():
            late = self._results.get_nowait()
            if late is not None:
                late[0].close()
