"""Long-lived Peers on lab hosts: many sessions over one registration stay direct, also behind a
sequential NAT whose public port moves with every new connection."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tcppunch.lab import Lab, LabSpec, NatType, RouterSpec, SynPolicy
from tcppunch.labrun import COORDINATOR, TOKEN, LabRunner
from tcppunch.peer import Method, Peer
from tcppunch.wire.natreport import NatReport


@pytest.fixture(scope="module")
def lab_and_runner() -> Iterator[tuple[Lab, LabRunner]]:
    spec = LabSpec([RouterSpec("seq", NatType.SYMMETRIC_SEQ, SynPolicy.DROP),
                    RouterSpec("pr", NatType.PORT_RESTRICTED, SynPolicy.DROP),
                    RouterSpec("seqr", NatType.SYMMETRIC_SEQ, SynPolicy.DROP)])
    with Lab(spec) as lab, LabRunner(lab) as runner:
        yield lab, runner


async def _serve(peer: Peer, count: int) -> list[Method]:
    methods = []
    for _ in range(count):
        conn = await peer.accept(timeout=30)
        conn.writer.write(await conn.reader.readexactly(5))
        conn.writer.write_eof()
        methods.append(conn.method)
        await conn.reader.read()
        conn.close()
    return methods


async def _dial(peer: Peer, target: str, count: int) -> list[Method]:
    methods = []
    for _ in range(count):
        conn = await peer.connect(target, timeout=30)
        conn.writer.write(b"hello")
        conn.writer.write_eof()
        assert await conn.reader.read() == b"hello"
        methods.append(conn.method)
        conn.close()
    return methods


@pytest.mark.parametrize("other", ["pr", "seqr"])
def test_sequential_peer_stays_direct_over_many_sessions(lab_and_runner: tuple[Lab, LabRunner], other: str) -> None:
    lab, runner = lab_and_runner
    seq, peer = lab.host("seq"), lab.host(other)
    nat_seq, nat_other = runner.detect(seq), runner.detect(peer)
    seq_loop, other_loop = runner.loop(seq), runner.loop(peer)
    ids = (f"seq-{other}", f"{other}-long")

    async def start(pid: str, nat: NatReport) -> Peer:
        p = Peer(COORDINATOR, pid, TOKEN, nat=nat)
        await p.start()
        return p

    p_seq = seq_loop.run(start(ids[0], nat_seq))
    p_other = other_loop.run(start(ids[1], nat_other))
    try:
        assert p_seq.sequential_nat and p_other.sequential_nat is (other == "seqr")
        for _ in range(2):  # both directions, several sessions each, one registration
            serving = seq_loop.submit(_serve(p_seq, 3))
            assert other_loop.run(_dial(p_other, ids[0], 3), timeout=120) == [Method.DIRECT] * 3
            assert serving.result(60) == [Method.DIRECT] * 3
            serving = other_loop.submit(_serve(p_other, 3))
            assert seq_loop.run(_dial(p_seq, ids[1], 3), timeout=120) == [Method.DIRECT] * 3
            assert serving.result(60) == [Method.DIRECT] * 3
    finally:
        seq_loop.run(p_seq.close())
        other_loop.run(p_other.close())


def test_one_peer_serves_many_concurrent_connects(lab_and_runner: tuple[Lab, LabRunner]) -> None:
    """Several peers dial one long-lived peer at once, round after round: every connection direct."""
    lab, runner = lab_and_runner
    hub, dialers = lab.host("pr"), [lab.host("seq"), lab.host("seqr"), lab.host("pr", 0)]
    hub_loop = runner.loop(hub)

    async def start(pid: str, host_name: str) -> Peer:
        p = Peer(COORDINATOR, pid, TOKEN, nat=runner.detect(lab.hosts[host_name]))
        await p.start()
        return p

    hub_peer = hub_loop.run(start("hub", hub.name))
    callers = [(runner.loop(h), runner.loop(h).run(start(f"caller{i}", h.name))) for i, h in enumerate(dialers)]
    try:
        for _ in range(2):
            serving = hub_loop.submit(_serve(hub_peer, len(callers)))
            dials = [loop.submit(_dial(p, "hub", 1)) for loop, p in callers]
            assert [d.result(90) for d in dials] == [[Method.DIRECT]] * len(callers)
            assert serving.result(90) == [Method.DIRECT] * len(callers)
    finally:
        hub_loop.run(hub_peer.close())
        for loop, p in callers:
            loop.run(p.close())
