"""The real command-line tools across the lab: tcppunch server / listen / connect as processes.

netcat mode moves 10 MB each way (SHA-256 on both ends); forward mode serves a web page from behind
one NAT to a browser-like client behind another; the reports say direct or relay as the types predict.
"""

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

from tcppunch.lab import Lab, LabHost
from tcppunch.lab.lines import LineTimeout, wait_for_line
from tcppunch.wire.endpoint import Endpoint
from tests.lab.processes import COORD, PY, four_nats, lab_server, token_env

TOKEN = "cli-lab-token"


def env(token: str = TOKEN) -> dict[str, str]:
    return token_env(token)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(four_nats()) as the_lab, lab_server(the_lab, TOKEN):
        yield the_lab


def _listen(host: LabHost, peer_id: str, stdin: Path, stdout: Path, report: Path, *extra: str
            ) -> subprocess.Popen[str]:
    proc = host.popen([*PY, "listen", "--coordinator", COORD, "--id", peer_id, "--once",
                       "--report", str(report), *extra],
                      stdin=stdin.open("rb"), stdout=stdout.open("wb"), stderr=subprocess.PIPE, text=True, env=env())
    assert proc.stderr is not None
    wait_for_line(proc.stderr, "listening as", 30)
    return proc


def _files(tmp: Path, name: str, size: int) -> tuple[Path, Path]:
    src, dst = tmp / f"{name}.in", tmp / f"{name}.out"
    src.write_bytes(os.urandom(size))
    return src, dst


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _netcat_pair(a: LabHost, a_id: str, b: LabHost, b_id: str, tmp: Path, size: int, *extra: str
                 ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``size`` random bytes each way between ``connect`` on ``a`` (with ``extra``) and ``listen --once`` on
    ``b``, both in netcat mode; both exit 0 and both directions arrive intact (SHA-256). Returns the
    connect run and its --report."""
    a_in, a_out = _files(tmp, "a", size)
    b_in, b_out = _files(tmp, "b", size)
    listener = _listen(b, b_id, b_in, b_out, tmp / "b.json")
    done = a.run([*PY, "connect", b_id, "--coordinator", COORD, "--id", a_id, "--report", str(tmp / "a.json"),
                  *extra], stdin=a_in.open("rb"), stdout=a_out.open("wb"), capture_output=False,
                 stderr=subprocess.PIPE, timeout=120, env=env())
    assert done.returncode == 0, done.stderr
    assert listener.wait(60) == 0
    assert _sha(a_in) == _sha(b_out) and _sha(b_in) == _sha(a_out)
    return done, json.loads((tmp / "a.json").read_text())


@pytest.mark.parametrize(("a", "b", "method"), [("pr", "seq", "direct"), ("seq", "pr", "direct"),
                                                ("rnda", "rndb", "relay")])
def test_netcat_mode_moves_10_mb_each_way(lab: Lab, tmp_path: Path, a: str, b: str, method: str) -> None:
    done, report = _netcat_pair(lab.host(a), f"{a}-c", lab.host(b), f"{b}-l", tmp_path, 10_000_000)
    assert report["method"] == method
    assert report["peer"] == f"{b}-l"
    assert {"register", "total"} <= set(report["timings"])
    assert report["self"]["coordinator"] == COORD and report["self"]["register_attempts"] >= 1
    assert json.loads((tmp_path / "b.json").read_text())["method"] == method
    assert f"{method}:" in done.stderr.replace("relayed:", "relay:")


@pytest.mark.parametrize(("opt_out", "method", "candidate"), [(False, "direct", "birthday"), (True, "relay", None)])
def test_birthday_punch_and_its_opt_out(lab: Lab, tmp_path: Path, opt_out: bool, method: str,
                                        candidate: str | None) -> None:
    """symmetric-random -> port-restricted goes direct by birthday punching; --no-birthday on either side
    (here the connecting one) sends the pair to the relay at once."""
    suffix = "x" if opt_out else "b"
    extra = ["--no-birthday"] if opt_out else []
    _, report = _netcat_pair(lab.host("rnda"), f"rnda-{suffix}", lab.host("pr"), f"pr-{suffix}", tmp_path, 1_000_000,
                             *extra)
    assert report["method"] == method
    assert report["candidate"] == candidate
    if opt_out:
        assert report["relay_reason"].startswith("direct cannot work")  # relay-now: no spray, no deadline


def test_forward_exposes_a_local_web_server(lab: Lab, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    page = os.urandom(300_000)
    (site / "page.bin").write_bytes(page)
    b, a = lab.host("pr"), lab.host("seq")
    web = b.popen([sys.executable, "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory", str(site)],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    exposer = forwarder = None
    try:
        # --forward names the keys that may reach the service (every lab process shares one key here)
        browser_key = subprocess.run([*PY, "id"], capture_output=True, text=True, check=True).stdout.strip()
        exposer = b.popen([*PY, "listen", "--coordinator", COORD, "--id", "web", "--forward", "127.0.0.1:8080",
                           "--allow", browser_key], stderr=subprocess.PIPE, text=True, env=env())
        assert exposer.stderr is not None
        wait_for_line(exposer.stderr, "listening as", 30)
        forwarder = a.popen([*PY, "connect", "web", "--coordinator", COORD, "--id", "browser",
                             "--local", "127.0.0.1:9000"], stderr=subprocess.PIPE, text=True, env=env())
        assert forwarder.stderr is not None
        wait_for_line(forwarder.stderr, "accepting local", 30)
        fetch = ("import sys,urllib.request;"
                 "sys.stdout.buffer.write(urllib.request.urlopen('http://127.0.0.1:9000/page.bin',timeout=30).read())")
        for _ in range(2):  # two requests: each local client gets its own punched connection
            got = a.run([sys.executable, "-c", fetch], capture_output=True, text=False, timeout=60)
            assert got.returncode == 0, got.stderr
            assert got.stdout == page
    finally:
        for proc in (forwarder, exposer, web):
            if proc is not None:
                proc.terminate()
                proc.wait(10)


def test_connect_to_unknown_peer_is_one_clear_line(lab: Lab) -> None:
    done = lab.host("pr").run([*PY, "connect", "nobody", "--coordinator", COORD, "--id", "lost",
                               "--no-detect"], stdin=subprocess.DEVNULL, timeout=60, env=env())
    assert done.returncode == 1
    assert "unknown-peer" in done.stderr
    assert "Traceback" not in done.stderr


def test_wrong_token_is_refused_cleanly(lab: Lab) -> None:
    done = lab.host("pr").run([*PY, "listen", "--coordinator", COORD, "--id", "intruder",
                               "--no-detect", "--once"], stdin=subprocess.DEVNULL, timeout=60,
                              env=env("wrong"))
    assert done.returncode != 0
    assert "bad-token" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_lab_server_that_cannot_start_says_why(lab: Lab) -> None:
    """The shared start-up stops waiting when the server exits and quotes its own error (it used to wait
    out the whole ready timeout and fail with no reason)."""
    with pytest.raises(LineTimeout, match=r"tcppunch server ended: .*--expose-ports"), \
            lab_server(lab, TOKEN, "--expose-ports", "9000-8000", listen=Endpoint("198.51.100.10", 3495)):
        pass
