"""The coordinator as a sans-I/O state machine: events in (bytes, ticks, closes), actions out.

The asyncio server (``server.py``) only moves bytes and arms one timer: it feeds
``connection_made`` / ``data_received`` / ``connection_lost`` / ``tick`` with ``now`` and carries out the
returned :data:`Action` list in order, and re-arms its timer at :meth:`next_deadline`. Everything
else — registration, keepalives and RTT, sessions and their fire times, relay authentication and pairing,
every error path — lives here and is tested without sockets.

Connection life: ``HELLO`` (preamble + first frame, under ``handshake_timeout``) -> ``PEER`` (after
REGISTER) or ``RELAY_WAIT`` (after a verified RELAY, until the other role arrives) -> ``HANDED_OFF``
(a :class:`StartRelay` action gave the socket to the relay pump) ; any state -> ``CLOSED``.

Time: every deadline (handshake, each peer's next ping or keepalive timeout, each session's expiry) sits
in one :class:`~.timers.TimerHeap`, so an event costs the same with 200 or 50,000 peers registered and
:meth:`tick` touches only what is due (at most ``max_timers_per_tick`` of them per call).
"""

from __future__ import annotations

import bisect
import dataclasses
import hmac
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import structlog

from tcppunch.ratelimit import KeyedBuckets, LogLimiter, source_key
from tcppunch.relay.limits import ByteBudget, RelayAccounting, RelayLimits
from tcppunch.session.records import KeyShare
from tcppunch.wire.coord import (
    MAX_ENDPOINTS,
    MAX_PEERS_LISTED,
    SESSION_KEY_SIZE,
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
    safe_text,
)
from tcppunch.wire.endpoint import Endpoint, routable_ipv6
from tcppunch.wire.framing import MAX_FRAME_SIZE, FrameDecoder, ProtocolError
from tcppunch.wire.natreport import NatReport

from .auth import Tokens
from .directory import Claim, ClaimAnswer, ClusterAction, Forward, LookupPeer, Release, RemotePeer, Way
from .expose import ClosePort, ExposeConfig, ExposeTable, OpenPort, Refusal
from .registry import ConnId, PeerRecord, Registry
from .session import Session, relay_advice, schedule_fire
from .timers import TimerHeap

log = structlog.get_logger()


@dataclass(frozen=True)
class CoordinatorConfig:
    """Timings (seconds) and limits. Defaults suit the internet; tests shrink them."""

    # The server pings every registered peer this often; the answers keep its RTT estimate fresh.
    keepalive_interval: float = 5.0
    # A registered id whose connection was silent this long may be taken over by a new registration.
    stale_after: float = 7.5
    # A peer silent this long is removed and its sessions cancelled.
    keepalive_timeout: float = 15.0
    # Keepalive budget (pings per second). A peer registering when more than keepalive_interval x this many
    # peers are registered gets all three keepalive times above scaled up in proportion (announced in its
    # REGISTERED): at 50,000 peers, 50 s / 75 s / 150 s. Since earlier peers keep their times, the ping
    # rate is not capped at the budget but grows only logarithmically: the n-th peer adds budget / n, so
    # n peers cost ~budget x (1 + ln(n / (keepalive_interval x budget))): 2,400/s at 20,000, 3,300/s at 50,000.
    max_pings_per_second: float = 1000.0
    # Each ping after the first comes early by a random share of the interval, at most this one, so that
    # peers registered in one burst drift apart (0: exactly every interval).
    ping_jitter: float = 0.2
    # Preamble + first frame (REGISTER or RELAY) must arrive within this after the TCP accept.
    handshake_timeout: float = 5.0
    # Punch deadline = fire time + punch_window (what each peer gets as deadline_ms).
    punch_window: float = 6.0
    # Added to both fire delays; 0 keeps time-to-connect at its floor.
    fire_margin: float = 0.0
    # Relay joins are accepted until the punch deadline + relay_window; then the session is forgotten.
    relay_window: float = 30.0
    max_sessions_per_peer: int = 64
    # Concurrent relayed sessions a peer id may take part in.
    max_relays_per_peer: int = 8
    relay_idle_timeout: float = 300.0
    # Byte budgets per source address and per token (per window), and the longest a relay runs.
    relay_limits: RelayLimits = field(default_factory=RelayLimits)
    relay_max_bytes: int | None = None
    # Bytes a relay client may send after RELAY before RELAY-OK (they are handed to the pump, not lost).
    relay_pending_limit: int = 64 * 1024
    # Relay address put in PUNCH; default: the server address the peer's control connection reached.
    relay_endpoint: Endpoint | None = None
    max_frame_size: int = MAX_FRAME_SIZE
    max_pings_in_flight: int = 4
    # Due timers one tick() handles; the rest wait for the next call (the driver re-arms at once, after the
    # I/O that is ready), so a burst of expiries never holds up I/O for long: a keepalive PING costs ~25 us
    # with TLS and its write, so 100 hold it up ~2.5 ms (1,000 did ~25 ms, beyond the 20 ms p99 goal alone).
    max_timers_per_tick: int = 100
    # Exposed ports (``server --expose-ports``); None: EXPOSE is refused.
    expose: ExposeConfig | None = None
    # A frame whose first byte arrived must be complete this long after (a trickle of bytes into an
    # unfinished frame keeps nothing alive: liveness is answering PINGs).
    frame_timeout: float = 10.0
    # Connections from one source (IPv4 address or IPv6 /64) that have not registered or joined a relay.
    max_unauthenticated_per_source: int = 64
    # Failed authentications (wrong token, bad relay proof) per source: a bucket of this many, refilled
    # at auth_failure_rate per second; an empty bucket makes REGISTER/RELAY from there fail 'throttled'.
    auth_failure_burst: int = 10
    auth_failure_rate: float = 0.5
    # Open sessions one requester may have with one target (so that no id fills another's slots).
    max_sessions_per_pair: int = 16
    # ... and one source address (whatever ids it registers) with one target.
    max_sessions_per_source_pair: int = 32
    # OBSERVED may move a peer's port to a port the server saw from its address within observed_seen_ttl
    # (a STUN binding, a connection), or within port_delta * observed_window_steps of its current port
    # when its NAT report says it allocates sequentially.
    observed_seen_ttl: float = 60.0
    observed_window_steps: int = 256
    # Longest text of an ERROR message, and of a verdict in PEERS.
    max_error_text: int = 512
    max_verdict_listed: int = 200


# ------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Send:
    """Write ``data`` to connection ``conn``."""

    conn: ConnId
    data: bytes


@dataclass(frozen=True)
class Close:
    """Close ``conn`` after the writes before it. ``linger``: half-close and drain the client's remaining
    bytes briefly first, so that the ERROR frame is read rather than destroyed by a RST."""

    conn: ConnId
    linger: bool = False


@dataclass(frozen=True)
class StartRelay:
    """Hand both connections of a session to the relay pump; ``*_pending`` are bytes already received."""

    session_id: str
    initiator: ConnId
    responder: ConnId
    initiator_pending: bytes
    responder_pending: bytes
    idle_timeout: float
    max_bytes: int | None
    # Set when the initiator is a visitor of an exposed port owned by this peer id (its byte budget).
    expose_peer: str | None = None
    # Shared budgets (per source address, per token) the pump charges; the relay's longest life.
    budgets: tuple[ByteBudget, ...] = ()
    max_duration: float | None = None


@dataclass(frozen=True)
class StartRecords:
    """Leave TLS on ``conn`` for the record layer (docs/protocol.md, *The record layer*): right after the
    REGISTERED that carried ``share``'s public key. The driver derives the keys from ``share`` (which then
    forgets its private key), ``client_public`` and both identity fingerprints (``client_key`` is the one
    TLS authenticated)."""

    conn: ConnId
    share: KeyShare
    client_public: bytes
    client_key: str


Action = Send | Close | StartRelay | StartRecords | OpenPort | ClosePort | ClusterAction


class _Timer(Enum):
    """What a timer key's id names: a connection in its hello, a registered peer id, a session id, a
    connection with an unfinished frame."""

    HANDSHAKE = 0
    PEER = 1
    SESSION = 2
    VISITOR = 3
    FRAME = 4


TimerKey = tuple[_Timer, int | str]


class ConnState(Enum):
    HELLO = "hello"
    PEER = "peer"
    RELAY_WAIT = "relay-wait"
    # A visitor of an exposed port waiting for its owner's join; nothing is read from it here.
    VISITOR_WAIT = "visitor-wait"
    HANDED_OFF = "handed-off"
    CLOSED = "closed"


@dataclass(slots=True)
class _Conn:
    id: ConnId
    observed: Endpoint
    local: Endpoint
    decoder: FrameDecoder
    handshake_deadline: float
    state: ConnState = ConnState.HELLO
    peer_id: str | None = None
    session_id: str | None = None
    role: Role | None = None
    raw: bytearray = field(default_factory=bytearray)
    source: str = ""
    # When the frame that started arriving must be complete (None: no partial frame buffered).
    frame_deadline: float | None = None
    # Fingerprint of the client's TLS key (set by the driver after the handshake; None: plain TCP).
    key: str | None = None
    # The client's X25519 key from REGISTER, until REGISTERED answers it (None: it stays in TLS).
    records: bytes | None = None


# Upper bounds (s) of the time-to-connect buckets; the last bucket is everything above.
CONNECT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Stats:
    """Counters for logs, tests and the metrics endpoint (metrics.py reads them when scraped)."""

    registrations: int = 0
    sessions: int = 0
    relays: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    results: dict[str, int] = field(default_factory=dict)
    # (outcome: direct | relay | failed, NAT type pair) -> sessions; one count per session.
    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)
    # Time from CONNECT to the session's outcome (first direct RESULT, or relay paired), by bucket.
    connect_seconds: list[int] = field(default_factory=lambda: [0] * (len(CONNECT_BUCKETS) + 1))
    connect_seconds_sum: float = 0.0

    def outcome(self, session: Session, outcome: str, now: float) -> None:
        """Count ``session``'s outcome once (and its time to connect unless it failed)."""
        if session.counted:
            return
        session.counted = True
        key = (outcome, session.nat_pair)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        if outcome != Outcome.FAILED.value:
            seconds = max(0.0, now - session.created_at)
            self.connect_seconds[bisect.bisect_left(CONNECT_BUCKETS, seconds)] += 1
            self.connect_seconds_sum += seconds


def nat_label(report: NatReport | None) -> str:
    """A short NAT type for metric labels: mapping-filtering (eim/adm/apdm, eif/adf/apdf), open, unknown."""
    if report is None:
        return "unknown"
    if not report.behind_nat:
        return "open"
    short = {"endpoint-independent": "ei", "address-dependent": "ad", "address-and-port-dependent": "apd"}
    mapping, filtering = report.tcp.mapping, report.tcp.filtering
    return (f"{short.get(str(mapping), 'unknown') if mapping else 'unknown'}m-"
            f"{short.get(str(filtering), 'unknown') if filtering else 'unknown'}f")


class CoordinatorProtocol:
    """Registry + sessions + relay rendezvous for every connection of one coordinator."""

    def __init__(
        self,
        tokens: Tokens,
        config: CoordinatorConfig | None = None,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        node: str | None = None,
        authorized_keys: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        self.tokens = tokens
        # Cluster node id (server --redis): ids are claimed cluster-wide, CONNECTs to ids registered at
        # other nodes are looked up and their PUNCH forwarded (directory.py). None: this process alone.
        self.node = node
        # session id -> the responder at another node (to tell it CANCEL)
        self._remote_of: dict[str, RemotePeer] = {}
        # session id -> (its node, the peer here it was forwarded to): sessions held at another node, so
        # that the peer's RESULT goes back there (a route ends with that RESULT, the session's expiry or
        # the peer; while it lives, it takes one of the peer's session slots here)
        self._routes: dict[str, tuple[str, str]] = {}
        # Ids owned by keys: those in the authorized-keys file by its keys, any other by the key that
        # registered it first (for the life of this server process).
        self.authorized_keys: Mapping[str, frozenset[str]] = authorized_keys or {}
        self.owners: dict[str, str] = {}
        self.config = config or CoordinatorConfig()
        self.registry = Registry()
        self.sessions: dict[str, Session] = {}
        self.stats = Stats()
        self._random = random_bytes
        self._conns: dict[ConnId, _Conn] = {}
        # session id -> the two peer ids of a running relay (counted against max_relays_per_peer).
        self._relays: dict[str, tuple[str, str]] = {}
        self._relay_count: dict[str, int] = {}
        self._timers: TimerHeap[TimerKey] = TimerHeap()
        self.expose = ExposeTable(self.config.expose)
        # Per-source bookkeeping (source_key of the address): unauthenticated connections, auth failures.
        self._hello_count: dict[str, int] = {}
        cfg = self.config
        self._auth_failures = KeyedBuckets(cfg.auth_failure_rate, cfg.auth_failure_burst)
        # ip -> {port: last seen}: public endpoints this server saw (connections, STUN bindings).
        self._seen: dict[str, dict[int, float]] = {}
        self.relay_accounting = RelayAccounting(cfg.relay_limits, now=0.0)
        self.log_limiter = LogLimiter()
        # The latest ``now`` any event brought (the log limiter's clock).
        self._clock = 0.0

    # ------------------------------------------------------------------------------------ queries

    def conn_state(self, conn: ConnId) -> ConnState | None:
        c = self._conns.get(conn)
        return None if c is None else c.state

    def active_relays(self, peer_id: str) -> int:
        return self._relay_count.get(peer_id, 0)

    def running_relays(self) -> int:
        """Relays carrying bytes now (paired, not finished)."""
        return len(self._relays)

    def relay_peers(self, session_id: str) -> tuple[str, ...]:
        """The two peer ids of a running relay (empty once it finished)."""
        return self._relays.get(session_id, ())

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must be called next (``None``: nothing is timed). O(1) amortized.

        May be earlier than strictly needed (a peer heard from since its timer was set): such a tick
        does nothing but re-arm that peer.
        """
        return self._timers.next_deadline()

    # ------------------------------------------------------------------------------------- events

    def connection_made(self, conn: ConnId, observed: Endpoint, local: Endpoint, now: float) -> list[Action]:
        """A TCP connection was accepted from ``observed`` on the server address ``local``."""
        self._clock = max(self._clock, now)
        if conn in self._conns:
            raise ValueError(f"connection {conn} already exists")
        source = source_key(observed.ip)
        limit = self.config.max_unauthenticated_per_source
        if self._hello_count.get(source, 0) >= limit:
            # Not tracked: the driver closes it; its later events are ignored.
            self._count_error(ErrorCode.SERVER_BUSY)
            self._warn("coordinator.source_limit", source=source, limit=limit)
            why = f"too many unauthenticated connections from your address (limit {limit})"
            return [Send(conn, encode_message(Error(ErrorCode.SERVER_BUSY, why))), Close(conn)]
        self._conns[conn] = _Conn(
            id=conn,
            observed=observed,
            local=local,
            decoder=FrameDecoder(expect_preamble=True, max_frame_size=self.config.max_frame_size),
            handshake_deadline=now + self.config.handshake_timeout,
            source=source,
        )
        self._timers.schedule((_Timer.HANDSHAKE, conn), now + self.config.handshake_timeout)
        self._hello_count[source] = self._hello_count.get(source, 0) + 1
        self.endpoint_seen(observed, now)
        return []

    def endpoint_seen(self, endpoint: Endpoint, now: float) -> None:
        """The server saw traffic from ``endpoint`` (a connection, a STUN binding): OBSERVED may name it."""
        ports = self._seen.setdefault(endpoint.ip, {})
        ports[endpoint.port] = now
        if len(ports) > 64:  # bounded: forget the oldest
            for port in sorted(ports, key=ports.__getitem__)[: len(ports) - 64]:
                del ports[port]
        if len(self._seen) > 65_536:
            self._seen.pop(next(iter(self._seen)))

    def _set_state(self, c: _Conn, state: ConnState) -> None:
        """Every state change goes through here: it keeps the per-source count of unauthenticated ones."""
        if c.state is ConnState.HELLO and state is not ConnState.HELLO:
            left = self._hello_count.get(c.source, 0) - 1
            if left > 0:
                self._hello_count[c.source] = left
            else:
                self._hello_count.pop(c.source, None)
        c.state = state

    def _warn(self, event: str, **fields: object) -> None:
        """A warning that an attacker could repeat: rate-limited per event (``suppressed=N`` when more)."""
        extra = self.log_limiter.check(event, self._clock)
        if extra is not None:
            log.warning(event, **fields, **extra)

    def _count_error(self, code: str) -> None:
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
    def connection_authenticated(self, conn: ConnId, key: str) -> None:
        """The driver finished ``conn``'s TLS handshake: the client holds the key with fingerprint ``key``."""
        c = self._conns.get(conn)
        if c is not None:
            c.key = key

    def connection_forget(self, conn: ConnId) -> None:
        """The driver handed ``conn`` to another protocol (STUN on the same port): drop it silently."""
        c = self._conns.get(conn)
        if c is not None and c.state is not ConnState.HELLO:
            raise ValueError(f"connection {conn} is past its hello, cannot be forgotten")
        if c is not None:
            self._set_state(c, ConnState.CLOSED)
        self._conns.pop(conn, None)
        self._timers.cancel((_Timer.HANDSHAKE, conn))

    def data_received(self, conn: ConnId, data: bytes, now: float) -> list[Action]:
        self._clock = max(self._clock, now)
        c = self._conns.get(conn)
        if c is None or c.state in (ConnState.CLOSED, ConnState.HANDED_OFF, ConnState.VISITOR_WAIT):
            return []
        if c.state is ConnState.RELAY_WAIT:
            c.raw += data
            return self._check_relay_overflow(c, now)
        c.decoder.feed(data)
        actions: list[Action] = []
        completed = False
        while c.state in (ConnState.HELLO, ConnState.PEER):
            try:
                frame = c.decoder.next_frame()
                if frame is None:
                    break
                message = decode_message(frame)
            except ProtocolError as exc:
                actions += self._fail(c, exc.code, exc.message)
                break
            completed = True
            actions += self._dispatch(c, message, now)
        if c.state is ConnState.PEER and c.decoder.buffered:
            if completed or c.frame_deadline is None:
                self._set_frame_deadline(c, now + self.config.frame_timeout)
        else:
            self._set_frame_deadline(c, None)
        return actions

    def _set_frame_deadline(self, c: _Conn, when: float | None) -> None:
        c.frame_deadline = when
        if when is None:
            self._timers.cancel((_Timer.FRAME, c.id))
        else:
            self._timers.schedule((_Timer.FRAME, c.id), when)

    def connection_lost(self, conn: ConnId, now: float) -> list[Action]:
        """The TCP connection ended (EOF, reset, or our own close). Idempotent."""
        self._clock = max(self._clock, now)
        c = self._conns.pop(conn, None)
        if c is None:
            return []
        return self._cleanup(c, reason="connection closed")

    def tick(self, now: float) -> list[Action]:
        """Run what is due at ``now`` (handshake timeouts, keepalives, session expiry), earliest first.

        Handles at most ``config.max_timers_per_tick`` timers; when more are due, :meth:`next_deadline`
        stays <= ``now`` and the driver calls again.
        """
        self._clock = max(self._clock, now)
        actions: list[Action] = []
        for kind, key in self._timers.pop_due(now, self.config.max_timers_per_tick):
            if kind is _Timer.PEER:
                assert isinstance(key, str)
                actions += self._peer_due(key, now)
            elif kind is _Timer.SESSION:
                session = self.sessions.get(str(key))
                if session is not None and now >= session.expires_at:
                    self.stats.outcome(session, Outcome.FAILED.value, now)
                    actions += self._end_session(session, ErrorCode.RELAY_TIMEOUT, "the relay partner never came")
                elif session is None:
                    self._drop_route(str(key))
            elif kind is _Timer.VISITOR:
                visitor = self.expose.expire(str(key), now)
                if visitor is not None:
                    log.info("coordinator.visitor_not_joined", visitor=visitor.visitor_id, peer=visitor.peer_id)
                    actions += self._drop_visitor(visitor.conn)
            elif kind is _Timer.FRAME:
                assert isinstance(key, int)
                c = self._conns.get(key)
                if c is not None and c.frame_deadline is not None and now >= c.frame_deadline:
                    actions += self._fail(
                        c, ErrorCode.TIMEOUT, f"a frame was not complete within {self.config.frame_timeout:g}s"
                    )
            else:
                assert isinstance(key, int)
                c = self._conns.get(key)
                if c is not None and c.state is ConnState.HELLO and now >= c.handshake_deadline:
                    actions += self._fail(c, ErrorCode.TIMEOUT, "no REGISTER or RELAY in time")
        return actions

    def _peer_due(self, peer_id: str, now: float) -> list[Action]:
        """A peer's timer: keepalive timeout, or its next ping, or (heard from meanwhile) just re-arm."""
        cfg = self.config
        record = self.registry.get(peer_id)
        if record is None:
            return []
        timeout = cfg.keepalive_timeout * record.keepalive_scale
        if now - record.last_heard >= timeout:
            peer_conn = self._conns.get(record.conn)
            if peer_conn is not None:
                return self._fail(peer_conn, ErrorCode.KEEPALIVE_TIMEOUT, f"nothing heard for {timeout:g}s")
            return self._remove_peer(record, reason="keepalive timeout")  # defensive: no connection
        if now >= record.next_ping_at:
            return self._ping(record, now)
        self._arm_peer(record)
        return []

    def _arm_peer(self, record: PeerRecord) -> None:
        """The peer's one timer: its next ping, or its keepalive timeout if that comes first."""
        when = min(record.next_ping_at, record.last_heard + self.config.keepalive_timeout * record.keepalive_scale)
        self._timers.schedule((_Timer.PEER, record.id), when)

    def relay_finished(self, session_id: str) -> None:
        """The pump finished the relay of ``session_id``: its peers may start new ones."""
        if self.expose.carried_ended(session_id):
            return
        ids = self._relays.pop(session_id, None)
        for peer_id in ids or ():
            left = self._relay_count.get(peer_id, 0) - 1
            if left > 0:
                self._relay_count[peer_id] = left
            else:
                self._relay_count.pop(peer_id, None)

    def shutdown(self, now: float) -> list[Action]:
        """Tell every open connection the server is going away and close it."""
        actions: list[Action] = []
        for c in list(self._conns.values()):
            if c.state is not ConnState.HANDED_OFF:
                actions += self._fail(c, ErrorCode.SHUTTING_DOWN, "the coordinator is shutting down")
        return actions

    # ---------------------------------------------------------------------------------- dispatching

    def _dispatch(self, c: _Conn, message: Message, now: float) -> list[Action]:
        if c.state is ConnState.HELLO:
            if isinstance(message, Register):
                return self._register(c, message, now)
            if isinstance(message, Relay):
                return self._relay(c, message, now)
            return self._fail(
                c, ErrorCode.UNEXPECTED_MESSAGE, f"first message must be register or relay, not {message.TYPE}"
            )
        record = self.registry.by_conn(c.id)
        assert record is not None
        if isinstance(message, Ping):
            return [Send(c.id, encode_message(Pong(message.seq)))]
        if isinstance(message, Pong):
            sent = record.pings_in_flight.pop(message.seq, None)
            if sent is not None:
                # Only an answer to our PING proves the peer alive (not any byte it sends).
                record.rtt.add(now - sent)
                record.last_heard = now
            return []
        if isinstance(message, ListPeers):
            return self._list(c, record, message)
        if isinstance(message, Connect):
            return self._connect(c, record, message, now)
        if isinstance(message, Result):
            return self._result(record, message, now)
        if isinstance(message, Observed):
            return self._observed(record, message, now)
        if isinstance(message, Expose):
            return self._expose(c, record, message)
        return self._fail(c, ErrorCode.UNEXPECTED_MESSAGE, f"{message.TYPE} is not expected from a peer")

    # -------------------------------------------------------------------------------- registration

    def _register(self, c: _Conn, msg: Register, now: float) -> list[Action]:
        cfg = self.config
        throttled = self._throttled(c, now)
        if throttled:
            return throttled
        if c.key is None:
            return self._fail(c, ErrorCode.TLS_REQUIRED, "register over TLS (the token must not travel in clear)")
        if not self.tokens.check(msg.id, msg.token):
            self._auth_failed(c, now, "coordinator.bad_token", peer=msg.id)
            return self._fail(c, ErrorCode.BAD_TOKEN, f"wrong token for id {msg.id!r}")
        not_owner = self._not_owner(msg.id, c.key)
        if not_owner:
            self._auth_failed(c, now, "coordinator.id_owned", peer=msg.id, key=c.key)
            return self._fail(c, ErrorCode.ID_OWNED, not_owner)
        actions: list[Action] = []
        existing = self.registry.get(msg.id)
        if existing is not None:
            silent = now - existing.last_heard
            if silent < cfg.stale_after * existing.keepalive_scale:
                return self._fail(
                    c, ErrorCode.ID_TAKEN, f"id {msg.id!r} is registered by a live connection"
                )
            old = self._conns.get(existing.conn)
            log.info("coordinator.replace", peer=msg.id, silent=round(silent, 3))
            if old is not None:
                actions += self._fail(old, ErrorCode.REPLACED, "a new registration replaced this one")
            else:  # defensive: a record without a connection
                actions += self._remove_peer(existing, reason="replaced")
        # Keepalive budget (see CoordinatorConfig.max_pings_per_second).
        scale = max(1.0, len(self.registry) / (cfg.keepalive_interval * cfg.max_pings_per_second))
        record = PeerRecord(
            id=msg.id,
            conn=c.id,
            observed=c.observed,
            nat=msg.nat,
            private=msg.private,
            swarm=msg.swarm,
            registered_at=now,
            account=f"token:id:{msg.id}" if msg.id in self.tokens.per_id else "token:shared",
            last_heard=now,
            next_ping_at=now,
            ipv6=_ipv6_of(c.observed, msg.ipv6),
            keepalive_scale=scale,
            birthday=msg.birthday,
            key=c.key,
        )
        if msg.id not in self.authorized_keys:
            self.owners.setdefault(msg.id, c.key)
        self.registry.add(record)
        self._set_state(c, ConnState.PEER)
        c.peer_id = msg.id
        c.records = msg.records
        self._timers.cancel((_Timer.HANDSHAKE, c.id))
        self.stats.registrations += 1
        log.info("coordinator.registered", peer=msg.id, observed=str(c.observed), swarm=msg.swarm)
        if self.node is not None:  # REGISTERED once the cluster agreed (claim_result)
            return [*actions, Claim(c.id, self.remote_view(record))]
        return actions + self._registered(c, record, now)

    def _registered(self, c: _Conn, record: PeerRecord, now: float) -> list[Action]:
        cfg, scale = self.config, record.keepalive_scale
        switch: list[Action] = []
        share = None
        if c.records is not None and c.key is not None:  # the client asked for the record layer
            share = KeyShare()
            switch.append(StartRecords(c.id, share, c.records, c.key))
            c.records = None
        reply = Registered(record.id, c.observed, cfg.keepalive_interval * scale, cfg.keepalive_timeout * scale,
                           records=None if share is None else share.public)
        # The first ping right away (after the switch: in records): an RTT estimate exists one round trip
        # after registering.
        return [Send(c.id, encode_message(reply)), *switch, *self._ping(record, now)]

    def _not_owner(self, peer_id: str, key: str) -> str | None:
        """Why ``key`` may not register ``peer_id`` (None: it may)."""
        allowed = self.authorized_keys.get(peer_id)
        if allowed is not None:
            return None if key in allowed else f"id {peer_id!r} is reserved for other keys (authorized keys)"
        owner = self.owners.get(peer_id)
        if owner is None or owner == key:
            return None
        return f"id {peer_id!r} belongs to key {owner}; this connection holds key {key}"

    def _ping(self, record: PeerRecord, now: float) -> list[Action]:
        seq = record.next_seq
        record.next_seq += 1
        record.pings_in_flight[seq] = now
        while len(record.pings_in_flight) > self.config.max_pings_in_flight:
            record.pings_in_flight.pop(next(iter(record.pings_in_flight)))
        # The next one a little early, by a random share of at most PING_JITTER: peers that registered in
        # one burst (a coordinator restart, a load test) drift apart instead of being pinged in one tick
        # every interval for good. Never late: the peer's keepalive expectations stay what REGISTERED said.
        early = self.config.ping_jitter * self._random(1)[0] / 255
        record.next_ping_at = now + self.config.keepalive_interval * record.keepalive_scale * (1.0 - early)
        self._arm_peer(record)
        return [Send(record.conn, encode_message(Ping(seq)))]

    def _list(self, c: _Conn, record: PeerRecord, msg: ListPeers) -> list[Action]:
        """PEERS, bounded by count and by bytes: entries that do not fit are left out, ``truncated``."""
        # The first MAX_PEERS_LISTED others: one more than that, in case the asker is among them.
        listed = self.registry.in_swarm(msg.swarm, MAX_PEERS_LISTED + 1)
        others = [p for p in listed if p.id != record.id][:MAX_PEERS_LISTED]
        total = self.registry.swarm_size(msg.swarm) - (1 if msg.swarm in (None, record.swarm) else 0)
        budget = self.config.max_frame_size - len(encode_message(Peers(msg.request_id, (), truncated=True)))
        infos: list[PeerInfo] = []
        for p in others:
            info = PeerInfo(
                id=p.id,
                swarm=p.swarm,
                nat={} if p.nat is None else p.nat.tcp.to_json(),
                verdict="" if p.nat is None else safe_text(p.nat.verdict, self.config.max_verdict_listed),
            )
            size = len(encode_message(Peers("", (info,)))) - len(encode_message(Peers("", ()))) + 1
            if size > budget:
                break
            budget -= size
            infos.append(info)
        reply = Peers(msg.request_id, tuple(infos), truncated=len(infos) < total)
        return [Send(c.id, encode_message(reply))]

    # ------------------------------------------------------------------------------------ sessions

    def _request_error(self, c: _Conn, request_id: str, code: ErrorCode, message: str) -> list[Action]:
        self._count_error(code)
        error = Error(code, safe_text(message, self.config.max_error_text), fatal=False, request_id=request_id)
        return [Send(c.id, encode_message(error))]

    def _connect(self, c: _Conn, me: PeerRecord, msg: Connect, now: float) -> list[Action]:
        cfg = self.config
        target = self.registry.get(msg.peer)
        if target is None and self.node is not None and msg.peer != me.id:
            return [LookupPeer(c.id, msg)]
        if target is None:
            return self._request_error(c, msg.request_id, ErrorCode.UNKNOWN_PEER, f"no peer {msg.peer!r} is registered")
        if target.id == me.id:
            return self._request_error(c, msg.request_id, ErrorCode.SELF_CONNECT, "cannot connect to yourself")
        if max(len(me.sessions), len(target.sessions)) >= cfg.max_sessions_per_peer:
            return self._request_error(
                c, msg.request_id, ErrorCode.BUSY, f"too many open sessions (limit {cfg.max_sessions_per_peer})"
            )
        busy = self._requester_busy(c, me, target)
        if busy:
            return self._request_error(c, msg.request_id, ErrorCode.BUSY, busy)
        return self._open_session(c, me, target, msg, now)

    def _requester_busy(self, c: _Conn, me: PeerRecord, target: PeerRecord) -> str:
        """Why this requester may not open one more session with ``target`` ('' if it may): per id, and
        per source address (with a shared token, fresh ids from one host cost nothing)."""
        cfg = self.config
        theirs = [self.sessions[s] for s in target.sessions if s in self.sessions]
        pair = sum(1 for s in theirs if s.initiator == me.id)
        if pair >= cfg.max_sessions_per_pair:
            return f"you have {pair} open sessions with {target.id!r} (limit {cfg.max_sessions_per_pair})"
        source = sum(1 for s in theirs if s.initiator_source == c.source)
        if source >= cfg.max_sessions_per_source_pair:
            return (f"your address has {source} open sessions with {target.id!r} "
                    f"(limit {cfg.max_sessions_per_source_pair})")
        return ""

    def remote_found(self, conn: ConnId, request: Connect, remote: RemotePeer | None, now: float,
                     *, unavailable: bool = False) -> list[Action]:
        """The cluster's answer to :class:`LookupPeer`: open the session with a peer of another node
        (``unavailable``: the registry could not be asked, so whether it is registered is unknown)."""
        c = self._conns.get(conn)
        me = self.registry.by_conn(conn)
        if c is None or me is None or c.state is not ConnState.PEER:
            return []
        if self.registry.get(request.peer) is not None:  # it registered here meanwhile
            return self._connect(c, me, request, now)
        if unavailable:
            return self._request_error(c, request.request_id, ErrorCode.CLUSTER_UNAVAILABLE,
                                       f"{request.peer!r} is not registered here and the cluster's registry "
                                       "cannot be reached; retry later")
        if remote is None or remote.node == self.node:
            return self._request_error(
                c, request.request_id, ErrorCode.UNKNOWN_PEER, f"no peer {request.peer!r} is registered"
            )
        if len(me.sessions) >= self.config.max_sessions_per_peer:
            return self._request_error(
                c, request.request_id, ErrorCode.BUSY,
                f"too many open sessions (limit {self.config.max_sessions_per_peer})",
            )
        return self._open_session(c, me, remote, request, now)

    def claim_result(self, conn: ConnId, answer: ClaimAnswer, now: float) -> list[Action]:
        """The cluster's answer to :class:`Claim`: REGISTERED, ``id-taken`` when another node holds the id
        (also when a refresh finds it taken: the id then belongs to the other node), or
        ``cluster-unavailable`` when the claim could not be made: a new id is never granted on this
        node's word alone, so that it stays unique across the cluster (a refresh that cannot reach
        Redis is not answered at all: registrations already held go on)."""
        c = self._conns.get(conn)
        record = self.registry.by_conn(conn)
        if c is None or record is None or c.state is not ConnState.PEER:
            return []
        if answer is ClaimAnswer.TAKEN:
            return self._fail(c, ErrorCode.ID_TAKEN, f"id {c.peer_id!r} is registered at another coordinator")
        if answer is ClaimAnswer.UNAVAILABLE:
            if record.next_seq:  # granted before (REGISTERED sent): an unanswered refresh changes nothing
                return []
            return self._fail(c, ErrorCode.CLUSTER_UNAVAILABLE,
                              "the cluster's registry cannot be reached, so the id cannot be claimed; retry later "
                              "or at another coordinator")
        return [] if record.next_seq else self._registered(c, record, now)

    def deliver(self, forward: Forward, now: float) -> list[Action]:
        """A frame another node forwarded (:class:`Forward`): to a peer registered here, or the RESULT of
        that node's peer in a session held here."""
        self._clock = max(self._clock, now)
        if forward.way is Way.FROM_PEER:
            return self._remote_result(forward, now)
        record = self.registry.get(forward.peer_id)
        if record is None:
            if forward.expires_in > 0:  # a PUNCH for a peer gone from here: its session ends at once
                gone = Result(forward.session_id, Outcome.ABANDONED, {"reason": "not registered at its node"})
                return [self._report(forward.origin, forward.peer_id, gone)]
            return []
        if forward.expires_in > 0 and forward.session_id and forward.origin:
            limit = self.config.max_sessions_per_peer
            if len(record.sessions) >= limit:  # the target's own limit, as for a session opened here
                busy = Result(forward.session_id, Outcome.ABANDONED, {"reason": f"busy ({limit} open sessions)"})
                return [self._report(forward.origin, record.id, busy)]
            self._routes[forward.session_id] = (forward.origin, record.id)
            record.sessions.add(forward.session_id)  # counts against its max_sessions_per_peer here too
            self._timers.schedule((_Timer.SESSION, forward.session_id), now + forward.expires_in)
        return [Send(record.conn, forward.data)]

    def _report(self, node: str, peer_id: str, result: Result) -> Forward:
        """``result`` of ``peer_id`` (registered here) for the node that holds its session."""
        return Forward(node, peer_id, encode_message(result), Way.FROM_PEER, self.node or "", result.session_id)

    def _remote_result(self, forward: Forward, now: float) -> list[Action]:
        """The RESULT of a session's peer at another node: counted and acted on as a local one."""
        session = self.sessions.get(forward.session_id)
        remote = self._remote_of.get(forward.session_id)
        if session is None or remote is None or (remote.id, remote.node) != (forward.peer_id, forward.origin):
            return []
        decoder = FrameDecoder(max_frame_size=self.config.max_frame_size)
        decoder.feed(forward.data)
        try:
            frame = decoder.next_frame()
            msg = None if frame is None else decode_message(frame)
        except ProtocolError as exc:
            log.warning("coordinator.bad_forward", origin=forward.origin, error=exc.message)
            return []
        if not isinstance(msg, Result) or msg.session_id != session.id:
            return []
        log.info("coordinator.remote_result", peer=remote.id, node=remote.node, session=session.id,
                 outcome=msg.outcome.value)
        return self._session_result(session, remote.id, msg, now)

    def _drop_route(self, session_id: str) -> tuple[str, str] | None:
        """Forget the route of a session held at another node (expired, abandoned, or its peer left)."""
        route = self._routes.pop(session_id, None)
        if route is not None:
            self._timers.cancel((_Timer.SESSION, session_id))
            record = self.registry.get(route[1])
            if record is not None:
                record.sessions.discard(session_id)
        return route

    def remote_view(self, record: PeerRecord) -> RemotePeer:
        """``record`` as the other nodes of the cluster see it."""
        assert self.node is not None
        return RemotePeer(id=record.id, node=self.node, observed=record.observed, private=record.private,
                          nat=record.nat, ipv6=record.ipv6, owd=record.one_way_delay(), birthday=record.birthday,
                          key=record.key)

    def _tell(self, session: Session, peer_id: str, message: Message) -> list[Action]:
        """``message`` to ``peer_id``, of ``session``, wherever in the cluster it is registered."""
        record = self.registry.get(peer_id)
        if record is not None:
            return [Send(record.conn, encode_message(message))]
        remote = self._remote_of.get(session.id)
        if remote is not None and remote.id == peer_id:
            return [Forward(remote.node, remote.id, encode_message(message), origin=self.node or "",
                            session_id=session.id)]
        return []

    def _open_session(
        self, c: _Conn, me: PeerRecord, target: PeerRecord | RemotePeer, msg: Connect, now: float
    ) -> list[Action]:
        cfg = self.config
        session_id = self._random(16).hex()
        key = self._random(SESSION_KEY_SIZE)
        fire_me, fire_target = schedule_fire(me.one_way_delay(), target.one_way_delay(), margin=cfg.fire_margin)
        session = Session(
            id=session_id,
            key=key,
            initiator=me.id,
            responder=target.id,
            created_at=now,
            expires_at=now + max(fire_me, fire_target) + cfg.punch_window + cfg.relay_window,
            # relay budget accounts; a peer registered at another node is charged there
            accounts=(me.account, *((target.account,) if isinstance(target, PeerRecord) else ())),
            nat_pair=f"{nat_label(me.nat)}/{nat_label(target.nat)}",
            keys={Role.INITIATOR: me.key, Role.RESPONDER: target.key},
            initiator_source=c.source,
        )
        self.sessions[session_id] = session
        self._timers.schedule((_Timer.SESSION, session_id), session.expires_at)
        me.sessions.add(session_id)
        if isinstance(target, RemotePeer):
            self._remote_of[session_id] = target
        else:
            target.sessions.add(session_id)
        self.stats.sessions += 1
        advice, advice_reason = relay_advice(me.nat, target.nat, ipv6=bool(me.ipv6 and target.ipv6),
                                             birthday=me.birthday and target.birthday)
        if msg.relay_only:
            advice, advice_reason = RelayAdvice.RELAY_NOW, f"{me.id} asked for the relay"
        log.info(
            "coordinator.session",
            session=session_id,
            initiator=me.id,
            responder=target.id,
            fire_ms=(round(fire_me * 1000), round(fire_target * 1000)),
            advice=advice.value,
        )
        actions: list[Action] = []
        for this, other, role, fire, request_id in (
            (me, target, Role.INITIATOR, fire_me, msg.request_id),
            (target, me, Role.RESPONDER, fire_target, None),
        ):
            # A peer of another node gets the initiator's relay: both join the relay of this session's node.
            this_conn = c if isinstance(this, RemotePeer) else self._conns[this.conn]
            order = Punch(
                session_id=session_id,
                key=key,
                role=role,
                peer_id=other.id,
                peer_observed=other.observed,
                peer_private=other.private,
                peer_nat=other.nat,
                fire_in_ms=round(fire * 1000),
                deadline_ms=round((fire + cfg.punch_window) * 1000),
                relay=cfg.relay_endpoint or this_conn.local,
                relay_advice=advice,
                request_id=request_id,
                advice_reason=advice_reason,
                peer_ipv6=other.ipv6,
                peer_key=other.key,
            )
            data = self._encode_punch(order)
            actions.append(Forward(this.node, this.id, data, origin=self.node or "", session_id=session_id,
                                   expires_in=session.expires_at - now)
                           if isinstance(this, RemotePeer) else Send(this.conn, data))
        return actions

    def _encode_punch(self, order: Punch) -> bytes:
        """PUNCH bytes within the frame limit: the other peer's report and private endpoints are left out
        (and the reason says so) when they would not fit. Input validation keeps this from happening."""
        data = encode_message(order)
        if len(data) - 4 <= self.config.max_frame_size:
            return data
        why = f"{order.advice_reason} (the peer's NAT report was left out: too large)"
        return encode_message(dataclasses.replace(order, peer_nat=None, peer_private=(), advice_reason=why))

    def _observed(self, record: PeerRecord, msg: Observed, now: float) -> list[Action]:
        """A fresher public port for the next punch. Same address only: a peer must not be able to aim
        other peers' SYNs at an address that is not its own."""
        if msg.observed.ip != record.observed.ip or not self._plausible_port(record, msg.observed, now):
            self._warn("coordinator.observed_refused", peer=record.id, claimed=str(msg.observed))
            return []
        record.observed = msg.observed
        return []

    def _plausible_port(self, record: PeerRecord, claimed: Endpoint, now: float) -> bool:
        """A port this server saw from the peer's address lately, or one its sequential NAT could have
        given it since (within port_delta * observed_window_steps of the port it has now)."""
        cfg = self.config
        seen = self._seen.get(claimed.ip, {}).get(claimed.port)
        if seen is not None and now - seen <= cfg.observed_seen_ttl:
            return True
        delta = None if record.nat is None else record.nat.tcp.port_delta
        if not delta:
            return False
        return abs(claimed.port - record.observed.port) <= abs(delta) * cfg.observed_window_steps

    def _result(self, record: PeerRecord, msg: Result, now: float) -> list[Action]:
        session = self.sessions.get(msg.session_id)
        self.stats.results[msg.outcome.value] = self.stats.results.get(msg.outcome.value, 0) + 1
        log.info("coordinator.result", peer=record.id, session=msg.session_id, outcome=msg.outcome.value)
        if session is None:  # a session held at another node: the RESULT goes there
            route = self._routes.get(msg.session_id)
            if route is None or route[1] != record.id:
                return []
            self._drop_route(msg.session_id)  # a peer reports once per session: its slot here is free
            return [self._report(route[0], record.id, msg)]
        return self._session_result(session, record.id, msg, now)

    def _session_result(self, session: Session, peer_id: str, msg: Result, now: float) -> list[Action]:
        """``peer_id``'s RESULT (received here or forwarded by its node): the outcome, and the session's end."""
        if peer_id not in session.peer_ids():
            return []
        session.results[peer_id] = msg.outcome.value
        if msg.outcome in (Outcome.DIRECT, Outcome.FAILED):
            self.stats.outcome(session, msg.outcome.value, now)
        if msg.outcome is Outcome.ABANDONED:
            why = f"peer {peer_id!r} gave up"
            if isinstance(msg.details.get("reason"), str):
                why = safe_text(f"{why}: {msg.details['reason']}")
            actions = self._tell(session, session.other(peer_id), Cancel(session.id, why))
            return actions + self._end_session(session, ErrorCode.SESSION_CANCELLED, why)
        # Both connected directly: the session (and its relay option) is done, free the slots now.
        if len(session.results) == 2 and set(session.results.values()) == {Outcome.DIRECT.value}:
            return self._end_session(session, ErrorCode.UNKNOWN_SESSION, "the session ended direct")
        return []

    def _end_session(self, session: Session, code: ErrorCode, why: str) -> list[Action]:
        """Forget a session; relay connections still waiting for their partner get ``code`` and a close."""
        self.sessions.pop(session.id, None)
        self._remote_of.pop(session.id, None)
        self._timers.cancel((_Timer.SESSION, session.id))
        actions: list[Action] = []
        for peer_id in session.peer_ids():
            record = self.registry.get(peer_id)
            if record is not None:
                record.sessions.discard(session.id)
        for conn in list(session.relay_waiting.values()):
            c = self._conns.get(conn)
            if c is not None:
                actions += self._fail(c, code, why)
        session.relay_waiting.clear()
        return actions

    # --------------------------------------------------------------------------------------- relay

    def _relay(self, c: _Conn, msg: Relay, now: float) -> list[Action]:
        cfg = self.config
        c.raw += c.decoder.take_rest()
        throttled = self._throttled(c, now)
        if throttled:
            return throttled
        if msg.session_id in self.expose.pending:
            return self._join_visitor(c, msg)
        session = self.sessions.get(msg.session_id)
        if session is None:
            return self._fail(c, ErrorCode.UNKNOWN_SESSION, "no such session (unknown, expired or used)")
        if c.key is None:
            return self._fail(c, ErrorCode.TLS_REQUIRED, "join the relay over TLS")
        if c.key != session.keys.get(msg.role):
            self._auth_failed(c, now, "coordinator.relay_wrong_key", session=session.id, key=c.key)
            return self._fail(c, ErrorCode.RELAY_WRONG_KEY, f"the {msg.role.value} of this session holds another key")
        if msg.role in session.relay_joined:
            self._auth_failed(c, now, "coordinator.relay_replayed", session=session.id)
            return self._fail(c, ErrorCode.RELAY_USED, f"the {msg.role.value} already joined this relay (joins are "
                              "single-use)")
        if not hmac.compare_digest(relay_proof(session.key, session.id, msg.role), msg.proof):
            self._auth_failed(c, now, "coordinator.relay_bad_proof", session=session.id)
            return self._fail(c, ErrorCode.BAD_PROOF, "relay proof does not match the session key")
        busy = [p for p in session.peer_ids() if self.active_relays(p) >= cfg.max_relays_per_peer]
        if busy:
            return self._refuse_relay(c, session, f"{busy[0]!r} has {cfg.max_relays_per_peer} relays running")
        spent = self.relay_accounting.exhausted((f"source:{c.source}", *session.accounts), now)
        if spent is not None:
            return self._refuse_relay(c, session, f"the relay budget of {spent} is used up for this window")
        session.relay_waiting[msg.role] = c.id
        self._set_state(c, ConnState.RELAY_WAIT)
        c.session_id, c.role = session.id, msg.role
        session.relay_joined.add(msg.role)
        self._timers.cancel((_Timer.HANDSHAKE, c.id))
        actions = self._check_relay_overflow(c, now)
        if c.state is not ConnState.RELAY_WAIT or len(session.relay_waiting) < 2:
            return actions
        return actions + self._pair(session, now)

    def _refuse_relay(self, c: _Conn, session: Session, why: str) -> list[Action]:
        """The session cannot be relayed: say so to this connection, to a partner already waiting, and to
        both peers' control connections (CANCEL), instead of letting the partner wait for a relay that will
        never start."""
        return self._fail(c, ErrorCode.RELAY_LIMIT, why) + self._cancel_relay(session, ErrorCode.RELAY_LIMIT, why)

    def _check_relay_overflow(self, c: _Conn, now: float) -> list[Action]:
        if len(c.raw) > self.config.relay_pending_limit:
            return self._fail(c, ErrorCode.RELAY_OVERFLOW, "too many bytes sent before RELAY-OK")
        return []

    def _pair(self, session: Session, now: float) -> list[Action]:
        cfg = self.config
        ini = self._conns[session.relay_waiting[Role.INITIATOR]]
        resp = self._conns[session.relay_waiting[Role.RESPONDER]]
        self.sessions.pop(session.id, None)
        self._remote_of.pop(session.id, None)
        self._timers.cancel((_Timer.SESSION, session.id))
        self.stats.outcome(session, Outcome.RELAY.value, now)
        session.relay_started = True
        session.relay_waiting.clear()
        for peer_id in session.peer_ids():
            record = self.registry.get(peer_id)
            if record is not None:
                record.sessions.discard(session.id)
            self._relay_count[peer_id] = self._relay_count.get(peer_id, 0) + 1
        self._relays[session.id] = session.peer_ids()
        self.stats.relays += 1
        ok = encode_message(RelayOk(session.id))
        actions: list[Action] = [Send(ini.id, ok), Send(resp.id, ok)]
        actions.append(
            StartRelay(
                session_id=session.id,
                initiator=ini.id,
                responder=resp.id,
                initiator_pending=bytes(ini.raw),
                responder_pending=bytes(resp.raw),
                idle_timeout=cfg.relay_idle_timeout,
                max_bytes=cfg.relay_max_bytes,
                budgets=tuple(self.relay_accounting.budgets(
                    (f"source:{ini.source}", f"source:{resp.source}", *session.accounts), self._clock)),
                max_duration=cfg.relay_limits.max_duration,
            )
        )
        for c in (ini, resp):
            c.raw.clear()
            self._set_state(c, ConnState.HANDED_OFF)
            self._conns.pop(c.id, None)
        log.info("coordinator.relay_paired", session=session.id, peers=session.peer_ids())
        return actions

    # ------------------------------------------------------------------------------- errors, cleanup

    def _fail(self, c: _Conn, code: str, message: str) -> list[Action]:
        """Fatal error on ``c``: ERROR frame, lingering close, and forget everything the conn held."""
        if c.state is ConnState.CLOSED:
            return []
        if c.state is ConnState.VISITOR_WAIT:  # a visitor speaks its own protocol: no ERROR frame
            return self._drop_visitor(c.id)
        self._count_error(code)
        message = safe_text(message, self.config.max_error_text)
        extra = self.log_limiter.check(f"coordinator.error:{code}", self._clock)
        if extra is not None:
            log.info("coordinator.error", conn=c.id, code=code, message=message, peer=c.peer_id, **extra)
        actions: list[Action] = [Send(c.id, encode_message(Error(code, message))), Close(c.id, linger=True)]
        self._conns.pop(c.id, None)
        actions += self._cleanup(c, reason=code)
        return actions

    def _throttled(self, c: _Conn, now: float) -> list[Action]:
        """Refuse authentication from a source that failed too often lately ([] when it may try)."""
        if self._auth_failures.allowed(c.source, now):
            return []
        wait = self._auth_failures.retry_after(c.source, now)
        self._warn("coordinator.auth_throttled", source=c.source)
        return self._fail(c, ErrorCode.THROTTLED, f"too many failed attempts from your address; retry in {wait:.0f}s")

    def _auth_failed(self, c: _Conn, now: float, event: str, **fields: object) -> None:
        self._auth_failures.take(c.source, now)
        self._warn(event, source=c.source, observed=str(c.observed), **fields)

    def _cleanup(self, c: _Conn, *, reason: str) -> list[Action]:
        state = c.state
        self._set_state(c, ConnState.CLOSED)
        self._set_frame_deadline(c, None)
        self._timers.cancel((_Timer.HANDSHAKE, c.id))
        if state is ConnState.PEER and c.peer_id is not None:
            record = self.registry.get(c.peer_id)
            if record is not None and record.conn == c.id:
                return self._remove_peer(record, reason=reason)
        if state is ConnState.VISITOR_WAIT and c.session_id is not None:
            self.expose.visitor_lost(c.session_id)
            self._timers.cancel((_Timer.VISITOR, c.session_id))
        if state is ConnState.RELAY_WAIT and c.session_id is not None and c.role is not None:
            session = self.sessions.get(c.session_id)
            if session is not None and session.relay_waiting.get(c.role) == c.id:
                # Joins are single-use: this role cannot come back, so the relay cannot start.
                del session.relay_waiting[c.role]
                why = f"the {c.role.value}'s relay connection closed before its partner came"
                return self._cancel_relay(session, ErrorCode.SESSION_CANCELLED, why)
        return []

    def _cancel_relay(self, session: Session, code: ErrorCode, why: str) -> list[Action]:
        """The session's relay cannot start: tell both peers (CANCEL ``code: why``) and a waiting partner."""
        actions: list[Action] = []
        for peer_id in session.peer_ids():
            record = self.registry.get(peer_id)
            if record is not None:
                actions.append(Send(record.conn, encode_message(Cancel(session.id, safe_text(f"{code.value}: {why}")))))
        return actions + self._end_session(session, code, why)

    def _remove_peer(self, record: PeerRecord, *, reason: str = "removed") -> list[Action]:
        """Unregister ``record``; sessions it was in are cancelled and the other peer is told (CANCEL)."""
        self.registry.remove(record.id)
        self._timers.cancel((_Timer.PEER, record.id))
        log.info("coordinator.unregistered", peer=record.id, reason=reason)
        actions: list[Action] = [] if self.node is None else [Release(record.id)]
        for session_id in sorted(record.sessions):
            route = self._drop_route(session_id)
            if route is not None:  # held at another node: it ends the session and tells the other peer
                gone = Result(session_id, Outcome.ABANDONED, {"reason": f"left ({reason})"})
                actions.append(self._report(route[0], record.id, gone))
                continue
            session = self.sessions.get(session_id)
            if session is None:
                continue
            cancel = Cancel(session_id, f"peer {record.id!r} left ({reason})")
            actions += self._tell(session, session.other(record.id), cancel)
            actions += self._end_session(session, ErrorCode.SESSION_CANCELLED, f"peer {record.id!r} left")
        record.sessions.clear()
        ports, visitors = self.expose.release(record.id)
        actions += [ClosePort(port) for port in ports]
        for visitor in visitors:
            actions += self._drop_visitor(visitor.conn)
        return actions

    # ------------------------------------------------------------------------------- exposed ports

    def port_opened(self, port: int, now: float) -> list[Action]:
        """The driver listens on ``port`` (after :class:`OpenPort`): tell its owner where."""
        held = self.expose.opened(port)
        record = None if held is None else self.registry.get(held.peer_id)
        if held is None or record is None:
            return [ClosePort(port)]
        address = Endpoint(self._conns[record.conn].local.ip, port)
        log.info("coordinator.exposed", peer=held.peer_id, address=str(address))
        return [Send(record.conn, encode_message(Exposed(held.request_id, port, address)))]

    def port_failed(self, port: int, reason: str, now: float) -> list[Action]:
        """The driver could not listen on ``port`` (in use on this host, no permission...)."""
        held = self.expose.failed(port)
        record = None if held is None else self.registry.get(held.peer_id)
        if held is None or record is None:
            return []
        c = self._conns[record.conn]
        return self._request_error(c, held.request_id, ErrorCode.EXPOSE_PORT_TAKEN,
                                   f"port {port} cannot be opened on the server: {reason}")

    def visitor_arrived(self, conn: ConnId, port: int, observed: Endpoint, local: Endpoint,
                        now: float) -> list[Action]:
        """A connection was accepted on exposed ``port``: ask its owner to join it, or close it."""
        if conn in self._conns:
            raise ValueError(f"connection {conn} already exists")
        visitor_id = self._random(16).hex()
        admitted = self.expose.admit(port, conn, visitor_id, self._random(SESSION_KEY_SIZE), now)
        if isinstance(admitted, Refusal):
            log.info("coordinator.visitor_refused", port=port, visitor=str(observed), reason=admitted.message)
            return [Close(conn)]
        record = self.registry.get(admitted.peer_id)
        assert record is not None, "a listening port always has a registered owner"
        self._conns[conn] = _Conn(id=conn, observed=observed, local=local, decoder=FrameDecoder(),
                                  handshake_deadline=admitted.deadline, state=ConnState.VISITOR_WAIT,
                                  peer_id=admitted.peer_id, session_id=visitor_id)
        self._timers.schedule((_Timer.VISITOR, visitor_id), admitted.deadline)
        relay = self.config.relay_endpoint or self._conns[record.conn].local
        notice = Visitor(visitor_id, admitted.key, port, observed, local, relay)
        return [Send(record.conn, encode_message(notice))]

    def _expose(self, c: _Conn, record: PeerRecord, msg: Expose) -> list[Action]:
        refusal = self.expose.refuse(record.id, msg.remote_port)
        if refusal is not None:
            return self._request_error(c, msg.request_id, refusal.code, refusal.message)
        self.expose.reserve(record.id, msg.remote_port, msg.request_id)
        return [OpenPort(msg.remote_port, c.local.ip)]

    def _join_visitor(self, c: _Conn, msg: Relay) -> list[Action]:
        """The owner's join connection for a waiting visitor: check the proof, then carry the visitor."""
        waiting = self.expose.pending[msg.session_id]
        if c.key is None:
            return self._fail(c, ErrorCode.TLS_REQUIRED, "join the relay over TLS")
        owner = self.registry.get(waiting.peer_id)
        if owner is None or owner.key != c.key:
            self._auth_failed(c, self._clock, "coordinator.visitor_wrong_key", visitor=waiting.visitor_id, key=c.key)
            return self._fail(c, ErrorCode.RELAY_WRONG_KEY, "only the key that exposed the port may join its visitors")
        expected = relay_proof(waiting.key, waiting.visitor_id, Role.RESPONDER)
        if msg.role is not Role.RESPONDER or not hmac.compare_digest(expected, msg.proof):
            self._auth_failed(c, self._clock, "coordinator.visitor_bad_proof", visitor=waiting.visitor_id)
            return self._fail(c, ErrorCode.BAD_PROOF, "join proof does not match the visitor key")
        if len(c.raw) > self.config.relay_pending_limit:
            return self._fail(c, ErrorCode.RELAY_OVERFLOW, "too many bytes sent before RELAY-OK")
        self.expose.join(waiting.visitor_id)
        self._timers.cancel((_Timer.VISITOR, waiting.visitor_id))
        visitor = self._conns.pop(waiting.conn)
        self._conns.pop(c.id, None)
        self._set_state(visitor, ConnState.HANDED_OFF)
        self._set_state(c, ConnState.HANDED_OFF)
        assert self.expose.config is not None
        pending, c.raw = bytes(c.raw), bytearray()
        return [
            Send(c.id, encode_message(RelayOk(waiting.visitor_id))),
            StartRelay(
                session_id=waiting.visitor_id,
                initiator=visitor.id,
                responder=c.id,
                initiator_pending=b"",
                responder_pending=pending,
                idle_timeout=self.expose.config.idle_timeout,
                max_bytes=None,
                expose_peer=waiting.peer_id,
            ),
        ]

    def _drop_visitor(self, conn: ConnId) -> list[Action]:
        """Close a waiting visitor's connection (no frame: it is not our protocol)."""
        c = self._conns.pop(conn, None)
        if c is None:
            return []
        self._cleanup(c, reason="dropped")
        return [Close(conn)]

def _ipv6_of(observed: Endpoint, claimed: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
    """A peer's IPv6 endpoints: the control connection's source first when it came over IPv6 (seen, not
    claimed), then what REGISTER claimed (already checked to be routable IPv6 unicast), at most
    MAX_ENDPOINTS."""
    seen = (observed,) if routable_ipv6(observed.ip) else ()
    return tuple(dict.fromkeys(seen + claimed))[:MAX_ENDPOINTS]
