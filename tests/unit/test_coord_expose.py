"""The coordinator's decisions about exposed ports and their visitors, driven without sockets."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcppunch.coordinator.expose import ClosePort, ExposeConfig, ExposeTable, OpenPort, PortRange
from tcppunch.coordinator.protocol import Action, ConnState, StartRelay
from tcppunch.wire.coord import (
    Error,
    Expose,
    Exposed,
    Registered,
    Relay,
    RelayOk,
    Role,
    Visitor,
    encode_message,
    relay_proof,
)
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.framing import PREAMBLE
from tests.unit.test_coord_protocol import CONFIG, SERVER, Harness, Wire

EXPOSE = ExposeConfig(PortRange(8000, 9000), max_ports_per_id=2, max_connections_per_id=2, join_timeout=10.0)


class ExposeHarness(Harness):
    """The protocol harness plus a fake driver that binds every port it is asked to (unless told not to)."""

    def __init__(self, expose: ExposeConfig | None = EXPOSE) -> None:
        super().__init__(dataclasses.replace(CONFIG, expose=expose))
        self.listening: set[int] = set()
        self.refuse_bind: dict[int, str] = {}
        self.closed_ports: list[int] = []
        self.opened: list[OpenPort] = []

    def apply(self, actions: list[Action]) -> None:
        rest: list[Action] = []
        for action in actions:
            if isinstance(action, OpenPort):
                self.opened.append(action)
                if action.port in self.refuse_bind:
                    self.apply(self.proto.port_failed(action.port, self.refuse_bind[action.port], self.now))
                else:
                    self.listening.add(action.port)
                    self.apply(self.proto.port_opened(action.port, self.now))
            elif isinstance(action, ClosePort):
                self.listening.discard(action.port)
                self.closed_ports.append(action.port)
            else:
                rest.append(action)
        super().apply(rest)

    def peer(self, peer_id: str) -> int:
        conn = self.register(peer_id)
        assert isinstance(self.take(conn)[0], Registered)
        return conn

    def expose(self, conn: int, port: int, request_id: str = "e1") -> Exposed | Error:
        self.send(conn, Expose(request_id, port))
        (reply,) = self.take(conn)
        assert isinstance(reply, Exposed | Error)
        assert reply.request_id == request_id
        return reply

    def visit(self, port: int, source_port: int = 51000) -> int:
        conn = next(self._ids)
        self.wires[conn] = Wire()
        self.apply(self.proto.visitor_arrived(conn, port, Endpoint("198.51.100.7", source_port),
                                              Endpoint(SERVER.ip, port), self.now))
        return conn

    def join(self, notice: Visitor, role: Role = Role.RESPONDER, key: bytes | None = None) -> int:
        conn = self.open()
        proof = relay_proof(key or notice.key, notice.visitor_id, role)
        self.send(conn, Relay(notice.visitor_id, role, proof), preamble=True)
        return conn


def _refused(reply: Exposed | Error, code: str) -> str:
    assert isinstance(reply, Error), reply
    assert (reply.code, reply.fatal) == (code, False)
    return reply.message


def test_port_range_parsing() -> None:
    assert PortRange.parse("8000-9000") == PortRange(8000, 9000)
    assert PortRange.parse("8080") == PortRange(8080, 8080) and str(PortRange(8080, 8080)) == "8080"
    assert 8000 in PortRange(8000, 9000) and 9001 not in PortRange(8000, 9000)
    for bad in ("", "0-10", "9000-8000", "80-70000", "a-b", "1,2"):
        with pytest.raises(ValueError):
            PortRange.parse(bad)


def test_exposing_is_refused_when_the_server_does_not_allow_it() -> None:
    h = ExposeHarness(expose=None)
    web = h.peer("web")
    assert "--expose-ports" in _refused(h.expose(web, 8080), "expose-disabled")
    assert h.proto.conn_state(web) is ConnState.PEER  # not fatal


def test_port_outside_the_range_is_refused_with_the_range_named() -> None:
    h = ExposeHarness()
    web = h.peer("web")
    assert _refused(h.expose(web, 22), "expose-port-refused") == "port 22 is not in --expose-ports 8000-9000"
    assert h.listening == set()


def test_an_allowed_port_is_opened_and_its_public_address_reported() -> None:
    h = ExposeHarness()
    web = h.peer("web")
    reply = h.expose(web, 8080)
    assert reply == Exposed("e1", 8080, Endpoint(SERVER.ip, 8080))
    assert h.listening == {8080}
    assert h.opened == [OpenPort(8080, SERVER.ip)]  # on the address the peer's control connection reached


def test_one_owner_per_port_and_a_per_id_port_limit() -> None:
    h = ExposeHarness()
    web, other = h.peer("web"), h.peer("other")
    assert isinstance(h.expose(web, 8080), Exposed)
    assert "already exposed by you" in _refused(h.expose(web, 8080, "e2"), "expose-port-taken")
    assert "another peer" in _refused(h.expose(other, 8080), "expose-port-taken")
    assert isinstance(h.expose(web, 8081, "e3"), Exposed)
    assert "2 ports" in _refused(h.expose(web, 8082, "e4"), "expose-limit")
    assert isinstance(h.expose(other, 8082), Exposed)


def test_a_port_the_server_cannot_bind_is_refused_and_forgotten() -> None:
    h = ExposeHarness()
    h.refuse_bind[8080] = "Address already in use"
    web = h.peer("web")
    message = _refused(h.expose(web, 8080), "expose-port-taken")
    assert message == "port 8080 cannot be opened on the server: Address already in use"
    del h.refuse_bind[8080]
    assert isinstance(h.expose(web, 8080, "e2"), Exposed)


def test_a_visitor_is_announced_and_joined_with_the_key_then_carried() -> None:
    h = ExposeHarness()
    web = h.peer("web")
    h.expose(web, 8080)
    visitor = h.visit(8080)
    (notice,) = h.take(web)
    assert isinstance(notice, Visitor)
    assert (notice.remote_port, notice.visitor, notice.address) == (
        8080, Endpoint("198.51.100.7", 51000), Endpoint(SERVER.ip, 8080))
    assert notice.relay == SERVER and len(notice.key) == 32
    assert h.proto.conn_state(visitor) is ConnState.VISITOR_WAIT
    join = h.open()
    h.send(join, Relay(notice.visitor_id, Role.RESPONDER, relay_proof(notice.key, notice.visitor_id, Role.RESPONDER)),
           preamble=True)
    h.feed(join, b"early bytes")  # after RELAY, before RELAY-OK is read: handed to the pump, not lost
    assert h.take(join) == [RelayOk(notice.visitor_id)]
    (start,) = h.relays
    assert isinstance(start, StartRelay)
    assert (start.initiator, start.responder, start.expose_peer) == (visitor, join, "web")
    assert h.wires[visitor].raw == b"" and not h.wires[visitor].closed  # nothing of ours to the visitor


def test_pending_bytes_sent_with_the_join_go_to_the_visitor() -> None:
    h = ExposeHarness()
    web = h.peer("web")
    h.expose(web, 8080)
    h.visit(8080)
    (notice,) = h.take(web)
    join = h.open()
    frame = Relay(notice.visitor_id, Role.RESPONDER, relay_proof(notice.key, notice.visitor_id, Role.RESPONDER))
    h.feed(join, PREAMBLE + encode_message(frame) + b"HTTP/1.0 200 OK\r\n")
    (start,) = h.relays
    assert isinstance(start, StartRelay) and start.responder_pending == b"HTTP/1.0 200 OK\r\n"


@pytest.mark.parametrize("how", ["wrong-key", "wrong-role"])
def test_a_join_without_the_key_for_the_responder_role_is_refused(how: str) -> None:
    h = ExposeHarness()
    web = h.peer("web")
    h.expose(web, 8080)
    visitor = h.visit(8080)
    (notice,) = h.take(web)
    join = h.join(notice, key=b"\x00" * 32) if how == "wrong-key" else h.join(notice, role=Role.INITIATOR)
    assert h.error(join).code == "bad-proof"
    assert h.relays == [] and h.proto.conn_state(visitor) is ConnState.VISITOR_WAIT


def test_a_visitor_not_joined_in_time_is_closed_without_a_frame() -> None:
    h = ExposeHarness()
    web = h.peer("web")
    h.expose(web, 8080)
    visitor = h.visit(8080)
    (notice,) = h.take(web)
    assert h.proto.next_deadline() is not None
    h.tick(h.now + 9.9)
    assert not h.wires[visitor].closed
    h.tick(h.now + 0.2)
    assert h.wires[visitor].closed and h.wires[visitor].raw == b""
    late = h.join(notice)
    assert h.error(late).code == "unknown-session"


def test_visitor_connections_per_id_are_limited_until_one_ends() -> None:
    h = ExposeHarness()
    web = h.peer("web")
    h.expose(web, 8080)
    first, second = h.visit(8080, 1), h.visit(8080, 2)
    notices = h.take(web)
    assert len(notices) == 2
    third = h.visit(8080, 3)
    assert h.wires[third].closed and h.take(web) == []
    assert isinstance(notices[0], Visitor)
    h.join(notices[0])
    (start,) = h.relays
    assert start.initiator == first
    assert h.wires[h.visit(8080, 4)].closed  # one carried + one waiting: still at the limit
    h.proto.relay_finished(notices[0].visitor_id)
    fifth = h.visit(8080, 5)
    assert not h.wires[fifth].closed and isinstance(h.take(web)[0], Visitor)
    assert h.proto.conn_state(second) is ConnState.VISITOR_WAIT


def test_the_ports_close_and_waiting_visitors_drop_when_the_owner_leaves() -> None:
    h = ExposeHarness()
    web, other = h.peer("web"), h.peer("other")
    h.expose(web, 8080)
    h.expose(web, 8081, "e2")
    visitor = h.visit(8081)
    h.lose(web)
    assert sorted(h.closed_ports) == [8080, 8081] and h.listening == set()
    assert h.wires[visitor].closed
    assert isinstance(h.expose(other, 8080), Exposed)


def test_a_visitor_that_leaves_before_the_join_frees_its_slot() -> None:
    h = ExposeHarness()
    web = h.peer("web")
    h.expose(web, 8080)
    visitor = h.visit(8080)
    (notice,) = h.take(web)
    h.lose(visitor)
    assert h.proto.expose.connections_of("web") == 0
    assert h.error(h.join(notice)).code == "unknown-session"


def test_shutdown_closes_visitors_without_a_frame() -> None:
    h = ExposeHarness()
    web = h.peer("web")
    h.expose(web, 8080)
    visitor = h.visit(8080)
    h.apply(h.proto.shutdown(h.now))
    assert h.wires[visitor].closed and h.wires[visitor].raw == b""
    assert h.error(web).code == "shutting-down"


# ----------------------------------------------------------------------------- the table's own indexes

OPS = st.lists(st.tuples(st.sampled_from(["reserve", "open", "fail", "admit", "join", "lose", "end", "expire",
                                          "release"]),
                         st.sampled_from(["p", "q"]), st.integers(8000, 8003), st.integers(0, 5)), max_size=60)


@given(OPS)
def test_the_owner_indexes_always_match_a_full_scan(ops: list[tuple[str, str, int, int]]) -> None:
    table = ExposeTable(ExposeConfig(PortRange(8000, 8002), max_ports_per_id=2, max_connections_per_id=3))
    now = 0.0
    for n, (op, peer, port, pick) in enumerate(ops):
        now += 1.0
        visitors = sorted(table.pending)
        carried = sorted(table.carried)
        if op == "reserve" and table.refuse(peer, port) is None:
            table.reserve(peer, port, f"r{n}")
        elif op == "open":
            table.opened(port)
        elif op == "fail":
            table.failed(port)
        elif op == "admit":
            table.admit(port, n, f"v{n}", bytes(32), now)
        elif op == "join" and visitors:
            table.join(visitors[pick % len(visitors)])
        elif op == "lose" and visitors:
            table.visitor_lost(visitors[pick % len(visitors)])
        elif op == "end" and carried:
            table.carried_ended(carried[pick % len(carried)])
        elif op == "expire" and visitors:
            table.expire(visitors[pick % len(visitors)], now + 20.0)
        elif op == "release":
            table.release(peer)
        for owner in ("p", "q"):
            assert table.ports_of(owner) == sorted(p.port for p in table.ports.values() if p.peer_id == owner)
            scanned = sum(v.peer_id == owner for v in table.pending.values())
            scanned += sum(o == owner for o in table.carried.values())
            assert table.connections_of(owner) == scanned <= 3
