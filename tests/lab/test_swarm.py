"""The swarm example (examples/swarm) in the NAT lab: a seeder and five leechers, each behind its own NAT
type, every peer a separate process on its lab host, a ``tcppunch server`` on the lab server.

Every leecher ends with the seeder's file (SHA-256), every pair of peers connects, directly exactly where
the NAT types allow it (tcppunch.lab.matrix.direct_expected) and through the relay elsewhere; and a peer
killed while others fetch from it costs only retries from the rest.
"""

from __future__ import annotations

import pytest

from examples.swarm.demo import DemoConfig, DemoResult, format_table, run_demo
from tcppunch.lab.matrix import direct_expected

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
