"""Coordinator wire format: preamble, framing (whole, byte by byte, trailing data), every message shape."""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcppunch.wire.coord import (
    Cancel,
    Connect,
    Error,
    ErrorCode,
    Expose,
    Exposed,
    ListPeers,
    Message,
    Outcome,
    PeerInfo,
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
    Visitor,
    decode_message,
    encode_message,
    message_to_json,
    relay_proof,
)
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.framing import (
    MAX_FRAME_SIZE,
    PREAMBLE,
    FrameDecoder,
    ProtocolError,
    encode_frame,
)
from tcppunch.wire.natreport import MappingBehaviour, NatReport, TcpBehaviour
from tcppunch.wire.stun import looks_like_stun

NAT = NatReport(tcp=TcpBehaviour(mapping=MappingBehaviour.ENDPOINT_INDEPENDENT, port_delta=1), verdict="ok")
EP = Endpoint("198.51.100.7", 40000)

ALL_MESSAGES: list[Message] = [
    Register("alice", "s3cret", NAT, (Endpoint("10.0.1.2", 5000),), "room"),
    Register("bob", "t", None, (), None),
    Register("carol", "t", None, (), None, (Endpoint("2001:db8:1::2", 5000), Endpoint("2001:db8::159", 5000))),
    Register("carol", "t", None, (), None, birthday=False),
    Registered("alice", EP, 5.0, 15.0),
    Ping(0),
    Pong(2**40),
    ListPeers("r1", None),
    ListPeers("r2", "room"),
    Peers("r1", (PeerInfo("bob", None, {"mapping": None}, "direct likely"),), truncated=True),
    Connect("r3", "bob"),
    Punch(
        session_id="ab" * 16,
        key=bytes(range(32)),
        role=Role.INITIATOR,
        peer_id="bob",
        peer_observed=EP,
        peer_private=(Endpoint("10.0.2.2", 6000), Endpoint("fd00::2", 6000)),
        peer_nat=NAT,
        fire_in_ms=35,
        deadline_ms=6035,
        relay=Endpoint("198.51.100.10", 3478),
        relay_advice=RelayAdvice.PUNCH,
        request_id="r3",
        peer_ipv6=(Endpoint("2001:db8:2::2", 6000),),
    ),
    Result("ab" * 16, Outcome.DIRECT, {"attempts": 3}),
    Cancel("ab" * 16, "peer left"),
    Relay("ab" * 16, Role.RESPONDER, b"\x01" * 32),
    RelayOk("ab" * 16),
    Expose("r4", 8080),
    Exposed("r4", 8080, Endpoint("198.51.100.10", 8080)),
    Visitor("cd" * 16, bytes(range(32)), 8080, EP, Endpoint("198.51.100.10", 8080), Endpoint("198.51.100.10", 3478)),
    Error("bad-token", "wrong token", True, None),
    Error("unknown-peer", "no such peer", False, "r3"),
]


def _frames(data: bytes, decoder: FrameDecoder) -> list[dict[str, Any]]:
    decoder.feed(data)
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda m: m.TYPE)
def test_every_message_round_trips(message: Message) -> None:
    (frame,) = _frames(encode_message(message), FrameDecoder())
    assert frame["type"] == message.TYPE
    assert decode_message(frame) == message


def test_preamble_is_never_stun_and_stun_is_recognised() -> None:
    assert PREAMBLE == b"TPUNCH\x00\x01"
    assert not looks_like_stun(PREAMBLE)
    stun_binding_request = bytes.fromhex("0001 0000 2112a442".replace(" ", "")) + bytes(12)
    assert looks_like_stun(stun_binding_request[:8])
    assert not looks_like_stun(stun_binding_request[:7])


@given(st.binary(min_size=8, max_size=8))
def test_no_prefix_is_both_stun_and_preamble(prefix: bytes) -> None:
    assert not (looks_like_stun(prefix) and prefix.startswith(b"TPUNCH"))


def test_whole_buffer_byte_by_byte_and_trailing_data_give_the_same_frames() -> None:
    stream = PREAMBLE + b"".join(encode_message(m) for m in ALL_MESSAGES)
    whole = _frames(stream, FrameDecoder(expect_preamble=True))
    assert [decode_message(f) for f in whole] == ALL_MESSAGES

    decoder = FrameDecoder(expect_preamble=True)
    one_by_one: list[dict[str, Any]] = []
    for i in range(len(stream)):
        one_by_one += _frames(stream[i : i + 1], decoder)
    assert one_by_one == whole

    # a complete frame followed by half of the next: one frame now, the rest waits in the buffer
    first, second = encode_message(Ping(1)), encode_message(Ping(2))
    decoder = FrameDecoder()
    assert _frames(first + second[:5], decoder) == [message_to_json(Ping(1))]
    assert decoder.buffered == 5
    assert _frames(second[5:], decoder) == [message_to_json(Ping(2))]
    assert decoder.take_rest() == b""


@given(st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=40))
@settings(max_examples=60)
def test_any_chunking_gives_the_same_frames(cuts: list[int]) -> None:
    stream = PREAMBLE + b"".join(encode_message(m) for m in ALL_MESSAGES)
    decoder = FrameDecoder(expect_preamble=True)
    got: list[dict[str, Any]] = []
    pos, i = 0, 0
    while pos < len(stream):
        size = cuts[i % len(cuts)]
        got += _frames(stream[pos : pos + size], decoder)
        pos, i = pos + size, i + 1
    assert [decode_message(f) for f in got] == ALL_MESSAGES


def _error(data: bytes, *, expect_preamble: bool = False) -> ProtocolError:
    decoder = FrameDecoder(expect_preamble=expect_preamble)
    with pytest.raises(ProtocolError) as info:
        _frames(data, decoder)
    # a failed decoder stays failed and buffers nothing more
    decoder.feed(b"x" * 100)
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError):
        decoder.next_frame()
    return info.value


def test_bad_preamble_is_refused_at_the_first_wrong_byte() -> None:
    assert _error(b"G", expect_preamble=True).code == "bad-preamble"
    assert _error(b"TPX", expect_preamble=True).code == "bad-preamble"
    decoder = FrameDecoder(expect_preamble=True)
    assert _frames(b"TPUN", decoder) == []  # a correct prefix just waits


def test_other_version_is_unsupported() -> None:
    err = _error(b"TPUNCH\x00\x02", expect_preamble=True)
    assert err.code == "unsupported-version"
    assert "2" in err.message


def test_oversize_frame_is_refused_from_its_header_alone() -> None:
    err = _error(struct.pack("!I", MAX_FRAME_SIZE + 1))
    assert err.code == "frame-too-large"
    assert FrameDecoder().next_frame() is None
    # exactly the limit is fine
    payload = json.dumps({"type": "ping", "seq": 1, "pad": ""}).encode()
    pad = MAX_FRAME_SIZE - len(payload)
    big = json.dumps({"type": "ping", "seq": 1, "pad": "x" * pad}).encode()
    assert len(big) == MAX_FRAME_SIZE
    (frame,) = _frames(struct.pack("!I", len(big)) + big, FrameDecoder())
    assert frame["seq"] == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1, 2]",
        b'"text"',
        b'{"seq": 1}',
        b'{"type": 5}',
        b'{"type": "ping", "seq": NaN}',
        b"\xff\xfe{}",
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_malformed_payloads_are_bad_frames(payload: bytes) -> None:
    assert _error(struct.pack("!I", len(payload)) + payload).code == "bad-frame"


def test_empty_frame_is_bad() -> None:
    assert _error(struct.pack("!I", 0)).code == "bad-frame"


def test_encoder_refuses_what_the_decoder_would_refuse() -> None:
    with pytest.raises(ValueError):
        encode_frame({"type": "ping", "pad": "x" * MAX_FRAME_SIZE})


def test_unknown_type() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_message({"type": "teleport"})
    assert info.value.code == "unknown-type"


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "register", "token": "t"},  # missing id
        {"type": "register", "id": "has space", "token": "t"},
        {"type": "register", "id": "x" * 65, "token": "t"},
        {"type": "register", "id": "a", "token": 5},
        {"type": "register", "id": "a", "token": "t", "private": "10.0.0.1:5"},
        {"type": "register", "id": "a", "token": "t", "private": [{"ip": "10.0.0.1", "port": 70000}]},
        {"type": "register", "id": "a", "token": "t", "private": [{"ip": "10.0.0.1", "port": 1}] * 17},
        {"type": "register", "id": "a", "token": "t", "nat": {"tcp": {"mapping": "sideways"}}},
        {"type": "register", "id": "a", "token": "t", "nat": {"tcp": {"port_allocation": "lucky"}}},
        {"type": "register", "id": "a", "token": "t", "nat": {"tcp": {"port_allocation": ["random"]}}},
        {"type": "register", "id": "a", "token": "t", "nat": []},
        {"type": "register", "id": "a", "token": "t", "nat": {"verdict": "v" * 20000}},
        {"type": "register", "id": "a", "token": "t", "birthday": "no"},
        {"type": "connect", "request_id": "r", "peer": "b", "relay_only": 1},
        {"type": "ping", "seq": True},
        {"type": "ping", "seq": -1},
        {"type": "ping", "seq": 1.5},
        {"type": "connect", "request_id": "r", "peer": ""},
        {"type": "relay", "session_id": "s", "role": "boss", "proof": "00" * 32},
        {"type": "relay", "session_id": "s", "role": "initiator", "proof": "zz" * 32},
        {"type": "relay", "session_id": "s", "role": "initiator", "proof": "00" * 31},
        {"type": "result", "session_id": "s", "outcome": "maybe"},
        {"type": "result", "session_id": "s", "outcome": "direct", "details": []},
        {"type": "error", "code": "x", "message": "y", "fatal": "yes"},
        {"type": "expose", "request_id": "r", "remote_port": 0},
        {"type": "expose", "request_id": "r", "remote_port": 65536},
    ],
)
def test_bad_fields_are_reported_by_name(obj: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_message(obj)
    assert info.value.code == ErrorCode.BAD_FIELD
    assert "field '" in info.value.message


@given(st.binary(max_size=300))
@settings(max_examples=200)
def test_random_bytes_only_ever_raise_protocol_errors(data: bytes) -> None:
    decoder = FrameDecoder(expect_preamble=True)
    decoder.feed(PREAMBLE + data)
    try:
        while (frame := decoder.next_frame()) is not None:
            decode_message(frame)
    except ProtocolError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)


@given(
    st.sampled_from(sorted({m.TYPE for m in ALL_MESSAGES})),
    st.dictionaries(
        st.sampled_from(["id", "token", "seq", "peer", "request_id", "session_id", "role", "proof", "key", "nat"]),
        json_values,
    ),
)
@settings(max_examples=300)
def test_random_objects_only_ever_raise_protocol_errors(kind: str, fields: dict[str, Any]) -> None:
    with contextlib.suppress(ProtocolError):
        decode_message({"type": kind, **fields})


def test_relay_proof_binds_key_session_and_role() -> None:
    key = bytes(32)
    proof = relay_proof(key, "s1", Role.INITIATOR)
    assert len(proof) == 32
    assert proof == relay_proof(key, "s1", Role.INITIATOR)
    assert proof != relay_proof(key, "s1", Role.RESPONDER)
    assert proof != relay_proof(key, "s2", Role.INITIATOR)
    assert proof != relay_proof(b"\x01" * 32, "s1", Role.INITIATOR)


@pytest.mark.parametrize("ip", ["fe80::1", "::1", "fd00::2", "::ffff:198.51.100.7", "ff02::1", "::", "10.0.1.2"])
def test_ipv6_candidates_must_be_routable_ipv6(ip: str) -> None:
    frame = message_to_json(Register("carol", "t", ipv6=(Endpoint(ip, 5000),)))
    with pytest.raises(ProtocolError, match="ipv6"):
        decode_message(frame)


def test_ipv6_candidates_are_optional_and_canonical() -> None:
    frame = message_to_json(Register("carol", "t"))
    del frame["ipv6"]
    assert decode_message(frame) == Register("carol", "t")
    frame["ipv6"] = [{"ip": "2001:DB8:0:0::2", "port": 1}]
    assert decode_message(frame) == Register("carol", "t", ipv6=(Endpoint("2001:db8::2", 1),))


@pytest.mark.parametrize("ipv6", [{"address": "example.com"}, {"works": "yes"}, {"detail": 5}, "on"])
def test_nat_report_ipv6_part_is_checked(ipv6: object) -> None:
    frame = message_to_json(Register("carol", "t", NAT))
    frame["nat"]["ipv6"] = ipv6
    with pytest.raises(ProtocolError, match=r"ipv6|works"):
        decode_message(frame)


def test_register_without_birthday_field_takes_part_in_birthday_punching() -> None:
    message = decode_message({"type": "register", "id": "a", "token": "t"})
    assert isinstance(message, Register) and message.birthday is True
