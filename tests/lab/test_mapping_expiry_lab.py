"""An idle punched session loses its NAT state (the routers' conntrack timeout for established TCP is
lowered to 3 s, inside their namespaces, and the test waits until both routers dropped the flow): the
session's next PING is answered (the path comes back: the routers pick the flow up again from the
packets of either side) or fails with the keepalive's clear error, and the next stream to the same peer
works either way."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tcppunch.lab import Lab, LabSpec, NatType, RouterSpec, SynPolicy
from tests.lab.lines import Tail
from tests.lab.processes import COORD, PY, stop, token_env

TOKEN = "expiry-lab-token"
CONNTRACK_TIMEOUT = 3  # seconds an idle established TCP flow keeps its NAT mapping

PEER = """
import asyncio, json, os, sys
from tcppunch.peer import Peer

async def echo(peer):
    while True:
        stream = await peer.accept_stream()
        stream.write(await stream.read())
        stream.write_eof()
        await stream.drain()

async def main(role, coordinator, me, other):
    async with Peer(coordinator, me, os.environ["TCPPUNCH_TOKEN"]) as peer:
        if role == "echo":
            print("READY", flush=True)
            await echo(peer)
        stream = await peer.open_stream(other)
        stream.write(b"one")
        stream.write_eof()
        assert await stream.read() == b"one"
        (first,) = peer.sessions()
        print("SESSION=" + json.dumps(first.to_json()), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the test: mapping gone
        try:
            rtt = await asyncio.wait_for(first.session.ping(), 40)
            print("PING=answered", round(rtt, 3), flush=True)
        except Exception as exc:
            print("PING=failed", type(exc).__name__, exc, flush=True)
        stream = await peer.open_stream(other)
        stream.write(b"two")
        stream.write_eof()
        print("SECOND=" + (await stream.read()).decode(), json.dumps([s.to_json()["method"] for s in peer.sessions()]),
              flush=True)

asyncio.run(main(*sys.argv[1:5]))
"""


@pytest.fixture
def lab() -> Iterator[Lab]:
    spec = LabSpec([RouterSpec("pr", NatType.PORT_RESTRICTED, SynPolicy.DROP),
                    RouterSpec("rc", NatType.RESTRICTED, SynPolicy.DROP)])
    with Lab(spec) as the_lab:
        for router in the_lab.routers.values():
            assert router.netns is not None
            subprocess.run(["ip", "netns", "exec", router.netns, "sysctl", "-q", "-w",
                            f"net.netfilter.nf_conntrack_tcp_timeout_established={CONNTRACK_TIMEOUT}"], check=True)
        yield the_lab


def flows(lab: Lab, router: str) -> str:
    netns = lab.routers[router].netns
    assert netns is not None
    return subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-L", "-p", "tcp"], capture_output=True,
                          text=True, timeout=10).stdout


def test_an_expired_mapping_is_noticed_and_the_next_stream_works(lab: Lab) -> None:
    env = token_env(TOKEN)
    procs: list[subprocess.Popen[str]] = []
    try:
        # Pings every second keep the control connections' mappings alive; the punched session is idle.
        server = lab.server.popen([*PY, "server", "--listen", COORD, "--alt-address", "198.51.100.11",
                                   "--keepalive-interval", "1"], stderr=subprocess.PIPE, text=True, env=env)
        procs.append(server)
        assert server.stderr is not None and Tail(server.stderr).wait_for("listening on", 30)
        bob = lab.host("rc").popen([sys.executable, "-c", PEER, "echo", COORD, "bob", ""], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True, env=env)
        procs.append(bob)
        assert bob.stdout is not None and Tail(bob.stdout).wait_for("READY", 60)
        alice = lab.host("pr").popen([sys.executable, "-c", PEER, "open", COORD, "alice", "bob"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        procs.append(alice)
        assert alice.stdout is not None and alice.stdin is not None
        out = Tail(alice.stdout)
        assert out.wait_for("SESSION=", 60), out.text
        session = json.loads(next(line for line in out.lines if line.startswith("SESSION="))[len("SESSION="):])
        assert session["method"] == "direct", session
        local_port, remote_port = session["local"].rsplit(":", 1)[1], session["remote"].rsplit(":", 1)[1]
        punched = f"sport={local_port} dport={remote_port} "  # (the control connection shares the local port)
        assert punched in flows(lab, "pr")
        alice_router = lab.routers["pr"].wan_address

        def bobs_side() -> bool:  # bob's router's entry: its reply direction comes from alice's router
            lines = flows(lab, "rc").splitlines()
            return any(alice_router in line and f"dport={remote_port} " in line for line in lines)

        assert bobs_side()
        # Wait (bounded) until both routers forgot the punched flow: the mappings expired.
        deadline = time.monotonic() + 5 * CONNTRACK_TIMEOUT + 10
        while punched in flows(lab, "pr") or bobs_side():
            assert time.monotonic() < deadline, flows(lab, "pr") + flows(lab, "rc")
            time.sleep(0.2)  # polling the routers' tables with a deadline
        alice.stdin.write("go\n")
        alice.stdin.flush()
        assert out.wait_for("SECOND=", 60), out.text
        noticed = next(line for line in out.lines if line.startswith("PING="))
        assert noticed.startswith(("PING=answered", "PING=failed")), noticed
        if noticed.startswith("PING=failed"):
            assert "keepalive" in noticed.lower() or "timeout" in noticed.lower(), noticed
        second = next(line for line in out.lines if line.startswith("SECOND="))
        assert second.startswith("SECOND=two "), second
        print(noticed.strip(), "|", second.strip())
    finally:
        for proc in reversed(procs):
            stop(proc)
