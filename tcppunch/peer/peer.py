"""The asyncio :class:`Peer`: registers with a coordinator, connects to other peers by id and accepts
their connections, direct by TCP simultaneous open when it can, through the coordinator's relay when it
cannot. A thin driver: the coordinator protocol lives in ``tcppunch.coordinator.control``, the punch in
``tcppunch.punch``, NAT measurement in ``tcppunch.nat``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import structlog

from tcppunch.coordinator.control import (
    ControlChannel,
    CoordinatorError,
    PeerList,
    PunchOrder,
    Registration,
    join_relay,
    punch_plan,
)
from tcppunch.nat.detect import ServerUnreachable, detect
from tcppunch.nat.local import local_network
from tcppunch.nat.retry import ConnectBudget, ConnectRetryError
from tcppunch.nat.sockets import endpoint_of, family_of, route_source_ip
from tcppunch.nat.tcp_tests import StunTcpError, TcpStunConnection, mapped_endpoint
from tcppunch.peer.coordinators import CoordinatorName, Coordinators, first_answer
from tcppunch.peer.race import RELAY_AFTER, ConnectionRace, Established
from tcppunch.peer.sessions import (
    PREFACE_DEDICATED,
    PREFACE_SESSION,
    PREFACE_SIZE,
    PREFACE_TIMEOUT,
    PREFACE_UPGRADE,
    PeerSession,
    SessionPool,
)
from tcppunch.peer.types import ConnectFailed, Connection, ConnectionInfo, FailureCode, Method, RelayMode
from tcppunch.portmap.client import PortMapper, start_checked
from tcppunch.punch.birthday import DEFAULT_LIMITS, BirthdayLimits
from tcppunch.punch.dispatch import PortDispatcher
from tcppunch.punch.engine import punch
from tcppunch.punch.plan import CandidateKind, PunchAttempt, PunchFailed, PunchPlan, PunchResult
from tcppunch.punch.sockets import reuse_listener
from tcppunch.session.driver import MuxStream
from tcppunch.session.identity import Identity, KnownPeers, TrustPolicy, parse_fingerprint
from tcppunch.session.mux import DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT
from tcppunch.session.secure import ChannelSpec, SecureError, SecureErrorCode, secure_streams
from tcppunch.wire.coord import ErrorCode, Outcome, RelayAdvice, Role
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import MappingBehaviour, NatReport, PortMapping, PortMappingProtocol

T = TypeVar("T")
log = structlog.get_logger("tcppunch.peer")

# Registering again after the control connection dropped: 0.1 s doubling to 5 s, about 4 minutes in all.
REREGISTER_ATTEMPTS = 55
# Behind a sequential NAT the peers predict our next public port from the last one the coordinator knows.
# That prediction is refreshed after every session (in the background) and, while idle, this often: other
# hosts behind the same NAT move its counter too. A connect() finding it older than this refreshes first.
PREDICTION_MAX_AGE = 20.0
# How long a relay join refused for an unknown session waits for the CANCEL that says why.
CANCEL_GRACE = 1.0
# start(): a detection or registration that reached the coordinator but broke off (a TLS flight or the
# REGISTERED lost to retransmission back-off past the server's 5 s hello deadline or our 10 s waits, the
# connection reset mid-handshake) is tried again, 0.5 s doubling to 4 s apart, while this many seconds of
# start-up are left. TCP connects have their own budget (nat/retry.py); an exhausted one, a refusal or a
# coordinator's answer (bad token, ...) ends start() at once.
START_BUDGET = 30.0


class Peer:
    """One registered peer. Serves many concurrent :meth:`connect` and incoming connections.

    ``coordinator``: HOST:PORT, or several (a cluster: we register at the first that answers and move on
    when it fails). A host name stands for all its addresses (A and AAAA, families interleaved), resolved
    at :meth:`start` and again each time we must register again (:mod:`tcppunch.peer.coordinators`).

    ``nat``: this host's NAT report; when None and ``detect_nat`` is true, :meth:`start` measures it
    against the coordinator (the same HOST:PORT serves STUN), which peers need to predict ports and to
    know when only a relay can work. ``port``: the local port to punch from (0: any free one).
    ``on_stage(name, data)``: progress callbacks (detect, registered, schedule, punch, direct, relay,
    relayed, refused, incoming_failed, ...). ``accept_filter(peer_id, peer_nat)``: asked for each incoming
    session before any punching; False refuses it (the caller's ``connect()`` fails with code
    ``cancelled`` and a reason that says ``refused``). ``ipv6``: announce this host's global IPv6 address
    (with the punch port) and race it first, Happy-Eyeballs style; False keeps to IPv4 (also leaving out
    the IPv6 addresses of a coordinator's host name). ``birthday``:
    the limits of birthday punching (docs/punching.md), used when one NAT maps randomly and the other
    filters by port; None opts out (the coordinator then sends those sessions to the relay).
    ``port_mapping``: before registering, ask the default gateway to map the punch port (True: PCP,
    NAT-PMP and UPnP-IGD; or the protocols to try); a granted mapping is renewed while the peer runs,
    deleted by :meth:`close`, and peers connect to it first. Off by default: it opens an inbound port on
    the router, which should be the user's choice.

    Security (docs/security.md): every connection, punched or relayed, runs TLS 1.3 between the two
    peers' keys, bound to its punch session, before any byte of yours. ``identity``: our key (an
    :class:`Identity` or a key file; default: the config directory's, created on first use). Whose key is
    whose: ``peer_keys`` pins ids to fingerprints (``connect --peer-key``); ``allow`` lists the only keys
    that may connect or be connected to (``listen --allow``); otherwise the known-peers file
    (``known_peers``: a path, ``"default"`` for the config directory's, None for memory only) trusts each
    id's first key and refuses a changed one; ``trust_coordinator`` also requires a first-seen key to be
    the one the coordinator bound to that id. ``coordinator_key`` pins the coordinator (else the
    known-peers file). ``encrypt=False`` is for measurements only: both peers must use it, and every
    byte then crosses the network in clear and unauthenticated. ``session_keepalive``: (interval, timeout)
    of every session's keepalive: a path that went silent (an expired NAT mapping) ends its session within
    their sum, reported as the ``session_lost`` stage; the next stream to that peer punches again.
    """

    def __init__(
        self,
        coordinator: Endpoint | str | CoordinatorName | Sequence[Endpoint | str | CoordinatorName],
        peer_id: str,
        token: str,
        *,
        bind: str = "0.0.0.0",
        port: int = 0,
        nat: NatReport | None = None,
        detect_nat: bool = True,
        relay: RelayMode = RelayMode.AUTO,
        swarm: str | None = None,
        relay_timeout: float = 30.0,
        on_stage: Callable[[str, dict[str, Any]], None] | None = None,
        accept_filter: Callable[[str, NatReport | None], bool] | None = None,
        reconnect: bool = True,
        birthday: BirthdayLimits | None = DEFAULT_LIMITS,
        ipv6: bool = True,
        port_mapping: bool | tuple[PortMappingProtocol, ...] = False,
        identity: Identity | str | Path | None = None,
        peer_keys: Mapping[str, str] | None = None,
        allow: Iterable[str] | None = None,
        known_peers: KnownPeers | str | Path | None = "default",
        trust_coordinator: bool = False,
        coordinator_key: str | None = None,
        encrypt: bool = True,
        session_keepalive: tuple[float, float] = (DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT),
    ) -> None:
        # Several coordinators (a cluster; host names stand for all their addresses): register at the first
        # that answers, fail over to the next.
        listed = [coordinator] if isinstance(coordinator, (str, Endpoint, CoordinatorName)) else list(coordinator)
        self._coordinators = Coordinators(listed, ipv6=ipv6)
        self._current = 0
        self.peer_id = peer_id
        self.relay_mode = relay
        self.swarm = swarm
        self.relay_timeout = relay_timeout
        self.nat = nat
        self._token = token
        self._bind = bind
        self._port = port
        self._detect = detect_nat and nat is None
        self._on_stage = on_stage
        self._accept_filter = accept_filter
        self._reconnect = reconnect
        self._birthday = birthday
        self._ipv6 = ipv6
        self._local6: Endpoint | None = None  # our IPv6 punch endpoint (global address, punch port)
        self._mapping_protocols: tuple[PortMappingProtocol, ...] = (
            tuple(PortMappingProtocol) if port_mapping is True else tuple(port_mapping or ()))
        self._mapper: PortMapper | None = None
        self.identity = identity if isinstance(identity, Identity) else Identity.load(identity)
        if not isinstance(known_peers, KnownPeers):
            known_peers = KnownPeers(None if known_peers is None else
                                     (KnownPeers.default().path if known_peers == "default" else known_peers))
        allowed = frozenset(parse_fingerprint(k) for k in allow) if allow is not None else frozenset()
        self.trust = TrustPolicy(known=known_peers,
                                 pins={peer: parse_fingerprint(k) for peer, k in (peer_keys or {}).items()},
                                 allowed=allowed, allow_unknown=allow is None, trust_coordinator=trust_coordinator)
        self.coordinator_key = None if coordinator_key is None else parse_fingerprint(coordinator_key)
        self.encrypt = encrypt
        if not encrypt:
            log.warning("peer.unencrypted", peer=peer_id,
                        warning="encrypt=False: connections are NOT authenticated and cross the network in clear")
        self._channel: ControlChannel | None = None
        self._dispatcher: PortDispatcher | None = None
        # Established (and secured) incoming dedicated connections.
        self._incoming: asyncio.Queue[Connection | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._serving: asyncio.Task[None] | None = None
        self._closed = False
        self.timings: dict[str, float] = {}
        # Behind a sequential NAT every new connection takes the NAT's next port, so punches (which
        # predict those ports) and refreshes of our public port take turns.
        self._nat_turn = asyncio.Lock()
        # When our public port (the start of the peers' prediction) was last learnt; None once a punch or
        # relay join has moved the NAT's counter past it.
        self._prediction_at: float | None = None
        self._log = log.bind(peer=peer_id)
        interval, timeout = session_keepalive
        if not (interval > 0 and timeout > 0):
            raise ValueError("session_keepalive: interval and timeout must be positive seconds")
        self._sessions = SessionPool(self._connect_session, self._session_started, on_lost=self._session_lost,
                                     keepalive=(interval, timeout))

    @property
    def coordinators(self) -> tuple[Endpoint, ...]:
        """The coordinator addresses we try, in order (host names' after :meth:`start` resolved them)."""
        return self._coordinators.candidates

    @property
    def coordinator(self) -> Endpoint:
        """The coordinator we are registered at (or will try first)."""
        if not self.coordinators:
            raise RuntimeError("the coordinator's host name is resolved by start()")
        return self.coordinators[self._current]

    async def _resolve_coordinators(self, *, strict: bool) -> bool:
        """Resolve the coordinators' host names (again), keeping our place in the list; whether the current
        address is still in it. ``strict`` (at start): a name without an address raises, naming it."""
        current = self.coordinators[self._current] if self.coordinators else None
        before = {name: self._coordinators.addresses(name) for name in self._coordinators.names}
        for error in await self._coordinators.resolve(strict=strict):
            self._stage("resolve_failed", {"coordinator": str(error.name), "error": str(error)})
        for name, was in before.items():
            now = self._coordinators.addresses(name)
            if name.literal is None and now != was:
                self._stage("resolved", {"coordinator": str(name), "addresses": ",".join(map(str, now))})
        self._current = self.coordinators.index(current) if current in self.coordinators else 0
        return current in self.coordinators

    @property
    def register_attempts(self) -> int:
        """TCP connects the current registration took (lost SYNs are retried; 0 before registering)."""
        registration = None if self._channel is None else self._channel.registration
        return 0 if registration is None else registration.connect_attempts

    # ------------------------------------------------------------------ life cycle
    async def __aenter__(self) -> Peer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Measure the NAT (unless given), register, and start answering incoming punch orders."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self._resolve_coordinators(strict=True)
        if self._detect:
            nat = self.nat = await self._within_start_budget(self._detect_at_any, started)
            self.timings["detect"] = loop.time() - started
            self._stage("detected", {"mapping": _value(nat.tcp.mapping), "verdict": nat.verdict})
        port = self._port or _free_port(self._bind)
        if self._mapping_protocols:
            await self._map_port(port)
        # Over an IPv6 control connection our punch endpoint is IPv6 already; with a coordinator on loopback
        # every peer is on this host and IPv6 adds nothing.
        v4_coordinator = family_of(self.coordinator.ip) == socket.AF_INET and not self.coordinator.ip.startswith("127.")
        self._local6 = _ipv6_endpoint(port) if self._ipv6 and v4_coordinator else None
        registration = await self._within_start_budget(lambda: self._register(Endpoint(self._bind, port)), started)
        if not self.sequential_nat:
            # Many punches share our one punch port: one listener routes incoming connections by session.
            self._dispatcher = PortDispatcher(registration.local, also=[self._local6] if self._local6 else [])
            self._dispatcher.start()
        self._serving = loop.create_task(self._serve())
        if self.sequential_nat:
            self._spawn(self._keep_prediction_fresh())

    async def _within_start_budget(self, step: Callable[[], Coroutine[Any, Any, T]], started: float) -> T:
        """``step()``, tried again after a transient failure (:func:`_transient`) while START_BUDGET lasts;
        each retry is a stage (``start_retry``: the step's error, the attempt, the delay)."""
        loop = asyncio.get_running_loop()
        delay, attempt = 0.5, 1
        while True:
            try:
                return await step()
            except (ConnectFailed, CoordinatorError, OSError, TimeoutError, SecureError) as exc:
                # our own broken-off registration may hold the id until the server sees its close
                ghost = attempt > 1 and isinstance(exc, CoordinatorError) and exc.code is ErrorCode.ID_TAKEN
                if not (_transient(exc) or ghost) or loop.time() + delay - started > START_BUDGET:
                    raise
                self._stage("start_retry", {"attempt": attempt, "error": f"{type(exc).__name__}: {exc}",
                                            "in_seconds": delay})
            await asyncio.sleep(delay)  # back-off between attempts, not a synchronisation
            delay, attempt = min(delay * 2, 4.0), attempt + 1

    async def _map_port(self, port: int) -> None:
        """Ask our router for an inbound mapping of the punch port (PCP, NAT-PMP, UPnP-IGD); the NAT report
        we register with carries the outcome, and a granted mapping becomes our peers' first candidate."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        mapper = PortMapper(port, protocols=self._mapping_protocols)
        public = None if self.nat is None or self.nat.public is None else self.nat.public.ip
        support = await start_checked(mapper, public)
        mapping, error = support.mapping, support.error
        self.nat = (self.nat or NatReport()).replace(port_mapping=support)
        self._mapper = mapper if mapping is not None else None
        self.timings["port_mapping"] = loop.time() - started
        self._stage("port_mapping", {"mapping": None if mapping is None else str(mapping.external),
                                     "protocol": None if mapping is None else mapping.protocol.value,
                                     "error": error, "seconds": round(self.timings["port_mapping"], 4)})

    @property
    def port_mapping(self) -> PortMapping | None:
        """The inbound mapping our router granted for the punch port (``port_mapping=True``), if any."""
        return None if self._mapper is None else self._mapper.mapping

    async def _detect_at_any(self) -> NatReport:
        """Measure the NAT against the first coordinator that answers (each in turn)."""
        turn = 0
        loop = asyncio.get_running_loop()
        while True:
            self._stage("detect", {"server": str(self.coordinator)})
            began = loop.time()
            try:
                return await detect(server=self.coordinator, timeout=2.0)
            except ServerUnreachable as exc:
                if turn == len(self.coordinators) - 1:
                    # Within the TCP connect budget the server was reached (or refused at once): a STUN
                    # answer lost under loss, worth another try; a spent connect budget is not.
                    kind = ConnectFailed if loop.time() - began >= ConnectBudget().budget else _DetectBrokenOff
                    raise kind(f"coordinator {self.coordinator} unreachable: {exc}", peer="",
                               code=FailureCode.UNREACHABLE) from exc
                self._log.info("peer.coordinator_unreachable", coordinator=str(self.coordinator), error=str(exc))
                self._current = (self._current + 1) % len(self.coordinators)
                turn += 1

    async def _register(self, local: Endpoint, *, skip_current: bool = False) -> Registration:
        """Register at the current coordinator, else at each other one in turn (``skip_current``: begin
        with the next, the current one just dropped us); raises the last one's error."""
        def here(where: Endpoint) -> Coroutine[Any, Any, Registration]:
            self._current = self.coordinators.index(where)
            return self._register_here(local)

        skip = 1 if skip_current and len(self.coordinators) > 1 else 0
        return await first_answer(self.coordinators, here, start=self._current + skip)

    async def _register_here(self, local: Endpoint) -> Registration:
        loop = asyncio.get_running_loop()
        private = [Endpoint(route_source_ip(self.coordinator.ip), local.port)]
        channel = ControlChannel(self.coordinator, self.peer_id, self._token, local=local, nat=self.nat,
                                 private=private, swarm=self.swarm, birthday=self._birthday is not None,
                                 ipv6=[self._local6.ip] if self._local6 is not None else [],
                                 identity=self.identity, verify_coordinator=self._check_coordinator)
        registered_at = loop.time()
        registration = await channel.register()
        self._channel = channel
        self.timings["register"] = loop.time() - registered_at
        self._prediction_at = loop.time()  # the control connection is our NAT's latest mapping
        self._log = log.bind(peer=self.peer_id, local=str(registration.local), observed=str(registration.observed))
        self._stage("registered", {"local": str(registration.local), "observed": str(registration.observed),
                                   "coordinator": str(self.coordinator), "attempts": registration.connect_attempts,
                                   "seconds": round(self.timings["register"], 4)})
        return registration

    async def _serve(self) -> None:
        """Answer incoming orders; when the control connection drops, register again (bounded back-off)."""
        while True:
            await self._serve_orders()
            if self._closed or not self._reconnect:
                break
            if not await self._register_again():
                break
        if not self._closed:
            self._incoming.put_nowait(None)  # accept() callers learn that this peer is gone

    async def _register_again(self) -> bool:
        local = self.local
        delay = 0.1
        for attempt in range(1, REREGISTER_ATTEMPTS + 1):
            if self._closed:
                return False
            self._stage("reconnecting", {"attempt": attempt, "in_seconds": round(delay, 2)})
            await asyncio.sleep(delay)  # back-off between attempts, not a synchronisation
            try:
                # a DNS change is followed: a name may point elsewhere now
                kept = await self._resolve_coordinators(strict=False)
                await self._register(local, skip_current=attempt == 1 and kept)
                return True
            except (CoordinatorError, OSError, TimeoutError, SecureError) as exc:
                self._log.info("peer.register_failed", attempt=attempt, error=str(exc))
                # Our id is still held (the dead node's claim lives until its TTL): it frees at a moment we
                # cannot know, so ask often.
                taken = isinstance(exc, CoordinatorError) and exc.code is ErrorCode.ID_TAKEN
            delay = min(delay * 2, 1.0 if taken else 5.0)
        self._stage("lost", {"attempts": REREGISTER_ATTEMPTS})
        return False

    async def close(self) -> None:
        """Unregister and stop; connections already handed out stay open (close them yourself)."""
        if self._closed:
            return
        self._closed = True
        if self._channel is not None:
            await self._channel.close()
        if self._dispatcher is not None:
            await self._dispatcher.close()
        await self._sessions.close()
        if self._mapper is not None:
            await self._mapper.close()
        for task in [*self._tasks, *([self._serving] if self._serving else [])]:
            task.cancel()
        for task in [*self._tasks, *([self._serving] if self._serving else [])]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._incoming.put_nowait(None)

    @property
    def observed(self) -> Endpoint:
        """Our public endpoint as the coordinator sees it."""
        return self._control.observed

    @property
    def local6(self) -> Endpoint | None:
        """Our IPv6 punch endpoint (global address, punch port) announced to peers, or None."""
        return self._local6

    @property
    def local(self) -> Endpoint:
        """The local endpoint we punch from (the control connection's port)."""
        registration = self._control.registration
        assert registration is not None
        return registration.local

    @property
    def _control(self) -> ControlChannel:
        if self._channel is None:
            raise RuntimeError("the peer is not started (use 'async with Peer(...)' or await start())")
        return self._channel

    # ------------------------------------------------------------------ public operations
    async def list_peers(self, swarm: str | None = None) -> PeerList:
        """Other peers registered with the coordinator (in ``swarm``, or in our own swarm if we have one).
        A list; ``.truncated`` says the coordinator listed only the first of them."""
        return await self._control.list_peers(swarm if swarm is not None else self.swarm)

    async def ping(self) -> float:
        """One round trip to the coordinator on the control connection, in seconds."""
        return await self._control.ping()

    async def connect(self, peer_id: str, *, relay: RelayMode | None = None, timeout: float | None = 60.0
                      ) -> Connection:
        """Open a connection to ``peer_id``; raises :class:`ConnectFailed` with the reason (code
        ``peer-key-mismatch`` if the other end does not hold the key we expect for ``peer_id``)."""
        try:
            async with asyncio.timeout(timeout):
                sock, info = await self.connect_raw(peer_id, relay)
                return await self._secure(sock, info, PREFACE_DEDICATED)
        except TimeoutError:
            raise ConnectFailed(f"no connection to {peer_id} within {timeout} s", peer=peer_id,
                                code=FailureCode.TIMEOUT) from None

    async def open_stream(self, peer_id: str, data: bytes = b"") -> MuxStream:
        """A new stream to ``peer_id`` on the pair's one session (``data`` rides in its opening frame).

        The first stream sets the session up (one punch, or the relay); later ones cost no round trip to
        the coordinator and no punch. Raises :class:`ConnectFailed` if no session can be made, and
        ``SessionClosedError`` (a ConnectionError) on a stream whose session died.
        """
        return await self._sessions.open_stream(peer_id, data)

    async def accept_stream(self, timeout: float | None = None) -> MuxStream:
        """The next stream another peer opened to us (``stream.peer`` names it)."""
        return await self._sessions.accept_stream(timeout)

    def sessions(self) -> list[PeerSession]:
        """Our sessions, one per peer: method now and history (``relay → direct at 1.2 s``)."""
        return self._sessions.sessions()

    async def _connect_session(self, peer_id: str) -> Connection:
        (sock, info), race = await self._connect_race(peer_id, None, PREFACE_SESSION)
        try:
            conn = await self._secure(sock, info, PREFACE_SESSION)
        except BaseException:
            await race.cancel()
            raise
        if info.method is Method.RELAY and race.running:
            self._spawn(self._upgrade_later(race, info.session_id))  # the punch goes on: move when it wins
        else:
            await race.cancel()
        return conn

    async def _upgrade_later(self, race: ConnectionRace, session_id: str) -> None:
        """Initiator: the punch that kept running won after the session started on the relay: tell the
        other side (UPGRADE preface on the direct connection) and move the session there."""
        try:
            while (later := await race.next()) is not None:
                sock, info = later
                entry = self._sessions.by_connection(session_id)
                if info.method is not Method.DIRECT or entry is None or entry.session.closed:
                    sock.close()
                    continue
                await asyncio.get_running_loop().sock_sendall(sock, PREFACE_UPGRADE)
                await self._migrate(entry, await self._secure(sock, info, PREFACE_UPGRADE))
                return
        except (ConnectFailed, ConnectionError, OSError) as exc:
            self._log.info("peer.upgrade_failed", session=session_id, error=str(exc))
        finally:
            await race.cancel()

    async def _migrate(self, entry: PeerSession, conn: Connection) -> None:
        await entry.session.migrate(conn.reader, conn.writer, conn.info.method.value)
        self._stage("upgraded", {"peer": entry.peer, "history": entry.session.describe_history(),
                                 "remote": str(conn.remote)})

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _session_started(self, entry: PeerSession) -> None:
        self._stage("session", entry.to_json())

    def _session_lost(self, entry: PeerSession) -> None:
        """A session died under us (its path went silent past the keepalive, or broke): say so. Its
        streams have failed with the reason; the next open_stream() to that peer sets up a new one."""
        code = entry.session.close_code
        interval, timeout = self._sessions.keepalive
        data = {"peer": entry.peer, "session": entry.info.session_id, "method": entry.session.path,
                "code": None if code is None else code.name, "reason": str(entry.session.error),
                "bound_s": interval + timeout}
        self._log.warning("peer.session_lost", **{("remote_peer" if k == "peer" else k): v for k, v in data.items()})
        if self._on_stage is not None:
            self._on_stage("session_lost", data)

    async def _abandon(self, order: PunchOrder) -> None:
        """Tell the coordinator we gave up, so that the other peer stops at once (shielded: runs while
        the caller is being cancelled)."""
        await asyncio.shield(self._report(order, Outcome.ABANDONED, {"reason": "gave up"}))

    async def accept(self, timeout: float | None = None) -> Connection:
        """The next connection another peer opened to us. Raises ConnectionError once the peer closed."""
        item = await asyncio.wait_for(self._incoming.get(), timeout)
        if item is None:
            self._incoming.put_nowait(None)  # every later accept() sees the end too
            raise ConnectionError("the peer is closed")
        return item

    async def incoming(self) -> AsyncIterator[Connection]:
        """Incoming connections until the peer closes."""
        while True:
            try:
                yield await self.accept()
            except ConnectionError:
                return

    # ------------------------------------------------------------------ internals
    async def connect_raw(self, peer_id: str, relay: RelayMode | None) -> tuple[socket.socket, ConnectionInfo]:
        """A dedicated connection to ``peer_id`` as a connected socket, before the secure channel."""
        first, race = await self._connect_race(peer_id, relay, PREFACE_DEDICATED)
        await race.cancel()
        return first

    async def _connect_race(self, peer_id: str, relay: RelayMode | None, preface: bytes
                            ) -> tuple[Established, ConnectionRace]:
        """The first connection to ``peer_id``, on which ``preface`` was sent (it tells the other side what
        the connection is for), and the race that may still yield a direct one."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        if not self.sequential_nat:
            (sock, info), race = await self._request_and_establish(peer_id, started, relay, preface)
        else:
            async with self._nat_turn:
                if self._prediction_stale():
                    # OBSERVED goes out on the control connection before our CONNECT: the coordinator
                    # handles them in order, so no round trip is spent waiting for it to take effect
                    await self._refresh_observed(confirm=False)
                self._prediction_at = None  # the punch moves our NAT's counter
                try:
                    (sock, info), race = await self._request_and_establish(peer_id, started, relay, preface)
                finally:
                    self._refresh_soon()  # off the critical path: ready for whoever connects next
        try:
            sock.setblocking(False)
            await loop.sock_sendall(sock, preface)
        except OSError as exc:
            sock.close()
            await race.cancel()
            raise ConnectFailed(f"connection to {peer_id} broke at once: {exc}", peer=peer_id) from exc
        return (sock, info), race

    async def _request_and_establish(self, peer_id: str, started: float, relay: RelayMode | None, preface: bytes
                                     ) -> tuple[Established, ConnectionRace]:
        mode = relay or self.relay_mode
        self._stage("schedule", {"peer": peer_id})
        try:
            order = await self._control.connect(peer_id, relay_only=mode is RelayMode.ALWAYS)
        except CoordinatorError as exc:
            raise ConnectFailed(f"the coordinator refused: {exc.message} ({exc.code})", peer=peer_id,
                                code=exc.code) from exc
        try:
            return await self._establish(order, started, mode, relay_early=preface == PREFACE_SESSION)
        except asyncio.CancelledError:  # connect() timed out or the caller cancelled it
            await self._abandon(order)
            raise

    @property
    def sequential_nat(self) -> bool:
        """Whether our NAT gives each new connection the next port (so peers must predict ours); not when
        our router maps the punch port for us (peers then come in through the mapping)."""
        tcp = None if self.nat is None else self.nat.tcp
        return (self._mapper is None and tcp is not None
                and tcp.mapping not in (None, MappingBehaviour.ENDPOINT_INDEPENDENT)
                and tcp.port_delta not in (None, 0))

    def _prediction_stale(self) -> bool:
        at = self._prediction_at
        return at is None or asyncio.get_running_loop().time() - at > PREDICTION_MAX_AGE

    def _refresh_soon(self) -> None:
        """Refresh our public port in the background after a session, taking the NAT's turn (a punch that
        starts meanwhile waits for it, and then predicts from the fresh port)."""
        if self._closed:
            return

        async def refresh() -> None:
            async with self._nat_turn:
                if self._prediction_at is None:
                    await self._refresh_observed()

        self._spawn(refresh())

    async def _keep_prediction_fresh(self) -> None:
        """While idle, refresh our public port every PREDICTION_MAX_AGE / 2 (until the peer closes)."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(PREDICTION_MAX_AGE / 2)  # a period, not a synchronisation
            async with self._nat_turn:
                at = self._prediction_at
                if at is None or loop.time() - at >= PREDICTION_MAX_AGE / 2:
                    await self._refresh_observed()

    async def _refresh_observed(self, *, confirm: bool = True) -> None:
        """Learn where our NAT's port counter stands (one STUN binding from the punch port) and tell the
        coordinator, so that the next punch predicts from a fresh port, not the control connection's.
        ``confirm``: wait until the coordinator applied it (a PING after OBSERVED) — for another peer's
        CONNECT, which arrives on another connection; our own CONNECT after it needs no wait."""
        # A sequential NAT gives any new connection its next port, whatever the local port: use a fresh
        # one, so that no two refreshes share a 5-tuple (the second would hit our TIME_WAIT, or revive the
        # NAT's entry for the first with its old port). The server answers STUN on its port + 1 too.
        stun = Endpoint(self.coordinator.ip, self.coordinator.port + 1)
        try:
            conn = await TcpStunConnection.open(Endpoint(self.local.ip, 0), stun, ConnectBudget(budget=4.0))
            try:
                mapped = mapped_endpoint(await conn.request(timeout=2.0))
            finally:
                conn.close()
            await self._control.update_observed(mapped)
            # The server handles a connection's frames in order: once this PING is answered, the new port
            # is in place for whoever connects to us next (their CONNECT comes on another connection).
            if confirm:
                await self._control.ping()
            self._prediction_at = asyncio.get_running_loop().time()
        except (StunTcpError, CoordinatorError, OSError, TimeoutError) as exc:
            self._log.info("peer.refresh_failed", error=str(exc))
            return
        self._stage("refreshed", {"observed": str(mapped)})

    async def _serve_orders(self) -> None:
        async for order in self._control.orders():
            task = asyncio.get_running_loop().create_task(self._answer(order))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, order: PunchOrder) -> None:
        if self._accept_filter is not None and not self._accept_filter(order.peer_id, order.peer_nat):
            self._stage("refused", {"peer": order.peer_id, "session": order.session_id})
            await self._report(order, Outcome.ABANDONED, {"reason": "refused"})
            return
        try:
            if self.sequential_nat:
                async with self._nat_turn:
                    self._prediction_at = None  # the punch moves our NAT's counter
                    try:
                        first, race = await self._establish(order, order.received_at, self.relay_mode)
                    finally:
                        # Before the connection is handed out (not on the initiator's path): whatever the
                        # application does next (dial back, answer the initiator, which then connects
                        # again) finds our fresh port at the coordinator.
                        await self._refresh_observed()
            else:
                first, race = await self._establish(order, order.received_at, self.relay_mode)
        except ConnectFailed as exc:
            self._stage("incoming_failed", {"peer": order.peer_id, "session": order.session_id, "code": exc.code,
                                            "error": str(exc).splitlines()[0]})
            return
        try:
            await self._route_incoming(order, first, race)
        finally:
            await race.cancel()

    async def _route_incoming(self, order: PunchOrder, first: Established, race: ConnectionRace) -> None:
        """Each connection of an incoming punch session says what it is for (its preface): a session, a
        dedicated connection, or the direct path a session that started on the relay moves to."""
        entry: PeerSession | None = None
        current: Established | None = first
        while current is not None:
            sock, info = current
            try:
                sock.setblocking(False)
                preface = await asyncio.wait_for(_recv_exactly(sock, PREFACE_SIZE), PREFACE_TIMEOUT)
            except (OSError, TimeoutError, EOFError) as exc:
                preface = f"nothing ({exc!r})".encode()
            if preface == PREFACE_SESSION and entry is None:
                entry = self._sessions.add(await self._secure_incoming(sock, info, preface))
                if info.method is Method.DIRECT:
                    return
            elif preface == PREFACE_DEDICATED and entry is None:
                await self._incoming.put(await self._secure_incoming(sock, info, preface))
                return
            elif preface == PREFACE_UPGRADE and entry is not None and not entry.session.closed:
                await self._migrate(entry, await self._secure_incoming(sock, info, preface))
                return
            else:
                sock.close()
                if not preface.startswith(b"nothing"):
                    self._stage("incoming_failed", {"peer": order.peer_id, "session": order.session_id,
                                                    "code": "preface",
                                                    "error": f"not a tcppunch peer connection: began {preface!r}"})
            try:
                current = await race.next()
            except ConnectFailed:
                return

    async def _establish(self, order: PunchOrder, started: float, mode: RelayMode, *, relay_early: bool = True
                         ) -> tuple[Established, ConnectionRace]:
        """Punch (and/or relay) as ``order`` says; the first connection (a raw connected socket and what
        we know) and the race, which may still yield a direct connection after a relayed one.

        ``relay_early``: join the relay :data:`RELAY_AFTER` s after firing if the punch has not won by
        then, and punch on. A session's initiator does so (the session moves to the direct path later);
        a dedicated connection's initiator joins only once the punch failed. The other side always joins
        early: the relay splices only when both joined, so it follows whatever the initiator does.
        """
        progress = _Progress(order, {"schedule": order.received_at - started} if order.role is Role.INITIATOR else {})
        race = ConnectionRace()
        if mode is RelayMode.ALWAYS:
            race.start(self._relay(progress, started, "relay requested (--relay always)"))
        elif order.relay_advice is RelayAdvice.RELAY_NOW:
            reason = f"direct cannot work: {order.advice_reason or 'both NATs map unpredictably'}"
            if mode is RelayMode.NEVER:
                raise await self._give_up(progress, f"{reason}; relay not allowed (--relay never)",
                                          FailureCode.DIRECT_IMPOSSIBLE, reason)
            race.start(self._relay(progress, started, reason))
        else:
            punched = race.start(self._punch(progress, started, mode))
            if mode is RelayMode.AUTO:
                race.start(self._relay_unless_direct(progress, started, punched, relay_early))
        try:
            first = await race.next()
        except BaseException:
            await race.cancel()
            raise
        if first is None:
            raise progress.failed("no connection", FailureCode.FAILED)
        return first, race

    async def _relay_unless_direct(self, progress: _Progress, started: float, punched: asyncio.Task[Any],
                                   early: bool) -> Established | None:
        """Join the relay when the punch failed, or (``early``) when it is still running
        :data:`RELAY_AFTER` seconds after the fire time; the punch goes on beside it."""
        loop = asyncio.get_running_loop()
        bound = max(0.0, progress.order.fire_at + RELAY_AFTER - loop.time()) if early else None
        await asyncio.wait({punched}, timeout=bound)
        if not punched.done():
            reason = f"no direct connection {RELAY_AFTER:g} s after firing: relay first, punching on"
        elif punched.cancelled() or punched.exception() is not None or not isinstance(punched.result(), str):
            return None  # direct won, or the punch's own error stands
        else:
            reason = punched.result()
        return await self._relay(progress, started, reason)

    async def _punch(self, progress: _Progress, started: float, mode: RelayMode
                     ) -> tuple[socket.socket, ConnectionInfo] | str:
        """The direct connection, or why the relay has to serve instead."""
        loop = asyncio.get_running_loop()
        order, timings = progress.order, progress.timings
        self._stage("punch", {"peer": order.peer_id, "session": order.session_id, "role": order.role.value,
                              "fire_in_ms": round((order.fire_at - loop.time()) * 1000, 1)})
        inbound = None if self._dispatcher is None else self._dispatcher.register(order.session_id)
        try:
            result = await _unless_cancelled(order, punch(self._plan(order), inbound=inbound, streams=False))
        except SessionCancelled as exc:
            raise progress.failed(f"{order.peer_id} gave up or left: {exc}", FailureCode.CANCELLED) from exc
        except PunchFailed as exc:
            progress.attempts = exc.attempts
            timings["punch"] = loop.time() - max(order.fire_at, started)
            self._log.info("peer.punch_failed", session=order.session_id, remote_peer=order.peer_id,
                           role=order.role.value, explanation=exc.explanation)
            if mode is RelayMode.NEVER:
                raise await self._give_up(progress, exc.explanation, FailureCode.PUNCH_FAILED, "punch failed"
                                          ) from exc
            spray = f" ({exc.birthday.summary()})" if exc.birthday is not None else ""
            return f"punching failed: {exc.explanation.splitlines()[0] if exc.explanation else 'no answer'}{spray}"
        finally:
            self._unroute(order)
        timings["wait"] = max(0.0, order.fire_at - order.received_at)
        timings["punch"] = result.timings.selected
        timings["verify"] = result.timings.selected - (result.timings.first_connection or 0.0)
        timings["total"] = loop.time() - started
        info = ConnectionInfo(order.peer_id, Method.DIRECT, result.local, result.remote, order.session_id,
                              order.role, result.attempts, timings,
                              candidate=_winning_kind(result, mapped=self.port_mapping is not None),
                              claimed_key=order.peer_key)
        self._stage("direct", info.to_json())
        await self._report(order, Outcome.DIRECT, {"remote": str(result.remote)})
        return result.sock, info

    async def _relay(self, progress: _Progress, started: float, reason: str) -> tuple[socket.socket, ConnectionInfo]:
        loop = asyncio.get_running_loop()
        order, timings = progress.order, progress.timings
        self._stage("relay", {"peer": order.peer_id, "reason": reason})
        relay_started = loop.time()
        join = join_relay(order.relay, order.session_id, order.key, order.role, timeout=self.relay_timeout,
                          **self._control.relay_credentials())
        try:
            sock = await _unless_cancelled(order, join)
        except SessionCancelled as exc:
            raise progress.failed(f"{order.peer_id} gave up or left: {exc}", FailureCode.CANCELLED) from exc
        except (CoordinatorError, OSError, TimeoutError, SecureError) as exc:
            if isinstance(exc, CoordinatorError) and exc.code == ErrorCode.UNKNOWN_SESSION:
                # The session ended while we joined: its CANCEL (the real reason) comes on the control
                # connection, possibly just after this error.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(order.cancelled.wait(), CANCEL_GRACE)
                if order.cancelled.is_set():
                    raise progress.failed(f"{order.peer_id} gave up or left: {order.cancel_reason}",
                                          FailureCode.CANCELLED) from exc
            raise await self._give_up(progress, f"{reason}; the relay failed too: {exc}", FailureCode.RELAY_FAILED,
                                      f"relay: {exc}") from exc
        timings["relay"] = loop.time() - relay_started
        timings["total"] = loop.time() - started
        info = ConnectionInfo(order.peer_id, Method.RELAY, endpoint_of(sock.getsockname()),
                              endpoint_of(sock.getpeername()), order.session_id, order.role, progress.attempts,
                              timings, relay_reason=reason, claimed_key=order.peer_key)
        self._stage("relayed", info.to_json())
        await self._report(order, Outcome.RELAY, {"reason": reason})
        return sock, info

    async def _secure(self, sock: socket.socket, info: ConnectionInfo, preface: bytes) -> Connection:
        """TLS between the two peers' keys on an established connection (after its ``preface``), bound to
        its punch session and preface; the other side's key checked by our trust policy before any byte
        of the application. Raises :class:`ConnectFailed` (``peer-key-mismatch``, ``insecure``)."""
        if not self.encrypt:
            reader, writer = await asyncio.open_connection(sock=sock)
            return Connection(reader, writer, info)

        def verify(fingerprint: str) -> None:
            # ids are names at a coordinator (or a cluster of them: named by the first listed)
            self.trust.check_peer(info.peer, fingerprint, scope=self._coordinators.scope, claimed=info.claimed_key)

        spec = ChannelSpec(self.identity, info.session_id, info.role.value, self.peer_id, info.peer, verify,
                           purpose=preface.decode("ascii", "replace"))
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            reader, writer, secure = await secure_streams(sock, spec)
        except SecureError as exc:
            code = (FailureCode.PEER_KEY_MISMATCH if exc.code is SecureErrorCode.KEY_MISMATCH
                    else FailureCode.INSECURE)
            self._stage("insecure", {"peer": info.peer, "session": info.session_id, "code": code.value,
                                     "error": str(exc)})
            raise ConnectFailed(f"no secure channel to {info.peer}: {exc}", peer=info.peer, code=code,
                                attempts=info.attempts, timings=info.timings) from exc
        info.peer_key, info.cipher = secure.peer_key, secure.cipher
        info.timings["secure"] = loop.time() - started
        if "total" in info.timings:
            info.timings["total"] += info.timings["secure"]
        self._stage("secured", {"peer": info.peer, "peer_key": secure.peer_key, "cipher": secure.cipher,
                                "seconds": round(info.timings["secure"], 4)})
        return Connection(reader, writer, info)

    async def _secure_incoming(self, sock: socket.socket, info: ConnectionInfo, preface: bytes) -> Connection:
        try:
            return await self._secure(sock, info, preface)
        except ConnectFailed as exc:
            self._stage("incoming_failed", {"peer": info.peer, "session": info.session_id, "code": exc.code,
                                            "error": str(exc).splitlines()[0]})
            raise

    def _check_coordinator(self, fingerprint: str) -> None:
        # held per name: every address of a host name must hold the pin, or the key the name had
        self.trust.check_coordinator(self._coordinators.trust_scope(self.coordinator), fingerprint,
                                     self.coordinator_key)

    async def _give_up(self, progress: _Progress, message: str, code: FailureCode, reported: str) -> ConnectFailed:
        """Tell the coordinator the session failed (so the other side stops too); the error to raise."""
        await self._report(progress.order, Outcome.FAILED, {"reason": reported})
        return progress.failed(message, code)

    def _unroute(self, order: PunchOrder) -> None:
        if self._dispatcher is not None:
            self._dispatcher.unregister(order.session_id)

    def _plan(self, order: PunchOrder) -> PunchPlan:
        # Behind a sequential NAT the local port does not decide the public one (every new connection
        # takes the NAT's next port), and reusing the control port would repeat last session's 5-tuple,
        # whose NAT entry may still be alive with last session's public port: use a fresh local port.
        local = Endpoint(self.local.ip, 0) if self.sequential_nat else self.local
        return punch_plan(order, local=local, own_nat=self.nat, own_public_ip=self.observed.ip, local6=self._local6,
                          birthday=self._birthday, coordinator_rtt=self._control.rtt)

    async def _report(self, order: PunchOrder, outcome: Outcome, details: dict[str, Any]) -> None:
        with contextlib.suppress(CoordinatorError, ConnectionError, OSError):
            await self._control.report_result(order.session_id, outcome, details)

    def _stage(self, name: str, data: dict[str, Any]) -> None:
        # the log context's "peer" is us; a stage's "peer" is the other side
        self._log.info(f"peer.{name}", **{("remote_peer" if k == "peer" else k): v for k, v in data.items()})
        if self._on_stage is not None:
            self._on_stage(name, data)


@dataclass
class _Progress:
    """One connection being established: what a failure has to carry."""

    order: PunchOrder
    timings: dict[str, float]
    attempts: tuple[PunchAttempt, ...] = ()

    def failed(self, message: str, code: FailureCode) -> ConnectFailed:
        return ConnectFailed(message, peer=self.order.peer_id, code=code, attempts=self.attempts,
                             timings=self.timings)


class SessionCancelled(Exception):
    """The coordinator cancelled the session (the other peer gave up or left)."""


async def _unless_cancelled(order: PunchOrder, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` unless and until the coordinator cancels the order's session."""
    task = asyncio.ensure_future(work)
    cancelled = asyncio.ensure_future(order.cancelled.wait())
    try:
        done, _ = await asyncio.wait({task, cancelled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, cancelled):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending
    if task in done:
        return task.result()
    raise SessionCancelled(order.cancel_reason or "cancelled")


async def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def _ipv6_endpoint(port: int) -> Endpoint | None:
    """Our IPv6 punch endpoint: the first global IPv6 address of this host where ``port`` is free too
    (no NAT66: it is also our public IPv6 endpoint), or None."""
    for address in local_network().global_ipv6():
        candidate = Endpoint(address, port)
        try:
            reuse_listener(candidate).close()
        except OSError:
            continue
        return candidate
    return None


def _winning_kind(result: PunchResult, *, mapped: bool) -> CandidateKind | None:
    """The kind of candidate a punch won through; an incoming IPv6 connection counts as IPv6 even when
    it came from an endpoint we had not targeted (no NAT66: it is the peer's own address), and an incoming
    IPv4 one while we hold a port mapping came through the mapping (only it lets such SYNs in)."""
    if result.candidate is not None:
        return result.candidate.kind
    if family_of(result.remote.ip) == socket.AF_INET6:
        return CandidateKind.IPV6
    return CandidateKind.MAPPED if mapped else None


def _free_port(bind: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((bind, 0))
        port: int = s.getsockname()[1]
        return port


def _value(member: StrEnum | None) -> str | None:
    return None if member is None else member.value




class _DetectBrokenOff(ConnectFailed):
    """Detection reached the coordinator (within the TCP connect budget) and then broke off."""


def _transient(exc: BaseException) -> bool:
    """A start-up step that reached the coordinator and broke off: worth another try. Not: a spent TCP
    connect budget, a refusal or unreachable network, a coordinator's answer, a wrong key."""
    if isinstance(exc, ConnectFailed):
        return isinstance(exc, _DetectBrokenOff)
    if isinstance(exc, CoordinatorError):
        return exc.code in (ErrorCode.CLOSED, ErrorCode.KEEPALIVE_TIMEOUT, ErrorCode.SERVER_BUSY,
                            ErrorCode.CLUSTER_UNAVAILABLE)
    if isinstance(exc, SecureError):
        return exc.code is SecureErrorCode.TIMEOUT
    if isinstance(exc, ConnectRetryError | ConnectionRefusedError):
        return False
    return isinstance(exc, TimeoutError | ConnectionError)
