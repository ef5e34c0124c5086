"""The punch engine: at ``fire_at``, SYNs from one local port to every candidate, a listener on the same
port, the verification handshake on every connection that opens, one winner agreed by both sides.

A thin asyncio driver around :mod:`tcppunch.punch.handshake` (the protocol) and
:mod:`tcppunch.punch.sockets` (the reuse-port sockets). How it goes:

1. The listener (ours, or the caller's, bound to the punch port) accepts from the start: a peer that
   fires a little earlier reaches it.
2. At ``fire_at`` one SYN per candidate leaves, in plan order, inside consecutive ``connect()`` calls
   (sequential port prediction depends on that order). IPv6 candidates go first; the others follow
   ``plan.attempt_delay`` later unless a connection is up by then (Happy Eyeballs, :func:`waves`); IPv6
   sockets are bound to ``plan.local6``, and an own listener listens there too. With ``low_ttl`` those
   first SYNs carry a low TTL (restored right after ``connect()``: the kernel's SYN retransmission and the SYN-ACK of a
   simultaneous open carry the normal one).
3. A candidate whose SYN meets a RST is retried (``plan.retry_for``) until the deadline. A SYN without any
   answer after ``plan.resyn_after`` is sent again from a fresh socket on the same 4-tuple (instead of
   waiting for the kernel's 1 s retransmission), at most ``plan.max_resyns`` times — but only while the
   socket is still in ``SYN_SENT``, where closing sends nothing; a socket further into a simultaneous open
   is never abandoned. (The peer may hold our first SYN in SYN_RECV while its SYN-ACK is lost: the fresh
   socket would reset that, hence one re-send, and only to near peers; see plan.resyn_delay.)
4. Every connection (from connect or accept) sends HELLO and checks the peer's; the initiator sends
   SELECT on the first verified one; the responder's winner is where SELECT arrives.
5. Everything else is closed quietly (no SO_LINGER 0, see :func:`close_quietly`); our own listener too.

A birthday punch (``plan.birthday``, see :mod:`tcppunch.punch.birthday`) sends its many candidates'
SYNs after the others, paced by a :class:`~tcppunch.punch.birthday.SynPacer` (budget and rate); they are
never re-sent after silence (the kernel retransmits, on the same NAT entry), retried after a RST only
from the budget, and on the hard side every socket has a local port of its own. A hard side that saw no
connection one ``ROUND_GAP`` after its tickets left opens a second round of fresh ones (new ports), which
meet the easy side's still waiting guesses.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from tcppunch.nat.sockets import endpoint_of
from tcppunch.punch.birthday import (
    HARD_ROUNDS,
    RETRY_AFTER,
    ROUND_GAP,
    BirthdaySide,
    BirthdayStats,
    SynPacer,
    fresh_tickets,
)
from tcppunch.punch.handshake import Handshake, PeerVerified, Rejected, SelectReceived
from tcppunch.punch.plan import (
    AttemptOutcome,
    Candidate,
    CandidateKind,
    PunchAttempt,
    PunchFailed,
    PunchPlan,
    PunchResult,
    PunchTimings,
    Role,
    explain_failure,
    waves,
)
from tcppunch.punch.sockets import (
    BUSY_ERRNOS,
    REFUSED_ERRNOS,
    RESET_ERRNOS,
    TCP_SYN_SENT,
    TIMEOUT_ERRNOS,
    UNREACHABLE_ERRNOS,
    close_quietly,
    own_port_socket,
    raise_fd_limit,
    reuse_listener,
    reuse_socket,
    start_connect,
    tcp_state,
    wait_connected,
)
from tcppunch.wire.endpoint import Endpoint

_log = structlog.get_logger(__name__)


async def punch(
    plan: PunchPlan,
    *,
    listener: socket.socket | None = None,
    inbound: asyncio.Queue[socket.socket] | None = None,
    streams: bool = True,
) -> PunchResult:
    """Run one punch; return the verified winner or raise :class:`PunchFailed`.

    ``listener``: a listening socket already bound (with SO_REUSEADDR + SO_REUSEPORT) to the punch port;
    it stays open and belongs to the caller. ``inbound``: instead of a listener, a queue on which someone
    else (a :class:`~tcppunch.punch.dispatch.PortDispatcher` serving several punches on one port) hands
    over this session's incoming connections; ``plan.local`` must then name the port. With neither, the
    engine makes a listener on ``plan.local`` and closes it at the end. ``streams=False`` returns the raw
    socket only (see :class:`PunchResult`).
    """
    if listener is not None and inbound is not None:
        raise ValueError("give a listener or an inbound queue, not both")
    if inbound is not None and plan.local.port == 0:
        raise ValueError("with an inbound queue, plan.local must name the punch port")
    return await _Punch(plan, listener, inbound).run(streams=streams)


# The event loop wakes timers with about 1 ms granularity (epoll timeouts are in ms); the last stretch
# before firing is waited out in short sleeps that give up the GIL, so that both peers' SYNs leave as
# close to the agreed moment as the clocks allow (against NATs that answer early SYNs with a RST the
# SYNs must cross in flight: the tolerance is the one-way delay between the NATs).
_SPIN = 0.002


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    if when - loop.time() > _SPIN:
        await asyncio.sleep(when - loop.time() - _SPIN)
    while loop.time() < when:
        time.sleep(0)  # at most _SPIN of the loop's time, once per punch


def _classify(err: int) -> AttemptOutcome:
    if err in REFUSED_ERRNOS:
        return AttemptOutcome.REFUSED
    if err in RESET_ERRNOS:
        return AttemptOutcome.RESET
    if err in BUSY_ERRNOS:
        return AttemptOutcome.BUSY
    if err in UNREACHABLE_ERRNOS:
        return AttemptOutcome.UNREACHABLE
    if err in TIMEOUT_ERRNOS:
        return AttemptOutcome.TIMEOUT
    return AttemptOutcome.LOST


# Outcomes of a birthday candidate that are counted (BirthdayStats), not logged one by one: a spray has
# hundreds of them.
_QUIET = frozenset({AttemptOutcome.REFUSED, AttemptOutcome.TIMEOUT, AttemptOutcome.SILENT})
# Open files a birthday punch may need beyond its SYN budget (the program's own, the listener, ...).
_FD_HEADROOM = 1024


@dataclass
class _Winner:
    sock: socket.socket
    local: Endpoint
    remote: Endpoint
    candidate: Candidate | None
    via: str
    verified_at: float
    selected_at: float
    leftover: bytes


class _Punch:
    def __init__(
        self, plan: PunchPlan, listener: socket.socket | None, inbound: asyncio.Queue[socket.socket] | None
    ) -> None:
        self.plan = plan
        self.loop = asyncio.get_running_loop()
        self.log = _log.bind(session=plan.session_id, role=plan.role.value)
        self.inbound = inbound
        self.own_listener = listener is None and inbound is None
        self.listener: socket.socket | None = None
        self.listener6: socket.socket | None = None  # always our own when there is one
        if inbound is None:
            self.listener = listener if listener is not None else reuse_listener(plan.local, plan.backlog)
            self.listener.setblocking(False)
            self.local = endpoint_of(self.listener.getsockname())
        else:
            self.local = plan.local
        self.local6 = plan.local6
        if inbound is None and plan.local6 is not None:
            try:
                self.listener6 = reuse_listener(plan.local6, plan.backlog)
            except BaseException:
                if self.own_listener and self.listener is not None:
                    self.listener.close()
                raise
            self.local6 = endpoint_of(self.listener6.getsockname())
        self.attempts: list[PunchAttempt] = []
        self.winner: asyncio.Future[_Winner] = self.loop.create_future()
        self.tasks: set[asyncio.Task[None]] = set()
        self.pending: dict[Candidate, socket.socket] = {}  # SYN in flight, per candidate
        self.conns: set[socket.socket] = set()  # open connections still under the handshake
        self.first_connection: float | None = None
        self.claimed = False
        self.awaiting_select = 0
        self.rng = random.Random(os.urandom(16))
        self.by_endpoint = {c.endpoint: c for c in plan.candidates}
        self.bstats: BirthdayStats | None = None
        self.pacer: SynPacer | None = None
        if plan.birthday is not None:
            self.bstats = BirthdayStats(plan.birthday.side)
            self.pacer = SynPacer(plan.birthday.limits, plan.fire_at)
            raise_fd_limit(plan.birthday.limits.max_syns + _FD_HEADROOM)

    # ---- bookkeeping -------------------------------------------------------------------------------

    def _t(self) -> float:
        return self.loop.time() - self.plan.fire_at

    def _record(
        self, remote: Endpoint, cand: Candidate | None, attempt: int, outcome: AttemptOutcome, detail: str = ""
    ) -> None:
        if self.bstats is not None and cand is not None and cand.kind is CandidateKind.BIRTHDAY:
            if outcome is AttemptOutcome.REFUSED:
                self.bstats.refused += 1
            if outcome in _QUIET:
                return
        entry = PunchAttempt(remote, cand, attempt, outcome, round(self._t(), 6), detail)
        self.attempts.append(entry)
        self.log.debug(
            "punch.attempt",
            candidate=str(cand) if cand else f"{remote} (incoming)",
            attempt=attempt,
            outcome=outcome.value,
            t=entry.t,
            detail=detail or None,
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a bug: say so, keep punching
            self.log.error("punch.task_failed", error=repr(task.exception()))

    # ---- the run -----------------------------------------------------------------------------------

    async def run(self, *, streams: bool) -> PunchResult:
        plan = self.plan
        self.log.info(
            "punch.start",
            local=str(self.local),
            candidates=[str(c) for c in plan.candidates if c.kind is not CandidateKind.BIRTHDAY],
            birthday=None if plan.birthday is None else plan.birthday.side.value,
            birthday_syns=sum(1 for c in plan.candidates if c.kind is CandidateKind.BIRTHDAY) or None,
            fire_in=round(plan.fire_at - self.loop.time(), 4),
            resyn_after=plan.resyn_after,
        )
        handed_over = False
        try:
            self._spawn(self._accept_loop(self.listener))
            if self.listener6 is not None:
                self._spawn(self._accept_loop(self.listener6))
            self._spawn(self._fire())
            await asyncio.wait({self.winner}, timeout=max(0.0, plan.deadline - self.loop.time()))
            if not self.winner.done() and plan.role is Role.RESPONDER and self.awaiting_select:
                # a verified connection waits for the initiator's SELECT, which it may have sent just
                # before its deadline: give it a little longer rather than kill what the peer selected
                await asyncio.wait({self.winner}, timeout=plan.select_grace)
            handed_over = True
        finally:
            await self._cleanup(keep_winner=handed_over)  # cancelled: the winner is closed too
        if not self.winner.done():
            why = "no verified connection before the deadline"
            if plan.role is Role.RESPONDER and self.awaiting_select:
                why = "verified connection(s) but the initiator selected none in time"
            explanation = explain_failure(plan, tuple(self.attempts), why, self.bstats)
            self.log.warning("punch.failed", reason=why, attempts=len(self.attempts),
                             birthday=None if self.bstats is None else self.bstats.to_json())
            raise PunchFailed(explanation, tuple(self.attempts), self.bstats)
        return await self._result(self.winner.result(), streams)

    async def _result(self, w: _Winner, streams: bool) -> PunchResult:
        plan = self.plan
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        if streams:
            try:
                reader, writer = await asyncio.open_connection(sock=w.sock)
            except BaseException:
                w.sock.close()
                raise
            if w.leftover:
                reader.feed_data(w.leftover)
        timings = PunchTimings(
            first_connection=None if self.first_connection is None else round(self.first_connection, 6),
            verified=round(w.verified_at, 6),
            selected=round(w.selected_at, 6),
        )
        result = PunchResult(
            role=plan.role,
            sock=w.sock,
            reader=reader,
            writer=writer,
            local=w.local,
            remote=w.remote,
            candidate=w.candidate,
            via=w.via,
            attempts=tuple(self.attempts),
            timings=timings,
            birthday=self.bstats,
        )
        self.log.info(
            "punch.won",
            remote=str(result.remote),
            via=w.via,
            candidate=str(w.candidate) if w.candidate else None,
            verified=timings.verified,
            selected=timings.selected,
            birthday=None if self.bstats is None else self.bstats.to_json(),
        )
        return result

    async def _cleanup(self, *, keep_winner: bool) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        winner = self.winner.result().sock if self.winner.done() else None
        if self.bstats is not None:
            self.bstats.unanswered += sum(1 for c in self.pending if c.kind is CandidateKind.BIRTHDAY)
        if winner is not None and not keep_winner:
            close_quietly(winner)
        for sock in list(self.pending.values()) + list(self.conns):
            if sock is not winner:
                close_quietly(sock)
        self.pending.clear()
        self.conns.clear()
        if self.own_listener and self.listener is not None:
            self.listener.close()
        if self.listener6 is not None:
            self.listener6.close()

    # ---- outbound ----------------------------------------------------------------------------------

    def _syn(self, cand: Candidate, ttl: int | None) -> tuple[socket.socket | None, int]:
        """A new socket on the punch port and its SYN towards ``cand``; (None, errno) if that failed. A hard
        side's birthday ticket gets a port of its own instead (a new NAT entry, a new random public port)."""
        hard = self.plan.birthday is not None and self.plan.birthday.side is BirthdaySide.HARD
        try:
            if hard and cand.kind is CandidateKind.BIRTHDAY:
                sock = own_port_socket(self.local.ip)
            else:
                sock = reuse_socket(self.local6 if cand.is_ipv6 and self.local6 is not None else self.local)
        except OSError as exc:  # e.g. out of file descriptors: this try fails, the punch goes on
            return None, exc.errno or errno.EIO
        try:
            err = start_connect(sock, cand.endpoint, first_syn_ttl=ttl)
        except OSError as exc:
            err = exc.errno or errno.EIO
        self.pending[cand] = sock
        return sock, err

    async def _fire(self) -> None:
        plan = self.plan
        for n, wave in enumerate(waves(plan)):
            if n == 0:
                await _sleep_until(self.loop, plan.fire_at + wave.offset)
            elif not await self._next_wave_needed(plan.fire_at + wave.offset):
                self.log.debug("punch.wave_skipped", offset=wave.offset, candidates=len(wave.candidates))
                return
            self.log.debug("punch.fire", wave=n, low_ttl=plan.low_ttl, late=round(self._t() - wave.offset, 6))
            ordinary = [c for c in wave.candidates if c.kind is not CandidateKind.BIRTHDAY]
            first = [(cand, *self._syn(cand, plan.low_ttl)) for cand in ordinary]  # SYNs leave in order
            for cand, sock, err in first:
                self._spawn(self._candidate(cand, sock, err))
            if plan.birthday is not None:
                await self._birthday_rounds([c for c in wave.candidates if c.kind is CandidateKind.BIRTHDAY])

    async def _next_wave_needed(self, when: float) -> bool:
        """Wait until ``when``; False if a connection won by then. One still being verified gets one more
        attempt delay to finish (RFC 8305: the next family starts when the previous attempt has not
        succeeded within the delay)."""
        await asyncio.wait({self.winner}, timeout=max(0.0, when - self.loop.time()))
        if not self.winner.done() and self.conns:
            await asyncio.wait({self.winner}, timeout=self.plan.attempt_delay)
        return not self.winner.done()

    # ---- birthday ----------------------------------------------------------------------------------

    async def _birthday_rounds(self, first: list[Candidate]) -> None:
        """The first round; on the hard side, while nothing connected, fresh tickets every
        :data:`ROUND_GAP` (see :mod:`tcppunch.punch.birthday`), from the same budget."""
        started = self.loop.time()
        await self._spray(first)
        if not first or self.bstats is None or self.bstats.side is not BirthdaySide.HARD:
            return
        for round_no in range(2, HARD_ROUNDS + 1):
            when = started + (round_no - 1) * ROUND_GAP
            if when >= self.plan.deadline:
                return
            await asyncio.wait({self.winner}, timeout=max(0.0, when - self.loop.time()))
            if self.winner.done() or self.first_connection is not None:
                return  # a match opened: it is being verified (or won)
            self.log.debug("punch.birthday_round", round=round_no, tickets=len(first))
            await self._spray(list(fresh_tickets(first, round_no)))

    async def _spray(self, cands: list[Candidate]) -> None:
        """The birthday candidates' first SYNs, in order, as fast as the pacer allows."""
        assert self.pacer is not None and self.bstats is not None
        queue = deque(cands)
        while queue:
            for _ in range(self.pacer.grant(len(queue), self.loop.time())):
                cand = queue.popleft()
                sock, err = self._syn(cand, None)
                self.bstats.syns += 1
                self._spawn(self._birthday_candidate(cand, sock, err))
            if queue and not await self._pace():
                return

    async def _pace(self) -> bool:
        """Wait until the pacer has a token; False when the budget is spent or the deadline too close."""
        assert self.pacer is not None and self.bstats is not None
        wait = self.pacer.wait(self.loop.time())
        if wait is None:
            self.bstats.budget_spent = True
            return False
        if self.loop.time() + wait >= self.plan.deadline:
            return False
        if wait > 0:
            await asyncio.sleep(wait)
        return True

    async def _birthday_candidate(self, cand: Candidate, sock: socket.socket | None, err: int) -> None:
        """One ticket / guess: wait for its SYN's fate, verify a match, retry after a RST from the budget."""
        assert self.pacer is not None and self.bstats is not None
        tries = 1
        while True:
            outcome, detail = await self._birthday_connect(sock, err)
            self.pending.pop(cand, None)
            if outcome is AttemptOutcome.CONNECTED and sock is not None:
                self.bstats.connected += 1
                self._record(cand.endpoint, cand, tries, outcome)
                if await self._verify(sock, cand.endpoint, cand, "connect", tries):
                    return
            else:
                self._record(cand.endpoint, cand, tries, outcome, detail)
                if sock is not None:
                    close_quietly(sock)
                if outcome is AttemptOutcome.TIMEOUT:
                    return
            delay = RETRY_AFTER[self.bstats.side] * (1.0 + 0.5 * self.rng.random())
            if self.loop.time() + delay >= self.plan.deadline:
                return
            await asyncio.sleep(delay)
            while self.pacer.grant(1, self.loop.time()) < 1:
                if not await self._pace():
                    return
            tries += 1
            sock, err = self._syn(cand, None)
            self.bstats.syns += 1

    async def _candidate(self, cand: Candidate, sock: socket.socket | None, err: int) -> None:
        """Connect to one candidate until it opens (then verify) or the deadline; retry after RSTs."""
        plan = self.plan
        retry = plan.retry_for(cand)
        tries = 1
        resyns = 0
        while True:
            outcome, detail = await self._await_connect(sock, err, resyn=resyns < plan.max_resyns)
            if outcome is AttemptOutcome.SILENT and sock is not None:  # still SYN_SENT: closing sends nothing
                self._record(cand.endpoint, cand, tries, outcome, detail)
                self.pending.pop(cand, None)
                sock.close()
                tries += 1
                resyns += 1
                sock, err = self._syn(cand, None)  # same 4-tuple, same NAT mapping, new SYN
                continue
            if outcome is AttemptOutcome.CONNECTED and sock is not None:
                self.pending.pop(cand, None)
                self._record(cand.endpoint, cand, tries, outcome)
                if await self._verify(sock, cand.endpoint, cand, "connect", tries):
                    return
            else:
                self._record(cand.endpoint, cand, tries, outcome, detail)
                self.pending.pop(cand, None)
                if sock is not None:
                    close_quietly(sock)
            if outcome is AttemptOutcome.TIMEOUT or tries >= retry.max_tries:
                return
            delay = retry.delay(self._t(), self.rng.random())
            if self.loop.time() + delay >= plan.deadline:
                return
            await asyncio.sleep(delay)
            tries += 1
            sock, err = self._syn(cand, None)

    @staticmethod
    async def _birthday_connect(sock: socket.socket | None, err: int) -> tuple[AttemptOutcome, str]:
        """A birthday SYN's fate, without a timer of its own (never re-sent after silence; the punch's
        deadline cancels the wait): a thousand of these run at once."""
        if sock is None or err not in (0, errno.EINPROGRESS):
            return _classify(err), os.strerror(err)
        try:
            await wait_connected(sock)
        except OSError as exc:
            code = exc.errno or errno.EIO
            return _classify(code), os.strerror(code)
        return AttemptOutcome.CONNECTED, ""

    async def _await_connect(
        self, sock: socket.socket | None, err: int, *, resyn: bool = True
    ) -> tuple[AttemptOutcome, str]:
        """The fate of one SYN: connected, an error, the deadline, or (``resyn``) SILENT after
        ``plan.resyn_after`` in SYN_SENT; after the last re-send the kernel's own retransmissions (same
        sequence number) carry on until the deadline."""
        if sock is None or err not in (0, errno.EINPROGRESS):
            return _classify(err), os.strerror(err)
        plan = self.plan
        while True:
            limit = plan.deadline
            if plan.resyn_after is not None and resyn:
                limit = min(limit, self.loop.time() + plan.resyn_after)
            try:
                async with asyncio.timeout_at(limit):
                    await wait_connected(sock)
            except TimeoutError:
                if self.loop.time() >= plan.deadline:
                    return AttemptOutcome.TIMEOUT, "no answer before the deadline"
                if tcp_state(sock) == TCP_SYN_SENT:
                    return AttemptOutcome.SILENT, f"no answer within {plan.resyn_after} s, SYN sent again"
                continue  # a simultaneous open in progress (SYN_RECV): never abandon it
            except OSError as exc:
                code = exc.errno or errno.EIO
                return _classify(code), os.strerror(code)
            return AttemptOutcome.CONNECTED, ""

    # ---- inbound -----------------------------------------------------------------------------------

    async def _next_inbound(self, listener: socket.socket | None) -> socket.socket:
        if listener is None:
            assert self.inbound is not None
            return await self.inbound.get()
        conn, _ = await self.loop.sock_accept(listener)
        return conn

    async def _accept_loop(self, listener: socket.socket | None) -> None:
        """Connections from ``listener``, or from the inbound queue when it is None."""
        while True:
            try:
                conn = await self._next_inbound(listener)
            except OSError as exc:  # e.g. EMFILE: note it, keep the punch going
                self.log.warning("punch.accept_error", error=str(exc))
                await asyncio.sleep(0.05)
                continue
            try:
                remote = endpoint_of(conn.getpeername())
            except OSError:  # reset while it waited in the queue
                close_quietly(conn)
                continue
            cand = self.by_endpoint.get(remote)
            self._record(remote, cand, 0, AttemptOutcome.ACCEPTED)
            self._spawn(self._verify_task(conn, remote, cand))

    async def _verify_task(self, conn: socket.socket, remote: Endpoint, cand: Candidate | None) -> None:
        await self._verify(conn, remote, cand, "accept", 0)

    # ---- verification and selection ----------------------------------------------------------------

    async def _verify(
        self, sock: socket.socket, remote: Endpoint, cand: Candidate | None, via: str, attempt: int
    ) -> bool:
        """Run the handshake on one open connection. True when it verified (winner or not): the
        candidate needs no more SYNs. False when it must be closed (and the candidate retried)."""
        plan = self.plan
        sock.setblocking(False)
        self.conns.add(sock)
        if self.first_connection is None:
            self.first_connection = self._t()
        hs = Handshake(role=plan.role, session_id=plan.session_id, key=plan.key, nonce=os.urandom(16))
        try:
            async with asyncio.timeout_at(plan.deadline + plan.select_grace):
                await self.loop.sock_sendall(sock, hs.hello())
                if not await self._read_until(sock, hs, PeerVerified):
                    raise _Rejected(hs.reject_reason)
                verified_at = self._t()
                self._record(remote, cand, attempt, AttemptOutcome.VERIFIED, via)
                if plan.role is Role.INITIATOR:
                    if self.claimed or self.winner.done():
                        return True  # verified too, but another one won; closed at the end
                    self.claimed = True
                    await self.loop.sock_sendall(sock, hs.select())
                else:
                    self.awaiting_select += 1
                    try:
                        if not await self._read_until(sock, hs, SelectReceived):
                            raise _Rejected(hs.reject_reason)
                    finally:
                        self.awaiting_select -= 1
        except _Rejected as rej:
            self._finish_loser(sock, remote, cand, attempt, AttemptOutcome.VERIFY_FAILED, rej.reason)
            return False
        except _Eof:
            self._finish_loser(sock, remote, cand, attempt, AttemptOutcome.LOST, "closed by the other end")
            return False
        except TimeoutError:
            self._finish_loser(sock, remote, cand, attempt, AttemptOutcome.TIMEOUT, "handshake did not finish")
            return False
        except OSError as exc:
            if plan.role is Role.INITIATOR and self.claimed and not self.winner.done():
                self.claimed = False
            code = exc.errno or errno.EIO
            outcome = _classify(code)
            self._finish_loser(sock, remote, cand, attempt, outcome, os.strerror(code))
            return False
        if self.winner.done():  # responder: cannot happen (one SELECT per session), but never two winners
            return True
        self.conns.discard(sock)
        self._record(remote, cand, attempt, AttemptOutcome.SELECTED, via)
        try:
            local = endpoint_of(sock.getsockname())
        except OSError as exc:  # the socket died between SELECT and here
            self._finish_loser(sock, remote, cand, attempt, AttemptOutcome.LOST, str(exc))
            return False
        self.winner.set_result(_Winner(sock, local, remote, cand, via, verified_at, self._t(), hs.leftover))
        return True

    def _finish_loser(
        self, sock: socket.socket, remote: Endpoint, cand: Candidate | None, attempt: int, outcome: AttemptOutcome,
        why: str,
    ) -> None:
        self._record(remote, cand, attempt, outcome, why)
        self.conns.discard(sock)
        close_quietly(sock)

    async def _read_until(self, sock: socket.socket, hs: Handshake, wanted: type) -> bool:
        """Read exactly what the handshake still lacks until ``wanted`` arrives (True) or it rejects."""
        while True:
            need = hs.bytes_needed
            if need <= 0:
                return False
            data = await self.loop.sock_recv(sock, need)
            if not data:
                raise _Eof()
            for event in hs.receive_data(data):
                if isinstance(event, Rejected):
                    return False
                if isinstance(event, wanted):
                    return True


class _Rejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Eof(Exception):
    pass


__all__ = ["PunchFailed", "PunchResult", "punch"]
