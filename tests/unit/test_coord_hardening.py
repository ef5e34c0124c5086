"""Issue 9's hardening findings against the coordinator state machine (no sockets, explicit ``now``).

Each test reproduces an attack from the issue and checks that the server answers within its limits and
keeps serving the others. Finding numbers refer to issue 9.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import structlog

from tcppunch.coordinator.protocol import ConnState, CoordinatorConfig
from tcppunch.relay import RelayLimits
from tcppunch.wire.coord import (
    Connect,
    Error,
    ListPeers,
    Observed,
    Peers,
    Ping,
    Pong,
    Punch,
    Register,
    Registered,
    Relay,
    Role,
    encode_message,
    relay_proof,
)
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.framing import MAX_FRAME_SIZE, PREAMBLE
from tcppunch.wire.natreport import MappingBehaviour, NatReport, TcpBehaviour

from .test_coord_protocol import SYM_RANDOM, Harness, assert_fatal


def raw_register(h: Harness, fields: dict[str, Any], ip: str = "203.0.113.5") -> int:
    """A REGISTER frame built from raw JSON, for shapes the Register dataclass cannot express."""
    conn = h.open(ip=ip)
    payload = json.dumps({"type": "register", "token": "tok", **fields}).encode()
    h.feed(conn, PREAMBLE + struct.pack("!I", len(payload)) + payload)
    return conn


def frame_sizes(h: Harness, conn: int) -> list[int]:
    """Payload sizes of every frame ``conn`` received so far."""
    raw, sizes = bytes(h.wires[conn].raw), []
    while raw:
        (size,) = struct.unpack("!I", raw[:4])
        sizes.append(size)
        raw = raw[4 + size :]
    return sizes


def still_served(h: Harness, conn: int) -> None:
    """The connection is open and answers a PING."""
    h.take(conn)
    h.send(conn, Ping(77))
    assert Pong(77) in h.take(conn)
    assert not h.wires[conn].closed


# ------------------------------------------------------------------------- 1: oversized answers


def test_control_character_verdicts_are_refused_and_the_list_stays_bounded() -> None:
    """55 peers whose verdicts are 200 control characters made a 74,972-byte PEERS that dropped the
    asker. Control characters are now refused at REGISTER; the asker gets its PEERS."""
    h = Harness()
    asker = h.register("asker")
    nasty = SYM_RANDOM.replace(verdict="\x01" * 200)
    refused = [h.register(f"p{i:02d}", nat=nasty, ip=f"198.18.0.{i + 1}") for i in range(55)]
    for conn in refused:
        error = h.error(conn)
        assert (error.code, error.fatal) == ("bad-field", True) and "control characters" in error.message
    h.take(asker)
    h.send(asker, ListPeers("l"))
    (peers,) = h.take(asker)
    assert isinstance(peers, Peers) and peers.peers == ()
    still_served(h, asker)


def test_peers_is_bounded_by_bytes_and_says_truncated() -> None:
    """Printable but wide verdicts (4 UTF-8 bytes per character) from 100 peers would need ~100 KB."""
    h = Harness()
    asker = h.register("asker")
    wide = SYM_RANDOM.replace(verdict="\U0001f600" * 300)
    for i in range(100):
        conn = h.register(f"p{i:03d}", nat=wide, ip=f"198.18.{i // 200}.{i % 200 + 1}")
        assert isinstance(h.take(conn)[0], Registered)
    h.take(asker)
    h.send(asker, ListPeers("l"))
    (peers,) = h.take(asker)
    assert isinstance(peers, Peers)
    assert peers.truncated and 10 < len(peers.peers) < 100
    assert all(p.verdict == "\U0001f600" * 200 for p in peers.peers)
    assert max(frame_sizes(h, asker)) <= MAX_FRAME_SIZE
    still_served(h, asker)


def test_strings_where_lists_belong_are_refused_before_they_can_expand() -> None:
    """A NAT report with a 15,000-character string as 'local' passed the 16 KiB check and expanded into
    15,000 list entries: a 65,873-byte PUNCH. Now the report's shape is checked at REGISTER."""
    h = Harness()
    alice = h.register("alice")
    nat = SYM_RANDOM.to_json()
    for bad in ({**nat, "local": "1" * 15_000}, {**nat, "untested": "x" * 15_000},
                {**nat, "tcp": "mapping"}, {**nat, "local": ["example.org"]}):
        bob = raw_register(h, {"id": "bob", "nat": bad})
        assert_fatal(h, bob, "bad-field")
    h.take(alice)
    h.send(alice, Connect("r", "bob"))
    (error,) = h.take(alice)
    assert isinstance(error, Error) and error.code == "unknown-peer"
    still_served(h, alice)


def test_a_punch_that_would_not_fit_leaves_the_report_out_and_says_so() -> None:
    config = CoordinatorConfig(max_frame_size=2048)
    h = Harness(config)
    big = SYM_RANDOM.replace(verdict="v" * 1500)
    alice, bob = h.register("alice"), h.register("bob", nat=big, ip="198.18.0.2")
    h.take(alice), h.take(bob)
    h.send(alice, Connect("r", "bob"))
    (punch,) = [m for m in h.take(alice) if isinstance(m, Punch)]
    assert punch.peer_nat is None and "left out" in punch.advice_reason
    assert max(frame_sizes(h, alice)) <= 2048
    still_served(h, alice)


def test_error_texts_are_bounded_and_printable() -> None:
    h = Harness()
    alice, bob = h.register("alice"), h.register("bob", ip="198.18.0.2")
    h.take(alice), h.take(bob)
    h.send(alice, Connect("r", "bob"))
    (punch,) = [m for m in h.take(alice) if isinstance(m, Punch)]
    h.take(bob)
    # an 'abandoned' reason is quoted in bob's CANCEL: cut and cleaned, so bob can still decode it
    payload = json.dumps({"type": "result", "session_id": punch.session_id, "outcome": "abandoned",
                          "details": {"reason": "\x00\ud800" + "z" * 5000}}).encode()
    h.feed(alice, struct.pack("!I", len(payload)) + payload)
    (cancel,) = h.take(bob)
    assert len(cancel.reason) <= 256 and "\x00" not in cancel.reason  # type: ignore[union-attr]
    still_served(h, bob)


# --------------------------------------------------------------------------- 4: token guessing


def test_wrong_tokens_are_throttled_per_source_and_logged_at_warning() -> None:
    h = Harness()
    codes = []
    with structlog.testing.capture_logs() as logs:
        for _ in range(200):
            conn = h.register("alice", token="guess", ip="198.18.5.5")
            codes.append(h.error(conn).code)
    assert codes[:10] == ["bad-token"] * 10
    assert set(codes[10:]) == {"throttled"}
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert {e["event"] for e in warnings} >= {"coordinator.bad_token", "coordinator.auth_throttled"}
    assert len(warnings) <= 10  # rate-limited: 200 attempts do not make 200 lines
    # even the right token is refused from the throttled source, until the bucket refills
    assert h.error(h.register("alice", ip="198.18.5.5")).code == "throttled"
    # another source is not affected
    good = h.register("alice", ip="198.18.6.6")
    assert isinstance(h.take(good)[0], Registered)
    # the throttled source may try again after a while
    h.now += 10.0
    good_again = h.register("bob", ip="198.18.5.5")
    assert isinstance(h.take(good_again)[0], Registered)


def test_bad_relay_proofs_count_as_failed_authentication() -> None:
    h = Harness()
    alice, bob = h.register("alice"), h.register("bob", ip="198.18.0.2")
    h.take(bob)
    h.send(alice, Connect("r", "bob"))
    (punch,) = [m for m in h.take(alice) if isinstance(m, Punch)]
    codes = []
    for _ in range(30):
        conn = h.open(ip="198.18.7.7")
        h.send(conn, Relay(punch.session_id, Role.INITIATOR, b"\x00" * 32), preamble=True)
        codes.append(h.error(conn).code)
    assert codes[:10] == ["bad-proof"] * 10 and set(codes[10:]) == {"throttled"}


# -------------------------------------------------------------------------- 5: slow peers


def test_a_trickle_into_an_unfinished_frame_does_not_keep_a_peer_listed() -> None:
    """One byte every 4.5 s into a frame that never ends, and no PONG: the peer is removed."""
    h = Harness()
    alice, bob = h.register("alice"), h.register("bob", ip="198.18.0.2")
    h.take(alice)
    h.answer_pings(bob, 0.0)
    trickle = struct.pack("!I", 1000) + b'{"type":"list","request_id":"'
    for byte in trickle:
        h.tick(h.now + 4.5)
        if h.wires[alice].closed:
            break
        h.feed(alice, bytes([byte]))
        h.answer_pings(bob, 0.0)
    assert h.proto.registry.get("alice") is None
    assert h.wires[alice].closed
    assert h.proto.registry.get("bob") is not None


def test_a_frame_must_complete_within_the_frame_timeout() -> None:
    config = CoordinatorConfig(frame_timeout=2.0)
    h = Harness(config)
    alice = h.register("alice")
    h.answer_pings(alice, 0.0)
    h.feed(alice, struct.pack("!I", 100) + b"{")
    deadline = h.proto.next_deadline()
    assert deadline is not None and deadline <= h.now + 2.0
    h.tick(h.now + 1.9)
    assert not h.wires[alice].closed
    h.tick(h.now + 0.2)
    assert_fatal(h, alice, "timeout")


# ----------------------------------------------------------------------------- 8: aiming


def test_private_endpoints_must_be_ip_literals() -> None:
    h = Harness()
    conn = raw_register(h, {"id": "alice", "private": [{"ip": "intranet.example", "port": 22}]})
    assert_fatal(h, conn, "bad-field")
    ok = h.register("alice", private=(Endpoint("10.0.0.2", 40000),))
    assert isinstance(h.take(ok)[0], Registered)


def test_observed_accepts_only_ports_seen_or_predicted() -> None:
    h = Harness()
    alice = h.register("alice")  # observed 203.0.113.5:40001
    record = h.proto.registry.get("alice")
    assert record is not None
    before = record.observed
    h.send(alice, Observed(Endpoint(before.ip, 22)))
    assert record.observed == before  # aimed at the SSH port: refused
    h.proto.endpoint_seen(Endpoint(before.ip, 50123), h.now)  # a STUN binding came from there
    h.send(alice, Observed(Endpoint(before.ip, 50123)))
    assert record.observed == Endpoint(before.ip, 50123)
    # a seen port goes stale
    h.proto.endpoint_seen(Endpoint(before.ip, 50999), h.now)
    h.now += 61.0
    h.send(alice, Observed(Endpoint(before.ip, 50999)))
    assert record.observed == Endpoint(before.ip, 50123)


def test_observed_within_a_sequential_nats_window() -> None:
    sequential = NatReport(tcp=TcpBehaviour(mapping=MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT, port_delta=2))
    h = Harness()
    alice = h.register("alice", nat=sequential)
    record = h.proto.registry.get("alice")
    assert record is not None
    start = record.observed.port
    h.send(alice, Observed(Endpoint(record.observed.ip, start + 40)))
    assert record.observed.port == start + 40
    h.send(alice, Observed(Endpoint(record.observed.ip, 22)))
    assert record.observed.port == start + 40


# ------------------------------------------------------------------------ 9: busy lockout


def test_one_requester_cannot_fill_another_peers_session_slots() -> None:
    h = Harness(CoordinatorConfig())
    mallory = h.register("mallory")
    h.register("bob", ip="198.18.0.2")
    carol = h.register("carol", ip="198.18.0.3")
    errors = []
    for i in range(64):
        h.send(mallory, Connect(f"r{i}", "bob"))
        errors += [m for m in h.take(mallory) if isinstance(m, Error)]
    per_pair = CoordinatorConfig().max_sessions_per_pair
    assert per_pair < CoordinatorConfig().max_sessions_per_peer
    assert len(errors) == 64 - per_pair and {e.code for e in errors} == {"busy"}
    h.take(carol)
    h.send(carol, Connect("c", "bob"))
    assert [m for m in h.take(carol) if isinstance(m, Punch)]


def test_fresh_ids_from_one_source_cannot_fill_another_peers_slots_either() -> None:
    """With a shared token a new id costs nothing: the requester limit also counts per source address."""
    config = CoordinatorConfig()
    h = Harness(config)
    h.register("bob", ip="198.18.0.2")
    refused = 0
    for n in range(6):  # six ids from one address, each within its own per-id limit
        conn = h.register(f"m{n}", ip="198.18.0.9")
        for i in range(config.max_sessions_per_pair):
            h.send(conn, Connect(f"r{i}", "bob"))
        refused += sum(1 for m in h.take(conn) if isinstance(m, Error) and "your address" in m.message)
    assert refused == 6 * config.max_sessions_per_pair - config.max_sessions_per_source_pair
    carol = h.register("carol", ip="198.18.0.3")
    h.take(carol)
    h.send(carol, Connect("c", "bob"))
    assert [m for m in h.take(carol) if isinstance(m, Punch)]


# ---------------------------------------------------------------- 3: unauthenticated connections


def test_unauthenticated_connections_are_limited_per_source() -> None:
    h = Harness(CoordinatorConfig(max_unauthenticated_per_source=16))
    idle = [h.open(ip="198.18.9.9") for _ in range(16)]
    assert all(h.proto.conn_state(c) is ConnState.HELLO for c in idle)
    refused = h.open(ip="198.18.9.9")
    assert h.error(refused).code == "server-busy" and h.wires[refused].closed
    # another source registers fine, and a registered connection frees its source's slot
    other = h.register("alice", ip="198.18.9.10")
    assert isinstance(h.take(other)[0], Registered)
    h.send(idle[0], Register("bob", "tok"), preamble=True)
    assert isinstance(h.take(idle[0])[0], Registered)
    again = h.open(ip="198.18.9.9")
    assert h.proto.conn_state(again) is ConnState.HELLO


# ------------------------------------------------------------------------------ 7: relay budgets


def _relayed(h: Harness, a: str, b: str, ip: str) -> tuple[int, int, Punch]:
    """Register ``a`` and ``b`` from ``ip``, connect, and join both relay roles from ``ip``."""
    ca, cb = h.register(a, ip=ip), h.register(b, ip=ip)
    h.take(cb)
    h.send(ca, Connect("r", b))
    (punch,) = [m for m in h.take(ca) if isinstance(m, Punch)]
    conns = []
    for role in Role:
        conn = h.open(ip=ip)
        h.feed(conn, PREAMBLE + encode_message(Relay(punch.session_id, role,
                                                     relay_proof(punch.key, punch.session_id, role))))
        conns.append(conn)
    return conns[0], conns[1], punch


def test_relay_budgets_per_source_are_not_bypassed_with_fresh_ids() -> None:
    """Per-id budgets were bypassed with fresh ids (one shared token). The budget of a source address
    is shared by every relay from it, whatever the ids."""
    limits = RelayLimits(max_bytes_per_source=1000, max_bytes_per_token=None)
    h = Harness(CoordinatorConfig(relay_limits=limits))
    _relayed(h, "a1", "b1", "198.18.1.1")
    (start,) = h.relays
    assert start.budgets and start.max_duration == limits.max_duration
    for budget in start.budgets:  # what the pump does while it moves 1000 bytes
        budget.charge(budget.allowance(1000))
    h.proto.relay_finished(start.session_id)
    ini, _, _ = _relayed(h, "fresh-a", "fresh-b", "198.18.1.1")
    error = h.error(ini)
    assert error.code == "relay-limit" and "source:198.18.1.1" in error.message
    assert len(h.relays) == 1
    # another source is not affected
    _relayed(h, "c1", "d1", "198.18.1.2")
    assert len(h.relays) == 2


def test_relay_budgets_per_token_cover_every_id_of_the_token() -> None:
    limits = RelayLimits(max_bytes_per_source=None, max_bytes_per_token=500)
    h = Harness(CoordinatorConfig(relay_limits=limits))
    _relayed(h, "a1", "b1", "198.18.2.1")
    for budget in h.relays[0].budgets:
        budget.charge(budget.allowance(500))
    ini, _, _ = _relayed(h, "a2", "b2", "198.18.2.2")  # another address, same shared token
    error = h.error(ini)
    assert error.code == "relay-limit" and "token:shared" in error.message


# ------------------------------------------------------------------------ found by the fuzzer


def test_decoded_messages_can_always_be_encoded_again() -> None:
    """JSON can carry lone surrogates ("\\ud800"); a string echoed back (request_id) or a free-form
    object (result details) holding one made the server's answer unencodable."""
    from tcppunch.wire.coord import decode_message
    from tcppunch.wire.framing import ProtocolError

    for obj in ({"type": "list", "request_id": "\ud800"},
                {"type": "result", "session_id": "", "outcome": "direct", "details": {"reason": "\ud800"}}):
        try:
            message = decode_message(obj)
        except ProtocolError as exc:
            assert exc.code == "bad-field"
        else:
            encode_message(message)
    h = Harness()
    alice = h.register("alice")
    h.take(alice)
    payload = b'{"type":"list","request_id":"\\ud800"}'
    h.feed(alice, struct.pack("!I", len(payload)) + payload)
    assert h.error(alice).code == "bad-field"
