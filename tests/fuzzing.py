"""Hypothesis properties of every parser that reads bytes from the network (issue 9, "Fuzzing").

Each property feeds a parser untrusted input and accepts only its declared error type; anything else
raised is a bug. ``tests/unit/test_fuzz_parsers.py`` runs them briefly in ``make test``;
``scripts/fuzz_parsers.py`` runs at least 10,000 examples each and prints the counts.

Targets: the coordinator's framing and message decoder (``wire/framing.py``, ``wire/coord.py``), the
coordinator state machine fed whole connections (REGISTER, RELAY joins, garbage), the client side of a
relay join (exact-size frame reads), the STUN codec over UDP (``parse_message``) and TCP
(``StunStreamDecoder``) with the server's answer path, and the punch handshake (``punch/handshake.py``).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcppunch.coordinator.auth import Tokens
from tcppunch.coordinator.protocol import CoordinatorConfig, CoordinatorProtocol, Send
from tcppunch.coordinator.stun_service import StunServiceConfig, answer_binding, fit_response
from tcppunch.punch.handshake import HELLO_SIZE, Handshake, Role
from tcppunch.wire.coord import _DECODERS, decode_message, encode_message, relay_proof
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.framing import PREAMBLE, FrameDecoder, ProtocolError
from tcppunch.wire.stun import MAGIC_COOKIE_BYTES, StunParseError, StunStreamDecoder, parse_message
from tcppunch.wire.stun import encode_message as stun_encode

# ------------------------------------------------------------------------------------- strategies

MESSAGE_TYPES = ["register", "registered", "ping", "pong", "list", "peers", "observed", "connect", "punch",
                 "result", "cancel", "relay", "relay-ok", "expose", "exposed", "visitor", "error"]
FIELDS = ["address", "advice_reason", "birthday", "code", "deadline_ms", "details", "fatal", "fire_in_ms", "id",
          "ipv6", "keepalive_interval", "keepalive_timeout", "key", "message", "nat", "observed", "outcome",
          "peer", "peer_id", "peer_ipv6", "peer_nat", "peer_observed", "peer_private", "private", "proof",
          "reason", "relay", "relay_advice", "relay_only", "remote_port", "request_id", "role", "seq",
          "session_id", "swarm", "token", "truncated", "verdict", "version", "visitor", "visitor_id", "peers"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
    st.text(st.characters(categories=["Cs", "Cc"]), min_size=1, max_size=4),
    st.sampled_from(["tok", "alice", "bob", "initiator", "responder", "127.0.0.1", "::1", "example.org",
                     "endpoint-independent", "direct", "abandoned", "00" * 16, "00" * 32, "\x00", "\ud800"]),
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
endpoint_like = st.fixed_dictionaries({"ip": json_values | st.sampled_from(["10.0.0.1", "::1", "host.example"]),
                                       "port": json_values | st.integers(-1, 70000)})
nat_like = st.fixed_dictionaries({}, optional={
    "udp": json_values | st.fixed_dictionaries({"nat_type": json_values}),
    "tcp": json_values | st.dictionaries(st.sampled_from(["mapping", "filtering", "port_preservation",
                                                          "port_delta", "unsolicited_syn", "hairpin"]),
                                         json_values, max_size=6),
    "public": json_values | endpoint_like,
    "local": json_values | st.lists(json_values, max_size=20),
    "behind_nat": json_values,
    "verdict": json_values,
    "untested": json_values | st.lists(json_values, max_size=20),
})
field_values = st.one_of(json_values, endpoint_like, st.lists(endpoint_like, max_size=4), nat_like)
# any code point: lone surrogates (which JSON can carry as \ud800) and control characters too
any_text = st.text(max_size=12) | st.text(st.characters(categories=["Cs", "Cc"]), min_size=1, max_size=4)
ids = st.sampled_from(["alice", "bob", "a.b-c", "x" * 64]) | any_text
hex_of = lambda n: st.binary(min_size=n, max_size=n).map(bytes.hex) | any_text  # noqa: E731
good_ip = st.sampled_from(["203.0.113.5", "10.0.0.2", "2001:db8::1", "::1", "0.0.0.0"])
good_endpoint = st.fixed_dictionaries({"ip": good_ip, "port": st.integers(0, 65535)})
# Mostly well-formed values per field name (so decoders get past their first check), often not.
VALUES = {
    "id": ids, "peer": ids, "peer_id": ids, "visitor_id": ids, "token": any_text, "swarm": st.none() | any_text,
    "request_id": any_text, "session_id": any_text, "message": any_text, "reason": any_text, "code": any_text,
    "advice_reason": any_text, "verdict": any_text,
    "seq": st.integers(-1, 2**54), "version": st.integers(0, 70000), "fire_in_ms": st.integers(-1, 10**7),
    "deadline_ms": st.integers(-1, 10**7), "remote_port": st.integers(-1, 70000),
    "keepalive_interval": st.floats(-1, 100), "keepalive_timeout": st.floats(-1, 100),
    "key": hex_of(32), "proof": hex_of(32),
    "role": st.sampled_from(["initiator", "responder"]), "outcome": st.sampled_from(["direct", "relay", "abandoned"]),
    "relay_advice": st.sampled_from(["punch", "relay-now"]),
    "fatal": st.booleans(), "truncated": st.booleans(), "relay_only": st.booleans(), "birthday": st.booleans(),
    "observed": good_endpoint, "peer_observed": good_endpoint, "relay": good_endpoint, "address": good_endpoint,
    "private": st.lists(good_endpoint, max_size=3), "ipv6": st.lists(good_endpoint, max_size=3),
    "peer_private": st.lists(good_endpoint, max_size=3), "peer_ipv6": st.lists(good_endpoint, max_size=3),
    "nat": st.none() | nat_like, "peer_nat": st.none() | nat_like,
    "details": st.dictionaries(st.sampled_from(["reason", "x"]), json_values, max_size=2),
}


# Each message type's own fields (from the decoders), so that most frames get far into their decoder.
FIELDS_BY_TYPE = {kind: [f.name for f in dataclasses.fields(decoder.__self__)]  # type: ignore[attr-defined]
                  for kind, decoder in _DECODERS.items()}


@st.composite
def frame_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A frame object: a known (or not) type with its own fields, mostly well-formed (so decoders get
    to their deeper checks), sometimes missing, extra or of any JSON shape."""
    kind = draw(st.sampled_from(MESSAGE_TYPES) | json_values)
    obj: dict[str, Any] = {"type": kind}
    own = FIELDS_BY_TYPE.get(kind, []) if isinstance(kind, str) else []
    careful = draw(st.integers(0, 9)) < 7
    names = own if careful and own else (draw(st.lists(st.sampled_from(own), unique=True)) if own else [])
    names = [*names, *draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True))]
    for name in names:
        good = VALUES.get(name, field_values)
        obj[name] = draw(good if careful and name in own else good | field_values)
    return obj


def frame_bytes(obj: Any) -> bytes:
    payload = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return struct.pack("!I", len(payload)) + payload


# Byte streams for the framing layer: raw garbage, and frames around garbage or structured payloads.
frame_streams = st.one_of(
    st.binary(max_size=200),
    st.lists(st.one_of(st.binary(max_size=40), frame_objects().map(frame_bytes),
                       st.binary(max_size=60).map(lambda p: struct.pack("!I", len(p)) + p)), max_size=5).map(b"".join),
)


@st.composite
def stun_messages(draw: st.DrawFn) -> bytes:
    """STUN-shaped bytes: a plausible header (sometimes lying about its length) and TLV attributes."""
    msg_type = draw(st.sampled_from([0x0001, 0x0011, 0x0101, 0x0111, 0x0002]) | st.integers(0, 0xFFFF))
    cookie = draw(st.just(MAGIC_COOKIE_BYTES) | st.binary(min_size=4, max_size=4))
    tid = draw(st.binary(min_size=12, max_size=12))
    attributes = b""
    for _ in range(draw(st.integers(0, 6))):
        attr_type = draw(st.sampled_from([0x0001, 0x0003, 0x0004, 0x0005, 0x0009, 0x000A, 0x0020, 0x0026,
                                          0x8022, 0x8028, 0x802B, 0x802C, 0x8055, 0x8056]) | st.integers(0, 0xFFFF))
        value = draw(st.binary(max_size=28))
        attributes += struct.pack("!HH", attr_type, len(value)) + value + b"\x00" * (-len(value) % 4)
    length = draw(st.just(len(attributes)) | st.integers(0, 0xFFFF))
    return struct.pack("!HH", msg_type, length) + cookie + tid + attributes


stun_bytes = st.one_of(st.binary(max_size=120), stun_messages())


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given offsets (arrival in arbitrary pieces)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


# -------------------------------------------------------------------------------------- properties


def coord_messages(obj: dict[str, Any]) -> None:
    """decode_message: ProtocolError only; what it accepts can always be encoded again."""
    try:
        message = decode_message(obj)
    except ProtocolError:
        return
    encode_message(message)


def coord_framing(data: bytes, expect_preamble: bool, cuts: list[int]) -> None:
    """FrameDecoder (+ decode_message on each frame): ProtocolError only, whatever the chunking."""
    decoder = FrameDecoder(expect_preamble=expect_preamble)
    try:
        for chunk in chunked(data, cuts):
            decoder.feed(chunk)
            while (frame := decoder.next_frame()) is not None:
                coord_messages(frame)
    except ProtocolError:
        return


SERVER = Endpoint("198.51.100.10", 3478)
FUZZ_CONFIG = CoordinatorConfig(max_unauthenticated_per_source=4, auth_failure_burst=3)


def coord_protocol(streams: list[bytes], cuts: list[int]) -> None:
    """CoordinatorProtocol fed whole connections (preamble + REGISTER/RELAY/anything): it never raises,
    and everything it sends decodes as frames."""
    proto = CoordinatorProtocol(Tokens(shared="tok"), FUZZ_CONFIG, random_bytes=lambda n: b"\x01" * n)
    now = 100.0
    for conn, stream in enumerate(streams, start=1):
        actions = proto.connection_made(conn, Endpoint("203.0.113.5", 40000 + conn), SERVER, now)
        for chunk in chunked(stream, cuts):
            now += 0.5
            actions += proto.data_received(conn, chunk, now)
            actions += proto.tick(now)
        _check_sends(actions)
    _check_sends(proto.tick(now + 1000.0))


def _check_sends(actions: list[Any]) -> None:
    decoders: dict[int, FrameDecoder] = {}
    for action in actions:
        if isinstance(action, Send):
            decoder = decoders.setdefault(action.conn, FrameDecoder())
            decoder.feed(action.data)
            while (frame := decoder.next_frame()) is not None:
                decode_message(frame)


# Connections for coord_protocol: a REGISTER (right or wrong token) or a RELAY join, then anything.
relay_join = st.builds(
    lambda sid, role, good, tail: PREAMBLE + frame_bytes({
        "type": "relay", "session_id": sid, "role": role,
        "proof": (relay_proof(b"\x01" * 32, sid, Role(role)) if good and role in ("initiator", "responder")
                  else b"\x00" * 32).hex()}) + tail,
    st.sampled_from(["01" * 16, "ab"]), st.sampled_from(["initiator", "responder", "x"]), st.booleans(),
    st.binary(max_size=30))
register = st.builds(
    lambda peer, token, extra, tail: PREAMBLE + frame_bytes({"type": "register", "id": peer, "token": token,
                                                              **extra}) + tail,
    st.sampled_from(["alice", "bob", "x y"]), st.sampled_from(["tok", "nope"]),
    st.dictionaries(st.sampled_from(["nat", "private", "swarm", "ipv6"]), field_values, max_size=3),
    st.lists(frame_objects().map(frame_bytes) | st.binary(max_size=20), max_size=3).map(b"".join))
connections = st.lists(st.one_of(register, relay_join, frame_streams.map(lambda d: PREAMBLE + d), frame_streams),
                       min_size=1, max_size=4)


def relay_join_client(data: bytes) -> None:
    """The client side of a relay join: exact-size reads (FrameDecoder.missing) until one frame, then
    decode: ProtocolError only, and never a read past the frame."""
    decoder = FrameDecoder()
    rest = data
    try:
        while (frame := decoder.next_frame()) is None:
            want = decoder.missing()
            assert want > 0
            if not rest:
                return
            decoder.feed(rest[:want])
            rest = rest[want:]
        decode_message(frame)
    except ProtocolError:
        return


STUN_CONFIG = StunServiceConfig("198.51.100.10", 3478, alternate_address="198.51.100.11")


def stun_udp(data: bytes) -> None:
    """parse_message (UDP): StunParseError only; the server's answer to what parses always encodes, and
    its fitted answer is never larger than the request."""
    try:
        request = parse_message(data)
    except StunParseError:
        return
    here = Endpoint("198.51.100.10", 3478)
    response = answer_binding(request, STUN_CONFIG, Endpoint("203.0.113.5", 4000), here, here)
    if response is not None:
        fitted = fit_response(response, len(data))
        assert fitted is None or len(stun_encode(fitted)) <= len(data)


def stun_tcp(data: bytes, cuts: list[int]) -> None:
    """StunStreamDecoder (TCP): StunParseError only; after an error that keeps framing, it reads on."""
    decoder = StunStreamDecoder()
    for chunk in chunked(data, cuts):
        decoder.receive_data(chunk)
        while True:
            try:
                if decoder.next_message() is None:
                    break
            except StunParseError:
                if decoder.failed:
                    return


def handshake(data: bytes, role: str, cuts: list[int]) -> None:
    """Handshake.receive_data: never raises, whatever arrives; it never consumes past its messages."""
    local = Handshake(role=Role(role), session_id="s" * 32, key=b"k" * 32, nonce=b"n" * 16)
    total = 0
    for chunk in chunked(data, cuts):
        local.receive_data(chunk)
        total += len(chunk)
    assert len(local.leftover) <= total


@st.composite
def handshake_bytes(draw: st.DrawFn) -> bytes:
    """A real peer's HELLO (and SELECT) with some bytes flipped, or garbage."""
    peer = Handshake(role=Role.INITIATOR, session_id="s" * 32, key=b"k" * 32, nonce=b"m" * 16)
    real = bytearray(peer.hello())
    for _ in range(draw(st.integers(0, 3))):
        real[draw(st.integers(0, HELLO_SIZE - 1))] = draw(st.integers(0, 255))
    return bytes(real) + draw(st.binary(max_size=60))


# ------------------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class Target:
    name: str
    strategies: dict[str, st.SearchStrategy[Any]]
    check: Callable[..., None]


cuts = st.lists(st.integers(0, 400), max_size=6)
TARGETS = [
    Target("coordinator messages (wire/coord.py)", {"obj": frame_objects()}, coord_messages),
    Target("coordinator framing (wire/framing.py)",
           {"data": frame_streams, "expect_preamble": st.booleans(), "cuts": cuts}, coord_framing),
    Target("coordinator state machine (REGISTER, RELAY joins, garbage)",
           {"streams": connections, "cuts": cuts}, coord_protocol),
    Target("relay join, client side (exact-size frame reads)", {"data": frame_streams}, relay_join_client),
    Target("STUN over UDP (parse_message + answer)", {"data": stun_bytes}, stun_udp),
    Target("STUN over TCP (StunStreamDecoder)", {"data": stun_bytes, "cuts": cuts}, stun_tcp),
    Target("punch handshake (punch/handshake.py)",
           {"data": handshake_bytes() | st.binary(max_size=150),
            "role": st.sampled_from(["initiator", "responder"]), "cuts": cuts}, handshake),
]


def run(target: Target, examples: int) -> int:
    """Run ``target`` for ``examples`` examples (Hypothesis may stop earlier when it has seen every
    input it can make); return how many ran. A failure raises with the smallest input found."""
    count = 0

    def body(**kwargs: Any) -> None:
        nonlocal count
        count += 1
        target.check(**kwargs)

    test = settings(max_examples=examples, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))(given(**target.strategies)(body))
    test()
    return count
