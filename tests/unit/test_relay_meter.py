"""The relay's sans-I/O rules: byte limits, shared budgets, idle deadline, final figures."""

from __future__ import annotations

import pytest

from tcppunch.relay import ByteBudget, Direction, EndReason, RelayMeter


def test_without_limits_everything_asked_is_allowed() -> None:
    meter = RelayMeter(now=0.0, idle_timeout=5.0)
    assert meter.allowance(1 << 30) == 1 << 30
    assert not meter.exhausted


def test_max_bytes_counts_both_directions_together() -> None:
    meter = RelayMeter(now=0.0, idle_timeout=5.0, max_bytes=100)
    assert meter.allowance(70) == 70
    meter.took(70, now=1.0)
    assert meter.allowance(70) == 30
    meter.took(30, now=2.0)
    assert meter.allowance(1) == 0
    assert meter.exhausted


def test_a_shared_budget_is_charged_and_limits_every_meter_holding_it() -> None:
    budget = ByteBudget(50)
    first = RelayMeter(now=0.0, idle_timeout=5.0, budgets=[budget])
    second = RelayMeter(now=0.0, idle_timeout=5.0, max_bytes=1000, budgets=[budget])
    first.took(first.allowance(40), now=0.0)
    assert second.allowance(1000) == 10
    second.took(10, now=0.0)
    assert first.exhausted and second.exhausted
    assert budget.used == 50 and budget.remaining == 0


def test_a_budget_given_twice_is_charged_once() -> None:
    budget = ByteBudget(100)
    meter = RelayMeter(now=0.0, idle_timeout=5.0, budgets=[budget, budget])
    meter.took(30, now=0.0)
    assert budget.used == 30


def test_the_smallest_of_several_limits_wins() -> None:
    meter = RelayMeter(
        now=0.0, idle_timeout=5.0, max_bytes=100, budgets=[ByteBudget(80), ByteBudget(None)]
    )
    assert meter.allowance(500) == 80


def test_idle_deadline_moves_with_every_byte_either_way() -> None:
    meter = RelayMeter(now=10.0, idle_timeout=5.0)
    assert meter.idle_deadline == 15.0
    meter.took(1, now=12.0)
    assert meter.idle_deadline == 17.0
    meter.gave(Direction.B_TO_A, 1, now=13.5)
    assert meter.idle_deadline == 18.5


def test_stats_report_delivered_bytes_per_direction() -> None:
    meter = RelayMeter(now=1.0, idle_timeout=5.0)
    meter.took(10, now=1.0)
    meter.gave(Direction.A_TO_B, 7, now=2.0)
    meter.gave(Direction.B_TO_A, 3, now=2.0)
    stats = meter.stats(now=4.0, reason=EndReason.EOF, method="splice")
    assert (stats.a_to_b, stats.b_to_a, stats.duration) == (7, 3, 3.0)
    assert stats.reason == "eof" and stats.method == "splice" and stats.error is None


@pytest.mark.parametrize("idle_timeout", [0.0, -1.0, float("nan")])
def test_non_positive_idle_timeout_is_refused(idle_timeout: float) -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        RelayMeter(now=0.0, idle_timeout=idle_timeout)


def test_negative_max_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        RelayMeter(now=0.0, idle_timeout=1.0, max_bytes=-1)
