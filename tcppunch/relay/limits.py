"""Per-token relay limits: how many relays a token may hold open at once and how many bytes it may move.

The coordinator owns one :class:`RelayAccounting` and asks it for a :class:`RelayLease` before it splices
two connections together. The lease carries the token's shared :class:`ByteBudget`; the pump charges every
byte it takes from a socket against it, so concurrent relays of one token draw on one budget and none can
overspend it. Sans-I/O: plain counters, no clock, no sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType


@dataclass(frozen=True)
class RelayLimits:
    """What one token may use of the relay. ``None`` means unlimited."""

    max_concurrent_per_token: int | None = 4
    max_bytes_per_token: int | None = None

    def __post_init__(self) -> None:
        if self.max_concurrent_per_token is not None and self.max_concurrent_per_token < 1:
            raise ValueError("max_concurrent_per_token must be at least 1 (or None)")
        if self.max_bytes_per_token is not None and self.max_bytes_per_token < 0:
            raise ValueError("max_bytes_per_token must not be negative (or None)")


class ByteBudget:
    """A shared count of bytes still allowed; charged by every relay that holds it."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 0:
            raise ValueError("a byte budget must not be negative")
        self._limit = limit
        self.used = 0

    @property
    def remaining(self) -> int | None:
        """Bytes still allowed, or ``None`` when the budget is unlimited."""
        return None if self._limit is None else max(0, self._limit - self.used)

    def allowance(self, want: int) -> int:
        """How many of ``want`` bytes may be taken now."""
        remaining = self.remaining
        return want if remaining is None else min(want, remaining)

    def charge(self, n: int) -> None:
        """Record ``n`` bytes taken (callers take at most :meth:`allowance`)."""
        self.used += n


class RelayLimitExceeded(Exception):
    """A token asked for a relay beyond its limits; the message says which limit."""


class RelayLease:
    """One open relay counted against a token; release it when the relay ends (idempotent)."""

    def __init__(self, accounting: RelayAccounting, token: str, budget: ByteBudget) -> None:
        self._accounting = accounting
        self.token = token
        self.budget = budget
        self._released = False

    def release(self) -> None:
        """Give the concurrency slot back; bytes charged to the budget stay charged."""
        if not self._released:
            self._released = True
            self._accounting._release(self.token)

    def __enter__(self) -> RelayLease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class RelayAccounting:
    """Counts open relays and bytes per token against one :class:`RelayLimits`.

    Byte budgets are for the life of this object (a coordinator run); a coordinator that wants budgets per
    period makes a new accounting each period.
    """

    def __init__(self, limits: RelayLimits) -> None:
        self.limits = limits
        self._active: dict[str, int] = {}
        self._budgets: dict[str, ByteBudget] = {}

    def acquire(self, token: str) -> RelayLease:
        """Open a relay for ``token`` or raise :class:`RelayLimitExceeded` saying which limit stops it."""
        active = self._active.get(token, 0)
        cap = self.limits.max_concurrent_per_token
        if cap is not None and active >= cap:
            raise RelayLimitExceeded(f"token already has {active} relays open (limit {cap})")
        budget = self.budget(token)
        if budget.remaining == 0:
            raise RelayLimitExceeded(
                f"token has used its relay byte budget ({self.limits.max_bytes_per_token} bytes)"
            )
        self._active[token] = active + 1
        return RelayLease(self, token, budget)

    def budget(self, token: str) -> ByteBudget:
        """The token's shared byte budget (made on first use)."""
        budget = self._budgets.get(token)
        if budget is None:
            budget = self._budgets[token] = ByteBudget(self.limits.max_bytes_per_token)
        return budget

    def active(self, token: str) -> int:
        """How many relays ``token`` holds open now."""
        return self._active.get(token, 0)

    def _release(self, token: str) -> None:
        left = self._active.get(token, 0) - 1
        if left > 0:
            self._active[token] = left
        else:
            self._active.pop(token, None)
