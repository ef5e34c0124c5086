"""The core's cluster hooks without Redis: claims before REGISTERED, lookups, forwarded PUNCH and CANCEL."""

from __future__ import annotations

import itertools

from tcppunch.coordinator.auth import Tokens
from tcppunch.coordinator.directory import Claim, Forward, LookupPeer, Release, RemotePeer
from tcppunch.coordinator.protocol import Action, CoordinatorProtocol, Send
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


def node_a() -> CoordinatorProtocol:
    counter = itertools.count(1)
    return CoordinatorProtocol(Tokens(shared="tok"), node="A", random_bytes=lambda n: bytes([next(counter)]) * n)


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
    granted = proto.claim_result(1, True, 100.1)
    assert next(type(m) for m in frames(granted, 1)) is Registered
    assert proto.claim_result(1, True, 100.2) == []  # a second answer changes nothing
    refused = register(proto, 2, "bob")
    actions = proto.claim_result(2, False, 100.3)
    error = frames(actions, 2)[0]
    assert getattr(error, "code", None) == "id-taken"
    assert proto.registry.get("bob") is None
    assert any(isinstance(a, Release) and a.peer_id == "bob" for a in actions + refused)


def test_connect_to_a_peer_of_another_node_forwards_its_punch() -> None:
    proto = node_a()
    register(proto, 1, "alice")
    proto.claim_result(1, True, 100.0)
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
    proto.claim_result(1, True, 100.0)
    connect = Connect("r2", "nobody")
    error = frames(proto.remote_found(1, connect, None, 100.1), 1)[0]
    assert getattr(error, "code", None) == "unknown-peer"
    data = encode_message(Cancel("s", "why"))
    assert proto.deliver("alice", data) == [Send(1, data)]
    assert proto.deliver("carol", data) == []


def test_nat_labels_for_metrics() -> None:
    from tcppunch.coordinator.protocol import nat_label
    from tcppunch.wire.natreport import FilteringBehaviour, MappingBehaviour, NatReport, TcpBehaviour

    assert nat_label(None) == "unknown"
    assert nat_label(NatReport(behind_nat=False)) == "open"
    report = NatReport(tcp=TcpBehaviour(mapping=MappingBehaviour.ENDPOINT_INDEPENDENT,
                                        filtering=FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT), behind_nat=True)
    assert nat_label(report) == "eim-apdf"
