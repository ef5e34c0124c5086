"""The coordinator's timer heap with a fake clock, alone and inside the protocol."""

from __future__ import annotations

import random

from tcppunch.coordinator.protocol import CoordinatorConfig
from tcppunch.coordinator.timers import TimerHeap
from tcppunch.wire.coord import Connect, Ping, Pong, Registered

from .test_coord_protocol import Harness, assert_fatal


def test_due_keys_come_out_in_deadline_order() -> None:
    timers: TimerHeap[str] = TimerHeap()
    rng = random.Random(7)
    deadlines = {f"k{i}": rng.uniform(0.0, 100.0) for i in range(500)}
    for key, when in deadlines.items():
        timers.schedule(key, when)
    assert timers.next_deadline() == min(deadlines.values())
    fired: list[str] = []
    for now in range(0, 101, 10):
        fired += timers.pop_due(float(now))
        assert all(deadlines[k] <= now for k in fired)
    assert fired == sorted(deadlines, key=deadlines.__getitem__)
    assert timers.next_deadline() is None and len(timers) == 0


def test_cancelled_and_rescheduled_timers_fire_once_at_their_last_deadline() -> None:
    timers: TimerHeap[str] = TimerHeap()
    timers.schedule("a", 1.0)
    timers.schedule("b", 2.0)
    timers.schedule("c", 3.0)
    timers.cancel("a")
    timers.schedule("c", 0.5)  # earlier
    timers.schedule("b", 9.0)  # later: the entry at 2.0 is stale
    assert timers.next_deadline() == 0.5
    assert timers.pop_due(5.0) == ["c"]
    assert timers.next_deadline() == 9.0
    assert timers.pop_due(8.99) == []
    assert timers.pop_due(9.0) == ["b"]
    assert timers.pop_due(100.0) == []


def test_ties_keep_schedule_order_and_limit_bounds_one_call() -> None:
    timers: TimerHeap[int] = TimerHeap()
    for i in range(10):
        timers.schedule(i, 5.0)
    assert timers.pop_due(5.0, limit=4) == [0, 1, 2, 3]
    assert timers.next_deadline() == 5.0
    assert timers.pop_due(5.0) == [4, 5, 6, 7, 8, 9]


def test_stale_entries_are_compacted() -> None:
    timers: TimerHeap[int] = TimerHeap()
    for round_ in range(200):
        for key in range(10):
            timers.schedule(key, float(round_ * 10 + key))
    assert len(timers) == 10
    assert len(timers._heap) <= 2 * len(timers) + 64 + 1
    assert timers.pop_due(1e9) == list(range(10))


def test_protocol_timers_follow_the_fake_clock() -> None:
    """Handshake timeout, pings at the interval, keepalive timeout and session expiry, each at its time."""
    h = Harness(CoordinatorConfig(keepalive_interval=5.0, keepalive_timeout=15.0, stale_after=7.5,
                                  handshake_timeout=3.0, punch_window=6.0, relay_window=30.0, ping_jitter=0.0))
    silent = h.open()
    alice, bob = h.register("alice"), h.register("bob")
    h.answer_pings(alice, 0.0)
    h.answer_pings(bob, 0.0)
    assert h.proto.next_deadline() == 103.0
    h.tick(103.0)
    assert_fatal(h, silent, "timeout")
    h.send(alice, Connect("r", "bob"))
    h.take(alice)
    h.take(bob)
    session_id = next(iter(h.proto.sessions))
    expiry = h.proto.sessions[session_id].expires_at
    # Pings every 5 s while both answer; nothing else happens before the session expires.
    now = 100.0
    while now + 5.0 < expiry:
        now += 5.0
        assert h.proto.next_deadline() == now
        h.tick(now)
        pings = h.take(alice)
        assert [type(m) for m in pings] == [Ping]
        h.send(alice, *(Pong(p.seq) for p in pings if isinstance(p, Ping)))
        h.answer_pings(bob, 0.0)
    assert session_id in h.proto.sessions
    h.tick(expiry)
    assert session_id not in h.proto.sessions


def test_a_peer_heard_from_is_not_timed_out_and_a_silent_one_is() -> None:
    h = Harness(CoordinatorConfig(keepalive_interval=5.0, keepalive_timeout=15.0))
    alice, bob = h.register("alice"), h.register("bob")
    h.answer_pings(bob, 0.0)
    for now in (105.0, 110.0, 114.9):
        h.tick(now)
        h.answer_pings(bob, 0.0)
    h.tick(115.0)  # alice never answered: 15 s since she registered at 100
    assert_fatal(h, alice, "keepalive-timeout")
    assert not h.wires[bob].closed
    assert h.proto.registry.get("bob") is not None
    assert h.proto.registry.get("alice") is None


def test_peers_registered_in_one_burst_are_not_pinged_in_one_burst_again() -> None:
    """Each next ping comes early by a random share (at most ping_jitter) of the interval, never late."""
    h = Harness(CoordinatorConfig(keepalive_interval=5.0, keepalive_timeout=15.0, ping_jitter=0.2))
    conns = [h.register(f"p{i}") for i in range(40)]  # all at t=100, each pinged at once
    due = []
    for i, conn in enumerate(conns):
        h.answer_pings(conn, 0.0)
        record = h.proto.registry.get(f"p{i}")
        assert record is not None
        due.append(record.next_ping_at)
    assert all(100.0 + 4.0 <= t <= 100.0 + 5.0 for t in due), due
    assert len(set(due)) >= 20, due  # spread over the last fifth of the interval, not one instant


def test_an_unregistered_peer_leaves_no_live_timer() -> None:
    h = Harness()
    alice = h.register("alice")
    h.lose(alice)
    assert h.proto.next_deadline() is None


def test_keepalive_times_scale_with_the_number_of_peers() -> None:
    """Past interval x max_pings_per_second peers, a newcomer's keepalive times grow in proportion."""
    config = CoordinatorConfig(keepalive_interval=5.0, keepalive_timeout=15.0, max_pings_per_second=1.0,
                               ping_jitter=0.0)
    h = Harness(config)
    conns = [h.register(f"p{i}") for i in range(11)]
    first, last = (next(m for m in h.take(c) if isinstance(m, Registered)) for c in (conns[0], conns[-1]))
    assert (first.keepalive_interval, first.keepalive_timeout) == (5.0, 15.0)
    assert (last.keepalive_interval, last.keepalive_timeout) == (10.0, 30.0)  # 10 peers / (5 s x 1/s)
    h.tick(115.0)
    assert_fatal(h, conns[0], "keepalive-timeout")
    assert not h.wires[conns[-1]].closed
    record = h.proto.registry.get("p10")
    assert record is not None and record.next_ping_at == 125.0  # pinged at 100 and (late) at 115: every 10 s
    h.tick(130.0)
    assert_fatal(h, conns[-1], "keepalive-timeout")
