"""Building, shaping, using and removing labs; nothing is left behind, even after a failure."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tcppunch.lab import Lab, LabError, LabSpec, LinkShape, NatType, RouterSpec, SynPolicy, running_labs
from tcppunch.lab import netns as ns

TCPPUNCH = [sys.executable, "-m", "tcppunch"]


def _lab_namespaces(prefix: str) -> list[str]:
    return [n for n in ns.list_netns() if n.startswith(prefix + "-")]


def test_down_removes_every_namespace_and_process() -> None:
    lab = Lab(LabSpec([RouterSpec("a", NatType.CGNAT, hosts=2), RouterSpec("b", NatType.FULL_CONE,
                                                                            link=LinkShape(delay_ms=5))]))
    lab.up()
    assert sorted(_lab_namespaces(lab.prefix)) == sorted(lab.namespaces)
    sleeper = lab.host("a", 1).popen(["sleep", "30"])
    lab.down()
    assert _lab_namespaces(lab.prefix) == []
    assert sleeper.wait(5) is not None
    assert lab.prefix not in running_labs()
    lab.down()  # idempotent


def test_failed_build_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    lab = Lab(LabSpec([RouterSpec("a"), RouterSpec("b")]))
    calls = []

    def broken(router: object) -> None:
        calls.append(router)
        raise LabError("injected failure")

    monkeypatch.setattr(lab, "_build_router", broken)
    with pytest.raises(LabError, match="injected failure"):
        lab.up()
    assert calls
    assert _lab_namespaces(lab.prefix) == []


def test_hosts_behind_one_router_share_a_lan_and_a_public_address() -> None:
    with Lab(LabSpec([RouterSpec("a", NatType.PORT_RESTRICTED, hosts=2)])) as lab:
        h1, h2 = lab.host("a", 0), lab.host("a", 1)
        assert h1.public_address == h2.public_address == "198.51.100.101"
        listener = h2.call(lambda: _listen(h2.address))
        try:
            assert h1.call(lambda: _roundtrip(h2.address, listener.getsockname()[1])) == b"pong"
        finally:
            listener.close()


def _listen(addr: str) -> socket.socket:
    s = socket.socket()
    s.bind((addr, 0))
    s.listen()
    s.settimeout(5)

    def serve() -> None:
        conn, _ = s.accept()
        with conn:
            conn.recv(4)
            conn.sendall(b"pong")

    import threading

    threading.Thread(target=serve, daemon=True).start()
    return s


def _roundtrip(addr: str, port: int) -> bytes:
    with socket.create_connection((addr, port), timeout=5) as c:
        c.sendall(b"ping")
        return c.recv(4)


def _connect_rtt(target: tuple[str, int]) -> float:
    """Time of a refused TCP connect: one round trip (SYN out, RST back)."""
    s = socket.socket()
    s.settimeout(5)
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        s.connect(target)
    s.close()
    return time.monotonic() - start


def test_link_delay_is_added_each_way() -> None:
    spec = LabSpec([RouterSpec("a", NatType.NONE, link=LinkShape(delay_ms=25)), RouterSpec("b", NatType.NONE)])
    with Lab(spec) as lab:
        shaped = min(lab.host("a").call(_connect_rtt, ("198.51.100.10", 9)) for _ in range(3))
        plain = lab.host("b").call(_connect_rtt, ("198.51.100.10", 9))
    # 25 ms each way on a's link: no round trip through it can take less than 50 ms (a lower bound the
    # shaper guarantees, not a speed figure); b's unshaped link answers too (refused, not dropped).
    assert shaped >= 0.050
    assert plain > 0


def test_lossy_link_still_carries_tcp_intact() -> None:
    spec = LabSpec([RouterSpec("a", NatType.PORT_RESTRICTED, link=LinkShape(delay_ms=2, loss=0.05))])
    payload = os.urandom(512 * 1024)
    with Lab(spec) as lab:
        srv = lab.server.call(lambda: _sink_listener())
        try:
            digest = lab.host("a").call(lambda: _send_all(srv.getsockname(), payload))
            assert digest == hashlib.sha256(payload).hexdigest()
        finally:
            srv.close()


def _sink_listener() -> socket.socket:
    s = socket.socket()
    s.bind(("198.51.100.10", 0))
    s.listen()
    s.settimeout(30)

    def serve() -> None:
        conn, _ = s.accept()
        with conn:
            h = hashlib.sha256()
            while chunk := conn.recv(65536):
                h.update(chunk)
            conn.sendall(h.hexdigest().encode())

    import threading

    threading.Thread(target=serve, daemon=True).start()
    return s


def _send_all(target: tuple[str, int], payload: bytes) -> str:
    with socket.create_connection(target, timeout=30) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        return c.recv(64).decode()


def test_cli_up_status_exec_down() -> None:
    up = subprocess.run([*TCPPUNCH, "lab", "up", "--router", "a=restricted:rst", "--json"], capture_output=True,
                        text=True, timeout=60, check=True)
    desc = json.loads(up.stdout)
    prefix = desc["prefix"]
    try:
        assert [h["nat"] for h in desc["hosts"]] == ["restricted"]
        status = subprocess.run([*TCPPUNCH, "lab", "status"], capture_output=True, text=True, timeout=30, check=True)
        assert prefix in status.stdout.split()
        ran = subprocess.run([*TCPPUNCH, "lab", "exec", prefix, "a1", "--", "ip", "-4", "-o", "addr", "show", "eth0"],
                             capture_output=True, text=True, timeout=30, check=True)
        assert "10.0.1.2/24" in ran.stdout
    finally:
        down = subprocess.run([*TCPPUNCH, "lab", "down", prefix], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert _lab_namespaces(prefix) == []


def test_cli_up_with_delay_returns_when_its_output_is_captured() -> None:
    """The link shapers of a shaped lab outlive `lab up`: they must not hold the caller's pipes (issue 14)."""
    argv = [*TCPPUNCH, "lab", "up", "--router", "a=port-restricted", "--router", "b=symmetric-seq", "--delay-ms", "5",
            "--json"]
    try:
        up = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as hung:
        # `lab up` printed its JSON and exited, but a daemon kept our pipes open: remove that lab (ours by its
        # own description, never another run's) and fail.
        out = hung.stdout.decode() if isinstance(hung.stdout, bytes) else (hung.stdout or "")
        _down(json.loads(out)["prefix"])
        pytest.fail("`tcppunch lab up --delay-ms 5` did not return with its output captured")
    assert up.returncode == 0, up.stderr
    prefix = json.loads(up.stdout)["prefix"]
    try:
        shapers = ns.netns_pids(f"{prefix}-inet")
        assert len(shapers) == 2  # one per shaped WAN link
        for pid in shapers:
            assert os.getsid(pid) == pid  # a session of its own, no controlling terminal of ours
            assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
            assert os.readlink(f"/proc/{pid}/fd/2").startswith(f"/run/tcppunch-lab/{prefix}/shaper-")
    finally:
        _down(prefix)
    assert _lab_namespaces(prefix) == []
    assert not os.path.exists(f"/run/tcppunch-lab/{prefix}")


def _down(prefix: str) -> None:
    done = subprocess.run([*TCPPUNCH, "lab", "down", prefix], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_cli_rejects_unknown_nat_type() -> None:
    bad = subprocess.run([*TCPPUNCH, "lab", "up", "--router", "a=wormhole"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2
    assert "wormhole" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_syn_policy_names_are_the_cli_words() -> None:
    assert {p.value for p in SynPolicy} == {"drop", "rst"}
