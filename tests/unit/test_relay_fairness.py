"""A direction whose source never runs dry still lets the event loop run other tasks."""

from __future__ import annotations

import asyncio
import socket

from tcppunch.relay.meter import Direction, EndReason, RelayMeter
from tcppunch.relay.pump import _one_way


class EndlessConduit:
    """Always has bytes to take and always delivers them: the relay is never the one waiting."""

    method = "fake"
    buffered = 0
    room = 1 << 20

    def fill(self, src: socket.socket, limit: int) -> int | None:
        self.buffered += limit
        return limit

    def drain(self, dst: socket.socket) -> int | None:
        n, self.buffered = self.buffered, 0
        return n

    def close(self) -> None:
        pass


def test_a_never_waiting_direction_yields_to_other_tasks() -> None:
    async def main() -> None:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        loop = asyncio.get_running_loop()
        meter = RelayMeter(now=loop.time(), idle_timeout=60.0, max_bytes=200 << 20)
        src, dst = socket.socketpair()
        with src, dst:
            other = asyncio.create_task(ticker())
            await asyncio.sleep(0)
            started = ticks
            reason = await _one_way(src, dst, b"", EndlessConduit(), meter, Direction.A_TO_B)
            stop.set()
            await other
        assert reason is EndReason.LIMIT
        assert meter.delivered[Direction.A_TO_B] == 200 << 20
        assert ticks - started >= 200 // 16 - 1  # one yield per 16 busy turns of 1 MiB

    asyncio.run(main())
