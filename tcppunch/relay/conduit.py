"""Where the bytes of one relay direction wait between the two sockets: a kernel pipe or a user buffer.

:class:`PipeConduit` moves bytes with ``splice(2)`` socket -> pipe -> socket, so they never enter the
process (zero copy). :class:`BufferConduit` is the portable fallback: ``recv_into`` a bytearray, ``send``
from it. Both have the same small, non-blocking interface so one pump loop drives either: ``fill`` takes
at most ``limit`` bytes from a socket, ``drain`` pushes buffered bytes to a socket; each returns the count
moved, ``0`` from ``fill`` meaning end of stream, and ``None`` meaning "would block" (the caller waits for
readiness). Socket errors propagate as :class:`OSError`.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from typing import Protocol

#: SPLICE_F_MOVE is only a hint to the kernel; SPLICE_F_NONBLOCK keeps the pipe side non-blocking.
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
#: Default capacity of each direction's pipe; the Linux default pipe-max-size for unprivileged users.
DEFAULT_PIPE_SIZE = 1 << 20
#: Default user buffer of the copy fallback (1 MiB measured faster than 64 KiB and 256 KiB).
DEFAULT_BUFFER_SIZE = 1 << 20


def splice_available() -> bool:
    """True where ``os.splice`` exists (Linux, Python 3.10+)."""
    return sys.platform.startswith("linux") and hasattr(os, "splice")


class Conduit(Protocol):
    """The buffer of one direction, as the pump sees it."""

    method: str

    @property
    def buffered(self) -> int:
        """Bytes taken from the source and not yet delivered."""

    @property
    def room(self) -> int:
        """How many more bytes ``fill`` may ask for now."""

    def fill(self, src: socket.socket, limit: int) -> int | None:
        """Take up to ``limit`` (> 0) bytes from ``src``: count, 0 at end of stream, None if it would block."""

    def drain(self, dst: socket.socket) -> int | None:
        """Send buffered bytes to ``dst``: count sent, or None if it would block."""

    def close(self) -> None:
        """Release kernel resources (idempotent)."""


class PipeConduit:
    """A non-blocking pipe filled and drained with ``splice(2)``."""

    method = "splice"

    def __init__(self, pipe_size: int = DEFAULT_PIPE_SIZE) -> None:
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.capacity = _grow_pipe(self._write_fd, pipe_size)
        self._buffered = 0
        self._closed = False

    @property
    def buffered(self) -> int:
        return self._buffered

    @property
    def room(self) -> int:
        return self.capacity - self._buffered

    def fill(self, src: socket.socket, limit: int) -> int | None:
        # EAGAIN means "no data in the socket" or "pipe full" (a pipe counts slots, not bytes, so it can be
        # full before `capacity` bytes); the pump tells them apart by `buffered`, see pump._one_way.
        try:
            n = os.splice(src.fileno(), self._write_fd, limit, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return None
        self._buffered += n
        return n

    def drain(self, dst: socket.socket) -> int | None:
        try:
            n = os.splice(self._read_fd, dst.fileno(), self._buffered, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return None
        self._buffered -= n
        return n

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._read_fd)
            os.close(self._write_fd)


def _grow_pipe(fd: int, size: int) -> int:
    """Ask for a ``size``-byte pipe; keep what the kernel gives when it refuses (EPERM over a user limit)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError:
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


class BufferConduit:
    """A bytearray filled with ``recv_into`` and drained with ``send``: the portable path."""

    method = "copy"

    def __init__(self, size: int = DEFAULT_BUFFER_SIZE) -> None:
        if size < 1:
            raise ValueError("buffer size must be positive")
        self.capacity = size
        self._view = memoryview(bytearray(size))
        self._start = 0
        self._end = 0

    @property
    def buffered(self) -> int:
        return self._end - self._start

    @property
    def room(self) -> int:
        if self._start == self._end:
            self._start = self._end = 0
        return self.capacity - self._end

    def fill(self, src: socket.socket, limit: int) -> int | None:
        room = self.room
        try:
            n = src.recv_into(self._view[self._end : self._end + min(limit, room)])
        except BlockingIOError:
            return None
        self._end += n
        return n

    def drain(self, dst: socket.socket) -> int | None:
        try:
            n = dst.send(self._view[self._start : self._end])
        except BlockingIOError:
            return None
        self._start += n
        return n

    def close(self) -> None:
        pass  # plain memory; nothing to release early
