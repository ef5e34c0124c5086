"""The peer side of the coordinator protocol: one control connection, made FROM the port the punch reuses.

:class:`ControlChannel` binds its socket with SO_REUSEADDR + SO_REUSEPORT to a chosen local endpoint
before connecting, so the public endpoint the coordinator observes (and hands to the other peer) is the
mapping of exactly the port the punch engine will listen and connect from. It registers, answers
keepalive pings (the server's RTT estimate depends on prompt answers), and turns PUNCH frames into
:class:`PunchOrder` objects whose times are already converted to this event loop's clock.

:func:`open_relay` opens the separate relay connection of a session and returns plain asyncio streams
once the coordinator has paired both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from tcppunch.nat.retry import ConnectBudget, connect_retrying
from tcppunch.nat.sockets import endpoint_of, family_of, reuse_port_socket
from tcppunch.punch.birthday import DEFAULT_LIMITS, BirthdayLimits, BirthdayPlan, birthday_candidates, birthday_side
from tcppunch.punch.plan import PunchPlan, peer_rtt_bound, resyn_delay
from tcppunch.punch.prediction import build_candidates, ipv6_candidates, retry_policy_for
from tcppunch.session.identity import Identity
from tcppunch.session.records import KeyShare, RecordChannel, RecordError
from tcppunch.session.secure import (
    SecureError,
    SecureErrorCode,
    TlsEngine,
    Verifier,
    context,
    engine_handshake,
    engine_recv,
    engine_send,
    engine_unwrap,
    expect_key,
    verify_peer,
)
from tcppunch.wire.coord import (
    Cancel,
    Connect,
    Error,
    ErrorCode,
    Expose,
    Exposed,
    ListPeers,
    Message,
    Observed,
    Outcome,
    PeerInfo,
    Peers,
    Ping,
    Pong,
    Punch,
    Register,
    Registered,
    Relay,
    RelayAdvice,
    RelayOk,
    Result,
    Role,
    Visitor,
    decode_message,
    encode_message,
    relay_proof,
)
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.framing import (
    MAX_FRAME_SIZE,
    PREAMBLE,
    FrameDecoder,
    ProtocolError,
)
from tcppunch.wire.natreport import NatReport

log = structlog.get_logger()

READ_SIZE = 64 * 1024


class CoordinatorError(Exception):
    """The coordinator answered with an ERROR frame (``code`` as in docs/protocol.md), or went away."""

    def __init__(self, code: ErrorCode | str, message: str, *, fatal: bool = True) -> None:
        super().__init__(f"{code}: {message}")
        self.code = ErrorCode.of(code)
        self.message = message
        self.fatal = fatal


@dataclass(frozen=True)
class Registration:
    """What the coordinator told us when it accepted the registration."""

    id: str
    local: Endpoint  # the bound local endpoint of the control connection (the port to punch from)
    observed: Endpoint  # our public endpoint as the coordinator sees it
    keepalive_interval: float
    keepalive_timeout: float
    connect_attempts: int = 1  # TCP connects it took (lost SYNs are retried, nat/retry.py)


@dataclass(eq=False)
class PunchOrder:
    """One PUNCH, with its relative times turned into ``loop.time()`` values at receipt.

    ``cancelled`` is set (with ``cancel_reason``) if the coordinator cancels the session, for example
    because the other peer left.
    """

    session_id: str
    key: bytes
    role: Role
    peer_id: str
    peer_observed: Endpoint
    peer_private: tuple[Endpoint, ...]
    peer_nat: NatReport | None
    fire_at: float
    deadline: float
    relay: Endpoint
    relay_advice: RelayAdvice
    received_at: float
    request_id: str | None = None
    advice_reason: str = ""
    peer_ipv6: tuple[Endpoint, ...] = ()
    cancelled: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    cancel_reason: str | None = None
    # The key the coordinator bound to peer_id (its word only: see Peer's trust_coordinator).
    peer_key: str | None = None

    @classmethod
    def from_message(cls, msg: Punch, received_at: float) -> PunchOrder:
        return cls(
            session_id=msg.session_id,
            key=msg.key,
            role=msg.role,
            peer_id=msg.peer_id,
            peer_observed=msg.peer_observed,
            peer_private=msg.peer_private,
            peer_nat=msg.peer_nat,
            fire_at=received_at + msg.fire_in_ms / 1000,
            deadline=received_at + msg.deadline_ms / 1000,
            relay=msg.relay,
            relay_advice=msg.relay_advice,
            received_at=received_at,
            request_id=msg.request_id,
            advice_reason=msg.advice_reason,
            peer_ipv6=msg.peer_ipv6,
            peer_key=msg.peer_key,
        )


class PeerList(list[PeerInfo]):
    """The answer to LIST: the peers, and whether the server listed only the first of them."""

    def __init__(self, peers: Iterable[PeerInfo] = (), *, truncated: bool = False) -> None:
        super().__init__(peers)
        self.truncated = truncated


def punch_plan(order: PunchOrder, *, local: Endpoint, own_nat: NatReport | None, own_public_ip: str,
               local6: Endpoint | None = None, birthday: BirthdayLimits | None = DEFAULT_LIMITS,
               coordinator_rtt: float | None = None) -> PunchPlan:
    """The punch engine's plan for ``order``: fire from ``local`` at the peer's candidates (its IPv6
    endpoints first when we have ``local6`` to send from, its private endpoints when we share its public
    address, its observed endpoint, or predicted ports for a sequential NAT), retrying as fast as our own
    NAT allows. A control connection over IPv6 makes ``local`` itself the IPv6 endpoint. When the
    coordinator advises ``birthday`` (and ``birthday`` limits are given: None is the opt-out), a birthday
    punch instead. ``coordinator_rtt`` (our round trip to the coordinator, :attr:`ControlChannel.rtt`)
    bounds the round trip to the peer, which sets how long an unanswered SYN waits before it is re-sent."""
    if local6 is None and family_of(local.ip) == socket.AF_INET6:
        local6 = local
    side = birthday_side(own_nat, order.peer_nat) if order.relay_advice is RelayAdvice.BIRTHDAY else None
    spray = None if side is None or birthday is None else BirthdayPlan(side, birthday)
    if spray is not None:  # IPv6 first still: the spray is the IPv4 wave, skipped when IPv6 won
        candidates = ipv6_candidates(order.peer_ipv6 if local6 is not None else ()) + birthday_candidates(
            spray, peer_observed=order.peer_observed, rng=random.SystemRandom(), peer_private=order.peer_private,
            own_public_ip=own_public_ip)
    else:
        candidates = build_candidates(peer_observed=order.peer_observed, peer_nat=order.peer_nat, own_nat=own_nat,
                                      peer_private=order.peer_private, own_public_ip=own_public_ip,
                                      peer_ipv6=order.peer_ipv6 if local6 is not None else ())
    return PunchPlan(
        local=local,
        local6=local6,
        role=order.role,
        session_id=order.session_id,
        key=order.key,
        candidates=candidates,
        fire_at=order.fire_at,
        deadline=order.deadline,
        retry=retry_policy_for(own_nat),
        birthday=spray,
        resyn_after=resyn_delay(peer_rtt_bound(coordinator_rtt, order.fire_at - order.received_at)),
    )


def control_socket(local: Endpoint) -> socket.socket:
    """The control connection's socket: bound to the punch port (shared via SO_REUSEPORT), no Nagle.

    Small frames go both ways: with Nagle a CONNECT waits behind an un-ACKed frame for the coordinator's
    delayed ACK (40 ms on Linux); asyncio does not set TCP_NODELAY on a socket it is given.
    """
    sock = reuse_port_socket(socket.SOCK_STREAM, local)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


_CLOSED = object()


class ControlChannel:
    """A registered peer's control connection to the coordinator.

    ``async with ControlChannel(...) as channel:`` registers and closes at the end. ``local`` is the
    endpoint to bind (default: any address, an ephemeral port); read the chosen port from
    ``channel.registration.local`` afterwards.
    """

    def __init__(
        self,
        coordinator: Endpoint,
        peer_id: str,
        token: str,
        *,
        local: Endpoint | None = None,
        nat: NatReport | None = None,
        private: Sequence[Endpoint] = (),
        swarm: str | None = None,
        ipv6: Sequence[str] = (),
        retry: ConnectBudget | None = None,
        birthday: bool = True,
        request_timeout: float = 10.0,
        identity: Identity | None = None,
        verify_coordinator: Verifier | None = None,
        records: bool = True,
    ) -> None:
        self.coordinator = coordinator
        # After REGISTERED leave TLS for the record layer (docs/protocol.md): the coordinator then keeps
        # ~5 KiB instead of ~28 KiB for our connection. False: the whole connection stays in TLS.
        self.records = records
        self._records: RecordChannel | None = None
        self._records_first = b""  # records that came with the coordinator's close_notify
        self._register_sent = 0.0  # when REGISTER went out (the first RTT sample)
        # Our key (the coordinator binds our id to it) and the check of the coordinator's key; without a
        # verifier any coordinator key is accepted (Peer always passes one: pin or known-peers file).
        self.identity = identity or Identity.load()
        self._verify_coordinator = verify_coordinator or _accept_any
        self.coordinator_key: str | None = None
        self.peer_id = peer_id
        self._token = token
        family = family_of(coordinator.ip)
        self._local = local or Endpoint("::" if family == socket.AF_INET6 else "0.0.0.0", 0)
        self.nat = nat
        self.private = tuple(private)
        self.swarm = swarm
        self.ipv6 = tuple(ipv6)  # our global IPv6 addresses, announced with the bound port
        # Connect attempts within a budget: a lost SYN must not cost the registration (nat/retry.py).
        self.retry = retry or ConnectBudget()
        self.birthday = birthday
        self.request_timeout = request_timeout
        self.registration: Registration | None = None
        # Our smallest round trip to the coordinator seen (REGISTER -> REGISTERED, our PINGs): the punch
        # bounds the round trip to a peer with it (punch_plan). A minimum, so a retransmission under loss
        # does not stretch it.
        self.rtt: float | None = None
        self.error: CoordinatorError | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._registered: asyncio.Future[Registered] | None = None
        self._requests: dict[str, asyncio.Future[Any]] = {}
        self._pings: dict[int, tuple[float, asyncio.Future[float]]] = {}
        self._orders: asyncio.Queue[Any] = asyncio.Queue()
        self._visitors: asyncio.Queue[Any] = asyncio.Queue()
        self._sessions: dict[str, PunchOrder] = {}
        self._ids = itertools.count(1)
        self._closed = asyncio.Event()
        self._log = log.bind(peer=peer_id, coordinator=str(coordinator))

    # ------------------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> ControlChannel:
        await self.register()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def observed(self) -> Endpoint:
        """Our public endpoint as the coordinator sees it (after :meth:`register`)."""
        if self.registration is None:
            raise RuntimeError("not registered")
        return self.registration.observed

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def register(self) -> Registration:
        """Connect from the bound local port and register; raises :class:`CoordinatorError` if refused."""
        if self._writer is not None:
            raise RuntimeError("register() was already called")
        loop = asyncio.get_running_loop()
        sock, attempts = await connect_retrying(
            lambda: control_socket(self._local), self.coordinator, self.retry, what="register"
        )
        try:
            local = endpoint_of(sock.getsockname())
        except BaseException:
            sock.close()
            raise
        ipv6 = tuple(Endpoint(ip, local.port) for ip in self.ipv6)
        hello = Register(self.peer_id, self._token, self.nat, self.private, self.swarm, ipv6, self.birthday)
        if self.records:
            reply = await self._register_with_records(sock, hello)
        else:
            reply = await self._register_in_tls(sock, hello)
        self._note_rtt(loop.time() - self._register_sent)
        self.registration = Registration(
            id=reply.id,
            local=local,
            observed=reply.observed,
            keepalive_interval=reply.keepalive_interval,
            keepalive_timeout=reply.keepalive_timeout,
            connect_attempts=len(attempts),
        )
        self._log = self._log.bind(local=str(local), observed=str(reply.observed))
        self._log.info("control.registered", connect_attempts=len(attempts), records=self._records is not None)
        return self.registration

    async def _register_in_tls(self, sock: socket.socket, hello: Register) -> Registered:
        """REGISTER over asyncio's TLS transport; the connection stays in TLS."""
        loop = asyncio.get_running_loop()
        try:
            # TLS first: the token below never travels in clear, and only to the coordinator we expect.
            self._reader, self._writer = await asyncio.open_connection(
                sock=sock, limit=MAX_FRAME_SIZE * 2, ssl=context(self.identity, server_side=False),
                server_hostname="", ssl_handshake_timeout=self.request_timeout)
        except ssl.SSLEOFError as exc:  # the connection ended mid-handshake (e.g. the server's hello deadline)
            sock.close()
            raise ConnectionResetError(f"the coordinator closed the connection during TLS: {exc}") from None
        except ssl.SSLError as exc:
            sock.close()
            raise SecureError(SecureErrorCode.HANDSHAKE_FAILED, f"TLS to the coordinator failed: {exc}") from None
        except BaseException:
            sock.close()
            raise
        try:
            self.coordinator_key = verify_peer(self._writer.get_extra_info("ssl_object"), self._verify_coordinator)
        except SecureError:
            self._writer.transport.abort()
            raise
        self._registered = loop.create_future()
        self._read_task = loop.create_task(self._read_loop())
        self._writer.write(PREAMBLE + encode_message(hello))
        self._register_sent = loop.time()
        try:
            return await asyncio.wait_for(asyncio.shield(self._registered), self.request_timeout)
        except BaseException:
            await self.close()
            raise

    async def _register_with_records(self, sock: socket.socket, hello: Register) -> Registered:
        """TLS handshake (the coordinator's key checked), REGISTER with our X25519 key, REGISTERED with the
        coordinator's, both leave TLS (close_notify both ways, record by record: nothing past the
        coordinator's close_notify is read as TLS), then the record layer on the bare socket."""
        loop = asyncio.get_running_loop()
        share = KeyShare()
        engine = TlsEngine(context(self.identity, server_side=False), server_side=False)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.request_timeout):
                self.coordinator_key = await engine_handshake(engine, sock, self._verify_coordinator)
        except TimeoutError:
            sock.close()
            raise SecureError(SecureErrorCode.TIMEOUT, f"no TLS with the coordinator within {self.request_timeout:g} s"
                              ) from None
        except BaseException:
            sock.close()
            raise
        try:
            async with asyncio.timeout(self.request_timeout):
                await engine_send(engine, sock, PREAMBLE + encode_message(dataclasses.replace(hello,
                                                                                            records=share.public)))
                self._register_sent = loop.time()
                reply = await _read_one_tls_message(engine, sock)
                if isinstance(reply, Error):
                    raise CoordinatorError(reply.code, reply.message, fatal=reply.fatal)
                if not isinstance(reply, Registered):
                    raise CoordinatorError(ErrorCode.UNEXPECTED_MESSAGE, f"expected registered, got {reply.TYPE}")
                if reply.records is None:
                    raise CoordinatorError(ErrorCode.UNEXPECTED_MESSAGE, "the coordinator did not answer with a "
                                           "record-layer key (an older server? use records=False)")
                assert self.coordinator_key is not None
                keys = share.derive(reply.records, is_client=True, client_key=self.identity.fingerprint,
                                    server_key=self.coordinator_key)
                self._records_first = await engine_unwrap(engine, sock)
            self._records = RecordChannel(keys)
            self._reader, self._writer = await asyncio.open_connection(sock=sock, limit=MAX_FRAME_SIZE * 2)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, RecordError):
                exc = CoordinatorError(ErrorCode.CLOSED, f"no record layer with the coordinator: {exc}")
            self._finish(exc if isinstance(exc, CoordinatorError) else None)
            if isinstance(exc, CoordinatorError):
                raise exc from None
            raise
        self._read_task = loop.create_task(self._read_loop())
        return reply

    async def close(self) -> None:
        """Close the control connection (the coordinator then unregisters us and cancels our sessions)."""
        self._finish(None)
        if self._read_task is not None and self._read_task is not asyncio.current_task():
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._read_task
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    # ------------------------------------------------------------------------------------- requests

    async def list_peers(self, swarm: str | None = None) -> PeerList:
        """The other registered peers (of ``swarm``, or all); ``.truncated`` if the server cut the list."""
        request_id = self._request_id()
        reply: Peers = await self._request(request_id, ListPeers(request_id, swarm))
        return PeerList(reply.peers, truncated=reply.truncated)

    async def connect(self, peer_id: str, *, relay_only: bool = False) -> PunchOrder:
        """Ask for a punch session with ``peer_id``; returns our PunchOrder (role initiator).
        ``relay_only``: skip the punch on both sides (both orders say relay-now)."""
        request_id = self._request_id()
        order: PunchOrder = await self._request(request_id, Connect(request_id, peer_id, relay_only))
        return order

    async def next_order(self, timeout: float | None = None) -> PunchOrder:
        """The next PUNCH we did not ask for (someone connects to us). Raises once the channel closed."""
        item = await asyncio.wait_for(self._orders.get(), timeout)
        if item is _CLOSED:
            self._orders.put_nowait(_CLOSED)  # every later waiter sees it too
            raise self._closed_error()
        assert isinstance(item, PunchOrder)
        return item

    async def orders(self) -> AsyncIterator[PunchOrder]:
        """Incoming punch orders until the channel closes."""
        while True:
            try:
                yield await self.next_order()
            except CoordinatorError:
                return

    async def expose(self, remote_port: int) -> Exposed:
        """Ask the coordinator to listen on ``remote_port`` of its public address for us (until this channel
        closes). Raises :class:`CoordinatorError` (``expose-*``, not fatal) when it refuses."""
        request_id = self._request_id()
        reply: Exposed = await self._request(request_id, Expose(request_id, remote_port))
        return reply

    async def next_visitor(self, timeout: float | None = None) -> Visitor:
        """The next visitor of one of our exposed ports (join it with :func:`join_visitor`). Raises once
        the channel closed."""
        item = await asyncio.wait_for(self._visitors.get(), timeout)
        if item is _CLOSED:
            self._visitors.put_nowait(_CLOSED)
            raise self._closed_error()
        assert isinstance(item, Visitor)
        return item

    async def report_result(
        self, session_id: str, outcome: Outcome | str, details: dict[str, Any] | None = None
    ) -> None:
        """Tell the coordinator how a session ended (for its logs and counters)."""
        self._send(Result(session_id, Outcome(outcome), details or {}))
        await self._drain()

    async def update_observed(self, observed: Endpoint) -> None:
        """Tell the coordinator our public endpoint moved (a sequential NAT's fresh mapping)."""
        self._send(Observed(observed))
        await self._drain()
        if self.registration is not None:
            self.registration = dataclasses.replace(self.registration, observed=observed)

    async def ping(self) -> float:
        """One round trip to the coordinator on the control connection, in seconds."""
        loop = asyncio.get_running_loop()
        seq = next(self._ids)
        future: asyncio.Future[float] = loop.create_future()
        self._pings[seq] = (loop.time(), future)
        try:
            self._send(Ping(seq))
            rtt = await asyncio.wait_for(future, self.request_timeout)
        finally:
            self._pings.pop(seq, None)
        self._note_rtt(rtt)
        return rtt

    def _note_rtt(self, sample: float) -> None:
        self.rtt = sample if self.rtt is None else min(self.rtt, sample)

    async def open_relay(
        self, order: PunchOrder, *, timeout: float = 30.0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the relay connection of ``order``'s session (see :func:`open_relay`)."""
        return await open_relay(order.relay, order.session_id, order.key, order.role, timeout=timeout,
                                **self.relay_credentials())

    def relay_credentials(self) -> dict[str, Any]:
        """``identity`` and ``verify`` for :func:`join_relay`: our key, and the coordinator's (pinned at
        registration) as the only key the relay may hold."""
        if self.coordinator_key is None:
            raise RuntimeError("register() first")
        return {"identity": self.identity, "verify": expect_key(self.coordinator_key, "the relay")}

    # ------------------------------------------------------------------------------------- plumbing

    def _request_id(self) -> str:
        return f"r{next(self._ids)}"

    async def _request(self, request_id: str, message: Message) -> Any:
        if self.registration is None:
            raise RuntimeError("register() first")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        try:
            self._send(message)
            return await asyncio.wait_for(future, self.request_timeout)
        finally:
            self._requests.pop(request_id, None)

    def _send(self, message: Message) -> None:
        if self.closed or self._writer is None:
            raise self._closed_error()
        data = encode_message(message)
        if self._records is not None:
            try:
                data = self._records.seal(data)
            except RecordError as exc:  # the record limit: the connection ends, we register again
                self._finish(CoordinatorError(ErrorCode.CLOSED, f"control channel records: {exc}"))
                raise self._closed_error() from None
        self._writer.write(data)

    async def _drain(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()

    def _closed_error(self) -> CoordinatorError:
        return self.error or CoordinatorError(ErrorCode.CLOSED, "the control channel is closed")

    async def _read_loop(self) -> None:
        assert self._reader is not None
        loop = asyncio.get_running_loop()
        decoder = FrameDecoder()
        reason: CoordinatorError | None = None
        try:
            if self._records is not None and self._records_first:
                decoder.feed(self._records.open(self._records_first))
                while (frame := decoder.next_frame()) is not None:
                    self._handle(decode_message(frame), loop.time())
            while True:
                # Silence beyond the keepalive timeout means the coordinator (or the path) is gone.
                timeout = None if self.registration is None else self.registration.keepalive_timeout
                data = await asyncio.wait_for(self._reader.read(READ_SIZE), timeout)
                now = loop.time()
                if not data:
                    if self._records is not None:
                        self._records.end()  # an end inside a record is an error, not a close
                    reason = CoordinatorError(ErrorCode.CLOSED, "the coordinator closed the connection")
                    break
                decoder.feed(data if self._records is None else self._records.open(data))
                while (frame := decoder.next_frame()) is not None:
                    self._handle(decode_message(frame), now)
        except ProtocolError as exc:
            reason = CoordinatorError(exc.code, f"the coordinator sent a bad frame: {exc.message}")
        except RecordError as exc:
            self._log.info("control.record_failed", code=exc.code.value, error=str(exc))
            reason = CoordinatorError(ErrorCode.CLOSED, f"the coordinator's records failed: {exc}")
        except TimeoutError:
            reason = CoordinatorError(ErrorCode.KEEPALIVE_TIMEOUT, "nothing heard from the coordinator")
        except (ConnectionError, OSError) as exc:
            reason = CoordinatorError(ErrorCode.CLOSED, f"control connection failed: {exc!r}")
        finally:
            self._finish(reason)

    def _handle(self, msg: Message, now: float) -> None:
        if isinstance(msg, Ping):
            self._send(Pong(msg.seq))
        elif isinstance(msg, Pong):
            sent, future = self._pings.get(msg.seq, (0.0, None))
            if future is not None and not future.done():
                future.set_result(now - sent)
        elif isinstance(msg, Registered):
            if self._registered is not None and not self._registered.done():
                self._registered.set_result(msg)
        elif isinstance(msg, Peers | Exposed):
            self._resolve(msg.request_id, msg)
        elif isinstance(msg, Visitor):
            self._visitors.put_nowait(msg)
        elif isinstance(msg, Punch):
            self._punch(msg, now)
        elif isinstance(msg, Cancel):
            order = self._sessions.get(msg.session_id)
            if order is not None:
                order.cancel_reason = msg.reason
                order.cancelled.set()
        elif isinstance(msg, Error):
            self._error_frame(msg)
        else:
            self._log.info("control.unexpected", type=msg.TYPE)

    def _punch(self, msg: Punch, now: float) -> None:
        order = PunchOrder.from_message(msg, now)
        # Remember orders for CANCEL; forget those long past their deadline.
        for sid, old in list(self._sessions.items()):
            if old.deadline + 120.0 < now:
                del self._sessions[sid]
        self._sessions[order.session_id] = order
        self._log.info("control.punch", session=order.session_id, role=order.role.value, peer=order.peer_id)
        if msg.request_id is None:
            self._orders.put_nowait(order)
        elif not self._resolve(msg.request_id, order):
            self._log.info("control.late_punch", session=order.session_id)

    def _resolve(self, request_id: str, value: Any) -> bool:
        future = self._requests.get(request_id)
        if future is None or future.done():
            return False
        future.set_result(value)
        return True

    def _error_frame(self, msg: Error) -> None:
        error = CoordinatorError(msg.code, msg.message, fatal=msg.fatal)
        if msg.request_id is not None:
            future = self._requests.get(msg.request_id)
            if future is not None and not future.done():
                future.set_exception(error)
        if msg.fatal:
            self.error = error
            self._log.info("control.error", code=msg.code, message=msg.message)

    def _finish(self, reason: CoordinatorError | None) -> None:
        """Fail everything still waiting and close the connection. Idempotent."""
        if self._closed.is_set():
            return
        if self.error is None:
            self.error = reason
        error = self._closed_error()
        futures: list[asyncio.Future[Any]] = [*self._requests.values()]
        futures += [future for _, future in self._pings.values()]
        if self._registered is not None:
            futures.append(self._registered)
        for future in futures:
            if not future.done():
                future.set_exception(error)
                future.exception()  # mark retrieved: nobody may be waiting any more
        self._orders.put_nowait(_CLOSED)
        self._visitors.put_nowait(_CLOSED)
        self._closed.set()
        if self._writer is not None:
            self._writer.close()


async def join_relay(
    relay: Endpoint,
    session_id: str,
    key: bytes,
    role: Role,
    *,
    identity: Identity,
    verify: Verifier,
    timeout: float = 30.0,
) -> socket.socket:
    """Join the relay of a session on a new connection; the raw socket once the coordinator paired both roles.

    The join runs in TLS (``identity`` is the key our control connection registered with: the coordinator
    accepts a join only from the key of the peer in ``role``, once; ``verify`` checks the relay's key).
    After RELAY-OK both sides leave TLS; the join reads record by record and nothing past the relay's
    close_notify, so every later byte on the socket is the other peer's.

    Waits (up to ``timeout``) for the other peer to join too. Raises :class:`CoordinatorError` if the
    coordinator refuses (wrong key, used join, unknown session...), :class:`SecureError` if TLS fails.
    """
    loop = asyncio.get_running_loop()

    def new_socket() -> socket.socket:
        sock = socket.socket(family_of(relay.ip), socket.SOCK_STREAM)
        sock.setblocking(False)
        # TLS's last flight and RELAY are separate small writes: no Nagle wait between them
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    # Lost SYNs are retried within min(10 s, timeout); the rest of ``timeout`` is for the partner to join.
    deadline = loop.time() + timeout
    async with asyncio.timeout_at(deadline):
        sock, _ = await connect_retrying(new_socket, relay, ConnectBudget(budget=min(10.0, timeout)),
                                         what="relay-join")
    try:
        async with asyncio.timeout_at(deadline):
            tls = TlsEngine(context(identity, server_side=False), server_side=False)
            await engine_handshake(tls, sock, verify)
            proof = relay_proof(key, session_id, role)
            await engine_send(tls, sock, PREAMBLE + encode_message(Relay(session_id, role, proof)))
            reply = await _read_one_tls_message(tls, sock)
            if isinstance(reply, Error):
                raise CoordinatorError(reply.code, reply.message)
            if not isinstance(reply, RelayOk) or reply.session_id != session_id:
                raise CoordinatorError(ErrorCode.UNEXPECTED_MESSAGE, f"expected relay-ok, got {reply.TYPE}")
            leftover = await engine_unwrap(tls, sock)
        if leftover:  # cannot happen with record-by-record reads; never lose the partner's bytes silently
            raise CoordinatorError(ErrorCode.UNEXPECTED_MESSAGE, "the relay sent bytes inside its close_notify")
    except BaseException:
        sock.close()
        raise
    return sock


async def join_visitor(visitor: Visitor, *, identity: Identity, verify: Verifier, timeout: float = 10.0
                       ) -> socket.socket:
    """Join a visitor of an exposed port (a relay join in the responder role, with the visitor's key, in
    TLS with our identity key: the coordinator hands the visitor only to the key that exposed the port);
    every byte on the returned socket is the visitor's."""
    return await join_relay(visitor.relay, visitor.visitor_id, visitor.key, Role.RESPONDER, timeout=timeout,
                            identity=identity, verify=verify)


async def open_relay(
    relay: Endpoint,
    session_id: str,
    key: bytes,
    role: Role,
    *,
    identity: Identity,
    verify: Verifier,
    timeout: float = 30.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """:func:`join_relay` as asyncio streams: every byte the reader gives is the other peer's."""
    sock = await join_relay(relay, session_id, key, role, identity=identity, verify=verify, timeout=timeout)
    return await asyncio.open_connection(sock=sock)


async def _read_one_tls_message(tls: TlsEngine, sock: socket.socket) -> Message:
    """One frame from inside ``tls`` (the relay sends RELAY-OK or ERROR, then close_notify; a control
    connection's REGISTERED with the record-layer key, then close_notify)."""
    decoder = FrameDecoder()
    try:
        while (frame := decoder.next_frame()) is None:
            data = await engine_recv(tls, sock)
            if not data:
                raise CoordinatorError(ErrorCode.CLOSED, "the relay closed the connection")
            decoder.feed(data)
    except ProtocolError as exc:
        raise CoordinatorError(exc.code, exc.message) from None
    return decode_message(frame)


def _accept_any(fingerprint: str) -> None:
    """The default coordinator check of a bare ControlChannel: none (callers pin; see docs/security.md)."""
