"""Per-token relay limits: concurrent relays and a byte budget shared by a token's relays."""

from __future__ import annotations

import pytest

from tcppunch.relay import ByteBudget, RelayAccounting, RelayLimitExceeded, RelayLimits


def test_concurrent_relays_are_capped_per_token_and_slots_come_back() -> None:
    accounting = RelayAccounting(RelayLimits(max_concurrent_per_token=2))
    first = accounting.acquire("alice")
    accounting.acquire("alice")
    with pytest.raises(RelayLimitExceeded, match=r"2 relays open \(limit 2\)"):
        accounting.acquire("alice")
    accounting.acquire("bob")  # another token is not affected
    first.release()
    first.release()  # idempotent: does not free a second slot
    assert accounting.active("alice") == 1
    accounting.acquire("alice")
    assert accounting.active("alice") == 2


def test_a_lease_is_a_context_manager() -> None:
    accounting = RelayAccounting(RelayLimits(max_concurrent_per_token=1))
    with accounting.acquire("alice"):
        assert accounting.active("alice") == 1
    assert accounting.active("alice") == 0


def test_the_byte_budget_is_shared_by_a_tokens_relays_and_refuses_when_spent() -> None:
    accounting = RelayAccounting(RelayLimits(max_concurrent_per_token=None, max_bytes_per_token=100))
    one, two = accounting.acquire("alice"), accounting.acquire("alice")
    assert one.budget is two.budget
    one.budget.charge(60)
    assert two.budget.allowance(100) == 40
    two.budget.charge(40)
    one.release()
    two.release()
    with pytest.raises(RelayLimitExceeded, match="byte budget"):
        accounting.acquire("alice")
    assert accounting.acquire("bob").budget.remaining == 100


def test_unlimited_budget() -> None:
    budget = ByteBudget(None)
    budget.charge(10**12)
    assert budget.remaining is None
    assert budget.allowance(5) == 5


@pytest.mark.parametrize(
    "limits",
    [
        {"max_concurrent_per_token": 0},
        {"max_bytes_per_token": -1},
    ],
)
def test_nonsense_limits_are_refused(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        RelayLimits(**limits)
