"""What one punch is told to do (:class:`PunchPlan`), what it did (:class:`PunchAttempt`), and how it ended
(:class:`PunchResult` or :class:`PunchFailed`). Plain data plus pure helpers: no sockets, no clock.

Times in a plan are event-loop times (``loop.time()``, i.e. ``time.monotonic()`` on the default loop):
whoever turns the coordinator's PUNCH order into a plan converts "fire in N ms" into ``fire_at``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

# Roles come from the session, never from who called connect(): after a simultaneous open both ends are
# "clients". The punch speaks the coordinator's own role vocabulary.
from tcppunch.wire.coord import Role as Role
from tcppunch.wire.endpoint import Endpoint

if TYPE_CHECKING:  # birthday.py builds on this module
    from tcppunch.punch.birthday import BirthdayPlan, BirthdayStats

SESSION_ID_MAX = 64
KEY_MIN = 16


class CandidateKind(StrEnum):
    """Where a candidate endpoint of the peer comes from (the one list of kinds; a connection's report
    names the kind that won)."""

    PRIVATE = "private"  # the peer's own interface address: works when we share its LAN
    OBSERVED = "observed"  # the public endpoint the coordinator saw
    PREDICTED = "predicted"  # the peer's NAT's next mapping(s), from its port delta
    IPV6 = "ipv6"  # the peer's own global IPv6 address: no NAT66, a stateful firewall at most
    BIRTHDAY = "birthday"  # a birthday punch: one of many tickets / guessed ports (tcppunch.punch.birthday)
    MAPPED = "port-mapping"  # the inbound mapping the peer got from its router (PCP, NAT-PMP, UPnP-IGD)


# RFC 8305 section 5: the "Connection Attempt Delay" between starting one address family's attempts and
# the next: 250 ms recommended, never below 10 ms (100 ms is the recommended floor for computed values).
HAPPY_EYEBALLS_DELAY = 0.25
MIN_ATTEMPT_DELAY = 0.01


@dataclass(frozen=True)
class Candidate:
    """One endpoint to send SYNs to. ``index`` is i for the i-th predicted mapping or birthday ticket /
    guess (1-based), else 0."""

    endpoint: Endpoint
    kind: CandidateKind
    index: int = 0

    def __str__(self) -> str:
        suffix = f" #{self.index}" if self.kind in (CandidateKind.PREDICTED, CandidateKind.BIRTHDAY) else ""
        return f"{self.endpoint} ({self.kind.value}{suffix})"

    @property
    def is_ipv6(self) -> bool:
        # Endpoints hold IP literals, and only IPv6 ones contain a colon. Cheap on purpose: a birthday
        # punch asks this for a thousand candidates right before firing (ipaddress parsing took 90 ms).
        return ":" in self.endpoint.ip


@dataclass(frozen=True)
class RetryPolicy:
    """When to send a candidate's next SYN after a RST / refusal.

    During the first ``fast_window`` seconds after firing, retries come after ``base`` seconds: against a
    NAT that answers early SYNs with a RST, our own NAT's entry is open only while our SYN is in flight,
    so the two peers' SYNs must cross, and the window covers the fire-time skew (see docs/punching.md).
    On a real path each try waits a round trip for its RST, so this is a few tries; on a path with
    microseconds of delay it is many cheap ones. After the window the delay grows with the time spent
    since (an ever slower retry rate), up to ``cap``. ``jitter`` spreads retries (a fraction of the
    delay, drawn by the caller) so that two peers do not stay in lockstep. ``max_tries`` bounds it all.
    """

    base: float = 0.001
    fast_window: float = 0.25
    cap: float = 0.25
    jitter: float = 0.5
    max_tries: int = 1000

    def delay(self, since_fire: float, unit: float) -> float:
        """Seconds to wait before the next try, ``since_fire`` seconds after firing; ``unit`` is a
        random draw in [0, 1)."""
        if since_fire < self.fast_window:
            raw = self.base
        else:
            raw = min(self.cap, max(self.base, since_fire - self.fast_window))
        return raw * (1.0 + self.jitter * unit)


# A NAT that allocates a new public port for every new connection makes each retry cost one port (and so
# shift the peer's prediction); those sides retry slowly.
SLOW_RETRY = RetryPolicy(base=0.2, fast_window=0.0, cap=1.0, jitter=0.5, max_tries=50)

# Re-sending a SYN that got no answer (``PunchPlan.resyn_after``) needs a fresh socket with a new initial
# sequence number: two sockets cannot hold one 4-tuple, so the first must be closed. If our first SYN did
# reach the peer and only its answer was lost, the peer sits in SYN_RECV with our old sequence number: our
# new socket answers its SYN-ACK with a RST, which kills that simultaneous open and closes both NATs'
# conntrack entries, after which the routers answer each side's SYNs with RST until the deadline (on a
# path with 5 % loss: relay fallbacks; docs/punching.md "Loss"). Waiting a few round trips does not help
# against a lost answer. What a re-send buys is a SYN past a NAT that dropped it because the peer's own
# SYN had not left yet: fire-time skew larger than the one-way delay, i.e. short paths. So re-send only
# there: after RESYN_RTTS round trips to the peer (at least RESYN_FLOOR), once, and not at all when that
# comes later than RESYN_CEILING (a peer that far away is not out-skewed; the kernel's retransmission at
# 1 s, same sequence number, is always safe).
RESYN_FLOOR = 0.25  # never sooner: fire-time skew on short paths
RESYN_RTTS = 2.0  # round trips to the peer (an upper bound of it, see peer_rtt_bound) before re-sending
RESYN_CEILING = 0.3  # re-send only to peers whose round-trip bound is at most 150 ms
MAX_RESYNS = 1


def peer_rtt_bound(coordinator_rtt: float | None, fire_in: float) -> float | None:
    """An upper bound of the round trip between two peers, from what one of them knows: its own round trip
    to the coordinator and how long the PUNCH told it to wait before firing (``fire_in``: the other peer's
    one-way delay to the coordinator minus ours when it is positive, see coordinator.session.schedule_fire).
    The path through the coordinator is at most the sum of both one-way delays. None when unknown."""
    if coordinator_rtt is None or coordinator_rtt <= 0:
        return None
    own = coordinator_rtt / 2
    other = own + max(0.0, fire_in)  # fire_in 0: the other peer is at most as far from the coordinator
    return 2 * (own + other)


def resyn_delay(peer_rtt: float | None) -> float | None:
    """``PunchPlan.resyn_after`` for a peer round trip of (at most) ``peer_rtt`` seconds: RESYN_RTTS of
    them, at least RESYN_FLOOR; None (leave it to the kernel) beyond RESYN_CEILING. Unknown: the floor."""
    if peer_rtt is None:
        return RESYN_FLOOR
    delay = max(RESYN_FLOOR, RESYN_RTTS * peer_rtt)
    return None if delay > RESYN_CEILING else round(delay, 4)


@dataclass(frozen=True)
class PunchPlan:
    """Everything the engine needs for one punch.

    ``local``: the endpoint to bind every socket to (port 0 = any free port, for tests).
    ``candidates``: in the order their SYNs must leave (predicted ones in index order).
    ``fire_at`` / ``deadline``: event-loop times. The responder waits ``select_grace`` longer for the
    initiator's SELECT on a connection it has already verified.
    ``low_ttl``: send the first SYN to each candidate with this TTL (hops up to and including our own
    outermost NAT, plus one) so that it opens our NAT but dies before the peer's; the socket then goes
    on with the normal TTL (the kernel retransmits the SYN after its 1 s initial RTO). None = off, the
    default: it did not help in the lab (docs/punching.md).
    ``birthday``: set for a birthday punch (its candidates are ``CandidateKind.BIRTHDAY``): they leave
    paced and within the SYN budget, are never re-sent after silence, and on the hard side each gets its
    own local port.
    ``resyn_after``: send a SYN that got no answer at all again after this long, at most ``max_resyns``
    times per candidate (set it with :func:`resyn_delay`: a few round trips to the peer; None = leave it
    to the kernel's retransmission, 1 s, 3 s, ...).
    ``local6``: the IPv6 endpoint (our own global address, same port as ``local`` by convention) that
    IPv6 candidates' sockets are bound to; required when there are IPv6 candidates.
    ``retry6``: the retry policy of IPv6 candidates (no NAT66: a retry costs no mapping, so the fast
    default even when ``retry`` is slow for our IPv4 NAT).
    ``attempt_delay``: the Happy-Eyeballs stagger (RFC 8305): IPv6 candidates fire at ``fire_at``, the
    others this much later unless a connection came up by then (see :func:`waves`). Both peers apply the
    same stagger, so their IPv4 SYNs still leave at the same moment.
    """

    local: Endpoint
    role: Role
    session_id: str
    key: bytes
    candidates: tuple[Candidate, ...]
    fire_at: float
    deadline: float
    low_ttl: int | None = None
    resyn_after: float | None = RESYN_FLOOR
    max_resyns: int = MAX_RESYNS
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    select_grace: float = 1.0
    backlog: int = 16
    local6: Endpoint | None = None
    attempt_delay: float = HAPPY_EYEBALLS_DELAY
    retry6: RetryPolicy = field(default_factory=RetryPolicy)
    birthday: BirthdayPlan | None = None

    def __post_init__(self) -> None:
        if not self.session_id or len(self.session_id) > SESSION_ID_MAX:
            raise ValueError(f"session_id must have 1 to {SESSION_ID_MAX} characters")
        if len(self.key) < KEY_MIN:
            raise ValueError(f"session key must have at least {KEY_MIN} bytes")
        if self.deadline <= self.fire_at:
            raise ValueError("deadline must come after fire_at")
        if self.low_ttl is not None and not 1 <= self.low_ttl <= 255:
            raise ValueError("low_ttl must be 1..255 or None")
        if self.select_grace < 0:
            raise ValueError("select_grace must not be negative")
        if self.resyn_after is not None and self.resyn_after <= 0:
            raise ValueError("resyn_after must be positive or None")
        if self.max_resyns < 0:
            raise ValueError("max_resyns must not be negative")
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError("candidates must be distinct")
        if self.birthday is None and any(c.kind is CandidateKind.BIRTHDAY for c in self.candidates):
            raise ValueError("birthday candidates need a birthday plan")
        if self.local6 is not None and ipaddress.ip_address(self.local6.ip).version != 6:
            raise ValueError("local6 must be an IPv6 endpoint")
        if self.local6 is None and any(c.is_ipv6 for c in self.candidates):
            raise ValueError("IPv6 candidates need local6 (the IPv6 endpoint to send from)")
        if self.attempt_delay < MIN_ATTEMPT_DELAY:
            raise ValueError(f"attempt_delay must be at least {MIN_ATTEMPT_DELAY} s (RFC 8305)")


    def retry_for(self, cand: Candidate) -> RetryPolicy:
        """The retry policy of ``cand``'s address family."""
        return self.retry6 if cand.is_ipv6 else self.retry


@dataclass(frozen=True)
class Wave:
    """Candidates whose first SYNs leave together, ``offset`` seconds after ``fire_at``."""

    offset: float
    candidates: tuple[Candidate, ...]


def waves(plan: PunchPlan) -> tuple[Wave, ...]:
    """When each candidate's first SYN leaves: IPv6 first, the rest ``plan.attempt_delay`` later
    (Happy Eyeballs, RFC 8305). Plan order is kept inside a wave (sequential prediction relies on it).
    A later wave is skipped by the engine when a connection won (or is being verified) by then."""
    v6 = tuple(c for c in plan.candidates if c.is_ipv6)
    rest = tuple(c for c in plan.candidates if not c.is_ipv6)
    if not v6 or not rest:
        return (Wave(0.0, plan.candidates),) if plan.candidates else ()
    return Wave(0.0, v6), Wave(plan.attempt_delay, rest)


class AttemptOutcome(StrEnum):
    """What one try (or one connection) got."""

    CONNECTED = "connected"  # our connect() completed (simultaneous open or plain)
    ACCEPTED = "accepted"  # the listener took a connection
    REFUSED = "refused"  # RST in answer to our SYN (ECONNREFUSED)
    RESET = "reset"  # RST on an open connection
    TIMEOUT = "timeout"  # no answer until the deadline
    SILENT = "silent"  # no answer within resyn_after: the SYN was sent again
    UNREACHABLE = "unreachable"  # ICMP unreachable / no route
    BUSY = "busy"  # the 4-tuple is taken (usually: the peer's SYN already reached our listener)
    VERIFIED = "verified"  # the handshake proved the peer knows the session key
    VERIFY_FAILED = "verify-failed"  # garbage, wrong session, wrong role or a bad MAC
    LOST = "lost"  # closed by the other end before verification / selection
    SELECTED = "selected"  # the winner


@dataclass(frozen=True)
class PunchAttempt:
    """One line of the attempts log. ``t`` is seconds since ``fire_at`` (negative: before firing)."""

    remote: Endpoint
    candidate: Candidate | None
    attempt: int
    outcome: AttemptOutcome
    t: float
    detail: str = ""

    def __str__(self) -> str:
        what = str(self.candidate) if self.candidate else f"{self.remote} (incoming)"
        extra = f": {self.detail}" if self.detail else ""
        return f"{self.t * 1000:+.1f} ms {what} try {self.attempt}: {self.outcome.value}{extra}"


@dataclass(frozen=True)
class PunchTimings:
    """Seconds from ``fire_at``: to the first TCP connection of any candidate, to the winner's verified
    HELLO, to the end (SELECT sent by the initiator / received by the responder)."""

    first_connection: float | None
    verified: float
    selected: float


@dataclass
class PunchResult:
    """The verified winner.

    ``sock`` is the connected, non-blocking socket. With ``punch(..., streams=True)`` (the default)
    ``reader``/``writer`` are asyncio streams over it and ``sock`` belongs to their transport; with
    ``streams=False`` they are None and the caller owns ``sock`` (no byte of the peer's data has been
    read from it beyond the handshake), e.g. to hand it to blocking code.
    """

    role: Role
    sock: socket.socket
    reader: asyncio.StreamReader | None
    writer: asyncio.StreamWriter | None
    local: Endpoint
    remote: Endpoint
    candidate: Candidate | None  # None when the winner came in through the listener from elsewhere
    via: str  # "connect" | "accept"
    attempts: tuple[PunchAttempt, ...]
    timings: PunchTimings
    birthday: BirthdayStats | None = None


class PunchFailed(Exception):
    """No verified connection by the deadline. ``explanation`` says what each candidate got and what to
    do; ``attempts`` is the full log."""

    def __init__(
        self, explanation: str, attempts: tuple[PunchAttempt, ...], birthday: BirthdayStats | None = None
    ) -> None:
        super().__init__(explanation)
        self.explanation = explanation
        self.attempts = attempts
        self.birthday = birthday


_ADVICE = {
    AttemptOutcome.REFUSED: "the peer's NAT (or host) answered with RST: its SYNs probably did not leave at the "
    "same time as ours, or its mapping differs from what we targeted",
    AttemptOutcome.TIMEOUT: "nothing came back: the peer's NAT drops unsolicited SYNs and its own SYN towards "
    "us never arrived (wrong predicted port, firewall, or the peer never fired)",
    AttemptOutcome.SILENT: "nothing came back: the peer's NAT drops unsolicited SYNs and its own SYN towards "
    "us never arrived (wrong predicted port, firewall, or the peer never fired)",
    AttemptOutcome.UNREACHABLE: "no route to that address",
    AttemptOutcome.VERIFY_FAILED: "something answered but could not prove the session key (not our peer)",
    AttemptOutcome.BUSY: "the 4-tuple was taken (a connection through the listener was already using it)",
    AttemptOutcome.RESET: "the connection opened and was then reset",
    AttemptOutcome.LOST: "the connection opened and was closed by the other end before it was selected",
}


def explain_failure(
    plan: PunchPlan, attempts: tuple[PunchAttempt, ...], why: str, birthday: BirthdayStats | None = None
) -> str:
    """A human explanation of a failed punch: per candidate what it got, and what the user can do. The
    many candidates of a birthday punch are one line (``birthday``'s counts)."""
    lines = [f"punch {plan.session_id} ({plan.role.value}) failed: {why}."]
    by_candidate: dict[Candidate | None, Counter[AttemptOutcome]] = {}
    for a in attempts:
        by_candidate.setdefault(a.candidate, Counter())[a.outcome] += 1
    if not plan.candidates:
        lines.append("  no candidates: we only listened on our port.")
    if birthday is not None:
        lines.append(f"  {birthday.summary()}")
    for cand in plan.candidates:
        if cand.kind is CandidateKind.BIRTHDAY:
            continue
        got = by_candidate.get(cand)
        if not got:
            lines.append(f"  {cand}: no try finished (timed out)")
            continue
        summary = ", ".join(f"{o.value} x{n}" for o, n in got.most_common())
        main = got.most_common(1)[0][0]
        hint = _ADVICE.get(main, "")
        lines.append(f"  {cand}: {summary}" + (f" — {hint}" if hint else ""))
    incoming = by_candidate.get(None)
    if incoming:
        lines.append("  incoming (listener): " + ", ".join(f"{o.value} x{n}" for o, n in incoming.most_common()))
    lines.append(
        "  what to do: check both sides with `tcppunch detect` (a symmetric-random NAT facing a "
        "port-restricted one goes direct only by birthday punching), make sure both peers fire at the same time, "
        "or use the relay (--relay auto)."
    )
    return "\n".join(lines)
