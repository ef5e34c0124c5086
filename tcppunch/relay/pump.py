"""The relay byte pump: splice two TCP connections together until both finish, one fails, or a limit hits.

Each direction is one coroutine driving a :mod:`conduit <tcppunch.relay.conduit>` (a kernel pipe moved
with ``splice(2)`` on Linux, a user buffer elsewhere) on non-blocking sockets, woken by the event loop's
readiness callbacks. Back-pressure is the conduit's finite size: a direction reads from its source only
while its conduit has room, so a slow receiver leaves bytes in the sender's kernel buffers and TCP flow
control slows the sender. EOF from one side becomes ``shutdown(SHUT_WR)`` towards the other and the
opposite direction keeps flowing. The rules (limits, idle deadline, counts) live in the sans-I/O
:class:`~tcppunch.relay.meter.RelayMeter`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence
from typing import Literal

import structlog

from tcppunch.relay.conduit import (
    DEFAULT_BUFFER_SIZE,
    DEFAULT_PIPE_SIZE,
    BufferConduit,
    Conduit,
    PipeConduit,
    splice_available,
)
from tcppunch.relay.endpoint import RelayEnd
from tcppunch.relay.limits import ByteBudget
from tcppunch.relay.meter import Direction, EndReason, RelayMeter, RelayStats

PumpMethod = Literal["auto", "splice", "copy"]

# A direction that keeps moving bytes without ever waiting yields to the event loop after this many
# turns (up to 16 x 1 MiB), so one fast relay cannot starve the others and the coordinator.
_TURNS_PER_YIELD = 16
# Longest wait for a shared budget's next lease (it answers within its store's timeouts, or leases locally).
REFILL_WAIT = 10.0
# When several things end a relay in the same loop turn, report the most telling one.
_PRECEDENCE = (EndReason.ERROR, EndReason.LIMIT, EndReason.IDLE, EndReason.EOF)


async def relay(
    a: RelayEnd,
    b: RelayEnd,
    *,
    idle_timeout: float = 300.0,
    max_bytes: int | None = None,
    budgets: Sequence[ByteBudget] = (),
    method: PumpMethod = "auto",
    pipe_size: int = DEFAULT_PIPE_SIZE,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
) -> RelayStats:
    """Move bytes a->b and b->a until the relay ends; close both sockets; return what happened.

    Ends with ``eof`` once both directions have passed their EOF on, ``idle`` after ``idle_timeout``
    seconds without a byte moving either way, ``limit`` when ``max_bytes`` (both directions together) or
    any of ``budgets`` (shared per-token budgets, see :mod:`~tcppunch.relay.limits`) is used up, and
    ``error`` when either socket fails. However it ends, the relay closes both sockets (it owns them);
    on ``idle``/``limit``/``error`` that happens at once, so the partner of a vanished peer sees its
    connection end instead of hanging. ``a.pending`` goes to ``b`` (and ``b.pending`` to ``a``) before
    anything else. ``method="copy"`` forces the recv/send path; ``"auto"`` uses splice where available
    (and the copy path if a pipe cannot be made). Cancelling the relay closes both sockets too. Invalid
    arguments raise ValueError before anything is touched.
    """
    loop = asyncio.get_running_loop()
    meter = RelayMeter(
        now=loop.time(), idle_timeout=idle_timeout, max_bytes=max_bytes, budgets=budgets
    )
    make_conduit = _conduit_factory(method, pipe_size, buffer_size)
    conduits: list[Conduit] = []
    directions: dict[asyncio.Task[EndReason], Direction] = {}
    watchdog: asyncio.Task[EndReason] | None = None
    reasons: set[EndReason] = set()
    error: str | None = None
    for budget in meter.budgets:
        budget.hold()
    try:
        for end in (a, b):
            end.sock.setblocking(False)
        ways = (
            (Direction.A_TO_B, a.sock, b.sock, a.pending),
            (Direction.B_TO_A, b.sock, a.sock, b.pending),
        )
        for direction, src, dst, pending in ways:
            conduits.append(conduit := make_conduit())
            task = asyncio.create_task(_one_way(src, dst, pending, conduit, meter, direction))
            directions[task] = direction
        watchdog = asyncio.create_task(_watch_idle(meter))
        running = {*directions, watchdog}
        finished = 0
        while not reasons:
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if isinstance(exc, OSError):
                    reasons.add(EndReason.ERROR)
                    error = error or f"{directions[task]}: {exc!r}"
                elif exc is not None:
                    raise exc
                elif task.result() is not EndReason.EOF:
                    reasons.add(task.result())  # IDLE from the watchdog, LIMIT from a direction
                else:
                    finished += 1
                    if finished == len(directions):
                        reasons.add(EndReason.EOF)
    finally:
        await _stop([*directions, *([watchdog] if watchdog else [])])
        for conduit in conduits:
            conduit.close()
        for end in (a, b):
            end.sock.close()
        for budget in meter.budgets:
            budget.release()
    reason = next(r for r in _PRECEDENCE if r in reasons)
    used_method = "+".join(sorted({c.method for c in conduits}))
    stats = meter.stats(loop.time(), reason, used_method, error)
    structlog.get_logger().info(
        "relay ended",
        method=used_method,
        reason=str(reason),
        a_to_b=stats.a_to_b,
        b_to_a=stats.b_to_a,
        duration=round(stats.duration, 3),
        error=error,
    )
    return stats


def _conduit_factory(method: PumpMethod, pipe_size: int, buffer_size: int) -> Callable[[], Conduit]:
    if method == "splice" and not splice_available():
        raise ValueError("splice is not available on this platform")
    if method not in ("auto", "splice", "copy"):
        raise ValueError(f"unknown relay method {method!r}")
    if method == "copy" or not splice_available():
        return lambda: BufferConduit(buffer_size)

    def pipe_or_buffer() -> Conduit:
        try:
            return PipeConduit(pipe_size)
        except OSError:  # out of file descriptors, say: the copy path needs none
            if method == "splice":
                raise
            return BufferConduit(buffer_size)

    return pipe_or_buffer


async def _one_way(
    src: socket.socket,
    dst: socket.socket,
    pending: bytes,
    conduit: Conduit,
    meter: RelayMeter,
    direction: Direction,
) -> EndReason:
    """Pump src -> dst until src's EOF has been passed on (EOF) or the byte limits stop it (LIMIT).

    Each turn takes what the source has (if the conduit has room) and pushes what the conduit holds; when
    neither moved a byte it waits: for the destination to be writable while bytes are buffered (a full
    pipe and an empty socket both say EAGAIN, so waiting on the source then could spin), otherwise for the
    source to be readable. Every turn moves bytes or waits, and the relay's idle watchdog bounds the waits.
    """
    loop = asyncio.get_running_loop()
    ready = _Readiness(loop, src.fileno(), dst.fileno())
    eof = limited = False
    busy_turns = 0
    try:
        if pending:
            limited = await _send_pending(pending, dst, ready, meter, direction)
        while True:
            moved = False
            if not (eof or limited) and (room := conduit.room) > 0:
                want = meter.allowance(room)
                if want == 0:  # at a limit, unless a shared budget's next lease comes
                    limited = not await _refilled(meter)
                    continue
                n = conduit.fill(src, want)
                if n == 0:
                    eof = True
                elif n is not None:
                    meter.took(n, loop.time())
                    moved = True
            if conduit.buffered:
                n = conduit.drain(dst)
                if n:
                    meter.gave(direction, n, loop.time())
                    moved = True
            if (eof or limited) and not conduit.buffered:
                break
            if not moved:
                busy_turns = 0
                if conduit.buffered:
                    await ready.writable()
                else:
                    await ready.readable()
            elif (busy_turns := busy_turns + 1) >= _TURNS_PER_YIELD:
                busy_turns = 0
                await asyncio.sleep(0)
    finally:
        ready.close()
    if limited:
        return EndReason.LIMIT
    dst.shutdown(socket.SHUT_WR)
    return EndReason.EOF


async def _send_pending(
    data: bytes, dst: socket.socket, ready: _Readiness, meter: RelayMeter, direction: Direction
) -> bool:
    """Send bytes read before the relay started; True if the byte limits cut them short."""
    view = memoryview(data)
    allowed = 0
    while view:
        if not allowed:
            allowed = meter.allowance(len(view))
            if not allowed:
                if await _refilled(meter):
                    continue
                return True
            meter.took(allowed, asyncio.get_running_loop().time())
        try:
            n = dst.send(view[:allowed])
        except BlockingIOError:
            await ready.writable()
            continue
        meter.gave(direction, n, asyncio.get_running_loop().time())
        view, allowed = view[n:], allowed - n
    return False


async def _refilled(meter: RelayMeter) -> bool:
    """At a limit: wait for a shared budget's next lease (True: ask again), or False: the limit holds."""
    wait = meter.refill()
    if wait is None:
        return False
    try:
        await asyncio.wait_for(wait, REFILL_WAIT)
    except TimeoutError:
        return False
    return True


async def _watch_idle(meter: RelayMeter) -> EndReason:
    """Return IDLE once nothing has moved for the meter's idle timeout (one wake-up per timeout at most)."""
    loop = asyncio.get_running_loop()
    while (delay := meter.idle_deadline - loop.time()) > 0:
        await asyncio.sleep(delay)
    return EndReason.IDLE


async def _stop(tasks: Sequence[asyncio.Task[EndReason]]) -> None:
    """Cancel and reap the relay's tasks, so their fds are unregistered before the sockets close."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class _Readiness:
    """Waits for one direction's source to be readable or destination to be writable.

    Only the interest being waited on is registered with the loop (level-triggered epoll would otherwise
    wake us for the other one, ready but useless, in a busy loop), and a registration is kept between
    waits of the same kind, so a bulk transfer costs no epoll_ctl per chunk.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, src_fd: int, dst_fd: int) -> None:
        self._loop = loop
        self._src_fd = src_fd
        self._dst_fd = dst_fd
        self._registered: Literal["read", "write"] | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def readable(self) -> None:
        if self._registered != "read":
            self.close()
            self._loop.add_reader(self._src_fd, self._wake)
            self._registered = "read"
        await self._wait()

    async def writable(self) -> None:
        if self._registered != "write":
            self.close()
            self._loop.add_writer(self._dst_fd, self._wake)
            self._registered = "write"
        await self._wait()

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """Drop the loop registration (idempotent)."""
        if self._registered == "read":
            self._loop.remove_reader(self._src_fd)
        elif self._registered == "write":
            self._loop.remove_writer(self._dst_fd)
        self._registered = None
