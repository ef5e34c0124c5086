"""Plan validation, the retry schedule and failure explanations (pure parts of the punch engine)."""

from __future__ import annotations

import pytest

from tcppunch.punch.plan import (
    RESYN_CEILING,
    RESYN_FLOOR,
    AttemptOutcome,
    Candidate,
    CandidateKind,
    PunchAttempt,
    PunchPlan,
    RetryPolicy,
    Role,
    Wave,
    explain_failure,
    peer_rtt_bound,
    resyn_delay,
    waves,
)
from tcppunch.wire.endpoint import Endpoint

C1 = Candidate(Endpoint("198.51.100.102", 4000), CandidateKind.OBSERVED)
C2 = Candidate(Endpoint("198.51.100.102", 20001), CandidateKind.PREDICTED, 1)


def plan(**changes: object) -> PunchPlan:
    base: dict[str, object] = {
        "local": Endpoint("10.0.1.2", 4000),
        "role": Role.INITIATOR,
        "session_id": "s",
        "key": b"k" * 32,
        "candidates": (C1, C2),
        "fire_at": 10.0,
        "deadline": 15.0,
    }
    base.update(changes)
    return PunchPlan(**base)  # type: ignore[arg-type]


def test_roles_are_opposites() -> None:
    assert Role.INITIATOR.other is Role.RESPONDER and Role.RESPONDER.other is Role.INITIATOR
    assert Role("initiator") is Role.INITIATOR  # same values as the coordinator's roles


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"session_id": ""}, "session_id"),
        ({"session_id": "x" * 65}, "session_id"),
        ({"key": b"short"}, "key"),
        ({"deadline": 10.0}, "deadline"),
        ({"low_ttl": 0}, "low_ttl"),
        ({"select_grace": -1.0}, "negative"),
        ({"resyn_after": 0.0}, "resyn_after"),
        ({"max_resyns": -1}, "max_resyns"),
        ({"candidates": (C1, C1)}, "distinct"),
    ],
)
def test_plan_validation(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(**changes)


def test_candidate_str() -> None:
    assert str(C1) == "198.51.100.102:4000 (observed)"
    assert str(C2) == "198.51.100.102:20001 (predicted #1)"


def test_retry_delays_fast_during_the_window_then_slower_and_capped() -> None:
    policy = RetryPolicy(base=0.001, fast_window=0.25, cap=0.05, jitter=0.5)
    assert [policy.delay(t, 0.0) for t in (0.0, 0.1, 0.249)] == [0.001] * 3
    assert policy.delay(0.25, 0.0) == 0.001  # leaving the window: grows from base
    assert policy.delay(0.27, 0.0) == pytest.approx(0.02)
    assert policy.delay(10.0, 0.0) == 0.05 and policy.delay(10.0, 0.999) <= 0.05 * 1.5
    assert policy.delay(0.0, 1.0) == pytest.approx(0.0015)
    assert policy.delay(-1.0, 0.0) == 0.001  # before firing (accepted early): fast


def test_failure_explanation_names_every_candidate_and_the_way_out() -> None:
    attempts = (
        PunchAttempt(C1.endpoint, C1, 1, AttemptOutcome.REFUSED, 0.001),
        PunchAttempt(C1.endpoint, C1, 2, AttemptOutcome.REFUSED, 0.003),
        PunchAttempt(Endpoint("198.51.100.9", 1), None, 0, AttemptOutcome.VERIFY_FAILED, 0.01, "bad HELLO MAC"),
    )
    text = explain_failure(plan(), attempts, "no verified connection before the deadline")
    assert "refused x2" in text and "RST" in text
    assert "198.51.100.102:20001 (predicted #1): no try finished" in text
    assert "incoming (listener): verify-failed x1" in text
    assert "relay" in text and "tcppunch detect" in text
    assert "listened" in explain_failure(plan(candidates=()), (), "x")


def test_attempt_str() -> None:
    a = PunchAttempt(C1.endpoint, C1, 3, AttemptOutcome.REFUSED, 0.0125, "Connection refused")
    assert str(a) == "+12.5 ms 198.51.100.102:4000 (observed) try 3: refused: Connection refused"


V6 = Candidate(Endpoint("2001:db8:2::2", 4000), CandidateKind.IPV6)
LOCAL6 = Endpoint("2001:db8:1::2", 4000)


def test_waves_race_ipv6_first_then_the_rest_after_the_attempt_delay() -> None:
    assert waves(plan()) == (Wave(0.0, (C1, C2)),)
    staggered = plan(candidates=(C1, V6, C2), local6=LOCAL6, attempt_delay=0.3)
    assert waves(staggered) == (Wave(0.0, (V6,)), Wave(0.3, (C1, C2)))  # plan order kept within a wave
    assert waves(plan(candidates=(V6,), local6=LOCAL6)) == (Wave(0.0, (V6,)),)
    assert waves(plan(candidates=())) == ()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"candidates": (V6,)}, "local6"),
        ({"local6": Endpoint("10.0.1.2", 4000)}, "IPv6 endpoint"),
        ({"attempt_delay": 0.0}, "attempt_delay"),
    ],
)
def test_ipv6_plan_validation(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(**changes)


def test_ipv6_candidates_retry_by_their_own_policy() -> None:
    slow = RetryPolicy(base=0.2, fast_window=0.0)
    p = plan(candidates=(C1, V6), local6=LOCAL6, retry=slow)
    assert p.retry_for(C1) is slow
    assert p.retry_for(V6) == RetryPolicy()  # no NAT66: a retry costs no mapping


def test_peer_rtt_bound_sums_both_one_way_delays_to_the_coordinator() -> None:
    # we are 60 ms from the coordinator; fire_in 0: the other peer is no farther than we are
    assert peer_rtt_bound(0.12, 0.0) == pytest.approx(0.24)
    # told to wait 40 ms: the other peer is 40 ms farther (its one-way delay 100 ms)
    assert peer_rtt_bound(0.12, 0.04) == pytest.approx(2 * (0.06 + 0.10))
    assert peer_rtt_bound(None, 0.0) is None and peer_rtt_bound(0.0, 0.0) is None


def test_resyn_delay_is_a_few_peer_round_trips_between_floor_and_ceiling() -> None:
    assert resyn_delay(None) == RESYN_FLOOR  # unknown path: as before
    assert resyn_delay(0.001) == RESYN_FLOOR  # a LAN or the lab without delay: fire skew dominates
    assert resyn_delay(0.14) == pytest.approx(0.28)
    assert resyn_delay(RESYN_CEILING / 2) == pytest.approx(RESYN_CEILING)
    # 30 ms per WAN link (bound 240 ms): no re-send, the kernel retransmits with the same sequence number
    assert resyn_delay(0.24) is None and resyn_delay(RESYN_CEILING) is None
