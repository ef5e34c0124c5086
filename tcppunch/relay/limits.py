"""Relay budgets: how many bytes the relay carries per source address and per token in each window.

The coordinator names the accounts a relay is charged to (``source:<address>`` for each end's source,
``token:<holder>`` for each peer's secret) and asks :class:`RelayAccounting` for their shared
:class:`ByteBudget` objects; the pump charges every byte it moves against all of them, so concurrent
relays of one source draw on one budget and none can overspend it. Per-id budgets alone would not do:
with a shared token a fresh id is free, but a fresh source address or token is not. Sans-I/O: plain
counters, ``now`` passed in. A budget shared with other processes (a cluster of coordinators) is a
subclass that leases bytes in chunks: it answers :meth:`ByteBudget.refill` with something to wait for
instead of ``None`` while more bytes may come.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class RelayLimits:
    """Byte budgets per window (``None``: unlimited) and the longest a relay may run.

    Defaults (docs/protocol.md, "Limits"): the relay is a fallback that must carry real transfers
    between authenticated peers (a few hundred MB), not a free bulk service for whoever holds a token.
    512 MiB per source address per hour (~1.2 Mbit/s on average, bursts at full speed), 4 GiB per
    token per hour (with one shared token that is the whole server's relay volume), and one hour per
    relay. libp2p's relay v2 gives UNKNOWN peers 2 min and 128 KiB per circuit; ours are token holders.
    """

    max_bytes_per_source: int | None = 512 * MiB
    max_bytes_per_token: int | None = 4 * GiB
    window: float = 3600.0
    max_duration: float | None = 3600.0

    def __post_init__(self) -> None:
        for name in ("max_bytes_per_source", "max_bytes_per_token"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative (or None)")
        if self.window <= 0:
            raise ValueError("window must be positive")
        if self.max_duration is not None and self.max_duration <= 0:
            raise ValueError("max_duration must be positive (or None)")

    def limit_of(self, account: str) -> int | None:
        """The byte limit of an account (``source:...`` or ``token:...``)."""
        kind = account.split(":", 1)[0]
        if kind == "source":
            return self.max_bytes_per_source
        if kind == "token":
            return self.max_bytes_per_token
        raise ValueError(f"unknown relay account kind {kind!r}")


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

    def refill(self) -> Awaitable[object] | None:
        """When :meth:`allowance` is 0: something to wait for before asking again (a shared budget's next
        lease), or ``None`` when no more bytes will come (this budget: used up)."""
        return None

    def hold(self) -> None:
        """A relay starts drawing on this budget (a shared budget counts its users)."""

    def release(self) -> None:
        """A relay stopped drawing on this budget (a shared budget gives back what it leased unspent)."""


BudgetFactory = Callable[[str, int], ByteBudget]
"""Makes the budget of an account (name, limit): plain :class:`ByteBudget` in one process, a shared one
in a cluster."""


class RelayAccounting:
    """The budgets of every account in the current window; a new window starts with fresh budgets
    (relays still running keep charging the budgets they started with)."""

    def __init__(self, limits: RelayLimits, now: float, make: BudgetFactory | None = None) -> None:
        self.limits = limits
        self._make: BudgetFactory = make or (lambda _account, limit: ByteBudget(limit))
        self._window_start = now
        self._budgets: dict[str, ByteBudget] = {}

    def budgets(self, accounts: tuple[str, ...], now: float) -> list[ByteBudget]:
        """The budgets a relay charged to ``accounts`` draws on (one per distinct limited account)."""
        if now - self._window_start >= self.limits.window:
            self._window_start, self._budgets = now, {}
        out: list[ByteBudget] = []
        for account in dict.fromkeys(accounts):
            limit = self.limits.limit_of(account)
            if limit is None:
                continue
            budget = self._budgets.get(account)
            if budget is None:
                budget = self._budgets[account] = self._make(account, limit)
            out.append(budget)
        return out

    def exhausted(self, accounts: tuple[str, ...], now: float) -> str | None:
        """The first of ``accounts`` with nothing left in this window, or None."""
        for account, budget in zip(dict.fromkeys(a for a in accounts if self.limits.limit_of(a) is not None),
                                   self.budgets(accounts, now), strict=True):
            if budget.remaining == 0:
                return account
        return None
