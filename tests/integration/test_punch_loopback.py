"""Two punch engines in one event loop on loopback (127.0.0.1 and 127.0.0.2): they fire at the same time,
agree on one verified connection and move bytes both ways; strangers and refusals are handled."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from tcppunch.punch.engine import punch
from tcppunch.punch.handshake import Handshake
from tcppunch.punch.plan import (
    AttemptOutcome,
    Candidate,
    CandidateKind,
    PunchFailed,
    PunchPlan,
    PunchResult,
    RetryPolicy,
    Role,
)
from tcppunch.punch.sockets import reuse_listener, reuse_socket
from tcppunch.wire.endpoint import Endpoint

KEY = os.urandom(32)
T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def listener(ip: str) -> socket.socket:
    return reuse_listener(Endpoint(ip, 0))


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def plan_for(
    role: Role,
    local: Endpoint,
    peers: list[Endpoint],
    fire_at: float,
    *,
    session: str = "s1",
    key: bytes = KEY,
    deadline: float = 5.0,
    low_ttl: int | None = None,
    retry: RetryPolicy | None = None,
) -> PunchPlan:
    return PunchPlan(
        local=local,
        role=role,
        session_id=session,
        key=key,
        candidates=tuple(Candidate(p, CandidateKind.OBSERVED) for p in peers),
        fire_at=fire_at,
        deadline=fire_at + deadline,
        low_ttl=low_ttl,
        retry=retry or RetryPolicy(),
    )


async def pair(*, low_ttl: int | None = None) -> tuple[PunchResult, PunchResult]:
    la, lb = listener("127.0.0.1"), listener("127.0.0.2")
    try:
        a_ep, b_ep = Endpoint("127.0.0.1", port_of(la)), Endpoint("127.0.0.2", port_of(lb))
        fire = asyncio.get_running_loop().time() + 0.05
        ra, rb = await asyncio.gather(
            punch(plan_for(Role.INITIATOR, a_ep, [b_ep], fire, low_ttl=low_ttl), listener=la),
            punch(plan_for(Role.RESPONDER, b_ep, [a_ep], fire, low_ttl=low_ttl), listener=lb),
        )
    finally:
        la.close()
        lb.close()
    return ra, rb


async def close_all(*results: PunchResult) -> None:
    for r in results:
        if r.writer is not None:
            r.writer.close()
            await r.writer.wait_closed()
        else:
            r.sock.close()


async def exchange(ra: PunchResult, rb: PunchResult, size: int) -> tuple[str, str, str, str]:
    """Send ``size`` random bytes each way at once; return (sent a, got at b, sent b, got at a) digests."""
    assert ra.reader and ra.writer and rb.reader and rb.writer
    data_a, data_b = os.urandom(size), os.urandom(size)

    async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
        writer.write_eof()

    async def recv(reader: asyncio.StreamReader) -> bytes:
        return await reader.read()

    _, _, got_b, got_a = await asyncio.gather(
        send(ra.writer, data_a), send(rb.writer, data_b), recv(rb.reader), recv(ra.reader)
    )
    for r in (ra, rb):
        assert r.writer is not None
        r.writer.close()
        await r.writer.wait_closed()
    h = hashlib.sha256
    return h(data_a).hexdigest(), h(got_b).hexdigest(), h(data_b).hexdigest(), h(got_a).hexdigest()


def test_simultaneous_fire_agrees_on_one_verified_connection_and_moves_bytes() -> None:
    async def main() -> tuple[PunchResult, PunchResult, tuple[str, str, str, str]]:
        ra, rb = await pair()
        return ra, rb, await exchange(ra, rb, 2_000_000)

    ra, rb, (sent_a, got_b, sent_b, got_a) = run(main())
    # the same TCP connection on both sides
    assert ra.local == rb.remote and rb.local == ra.remote
    assert ra.role is Role.INITIATOR and rb.role is Role.RESPONDER
    assert {ra.via, rb.via} <= {"connect", "accept"}
    assert sent_a == got_b and sent_b == got_a
    for r in (ra, rb):
        outcomes = [a.outcome for a in r.attempts]
        assert AttemptOutcome.VERIFIED in outcomes and outcomes.count(AttemptOutcome.SELECTED) == 1
        assert 0 <= r.timings.verified <= r.timings.selected


def test_low_ttl_priming_path_still_connects() -> None:
    async def main() -> tuple[Endpoint, Endpoint, Endpoint, Endpoint]:
        ra, rb = await pair(low_ttl=2)
        await close_all(ra, rb)
        return ra.local, ra.remote, rb.local, rb.remote

    a_local, a_remote, b_local, b_remote = run(main())
    assert a_local == b_remote and b_local == a_remote


def test_stranger_without_key_is_rejected_and_real_pair_wins() -> None:
    async def stranger(target: Endpoint, payload: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(target.ip, target.port)
        writer.write(payload)
        await writer.drain()
        answer = await reader.read(1000)  # the engine's HELLO, then EOF when it gives up on us
        writer.close()
        return answer

    async def main() -> tuple[PunchResult, PunchResult, list[bytes]]:
        la, lb = listener("127.0.0.1"), listener("127.0.0.2")
        try:
            a_ep, b_ep = Endpoint("127.0.0.1", port_of(la)), Endpoint("127.0.0.2", port_of(lb))
            fire = asyncio.get_running_loop().time() + 0.3
            fake = Handshake(role=Role.INITIATOR, session_id="s1", key=b"wrong key 123456", nonce=os.urandom(16))
            ta = asyncio.ensure_future(punch(plan_for(Role.INITIATOR, a_ep, [b_ep], fire), listener=la))
            tb = asyncio.ensure_future(punch(plan_for(Role.RESPONDER, b_ep, [a_ep], fire), listener=lb))
            # before the peers fire: one stranger speaks garbage, one a HELLO made with the wrong key
            answers = await asyncio.gather(
                stranger(b_ep, b"GET / HTTP/1.1\r\n\r\n"), stranger(b_ep, fake.hello()), stranger(a_ep, b"x" * 69)
            )
            ra, rb = await asyncio.gather(ta, tb)
            await close_all(ra, rb)
        finally:
            la.close()
            lb.close()
        return ra, rb, answers

    ra, rb, answers = run(main())
    assert ra.local == rb.remote and rb.local == ra.remote
    failed_b = [a for a in rb.attempts if a.outcome is AttemptOutcome.VERIFY_FAILED]
    assert len(failed_b) == 2
    assert any("MAC" in a.detail for a in failed_b) and any("magic" in a.detail for a in failed_b)
    assert any(a.outcome is AttemptOutcome.VERIFY_FAILED for a in ra.attempts)
    assert all(len(ans) == 69 for ans in answers)  # they got a HELLO and nothing else


def test_refusing_candidate_is_retried_until_the_deadline_and_failure_explains_itself() -> None:
    async def main() -> PunchFailed:
        closed = reuse_socket(Endpoint("127.0.0.2", 0))  # bound, never listening: connect gets a RST
        dead = Endpoint("127.0.0.2", port_of(closed))
        la = listener("127.0.0.1")
        try:
            fire = asyncio.get_running_loop().time() + 0.01
            plan = plan_for(
                Role.INITIATOR,
                Endpoint("127.0.0.1", port_of(la)),
                [dead],
                fire,
                deadline=0.5,
                retry=RetryPolicy(base=0.01, fast_window=0.03, cap=0.05),
            )
            with pytest.raises(PunchFailed) as info:
                await punch(plan, listener=la)
            return info.value
        finally:
            la.close()
            closed.close()

    failure = run(main())
    refused = [a for a in failure.attempts if a.outcome is AttemptOutcome.REFUSED]
    assert len(refused) >= 3
    assert [a.attempt for a in refused] == list(range(1, len(refused) + 1))
    assert "refused x" in failure.explanation and "relay" in failure.explanation
    assert str(refused[0].candidate) in failure.explanation


def test_same_roles_never_verify() -> None:
    async def main() -> tuple[BaseException | PunchResult, BaseException | PunchResult]:
        la, lb = listener("127.0.0.1"), listener("127.0.0.2")
        try:
            a_ep, b_ep = Endpoint("127.0.0.1", port_of(la)), Endpoint("127.0.0.2", port_of(lb))
            fire = asyncio.get_running_loop().time() + 0.02
            ra, rb = await asyncio.gather(
                punch(plan_for(Role.INITIATOR, a_ep, [b_ep], fire, deadline=0.6), listener=la),
                punch(plan_for(Role.INITIATOR, b_ep, [a_ep], fire, deadline=0.6), listener=lb),
                return_exceptions=True,
            )
        finally:
            la.close()
            lb.close()
        return ra, rb

    for r in run(main()):
        assert isinstance(r, PunchFailed)
        assert any("own role" in a.detail for a in r.attempts if a.outcome is AttemptOutcome.VERIFY_FAILED)


def test_raw_socket_mode_and_engine_owned_listeners() -> None:
    async def main() -> tuple[PunchResult, PunchResult]:
        # hold the ports with bound (not listening) reuse-port sockets; the engines make the listeners
        ha, hb = reuse_socket(Endpoint("127.0.0.1", 0)), reuse_socket(Endpoint("127.0.0.2", 0))
        try:
            a_ep, b_ep = Endpoint("127.0.0.1", port_of(ha)), Endpoint("127.0.0.2", port_of(hb))
            fire = asyncio.get_running_loop().time() + 0.05
            return await asyncio.gather(
                punch(plan_for(Role.RESPONDER, a_ep, [b_ep], fire), streams=False),
                punch(plan_for(Role.INITIATOR, b_ep, [a_ep], fire), streams=False),
            )
        finally:
            ha.close()
            hb.close()

    ra, rb = run(main())
    assert ra.reader is None and ra.writer is None
    for r in (ra, rb):
        r.sock.setblocking(True)
        r.sock.settimeout(5)
    ra.sock.sendall(b"ping")
    assert rb.sock.recv(4) == b"ping"
    rb.sock.sendall(b"pong")
    assert ra.sock.recv(4) == b"pong"
    ra.sock.close()
    assert rb.sock.recv(1) == b""
    rb.sock.close()


def test_no_candidates_listens_only() -> None:
    async def main() -> tuple[PunchResult, PunchResult]:
        la, lb = listener("127.0.0.1"), listener("127.0.0.2")
        try:
            a_ep, b_ep = Endpoint("127.0.0.1", port_of(la)), Endpoint("127.0.0.2", port_of(lb))
            fire = asyncio.get_running_loop().time() + 0.02
            ra, rb = await asyncio.gather(
                punch(plan_for(Role.INITIATOR, a_ep, [], fire), listener=la),  # e.g. a full-cone side
                punch(plan_for(Role.RESPONDER, b_ep, [a_ep], fire), listener=lb),
            )
            await close_all(ra, rb)
            return ra, rb
        finally:
            la.close()
            lb.close()

    ra, rb = run(main())
    assert ra.via == "accept" and rb.via == "connect"
    assert ra.candidate is None and rb.candidate is not None


@pytest.mark.parametrize("max_resyns", [1, 3])
def test_silent_candidate_gets_its_syn_resent_at_most_max_resyns_times(max_resyns: int) -> None:
    """A re-send replaces the socket (a new sequence number), which would reset a simultaneous open the
    peer already holds: bounded by max_resyns, after that the kernel retransmits until the deadline."""

    async def main() -> PunchFailed:
        # a listener whose accept queue is full drops new SYNs silently: a NAT with the "drop" policy
        full = socket.socket()
        full.bind(("127.0.0.2", 0))
        full.listen(0)
        filler = socket.create_connection(full.getsockname(), timeout=2)
        filler2 = socket.socket()
        filler2.setblocking(False)
        filler2.connect_ex(full.getsockname())
        silent = Endpoint("127.0.0.2", port_of(full))
        la = listener("127.0.0.1")
        try:
            fire = asyncio.get_running_loop().time() + 0.01
            plan = PunchPlan(
                local=Endpoint("127.0.0.1", port_of(la)),
                role=Role.RESPONDER,
                session_id="s1",
                key=KEY,
                candidates=(Candidate(silent, CandidateKind.OBSERVED),),
                fire_at=fire,
                deadline=fire + 0.8,
                resyn_after=0.15,
                max_resyns=max_resyns,
            )
            with pytest.raises(PunchFailed) as info:
                await punch(plan, listener=la)
            return info.value
        finally:
            for s in (la, filler, filler2, full):
                s.close()

    failure = run(main())
    outcomes = [a.outcome for a in failure.attempts]
    assert outcomes.count(AttemptOutcome.SILENT) == max_resyns  # 0.8 s would allow 5 at 0.15 s
    assert outcomes[-1] is AttemptOutcome.TIMEOUT
    assert "silent x" in failure.explanation and "drops unsolicited SYNs" in failure.explanation


def test_cancelled_punch_releases_every_socket_on_its_port() -> None:
    async def main() -> int:
        hold = reuse_socket(Endpoint("127.0.0.1", 0))
        port = port_of(hold)
        hold.close()
        # a peer that never answers: a listener whose accept queue is full drops SYNs
        full = socket.socket()
        full.bind(("127.0.0.2", 0))
        full.listen(0)
        fillers = [socket.create_connection(full.getsockname(), timeout=2), socket.socket()]
        fillers[1].setblocking(False)
        fillers[1].connect_ex(full.getsockname())
        try:
            now = asyncio.get_running_loop().time()
            plan = PunchPlan(
                local=Endpoint("127.0.0.1", port),
                role=Role.INITIATOR,
                session_id="s1",
                key=KEY,
                candidates=(Candidate(Endpoint("127.0.0.2", port_of(full)), CandidateKind.OBSERVED),),
                fire_at=now,
                deadline=now + 30,
            )
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(punch(plan), timeout=0.3)
        finally:
            for s in (*fillers, full):
                s.close()
        return port

    port = run(main())
    # nothing of the punch is left on the port: a plain socket (no SO_REUSEPORT) can bind it
    plain = socket.socket()
    try:
        plain.bind(("127.0.0.1", port))
    finally:
        plain.close()
