"""The secure channel on loopback socket pairs: both directions, wrong keys, swapped sessions, leaving
TLS after a relay join without losing or reordering the bytes that follow."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcppunch.session.identity import Identity, KeyMismatch
from tcppunch.session.secure import (
    BIND_MAGIC,
    Binding,
    ChannelSpec,
    SecureError,
    SecureErrorCode,
    TlsEngine,
    _split_binding,
    context,
    engine_handshake,
    engine_recv,
    engine_unwrap,
    expect_key,
    secure_streams,
)

ALICE, BOB, EVE = Identity.generate(), Identity.generate(), Identity.generate()


def spec(me: Identity, role: str, own: str, other: str, expected: str, session: str = "s1") -> ChannelSpec:
    return ChannelSpec(me, session, role, own, other, expect_key(expected, f"peer {other!r}"))


async def both(a: ChannelSpec, b: ChannelSpec) -> list[object]:
    left, right = socket.socketpair()
    return await asyncio.gather(secure_streams(left, a, timeout=5), secure_streams(right, b, timeout=5),
                                return_exceptions=True)


def test_streams_carry_bytes_both_ways_and_name_the_keys() -> None:
    asyncio.run(_test_streams_carry_bytes_both_ways_and_name_the_keys())


async def _test_streams_carry_bytes_both_ways_and_name_the_keys() -> None:
    a, b = await both(spec(ALICE, "initiator", "alice", "bob", BOB.fingerprint),
                      spec(BOB, "responder", "bob", "alice", ALICE.fingerprint))
    assert not isinstance(a, BaseException) and not isinstance(b, BaseException)
    (ar, aw, ainfo), (br, bw, binfo) = a, b  # type: ignore[misc]
    assert ainfo.peer_key == BOB.fingerprint and binfo.peer_key == ALICE.fingerprint
    assert ainfo.version == "TLSv1.3"
    payload = bytes(range(256)) * 4096

    async def send() -> None:
        aw.write(payload)
        await aw.drain()

    _, got = await asyncio.gather(send(), br.readexactly(len(payload)))
    assert got == payload
    bw.write(b"pong")
    await bw.drain()
    assert await ar.readexactly(4) == b"pong"
    for w in (aw, bw):
        w.close()


def test_wrong_key_is_refused_by_the_pinning_side_before_any_data() -> None:
    asyncio.run(_test_wrong_key_is_refused_by_the_pinning_side_before_any_data())


async def _test_wrong_key_is_refused_by_the_pinning_side_before_any_data() -> None:
    # alice expects bob's key, but the other end is eve (who would accept alice).
    a, b = await both(spec(ALICE, "initiator", "alice", "bob", BOB.fingerprint),
                      spec(EVE, "responder", "bob", "alice", ALICE.fingerprint))
    assert isinstance(a, SecureError) and a.code is SecureErrorCode.KEY_MISMATCH
    assert BOB.fingerprint in str(a) and EVE.fingerprint in str(a)
    assert a.expected == BOB.fingerprint and a.actual == EVE.fingerprint
    # eve never got alice's BIND (nor anything after it): it fails waiting for it.
    assert isinstance(b, SecureError) and b.code is SecureErrorCode.SESSION_MISMATCH


def test_responder_refuses_an_unexpected_initiator() -> None:
    asyncio.run(_test_responder_refuses_an_unexpected_initiator())


async def _test_responder_refuses_an_unexpected_initiator() -> None:
    a, b = await both(spec(EVE, "initiator", "alice", "bob", BOB.fingerprint),
                      spec(BOB, "responder", "bob", "alice", ALICE.fingerprint))
    assert isinstance(b, SecureError) and b.code is SecureErrorCode.KEY_MISMATCH
    await _refused_at_first_read(a)


async def _refused_at_first_read(result: object) -> None:
    """The initiator returns after one round trip; a refusal by the responder ends its first read."""
    if isinstance(result, SecureError):
        return
    reader, writer, _ = result  # type: ignore[misc]
    with pytest.raises(ConnectionResetError, match="no secure channel"):
        await asyncio.wait_for(reader.read(), 5)
    writer.close()


def test_connection_from_another_session_cannot_be_swapped_in() -> None:
    asyncio.run(_test_connection_from_another_session_cannot_be_swapped_in())


async def _test_connection_from_another_session_cannot_be_swapped_in() -> None:
    a, b = await both(spec(ALICE, "initiator", "alice", "bob", BOB.fingerprint, session="s1"),
                      spec(BOB, "responder", "bob", "alice", ALICE.fingerprint, session="s2"))
    assert isinstance(b, SecureError) and b.code is SecureErrorCode.SESSION_MISMATCH
    assert "s1" in str(b) and "s2" in str(b)
    await _refused_at_first_read(a)


async def _test_initiator_checks_the_responders_bind_before_its_reader_gets_a_byte() -> None:
    """The responder is honest about a session the initiator did not ask for: the initiator's reader
    never yields the bytes that follow that BIND."""
    left, right = socket.socketpair()
    bob = spec(BOB, "responder", "bob", "alice", ALICE.fingerprint, session="s1")
    liar = ChannelSpec(BOB, "s1", "responder", "bob", "alice", bob.verify)
    a, b = await asyncio.gather(secure_streams(left, spec(ALICE, "initiator", "alice", "bob", BOB.fingerprint,
                                                          session="s1")),
                                secure_streams(right, liar))
    (ar, aw, _), (_, bw, _) = a, b
    assert await _echo_ok(ar, aw, bw)
    # a second pair where the responder's BIND names another purpose: refused at the initiator's read
    left, right = socket.socketpair()
    odd = ChannelSpec(BOB, "s1", "responder", "bob", "alice", bob.verify, purpose="other")
    c, d = await asyncio.gather(secure_streams(left, spec(ALICE, "initiator", "alice", "bob", BOB.fingerprint,
                                                          session="s1")),
                                secure_streams(right, odd), return_exceptions=True)
    assert isinstance(d, SecureError)  # the responder refuses the initiator's BIND (purpose differs)
    await _refused_at_first_read(c)


def test_initiator_checks_the_responders_bind_before_its_reader_gets_a_byte() -> None:
    asyncio.run(_test_initiator_checks_the_responders_bind_before_its_reader_gets_a_byte())


async def _echo_ok(ar: asyncio.StreamReader, aw: asyncio.StreamWriter, bw: asyncio.StreamWriter) -> bool:
    bw.write(b"from bob")
    got = await asyncio.wait_for(ar.readexactly(8), 5)
    aw.close()
    bw.close()
    return got == b"from bob"


def test_two_initiators_fail_cleanly() -> None:
    asyncio.run(_test_two_initiators_fail_cleanly())


async def _test_two_initiators_fail_cleanly() -> None:
    a, b = await both(spec(ALICE, "initiator", "alice", "bob", BOB.fingerprint),
                      spec(BOB, "initiator", "bob", "alice", ALICE.fingerprint))
    assert isinstance(a, SecureError) and isinstance(b, SecureError)


def test_half_close_each_direction_ends_on_its_own() -> None:
    asyncio.run(_test_half_close_each_direction_ends_on_its_own())


async def _test_half_close_each_direction_ends_on_its_own() -> None:
    """write_eof sends close_notify: the other side reads EOF and can still answer (netcat semantics)."""
    a, b = await both(spec(ALICE, "initiator", "alice", "bob", BOB.fingerprint),
                      spec(BOB, "responder", "bob", "alice", ALICE.fingerprint))
    (ar, aw, _), (br, bw, _) = a, b  # type: ignore[misc]
    request = os.urandom(300_000)
    aw.write(request)
    aw.write_eof()
    assert await br.read() == request  # read() to EOF: the close_notify arrived
    bw.write(b"answer after your EOF")
    bw.write_eof()
    assert await ar.read() == b"answer after your EOF"
    for w in (aw, bw):
        w.close()


def test_a_cut_connection_is_an_error_not_an_eof() -> None:
    asyncio.run(_test_a_cut_connection_is_an_error_not_an_eof())


async def _test_a_cut_connection_is_an_error_not_an_eof() -> None:
    """A FIN without close_notify (someone cut the TCP stream) must not look like a clean end."""
    left, right = socket.socketpair()
    results = await asyncio.gather(
        secure_streams(left, spec(ALICE, "initiator", "alice", "bob", BOB.fingerprint)),
        secure_streams(right, spec(BOB, "responder", "bob", "alice", ALICE.fingerprint)))
    (ar, aw, _), (_, bw, _) = results
    bw.write(b"partial")
    await bw.drain()
    right_raw = bw.get_extra_info("socket")
    right_raw.shutdown(socket.SHUT_WR)  # a bare FIN, no close_notify
    assert await ar.readexactly(7) == b"partial"
    with pytest.raises(ConnectionError):
        await ar.read()
    aw.close()
    bw.close()


def test_engine_leaves_tls_and_keeps_the_bytes_that_follow() -> None:
    asyncio.run(_test_engine_leaves_tls_and_keeps_the_bytes_that_follow())


async def _test_engine_leaves_tls_and_keeps_the_bytes_that_follow() -> None:
    """A relay join: TLS, RELAY-OK inside it, both close_notify, then plain bytes on the same socket."""
    client_sock, server_sock = socket.socketpair()
    client_sock.setblocking(False)
    server_sock.setblocking(False)
    server = TlsEngine(context(BOB, server_side=True), server_side=True)
    client = TlsEngine(context(ALICE, server_side=False), server_side=False)

    async def server_side() -> bytes:
        fp = await engine_handshake(server, server_sock, expect_key(ALICE.fingerprint, "joiner"))
        assert fp == ALICE.fingerprint
        server.write(b"relay-ok")
        return await engine_unwrap(server, server_sock)

    async def client_side() -> bytes:
        loop = asyncio.get_running_loop()
        await engine_handshake(client, client_sock, expect_key(BOB.fingerprint, "coordinator"))
        assert await engine_recv(client, client_sock) == b"relay-ok"
        leftover = await engine_unwrap(client, client_sock)
        await loop.sock_sendall(client_sock, b"plain after tls")
        return leftover

    server_left, client_left = await asyncio.wait_for(asyncio.gather(server_side(), client_side()), 10)
    assert client_left == b""
    loop = asyncio.get_running_loop()
    data = server_left
    while len(data) < len(b"plain after tls"):
        data += await loop.sock_recv(server_sock, 100)
    assert data == b"plain after tls"
    client_sock.close()
    server_sock.close()


def test_expect_key_names_both() -> None:
    with pytest.raises(KeyMismatch) as info:
        expect_key(BOB.fingerprint, "x")(EVE.fingerprint)
    assert info.value.expected == BOB.fingerprint and info.value.actual == EVE.fingerprint


@given(st.binary(max_size=2048))
def test_bind_parsing_of_any_bytes_is_a_binding_nothing_yet_or_a_secure_error(data: bytes) -> None:
    """Whatever the other side sends inside TLS before its BIND, the parser answers with a binding, 'not
    complete yet' (None) or SecureError; nothing else escapes."""
    for candidate in (data, BIND_MAGIC + data, BIND_MAGIC + struct.pack("!H", len(data)) + data):
        try:
            result = _split_binding(candidate)
        except SecureError:
            continue
        assert result is None or isinstance(result[0], Binding)
