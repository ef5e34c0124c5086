"""``tcppunch expose`` across the lab, as processes: a web server behind a symmetric-random NAT, exposed
on the lab server's port 8080, fetched by curl from a public host (32 at once, SHA-256 each); a port
outside --expose-ports refused with a clear line; the port closed once the exposing peer quits."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcppunch.lab import Lab, LabSpec, NatType, RouterSpec, SynPolicy
from tcppunch.lab.lines import wait_for_line
from tests.lab.processes import COORD, PY, lab_server, stop, token_env

TOKEN = "expose-lab-token"
URL = "http://198.51.100.10:8080/page.bin"
SIZE = 5_000_000
FETCHES = 32
CURL_REFUSED = 7  # curl's exit code for "failed to connect"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    spec = LabSpec([RouterSpec("rnd", NatType.SYMMETRIC_RANDOM, SynPolicy.DROP),
                    RouterSpec("pub", NatType.NONE)])
    with Lab(spec) as the_lab, lab_server(the_lab, TOKEN, "--expose-ports", "8000-9000"):
        yield the_lab


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    (root / "page.bin").write_bytes(os.urandom(SIZE))
    return root


def _expose(lab: Lab, *extra: str) -> subprocess.Popen[str]:
    return lab.host("rnd").popen([*PY, "expose", "--coordinator", COORD, "--id", "web", "--forward",
                                  "127.0.0.1:8000", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=token_env(TOKEN))


def test_curl_fetches_through_the_exposed_port_32_at_once_then_the_port_closes(
        lab: Lab, site: Path, tmp_path: Path) -> None:
    web = lab.host("rnd").popen([sys.executable, "-m", "http.server", "8000", "--bind", "127.0.0.1",
                                 "--directory", str(site)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    exposer = _expose(lab, "--remote-port", "8080", "--quiet", "--json")
    try:
        assert exposer.stderr is not None
        wait_for_line(exposer.stderr, "exposed 127.0.0.1:8000 at 198.51.100.10:8080", 30)
        want = hashlib.sha256((site / "page.bin").read_bytes()).hexdigest()
        outs = [tmp_path / f"fetch{i}.bin" for i in range(FETCHES)]
        curls = [lab.host("pub").popen(["curl", "-sS", "--max-time", "120", "-o", str(out), URL],
                                       stderr=subprocess.PIPE, text=True) for out in outs]
        for curl in curls:
            _, err = curl.communicate(timeout=150)
            assert curl.returncode == 0, err
        assert [hashlib.sha256(out.read_bytes()).hexdigest() for out in outs] == [want] * FETCHES
    finally:
        stop(exposer)
        stop(web)
    assert exposer.stdout is not None
    events = [json.loads(line) for line in exposer.stdout.read().splitlines()]
    assert events[0] == {"event": "exposed", "address": "198.51.100.10:8080", "forward": "127.0.0.1:8000"}
    visits = [e for e in events if e["event"] == "visitor"]
    assert len(visits) == FETCHES and all(e["error"] is None and e["to_visitor"] > SIZE for e in visits), visits
    # The exposing peer is gone: the server closes its port (bounded wait for the server to see the EOF).
    for _ in range(50):
        gone = lab.host("pub").run(["curl", "-sS", "--max-time", "5", "-o", "/dev/null", URL], timeout=10)
        if gone.returncode == CURL_REFUSED:
            break
    assert gone.returncode == CURL_REFUSED, gone.stderr


def test_a_port_outside_expose_ports_is_refused_with_one_clear_line(lab: Lab) -> None:
    refused = _expose(lab, "--remote-port", "22")
    _, err = refused.communicate(timeout=60)
    assert refused.returncode == 1
    assert "port 22 is not in --expose-ports 8000-9000" in err
    assert "Traceback" not in err
