"""The CLI's byte pipes on real loopback sockets: both directions, half-close, byte counts."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os

from tcppunch.cli.pipes import join_streams, pipe_stdio


async def _pair() -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter],
                           tuple[asyncio.StreamReader, asyncio.StreamWriter], asyncio.Server]:
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put((r, w))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await asyncio.open_connection("127.0.0.1", port)
    return client, await asyncio.wait_for(accepted.get(), 5), server


def test_stdio_pipe_sends_stdin_and_writes_peer_bytes_to_stdout() -> None:
    upstream, downstream = os.urandom(300_000), os.urandom(200_000)

    async def scenario() -> tuple[bytes, bytes, tuple[int, int]]:
        near, far, server = await _pair()
        sink = io.BytesIO()

        async def far_side() -> bytes:
            far[1].write(downstream)
            far[1].write_eof()
            got = await far[0].read()
            far[1].close()
            return got

        counts, got_far = await asyncio.gather(pipe_stdio(near[0], near[1], io.BytesIO(upstream), sink), far_side())
        server.close()
        return got_far, sink.getvalue(), counts

    got_far, stdout, counts = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert hashlib.sha256(got_far).digest() == hashlib.sha256(upstream).digest()
    assert stdout == downstream
    assert counts == (len(upstream), len(downstream))


def test_join_streams_carries_both_ways_and_propagates_half_close() -> None:
    async def scenario() -> tuple[bytes, bytes, tuple[int, int]]:
        a_user, a_mid, s1 = await _pair()
        b_mid, b_user, s2 = await _pair()
        joining = asyncio.ensure_future(join_streams(a_mid, b_mid))
        a_user[1].write(b"hello from a")
        a_user[1].write_eof()
        at_b = await b_user[0].read()  # EOF arrives: the half-close went through
        b_user[1].write(b"reply from b")
        b_user[1].write_eof()
        at_a = await a_user[0].read()
        counts = await asyncio.wait_for(joining, 5)
        for s in (s1, s2):
            s.close()
        for _, w in (a_user, b_user):
            w.close()
        return at_b, at_a, counts

    at_b, at_a, counts = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert at_b == b"hello from a"
    assert at_a == b"reply from b"
    assert counts == (12, 12)
