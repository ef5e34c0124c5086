"""Sessions across the NAT lab with the real CLI: many local clients of `connect --local` ride one
session to `listen --forward` (one punch, no relay, every byte intact), and a session that had to start
on the relay moves to the direct path in the middle of a 100 MB stream."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tcppunch.lab import Lab, LabHost, LabSpec, LinkShape, NatType, RouterSpec, SynPolicy
from tcppunch.lab.lines import Tail
from tcppunch.lab.netns import in_netns, run
from tests.lab.processes import COORD, PY, lab_server, stop, token_env

TOKEN = "sessions-lab-token"
SERVER_IPS = "{ 198.51.100.10, 198.51.100.11 }"

# N threads each fetch URL and print the SHA-256 of what they got, one per line.
FETCH_MANY = """
import hashlib, sys, threading, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
out = [None] * n
def fetch(i):
    out[i] = hashlib.sha256(urllib.request.urlopen(url, timeout=60).read()).hexdigest()
threads = [threading.Thread(target=fetch, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join(90)
print("\\n".join(str(x) for x in out))
"""

# One fetch that reads 8 MB, says 'halfway', waits for a line on stdin, then reads the rest.
FETCH_PAUSED = """
import hashlib, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=120)
s.sendall(b"GET /big.bin HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
data = bytearray()
while b"\\r\\n\\r\\n" not in data:
    data += s.recv(65536)
head, _, body = bytes(data).partition(b"\\r\\n\\r\\n")
digest, total, said = hashlib.sha256(body), len(body), False
while chunk := s.recv(1 << 20):
    digest.update(chunk)
    total += len(chunk)
    if not said and total >= 8_000_000:
        said = True
        print("halfway", flush=True)
        sys.stdin.readline()
print(total, digest.hexdigest(), flush=True)
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    link = LinkShape(delay_ms=10)
    spec = LabSpec([RouterSpec("pr", NatType.PORT_RESTRICTED, SynPolicy.DROP, link=link),
                    RouterSpec("seq", NatType.SYMMETRIC_SEQ, SynPolicy.DROP, link=link),
                    RouterSpec("prb", NatType.PORT_RESTRICTED, SynPolicy.DROP)])
    with Lab(spec) as the_lab, lab_server(the_lab, TOKEN):
        yield the_lab


def _start(host: LabHost, argv: list[str], needle: str, **kwargs: Any) -> tuple[subprocess.Popen[str], Tail]:
    proc = host.popen(argv, stderr=subprocess.PIPE, text=True, env=token_env(TOKEN), **kwargs)
    assert proc.stderr is not None
    tail = Tail(proc.stderr)
    assert tail.wait_for(needle, 30), tail.text
    return proc, tail


def _stop(*procs: subprocess.Popen[Any] | None) -> None:
    for proc in procs:
        if proc is not None:
            stop(proc)


def _serve_files(host: LabHost, site: Path) -> subprocess.Popen[Any]:
    """A threaded web server on the host's 127.0.0.1:8080, returned once it serves."""
    web = host.popen([sys.executable, "-u", "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory",
                      str(site)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert web.stdout is not None
    tail = Tail(web.stdout)
    assert tail.wait_for("Serving HTTP", 20), tail.text
    return web


def _forward_pair(lab: Lab, tmp: Path, client_router: str, server_router: str, name: str,
                  ) -> tuple[subprocess.Popen[str], Tail, subprocess.Popen[str], Tail, Path]:
    server_host, client_host = lab.host(server_router), lab.host(client_router)
    # --forward names the keys that may reach the service (every process of the test run shares one key)
    browser_key = subprocess.run([*PY, "id"], capture_output=True, text=True, check=True).stdout.strip()
    listener, listen_tail = _start(server_host, [*PY, "listen", "--coordinator", COORD, "--id", f"{name}-web",
                                                 "--forward", "127.0.0.1:8080", "--allow", browser_key],
                                   "listening as")
    report = tmp / f"{name}.json"
    connector, connect_tail = _start(client_host, [*PY, "connect", f"{name}-web", "--coordinator", COORD, "--id",
                                                   f"{name}-browser", "--local", "127.0.0.1:9000",
                                                   "--report", str(report)], "accepting local")
    return listener, listen_tail, connector, connect_tail, report


def test_parallel_fetches_share_one_punched_session(lab: Lab, tmp_path: Path) -> None:
    """8 and then 32 concurrent 5 MB fetches: all intact, one punch, no relay."""
    site = tmp_path / "site"
    site.mkdir()
    page = os.urandom(5_000_000)
    (site / "page.bin").write_bytes(page)
    web = _serve_files(lab.host("seq"), site)
    listener = connector = None
    try:
        listener, listen_tail, connector, connect_tail, report = _forward_pair(lab, tmp_path, "pr", "seq", "par")
        for count in (8, 32):
            got = lab.host("pr").run([sys.executable, "-c", FETCH_MANY, "http://127.0.0.1:9000/page.bin",
                                      str(count)], timeout=120)
            assert got.returncode == 0, got.stderr
            assert got.stdout.split() == [hashlib.sha256(page).hexdigest()] * count
        _stop(connector)
        assert connect_tail.count("tcppunch: punch:") == 1, connect_tail.text  # one punch for 40 clients
        assert connect_tail.count("tcppunch: relay") == 0, connect_tail.text
        assert listen_tail.count("tcppunch: relay") == 0, listen_tail.text
        data = json.loads(report.read_text())
        assert data["method"] == "direct" and data["history"] == "direct"
        assert "Traceback" not in connect_tail.text and "GeneratorExit" not in connect_tail.text
    finally:
        _stop(connector, listener, web)


def _drop_syns(router_netns: str) -> None:
    """Drop every TCP SYN through the router except those to the coordinator: no punch can succeed."""
    run(in_netns(router_netns, ["nft", "-f", "-"]), input_text=(
        "table inet mux_test_block {\n"
        "  chain forward { type filter hook forward priority -10; policy accept;\n"
        f"    ip daddr != {SERVER_IPS} ip saddr != {SERVER_IPS} tcp flags & (syn | ack) == syn drop\n"
        "  }\n}\n"))


def test_session_starts_on_relay_and_moves_to_direct_mid_stream(lab: Lab, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    big = os.urandom(100_000_000)
    (site / "big.bin").write_bytes(big)
    router_netns = lab.routers["prb"].netns
    assert router_netns is not None
    web = _serve_files(lab.host("pr"), site)
    listener = connector = fetch = None
    _drop_syns(router_netns)
    try:
        listener, listen_tail, connector, connect_tail, report = _forward_pair(lab, tmp_path, "prb", "pr", "upg")
        fetch = lab.host("prb").popen([sys.executable, "-c", FETCH_PAUSED, "9000"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert fetch.stdout is not None and fetch.stdin is not None
        fetched = Tail(fetch.stdout)
        # the session starts on the relay while the punch keeps failing ...
        assert connect_tail.wait_for("tcppunch: relayed:", 30), connect_tail.text
        assert fetched.wait_for("halfway", 60), connect_tail.text
        # ... then the path opens: the punch that kept running wins and the session moves
        run(in_netns(router_netns, ["nft", "delete", "table", "inet", "mux_test_block"]))
        assert connect_tail.wait_for("tcppunch: upgraded:", 30), connect_tail.text
        fetch.stdin.write("go\n")
        fetch.stdin.flush()
        assert fetch.wait(120) == 0
        total, digest = fetched.lines[-1].split()
        assert int(total) == len(big) and digest == hashlib.sha256(big).hexdigest()
        assert listen_tail.wait_for("tcppunch: upgraded:", 10), listen_tail.text
        _stop(connector)
        data = json.loads(report.read_text())
        assert data["method"] == "direct"
        assert data["history"].startswith("relay → direct at "), data
    finally:
        subprocess.run(in_netns(router_netns, ["nft", "delete", "table", "inet", "mux_test_block"]),
                       capture_output=True, check=False, timeout=10)  # gone already unless the test failed early
        _stop(fetch, connector, listener, web)
