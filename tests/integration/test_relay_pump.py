"""The relay pump on real loopback TCP sockets, through both data paths (splice and the copy fallback).

Each test builds two loopback connections: the "server" sockets go to ``relay()``, the "client" sockets
play the two peers through asyncio streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tcppunch.relay import ByteBudget, EndReason, RelayEnd, RelayStats, relay
from tcppunch.relay.conduit import splice_available

METHODS = [
    pytest.param(
        "splice", marks=pytest.mark.skipif(not splice_available(), reason="no os.splice here")
    ),
    "copy",
]
# Generous bound for anything that should happen "promptly"; a hang fails instead of eating the budget.
PROMPT = 10.0


@dataclass
class Peer:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes, chunk: int = 256 << 10) -> None:
        for i in range(0, len(data), chunk):
            self.writer.write(data[i : i + chunk])
            await self.writer.drain()

    async def read_to_eof(self) -> bytes:
        return await asyncio.wait_for(self.reader.read(), PROMPT)

    def close(self) -> None:
        self.writer.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair: (client side, server side)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
    return client, server


async def peer(sock: socket.socket) -> Peer:
    reader, writer = await asyncio.open_connection(sock=sock)
    return Peer(reader, writer)


@dataclass
class Rig:
    a: Peer
    b: Peer
    task: asyncio.Task[RelayStats]

    async def stats(self) -> RelayStats:
        return await asyncio.wait_for(self.task, PROMPT)


async def start(
    method: str, *, pending_a: bytes = b"", pending_b: bytes = b"", **kwargs: object
) -> Rig:
    client_a, server_a = tcp_pair()
    client_b, server_b = tcp_pair()
    task = asyncio.create_task(
        relay(
            RelayEnd(server_a, pending_a),
            RelayEnd(server_b, pending_b),
            method=method,  # type: ignore[arg-type]
            **kwargs,  # type: ignore[arg-type]
        )
    )
    return Rig(await peer(client_a), await peer(client_b), task)


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def connection_ended(p: Peer) -> None:
    """The peer's connection ended: EOF, or a reset (also a fair way to learn the partner is gone)."""
    with contextlib.suppress(ConnectionResetError):
        assert await p.read_to_eof() == b""


async def send_then_eof(p: Peer, data: bytes) -> None:
    await p.send(data)
    p.writer.write_eof()


@pytest.mark.parametrize("method", METHODS)
def test_several_megabytes_both_ways_at_once(method: str) -> None:
    async def main() -> None:
        rig = await start(method)
        up, down = payload(6 << 20, 1), payload(5 << 20, 2)
        _, _, got_at_b, got_at_a = await asyncio.gather(
            send_then_eof(rig.a, up),
            send_then_eof(rig.b, down),
            rig.b.read_to_eof(),
            rig.a.read_to_eof(),
        )
        stats = await rig.stats()
        assert digest(got_at_b) == digest(up)
        assert digest(got_at_a) == digest(down)
        assert (stats.a_to_b, stats.b_to_a) == (len(up), len(down))
        assert stats.reason is EndReason.EOF
        assert stats.method == method
        rig.a.close()
        rig.b.close()

    asyncio.run(main())


@pytest.mark.parametrize("method", METHODS)
def test_pending_bytes_arrive_before_relayed_bytes(method: str) -> None:
    async def main() -> None:
        rig = await start(method, pending_a=b"early-from-a;", pending_b=b"early-from-b;")
        _, _, at_b, at_a = await asyncio.gather(
            send_then_eof(rig.a, b"later-from-a"),
            send_then_eof(rig.b, b"later-from-b"),
            rig.b.read_to_eof(),
            rig.a.read_to_eof(),
        )
        assert at_b == b"early-from-a;later-from-a"
        assert at_a == b"early-from-b;later-from-b"
        stats = await rig.stats()
        assert (stats.a_to_b, stats.b_to_a) == (len(at_b), len(at_a))
        rig.a.close()
        rig.b.close()

    asyncio.run(main())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("first", ["a", "b"])
def test_half_close_is_passed_on_and_the_other_way_keeps_flowing(method: str, first: str) -> None:
    async def main() -> None:
        rig = await start(method)
        closer, talker = (rig.a, rig.b) if first == "a" else (rig.b, rig.a)
        question, answer = payload(300_000, 3), payload(2 << 20, 4)
        await send_then_eof(closer, question)
        # The talker sees the closer's EOF (so the relay shut its side down) ...
        assert await talker.read_to_eof() == question
        assert not rig.task.done()
        # ... and can still answer in full afterwards, then finish in turn.
        await send_then_eof(talker, answer)
        assert digest(await closer.read_to_eof()) == digest(answer)
        stats = await rig.stats()
        assert stats.reason is EndReason.EOF
        rig.a.close()
        rig.b.close()

    asyncio.run(main())


@pytest.mark.parametrize("method", METHODS)
def test_idle_timeout_ends_the_relay_and_both_peers_see_it(method: str) -> None:
    async def main() -> None:
        rig = await start(method, idle_timeout=1.0)
        await rig.a.send(b"one message")
        assert await rig.b.reader.readexactly(11) == b"one message"
        stats = await rig.stats()
        assert stats.reason is EndReason.IDLE
        assert stats.a_to_b == 11
        assert await rig.a.read_to_eof() == b""
        assert await rig.b.read_to_eof() == b""
        rig.a.close()
        rig.b.close()

    asyncio.run(main())


@pytest.mark.parametrize("method", METHODS)
def test_max_bytes_ends_the_relay_after_exactly_that_many(method: str) -> None:
    async def main() -> None:
        rig = await start(method, max_bytes=100_000)
        data = payload(1 << 20, 5)
        sender = asyncio.create_task(send_then_eof(rig.a, data))
        got = await rig.b.read_to_eof()
        stats = await rig.stats()
        assert stats.reason is EndReason.LIMIT
        assert got == data[:100_000]
        assert stats.a_to_b == 100_000
        # The sender is cut off: its connection ends (FIN or, with unread bytes at the relay, RST).
        await connection_ended(rig.a)
        await asyncio.wait_for(asyncio.gather(sender, return_exceptions=True), PROMPT)
        rig.a.close()
        rig.b.close()

    asyncio.run(main())


@pytest.mark.parametrize("method", METHODS)
def test_max_bytes_counts_both_directions_and_pending(method: str) -> None:
    async def main() -> None:
        rig = await start(method, max_bytes=10, pending_a=b"1234")
        await rig.b.send(b"abcdef")  # 4 + 6 = 10: the limit is reached exactly
        assert await rig.a.reader.readexactly(6) == b"abcdef"
        assert await rig.b.reader.readexactly(4) == b"1234"
        stats = await rig.stats()
        assert stats.reason is EndReason.LIMIT
        assert (stats.a_to_b, stats.b_to_a) == (4, 6)
        rig.a.close()
        rig.b.close()

    asyncio.run(main())


class LeasingBudget(ByteBudget):
    """A budget that another party grants in leases, as the pump sees one (what cluster.SharedBudget does
    with Redis): no byte until a lease came, each asked for through refill() and granted later on the
    loop, ``total`` bytes in all."""

    def __init__(self, lease: int, total: int) -> None:
        super().__init__(None)
        self.lease_size, self.left, self.lease = lease, total, 0
        self.asked = 0
        self.holders = self.most_holders = 0

    def allowance(self, want: int) -> int:
        return min(want, self.lease)

    def charge(self, n: int) -> None:
        self.used += n
        self.lease -= n

    def refill(self) -> asyncio.Future[None] | None:
        if self.left == 0:
            return None
        self.asked += 1
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def grant() -> None:
            n = min(self.lease_size, self.left)
            self.left, self.lease = self.left - n, self.lease + n
            granted.set_result(None)

        asyncio.get_running_loop().call_later(0.002, grant)
        return granted

    def hold(self) -> None:
        self.holders += 1
        self.most_holders = max(self.most_holders, self.holders)

    def release(self) -> None:
        self.holders -= 1


@pytest.mark.parametrize("method", METHODS)
def test_a_leased_budget_is_waited_for_and_ends_the_relay_exactly_at_its_total(method: str) -> None:
    async def main() -> None:
        budget = LeasingBudget(lease=64 << 10, total=300_000)
        rig = await start(method, pending_a=b"p" * 1000, budgets=[budget])
        data = payload(1 << 20, 9)
        sender = asyncio.create_task(send_then_eof(rig.a, data))
        got = await rig.b.read_to_eof()
        stats = await rig.stats()
        assert stats.reason is EndReason.LIMIT
        assert digest(got) == digest(b"p" * 1000 + data[: 300_000 - 1000])
        assert budget.used == 300_000 and budget.asked >= 300_000 // (64 << 10)  # it waited for every lease
        assert (budget.most_holders, budget.holders) == (1, 0)  # held while the relay ran, then released
        await connection_ended(rig.a)
        await asyncio.wait_for(asyncio.gather(sender, return_exceptions=True), PROMPT)
        rig.a.close()
        rig.b.close()

    asyncio.run(main())


@pytest.mark.parametrize("method", METHODS)
def test_reset_on_one_side_closes_the_other_promptly(method: str) -> None:
    async def main() -> None:
        rig = await start(method)
        await rig.a.send(b"hello")
        assert await rig.b.reader.readexactly(5) == b"hello"
        sock = rig.a.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rig.a.writer.transport.abort()  # close with SO_LINGER 0: an RST
        stats = await rig.stats()
        assert stats.reason is EndReason.ERROR
        assert stats.error is not None
        await connection_ended(rig.b)
        rig.b.close()

    asyncio.run(main())


KILLED_PEER = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"ready")
sys.stdin.read()  # block until killed
"""


@pytest.mark.parametrize("method", METHODS)
def test_killing_one_peer_process_closes_its_partner(method: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.setblocking(False)
            proc = subprocess.Popen(
                [sys.executable, "-c", KILLED_PEER, str(listener.getsockname()[1])],
                stdin=subprocess.PIPE,
            )
            try:
                server_a, _ = await asyncio.wait_for(loop.sock_accept(listener), PROMPT)
                client_b, server_b = tcp_pair()
                b = await peer(client_b)
                ends = RelayEnd(server_a), RelayEnd(server_b)
                task = asyncio.create_task(relay(*ends, method=method))  # type: ignore[arg-type]
                assert await b.reader.readexactly(5) == b"ready"
                proc.kill()
                assert await b.read_to_eof() == b""  # the dead peer's FIN was passed on
                b.close()  # the partner reacts by closing, and the relay ends
                stats = await asyncio.wait_for(task, PROMPT)
                assert stats.reason in (EndReason.EOF, EndReason.ERROR)
            finally:
                proc.kill()
                proc.wait(timeout=PROMPT)

    asyncio.run(main())


@pytest.mark.parametrize("method", METHODS)
def test_cancelling_the_relay_closes_both_peers(method: str) -> None:
    async def main() -> None:
        rig = await start(method)
        await rig.a.send(b"x")
        assert await rig.b.reader.readexactly(1) == b"x"
        rig.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await rig.task
        assert await rig.a.read_to_eof() == b""
        assert await rig.b.read_to_eof() == b""
        rig.a.close()
        rig.b.close()

    asyncio.run(main())


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_one_hundred_concurrent_relays_of_one_megabyte(method: str) -> None:
    async def one(i: int) -> tuple[RelayStats, bool, bool]:
        rig = await start(method)
        up, down = payload(1 << 20, 1000 + i), payload(1 << 20, 2000 + i)
        _, _, at_b, at_a = await asyncio.gather(
            send_then_eof(rig.a, up),
            send_then_eof(rig.b, down),
            rig.b.reader.read(),
            rig.a.reader.read(),
        )
        stats = await rig.task
        rig.a.close()
        rig.b.close()
        return stats, digest(at_b) == digest(up), digest(at_a) == digest(down)

    async def main() -> None:
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(100))), 120)
        assert all(up_ok and down_ok for _, up_ok, down_ok in results)
        assert all(s.reason is EndReason.EOF for s, _, _ in results)
        assert all(s.a_to_b == s.b_to_a == 1 << 20 for s, _, _ in results)

    asyncio.run(main())


def test_auto_falls_back_to_copying_when_no_pipe_can_be_made(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pipe(size: int) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr("tcppunch.relay.pump.PipeConduit", no_pipe)

    async def main() -> None:
        rig = await start("auto")
        data = payload(1 << 20, 6)
        _, _, got = await asyncio.gather(
            send_then_eof(rig.a, data), send_then_eof(rig.b, b""), rig.b.read_to_eof()
        )
        stats = await rig.stats()
        assert got == data
        assert stats.method == "copy"
        rig.a.close()
        rig.b.close()

    asyncio.run(main())


def test_unknown_method_is_refused() -> None:
    async def main() -> None:
        client_a, server_a = tcp_pair()
        client_b, server_b = tcp_pair()
        with pytest.raises(ValueError, match="unknown relay method"):
            await relay(RelayEnd(server_a), RelayEnd(server_b), method="teleport")  # type: ignore[arg-type]
        for s in (client_a, server_a, client_b, server_b):
            s.close()

    asyncio.run(main())
