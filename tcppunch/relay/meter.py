"""The relay's bookkeeping: bytes each way, the byte limits, the idle deadline, and how a relay ended.

Sans-I/O: the pump tells the meter what moved and when (``now`` from the loop's clock); the meter answers
how much may still be taken and when the relay goes idle. Keeping this apart from the socket code lets the
rules be tested without sockets and keeps the pump a thin mover of bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from tcppunch.relay.limits import ByteBudget


class EndReason(StrEnum):
    """Why a relay ended."""

    EOF = "eof"  # both sides finished sending (each EOF was passed on)
    IDLE = "idle"  # no byte moved either way for idle_timeout seconds
    LIMIT = "limit"  # max_bytes or a token byte budget was used up
    ERROR = "error"  # a socket failed (reset, broken pipe, ...) on either side


class Direction(StrEnum):
    """One of the two byte streams of a relay."""

    A_TO_B = "a->b"
    B_TO_A = "b->a"


@dataclass(frozen=True)
class RelayStats:
    """What a finished relay did. Byte counts are bytes delivered to the receiving socket."""

    a_to_b: int
    b_to_a: int
    duration: float
    reason: EndReason
    method: str  # "splice" or "copy": the data path that ran
    error: str | None = None  # the first socket error, when reason is ERROR


class RelayMeter:
    """Counts bytes, enforces ``max_bytes`` and the shared budgets, and tracks the idle deadline."""

    def __init__(
        self,
        *,
        now: float,
        idle_timeout: float,
        max_bytes: int | None = None,
        budgets: Sequence[ByteBudget] = (),
    ) -> None:
        if not idle_timeout > 0:
            raise ValueError("idle_timeout must be positive")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self.started = now
        self.idle_timeout = idle_timeout
        self.max_bytes = max_bytes
        # One budget given twice (both peers under one token) must be charged once per byte.
        self.budgets = tuple({id(budget): budget for budget in budgets}.values())
        self.last_activity = now
        self.taken_total = 0
        self.delivered = {Direction.A_TO_B: 0, Direction.B_TO_A: 0}

    def allowance(self, want: int) -> int:
        """How many of ``want`` bytes may be taken from a source now (0 once a limit is used up)."""
        allowed = want
        if self.max_bytes is not None:
            allowed = min(allowed, self.max_bytes - self.taken_total)
        for budget in self.budgets:
            allowed = budget.allowance(allowed)
        return max(0, allowed)

    def refill(self) -> Awaitable[object] | None:
        """When :meth:`allowance` is 0: what to wait for before asking again (a shared budget's next lease),
        or ``None`` when the relay is at a limit for good."""
        if self.max_bytes is not None and self.taken_total >= self.max_bytes:
            return None
        waits = []
        for budget in self.budgets:
            if budget.allowance(1) == 0:
                wait = budget.refill()
                if wait is None:
                    return None
                waits.append(wait)
        return waits[0] if waits else None

    @property
    def exhausted(self) -> bool:
        """True once no further byte may be taken in either direction."""
        return self.allowance(1) == 0

    def took(self, n: int, now: float) -> None:
        """``n`` bytes were taken from a source (at most :meth:`allowance`); charge them."""
        self.taken_total += n
        for budget in self.budgets:
            budget.charge(n)
        self.last_activity = now

    def gave(self, direction: Direction, n: int, now: float) -> None:
        """``n`` bytes were delivered to the receiving socket of ``direction``."""
        self.delivered[direction] += n
        self.last_activity = now

    @property
    def idle_deadline(self) -> float:
        """When the relay counts as idle if nothing moves before then."""
        return self.last_activity + self.idle_timeout

    def stats(self, now: float, reason: EndReason, method: str, error: str | None = None) -> RelayStats:
        """The final figures."""
        return RelayStats(
            a_to_b=self.delivered[Direction.A_TO_B],
            b_to_a=self.delivered[Direction.B_TO_A],
            duration=now - self.started,
            reason=reason,
            method=method,
            error=error,
        )
