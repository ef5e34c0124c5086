"""Rate limits keyed by source: token buckets for requests, and a limiter for repeated log lines.

Sans-I/O like the protocols that use them: every call takes ``now`` (seconds on any monotonic clock).
Tables are bounded: when full, the least recently used key is forgotten (a forgotten key starts with a
full bucket again, which errs towards serving, never towards unbounded memory).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

# How many keys a table remembers before it forgets the least recently used one.
MAX_KEYS = 65_536


def source_key(ip: str) -> str:
    """The unit a per-source limit counts: an IPv4 address, or the /64 of an IPv6 address (one host
    usually owns a whole /64, so counting single IPv6 addresses would be no limit at all)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class KeyedBuckets:
    """One token bucket per key: ``burst`` tokens at most, refilled at ``rate`` tokens per second.

    ``take(key, now)`` spends one token and says whether there was one. ``rate`` 0 makes ``burst`` a
    fixed allowance.
    """

    def __init__(self, rate: float, burst: float, *, max_keys: int = MAX_KEYS) -> None:
        if rate < 0 or burst < 1:
            raise ValueError("rate must be >= 0 and burst >= 1")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
            bucket.updated = now
        return bucket

    def allowed(self, key: str, now: float, cost: float = 1.0) -> bool:
        """Whether ``cost`` tokens are available, without spending them."""
        return self._bucket(key, now).tokens >= cost

    def take(self, key: str, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are that many; False (nothing spent) otherwise."""
        bucket = self._bucket(key, now)
        if bucket.tokens < cost:
            return False
        bucket.tokens -= cost
        return True

    def retry_after(self, key: str, now: float, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are available (0 if they are now; inf if the rate is 0)."""
        missing = cost - self._bucket(key, now).tokens
        if missing <= 0:
            return 0.0
        return float("inf") if self.rate == 0 else missing / self.rate


class LogLimiter:
    """At most ``burst`` lines per key per ``interval``; the next line let through after a quiet spell
    carries ``suppressed=N``, the count of lines dropped meanwhile.

    Use: ``fields = limiter.check(key, now)``; ``None`` means drop this line, otherwise log it with
    ``**fields``. Works with any structlog logger (it only adds a keyword).
    """

    def __init__(self, interval: float = 10.0, burst: int = 5, *, max_keys: int = 4096) -> None:
        self.interval, self.burst, self.max_keys = interval, burst, max_keys
        self._windows: OrderedDict[str, tuple[float, int, int]] = OrderedDict()  # start, logged, dropped

    def check(self, key: str, now: float) -> dict[str, Any] | None:
        start, logged, dropped = self._windows.get(key, (now, 0, 0))
        if now - start >= self.interval:
            start, logged = now, 0
        if logged >= self.burst:
            self._store(key, (start, logged, dropped + 1))
            return None
        self._store(key, (start, logged + 1, 0))
        return {"suppressed": dropped} if dropped else {}

    def suppressed(self, key: str) -> int:
        """Lines of ``key`` dropped since the last one let through."""
        return self._windows.get(key, (0.0, 0, 0))[2]

    def _store(self, key: str, value: tuple[float, int, int]) -> None:
        self._windows[key] = value
        self._windows.move_to_end(key)
        while len(self._windows) > self.max_keys:
            self._windows.popitem(last=False)
