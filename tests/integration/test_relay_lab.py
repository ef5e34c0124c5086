"""The relay pump in the NAT lab: two hosts behind symmetric-random NATs (one router drops unsolicited
SYNs, the other resets them: the pair punching cannot connect) move 10 MB each way through a relay on
the lab's server, with matching SHA-256.

Only the pump is exercised here (the relay server accepts, detaches and splices); the coordinator's
authenticated pairing on top of it is tested with the coordinator.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
from collections.abc import Callable

import pytest

from tcppunch.lab import Lab, LabError, LabSpec, NatType, RouterSpec, SynPolicy
from tcppunch.lab.netns import check_supported
from tcppunch.relay import EndReason, RelayEnd, RelayStats, detach, relay

PORT = 4800
SIZE = 10 << 20
PROMPT = 60.0


def _lab_or_skip() -> None:
    try:
        check_supported()
    except LabError as exc:
        pytest.skip(str(exc))


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]


async def relay_two(address: str, method: str, listening: threading.Event) -> RelayStats:
    """Listen on two ports, accept one connection on each, detach both, relay them."""
    ends: dict[int, RelayEnd] = {}
    both = asyncio.Event()

    def handler(port: int) -> Handler:
        def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            ends[port] = detach(reader, writer)
            if len(ends) == 2:
                both.set()

        return handle

    servers = [await asyncio.start_server(handler(p), address, p) for p in (PORT, PORT + 1)]
    listening.set()
    try:
        await asyncio.wait_for(both.wait(), PROMPT)
    finally:
        for server in servers:
            server.close()
    return await relay(ends[PORT], ends[PORT + 1], method=method)  # type: ignore[arg-type]


async def exchange(address: str, port: int, outgoing: bytes) -> bytes:
    """Connect, send everything then EOF, return all received."""
    reader, writer = await asyncio.open_connection(address, port)

    async def send() -> None:
        for i in range(0, len(outgoing), 1 << 18):
            writer.write(outgoing[i : i + (1 << 18)])
            await writer.drain()
        writer.write_eof()

    _, incoming = await asyncio.gather(send(), reader.read())
    writer.close()
    return incoming


@pytest.mark.lab
@pytest.mark.parametrize("method", ["auto", "copy"])
def test_ten_megabytes_each_way_between_symmetric_random_nats(method: str) -> None:
    _lab_or_skip()
    spec = LabSpec([
        RouterSpec("a", NatType.SYMMETRIC_RANDOM, SynPolicy.DROP),
        RouterSpec("b", NatType.SYMMETRIC_RANDOM, SynPolicy.RST),
    ])
    from_a, from_b = random.Random(1).randbytes(SIZE), random.Random(2).randbytes(SIZE)
    with Lab(spec) as lab:
        server = lab.server.address
        with (
            lab.server.event_loop() as srv,
            lab.host("a").event_loop() as host_a,
            lab.host("b").event_loop() as host_b,
        ):
            listening = threading.Event()
            relayed = srv.submit(relay_two(server, method, listening))
            assert listening.wait(PROMPT)
            at_a = host_a.submit(exchange(server, PORT, from_a))
            at_b = host_b.submit(exchange(server, PORT + 1, from_b))
            got_at_a, got_at_b = at_a.result(PROMPT), at_b.result(PROMPT)
            stats = relayed.result(PROMPT)
    assert hashlib.sha256(got_at_b).digest() == hashlib.sha256(from_a).digest()
    assert hashlib.sha256(got_at_a).digest() == hashlib.sha256(from_b).digest()
    assert (stats.a_to_b, stats.b_to_a) == (SIZE, SIZE)
    assert stats.reason is EndReason.EOF
