"""An idle punched session loses its NAT mappings and the session keepalive notices.

Both routers' conntrack timeout for established TCP is lowered to 3 s inside their namespaces, and they
do not pick a flow up again mid-stream (``nf_conntrack_tcp_loose=0``, like NATs that create mappings
only for SYNs): once idle for 3 s the punched connection is dead for good. The peers' session keepalive
(interval 5 s, timeout 3 s) pings after 5 s of silence; nothing answers, so each side ends its session
with KEEPALIVE_TIMEOUT within interval + timeout = 8 s of the last packet and reports it (the
``session_lost`` stage, logged as ``peer.session_lost``). The next stream sets a new session up (a new
punch, direct again) and 200 kB go there and back intact (SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tcppunch.lab import Lab, LabSpec, NatType, RouterSpec, SynPolicy
from tcppunch.lab.lines import Tail
from tests.lab.processes import COORD, lab_server, stop, token_env

TOKEN = "expiry-lab-token"
CONNTRACK_TIMEOUT = 3  # seconds an idle established TCP flow keeps its NAT mapping
KEEPALIVE = (5.0, 3.0)  # session keepalive interval and timeout (s): ping after 5 s idle, give up 3 s later
SIZE = 200_000

PEER = """
import asyncio, hashlib, json, os, random, sys, time
from tcppunch.peer import Peer

def stage(name, data):
    if name == "session_lost":
        print("LOST=" + json.dumps(data), flush=True)

async def echo(peer):
    while True:
        stream = await peer.accept_stream()
        stream.write(await stream.read())
        stream.write_eof()
        await stream.drain()

async def main(role, coordinator, me, other, interval, timeout, size):
    async with Peer(coordinator, me, os.environ["TCPPUNCH_TOKEN"], on_stage=stage,
                    session_keepalive=(float(interval), float(timeout))) as peer:
        if role == "echo":
            print("READY", flush=True)
            await echo(peer)
        stream = await peer.open_stream(other)
        stream.write(b"one")
        stream.write_eof()
        assert await stream.read() == b"one"
        idle_since = time.monotonic()
        (first,) = peer.sessions()
        print("SESSION=" + json.dumps(first.to_json()), flush=True)
        await asyncio.wait_for(first.session.wait_closed(), 60)  # idle: only the keepalive can end it
        print("NOTICED=" + json.dumps({"after": round(time.monotonic() - idle_since, 2),
                                       "code": first.session.close_code.name, "error": str(first.session.error)}),
              flush=True)
        data = random.Random(int(size)).randbytes(int(size))
        stream = await peer.open_stream(other)
        stream.write(data)
        stream.write_eof()
        back = await stream.read()
        (now,) = [s for s in peer.sessions() if not s.session.closed]
        print("SECOND=" + json.dumps({"sent": hashlib.sha256(data).hexdigest(),
                                      "received": hashlib.sha256(back).hexdigest(),
                                      "method": now.to_json()["method"]}), flush=True)

asyncio.run(main(*sys.argv[1:8]))
"""


@pytest.fixture
def lab() -> Iterator[Lab]:
    spec = LabSpec([RouterSpec("pr", NatType.PORT_RESTRICTED, SynPolicy.DROP),
                    RouterSpec("rc", NatType.RESTRICTED, SynPolicy.DROP)])
    with Lab(spec) as the_lab:
        for router in the_lab.routers.values():
            assert router.netns is not None
            for setting in (f"net.netfilter.nf_conntrack_tcp_timeout_established={CONNTRACK_TIMEOUT}",
                            "net.netfilter.nf_conntrack_tcp_loose=0"):
                subprocess.run(["ip", "netns", "exec", router.netns, "sysctl", "-q", "-w", setting], check=True)
        yield the_lab


def flows(lab: Lab, router: str) -> str:
    netns = lab.routers[router].netns
    assert netns is not None
    return subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-L", "-p", "tcp"], capture_output=True,
                          text=True, timeout=10).stdout


def lines_of(tail: Tail, prefix: str) -> list[dict[str, object]]:
    return [json.loads(line[len(prefix):]) for line in tail.lines if line.startswith(prefix)]


def test_an_expired_mapping_is_noticed_by_the_keepalive_and_the_next_stream_works(lab: Lab) -> None:
    env = token_env(TOKEN)
    args = [str(KEEPALIVE[0]), str(KEEPALIVE[1]), str(SIZE)]
    procs: list[subprocess.Popen[str]] = []
    server = ExitStack()  # stopped by PID after the peers
    try:
        # Pings every second keep the control connections' mappings alive; the punched session is idle.
        server.enter_context(lab_server(lab, TOKEN, "--keepalive-interval", "1", ready_timeout=30))
        bob = lab.host("rc").popen([sys.executable, "-c", PEER, "echo", COORD, "bob", "", *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        procs.append(bob)
        assert bob.stdout is not None
        bob_out = Tail(bob.stdout)
        assert bob_out.wait_for("READY", 60), bob_out.text
        alice = lab.host("pr").popen([sys.executable, "-c", PEER, "open", COORD, "alice", "bob", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        procs.append(alice)
        assert alice.stdout is not None and alice.stderr is not None
        out, err = Tail(alice.stdout), Tail(alice.stderr)
        assert out.wait_for("SESSION=", 60), out.text + err.text[-3000:]
        (session,) = lines_of(out, "SESSION=")
        assert session["method"] == "direct", session
        local_port, remote_port = str(session["local"]).rsplit(":", 1)[1], str(session["remote"]).rsplit(":", 1)[1]
        punched = f"sport={local_port} dport={remote_port} "  # (the control connection shares the local port)
        assert punched in flows(lab, "pr")

        # The keepalive notices: within interval + timeout of the last packet (plus the load's slack).
        assert out.wait_for("NOTICED=", 60), out.text + err.text[-3000:]
        (noticed,) = lines_of(out, "NOTICED=")
        assert noticed["code"] == "KEEPALIVE_TIMEOUT", noticed
        assert "keepalive ping unanswered" in str(noticed["error"]), noticed
        assert KEEPALIVE[0] <= float(str(noticed["after"])) <= sum(KEEPALIVE) + 5, noticed
        # ... and says so: the session_lost stage on both sides, and alice's log line.
        for tail in (out, bob_out):
            assert tail.wait_for("LOST=", 30), tail.text
            lost = lines_of(tail, "LOST=")[0]
            assert lost["code"] == "KEEPALIVE_TIMEOUT" and lost["bound_s"] == sum(KEEPALIVE), lost
        assert out.wait_for("peer.session_lost", 10), out.text  # structlog's default output: stdout

        # The next stream sets a new session up; the bytes come back intact.
        assert out.wait_for("SECOND=", 60), out.text + err.text[-3000:]
        (second,) = lines_of(out, "SECOND=")
        want = hashlib.sha256(random.Random(SIZE).randbytes(SIZE)).hexdigest()
        assert second["sent"] == second["received"] == want, second
        # a re-punch, on the same 4-tuple: the dead session's sockets were dropped with a RST, not left
        # retransmitting into the dead mappings (which held the 4-tuple: "busy", relay)
        assert second["method"] == "direct", second
        print(json.dumps(noticed), json.dumps(second))
    finally:
        for proc in reversed(procs):
            stop(proc)
        server.close()

