"""Expose a local TCP service on a port of the coordinator's public address (``tcppunch expose``).

Like frp's ``tcp`` proxy with ``remotePort``: the coordinator listens on the port for us (EXPOSE) and
tells us of each visitor on our control connection (VISITOR). For each one we connect to the local
service, join the visitor with a relay join in the responder role (:func:`join_visitor`), optionally
write a PROXY protocol header first (so the service learns the visitor's address), and splice the two
sockets with the relay pump until both sides are done. The server sees the visitor's bytes in clear, as
frp's does: a service that needs privacy speaks TLS itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from tcppunch.coordinator.control import ControlChannel, CoordinatorError, join_visitor
from tcppunch.peer.coordinators import Coordinators, first_answer
from tcppunch.relay import RelayEnd, RelayStats, relay
from tcppunch.wire.coord import ErrorCode, Exposed, Visitor
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.proxy_protocol import ProxyVersion, encode

log = structlog.get_logger()

# Refusals that asking again will not change. Others clear by themselves: e.g. after a server restart the
# port or the id may still be held by our previous registration until the server notices it is gone.
PERMANENT = frozenset({ErrorCode.BAD_TOKEN, ErrorCode.EXPOSE_DISABLED, ErrorCode.EXPOSE_PORT_REFUSED,
                       ErrorCode.EXPOSE_LIMIT, ErrorCode.UNSUPPORTED_VERSION})
RETRY_FIRST = 1.0
RETRY_MAX = 30.0


@dataclass(frozen=True)
class VisitorDone:
    """One visitor's connection, carried (``stats``) or not (``error``)."""

    visitor: Endpoint
    address: Endpoint
    stats: RelayStats | None
    error: str | None = None


class Exposer:
    """Carries the visitors of the ports that ``channel``'s peer exposes to the local ``forward`` service.

    >>> async with ControlChannel(coordinator, "web", token) as channel:
    ...     exposer = Exposer(channel, Endpoint("127.0.0.1", 8000))
    ...     exposed = await exposer.expose(8080)      # visitors reach exposed.address
    ...     await exposer.serve()                     # until the channel closes
    """

    def __init__(
        self,
        channel: ControlChannel,
        forward: Endpoint,
        *,
        proxy_protocol: ProxyVersion | None = None,
        connect_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        on_done: Callable[[VisitorDone], None] | None = None,
    ) -> None:
        self.channel = channel
        self.forward = forward
        self.proxy_protocol = proxy_protocol
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.on_done = on_done
        self.carried = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = log.bind(peer=channel.peer_id, forward=str(forward))

    @property
    def active(self) -> int:
        """Visitors being joined or carried right now."""
        return len(self._tasks)

    async def expose(self, remote_port: int) -> Exposed:
        """Ask for ``remote_port``; raises :class:`CoordinatorError` with the server's reason if refused."""
        exposed = await self.channel.expose(remote_port)
        self._log.info("expose.exposed", address=str(exposed.address))
        return exposed

    async def serve(self) -> None:
        """Carry visitors until the control channel closes (the server closes our ports then). Connections
        still running are cut when this returns or is cancelled."""
        try:
            while True:
                try:
                    visitor = await self.channel.next_visitor()
                except CoordinatorError:
                    return
                task = asyncio.get_running_loop().create_task(self._carry(visitor))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _carry(self, visitor: Visitor) -> None:
        local: socket.socket | None = None
        joined: socket.socket | None = None
        credentials = self.channel.relay_credentials()
        try:
            try:
                local = await self._connect_local()
            except (OSError, TimeoutError):
                # Join anyway and close at once: the visitor sees its connection end now, not after the
                # server's join timeout.
                with contextlib.suppress(OSError, TimeoutError, CoordinatorError):
                    (await join_visitor(visitor, timeout=self.connect_timeout, **credentials)).close()
                raise
            joined = await join_visitor(visitor, timeout=self.connect_timeout, **credentials)
            header = b"" if self.proxy_protocol is None else encode(self.proxy_protocol, visitor.visitor,
                                                                      visitor.address)
            # The joined end's pending bytes go to the local service first: the PROXY header.
            ends = RelayEnd(joined, header), RelayEnd(local, b"")
            joined = local = None  # the pump owns (and closes) both sockets now
            stats = await relay(*ends, idle_timeout=self.idle_timeout)
            self.carried += 1
            self._finished(VisitorDone(visitor.visitor, visitor.address, stats))
        except (OSError, TimeoutError, CoordinatorError) as exc:
            self._finished(VisitorDone(visitor.visitor, visitor.address, None, _describe(exc, self.forward)))
        finally:
            for sock in (local, joined):
                if sock is not None:
                    sock.close()

    async def _connect_local(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.forward.ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await asyncio.get_running_loop().sock_connect(sock, (self.forward.ip, self.forward.port))
        except BaseException:
            sock.close()
            raise
        return sock

    def _finished(self, done: VisitorDone) -> None:
        fields: dict[str, Any] = {"visitor": str(done.visitor), "address": str(done.address)}
        if done.stats is not None:
            fields.update(to_service=done.stats.a_to_b, to_visitor=done.stats.b_to_a, reason=done.stats.reason.value)
        self._log.info("expose.visitor_done", error=done.error, **fields)
        if self.on_done is not None:
            try:
                self.on_done(done)
            except Exception:  # the caller's callback: log its bug, keep carrying the other visitors
                self._log.exception("expose.on_done_failed")


def _describe(exc: BaseException, forward: Endpoint) -> str:
    if isinstance(exc, CoordinatorError):
        return f"join refused: {exc.message} ({exc.code})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{forward}: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)


async def keep_exposed(
    connect: Callable[[], Awaitable[ControlChannel]],
    remote_port: int,
    forward: Endpoint,
    *,
    proxy_protocol: ProxyVersion | None = None,
    on_exposed: Callable[[Exposed], None] | None = None,
    on_lost: Callable[[str, float], None] | None = None,
    on_done: Callable[[VisitorDone], None] | None = None,
    retry_first: float = RETRY_FIRST,
    retry_max: float = RETRY_MAX,
) -> None:
    """Expose ``remote_port`` and carry its visitors; when the control connection is lost (the server
    restarted, the path broke), register and expose again, with back-off (``retry_first`` doubling to
    ``retry_max``), until cancelled. ``connect`` makes a new, registered :class:`ControlChannel`
    (:func:`registered_channel`: at the first coordinator address that answers).

    The first attempt's failure is raised (nothing was ever exposed: a wrong address, token or port is
    more likely than an outage), and so is a :data:`PERMANENT` refusal at any time.
    """
    delay, exposed_once = retry_first, False
    while True:
        try:
            channel = await connect()
            try:
                exposer = Exposer(channel, forward, proxy_protocol=proxy_protocol, on_done=on_done)
                exposed = await exposer.expose(remote_port)
                exposed_once, delay = True, retry_first
                if on_exposed is not None:
                    on_exposed(exposed)
                await exposer.serve()
                error = channel.error
            finally:
                await channel.close()
            reason = "the coordinator closed the connection" if error is None else f"{error.message} ({error.code})"
        except CoordinatorError as exc:
            if not exposed_once or exc.code in PERMANENT:
                raise
            reason = f"{exc.message} ({exc.code})"
        except (OSError, TimeoutError) as exc:
            if not exposed_once:
                raise
            reason = str(exc) or exc.__class__.__name__
        log.info("expose.lost", reason=reason, retry_in=delay)
        if on_lost is not None:
            on_lost(reason, delay)
        await asyncio.sleep(delay)  # back-off between attempts to reach the coordinator again
        delay = min(delay * 2, retry_max)


async def registered_channel(coordinators: Coordinators, channel_for: Callable[[Endpoint], ControlChannel],
                             *, strict: bool) -> ControlChannel:
    """A control channel registered at the first of ``coordinators`` that answers, their host names looked
    up (again) first: ``strict`` (the first time) raises for a name without an address."""
    for error in await coordinators.resolve(strict=strict):
        log.info("expose.resolve_failed", error=str(error))

    async def register(where: Endpoint) -> ControlChannel:
        channel = channel_for(where)
        await channel.register()  # closes the channel itself when it fails
        return channel

    return await first_answer(coordinators.candidates, register)
