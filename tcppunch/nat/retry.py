"""TCP connects to our own server that survive lost SYNs: attempts with growing timeouts in a total budget.

One lost SYN costs the kernel's initial RTO (1 s) and two cost 3 s, so a client that gives up on the
server after 2 s fails on a lossy path although the server is fine. Every client connection to the
coordinator (detect's STUN over TCP, register, relay join) therefore connects through
:func:`connect_retrying`: attempt ``n`` gets ``first_timeout * 2**n`` (at most ``max_timeout``) on a fresh
socket from the same local endpoint, until ``budget`` seconds are spent. Only a connect that times out
is retried: a refusal (RST) or an unreachable network is an answer, reported at once.

:class:`ConnectBudget` is pure (the schedule); :func:`connect_retrying` is the thin asyncio loop around it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from tcppunch.wire.endpoint import Endpoint

log = structlog.get_logger()


@dataclass(frozen=True)
class ConnectBudget:
    """Connect timeouts per attempt (doubling from ``first_timeout`` up to ``max_timeout``) within ``budget``."""

    budget: float = 10.0
    first_timeout: float = 1.0
    max_timeout: float = 4.0

    def __post_init__(self) -> None:
        if not (self.budget > 0 and 0 < self.first_timeout <= self.max_timeout):
            raise ValueError("retry policy: budget, first_timeout and max_timeout must be > 0, first <= max")

    def attempt_timeout(self, attempt: int, elapsed: float) -> float | None:
        """The timeout of attempt ``attempt`` (0-based) begun ``elapsed`` s into the budget; ``None``: spent."""
        left = self.budget - elapsed
        if left <= 0.0:
            return None
        return min(self.first_timeout * 2.0 ** min(attempt, 30), self.max_timeout, left)


@dataclass(frozen=True)
class ConnectAttempt:
    """One connect attempt: when it began (s after the first), how long it took, why it failed."""

    number: int
    started: float
    seconds: float
    error: str | None = None


class ConnectRetryError(TimeoutError):
    """Every attempt timed out within the budget (no SYN-ACK came back)."""

    def __init__(self, destination: Endpoint, attempts: tuple[ConnectAttempt, ...], budget: float) -> None:
        super().__init__(f"no TCP answer from {destination} in {len(attempts)} attempts within {budget:g} s")
        self.destination = destination
        self.attempts = attempts


async def connect_retrying(
    new_socket: Callable[[], socket.socket],
    destination: Endpoint,
    policy: ConnectBudget | None = None,
    *,
    what: str = "connect",
    on_attempt: Callable[[ConnectAttempt], None] | None = None,
) -> tuple[socket.socket, tuple[ConnectAttempt, ...]]:
    """A connected non-blocking socket from ``new_socket()`` and the attempts it took.

    Raises :class:`ConnectRetryError` when the budget is spent, and the attempt's own OSError
    (refused, unreachable...) at once. ``on_attempt`` hears of every attempt, failed or not.
    """
    policy = policy or ConnectBudget()
    loop = asyncio.get_running_loop()
    attempts: list[ConnectAttempt] = []
    started = time.monotonic()
    bound = log.bind(what=what, destination=str(destination))
    while (timeout := policy.attempt_timeout(len(attempts), time.monotonic() - started)) is not None:
        begun = time.monotonic()
        sock = new_socket()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (destination.ip, destination.port)), timeout)
        except TimeoutError:
            sock.close()
            attempt = ConnectAttempt(len(attempts) + 1, begun - started, time.monotonic() - begun, "timeout")
        except BaseException:
            sock.close()
            raise
        else:
            attempt = ConnectAttempt(len(attempts) + 1, begun - started, time.monotonic() - begun)
            attempts.append(attempt)
            if on_attempt is not None:
                on_attempt(attempt)
            if attempt.number > 1:
                bound.info("connect.succeeded_after_retries", attempts=attempt.number)
            return sock, tuple(attempts)
        attempts.append(attempt)
        if on_attempt is not None:
            on_attempt(attempt)
        bound.info("connect.retry", attempt=attempt.number, timeout=round(timeout, 3))
    raise ConnectRetryError(destination, tuple(attempts), policy.budget)
