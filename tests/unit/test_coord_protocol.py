"""The coordinator state machine, driven without sockets: every event, every error path.

A small harness plays the network: it opens fake connections, feeds bytes with explicit ``now`` values and
decodes what the protocol sends back, per connection.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcppunch.coordinator.auth import Tokens
from tcppunch.coordinator.protocol import (
    Action,
    Close,
    ConnState,
    CoordinatorConfig,
    CoordinatorProtocol,
    Send,
    StartRecords,
    StartRelay,
)
from tcppunch.coordinator.registry import PeerRecord, Registry
from tcppunch.session.records import KeyShare
from tcppunch.wire.coord import (
    Cancel,
    Connect,
    Error,
    ListPeers,
    Message,
    Outcome,
    Peers,
    Ping,
    Pong,
    Punch,
    Register,
    Registered,
    Relay,
    RelayAdvice,
    RelayOk,
    Result,
    Role,
    decode_message,
    encode_message,
    relay_proof,
)
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.framing import PREAMBLE, FrameDecoder, encode_frame
from tcppunch.wire.natreport import FilteringBehaviour, MappingBehaviour, NatReport, TcpBehaviour

SERVER = Endpoint("198.51.100.10", 3478)
# Every harness connection authenticates with this key unless a test says otherwise (ids are owned by keys).
TEST_KEY = "TEST-KEY0-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA"
CONFIG = CoordinatorConfig(
    keepalive_interval=5.0,
    stale_after=7.5,
    keepalive_timeout=15.0,
    handshake_timeout=3.0,
    punch_window=6.0,
    relay_window=30.0,
    max_sessions_per_peer=3,
    max_relays_per_peer=2,
    relay_pending_limit=1000,
)
SYM_RANDOM = NatReport(
    tcp=TcpBehaviour(
        mapping=MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT,
        filtering=FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT,
        port_preservation=False,
    ),
    behind_nat=True,
    verdict="symmetric, random ports",
)


@dataclass
class Wire:
    """What one fake connection received from the server."""

    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    inbox: list[Message] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)
    closed: bool = False
    lingered: bool = False


class Harness:
    def __init__(self, config: CoordinatorConfig = CONFIG, tokens: Tokens | None = None) -> None:
        counter = itertools.count(1)
        self.proto = CoordinatorProtocol(
            tokens or Tokens(shared="tok", per_id={"vip": "vip-secret"}),
            config,
            random_bytes=lambda n: bytes([next(counter) % 256]) * n,
        )
        self.wires: dict[int, Wire] = {}
        self.relays: list[StartRelay] = []
        self._ids = itertools.count(1)
        self.now = 100.0

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                wire = self.wires[action.conn]
                assert not wire.closed, "sent after close"
                wire.raw += action.data
                wire.decoder.feed(action.data)
                while (frame := wire.decoder.next_frame()) is not None:
                    wire.inbox.append(decode_message(frame))
            elif isinstance(action, Close):
                self.wires[action.conn].closed = True
                self.wires[action.conn].lingered = action.linger
            else:
                self.relays.append(action)

    def open(self, port: int = 40000, ip: str = "203.0.113.5", key: str | None = TEST_KEY) -> int:
        """A new connection; ``key``: the fingerprint its TLS handshake authenticated (None: plain TCP)."""
        conn = next(self._ids)
        self.wires[conn] = Wire()
        observed = Endpoint(ip, port + conn)
        self.apply(self.proto.connection_made(conn, observed, SERVER, self.now))
        if key is not None:
            self.proto.connection_authenticated(conn, key)
        return conn

    def feed(self, conn: int, data: bytes) -> None:
        self.apply(self.proto.data_received(conn, data, self.now))

    def send(self, conn: int, *messages: Message, preamble: bool = False) -> None:
        self.feed(conn, (PREAMBLE if preamble else b"") + b"".join(encode_message(m) for m in messages))

    def tick(self, now: float) -> None:
        self.now = now
        self.apply(self.proto.tick(now))

    def lose(self, conn: int) -> None:
        self.apply(self.proto.connection_lost(conn, self.now))

    def register(self, peer_id: str, token: str = "tok", *, ip: str = "203.0.113.5", key: str | None = TEST_KEY,
                 **kw: Any) -> int:
        conn = self.open(ip=ip, key=key)
        self.send(conn, Register(peer_id, token, **kw), preamble=True)
        return conn

    def take(self, conn: int) -> list[Message]:
        inbox, self.wires[conn].inbox = self.wires[conn].inbox, []
        return inbox

    def error(self, conn: int) -> Error:
        errors = [m for m in self.take(conn) if isinstance(m, Error)]
        assert len(errors) == 1, errors
        return errors[0]

    def answer_pings(self, conn: int, delay: float) -> None:
        """Answer the pings waiting in ``conn``'s inbox ``delay`` seconds after now."""
        pings = [m for m in self.take(conn) if isinstance(m, Ping)]
        self.now += delay
        for ping in pings:
            self.send(conn, Pong(ping.seq))


def assert_fatal(h: Harness, conn: int, code: str) -> None:
    error = h.error(conn)
    assert (error.code, error.fatal) == (code, True), error
    assert h.wires[conn].closed and h.wires[conn].lingered
    assert h.proto.conn_state(conn) is None
    # later bytes and a late close are ignored
    h.feed(conn, b"more")
    h.lose(conn)
    assert h.take(conn) == []


# ------------------------------------------------------------------------------------ registration


def test_register_reports_the_observed_endpoint_and_pings_at_once() -> None:
    h = Harness()
    conn = h.register("alice", nat=SYM_RANDOM, private=(Endpoint("10.0.1.2", 5000),), swarm="s")
    registered, ping = h.take(conn)
    assert isinstance(registered, Registered)
    assert registered.observed == Endpoint("203.0.113.5", 40000 + conn)
    assert (registered.keepalive_interval, registered.keepalive_timeout) == (5.0, 15.0)
    assert isinstance(ping, Ping)
    record = h.proto.registry.get("alice")
    assert record is not None and record.nat == SYM_RANDOM and record.swarm == "s"
    assert h.proto.conn_state(conn) is ConnState.PEER


def _one_message(data: bytes) -> Message:
    decoder = FrameDecoder()
    decoder.feed(data)
    frame = decoder.next_frame()
    assert frame is not None and decoder.next_frame() is None
    return decode_message(frame)


def test_register_asking_for_records_switches_right_after_registered() -> None:
    """REGISTERED carries the server's key share, the switch follows it at once (the driver's close_notify
    must come right after REGISTERED in the byte stream), the first PING after it (so, in records)."""
    h = Harness()
    conn = h.open()
    client = KeyShare()
    hello = PREAMBLE + encode_message(Register("alice", "tok", records=client.public))
    actions = h.proto.data_received(conn, hello, h.now)
    assert [type(a) for a in actions] == [Send, StartRecords, Send]
    first, switch, last = actions
    assert isinstance(first, Send) and isinstance(switch, StartRecords) and isinstance(last, Send)
    registered, ping = _one_message(first.data), _one_message(last.data)
    assert isinstance(registered, Registered) and isinstance(ping, Ping)
    assert registered.records == switch.share.public != client.public
    assert (switch.conn, switch.client_public, switch.client_key) == (conn, client.public, TEST_KEY)
    server_keys = switch.share.derive(switch.client_public, is_client=False, client_key=TEST_KEY, server_key="S")
    client_keys = client.derive(registered.records, is_client=True, client_key=TEST_KEY, server_key="S")
    assert (client_keys.send, client_keys.receive) == (server_keys.receive, server_keys.send)


def test_register_without_records_stays_in_tls() -> None:
    h = Harness()
    actions = h.proto.data_received(h.open(), PREAMBLE + encode_message(Register("alice", "tok")), h.now)
    assert [type(a) for a in actions] == [Send, Send]
    registered = _one_message(actions[0].data) if isinstance(actions[0], Send) else None
    assert isinstance(registered, Registered) and registered.records is None


@pytest.mark.parametrize("records", ["00" * 31, "zz" * 32, "00" * 33, 7])
def test_a_malformed_records_key_is_bad_field(records: Any) -> None:
    h = Harness()
    conn = h.open()
    frame = {**Register("alice", "tok").to_json(), "type": "register", "records": records}
    h.feed(conn, PREAMBLE + encode_frame(frame))
    assert_fatal(h, conn, "bad-field")
    assert h.proto.registry.get("alice") is None


def test_register_byte_by_byte_equals_whole_buffer() -> None:
    data = PREAMBLE + encode_message(Register("alice", "tok"))
    whole, split = Harness(), Harness()
    a, b = whole.open(), split.open()
    whole.feed(a, data)
    for i in range(len(data)):
        split.feed(b, data[i : i + 1])
    assert whole.wires[a].raw == split.wires[b].raw != b""


def test_trailing_frames_in_the_same_chunk_are_all_handled() -> None:
    h = Harness()
    conn = h.open()
    h.send(conn, Register("alice", "tok"), Ping(7), ListPeers("r"), preamble=True)
    kinds = [type(m) for m in h.take(conn)]
    assert kinds == [Registered, Ping, Pong, Peers]


def test_pong_feeds_the_rtt_estimate() -> None:
    h2 = Harness()
    c2 = h2.register("alice")
    h2.answer_pings(c2, 0.040)
    record = h2.proto.registry.get("alice")
    assert record is not None and record.rtt.srtt == pytest.approx(0.040)
    assert record.one_way_delay() == pytest.approx(0.020)
    # an unknown or repeated pong is harmless
    h2.send(c2, Pong(999), Pong(0))
    assert record.rtt.samples == 1


def test_wrong_token_is_fatal_and_registers_nothing() -> None:
    h = Harness()
    conn = h.register("alice", token="nope")
    assert_fatal(h, conn, "bad-token")
    assert h.proto.registry.get("alice") is None
    vip = h.register("vip", token="tok")  # per-id secret wins over the shared one
    assert_fatal(h, vip, "bad-token")
    ok = h.register("vip", token="vip-secret")
    assert isinstance(h.take(ok)[0], Registered)


def test_taken_id_is_refused_while_the_owner_is_alive() -> None:
    h = Harness()
    first = h.register("alice")
    h.take(first)
    h.now += 7.0  # silent, but not yet stale
    second = h.register("alice")
    assert_fatal(h, second, "id-taken")
    record = h.proto.registry.get("alice")
    assert record is not None and record.conn == first
    assert not h.wires[first].closed


def test_registration_replaces_a_stale_owner() -> None:
    h = Harness()
    first = h.register("alice")
    bob = h.register("bob")
    h.send(bob, Connect("r", "alice"))
    h.take(first)
    h.take(bob)
    h.now += 8.0  # first missed its keepalive answer
    second = h.register("alice")
    assert_fatal(h, first, "replaced")
    assert isinstance(h.take(second)[0], Registered)
    record = h.proto.registry.get("alice")
    assert record is not None and record.conn == second
    # the old registration's session is gone and bob was told
    (cancel,) = [m for m in h.take(bob) if isinstance(m, Cancel)]
    assert "alice" in cancel.reason
    assert h.proto.sessions == {}


def test_an_answered_ping_keeps_a_peer_alive() -> None:
    h = Harness()
    first = h.register("alice")
    pings = [m for m in h.take(first) if isinstance(m, Ping)]
    h.now += 7.0
    h.send(first, Pong(pings[0].seq))
    h.now += 1.0
    second = h.register("alice")
    assert_fatal(h, second, "id-taken")


def test_frames_other_than_pong_do_not_keep_a_peer_alive() -> None:
    """Issue 9 finding 5: only answering the server's PING counts as alive (a client's own frames, or a
    trickle of bytes, do not)."""
    h = Harness()
    first = h.register("alice")
    h.take(first)
    h.now += 7.0
    h.send(first, Ping(1), ListPeers("l"))
    h.now += 1.0
    second = h.register("alice")
    assert isinstance(h.take(second)[0], Registered)
    assert_fatal(h, first, "replaced")


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "bad-preamble"),
        (b"TPUNCH\x00\x09", "unsupported-version"),
        (PREAMBLE + b"\x00\x10\x00\x01", "frame-too-large"),
        (PREAMBLE + b"\x00\x00\x00\x04nope", "bad-frame"),
        (PREAMBLE + b"\x00\x00\x00\x00", "bad-frame"),
        (PREAMBLE + encode_message(Ping(1))[:4] + b'{"tpye":1}'[:7], None),  # incomplete: waits
    ],
)
def test_bad_bytes_before_registration(data: bytes, code: str | None) -> None:
    h = Harness()
    conn = h.open()
    h.feed(conn, data)
    if code is None:
        assert h.take(conn) == [] and not h.wires[conn].closed
    else:
        assert_fatal(h, conn, code)


@pytest.mark.parametrize(
    ("obj", "code"),
    [
        ({"type": "teleport"}, "unknown-type"),
        ({"type": "register", "id": "alice"}, "bad-field"),
        ({"type": "ping", "seq": 1}, "unexpected-message"),
        ({"type": "punch"}, "bad-field"),
    ],
)
def test_bad_first_frames(obj: dict[str, Any], code: str) -> None:
    from tcppunch.wire.framing import encode_frame

    h = Harness()
    conn = h.open()
    h.feed(conn, PREAMBLE + encode_frame(obj))
    assert_fatal(h, conn, code)


@pytest.mark.parametrize(
    "message",
    [
        Register("alice", "tok"),
        Relay("s", Role.INITIATOR, bytes(32)),
        Registered("x", SERVER, 1.0, 2.0),
        RelayOk("s"),
    ],
)
def test_unexpected_messages_from_a_registered_peer_are_fatal(message: Message) -> None:
    h = Harness()
    conn = h.register("alice")
    h.take(conn)
    h.send(conn, message)
    assert_fatal(h, conn, "unexpected-message")
    assert h.proto.registry.get("alice") is None


def test_garbage_after_registration_removes_the_peer_and_cancels_its_sessions() -> None:
    h = Harness()
    alice, bob = h.register("alice"), h.register("bob")
    h.send(alice, Connect("r", "bob"))
    h.take(bob)
    h.feed(alice, b"\x00\x00\x00\x03abc")
    assert_fatal(h, alice, "bad-frame")
    assert [type(m) for m in h.take(bob)] == [Cancel]
    assert h.proto.sessions == {}


def test_silent_client_times_out_others_are_untouched() -> None:
    h = Harness()
    silent = h.open()
    half = h.open()
    h.feed(half, PREAMBLE + b"\x00\x00")
    alice = h.register("alice")
    assert h.proto.next_deadline() == pytest.approx(103.0)  # handshake deadline (alice pings at 105)
    h.tick(102.9)
    assert not h.wires[silent].closed
    h.tick(103.0)
    assert_fatal(h, silent, "timeout")
    assert_fatal(h, half, "timeout")
    assert not h.wires[alice].closed


@given(st.binary(max_size=200), st.integers(min_value=1, max_value=17))
@settings(max_examples=150)
def test_random_bytes_never_crash_the_protocol(data: bytes, chunk: int) -> None:
    h = Harness()
    conn = h.open()
    stream = PREAMBLE + data
    for i in range(0, len(stream), chunk):
        h.feed(conn, stream[i : i + chunk])
    wire = h.wires[conn]
    assert wire.closed or h.proto.conn_state(conn) is ConnState.HELLO


# ------------------------------------------------------------------------------------ keepalive


def test_keepalive_pings_and_removal_of_a_silent_peer() -> None:
    h = Harness()
    alice, bob = h.register("alice"), h.register("bob")
    h.answer_pings(alice, 0.01)
    h.answer_pings(bob, 0.01)
    h.send(alice, Connect("r", "bob"))
    h.take(alice)
    h.take(bob)
    h.tick(105.0)
    assert [type(m) for m in h.take(alice)] == [Ping]
    h.answer_pings(bob, 0.0)
    h.tick(110.0)
    h.answer_pings(bob, 0.0)
    record = h.proto.registry.get("alice")
    assert record is not None
    h.tick(record.last_heard + 14.999)  # alice answered nothing since her CONNECT
    assert not h.wires[alice].closed
    h.tick(record.last_heard + 15.0)
    assert_fatal(h, alice, "keepalive-timeout")
    assert h.proto.registry.get("alice") is None
    assert [type(m) for m in h.take(bob) if not isinstance(m, Ping)] == [Cancel]
    assert h.proto.registry.get("bob") is not None


def test_eof_removes_the_peer() -> None:
    h = Harness()
    alice, bob = h.register("alice"), h.register("bob")
    h.send(bob, Connect("r", "alice"))
    h.take(bob)
    h.lose(alice)
    assert h.proto.registry.get("alice") is None
    assert [type(m) for m in h.take(bob)] == [Cancel]
    h.lose(alice)  # idempotent


def test_pings_in_flight_are_bounded() -> None:
    h = Harness(CoordinatorConfig(keepalive_interval=1.0, max_pings_in_flight=4))
    h.register("alice")
    for i in range(1, 14):
        h.tick(100.0 + i)  # never answered, and before the keepalive timeout
    record = h.proto.registry.get("alice")
    assert record is not None and len(record.pings_in_flight) <= CONFIG.max_pings_in_flight


# ------------------------------------------------------------------------------------ list, connect


def test_list_shows_the_others_filtered_by_swarm() -> None:
    h = Harness()
    alice = h.register("alice", swarm="x")
    h.register("bob", swarm="x", nat=SYM_RANDOM)
    h.register("carol", swarm="y")
    h.take(alice)
    h.send(alice, ListPeers("r1"), ListPeers("r2", "x"))
    everyone, swarm = h.take(alice)
    assert isinstance(everyone, Peers) and isinstance(swarm, Peers)
    assert [p.id for p in everyone.peers] == ["bob", "carol"]
    assert [p.id for p in swarm.peers] == ["bob"]
    assert swarm.peers[0].nat["mapping"] == "address-and-port-dependent"
    assert swarm.peers[0].verdict == "symmetric, random ports"
    assert swarm.request_id == "r2" and not swarm.truncated


def test_list_is_truncated_to_fit_a_frame() -> None:
    h = Harness(tokens=Tokens(shared="tok"))
    for i in range(105):
        h.register(f"p{i:03d}", nat=SYM_RANDOM.replace(verdict="v" * 1000))
    asker = h.register("zz")
    h.take(asker)
    h.send(asker, ListPeers("r"))
    (peers,) = h.take(asker)
    assert isinstance(peers, Peers) and peers.truncated and len(peers.peers) == 100


def _rtt(h: Harness, conn: int, rtt: float) -> None:
    h.answer_pings(conn, rtt)
    h.now -= rtt


def test_connect_sends_matching_punch_orders_timed_by_rtt() -> None:
    h = Harness()
    alice = h.register("alice", private=(Endpoint("10.0.1.2", 5000),), nat=SYM_RANDOM)
    bob = h.register("bob", private=(Endpoint("10.0.2.2", 6000),))
    _rtt(h, alice, 0.020)
    _rtt(h, bob, 0.100)
    h.send(alice, Connect("req-1", "bob"))
    (to_alice,) = h.take(alice)
    (to_bob,) = h.take(bob)
    assert isinstance(to_alice, Punch) and isinstance(to_bob, Punch)
    assert to_alice.session_id == to_bob.session_id and to_alice.key == to_bob.key
    assert len(to_alice.key) == 32
    assert (to_alice.role, to_bob.role) == (Role.INITIATOR, Role.RESPONDER)
    assert (to_alice.request_id, to_bob.request_id) == ("req-1", None)
    assert (to_alice.peer_id, to_bob.peer_id) == ("bob", "alice")
    assert to_alice.peer_observed == Endpoint("203.0.113.5", 40000 + bob)
    assert to_bob.peer_observed == Endpoint("203.0.113.5", 40000 + alice)
    assert to_alice.peer_private == (Endpoint("10.0.2.2", 6000),)
    assert to_bob.peer_nat == SYM_RANDOM and to_alice.peer_nat is None
    # one-way delays 10 ms and 50 ms: alice waits 40 ms, bob fires on receipt
    assert (to_alice.fire_in_ms, to_bob.fire_in_ms) == (40, 0)
    assert (to_alice.deadline_ms, to_bob.deadline_ms) == (6040, 6000)
    assert to_alice.relay == to_bob.relay == SERVER
    assert to_alice.relay_advice is RelayAdvice.PUNCH  # bob's NAT is unknown


def test_connect_advises_relay_when_both_reports_rule_direct_out() -> None:
    h = Harness()
    alice, bob = h.register("alice", nat=SYM_RANDOM), h.register("bob", nat=SYM_RANDOM)
    h.take(bob)
    h.send(alice, Connect("r", "bob"))
    (punch,) = [m for m in h.take(bob) if isinstance(m, Punch)]
    assert punch.relay_advice is RelayAdvice.RELAY_NOW
    assert "randomly" in punch.advice_reason


def test_ipv6_endpoints_reach_the_other_side_and_make_random_pairs_punch() -> None:
    h = Harness()
    a6, b6 = Endpoint("2001:db8:1::2", 5000), Endpoint("2001:db8:2::2", 6000)
    alice = h.register("alice", nat=SYM_RANDOM, ipv6=(a6,))
    bob = h.register("bob", nat=SYM_RANDOM, ipv6=(b6,))
    h.take(bob)
    h.send(alice, Connect("r", "bob"))
    (to_bob,) = [m for m in h.take(bob) if isinstance(m, Punch)]
    (to_alice,) = [m for m in h.take(alice) if isinstance(m, Punch)]
    assert (to_bob.peer_ipv6, to_alice.peer_ipv6) == ((a6,), (b6,))
    assert to_bob.relay_advice is to_alice.relay_advice is RelayAdvice.PUNCH
    assert "IPv6" in to_bob.advice_reason


def test_an_ipv6_control_connection_is_an_ipv6_endpoint_seen_by_the_server() -> None:
    h = Harness()
    conn = next(h._ids)
    h.wires[conn] = Wire()
    seen = Endpoint("2001:db8:3::2", 7000)
    h.apply(h.proto.connection_made(conn, seen, SERVER, h.now))
    h.proto.connection_authenticated(conn, TEST_KEY)
    h.send(conn, Register("carol", "tok"), preamble=True)
    bob = h.register("bob", ipv6=(Endpoint("2001:db8:2::2", 6000),))
    h.take(bob)
    h.send(conn, Connect("r", "bob"))
    (to_bob,) = [m for m in h.take(bob) if isinstance(m, Punch)]
    assert to_bob.peer_ipv6 == (seen,)


def test_configured_relay_endpoint_is_advertised() -> None:
    relay = Endpoint("198.51.100.11", 443)
    h = Harness(CoordinatorConfig(relay_endpoint=relay))
    alice, _ = h.register("alice"), h.register("bob")
    h.take(alice)
    h.send(alice, Connect("r", "bob"))
    (punch,) = h.take(alice)
    assert isinstance(punch, Punch) and punch.relay == relay


@pytest.mark.parametrize(("target", "code"), [("nobody", "unknown-peer"), ("alice", "self-connect")])
def test_connect_errors_are_not_fatal(target: str, code: str) -> None:
    h = Harness()
    alice = h.register("alice")
    h.take(alice)
    h.send(alice, Connect("r9", target))
    error = h.error(alice)
    assert (error.code, error.fatal, error.request_id) == (code, False, "r9")
    h.send(alice, Ping(3))
    assert h.take(alice) == [Pong(3)]
    assert not h.wires[alice].closed


def test_too_many_sessions_is_busy() -> None:
    h = Harness()
    alice, _ = h.register("alice"), h.register("bob")
    for i in range(3):
        h.send(alice, Connect(f"r{i}", "bob"))
    h.take(alice)
    h.send(alice, Connect("r3", "bob"))
    error = h.error(alice)
    assert (error.code, error.fatal) == ("busy", False)


def test_result_is_recorded() -> None:
    h = Harness()
    alice, _ = h.register("alice"), h.register("bob")
    h.take(alice)
    h.send(alice, Connect("r", "bob"))
    (punch,) = h.take(alice)
    assert isinstance(punch, Punch)
    h.send(alice, Result(punch.session_id, Outcome.DIRECT, {"attempts": 2}), Result("other", Outcome.FAILED))
    assert h.proto.sessions[punch.session_id].results == {"alice": "direct"}
    assert h.proto.stats.results == {"direct": 1, "failed": 1}
    assert h.take(alice) == []


def test_a_session_both_peers_report_direct_is_closed() -> None:
    h = Harness()
    alice, bob = h.register("alice"), h.register("bob")
    h.send(alice, Connect("r", "bob"))
    (punch,) = [m for m in h.take(alice) if isinstance(m, Punch)]
    h.send(alice, Result(punch.session_id, Outcome.DIRECT))
    h.send(bob, Result(punch.session_id, Outcome.DIRECT))
    assert h.proto.sessions == {}
    record = h.proto.registry.get("alice")
    assert record is not None and record.sessions == set()
    late = _join(h, punch, Role.INITIATOR)
    assert_fatal(h, late, "unknown-session")


def test_a_failed_punch_keeps_the_session_for_the_relay() -> None:
    h = Harness()
    alice, bob = h.register("alice"), h.register("bob")
    h.send(alice, Connect("r", "bob"))
    (punch,) = [m for m in h.take(alice) if isinstance(m, Punch)]
    h.send(alice, Result(punch.session_id, Outcome.FAILED))
    h.send(bob, Result(punch.session_id, Outcome.FAILED))
    _join(h, punch, Role.INITIATOR)
    _join(h, punch, Role.RESPONDER)
    assert len(h.relays) == 1


# ------------------------------------------------------------------------------------ relay


def _session(h: Harness) -> tuple[int, int, Punch]:
    alice, bob = h.register("alice"), h.register("bob")
    h.take(bob)
    h.send(alice, Connect("r", "bob"))
    punch = h.take(alice)[-1]
    assert isinstance(punch, Punch)
    return alice, bob, punch


def _join(h: Harness, punch: Punch, role: Role, *, key: bytes | None = None, extra: bytes = b"",
          tls_key: str | None = TEST_KEY) -> int:
    conn = h.open(key=tls_key)
    proof = relay_proof(key or punch.key, punch.session_id, role)
    h.feed(conn, PREAMBLE + encode_message(Relay(punch.session_id, role, proof)) + extra)
    return conn


def test_relay_pairs_both_roles_and_hands_over_early_bytes() -> None:
    h = Harness()
    _, _, punch = _session(h)
    ini = _join(h, punch, Role.INITIATOR, extra=b"early")
    assert h.take(ini) == [] and h.relays == []
    assert h.proto.conn_state(ini) is ConnState.RELAY_WAIT
    h.feed(ini, b" bytes")
    resp = _join(h, punch, Role.RESPONDER, extra=b"hi")
    assert h.take(ini) == h.take(resp) == [RelayOk(punch.session_id)]
    (start,) = h.relays
    assert (start.session_id, start.initiator, start.responder) == (punch.session_id, ini, resp)
    assert (start.initiator_pending, start.responder_pending) == (b"early bytes", b"hi")
    assert not h.wires[ini].closed and not h.wires[resp].closed
    assert h.proto.conn_state(ini) is None  # handed off: no longer the protocol's
    assert h.proto.sessions == {}
    assert h.proto.active_relays("alice") == h.proto.active_relays("bob") == 1
    # the session is used up: a late joiner with the right key is refused
    late = _join(h, punch, Role.INITIATOR)
    assert_fatal(h, late, "unknown-session")
    h.proto.relay_finished(punch.session_id)
    assert h.proto.active_relays("alice") == 0


def test_relay_with_a_wrong_proof_is_refused() -> None:
    h = Harness()
    _, _, punch = _session(h)
    wrong = _join(h, punch, Role.INITIATOR, key=b"\x99" * 32)
    assert_fatal(h, wrong, "bad-proof")
    # the right ones still pair afterwards
    _join(h, punch, Role.INITIATOR)
    _join(h, punch, Role.RESPONDER)
    assert len(h.relays) == 1


def test_third_connection_with_the_session_id_but_not_the_key_is_refused() -> None:
    h = Harness()
    _, _, punch = _session(h)
    ini = _join(h, punch, Role.INITIATOR)
    intruder = _join(h, punch, Role.RESPONDER, key=bytes(32))
    assert_fatal(h, intruder, "bad-proof")
    assert h.relays == [] and h.proto.conn_state(ini) is ConnState.RELAY_WAIT


def test_second_join_for_a_role_and_unknown_session_are_refused() -> None:
    h = Harness()
    _, _, punch = _session(h)
    _join(h, punch, Role.INITIATOR)
    again = _join(h, punch, Role.INITIATOR)
    assert_fatal(h, again, "relay-used")
    conn = h.open()
    h.send(conn, Relay("f" * 32, Role.INITIATOR, bytes(32)), preamble=True)
    assert_fatal(h, conn, "unknown-session")


def test_waiting_relay_expires_with_its_session() -> None:
    h = Harness(CoordinatorConfig(keepalive_timeout=1000.0, stale_after=500.0))
    _, _, punch = _session(h)
    ini = _join(h, punch, Role.INITIATOR)
    expiry = h.proto.sessions[punch.session_id].expires_at
    assert expiry == pytest.approx(100.0 + 6.0 + 30.0)
    h.tick(expiry - 0.001)
    assert not h.wires[ini].closed
    h.tick(expiry)
    assert_fatal(h, ini, "relay-timeout")
    assert h.proto.sessions == {}


def test_waiting_relay_is_cancelled_when_a_peer_leaves() -> None:
    h = Harness()
    alice, _, punch = _session(h)
    ini = _join(h, punch, Role.INITIATOR)
    h.lose(alice)
    assert_fatal(h, ini, "session-cancelled")


def test_waiting_relay_that_disconnects_ends_the_session_and_both_peers_hear_why() -> None:
    h = Harness()
    alice, bob, punch = _session(h)
    h.take(bob)
    first = _join(h, punch, Role.INITIATOR)
    h.lose(first)
    for conn in (alice, bob):
        (cancel,) = [m for m in h.take(conn) if isinstance(m, Cancel)]
        assert cancel.session_id == punch.session_id and "session-cancelled" in cancel.reason
    assert punch.session_id not in h.proto.sessions
    assert_fatal(h, _join(h, punch, Role.RESPONDER), "unknown-session")
    assert h.relays == []


def test_too_many_bytes_before_relay_ok() -> None:
    h = Harness()
    _, _, punch = _session(h)
    ini = _join(h, punch, Role.INITIATOR, extra=b"x" * 900)
    h.feed(ini, b"y" * 200)
    assert_fatal(h, ini, "relay-overflow")


def test_relays_per_peer_are_limited() -> None:
    h = Harness()
    alice, bob = h.register("alice"), h.register("bob")
    h.take(bob)
    punches = []
    for i in range(3):
        h.send(alice, Connect(f"r{i}", "bob"))
        punch = h.take(alice)[-1]
        assert isinstance(punch, Punch)
        punches.append(punch)
    for punch in punches[:2]:
        _join(h, punch, Role.INITIATOR)
        _join(h, punch, Role.RESPONDER)
    h.take(alice)
    h.take(bob)
    refused = _join(h, punches[2], Role.INITIATOR)
    assert_fatal(h, refused, "relay-limit")
    # both peers hear why at once (CANCEL), and the session is over: nobody waits for a relay partner
    for peer in (alice, bob):
        (cancel,) = [m for m in h.take(peer) if isinstance(m, Cancel)]
        assert cancel.session_id == punches[2].session_id and "relay-limit" in cancel.reason
    assert_fatal(h, _join(h, punches[2], Role.RESPONDER), "unknown-session")
    # a slot that frees up serves the next session
    h.proto.relay_finished(punches[0].session_id)
    h.send(alice, Connect("r3", "bob"))
    again = h.take(alice)[-1]
    assert isinstance(again, Punch)
    _join(h, again, Role.INITIATOR)
    _join(h, again, Role.RESPONDER)
    assert len(h.relays) == 3


def test_shutdown_tells_everyone() -> None:
    h = Harness()
    alice = h.register("alice")
    idle = h.open()
    h.take(alice)
    h.apply(h.proto.shutdown(h.now))
    assert_fatal(h, alice, "shutting-down")
    assert_fatal(h, idle, "shutting-down")


def test_stun_connection_can_be_forgotten_before_hello() -> None:
    h = Harness()
    conn = h.open()
    h.proto.connection_forget(conn)
    assert h.proto.conn_state(conn) is None
    assert h.proto.next_deadline() is None
    alice = h.register("alice")
    with pytest.raises(ValueError):
        h.proto.connection_forget(alice)
    assert h.proto.conn_state(alice) is ConnState.PEER  # refused, and nothing changed


def test_the_largest_registration_still_fits_in_a_punch_frame() -> None:
    from tcppunch.wire.coord import MAX_ENDPOINTS, MAX_STRING, MAX_UNTESTED, MAX_VERDICT

    widest_ip = "1111:2222:3333:4444:5555:6666:7777:{:x}"
    big_nat = SYM_RANDOM.replace(
        verdict="\u00e9" * MAX_VERDICT,  # 2 bytes each in UTF-8
        untested=tuple("\u00e9" * MAX_STRING for _ in range(MAX_UNTESTED)),
        local=tuple(widest_ip.format(0x1000 + i) for i in range(MAX_ENDPOINTS)),
    )
    private = tuple(Endpoint(widest_ip.format(0x1000 + i), 65535) for i in range(MAX_ENDPOINTS))
    h = Harness()
    alice = h.register("a" * 64, nat=big_nat, private=private, swarm="s" * 256)
    bob = h.register("b" * 64, nat=big_nat, private=private, swarm="s" * 256)
    h.take(bob)
    h.send(alice, Connect("r" * 64, "b" * 64))
    (punch,) = [m for m in h.take(bob) if isinstance(m, Punch)]
    assert punch.peer_nat == big_nat and punch.peer_private == private


# ------------------------------------------------------------------------------- keys (issue 9)

ALICE_KEY = "ALIC-EAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA"
BOB_KEY = "BOBB-BBBB-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA"
EVE_KEY = "EVEE-EEEE-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA"


def _keyed_session(h: Harness) -> tuple[int, int, Punch]:
    """alice (ALICE_KEY) connects to bob (BOB_KEY): their connections and alice's PUNCH."""
    alice, bob = h.register("alice", key=ALICE_KEY), h.register("bob", key=BOB_KEY)
    h.take(bob)
    h.send(alice, Connect("r", "bob"))
    return alice, bob, next(m for m in h.take(alice) if isinstance(m, Punch))


def test_register_and_relay_outside_tls_are_refused() -> None:
    h = Harness()
    conn = h.register("alice", key=None)
    assert_fatal(h, conn, "tls-required")
    _, _, punch = _session(h)
    assert_fatal(h, _join(h, punch, Role.INITIATOR, tls_key=None), "tls-required")


def test_an_impostor_with_the_token_cannot_take_an_id_after_its_owner_left() -> None:
    h = Harness()
    bob = h.register("bob", key=BOB_KEY)
    h.lose(bob)  # bob left: the id is free, but it stays bob's key's
    eve = h.register("bob", key=EVE_KEY)
    error = h.error(eve)
    assert error.code == "id-owned" and BOB_KEY in error.message and EVE_KEY in error.message
    assert h.proto.registry.get("bob") is None
    again = h.register("bob", key=BOB_KEY)  # the owner comes back
    assert isinstance(h.take(again)[0], Registered)


def test_authorized_keys_reserve_ids() -> None:
    h = Harness()
    h.proto.authorized_keys = {"bob": frozenset({BOB_KEY, ALICE_KEY})}
    assert h.error(h.register("bob", key=EVE_KEY)).code == "id-owned"
    first = h.register("bob", key=ALICE_KEY)  # either listed key may register it
    assert isinstance(h.take(first)[0], Registered)
    h.lose(first)
    assert isinstance(h.take(h.register("bob", key=BOB_KEY))[0], Registered)


def test_punch_names_the_key_that_owns_the_other_id() -> None:
    h = Harness()
    _, bob, mine = _keyed_session(h)
    theirs = next(m for m in h.take(bob) if isinstance(m, Punch))
    assert (mine.peer_key, theirs.peer_key) == (BOB_KEY, ALICE_KEY)


def test_relay_join_needs_the_key_of_the_peer_in_that_role() -> None:
    h = Harness()
    _, _, punch = _keyed_session(h)
    # The right proof (an old-style stolen RELAY frame) is not enough without alice's key.
    assert_fatal(h, _join(h, punch, Role.INITIATOR, tls_key=EVE_KEY), "relay-wrong-key")
    assert_fatal(h, _join(h, punch, Role.INITIATOR, tls_key=BOB_KEY), "relay-wrong-key")
    ini = _join(h, punch, Role.INITIATOR, tls_key=ALICE_KEY)
    resp = _join(h, punch, Role.RESPONDER, tls_key=BOB_KEY)
    assert len(h.relays) == 1 and {ini, resp} == {h.relays[0].initiator, h.relays[0].responder}


def test_finding_2_a_replayed_relay_join_gets_an_error_and_no_bytes() -> None:
    """Before: RELAY frames carried a fixed HMAC; replayed after the real join dropped, one got relay-ok
    and the partner's bytes. Now a join is single-use and bound to the joiner's key."""
    h = Harness()
    _, _, punch = _keyed_session(h)
    real = _join(h, punch, Role.INITIATOR, tls_key=ALICE_KEY)
    assert_fatal(h, _join(h, punch, Role.INITIATOR, tls_key=ALICE_KEY), "relay-used")
    h.lose(real)  # the real join dropped before its partner came
    replay = _join(h, punch, Role.INITIATOR, tls_key=ALICE_KEY)
    assert h.error(replay).code == "unknown-session"
    partner = _join(h, punch, Role.RESPONDER, tls_key=BOB_KEY)
    assert h.error(partner).code == "unknown-session"
    assert h.relays == []  # nobody was paired: no bytes reach the replayer


def test_list_counts_the_asker_out_of_its_own_swarm() -> None:
    """100 others fit exactly: not truncated, whether the asker sorts among the first 100 or not."""
    h = Harness(tokens=Tokens(shared="tok"))
    for i in range(100):
        h.register(f"p{i:03d}", swarm="s")
    for asker_id in ("a", "zz"):
        asker = h.register(asker_id, swarm="s")
        h.take(asker)
        h.send(asker, ListPeers("r", "s"))
        (peers,) = h.take(asker)
        assert isinstance(peers, Peers) and len(peers.peers) == 100 and not peers.truncated
        assert asker_id not in [p.id for p in peers.peers]
        h.lose(asker)
    h.register("p100", swarm="s")
    asker = h.register("b", swarm="other")
    h.take(asker)
    h.send(asker, ListPeers("r", "s"))
    (peers,) = h.take(asker)
    assert isinstance(peers, Peers) and len(peers.peers) == 100 and peers.truncated
    assert [p.id for p in peers.peers] == [f"p{i:03d}" for i in range(100)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from("abcdefgh"), st.sampled_from([None, "x", "y"])),
                max_size=60))
def test_registry_lists_each_swarm_in_id_order_through_adds_and_removes(
    ops: list[tuple[bool, str, str | None]],
) -> None:
    """The registry's ordered id lists agree with sorting a filter of every peer, after any adds and removes."""
    registry = Registry()
    model: dict[str, str | None] = {}
    for conn, (add, peer_id, swarm) in enumerate(ops):
        if add and peer_id not in model:
            observed = Endpoint("203.0.113.5", 1000 + conn)
            registry.add(PeerRecord(peer_id, conn, observed, None, (), swarm, 0.0, 0.0, 0.0))
            model[peer_id] = swarm
        elif not add:
            assert (registry.remove(peer_id) is None) == (peer_id not in model)
            model.pop(peer_id, None)
    for swarm in (None, "x", "y"):
        expected = sorted(p for p, s in model.items() if swarm is None or s == swarm)
        assert [p.id for p in registry.in_swarm(swarm)] == expected
        assert [p.id for p in registry.in_swarm(swarm, 2)] == expected[:2]
        assert registry.swarm_size(swarm) == len(expected)


def test_a_burst_of_due_keepalives_is_handled_a_bounded_number_per_tick() -> None:
    """250 peers' pings fall due at once: one tick sends at most max_timers_per_tick of them and leaves the
    deadline due, so the driver runs I/O between ticks; every peer gets exactly one ping in the end."""
    config = CoordinatorConfig()
    h = Harness(config=config)
    conns = [h.register(f"p{i:03d}") for i in range(250)]
    for conn in conns:
        h.take(conn)  # REGISTERED and the first ping
    due = h.now + config.keepalive_interval
    sent_per_tick = []
    for _ in range(10):
        before = sum(len(h.wires[c].inbox) for c in conns)
        h.tick(due)
        sent_per_tick.append(sum(len(h.wires[c].inbox) for c in conns) - before)
        deadline = h.proto.next_deadline()
        if deadline is None or deadline > due:
            break
    assert sent_per_tick == [100, 100, 50]
    assert all([type(m) for m in h.take(c)] == [Ping] for c in conns)
