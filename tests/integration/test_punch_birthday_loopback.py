"""The engine's birthday mode on loopback (no NAT: the lab test and scripts/bench_birthday.py cover NATs).

A hard side's tickets each get their own local port; many of them open at once, one wins, the others are
closed without hurting it (bytes checked by SHA-256); with no answer at all it opens one fresh round of
tickets. An easy side's spray stays inside its SYN budget and
rate (on descriptors above 1,024 too: asyncio polls with epoll), retries refused guesses only from that
budget, and explains its failure in one line.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import selectors
import socket

from tcppunch.punch.birthday import (
    HARD_ROUNDS,
    ROUND_GAP,
    BirthdayLimits,
    BirthdayPlan,
    BirthdaySide,
    birthday_candidates,
)
from tcppunch.punch.engine import punch
from tcppunch.punch.plan import AttemptOutcome, PunchFailed, PunchPlan, PunchResult, Role
from tcppunch.punch.sockets import raise_fd_limit
from tcppunch.wire.endpoint import Endpoint
from tests.integration.test_punch_loopback import KEY, exchange, listener, port_of, run


def test_hard_side_tickets_connect_and_one_wins_without_hurting_it() -> None:
    tickets = 24

    async def main() -> tuple[PunchResult, PunchResult, tuple[str, str, str, str]]:
        lb = listener("127.0.0.2")
        try:
            b_ep = Endpoint("127.0.0.2", port_of(lb))
            loop = asyncio.get_running_loop()
            fire = loop.time() + 0.05
            spray = BirthdayPlan(BirthdaySide.HARD, BirthdayLimits(sockets=tickets))
            hard = PunchPlan(local=Endpoint("127.0.0.1", 0), role=Role.INITIATOR, session_id="bd", key=KEY,
                             candidates=birthday_candidates(spray, peer_observed=b_ep, rng=random.Random(1)),
                             fire_at=fire, deadline=fire + 5, birthday=spray)
            easy = PunchPlan(local=b_ep, role=Role.RESPONDER, session_id="bd", key=KEY, candidates=(),
                             fire_at=fire, deadline=fire + 5)
            ra, rb = await asyncio.gather(punch(hard), punch(easy, listener=lb))
        finally:
            lb.close()
        return ra, rb, await exchange(ra, rb, 1_000_000)

    ra, rb, (sent_a, got_b, sent_b, got_a) = run(main())
    assert sent_a == got_b and sent_b == got_a  # the losers' closing did not touch the winner
    assert ra.local == rb.remote and rb.local == ra.remote
    assert ra.candidate is not None and ra.candidate.kind.value == "birthday"
    assert ra.birthday is not None and ra.birthday.syns == tickets and ra.birthday.connected >= 1
    assert {a.remote for a in ra.attempts} == {rb.local}  # every ticket towards the same endpoint ...
    accepted = [a for a in rb.attempts if a.outcome is AttemptOutcome.ACCEPTED]
    assert len({a.remote.port for a in accepted}) == len(accepted) >= 1  # ... from a port of its own
    for r in (ra, rb):
        assert [a.outcome for a in r.attempts].count(AttemptOutcome.SELECTED) == 1


def test_easy_side_spray_stays_in_its_budget_and_explains_in_one_line() -> None:
    limits = BirthdayLimits(probes=40, max_syns=100, rate=2000, burst=10)

    async def main() -> PunchFailed:
        loop = asyncio.get_running_loop()
        # asyncio's default loop polls with epoll: sockets numbered above 1,024 (where select() breaks)
        # take part like any other. Hold enough descriptors that every socket of the spray is above it.
        assert isinstance(loop, asyncio.SelectorEventLoop)
        assert selectors.DefaultSelector is selectors.EpollSelector
        raise_fd_limit(2048)
        ballast = [socket.socket() for _ in range(1030)]
        assert max(s.fileno() for s in ballast) > 1024
        fire = loop.time() + 0.02
        spray = BirthdayPlan(BirthdaySide.EASY, limits)
        # nothing listens on 127.0.0.3: every guess is refused (RST) and retried from the budget
        cands = birthday_candidates(spray, peer_observed=Endpoint("127.0.0.3", 1), rng=random.Random(os.getpid()))
        plan = PunchPlan(local=Endpoint("127.0.0.1", 0), role=Role.INITIATOR, session_id="spray", key=KEY,
                         candidates=cands, fire_at=fire, deadline=fire + 1.5, birthday=spray)
        try:
            await punch(plan)
        except PunchFailed as exc:
            return exc
        finally:
            for sock in ballast:
                sock.close()
        raise AssertionError("a spray at closed ports cannot win")

    failed = run(main())
    stats = failed.birthday
    assert stats is not None and stats.side is BirthdaySide.EASY
    assert stats.syns == limits.max_syns and stats.budget_spent
    assert stats.refused == stats.syns and stats.connected == 0
    assert "birthday (easy side): 100 SYNs, 0 connected, 100 refused" in failed.explanation
    assert len(failed.explanation.splitlines()) < 10
    assert not failed.attempts  # refusals are counted, not logged one by one


def test_hard_side_without_any_answer_opens_one_fresh_round_from_its_budget() -> None:
    """Nothing answers the first tickets (the target's accept queue is full: Linux drops the SYNs without a
    word, as a NAT with the drop policy does): ROUND_GAP later the hard side opens as many fresh tickets,
    once (HARD_ROUNDS), and the explanation counts both rounds."""
    tickets = 16

    async def main(target: Endpoint) -> PunchFailed:
        loop = asyncio.get_running_loop()
        fire = loop.time() + 0.02
        spray = BirthdayPlan(BirthdaySide.HARD, BirthdayLimits(sockets=tickets))
        plan = PunchPlan(local=Endpoint("127.0.0.1", 0), role=Role.INITIATOR, session_id="rounds", key=KEY,
                         candidates=birthday_candidates(spray, peer_observed=target, rng=random.Random(2)),
                         fire_at=fire, deadline=fire + ROUND_GAP * HARD_ROUNDS + 0.3, birthday=spray)
        try:
            await punch(plan)
        except PunchFailed as exc:
            return exc
        raise AssertionError("a target that never answers cannot win")

    silent = socket.socket()
    silent.bind(("127.0.0.4", 0))
    silent.listen(0)
    filler = socket.create_connection(silent.getsockname(), timeout=5)  # fills the one-place accept queue
    try:
        readable, _, _ = select.select([silent], [], [], 5)
        assert readable == [silent]  # queued: further SYNs are dropped from now on
        failed = run(main(Endpoint("127.0.0.4", port_of(silent))))
    finally:
        filler.close()
        silent.close()
    stats = failed.birthday
    assert stats is not None and stats.side is BirthdaySide.HARD
    assert stats.syns == HARD_ROUNDS * tickets and stats.unanswered == stats.syns
    assert stats.connected == 0 and stats.refused == 0 and not stats.budget_spent
    assert f"birthday (hard side): {HARD_ROUNDS * tickets} SYNs, 0 connected, 0 refused" in failed.explanation
