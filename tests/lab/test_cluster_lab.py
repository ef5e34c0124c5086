"""Two coordinators on the lab server's two addresses sharing a redis-server (started in the server's
namespace by this test, stopped by PID): alice at A, bob at B.

* a direct connect (alice's forwarder) and a relayed one (carol, also at A; the relay is A's) carry a page
  from bob's host intact (SHA-256); the relayed bytes are counted in Redis against carol's relay budget
  (``--relay-max-mb``), the unspent part of the lease given back;
* A is killed (SIGKILL) mid-session: the punched connection carries on, alice registers at B within
  keepalive_timeout + 1 s, and a new alice process (given A then B) connects again.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tcppunch.lab import Lab, LabHost, LabSpec, NatType, RouterSpec, SynPolicy
from tcppunch.lab.lines import LineTimeout, Tail, wait_for_line
from tcppunch.wire.endpoint import Endpoint
from tests.lab.processes import FETCH_SHA256, PY, lab_server, random_page, stop, token_env

TOKEN = "cluster-lab-token"
A, B = "198.51.100.10:3478", "198.51.100.11:4478"
REDIS_PORT = 6390
KEEPALIVE = 1.0  # server --keepalive-interval; the keepalive timeout (an id's TTL in Redis) is 3x
RELAY_MB = 100  # server --relay-max-mb: a budget per peer id, counted for the cluster in Redis (leases of 4 MiB)


@contextmanager
def redis_in(host: LabHost) -> Iterator[str]:
    """redis-server on the lab server's loopback, by PID; ``redis://...`` once it answers PING."""
    proc = host.popen(["redis-server", "--bind", "127.0.0.1", "--port", str(REDIS_PORT), "--save", "",
                       "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10.0
        while host.run(["redis-cli", "-p", str(REDIS_PORT), "ping"], timeout=5).stdout.strip() != "PONG":
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)  # polling readiness with a deadline
        yield f"redis://127.0.0.1:{REDIS_PORT}/0"
    finally:
        stop(proc)


@contextmanager
def coordinator(lab: Lab, listen: str, alt: str | None, alt_port: int | None, url: str
                ) -> Iterator[subprocess.Popen[str]]:
    """A node of the cluster on the lab server, stopped by PID on the way out; ``alt`` None: without
    --alt-address (which binds the listen port on it too)."""
    with lab_server(lab, TOKEN, "--redis", url, "--keepalive-interval", str(KEEPALIVE), "--relay-max-mb",
                    str(RELAY_MB), listen=Endpoint.parse(listen), alt_address=alt, alt_port=alt_port) as node:
        assert "cluster node" in node.log.text, node.log.text  # its ready line: a node of the Redis cluster
        yield node.proc


def serving_bob(host: LabHost, directory: Path, where: str) -> list[subprocess.Popen[str]]:
    """An HTTP server for ``directory`` on ``host``'s loopback and bob forwarding to it, registered at ``where``
    (both started, bob's registration awaited; stop them by PID)."""
    web = host.popen([sys.executable, "-m", "http.server", "8080", "--bind", "127.0.0.1",
                      "--directory", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bob = host.popen([*PY, "listen", "--coordinator", where, "--id", "bob", "--forward", "127.0.0.1:8080",
                      "--allow-any"], stderr=subprocess.PIPE, text=True, env=token_env(TOKEN))
    assert bob.stderr is not None
    try:
        wait_for_line(bob.stderr, "listening as", 30)
    except LineTimeout:
        stop(bob)
        stop(web)
        raise
    return [web, bob]


def forwarder(host: LabHost, peer_id: str, port: int, *coordinators: str, relay: str = "auto"
              ) -> tuple[subprocess.Popen[str], Tail]:
    argv = [*PY, "connect", "bob", "--id", peer_id, "--local", f"127.0.0.1:{port}",
            "--relay", relay]
    for where in coordinators:
        argv += ["--coordinator", where]
    proc = host.popen(argv, stderr=subprocess.PIPE, text=True, env=token_env(TOKEN))
    assert proc.stderr is not None
    tail = Tail(proc.stderr)
    assert tail.wait_for("accepting local", 30), tail.text
    return proc, tail


def fetch(host: LabHost, port: int) -> str:
    done = host.run([sys.executable, "-c", FETCH_SHA256, f"http://127.0.0.1:{port}/page.bin", "30"], timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def lab() -> Iterator[Lab]:
    spec = LabSpec([RouterSpec("pr", NatType.PORT_RESTRICTED, SynPolicy.DROP),
                    RouterSpec("seq", NatType.SYMMETRIC_SEQ, SynPolicy.DROP)])
    with Lab(spec) as the_lab:
        yield the_lab


def test_two_coordinators_direct_relay_and_failover(lab: Lab, tmp_path: Path) -> None:
    page_size = 400_000
    want = random_page(tmp_path, page_size)
    alice_host, bob_host = lab.host("pr"), lab.host("seq")
    procs: list[subprocess.Popen[str]] = []
    with redis_in(lab.server) as url, coordinator(lab, A, "198.51.100.11", 3479, url) as a, \
            coordinator(lab, B, "198.51.100.10", 4479, url):
        try:
            procs += serving_bob(bob_host, tmp_path, B)

            alice, alice_log = forwarder(alice_host, "alice", 9000, A, B)
            procs.append(alice)
            assert fetch(alice_host, 9000) == want
            assert alice_log.wait_for("direct:", 10), alice_log.text
            assert f"coordinator={A}" in alice_log.text

            carol, carol_log = forwarder(alice_host, "carol", 9001, A, relay="always")
            procs.append(carol)
            assert fetch(alice_host, 9001) == want
            assert carol_log.wait_for("relayed:", 10), carol_log.text
            stop(carol)
            # carol's relay was charged to the cluster's budget of her id: the page and its overhead, with
            # the rest of A's 4 MiB lease given back once the relay ended
            used = 0
            deadline = time.monotonic() + 10.0
            while not page_size < used < 1 << 20 and time.monotonic() < deadline:
                reply = lab.server.run(["redis-cli", "-p", str(REDIS_PORT), "GET", "tcppunch:relay:peer:carol"],
                                       timeout=5).stdout.strip()
                used = int(reply) if reply.isdigit() else 0
                time.sleep(0.05)  # polling another process's state with a deadline
            assert page_size < used < 1 << 20, used

            # A dies without a word: its peers' ids stay claimed in Redis until their TTL.
            a.kill()
            a.wait(10)
            killed = time.monotonic()
            assert alice_log.wait_for(f"coordinator={B}", 3 * KEEPALIVE + 1.0), alice_log.text
            assert time.monotonic() - killed <= 3 * KEEPALIVE + 1.0 + 0.5  # + the log line's own travel
            assert fetch(alice_host, 9000) == want  # the punched session never needed A
            stop(alice)

            again, again_log = forwarder(alice_host, "alice", 9002, A, B)
            procs.append(again)
            assert fetch(alice_host, 9002) == want
            assert f"coordinator={B}" in again_log.text
        finally:
            for proc in reversed(procs):
                stop(proc)
