"""Pure decisions of the coordinator: fire times, relay advice, tokens, RTT smoothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcppunch.coordinator.auth import Tokens, TokensFileError
from tcppunch.coordinator.registry import RttEstimator
from tcppunch.coordinator.session import relay_advice, schedule_fire
from tcppunch.wire.coord import RelayAdvice
from tcppunch.wire.natreport import FilteringBehaviour, MappingBehaviour, NatReport, TcpBehaviour

EIM, ADM, APDM = (
    MappingBehaviour.ENDPOINT_INDEPENDENT,
    MappingBehaviour.ADDRESS_DEPENDENT,
    MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT,
)
EIF, ADF, APDF = (
    FilteringBehaviour.ENDPOINT_INDEPENDENT,
    FilteringBehaviour.ADDRESS_DEPENDENT,
    FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT,
)


def nat(
    mapping: MappingBehaviour | None,
    filtering: FilteringBehaviour | None,
    *,
    delta: int | None = None,
    behind: bool | None = True,
) -> NatReport:
    return NatReport(
        tcp=TcpBehaviour(mapping=mapping, filtering=filtering, port_delta=delta, port_preservation=False),
        behind_nat=behind,
    )


FULL_CONE = nat(EIM, EIF)
RESTRICTED = nat(EIM, ADF)
PORT_RESTRICTED = nat(EIM, APDF)
SYM_SEQ = nat(APDM, APDF, delta=1)
SYM_RANDOM = nat(APDM, APDF)
PUBLIC = nat(None, None, behind=False)
UNKNOWN = NatReport()


def test_equal_delays_fire_at_once() -> None:
    assert schedule_fire(0.02, 0.02) == (0.0, 0.0)


def test_nearer_peer_waits_for_the_difference() -> None:
    fire_a, fire_b = schedule_fire(0.010, 0.040)
    assert fire_a == pytest.approx(0.030)
    assert fire_b == 0.0


def test_unknown_delay_is_taken_from_the_other_peer_or_zero() -> None:
    assert schedule_fire(None, 0.05) == (0.0, 0.0)
    assert schedule_fire(0.05, None) == (0.0, 0.0)
    assert schedule_fire(None, None) == (0.0, 0.0)


def test_margin_is_added_to_both_and_negatives_are_clamped() -> None:
    assert schedule_fire(0.0, 0.01, margin=0.005) == pytest.approx((0.015, 0.005))
    assert schedule_fire(-1.0, 0.0) == (0.0, 0.0)


@given(st.floats(0, 5), st.floats(0, 5), st.floats(0, 1))
def test_both_fire_at_the_same_instant_and_nobody_waits_needlessly(a: float, b: float, margin: float) -> None:
    fire_a, fire_b = schedule_fire(a, b, margin=margin)
    assert a + fire_a == pytest.approx(b + fire_b)
    assert min(fire_a, fire_b) == pytest.approx(margin)
    assert fire_a >= 0 and fire_b >= 0


@pytest.mark.parametrize(
    ("a", "b", "advice"),
    [
        (SYM_RANDOM, SYM_RANDOM, RelayAdvice.RELAY_NOW),
        (SYM_RANDOM, PORT_RESTRICTED, RelayAdvice.BIRTHDAY),  # fixed endpoint, filters by port: birthday
        (PORT_RESTRICTED, SYM_RANDOM, RelayAdvice.BIRTHDAY),
        (SYM_RANDOM, SYM_SEQ, RelayAdvice.RELAY_NOW),  # seq-symmetric still filters by port
        (SYM_RANDOM, RESTRICTED, RelayAdvice.PUNCH),  # admits the SYN from any port of A's address
        (SYM_RANDOM, FULL_CONE, RelayAdvice.PUNCH),
        (SYM_RANDOM, PUBLIC, RelayAdvice.PUNCH),
        (SYM_SEQ, SYM_SEQ, RelayAdvice.PUNCH),  # predictable by port delta
        (PORT_RESTRICTED, PORT_RESTRICTED, RelayAdvice.PUNCH),
        (SYM_RANDOM, UNKNOWN, RelayAdvice.PUNCH),  # not measured is never a reason to give up
        (UNKNOWN, UNKNOWN, RelayAdvice.PUNCH),
    ],
)
def test_relay_advice(a: NatReport, b: NatReport, advice: RelayAdvice) -> None:
    got, reason = relay_advice(a, b)
    assert got is advice
    assert reason


def test_birthday_opt_out_means_relay_now() -> None:
    got, reason = relay_advice(SYM_RANDOM, PORT_RESTRICTED, birthday=False)
    assert got is RelayAdvice.RELAY_NOW
    assert "filters by address and port" in reason
    assert relay_advice(PORT_RESTRICTED, PORT_RESTRICTED, birthday=False)[0] is RelayAdvice.PUNCH


def test_relay_advice_without_reports_is_punch() -> None:
    assert relay_advice(None, SYM_RANDOM)[0] is RelayAdvice.PUNCH


def test_rtt_estimator_smooths_like_rfc6298() -> None:
    rtt = RttEstimator()
    rtt.add(0.1)
    assert rtt.srtt == pytest.approx(0.1)
    rtt.add(0.2)
    assert rtt.srtt == pytest.approx(0.1 * 7 / 8 + 0.2 / 8)
    assert rtt.min_rtt == pytest.approx(0.1)
    assert rtt.samples == 2


def test_shared_token() -> None:
    tokens = Tokens(shared="s3cret")
    assert tokens.check("anyone", "s3cret")
    assert not tokens.check("anyone", "s3cret ")
    assert not tokens.check("anyone", "")


def test_per_id_tokens_win_over_the_shared_one() -> None:
    tokens = Tokens(shared="common", per_id={"alice": "a-secret"})
    assert tokens.check("alice", "a-secret")
    assert not tokens.check("alice", "common")
    assert tokens.check("bob", "common")
    only_ids = Tokens(per_id={"alice": "a-secret"})
    assert not only_ids.check("bob", "a-secret")


def test_no_token_at_all_is_refused() -> None:
    with pytest.raises(ValueError):
        Tokens()
    with pytest.raises(ValueError):
        Tokens(shared="")


def test_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"alice": "x", "bob": "y"}))
    tokens = Tokens.from_file(path)
    assert tokens.check("bob", "y") and not tokens.check("bob", "x")
    for bad in ("[1]", '{"a": 1}', '{"a": ""}', "{", "{}"):
        path.write_text(bad)
        with pytest.raises(TokensFileError):
            Tokens.from_file(path)
    with pytest.raises(TokensFileError):
        Tokens.from_file(tmp_path / "missing.json")


def test_with_ipv6_the_advice_still_names_what_ipv4_needs() -> None:
    """IPv6 makes any pair direct; the IPv4 fallback, raced second, still gets its birthday punch."""
    assert relay_advice(SYM_RANDOM, SYM_RANDOM, ipv6=True)[0] is RelayAdvice.PUNCH
    got, reason = relay_advice(SYM_RANDOM, PORT_RESTRICTED, ipv6=True)
    assert got is RelayAdvice.BIRTHDAY and "IPv6" in reason
    assert relay_advice(SYM_RANDOM, PORT_RESTRICTED, ipv6=True, birthday=False)[0] is RelayAdvice.PUNCH
