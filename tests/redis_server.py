"""A real redis-server for cluster tests: started on a free loopback port, stopped by PID, restartable on
the same port (a test that takes Redis away and brings it back)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

from tcppunch.lab.server_process import stop_process

STARTUP_TIMEOUT = 10.0


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _answers_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process (no persistence: a restart starts empty, as after a crash of a Redis
    that keeps the registry as soft state)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server, make apt)")
        self.host, self.port = host, _free_port(host)
        self.url = f"redis://{host}:{self.port}/0"
        self._workdir = tempfile.mkdtemp(prefix="tcppunch-redis-")
        self._argv = [binary, "--bind", host, "--port", str(self.port), "--save", "", "--appendonly", "no",
                      "--dir", self._workdir, "--protected-mode", "no", "--loglevel", "warning"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and return once it answers PING."""
        proc = self.proc = subprocess.Popen(self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _answers_ping(self.host, self.port):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start: {proc.stderr.read() if proc.stderr else b''!r}")
            time.sleep(0.05)  # polling readiness with a deadline

    def stop(self) -> None:
        """Stop it by PID (SIGTERM, then SIGKILL) and wait for it to exit."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)


@contextlib.contextmanager
def redis_process(host: str = "127.0.0.1") -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped and cleaned up when the block ends."""
    server = RedisServer(host)
    try:
        server.start()
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def redis_server(host: str = "127.0.0.1") -> Iterator[str]:
    """``redis://host:port/0`` of a fresh redis-server (no persistence) until the block ends."""
    with redis_process(host) as server:
        yield server.url
