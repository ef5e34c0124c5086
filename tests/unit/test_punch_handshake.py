"""The verification handshake, driven through a fake network (pairs of Handshake objects wired together)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcppunch.punch.handshake import (
    HELLO_SIZE,
    SELECT_SIZE,
    Handshake,
    HandshakeEvent,
    HandshakeState,
    PeerVerified,
    Rejected,
    SelectReceived,
)
from tcppunch.punch.plan import Role

KEY = bytes(range(32))
SID = "sess-42"

Chunker = Callable[[bytes], Iterator[bytes]]


def whole(data: bytes) -> Iterator[bytes]:
    yield data


def byte_by_byte(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i : i + 1]


def odd_chunks(data: bytes) -> Iterator[bytes]:
    i, n = 0, 1
    while i < len(data):
        yield data[i : i + n]
        i += n
        n = n * 2 + 1


CHUNKERS = [whole, byte_by_byte, odd_chunks]


def make(role: Role, *, key: bytes = KEY, sid: str = SID) -> Handshake:
    return Handshake(role=role, session_id=sid, key=key, nonce=os.urandom(16))


def feed(hs: Handshake, data: bytes, chunker: Chunker) -> list[HandshakeEvent]:
    events: list[HandshakeEvent] = []
    for chunk in chunker(data):
        events.extend(hs.receive_data(chunk))
    return events


class ConnectionPair:
    """Two handshakes joined by a fake connection that delivers bytes in chosen chunks."""

    def __init__(self, a: Handshake, b: Handshake, chunker: Chunker) -> None:
        self.a, self.b, self.chunker = a, b, chunker

    def exchange_hellos(self) -> tuple[list[HandshakeEvent], list[HandshakeEvent]]:
        return feed(self.a, self.b.hello(), self.chunker), feed(self.b, self.a.hello(), self.chunker)


@pytest.mark.parametrize("chunker", CHUNKERS)
def test_full_handshake_and_selection(chunker: Chunker) -> None:
    ini, res = make(Role.INITIATOR), make(Role.RESPONDER)
    pair = ConnectionPair(ini, res, chunker)
    ev_i, ev_r = pair.exchange_hellos()
    assert ev_i == [PeerVerified()] and ev_r == [PeerVerified()]
    assert ini.bytes_needed == 0  # the initiator expects nothing more
    assert res.bytes_needed == SELECT_SIZE
    select = ini.select()
    assert len(select) == SELECT_SIZE and ini.state is HandshakeState.SELECTED
    assert feed(res, select, chunker) == [SelectReceived()]
    assert res.state is HandshakeState.SELECTED and res.bytes_needed == 0
    assert res.leftover == b"" and ini.leftover == b""


def test_sizes_are_fixed() -> None:
    assert len(make(Role.INITIATOR).hello()) == HELLO_SIZE == 69
    assert len(make(Role.RESPONDER).hello()) == HELLO_SIZE


@pytest.mark.parametrize("chunker", CHUNKERS)
def test_trailing_application_data_is_kept(chunker: Chunker) -> None:
    ini, res = make(Role.INITIATOR), make(Role.RESPONDER)
    assert feed(ini, res.hello(), chunker) == [PeerVerified()]
    feed(res, ini.hello(), chunker)
    events = feed(res, ini.select() + b"app data", chunker)
    assert events == [SelectReceived()]
    assert res.leftover == b"app data"
    # and data after the responder's HELLO (after the SELECT, in real life) stays with the initiator
    assert ini.receive_data(b"reply") == [] and ini.leftover == b"reply"


def test_hello_and_select_in_one_buffer() -> None:
    ini, res = make(Role.INITIATOR), make(Role.RESPONDER)
    feed(ini, res.hello(), whole)
    assert res.receive_data(ini.hello() + ini.select()) == [PeerVerified(), SelectReceived()]


def test_same_role_is_rejected_both_ways() -> None:
    # after a simultaneous open both ends "called connect()": roles must come from the plan
    a, b = make(Role.INITIATOR), make(Role.INITIATOR)
    events = feed(a, b.hello(), whole)
    assert len(events) == 1 and isinstance(events[0], Rejected)
    assert "own role" in events[0].reason
    assert a.state is HandshakeState.REJECTED
    c, d = make(Role.RESPONDER), make(Role.RESPONDER)
    assert isinstance(feed(c, d.hello(), whole)[0], Rejected)


@pytest.mark.parametrize("chunker", CHUNKERS)
def test_wrong_key_is_rejected(chunker: Chunker) -> None:
    ini, stranger = make(Role.INITIATOR), make(Role.RESPONDER, key=b"k" * 32)
    events = feed(ini, stranger.hello(), chunker)
    assert events == [Rejected("bad HELLO MAC: the peer does not know the session key")]


def test_wrong_session_is_rejected() -> None:
    ini, other = make(Role.INITIATOR), make(Role.RESPONDER, sid="another")
    events = feed(ini, other.hello(), whole)
    assert events == [Rejected("HELLO is for a different session")]


@pytest.mark.parametrize("chunker", CHUNKERS)
def test_garbage_is_rejected_early(chunker: Chunker) -> None:
    hs = make(Role.RESPONDER)
    events = feed(hs, b"GET / HTTP/1.1\r\n\r\n" + b"x" * 200, chunker)
    assert len(events) == 1 and isinstance(events[0], Rejected)
    assert hs.state is HandshakeState.REJECTED
    # a rejected handshake ignores everything after
    assert hs.receive_data(make(Role.INITIATOR).hello()) == []


def test_first_wrong_byte_rejects_without_waiting_for_a_full_message() -> None:
    hs = make(Role.INITIATOR)
    assert hs.receive_data(b"TP") == []
    assert isinstance(hs.receive_data(b"X")[0], Rejected)


def test_tampered_hello_is_rejected() -> None:
    ini, res = make(Role.INITIATOR), make(Role.RESPONDER)
    hello = bytearray(res.hello())
    hello[30] ^= 0x01  # inside the nonce: the MAC no longer matches
    assert isinstance(feed(ini, bytes(hello), whole)[0], Rejected)
    bad_role = bytearray(res.hello())
    bad_role[4] = ord("X")
    assert feed(make(Role.INITIATOR), bytes(bad_role), whole) == [Rejected("unknown role in HELLO")]


def test_reflected_hello_is_rejected() -> None:
    # a HELLO bounced back by a middlebox has our role: rejected as "own role"
    ini = make(Role.INITIATOR)
    assert isinstance(feed(ini, ini.hello(), whole)[0], Rejected)


def test_select_from_another_connection_is_rejected() -> None:
    ini1, res1 = make(Role.INITIATOR), make(Role.RESPONDER)
    ini2, res2 = make(Role.INITIATOR), make(Role.RESPONDER)
    for ini, res in ((ini1, res1), (ini2, res2)):
        ConnectionPair(ini, res, whole).exchange_hellos()
    # the SELECT made for connection 1 replayed on connection 2: the nonces differ
    assert res2.receive_data(ini1.select()) == [Rejected("bad SELECT MAC")]


def test_bad_select_magic() -> None:
    ini, res = make(Role.INITIATOR), make(Role.RESPONDER)
    ConnectionPair(ini, res, whole).exchange_hellos()
    assert res.receive_data(b"XXXX") == [Rejected("bad SELECT magic")]


def test_select_rules() -> None:
    res = make(Role.RESPONDER)
    with pytest.raises(RuntimeError):
        res.select()
    ini = make(Role.INITIATOR)
    with pytest.raises(RuntimeError):
        ini.select()  # not verified yet
    with pytest.raises(ValueError):
        Handshake(role=Role.INITIATOR, session_id=SID, key=KEY, nonce=b"short")


def test_bytes_needed_never_exceeds_message() -> None:
    ini, res = make(Role.INITIATOR), make(Role.RESPONDER)
    hello = res.hello()
    for i in range(len(hello)):
        assert ini.bytes_needed == HELLO_SIZE - i
        ini.receive_data(hello[i : i + 1])
    assert ini.state is HandshakeState.VERIFIED and ini.bytes_needed == 0


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), cut=st.integers(min_value=0, max_value=200), role=st.sampled_from(list(Role)))
def test_arbitrary_bytes_never_crash_and_never_verify(data: bytes, cut: int, role: Role) -> None:
    hs = make(role)
    events = hs.receive_data(data[:cut]) + hs.receive_data(data[cut:])
    assert all(isinstance(e, Rejected) for e in events)
    assert hs.state in (HandshakeState.AWAIT_HELLO, HandshakeState.REJECTED)
    assert 0 <= hs.bytes_needed <= HELLO_SIZE


@settings(max_examples=200, deadline=None)
@given(flip=st.integers(min_value=0, max_value=HELLO_SIZE * 8 - 1))
def test_any_single_bit_flip_in_hello_is_rejected(flip: int) -> None:
    ini, res = make(Role.INITIATOR), make(Role.RESPONDER)
    hello = bytearray(res.hello())
    hello[flip // 8] ^= 1 << (flip % 8)
    events = ini.receive_data(bytes(hello))
    assert len(events) == 1 and isinstance(events[0], Rejected)
