"""The core's cluster hooks without Redis: claims before REGISTERED, lookups, forwarded PUNCH, CANCEL and
RESULT (two cores wired to each other the way pub/sub would carry their :class:`Forward` actions)."""

from __future__ import annotations

import itertools

import pytest

from tcppunch.coordinator.auth import Tokens
from tcppunch.coordinator.directory import Claim, ClaimAnswer, Forward, LookupPeer, Release, RemotePeer, Way
from tcppunch.coordinator.protocol import Action, CoordinatorConfig, CoordinatorProtocol, Send
from tcppunch.wire.coord import (
    Cancel,
    Connect,
    Outcome,
    Punch,
    Register,
    Registered,
    Result,
    Role,
    decode_message,
    encode_message,
)
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.framing import PREAMBLE, FrameDecoder

SERVER = Endpoint("198.51.100.10", 3478)


def frames(actions: list[Action], conn: int) -> list[object]:
    decoder = FrameDecoder()
    for a in actions:
        if isinstance(a, Send) and a.conn == conn:
            decoder.feed(a.data)
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(decode_message(frame))
    return out


def decoded(data: bytes) -> object:
    decoder = FrameDecoder()
    decoder.feed(data)
    frame = decoder.next_frame()
    assert frame is not None
    return decode_message(frame)


def node_a(node: str = "A", max_sessions: int = 64) -> CoordinatorProtocol:
    counter = itertools.count(1)
    # keepalives far apart: the peers stay registered while the tests move time past sessions' expiry
    config = CoordinatorConfig(keepalive_interval=300.0, stale_after=450.0, keepalive_timeout=900.0,
                               max_sessions_per_peer=max_sessions)
    return CoordinatorProtocol(Tokens(shared="tok"), config, node=node,
                               random_bytes=lambda n: bytes([next(counter)]) * n)


def register(proto: CoordinatorProtocol, conn: int, peer_id: str) -> list[Action]:
    proto.connection_made(conn, Endpoint("203.0.113.5", 40000 + conn), SERVER, 100.0)
    proto.connection_authenticated(conn, f"KEY-OF-{peer_id}")  # the TLS handshake's key (ids belong to keys)
    return proto.data_received(conn, PREAMBLE + encode_message(Register(peer_id, "tok")), 100.0)


def test_registered_only_after_the_cluster_granted_the_claim() -> None:
    proto = node_a()
    actions = register(proto, 1, "alice")
    claims = [a for a in actions if isinstance(a, Claim)]
    assert len(claims) == 1 and claims[0].peer.id == "alice" and claims[0].peer.node == "A"
    assert frames(actions, 1) == []
    granted = proto.claim_result(1, ClaimAnswer.GRANTED, 100.1)
    assert next(type(m) for m in frames(granted, 1)) is Registered
    assert proto.claim_result(1, ClaimAnswer.GRANTED, 100.2) == []  # a second answer changes nothing
    refused = register(proto, 2, "bob")
    actions = proto.claim_result(2, ClaimAnswer.TAKEN, 100.3)
    error = frames(actions, 2)[0]
    assert getattr(error, "code", None) == "id-taken"
    assert proto.registry.get("bob") is None
    assert any(isinstance(a, Release) and a.peer_id == "bob" for a in actions + refused)


def test_connect_to_a_peer_of_another_node_forwards_its_punch() -> None:
    proto = node_a()
    register(proto, 1, "alice")
    proto.claim_result(1, ClaimAnswer.GRANTED, 100.0)
    connect = Connect("r1", "bob")
    actions = proto.data_received(1, encode_message(connect), 100.5)
    assert actions == [LookupPeer(1, connect)]
    bob = RemotePeer("bob", "B", Endpoint("203.0.113.9", 5000), owd=0.01)
    actions = proto.remote_found(1, connect, bob, 100.6)
    mine = frames(actions, 1)
    assert len(mine) == 1 and isinstance(mine[0], Punch) and mine[0].role is Role.INITIATOR
    forwards = [a for a in actions if isinstance(a, Forward)]
    assert len(forwards) == 1 and (forwards[0].node, forwards[0].peer_id) == ("B", "bob")
    theirs = decoded(forwards[0].data)
    assert isinstance(theirs, Punch) and theirs.role is Role.RESPONDER and theirs.peer_id == "alice"
    assert theirs.relay == mine[0].relay == SERVER and theirs.session_id == mine[0].session_id
    # alice gives up: bob, at node B, hears CANCEL through the cluster.
    actions = proto.data_received(1, encode_message(Result(mine[0].session_id, Outcome.ABANDONED)), 101.0)
    cancels = [decoded(a.data) for a in actions if isinstance(a, Forward)]
    assert len(cancels) == 1 and isinstance(cancels[0], Cancel)


def test_unknown_everywhere_and_delivery_to_local_peers() -> None:
    proto = node_a()
    register(proto, 1, "alice")
    proto.claim_result(1, ClaimAnswer.GRANTED, 100.0)
    connect = Connect("r2", "nobody")
    error = frames(proto.remote_found(1, connect, None, 100.1), 1)[0]
    assert getattr(error, "code", None) == "unknown-peer"
    data = encode_message(Cancel("s", "why"))
    assert proto.deliver(Forward("A", "alice", data, origin="B", session_id="s"), 100.2) == [Send(1, data)]
    assert proto.deliver(Forward("A", "carol", data, origin="B", session_id="s"), 100.2) == []


def test_nat_labels_for_metrics() -> None:
    from tcppunch.coordinator.protocol import nat_label
    from tcppunch.wire.natreport import FilteringBehaviour, MappingBehaviour, NatReport, TcpBehaviour

    assert nat_label(None) == "unknown"
    assert nat_label(NatReport(behind_nat=False)) == "open"
    report = NatReport(tcp=TcpBehaviour(mapping=MappingBehaviour.ENDPOINT_INDEPENDENT,
                                        filtering=FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT), behind_nat=True)
    assert nat_label(report) == "eim-apdf"


def test_forward_messages_round_trip_and_refuse_garbage() -> None:
    forward = Forward("B", "bob", b"\x00\x01frame\n", Way.FROM_PEER, "A", "ab" * 16, 36.5)
    assert Forward.decode("B", forward.encode()) == forward
    bare = Forward("B", "bob", b"x")
    assert Forward.decode("B", bare.encode()) == bare
    for garbage in (b"bob\nframe", b"to A s bob\n", b"sideways A s bob 0\nframe", b"to A s bob x\n"):
        with pytest.raises(ValueError):
            Forward.decode("B", garbage)


def two_nodes(b_max_sessions: int = 64) -> tuple[CoordinatorProtocol, CoordinatorProtocol, Punch, list[Forward]]:
    """alice registered at A, bob at B, alice CONNECTs to bob: (A, B, bob's PUNCH, A's forwards so far)."""
    a, b = node_a("A"), node_a("B", b_max_sessions)
    register(a, 1, "alice")
    a.claim_result(1, ClaimAnswer.GRANTED, 100.0)
    register(b, 7, "bob")
    b.claim_result(7, ClaimAnswer.GRANTED, 100.0)
    connect = Connect("r1", "bob")
    assert a.data_received(1, encode_message(connect), 100.5) == [LookupPeer(1, connect)]
    bob = b.remote_view(b.registry.get("bob"))  # type: ignore[arg-type]
    actions = a.remote_found(1, connect, bob, 100.6)
    forwards = [x for x in actions if isinstance(x, Forward)]
    assert len(forwards) == 1 and forwards[0].expires_in > 0
    delivered = b.deliver(Forward.decode("B", forwards[0].encode()), 100.6)
    punch = frames(delivered, 7)[0]
    assert isinstance(punch, Punch) and punch.peer_id == "alice"
    return a, b, punch, forwards


def carried(actions: list[Action], node: str) -> list[Forward]:
    """The Forward actions of ``actions``, as the node they go to receives them (through their encoding)."""
    return [Forward.decode(node, x.encode()) for x in actions if isinstance(x, Forward) and x.node == node]


def test_a_result_at_the_other_node_ends_the_session_at_its_node() -> None:
    a, b, punch, _ = two_nodes()
    assert len(a.sessions) == 1 and punch.session_id in b.registry.get("bob").sessions  # type: ignore[union-attr]
    direct = encode_message(Result(punch.session_id, Outcome.DIRECT))
    reports = carried(b.data_received(7, direct, 100.9), "A")
    assert len(reports) == 1 and reports[0].way is Way.FROM_PEER and reports[0].origin == "B"
    assert b.stats.results == {"direct": 1} and b.stats.outcomes == {}  # B only passes it on
    assert punch.session_id not in b.registry.get("bob").sessions  # type: ignore[union-attr]
    for report in reports:
        assert a.deliver(report, 100.9) == []
    assert len(a.sessions) == 1  # one side reported: the session stays open
    a.data_received(1, direct, 101.0)
    assert a.sessions == {} and a.registry.get("alice").sessions == set()  # type: ignore[union-attr]
    assert a.stats.outcomes == {("direct", "unknown/unknown"): 1}
    assert sum(a.stats.connect_seconds) == 1 and a.stats.connect_seconds_sum > 0
    # A RESULT from a peer that is not the session's remote side changes nothing.
    stray = Forward("A", "mallory", direct, Way.FROM_PEER, "B", punch.session_id)
    assert a.deliver(stray, 101.1) == []


def test_a_remote_peer_that_gives_up_or_leaves_ends_the_session_and_its_partner_hears_cancel() -> None:
    for leave in (False, True):
        a, b, punch, _ = two_nodes()
        if leave:
            actions = b.connection_lost(7, 101.0)
        else:
            actions = b.data_received(7, encode_message(Result(punch.session_id, Outcome.ABANDONED)), 101.0)
        reports = carried(actions, "A")
        assert len(reports) == 1
        told = a.deliver(reports[0], 101.0)
        cancels = frames(told, 1)
        assert len(cancels) == 1 and isinstance(cancels[0], Cancel) and cancels[0].session_id == punch.session_id
        assert a.sessions == {}


def test_a_punch_for_a_peer_gone_from_its_node_is_answered_with_abandoned() -> None:
    a, b, punch, forwards = two_nodes()
    b.connection_lost(7, 100.7)
    answer = carried(b.deliver(Forward.decode("B", forwards[0].encode()), 100.8), "A")
    assert len(answer) == 1 and answer[0].way is Way.FROM_PEER
    told = frames(a.deliver(answer[0], 100.8), 1)
    assert told == [Cancel(punch.session_id, "peer 'bob' gave up: not registered at its node")]
    assert a.sessions == {}


def test_routes_expire_with_the_session() -> None:
    _, b, punch, forwards = two_nodes()
    bob = b.registry.get("bob")
    assert bob is not None and punch.session_id in bob.sessions
    b.tick(100.6 + forwards[0].expires_in + 0.01)
    assert b.registry.get("bob") is bob and punch.session_id not in bob.sessions
    late = encode_message(Result(punch.session_id, Outcome.DIRECT))
    assert carried(b.data_received(7, late, 200.0), "A") == []


def test_claims_fail_closed_while_the_registry_is_unreachable() -> None:
    proto = node_a()
    register(proto, 1, "alice")
    assert next(type(m) for m in frames(proto.claim_result(1, ClaimAnswer.GRANTED, 100.1), 1)) is Registered
    assert proto.claim_result(1, ClaimAnswer.UNAVAILABLE, 100.2) == []  # held: a failed refresh changes nothing
    assert proto.registry.get("alice") is not None
    register(proto, 2, "bob")
    actions = proto.claim_result(2, ClaimAnswer.UNAVAILABLE, 100.3)
    [error] = frames(actions, 2)
    assert (getattr(error, "code", None), getattr(error, "fatal", None)) == ("cluster-unavailable", True)
    assert proto.registry.get("bob") is None and Release("bob") in actions
    connect = Connect("r3", "carol")
    [answer] = frames(proto.remote_found(1, connect, None, 100.4, unavailable=True), 1)
    assert (getattr(answer, "code", None), getattr(answer, "fatal", None)) == ("cluster-unavailable", False)
    assert proto.conn_state(1) is not None and proto.registry.get("alice") is not None


def test_a_peer_at_its_session_limit_is_not_handed_a_punch_from_another_node() -> None:
    a, b, first, _ = two_nodes(b_max_sessions=1)
    connect = Connect("r2", "bob")
    a.data_received(1, encode_message(connect), 101.0)
    bob = b.remote_view(b.registry.get("bob"))  # type: ignore[arg-type]
    [second] = [x for x in a.remote_found(1, connect, bob, 101.0) if isinstance(x, Forward)]
    delivered = b.deliver(Forward.decode("B", second.encode()), 101.0)
    assert frames(delivered, 7) == []  # bob (one open session, the limit) never sees it
    [report] = carried(delivered, "A")
    told = frames(a.deliver(report, 101.0), 1)
    assert told == [Cancel(second.session_id, "peer 'bob' gave up: busy (1 open sessions)")]
    assert list(a.sessions) == [first.session_id]
