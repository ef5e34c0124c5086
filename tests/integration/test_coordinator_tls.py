"""The coordinator over real sockets: TLS or nothing, the token never in clear, the coordinator's key
checked before the token is sent, ids owned by keys across a reconnect."""

from __future__ import annotations

import asyncio

import pytest

from tcppunch.coordinator.control import CoordinatorError
from tcppunch.coordinator.server import CoordinatorServer
from tcppunch.session.identity import Identity
from tcppunch.session.secure import SecureError, SecureErrorCode, expect_key
from tcppunch.wire.coord import Error, ListPeers, Peers, Register, Registered, decode_message, encode_message
from tcppunch.wire.framing import PREAMBLE, FrameDecoder

from .test_coordinator import TOKEN, channel, raw_session, run, tls_connection, with_server


def test_register_in_clear_gets_tls_required_and_is_not_registered() -> None:
    async def body(server: CoordinatorServer) -> None:
        messages = await raw_session(server, PREAMBLE + encode_message(Register("alice", TOKEN)))
        assert [(m.code, m.fatal) for m in messages if isinstance(m, Error)] == [("tls-required", True)]
        assert server.protocol.registry.get("alice") is None

    run(with_server(body))


def test_a_coordinator_with_another_key_never_sees_the_token() -> None:
    async def body(server: CoordinatorServer) -> None:
        wrong = Identity.generate().fingerprint
        alice = channel(server, "alice", verify_coordinator=expect_key(wrong, "the coordinator"))
        with pytest.raises(SecureError) as info:
            await alice.register()
        assert info.value.code is SecureErrorCode.KEY_MISMATCH
        assert wrong in str(info.value) and server.identity.fingerprint in str(info.value)
        assert server.protocol.stats.registrations == 0 and server.protocol.registry.get("alice") is None

    run(with_server(body))


def test_an_id_stays_with_its_key_after_its_owner_left() -> None:
    async def body(server: CoordinatorServer) -> None:
        bob_key, eve_key = Identity.generate(), Identity.generate()
        bob = channel(server, "bob", identity=bob_key)
        await bob.register()
        await bob.close()
        eve = channel(server, "bob", identity=eve_key)
        with pytest.raises(CoordinatorError) as info:
            await eve.register()
        assert info.value.code == "id-owned"
        again = channel(server, "bob", identity=bob_key)
        await again.register()  # the owner comes back
        await again.close()

    run(with_server(body))


def test_a_client_beyond_max_connections_hears_server_busy_in_the_language_it_speaks() -> None:
    """At the connection limit a TLS client gets ERROR server-busy inside TLS (a plaintext frame made its
    handshake fail), a plain-TCP client gets it in clear, and the peers already in are served on."""

    async def body(server: CoordinatorServer) -> None:
        async with channel(server, "alice") as alice, channel(server, "bob"):
            carol = channel(server, "carol")
            with pytest.raises(CoordinatorError) as info:
                await carol.register()
            assert (info.value.code, info.value.fatal) == ("server-busy", True), info.value
            assert "limit 2" in str(info.value)
            messages = await raw_session(server, PREAMBLE + encode_message(Register("dave", TOKEN)))
            assert [m.code for m in messages if isinstance(m, Error)] == ["server-busy"]
            assert await alice.list_peers() != []  # bob is listed: alice is still served
        async with channel(server, "carol") as carol_again:  # room again
            assert [p.id for p in await carol_again.list_peers()] == []
        assert server.protocol.registry.get("carol") is None

    run(with_server(body, max_connections=2))


def test_bursts_larger_than_the_tls_slices_arrive_whole_both_ways() -> None:
    """The driver moves TLS bytes in 4 KiB slices (a memory BIO keeps what it grew to): one write of
    REGISTER and 100 LISTs (~5 KB) is answered in full, and each PEERS answer (~7 KB) arrives intact."""

    async def body(server: CoordinatorServer) -> None:
        ids = sorted(f"{i:02d}-" + "x" * 60 for i in range(40))
        others = [channel(server, peer_id) for peer_id in ids]
        await asyncio.gather(*(c.register() for c in others))
        try:
            reader, writer = await tls_connection(server)
            lists = b"".join(encode_message(ListPeers(f"r{i}")) for i in range(100))
            assert len(lists) > 4096
            writer.write(PREAMBLE + encode_message(Register("asker", TOKEN)) + lists)
            decoder, answers = FrameDecoder(), []
            while len([m for m in answers if isinstance(m, Peers)]) < 100:
                chunk = await asyncio.wait_for(reader.read(1 << 16), 5.0)
                assert chunk, f"closed after {len(answers)} messages"
                decoder.feed(chunk)
                while (frame := decoder.next_frame()) is not None:
                    answers.append(decode_message(frame))
            assert isinstance(answers[0], Registered)
            peers = [m for m in answers if isinstance(m, Peers)]
            assert [m.request_id for m in peers] == [f"r{i}" for i in range(100)]
            assert all([p.id for p in m.peers] == ids and not m.truncated for m in peers)
            assert len(encode_message(peers[0])) > 4096
            writer.close()
        finally:
            await asyncio.gather(*(c.close() for c in others))

    run(with_server(body))
