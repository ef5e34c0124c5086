"""The embedding API end to end on loopback: a real coordinator + STUN, two Peers, bytes both ways."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tcppunch.coordinator.auth import Tokens
from tcppunch.coordinator.control import ControlChannel
from tcppunch.coordinator.server import CoordinatorServer
from tcppunch.peer import BlockingPeer, ConnectFailed, Connection, Method, Peer, RelayMode
from tcppunch.session.secure import SecureError
from tcppunch.wire.coord import Outcome
from tcppunch.wire.endpoint import Endpoint
from tests.loopback import SERVER_IDENTITY, free_port, loopback_coordinator

TOKEN = "loopback-secret"



def coordinator() -> contextlib.AbstractAsyncContextManager[Endpoint]:
    return loopback_coordinator(TOKEN)


async def _exchange(a: Connection, b: Connection, size: int) -> tuple[bool, bool]:
    up, down = os.urandom(size), os.urandom(size)

    async def send(conn: Connection, data: bytes) -> None:
        conn.writer.write(data)
        await conn.writer.drain()
        conn.writer.write_eof()

    _, _, at_b, at_a = await asyncio.gather(send(a, up), send(b, down), b.reader.read(), a.reader.read())
    for c in (a, b):
        c.close()
    return hashlib.sha256(at_b).digest() == hashlib.sha256(up).digest(), at_a == down


def test_connect_direct_and_accept_carry_bytes_both_ways() -> None:
    async def scenario() -> None:
        async with coordinator() as where, Peer(where, "bob", TOKEN) as bob, Peer(where, "alice", TOKEN) as alice:
            assert alice.nat is not None and alice.nat.behind_nat is False
            outgoing, incoming = await asyncio.gather(alice.connect("bob"), bob.accept(timeout=15))
            assert outgoing.method is incoming.method is Method.DIRECT
            assert outgoing.peer == "bob" and incoming.peer == "alice"
            assert outgoing.remote == incoming.local and incoming.remote == outgoing.local
            assert outgoing.info.timings["total"] > 0
            assert await _exchange(outgoing, incoming, 2_000_000) == (True, True)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_relay_always_goes_through_the_coordinator() -> None:
    async def scenario() -> None:
        async with coordinator() as where, Peer(where, "bob", TOKEN, detect_nat=False) as bob, \
                Peer(where, "alice", TOKEN, detect_nat=False) as alice:
            outgoing = await alice.connect("bob", relay=RelayMode.ALWAYS)
            incoming = await bob.accept(timeout=15)
            assert outgoing.method is Method.RELAY
            assert outgoing.remote == where  # the relay is the coordinator itself
            assert outgoing.info.relay_reason is not None and "relay requested" in outgoing.info.relay_reason
            # the other side was told too: it went straight to the relay without punching
            assert incoming.method is Method.RELAY and incoming.info.attempts == ()
            assert incoming.info.relay_reason is not None and "asked for the relay" in incoming.info.relay_reason
            assert await _exchange(outgoing, incoming, 1_000_000) == (True, True)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_unknown_peer_is_a_clear_failure_and_the_peer_keeps_working() -> None:
    async def scenario() -> None:
        async with coordinator() as where, Peer(where, "bob", TOKEN, detect_nat=False) as bob, \
                Peer(where, "alice", TOKEN, detect_nat=False) as alice:
            with pytest.raises(ConnectFailed, match="unknown-peer") as failed:
                await alice.connect("carol")
            assert failed.value.code == "unknown-peer"
            ids = {p.id for p in await alice.list_peers()}
            assert "bob" in ids
            conn = await alice.connect("bob")
            got = await bob.accept(timeout=15)
            assert await _exchange(conn, got, 1000) == (True, True)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_wrong_token_is_refused() -> None:
    async def scenario() -> None:
        async with coordinator() as where:
            peer = Peer(where, "mallory", "not-the-token", detect_nat=False)
            with pytest.raises(Exception, match="bad-token"):
                await peer.start()
            await peer.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


@contextlib.contextmanager
def coordinator_thread() -> Iterator[Endpoint]:
    """The coordinator on its own loop in a thread, for the blocking API."""
    ready: concurrent.futures.Future[Endpoint] = concurrent.futures.Future()
    stop = threading.Event()

    async def main() -> None:
        async with coordinator() as where:
            ready.set_result(where)
            while not stop.is_set():
                await asyncio.sleep(0.05)

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    try:
        yield ready.result(10)
    finally:
        stop.set()
        thread.join(10)


def test_blocking_peer_hands_out_plain_sockets() -> None:
    payload = os.urandom(500_000)
    with coordinator_thread() as where, BlockingPeer(where, "bob", TOKEN, detect_nat=False) as bob, \
            BlockingPeer(where, "alice", TOKEN, detect_nat=False) as alice:
        result: dict[str, bytes] = {}

        def serve() -> None:
            sock, info = bob.accept(timeout=20)
            result["method"] = info.method.value.encode()
            with sock:
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                result["got"] = data
                sock.sendall(hashlib.sha256(data).digest())

        server = threading.Thread(target=serve)
        server.start()
        sock, info = alice.connect("bob")
        assert isinstance(sock, socket.socket) and info.method is Method.DIRECT
        with sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            digest = sock.recv(64)
        server.join(20)
        assert result["got"] == payload
        assert result["method"] == b"direct"
        assert digest == hashlib.sha256(payload).digest()


def test_a_peer_that_gives_up_stops_the_other_side_at_once() -> None:
    """The initiator abandons the session: the responder stops punching instead of waiting for the
    deadline and then for a relay partner who will never come."""

    async def scenario() -> dict[str, object]:
        failed: asyncio.Queue[dict[str, object]] = asyncio.Queue()

        def on_stage(stage: str, data: dict[str, object]) -> None:
            if stage == "incoming_failed":
                failed.put_nowait(data)

        async with coordinator() as where, \
                Peer(where, "bob", TOKEN, detect_nat=False, relay=RelayMode.NEVER, on_stage=on_stage), \
                ControlChannel(where, "alice", TOKEN) as alice:
            order = await alice.connect("bob")  # bob starts punching towards alice, who never fires
            await alice.report_result(order.session_id, Outcome.ABANDONED)
            # well inside bob's punch window (6 s): the CANCEL stopped him
            return await asyncio.wait_for(failed.get(), 3)

    data = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert data["code"] == "cancelled"
    assert data["peer"] == "alice"


def test_accept_filter_refuses_before_any_punch_and_the_caller_hears_it() -> None:
    async def scenario() -> tuple[str, str, list[str], bool]:
        refused: list[str] = []

        def only_friends(peer_id: str, nat: object) -> bool:
            return peer_id == "friend"

        def on_stage(stage: str, data: dict[str, object]) -> None:
            if stage == "refused":
                refused.append(str(data["peer"]))

        async with coordinator() as where, \
                Peer(where, "bob", TOKEN, detect_nat=False, accept_filter=only_friends, on_stage=on_stage) as bob, \
                Peer(where, "stranger", TOKEN, detect_nat=False) as stranger, \
                Peer(where, "friend", TOKEN, detect_nat=False) as friend:
            with pytest.raises(ConnectFailed) as failed:
                await stranger.connect("bob", timeout=10)
            conn = await friend.connect("bob", timeout=10)
            got = await bob.accept(timeout=10)
            ok = got.peer == "friend" and conn.method is Method.DIRECT
            conn.close()
            got.close()
            listed = await friend.list_peers()
            assert listed.truncated is False and {p.id for p in listed} >= {"bob", "stranger"}
            return failed.value.code, str(failed.value), refused, ok

    code, message, refused, ok = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert code == "cancelled" and "refused" in message
    assert refused == ["stranger"]
    assert ok


def test_peers_register_again_after_the_coordinator_restarts() -> None:
    async def scenario() -> tuple[Method, int]:
        registered: asyncio.Queue[str] = asyncio.Queue()

        def on_stage(name: str) -> Callable[[str, dict[str, object]], None]:
            def record(stage: str, data: dict[str, object]) -> None:
                if stage == "registered":
                    registered.put_nowait(name)

            return record

        port = free_port()
        tokens = Tokens(shared=TOKEN)
        # a restarted coordinator keeps its key (peers would refuse another: known-peers file)
        first = CoordinatorServer("127.0.0.1", port, tokens, identity=SERVER_IDENTITY)
        await first.start()
        where = Endpoint("127.0.0.1", port)
        async with Peer(where, "bob", TOKEN, detect_nat=False, on_stage=on_stage("bob")) as bob, \
                Peer(where, "alice", TOKEN, detect_nat=False, on_stage=on_stage("alice")) as alice:
            assert {await registered.get(), await registered.get()} == {"alice", "bob"}
            await first.stop()  # both control connections drop
            second = CoordinatorServer("127.0.0.1", port, tokens, identity=SERVER_IDENTITY)
            await second.start()
            try:
                again = {await asyncio.wait_for(registered.get(), 20), await asyncio.wait_for(registered.get(), 20)}
                assert again == {"alice", "bob"}
                conn = await alice.connect("bob", timeout=15)
                got = await bob.accept(timeout=15)
                conn.writer.write(b"after the restart")
                conn.writer.write_eof()
                data = await got.reader.read()
                conn.close()
                got.close()
                return conn.method, len(data)
            finally:
                await second.stop()

    method, size = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert method is Method.DIRECT
    assert size == len(b"after the restart")


@contextlib.asynccontextmanager
async def cut_first(target: Endpoint, cuts: int) -> AsyncIterator[tuple[Endpoint, list[int]]]:
    """A TCP forwarder to ``target`` on loopback that ends its first ``cuts`` connections after the
    client's first bytes (the coordinator closing a TLS handshake that missed its hello deadline under
    loss), and forwards the rest; yields its address and the count of connections it cut."""
    cut: list[int] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(cut) < cuts:
            cut.append(len(cut) + 1)
            await reader.read(1)  # the ClientHello began
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(target.ip, target.port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield Endpoint("127.0.0.1", server.sockets[0].getsockname()[1]), cut


def test_a_registration_broken_off_mid_tls_is_tried_again_within_the_start_budget() -> None:
    async def scenario() -> None:
        stages: list[tuple[str, dict[str, object]]] = []
        async with coordinator() as where, cut_first(where, 2) as (front, cut), \
                Peer(front, "carol", TOKEN, detect_nat=False,
                     on_stage=lambda name, data: stages.append((name, data))) as carol:
            assert len(cut) == 2
            retries = [data for name, data in stages if name == "start_retry"]
            assert [r["attempt"] for r in retries] == [1, 2], stages
            assert all("closed" in str(r["error"]) or "reset" in str(r["error"]).lower() for r in retries)
            assert [name for name, _ in stages].count("registered") == 1
            assert await carol.ping() >= 0  # the registration is live

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_spent_connect_budget_is_not_tried_again() -> None:
    async def scenario() -> None:
        stages: list[str] = []
        port = free_port()  # nobody listens: refused at once, an answer
        peer = Peer(Endpoint("127.0.0.1", port), "dave", TOKEN, detect_nat=False,
                    on_stage=lambda name, data: stages.append(name))
        with pytest.raises(ConnectionRefusedError):
            await peer.start()
        await peer.close()
        assert "start_retry" not in stages

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_session_keepalive_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="session_keepalive"):
        Peer(Endpoint("127.0.0.1", 3478), "erin", TOKEN, session_keepalive=(0.0, 3.0))


def test_coordinator_by_host_name_is_resolved_and_its_key_known_under_the_name(tmp_path: Path) -> None:
    """A host name (here ``localhost``, from /etc/hosts) stands for its addresses; the coordinator's key
    is recorded under the name, so every address of it is held to that key."""
    known = tmp_path / "known_peers"

    async def scenario() -> None:
        async with coordinator() as where:
            name = f"localhost:{where.port}"
            async with Peer(name, "bob", TOKEN, detect_nat=False, known_peers=known) as bob, \
                    Peer(where, "alice", TOKEN, detect_nat=False, known_peers=None) as alice:
                assert bob.coordinator == where and bob.coordinators[0] == where
                outgoing, incoming = await asyncio.gather(alice.connect("bob"), bob.accept(timeout=15))
                assert await _exchange(outgoing, incoming, 200_000) == (True, True)
            entries = dict(line.split() for line in known.read_text().splitlines())
            assert f"coordinator:{name}" in entries and f"coordinator:{where}" not in entries
            # a pin that the coordinator does not hold ends start() before registering
            with pytest.raises(SecureError, match="--coordinator-key"):
                async with Peer(name, "carol", TOKEN, detect_nat=False, known_peers=None,
                                coordinator_key="A" * 32):
                    pass

    asyncio.run(asyncio.wait_for(scenario(), 60))
