"""The swarm example's piece picker (examples/swarm/picker.py): rarest first, one request per piece,
and a lost peer's outstanding pieces go back to the pool."""

from __future__ import annotations

import random

import pytest

from examples.swarm.picker import PiecePicker


def _picker(count: int = 6, have: set[int] | None = None) -> PiecePicker:
    return PiecePicker(count, set(have or ()), random.Random(1))


def test_rarest_piece_first() -> None:
    p = _picker()
    p.add_peer("a", range(6))
    p.add_peer("b", [0, 1, 2, 3, 4])
    p.add_peer("c", [0, 1, 2, 3])
    assert p.next_request("a") == 5  # only a has it
    p.requested("a", 5, now=0.0)
    assert p.next_request("a") == 4  # then the one two peers have
    assert p.next_request("c") in {0, 1, 2, 3}


def test_one_outstanding_request_per_piece_and_none_for_pieces_we_have() -> None:
    p = _picker(3, have={0})
    p.add_peer("a", [0, 1, 2])
    p.add_peer("b", [0, 1, 2])
    first = p.next_request("a")
    assert first is not None and first != 0
    p.requested("a", first, 0.0)
    second = p.next_request("b")
    assert second not in (None, 0, first)
    assert second is not None
    p.requested("b", second, 0.0)
    assert p.next_request("a") is None
    with pytest.raises(ValueError, match="already requested"):
        p.requested("b", first, 0.0)
    assert p.received("a", first)
    assert p.received("b", second)
    assert p.complete


def test_lost_peer_returns_its_pieces_to_the_pool() -> None:
    p = _picker(4)
    p.add_peer("a", range(4))
    p.add_peer("b", range(4))
    for _ in range(2):
        i = p.next_request("a")
        assert i is not None
        p.requested("a", i, 0.0)
    owed = p.remove_peer("a")
    assert len(owed) == 2 and p.requeued == 2
    assert p.availability == [1, 1, 1, 1]
    asked = set()
    while (i := p.next_request("b")) is not None:
        p.requested("b", i, 0.0)
        asked.add(i)
    assert asked == {0, 1, 2, 3}  # b is asked for everything, including what a owed


def test_failed_and_expired_requests_can_be_asked_again() -> None:
    p = _picker(2)
    p.add_peer("a", [0, 1])
    p.requested("a", 0, now=10.0)
    p.requested("a", 1, now=15.0)
    assert p.expired(now=21.0, timeout=10.0) == [("a", 0)]
    p.failed("a", 0)
    p.failed("b", 1)  # not b's request: ignored
    assert p.outstanding_from("a") == [1]
    assert p.next_request("a") == 0


def test_interesting_and_unsolicited_piece() -> None:
    p = _picker(2, have={0})
    p.add_peer("a", [0])
    assert not p.interesting("a")
    p.peer_has("a", 1)
    assert p.interesting("a")
    assert not p.received("a", 1)  # not requested: kept, but reported as unsolicited
    assert p.complete
