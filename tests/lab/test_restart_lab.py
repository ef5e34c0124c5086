"""The coordinator restarts while a punch is in flight (30 ms per WAN link): it is SIGKILLed as soon as
alice's PUNCH arrived, before either side has a connection; the punch completes or fails cleanly on both
sides (a direct/relayed line or an error line; the fetch through it gets the page intact or an error, never
hangs), both peers register at the new coordinator process, and the next connect works (SHA-256)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tcppunch.lab import Lab, LabHost, LabSpec, LinkShape, NatType, RouterSpec, SynPolicy
from tcppunch.lab.lines import Tail
from tests.lab.processes import COORD, FETCH_SHA256, PY, lab_server, random_page, stop, token_env

TOKEN = "restart-lab-token"
DELAY = LinkShape(delay_ms=30)
PUNCH_ARRIVED = "tcppunch: punch: peer=bob"  # alice's stage line: the PUNCH order is here, she fires
# How a connection attempt ends, in each side's stage lines: direct, relayed, or a clear error.
ENDED = {"alice": ("tcppunch: direct:", "tcppunch: relayed:", "tcppunch: local client dropped:"),
         "bob": ("tcppunch: direct:", "tcppunch: relayed:", "tcppunch: incoming_failed:")}


def fetch(host: LabHost, port: int) -> subprocess.Popen[str]:
    return host.popen([sys.executable, "-c", FETCH_SHA256, f"http://127.0.0.1:{port}/page.bin", "20"],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    spec = LabSpec([RouterSpec("pr", NatType.PORT_RESTRICTED, SynPolicy.DROP, link=DELAY),
                    RouterSpec("rc", NatType.RESTRICTED, SynPolicy.DROP, link=DELAY)], server_link=DELAY)
    with Lab(spec) as the_lab:
        yield the_lab


def test_restart_during_a_punch(lab: Lab, tmp_path: Path) -> None:
    want = random_page(tmp_path, 300_000)
    alice_host, bob_host = lab.host("pr"), lab.host("rc")
    procs: list[subprocess.Popen[str]] = []
    servers = ExitStack()  # each coordinator process, stopped by PID last (after the peers)
    try:
        server = servers.enter_context(lab_server(lab, TOKEN, ready_timeout=30)).proc
        procs.append(bob_host.popen([sys.executable, "-m", "http.server", "8080", "--bind", "127.0.0.1",
                                     "--directory", str(tmp_path)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL))
        bob = bob_host.popen([*PY, "listen", "--coordinator", COORD, "--id", "bob",
                              "--forward", "127.0.0.1:8080", "--allow-any"], stderr=subprocess.PIPE, text=True,
                             env=token_env(TOKEN))
        procs.append(bob)
        assert bob.stderr is not None
        bob_log = Tail(bob.stderr)
        assert bob_log.wait_for("listening as", 30), bob_log.text
        alice = alice_host.popen([*PY, "connect", "bob", "--coordinator", COORD, "--id", "alice",
                                  "--local", "127.0.0.1:9000"], stderr=subprocess.PIPE, text=True,
                                 env=token_env(TOKEN))
        procs.append(alice)
        assert alice.stderr is not None
        alice_log = Tail(alice.stderr)
        assert alice_log.wait_for("accepting local", 30), alice_log.text

        first = fetch(alice_host, 9000)
        procs.append(first)
        # The PUNCH reached alice (so bob's copy left too): kill the coordinator while the SYNs are still to
        # cross (fire time, then 1.5 round trips of 120 ms between the peers).
        assert alice_log.wait_for(PUNCH_ARRIVED, 20), alice_log.text
        server.kill()
        assert not any(alice_log.count(done) for done in (*ENDED["alice"], "tcppunch: relay:")), \
            alice_log.text  # the punch was still in flight
        server.wait(10)
        servers.enter_context(lab_server(lab, TOKEN, ready_timeout=30))

        out, err = first.communicate(timeout=40)  # never hangs: the page, or an error
        assert (first.returncode == 0 and out.strip() == want) or (first.returncode != 0 and err), (out, err)
        # The punch in flight ended: it completed (the peers need no coordinator for it) or failed with an
        # error line, on both sides.
        assert bob_log.wait_for("tcppunch: punch: peer=alice", 20), bob_log.text
        for name, log in (("alice", alice_log), ("bob", bob_log)):
            assert log.wait_for_any(ENDED[name], 30), log.text
        # Both register again at the new process, and the next connect works.
        assert alice_log.wait_for("reconnecting", 20), alice_log.text
        assert bob_log.wait_for("reconnecting", 20), bob_log.text
        for log in (alice_log, bob_log):
            assert log.wait_for_count("registered:", 2, 30), log.text
        assert alice.poll() is None and bob.poll() is None
        second = fetch(alice_host, 9000)
        procs.append(second)
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0 and out.strip() == want, err
    finally:
        for proc in reversed(procs):
            stop(proc)
        servers.close()
