"""Hole punching: reuse-port sockets, candidates and port prediction, the verification handshake, the
engine. See docs/punching.md. In short::

    plan = PunchPlan(local=..., role=Role.INITIATOR, session_id=..., key=..., fire_at=..., deadline=...,
                     candidates=build_candidates(peer_observed=..., peer_nat=..., own_nat=...))
    result = await punch(plan)  # PunchResult (reader, writer, sock, ...) or raises PunchFailed
"""

from tcppunch.punch.engine import punch
from tcppunch.punch.plan import (
    HAPPY_EYEBALLS_DELAY,
    SLOW_RETRY,
    AttemptOutcome,
    Candidate,
    CandidateKind,
    PunchAttempt,
    PunchFailed,
    PunchPlan,
    PunchResult,
    PunchTimings,
    RetryPolicy,
    Role,
    Wave,
    waves,
)
from tcppunch.punch.prediction import (
    DirectVerdict,
    MappingClass,
    build_candidates,
    classify,
    direct_possible,
    predicted_ports,
    retry_policy_for,
)

__all__ = [
    "HAPPY_EYEBALLS_DELAY",
    "SLOW_RETRY",
    "AttemptOutcome",
    "Candidate",
    "CandidateKind",
    "DirectVerdict",
    "MappingClass",
    "PunchAttempt",
    "PunchFailed",
    "PunchPlan",
    "PunchResult",
    "PunchTimings",
    "RetryPolicy",
    "Role",
    "Wave",
    "build_candidates",
    "classify",
    "direct_possible",
    "predicted_ports",
    "punch",
    "retry_policy_for",
    "waves",
]
