"""Closing a session loses nothing: the bytes a sender wrote before ``write_eof`` and ``close`` all reach
a reader that is slow (not dead), and a session cut before a stream's FIN is an error, never a short EOF.

The reproduction of the lossy-lab data loss (10 MB sent, 9.7 MB received, both exit 0): the sender
closed its socket while the receiver's bytes (here: a small answer) were unread on its side, so the kernel
answered them with a RST and dropped the sender's unsent tail."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket

import pytest

from tcppunch.cli.pipes import StreamCutError, pipe_stdio
from tcppunch.session.driver import CLOSE_DRAIN_TIMEOUT, MuxStream, Session
from tcppunch.session.identity import Identity
from tcppunch.session.mux import SessionClosedError
from tcppunch.session.secure import ChannelSpec, expect_key, secure_streams
from tcppunch.wire.coord import Role

from .test_session_loopback import Leg, run_async, sha, tcp_pair

SIZE = 900_000  # below the stream window (1 MiB): all of it leaves the multiplexer without a grant


class GatedReader:
    """The receiver's transport reader, held shut while ``gate`` is clear: its kernel buffer stays full and
    the sender's last bytes wait in the sender's kernel send queue, as behind a slow lossy link."""

    def __init__(self, inner: asyncio.StreamReader, gate: asyncio.Event) -> None:
        self._inner = inner
        self.gate = gate

    async def read(self, n: int = -1) -> bytes:
        await self.gate.wait()
        return await self._inner.read(n)


def _buffers(out: socket.socket, into: socket.socket) -> None:
    """A big send buffer on the sender, a small receive buffer on the receiver: most bytes sit in the
    sender's kernel when it closes."""
    out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 << 20)
    into.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)


async def _tls_pair() -> tuple[Leg, Leg]:
    """Both ends of one loopback TCP connection, under the peers' TLS channel (as between two peers)."""
    alice, bob = Identity.generate(), Identity.generate()
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        far, _ = server.accept()
    _buffers(client, far)
    to_bob = ChannelSpec(alice, "s1", "initiator", "alice", "bob", expect_key(bob.fingerprint, "bob"))
    to_alice = ChannelSpec(bob, "s1", "responder", "bob", "alice", expect_key(alice.fingerprint, "alice"))
    a, b = await asyncio.gather(secure_streams(client, to_bob), secure_streams(far, to_alice))
    return (a[0], a[1]), (b[0], b[1])


async def _plain_pair() -> tuple[Leg, Leg]:
    sender_leg, receiver_leg = await tcp_pair()
    _buffers(sender_leg[1].get_extra_info("socket"), receiver_leg[1].get_extra_info("socket"))
    return sender_leg, receiver_leg


async def _gated_pair(tls: bool) -> tuple[Session, Session, asyncio.Event]:
    sender_leg, receiver_leg = await (_tls_pair() if tls else _plain_pair())
    gate = asyncio.Event()
    gate.set()
    gated = GatedReader(receiver_leg[0], gate)
    sender = Session(*sender_leg, Role.INITIATOR)
    receiver = Session(gated, receiver_leg[1], Role.RESPONDER)  # type: ignore[arg-type]
    return sender, receiver, gate


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@run_async
async def test_close_right_after_eof_delivers_every_byte_to_a_slow_reader(tls: bool) -> None:
    sender, receiver, gate = await _gated_pair(tls)
    payload = os.urandom(SIZE)
    # The receiver opens the stream: its SYN grants the sender the whole window at once.
    theirs = await receiver.open_stream(b"")
    ours = await asyncio.wait_for(sender.accept_stream(), 5)
    gate.clear()  # the receiver stops reading its socket

    async def send_and_close() -> None:
        ours.write(payload)
        ours.write_eof()
        await sender.close()

    closing = asyncio.ensure_future(send_and_close())
    await asyncio.wait_for(sender._closed.wait(), 5)  # GO_AWAY is out: the sender is closing its socket
    gate.set()
    theirs.write(b"answer")  # bytes towards the closing sender, as a listener's stdin or window updates
    received = await asyncio.wait_for(theirs.read(), 10)
    assert len(received) == SIZE
    assert sha(received) == hashlib.sha256(payload).hexdigest()
    await asyncio.wait_for(closing, CLOSE_DRAIN_TIMEOUT + 5)
    assert sender.close_error is None
    await asyncio.wait_for(receiver.wait_closed(), CLOSE_DRAIN_TIMEOUT + 5)


@run_async
async def test_a_session_cut_before_the_fin_is_an_error_not_eof() -> None:
    (a_reader, a_writer), b_leg = await tcp_pair()
    a = Session(a_reader, a_writer, Role.INITIATOR)
    b = Session(*b_leg, Role.RESPONDER)
    stream = await a.open_stream(b"first bytes")
    theirs: MuxStream = await asyncio.wait_for(b.accept_stream(), 5)
    assert await theirs.readexactly(11) == b"first bytes"
    a_writer.transport.abort()  # a RST: no FIN, no GO_AWAY
    try:
        tail = await asyncio.wait_for(theirs.read(), 5)
    except SessionClosedError as exc:
        assert "connection lost" in str(exc) or "hung up" in str(exc)
    else:
        raise AssertionError(f"a cut stream read as a clean EOF after {len(tail)} more bytes")
    del stream
    await asyncio.wait_for(b.wait_closed(), 5)


@run_async
async def test_netcat_pipe_fails_with_the_byte_count_when_the_stream_is_cut() -> None:
    (a_reader, a_writer), b_leg = await tcp_pair()
    a = Session(a_reader, a_writer, Role.INITIATOR)
    b = Session(*b_leg, Role.RESPONDER)
    await a.open_stream(b"12345")
    theirs = await asyncio.wait_for(b.accept_stream(), 5)
    sink = io.BytesIO()
    a_writer.transport.abort()  # the opening frame (with its 5 bytes) is in; then a RST instead of a FIN
    with pytest.raises(StreamCutError, match="cut after 5 bytes received"):
        await asyncio.wait_for(pipe_stdio(theirs, theirs, io.BytesIO(b""), sink), 5)
    assert sink.getvalue() == b"12345"
    await asyncio.wait_for(b.wait_closed(), 5)
