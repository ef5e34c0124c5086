"""tcppunch.ratelimit: token buckets per key and the log-line limiter (explicit ``now``)."""

from __future__ import annotations

import pytest

from tcppunch.ratelimit import KeyedBuckets, LogLimiter, source_key


def test_a_bucket_allows_its_burst_then_refills_at_its_rate() -> None:
    buckets = KeyedBuckets(rate=2.0, burst=3)
    assert [buckets.take("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert buckets.retry_after("a", 0.0) == pytest.approx(0.5)
    assert buckets.take("b", 0.0)  # another key has its own bucket
    assert not buckets.take("a", 0.4) and buckets.take("a", 0.5)
    assert buckets.allowed("a", 10.0) and buckets.take("a", 10.0)


def test_the_table_forgets_the_least_recently_used_key() -> None:
    buckets = KeyedBuckets(rate=0.0, burst=1, max_keys=2)
    assert buckets.take("a", 0.0) and buckets.take("b", 0.0)
    assert not buckets.take("a", 1.0)  # "a" used last, "b" is now the oldest
    assert buckets.take("c", 1.0)
    assert len(buckets) == 2
    assert buckets.take("b", 2.0)  # forgotten: starts full again


def test_log_limiter_lets_a_burst_through_then_counts_what_it_drops() -> None:
    limiter = LogLimiter(interval=10.0, burst=2)
    results = [limiter.check("e", float(t)) for t in range(6)]
    assert results == [{}, {}, None, None, None, None]
    assert limiter.suppressed("e") == 4
    assert limiter.check("other", 5.0) == {}
    assert limiter.check("e", 10.0) == {"suppressed": 4}  # the next line says how many were dropped
    assert limiter.suppressed("e") == 0


def test_source_key_counts_ipv6_by_its_64() -> None:
    assert source_key("198.51.100.7") == "198.51.100.7"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
