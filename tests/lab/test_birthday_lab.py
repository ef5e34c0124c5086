"""Birthday punching across real kernel NATs, through the public Peer API and a coordinator on the lab
server: symmetric-random with port-restricted and with cgnat go direct (the winner is a birthday
candidate, the bytes arrive intact: SHA-256 both ways), in both directions; a peer that opts out goes
to the relay without spraying. Few trials, to stay fast: scripts/bench_birthday.py measures rates.
Each direct cell misses with e^(-2*M*N/R) = 0.03 % (two hard rounds, tcppunch.punch.birthday): no retry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
from collections.abc import Iterator

import pytest

from tcppunch.lab import Lab, LabSpec, LinkShape, NatType, RouterSpec, SynPolicy
from tcppunch.labrun import COORDINATOR, TOKEN, LabRunner
from tcppunch.peer import Method, Peer
from tcppunch.punch.plan import CandidateKind
from tcppunch.wire.natreport import NatReport

LINK = LinkShape(delay_ms=5.0)


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Lab, LabRunner]]:
    spec = LabSpec([RouterSpec("rnd", NatType.SYMMETRIC_RANDOM, SynPolicy.DROP, link=LINK),
                    RouterSpec("pr", NatType.PORT_RESTRICTED, SynPolicy.DROP, link=LINK),
                    RouterSpec("cgn", NatType.CGNAT, SynPolicy.DROP, link=LINK)])
    with Lab(spec) as lab, LabRunner(lab) as runner:
        yield lab, runner


@pytest.mark.parametrize(("a", "b"), [("rnd", "pr"), ("pr", "rnd"), ("rnd", "cgn"), ("cgn", "rnd")])
def test_random_and_port_filtering_nat_go_direct_by_birthday(lab: tuple[Lab, LabRunner], a: str, b: str) -> None:
    lab_, runner = lab
    result = runner.pair(lab_.host(a), lab_.host(b), size=1_000_000, timeout=30)
    assert result.error is None, result.error
    assert result.ok, "SHA-256 mismatch"
    assert result.method is Method.DIRECT, (result.relay_reason, result.attempts[-5:])
    assert result.candidate is CandidateKind.BIRTHDAY


async def _listen(nat: NatReport, registered: concurrent.futures.Future[None], payload: bytes) -> str:
    async with Peer(COORDINATOR, "optout-l", TOKEN, nat=nat) as peer:
        registered.set_result(None)
        conn = await peer.accept(timeout=30)
        conn.writer.write(payload)
        conn.writer.write_eof()
        got = await conn.reader.read()
        conn.close()
        return hashlib.sha256(got).hexdigest()


async def _connect(nat: NatReport, registered: concurrent.futures.Future[None], payload: bytes
                   ) -> tuple[str, Method, str | None, set[str]]:
    await asyncio.wait_for(asyncio.wrap_future(registered), 30)
    async with Peer(COORDINATOR, "optout-c", TOKEN, nat=nat, birthday=None) as peer:
        conn = await peer.connect("optout-l", timeout=30)
        conn.writer.write(payload)
        conn.writer.write_eof()
        got = await conn.reader.read()
        conn.close()
        return hashlib.sha256(got).hexdigest(), conn.method, conn.info.relay_reason, set(conn.info.timings)


def test_opting_out_goes_to_the_relay_at_once(lab: tuple[Lab, LabRunner]) -> None:
    lab_, runner = lab
    rnd, pr = lab_.host("rnd"), lab_.host("pr")
    up, down = os.urandom(200_000), os.urandom(200_000)
    registered: concurrent.futures.Future[None] = concurrent.futures.Future()
    listener = runner.loop(pr).submit(_listen(runner.detect(pr), registered, down))
    got_down, method, reason, timed = runner.loop(rnd).run(_connect(runner.detect(rnd), registered, up), timeout=60)
    assert listener.result(30) == hashlib.sha256(up).hexdigest()
    assert got_down == hashlib.sha256(down).hexdigest()
    assert method is Method.RELAY
    assert reason is not None and reason.startswith("direct cannot work"), reason  # relay-now, no spray
    assert "punch" not in timed  # no punch (and no spray) before the relay
