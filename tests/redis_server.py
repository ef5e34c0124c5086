"""A real redis-server for cluster tests: started on a free loopback port, stopped by PID."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

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


@contextlib.contextmanager
def redis_server(host: str = "127.0.0.1", *, started: list[subprocess.Popen[bytes]] | None = None) -> Iterator[str]:
    """``redis://host:port/0`` of a fresh redis-server (no persistence) until the block ends; its process is
    appended to ``started`` (a test that stops Redis itself)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian package redis-server, make apt)")
    port = _free_port(host)
    workdir = tempfile.mkdtemp(prefix="tcppunch-redis-")
    argv = [binary, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", workdir, "--protected-mode", "no", "--loglevel", "warning"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if started is not None:
        started.append(proc)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _answers_ping(host, port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {proc.stderr.read() if proc.stderr else b''!r}")
            time.sleep(0.05)  # polling readiness with a deadline
        yield f"redis://{host}:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)
        shutil.rmtree(workdir, ignore_errors=True)
