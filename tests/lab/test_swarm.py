"""The swarm example (examples/swarm) in the NAT lab: a seeder and five leechers, each behind its own NAT
type, every peer a separate process on its lab host, a ``tcppunch server`` on the lab server.

Every leecher ends with the seeder's file (SHA-256), every pair of peers connects, directly exactly where
the NAT types allow it (tcppunch.lab.matrix.direct_expected) and through the relay elsewhere; and a peer
killed while others fetch from it costs only retries from the rest. The walkthrough programs of
docs/api.md run here too, as written.
"""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from examples.swarm.demo import DemoConfig, DemoResult, format_table, run_demo
from tcppunch.lab import Lab, LabHost, LabSpec, NatType, RouterSpec
from tcppunch.lab.matrix import direct_expected
from tcppunch.lab.server_process import lab_server

SIZE = 4_000_000


def _run(config: DemoConfig) -> DemoResult:
    lines: list[str] = []
    result = run_demo(config, progress=lines.append)
    print("\n".join(lines))
    print(format_table(result))
    return result


def test_every_leecher_gets_the_file_direct_where_the_nat_types_allow() -> None:
    # 4 MB/s per peer: the seeder alone cannot feed five leechers, so they trade among themselves
    result = _run(DemoConfig(size=SIZE, upload_rate=4e6, timeout=180))
    assert result.ok, result.errors
    leechers = [p for p in result.peers if not p.seeder]
    assert len(leechers) == 5 and all(p.complete and p.sha256_ok for p in leechers)
    assert sum(p.uploaded for p in leechers) > 0, "leechers never uploaded: not a swarm"
    for pair in result.pairs:
        expected = "direct" if direct_expected(pair.nat_a, pair.nat_b) else "relay"
        assert pair.method == expected, f"{pair.a} ~ {pair.b} ({pair.nat_a.value} ~ {pair.nat_b.value})"


def test_a_peer_killed_mid_transfer_costs_only_retries() -> None:
    # 1 MB/s per peer keeps the transfer going long enough to kill cgnat while a leecher waits on it
    result = _run(DemoConfig(size=SIZE, upload_rate=1e6, kill="cgnat", timeout=180))
    assert result.ok, result.errors
    killed = [p for p in result.peers if p.killed]
    assert [p.id for p in killed] == ["cgnat"]
    survivors = [p for p in result.peers if not p.seeder and not p.killed]
    assert len(survivors) == 4 and all(p.complete and p.sha256_ok for p in survivors)
    assert sum(p.requeued for p in survivors) >= 1, "nobody had to retry a piece the killed peer owed"


@pytest.mark.parametrize("bad", [["full-cone", "full-cone"], ["port-restricted"]])
def test_one_peer_per_nat_type(bad: list[str]) -> None:
    with pytest.raises(ValueError, match="one peer per NAT type"):
        run_demo(DemoConfig(leechers=bad))


# ----------------------------------------------------------------------------- docs/api.md runs as written


def _doc_programs(directory: Path) -> dict[str, Path]:
    """Every ```python block of docs/api.md whose first line is ``# file: NAME``, written to ``directory``."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    files = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        first, _, body = block.partition("\n")
        if first.startswith("# file: "):
            name = first.removeprefix("# file: ").strip()
            (directory / name).write_text(body)
            files[name] = directory / name
    return files


def _first_line_with(stream: IO[str] | None, needle: str, seconds: float) -> str:
    """Read ``stream`` (bounded) until a line contains ``needle``; a thread keeps draining it after."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert stream is not None
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r} within {seconds} s")


def test_api_walkthrough_programs_run(tmp_path: Path) -> None:
    files = _doc_programs(tmp_path)
    assert set(files) == {"echo_peer.py", "blocking_echo.py", "lab_pair.py"}
    py = sys.executable
    spec = LabSpec([RouterSpec("a", NatType.PORT_RESTRICTED), RouterSpec("b", NatType.SYMMETRIC_SEQ),
                    RouterSpec("c", NatType.SYMMETRIC_RANDOM)])
    with Lab(spec) as lab, lab_server(lab, "s3cret"):
        a, b, c = lab.host("a"), lab.host("b"), lab.host("c")
        listener = b.python([str(files["echo_peer.py"]), "listen", "bob", "--count", "4"], cwd=tmp_path,
                            stdout=subprocess.PIPE, text=True)
        _first_line_with(listener.stdout, "bob: registered", 30)

        def run(host: LabHost, *argv: str) -> str:
            done = host.run([py, *argv], cwd=tmp_path, timeout=60)
            assert done.returncode == 0, done.stderr
            print(done.stdout)
            return done.stdout

        out = run(a, str(files["echo_peer.py"]), "connect", "alice", "bob")
        assert "peers in the swarm: ['bob']" in out
        assert "connected to bob: direct" in out and "echo: hello from alice" in out
        out = run(a, str(files["blocking_echo.py"]), "carol", "bob")
        assert "direct in" in out and "echo: hello from carol" in out
        out = run(c, str(files["echo_peer.py"]), "connect", "dave", "bob")  # random mapping vs port filter
        assert "connected to bob: relay" in out and "relayed because" in out and "echo: hello from dave" in out
        out = run(a, str(files["echo_peer.py"]), "connect", "erin", "bob", "--relay", "always")
        assert "connected to bob: relay" in out and "echo: hello from erin" in out
        assert listener.wait(30) == 0
    done = subprocess.run([py, str(files["lab_pair.py"])], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    assert "alice -> bob: direct, bob got b'hi bob'" in done.stdout
