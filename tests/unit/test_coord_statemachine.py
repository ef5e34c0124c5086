"""Random sequences of events against the coordinator state machine; its bookkeeping must stay consistent.

Hypothesis drives registrations (good and bad tokens, duplicate ids), connects, relay joins (right and
wrong keys), garbage, disconnects, time passing and finished relays, and checks after every step that
registry, sessions and connections agree, and that nothing is ever sent to a closed connection.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tcppunch.coordinator.protocol import ConnState, CoordinatorConfig
from tcppunch.wire.coord import Connect, ListPeers, Ping, Pong, Punch, Relay, Role, relay_proof
from tcppunch.wire.framing import PREAMBLE

from .test_coord_protocol import Harness

IDS = ["alice", "bob", "carol"]
CONFIG = CoordinatorConfig(
    keepalive_interval=1.0,
    stale_after=1.5,
    keepalive_timeout=3.0,
    handshake_timeout=1.0,
    punch_window=1.0,
    relay_window=2.0,
    max_sessions_per_peer=4,
    max_relays_per_peer=2,
    relay_pending_limit=100,
)


class CoordinatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(CONFIG)
        self.punches: list[Punch] = []

    def _open_conns(self) -> list[int]:
        return [c for c, w in self.h.wires.items() if not w.closed and self.h.proto.conn_state(c) is not None]

    def _collect(self, *, answer: bool = True) -> None:
        for conn in list(self.h.wires):
            for message in self.h.take(conn):
                if isinstance(message, Punch):
                    self.punches.append(message)
                elif answer and isinstance(message, Ping) and self.h.proto.conn_state(conn) is ConnState.PEER:
                    self.h.send(conn, Pong(message.seq))

    @rule(peer=st.sampled_from(IDS), good=st.booleans())
    def register(self, peer: str, good: bool) -> None:
        self.h.register(peer, token="tok" if good else "bad")
        self._collect()

    @rule(a=st.sampled_from(IDS), b=st.sampled_from([*IDS, "nobody"]))
    def connect(self, a: str, b: str) -> None:
        record = self.h.proto.registry.get(a)
        if record is not None:
            self.h.send(record.conn, Connect("r", b), ListPeers("l"))
            self._collect()

    @rule(a=st.sampled_from(IDS), b=st.sampled_from(IDS))
    def pair_up(self, a: str, b: str) -> None:
        """Make sure both are registered, then connect: sessions are the interesting part."""
        for peer in {a, b}:
            if self.h.proto.registry.get(peer) is None:
                self.h.register(peer)
        self._collect()
        self.connect(a, b)

    @precondition(lambda self: bool(self.punches))
    @rule(index=st.integers(0, 50))
    def join_both_roles(self, index: int) -> None:
        for role in Role:
            self.join_relay(index, role, True, b"")

    @precondition(lambda self: bool(self.punches))
    @rule(
        index=st.integers(0, 50),
        role=st.sampled_from(list(Role)),
        right_key=st.booleans(),
        extra=st.binary(max_size=80),
    )
    def join_relay(self, index: int, role: Role, right_key: bool, extra: bytes) -> None:
        punch = self.punches[index % len(self.punches)]
        conn = self.h.open()
        key = punch.key if right_key else bytes(32)
        frame = Relay(punch.session_id, role, relay_proof(key, punch.session_id, role))
        self.h.send(conn, frame, preamble=True)
        if extra:
            self.h.feed(conn, extra)
        self._collect()

    @precondition(lambda self: bool(self.h.wires))
    @rule(index=st.integers(0, 100), data=st.binary(min_size=1, max_size=40))
    def garbage(self, index: int, data: bytes) -> None:
        conns = self._open_conns()
        if conns:
            self.h.feed(conns[index % len(conns)], data)
            self._collect()

    @precondition(lambda self: bool(self.h.wires))
    @rule(index=st.integers(0, 100))
    def lose(self, index: int) -> None:
        conns = list(self.h.wires)
        conn = conns[index % len(conns)]
        self.h.wires[conn].closed = True
        self.h.lose(conn)
        self._collect()

    @rule(dt=st.floats(0.0, 4.0), answer=st.booleans())
    def time_passes(self, dt: float, answer: bool) -> None:
        self.h.tick(self.h.now + dt)
        self._collect(answer=answer)

    @precondition(lambda self: bool(self.h.relays))
    @rule(index=st.integers(0, 50))
    def relay_finished(self, index: int) -> None:
        start = self.h.relays[index % len(self.h.relays)]
        self.h.proto.relay_finished(start.session_id)

    @rule()
    def silent_connection(self) -> None:
        conn = self.h.open()
        self.h.feed(conn, PREAMBLE[:3])

    @invariant()
    def registry_and_connections_agree(self) -> None:
        proto = self.h.proto
        for record in proto.registry:
            assert proto.conn_state(record.conn) is ConnState.PEER
            assert not self.h.wires[record.conn].closed
            assert record.sessions <= set(proto.sessions)
            assert len(record.pings_in_flight) <= CONFIG.max_pings_in_flight

    @invariant()
    def sessions_belong_to_registered_peers(self) -> None:
        proto = self.h.proto
        for session in proto.sessions.values():
            for peer_id in session.peer_ids():
                record = proto.registry.get(peer_id)
                assert record is not None and session.id in record.sessions
            for role, conn in session.relay_waiting.items():
                assert proto.conn_state(conn) is ConnState.RELAY_WAIT
                assert role in (Role.INITIATOR, Role.RESPONDER)
            assert not session.relay_started

    @invariant()
    def relay_counts_stay_within_limits(self) -> None:
        for peer_id in IDS:
            assert 0 <= self.h.proto.active_relays(peer_id) <= CONFIG.max_relays_per_peer

    @invariant()
    def each_relay_pairs_two_distinct_fresh_connections(self) -> None:
        seen: set[int] = set()
        for start in self.h.relays:
            assert start.initiator != start.responder
            assert not {start.initiator, start.responder} & seen
            seen |= {start.initiator, start.responder}
        assert len({s.session_id for s in self.h.relays}) == len(self.h.relays)


CoordinatorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestCoordinatorMachine = CoordinatorMachine.TestCase
