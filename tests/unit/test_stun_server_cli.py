"""``tcppunch server`` as a process: ready line, answers STUN, stops cleanly on SIGTERM and SIGINT."""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from click.testing import CliRunner

from tcppunch.cli import main
from tcppunch.wire.stun import MessageClass, StunStreamDecoder, binding_request, encode_message

READY_TIMEOUT = 10.0


def _wait_ready(proc: subprocess.Popen[str]) -> str:
    """Read stderr lines until the 'listening on' line (bounded)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + READY_TIMEOUT
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("listening on"):
            return line
    proc.kill()
    raise AssertionError(f"server never became ready: {seen}")


def start_server(args: Callable[[int], list[str]], ports: range = range(30000, 40000, 2)
                 ) -> tuple[subprocess.Popen[str], int, str]:
    """``tcppunch server ARGS(port)`` on a random free port of ``ports``: (process, port, ready line)."""
    for _ in range(10):
        port = random.choice(ports)
        proc = subprocess.Popen([sys.executable, "-m", "tcppunch", "server", *args(port)],
                                stderr=subprocess.PIPE, text=True)
        try:
            return proc, port, _wait_ready(proc)
        except AssertionError:
            proc.wait(5)
    pytest.fail("could not start the server on any port")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_server_process_serves_and_stops_on_signal(signum: int) -> None:
    proc, port, line = start_server(
        lambda port: ["--listen", f"127.0.0.1:{port}", "--alt-address", "127.0.0.2", "--token", "s3cret"])
    try:
        assert f"127.0.0.2:{port + 1}" in line
        with socket.create_connection(("127.0.0.2", port + 1), 5) as sock:
            sock.settimeout(5)
            request = binding_request(os.urandom(12))
            sock.sendall(encode_message(request))
            decoder = StunStreamDecoder()
            while (response := decoder.next_message()) is None:
                decoder.receive_data(sock.recv(2048))
        assert response.message_class is MessageClass.SUCCESS
        proc.send_signal(signum)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.parametrize(
    "args",
    [
        ["server", "--listen", "127.0.0.1:3478"],  # no token
        ["server", "--listen", "127.0.0.1", "--token", "t"],  # no port
        ["server", "--listen", "0.0.0.0:3478", "--alt-address", "127.0.0.2", "--token", "t"],
        ["server", "--listen", "127.0.0.1:3478", "--alt-address", "not-an-ip", "--token", "t"],
        ["server", "--listen", "127.0.0.1:3478", "--alt-port", "3478", "--token", "t"],
        ["server", "--listen", "127.0.0.1:3478", "--listen", "127.0.0.2:3478", "--token", "t"],  # two IPv4
        ["server", "--listen", "127.0.0.1:3478", "--alt-address", "::2", "--token", "t"],  # no IPv6 listen
        ["server", "--listen", "[::]:3478", "--alt-address", "::2", "--token", "t"],  # wildcard with alt
    ],
)
def test_server_usage_errors(args: list[str]) -> None:
    assert CliRunner().invoke(main, args).exit_code == 2


def test_listen_on_both_families() -> None:
    from tcppunch.cli.server_cmd import stun_configs
    from tcppunch.wire.endpoint import Endpoint

    wildcard = stun_configs([Endpoint("::", 3478)], (), None)
    assert [(c.primary_address, c.primary_port) for c in wildcard] == [("0.0.0.0", 3478), ("::", 3478)]
    pair = stun_configs([Endpoint("198.51.100.10", 3478), Endpoint("2001:db8::10", 3478)],
                        ("2001:db8::11", "198.51.100.11"), None)
    assert [(c.primary_address, c.alternate_address) for c in pair] == [("198.51.100.10", "198.51.100.11"),
                                                                       ("2001:db8::10", "2001:db8::11")]
