"""Relay budgets per source address and per token (issue 9 finding 7): shared, windowed, deduplicated."""

from __future__ import annotations

import pytest

from tcppunch.relay import ByteBudget, RelayAccounting, RelayLimits


def test_relays_of_one_source_share_its_budget_whatever_their_ids() -> None:
    accounting = RelayAccounting(RelayLimits(max_bytes_per_source=100, max_bytes_per_token=None), now=0.0)
    first = accounting.budgets(("source:198.51.100.7", "token:shared"), now=1.0)
    second = accounting.budgets(("source:198.51.100.7", "token:shared"), now=2.0)
    assert len(first) == 1 and first[0] is second[0]
    first[0].charge(100)
    assert accounting.exhausted(("source:198.51.100.7",), now=3.0) == "source:198.51.100.7"
    assert accounting.exhausted(("source:198.51.100.8",), now=3.0) is None


def test_an_account_named_twice_is_charged_once() -> None:
    accounting = RelayAccounting(RelayLimits(), now=0.0)
    budgets = accounting.budgets(("source:127.0.0.1", "source:127.0.0.1", "token:a", "token:a"), now=0.0)
    assert len(budgets) == 2


def test_a_new_window_brings_fresh_budgets() -> None:
    accounting = RelayAccounting(RelayLimits(max_bytes_per_token=10, window=60.0), now=0.0)
    (budget,) = accounting.budgets(("token:x",), now=0.0)
    budget.charge(10)
    assert accounting.exhausted(("token:x",), now=59.0) == "token:x"
    assert accounting.exhausted(("token:x",), now=60.0) is None


def test_defaults_are_limited() -> None:
    limits = RelayLimits()
    assert limits.max_bytes_per_source is not None and limits.max_bytes_per_source < 1 << 30
    assert limits.max_bytes_per_token is not None and limits.max_duration is not None


def test_unlimited_budget() -> None:
    budget = ByteBudget(None)
    budget.charge(10**12)
    assert budget.remaining is None
    assert budget.allowance(5) == 5


@pytest.mark.parametrize(
    "limits",
    [{"max_bytes_per_source": -1}, {"max_bytes_per_token": -1}, {"window": 0}, {"max_duration": 0}],
)
def test_nonsense_limits_are_refused(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        RelayLimits(**limits)  # type: ignore[arg-type]
