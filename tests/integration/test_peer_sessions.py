"""One session per pair of peers through the real Peer API on loopback (a real coordinator): many
parallel streams cost one punch, dedicated connect() still works beside them, a dead session is set
up again on demand and its streams hear why."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from typing import Any

import pytest

from tcppunch.peer import Peer, RelayMode
from tcppunch.session.driver import MuxStream
from tcppunch.session.mux import SessionClosedError
from tests.loopback import loopback_coordinator

TOKEN = "sessions-secret"


def _stages() -> tuple[Counter[str], Any]:
    seen: Counter[str] = Counter()

    def on_stage(name: str, data: dict[str, Any]) -> None:
        seen[name] += 1

    return seen, on_stage


async def _serve_echo(peer: Peer) -> None:
    """Answer every stream with the SHA-256 of what it got, then the bytes reversed."""

    async def serve(stream: MuxStream) -> None:
        body = await stream.read()
        stream.write(hashlib.sha256(body).digest() + body[::-1])
        stream.write_eof()
        await stream.drain()

    tasks = set()
    while True:
        try:
            stream = await peer.accept_stream()
        except ConnectionError:
            return
        task = asyncio.ensure_future(serve(stream))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def _fetch(peer: Peer, other: str, body: bytes) -> None:
    stream = await peer.open_stream(other, body[:100])
    for i in range(100, len(body), 200_000):
        stream.write(body[i : i + 200_000])
        await stream.drain()
    stream.write_eof()
    answer = await stream.read()
    assert answer[:32] == hashlib.sha256(body).digest()
    assert hashlib.sha256(answer[32:]).digest() == hashlib.sha256(body[::-1]).digest()
    assert stream.peer == other


@pytest.mark.parametrize("relay", [RelayMode.AUTO, RelayMode.ALWAYS])
def test_parallel_streams_share_one_session(relay: RelayMode) -> None:
    async def scenario() -> None:
        seen, on_stage = _stages()
        async with loopback_coordinator(TOKEN) as where, Peer(where, "bob", TOKEN) as bob, \
                Peer(where, "alice", TOKEN, relay=relay, on_stage=on_stage) as alice:
            server = asyncio.ensure_future(_serve_echo(bob))
            bodies = [os.urandom(500_000 + 1000 * i) for i in range(24)]
            await asyncio.gather(*(_fetch(alice, "bob", body) for body in bodies))
            assert seen["schedule"] == 1  # one coordinator request for 24 streams
            assert seen["session"] == 1
            (entry,) = alice.sessions()
            assert entry.to_json()["method"] == ("relay" if relay is RelayMode.ALWAYS else "direct")
            # a dedicated connection still works beside the session
            outgoing, incoming = await asyncio.gather(alice.connect("bob"), bob.accept(timeout=15))
            outgoing.writer.write(b"dedicated")
            outgoing.writer.write_eof()
            assert await incoming.reader.read() == b"dedicated"
            outgoing.close()
            incoming.close()
            server.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_dead_session_fails_its_streams_and_is_set_up_again() -> None:
    async def scenario() -> None:
        seen, on_stage = _stages()
        async with loopback_coordinator(TOKEN) as where, Peer(where, "bob", TOKEN) as bob, \
                Peer(where, "alice", TOKEN, on_stage=on_stage) as alice:
            stream = await alice.open_stream("bob", b"first")
            far = await bob.accept_stream(timeout=15)
            assert await far.readexactly(5) == b"first"
            (entry,) = alice.sessions()
            entry.session._writer.transport.abort()  # the path dies under the session
            with pytest.raises(SessionClosedError, match="session lost"):
                await stream.read()
            again = await alice.open_stream("bob", b"second")  # on demand: a new session
            far = await bob.accept_stream(timeout=15)
            assert await far.readexactly(6) == b"second"
            assert seen["session"] == 2
            again.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_both_peers_opening_at_once_each_get_their_streams_through() -> None:
    async def scenario() -> None:
        async with loopback_coordinator(TOKEN) as where, Peer(where, "bob", TOKEN) as bob, \
                Peer(where, "alice", TOKEN) as alice:
            to_bob, to_alice = await asyncio.gather(alice.open_stream("bob", b"hi bob"),
                                                    bob.open_stream("alice", b"hi alice"))
            at_bob, at_alice = await asyncio.gather(bob.accept_stream(timeout=15), alice.accept_stream(timeout=15))
            assert await at_bob.readexactly(6) == b"hi bob" and at_bob.peer == "alice"
            assert await at_alice.readexactly(8) == b"hi alice" and at_alice.peer == "bob"
            # later streams go on the session each side holds; both sides serve both sessions
            again = await alice.open_stream("bob", b"again")
            assert await (await bob.accept_stream(timeout=15)).readexactly(5) == b"again"
            for stream in (to_bob, to_alice, again):
                stream.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
