"""Birthday-paradox punching: between a NAT that maps every connection to a random port ("hard") and an
endpoint-independent NAT that filters by address and port ("easy": port-restricted, cgnat). Pure: which
side does what, which ports, how many SYNs and how fast. The engine (:mod:`tcppunch.punch.engine`) drives it.

Nobody can name the hard side's next port, and the easy side's filter opens only towards exact ports. So:

* the hard side opens M connections (M sockets, each on its own local port) towards the easy side's fixed
  public endpoint: M random public ports, each a NAT entry that waits in ``SYN_SENT``;
* the easy side sends SYNs from its fixed punch port to N guessed ports on the hard side's public address;
  each opens its own filter towards that one port, and reaches a hard socket if the guess is one of the M.

One guess of N meets one ticket of M with probability P ≈ 1 − exp(−M·N/R), R the size of the hard NAT's
port range (64,512 for Linux ``masquerade random`` over 1024-65535): M = 256, N = 1,024 gives 98 % (99.97 %
with the second round below).
A match opens as a simultaneous open (or a plain connect) and goes through the ordinary verification
handshake; the first verified connection wins. Losers share no 4-tuple with the winner (every hard socket
has its own port, every easy SYN its own destination port), and those still in ``SYN_SENT`` are closed
without sending anything.

A hard side that saw no connection :data:`ROUND_GAP` after its tickets left opens a second round of M
fresh ones against the same, still waiting guesses (:func:`fresh_tickets`): two rounds miss with
e^(−2·M·N/R) ≈ 0.03 % instead of 1.7 %.

Bounds (docs/punching.md, "Birthday punching"): every SYN we start (first tries, a second round, retries
after a RST)
comes out of a per-session budget and a per-second rate (a token bucket, :class:`SynPacer`); both have
hard maxima a caller cannot exceed. The kernel's own SYN retransmissions (1 s, 3 s) of unanswered SYNs
come on top, within the punch deadline.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from tcppunch.punch.plan import Candidate, CandidateKind
from tcppunch.punch.prediction import MappingClass, classify, direct_possible
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import NatReport

# Linux ``masquerade random`` / ``snat ... fully-random`` picks from 1024-65535 (the lab's range too).
RANDOM_PORT_LOW = 1024
RANDOM_PORT_HIGH = 65535
RANDOM_PORT_SPACE = RANDOM_PORT_HIGH - RANDOM_PORT_LOW + 1  # R = 64,512

DEFAULT_SOCKETS = 256  # M, the hard side
DEFAULT_PROBES = 1024  # N, the easy side
DEFAULT_MAX_SYNS = 2048  # per session and side: first tries plus retries after a RST
DEFAULT_RATE = 20_000.0  # SYNs per second (the burst below leaves at once, the rest is paced)
DEFAULT_BURST = 256
# What no configuration can exceed.
MAX_SOCKETS = 1024
MAX_PROBES = 4096
MAX_SYNS = 8192
MAX_RATE = 50_000.0


class BirthdaySide(StrEnum):
    """Our part in a birthday punch."""

    HARD = "hard"  # our NAT maps randomly: M sockets towards the peer's fixed endpoint
    EASY = "easy"  # the peer's NAT maps randomly: N SYNs from our fixed port to guessed ports


# A candidate answered with a RST tries again this long after (plus up to half of it in jitter), from the
# budget: at once. Against NATs that answer unsolicited SYNs with a RST a guess and a ticket must cross
# within the one-way delay, and the RST closed the NAT entry: a hard side's new socket is a new random
# port (a new ticket), an easy side's new SYN reopens its filter towards the guess. Both keep "rain"
# falling while the other side's does, until the budget is spent. (With the drop policy nothing is
# refused, and nothing is retried.)
RETRY_AFTER = {BirthdaySide.HARD: 0.001, BirthdaySide.EASY: 0.001}

# A hard side none of whose tickets connected opens a second set of M fresh ones (new sockets: new random
# ports) this long after its first, from the budget. The easy side's N guesses still wait in SYN_SENT
# (their sockets until the deadline, their NAT entries for minutes), so the new tickets meet the same
# guesses: one round misses with e^(−M·N/R) ≈ 1.7 % (M = 256, N = 1,024), two with e^(−2·M·N/R) ≈ 0.03 %.
# (The first round's tickets stay open: a late guess may still meet them.) In the lab a match connects
# within ~150 ms, on the internet within a round trip or two: 1 s is past both, and well inside the 6 s
# deadline. Under rst the guesses were refused and retried until the easy budget ran out, so the second
# round finds none left to meet; it costs 256 SYNs and is harmless.
ROUND_GAP = 1.0
HARD_ROUNDS = 2


@dataclass(frozen=True)
class BirthdayLimits:
    """How many sockets (hard side) and guesses (easy side), and the SYN budget and rate of one session."""

    sockets: int = DEFAULT_SOCKETS
    probes: int = DEFAULT_PROBES
    max_syns: int = DEFAULT_MAX_SYNS
    rate: float = DEFAULT_RATE
    burst: int = DEFAULT_BURST

    def __post_init__(self) -> None:
        if not 1 <= self.sockets <= MAX_SOCKETS:
            raise ValueError(f"birthday sockets must be 1..{MAX_SOCKETS}")
        if not 1 <= self.probes <= MAX_PROBES:
            raise ValueError(f"birthday probes must be 1..{MAX_PROBES}")
        if not 1 <= self.max_syns <= MAX_SYNS:
            raise ValueError(f"birthday SYN budget must be 1..{MAX_SYNS}")
        if not 0 < self.rate <= MAX_RATE:
            raise ValueError(f"birthday SYN rate must be in (0, {MAX_RATE:g}] per second")
        if self.burst < 1:
            raise ValueError("birthday burst must be at least 1")

    def first_syns(self, side: BirthdaySide) -> int:
        """The SYNs of the first round on ``side`` (never more than the budget)."""
        wanted = self.sockets if side is BirthdaySide.HARD else self.probes
        return min(wanted, self.max_syns)


DEFAULT_LIMITS = BirthdayLimits()


@dataclass(frozen=True)
class BirthdayPlan:
    """Our side and limits in one birthday punch (``PunchPlan.birthday``)."""

    side: BirthdaySide
    limits: BirthdayLimits = DEFAULT_LIMITS


def success_probability(sockets: int, probes: int, space: int = RANDOM_PORT_SPACE) -> float:
    """P(at least one of ``probes`` distinct guesses hits one of ``sockets`` random ports) ≈ 1 − e^(−M·N/R)."""
    if sockets < 0 or probes < 0 or space < 1:
        raise ValueError("sockets and probes must not be negative, space must be positive")
    return 1.0 - math.exp(-sockets * probes / space)


def birthday_side(own_nat: NatReport | None, peer_nat: NatReport | None) -> BirthdaySide | None:
    """Our side if the two NATs need (and allow) a birthday punch, else None."""
    if not direct_possible(own_nat, peer_nat).birthday:
        return None
    return BirthdaySide.HARD if classify(own_nat) is MappingClass.RANDOM else BirthdaySide.EASY


def guess_ports(count: int, rng: random.Random) -> list[int]:
    """``count`` distinct ports drawn uniformly from the random NATs' range (distinct guesses: a repeated one
    would add a SYN but no chance)."""
    if not 0 <= count <= RANDOM_PORT_SPACE:
        raise ValueError(f"count must be 0..{RANDOM_PORT_SPACE}")
    return rng.sample(range(RANDOM_PORT_LOW, RANDOM_PORT_HIGH + 1), count)


def birthday_candidates(
    plan: BirthdayPlan,
    *,
    peer_observed: Endpoint,
    rng: random.Random,
    peer_private: Sequence[Endpoint] = (),
    own_public_ip: str | None = None,
) -> tuple[Candidate, ...]:
    """The candidates of a birthday punch, in the order their SYNs leave.

    Private endpoints first when both peers share a public address (as in ``build_candidates``). Then the
    hard side's M tickets, all towards the peer's observed endpoint (``index`` tells them apart: each gets
    its own socket and local port), or the easy side's N guesses on the peer's public address. The peer's
    observed port itself is no candidate on the easy side: it belongs to the hard side's coordinator
    connection.
    """
    out: list[Candidate] = []
    if own_public_ip is not None and own_public_ip == peer_observed.ip:
        out.extend(Candidate(e, CandidateKind.PRIVATE) for e in peer_private if e != peer_observed)
    count = plan.limits.first_syns(plan.side)
    if plan.side is BirthdaySide.HARD:
        out.extend(Candidate(peer_observed, CandidateKind.BIRTHDAY, i) for i in range(1, count + 1))
    else:
        ports = guess_ports(count, rng)
        out.extend(Candidate(Endpoint(peer_observed.ip, p), CandidateKind.BIRTHDAY, i) for i, p in enumerate(ports, 1))
    return tuple(out)


def fresh_tickets(first: Sequence[Candidate], round_no: int) -> tuple[Candidate, ...]:
    """The hard side's tickets of round ``round_no`` (1 is the first round, ``first``): as many as the
    first round had, towards the same endpoint, with indices after every earlier round's."""
    tickets = [c for c in first if c.kind is CandidateKind.BIRTHDAY]
    if round_no < 1 or not tickets:
        raise ValueError("fresh tickets need a round number >= 1 and a first round of birthday tickets")
    if round_no == 1:
        return tuple(tickets)
    base = (round_no - 1) * len(tickets)
    return tuple(Candidate(c.endpoint, CandidateKind.BIRTHDAY, base + i) for i, c in enumerate(tickets, 1))


class SynPacer:
    """A token bucket over a fixed budget: how many SYNs may leave now, and when the next one may.

    Starts full (``burst`` tokens), refills at ``rate`` per second, never grants more than ``max_syns`` in
    all. Sans-I/O: the caller passes ``now`` (any monotonic clock).
    """

    def __init__(self, limits: BirthdayLimits, now: float) -> None:
        self.rate = limits.rate
        self.burst = float(limits.burst)
        self.remaining = limits.max_syns
        self._tokens = self.burst
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def grant(self, wanted: int, now: float) -> int:
        """Take up to ``wanted`` SYNs; returns how many may leave now (0 when the bucket or budget is empty)."""
        self._refill(now)
        n = max(0, min(wanted, int(self._tokens), self.remaining))
        self._tokens -= n
        self.remaining -= n
        return n

    def wait(self, now: float) -> float | None:
        """Seconds until the next SYN may leave; None once the budget is spent."""
        if self.remaining <= 0:
            return None
        self._refill(now)
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate


@dataclass
class BirthdayStats:
    """What one side's birthday punch did (``PunchResult.birthday`` / ``PunchFailed.birthday``)."""

    side: BirthdaySide
    syns: int = 0  # SYNs started by us (first tries and retries), the kernel's retransmissions not counted
    refused: int = 0  # answered with a RST (a NAT that resets unsolicited SYNs)
    unanswered: int = 0  # no answer before the deadline (still in SYN_SENT when the punch ended)
    connected: int = 0  # TCP connections that opened (matches; each then runs the handshake)
    budget_spent: bool = False  # retries stopped because the SYN budget ran out

    def summary(self) -> str:
        spent = ", SYN budget spent" if self.budget_spent else ""
        return (f"birthday ({self.side.value} side): {self.syns} SYNs, {self.connected} connected, "
                f"{self.refused} refused, {self.unanswered} unanswered{spent}")

    def to_json(self) -> dict[str, object]:
        return {"side": self.side.value, "syns": self.syns, "connected": self.connected, "refused": self.refused,
                "unanswered": self.unanswered, "budget_spent": self.budget_spent}


__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_PROBES",
    "DEFAULT_SOCKETS",
    "HARD_ROUNDS",
    "RANDOM_PORT_SPACE",
    "ROUND_GAP",
    "BirthdayLimits",
    "BirthdayPlan",
    "BirthdaySide",
    "BirthdayStats",
    "SynPacer",
    "birthday_candidates",
    "birthday_side",
    "fresh_tickets",
    "guess_ports",
    "success_probability",
]
