"""The asyncio driver of the coordinator: sockets and one timer around :class:`CoordinatorProtocol`.

Every accepted connection is a :class:`_Link`, an ``asyncio.Protocol`` (callbacks, no task per
connection: an idle peer costs its transport, its TLS state and a few slotted objects). Its first 8
bytes decide (the protocol's handshake timer bounds the wait): STUN (magic cookie) goes to
``stun_handler`` when one is configured, a TLS ClientHello starts the TLS engine, anything else is fed
to the protocol in clear (which can only answer errors). The protocol's actions are carried out in
order: write, close (lingering after an error so the client reads the ERROR frame instead of a RST), or
hand two relay connections to the relay pump. Writes are bounded (a client that stops reading is cut
off) and the frame decoder refuses oversize frames from their header, so one misbehaving client never
holds up the others. Beyond ``max_connections`` a client hears server-busy in the language it speaks."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import resource
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import structlog

from tcppunch.relay import ByteBudget, RelayAccounting, RelayEnd, RelayStats, detach, relay
from tcppunch.session.identity import Identity, config_dir
from tcppunch.session.records import RecordChannel, RecordError
from tcppunch.session.secure import SecureError, TlsEngine, context, peer_fingerprint
from tcppunch.wire.coord import Error, ErrorCode, encode_message
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.framing import PREAMBLE_SIZE
from tcppunch.wire.stun import looks_like_stun

from .auth import Tokens
from .cluster import ClusterUnavailable, RedisCluster
from .directory import ClaimAnswer, Forward, LookupPeer, RemotePeer
from .expose import ClosePort, OpenPort
from .protocol import Action, Close, CoordinatorConfig, CoordinatorProtocol, Send, StartRecords, StartRelay

log = structlog.get_logger()
RELAY_STATS_KEPT = 1000

StunHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]

READ_SIZE = 64 * 1024
# A client whose unread replies pile up beyond this is cut off (it is not reading its control channel).
MAX_WRITE_BUFFER = 256 * 1024
# After an ERROR frame: how long the server keeps draining a client before the final close.
LINGER_TIMEOUT = 2.0
RELAY_FLUSH_TIMEOUT = 5.0
TLS_HANDSHAKE_RECORD = b"\x16"  # the first byte of a ClientHello (STUN's is 0x00/0x01, ours 'T')
# Bytes moved through a TLS engine's memory BIOs at a time, either way. A memory BIO never gives back what
# it grew to: one 256 KiB read fed at once kept ~250 KB per connection for the connection's life (measured);
# in slices of this size each BIO stays under ~6 KB however much a client sends or LIST answers.
TLS_SLICE = 4096
# Default of --max-connections (control, relay and STUN-over-TCP connections together).
MAX_CONNECTIONS = 4096
# File descriptors kept free beyond max_connections: listeners, UDP sockets, connect-backs, logs, and
# the BUSY_ANSWERS connections beyond the limit that are being told server-busy.
FD_RESERVE = 64
BUSY_ANSWERS = 16
# A connection beyond the limit gets this long for its TLS handshake (or first byte) and our answer.
BUSY_TIMEOUT = 2.0


def raise_fd_limit(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``want`` (never above the hard limit); return the
    soft limit in force. A server at the default 1024 would otherwise fail accept() with EMFILE, and
    asyncio then stops accepting for a second at a time (6.5 s registrations in issue 9)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def endpoint_of(sockaddr: Any) -> Endpoint:
    """An :class:`Endpoint` from a socket address tuple; IPv4-mapped IPv6 addresses become IPv4."""
    ip, port = str(sockaddr[0]), int(sockaddr[1])
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[len("::ffff:") :]
    return Endpoint(ip, port)


class _Link(asyncio.Protocol):
    """One accepted connection, driven by the event loop's callbacks: no task, no streams, ``__slots__``.

    An idle registered peer costs its transport, this object and its record layer (two keys: the TLS
    engine is freed once the peer switched, docs/protocol.md; a peer that did not ask keeps it); a task with a stream
    reader and writer per connection cost ~6 KiB more of Python objects (docs/benchmarks.md). The rare
    paths that want streams (a STUN connection, a relay hand-over) get them from :meth:`to_streams`.
    """

    __slots__ = (
        "busy",
        "closing",
        "eof",
        "handed_off",
        "id",
        "linger_handle",
        "prefix",
        "reader",
        "records",
        "server",
        "stash",
        "tls",
        "transport",
        "visitor_port",
        "writer",
    )

    def __init__(self, server: CoordinatorServer, visitor_port: int | None = None) -> None:
        self.server = server
        self.id = 0  # set once admitted
        self.transport: asyncio.Transport | None = None
        # An exposed port's visitor: kept unread until its owner joins.
        self.visitor_port = visitor_port
        # The first bytes, until there are PREAMBLE_SIZE of them to tell STUN, TLS and plain TCP apart.
        self.prefix: bytes | None = b""
        # TLS (every client but a plain-TCP one, which can only hear errors): raw bytes go through it.
        self.tls: TlsEngine | None = None
        # The record layer a registered peer asked for: set when the server leaves TLS (our close_notify
        # sent); ``tls`` is dropped once the client's close_notify came (docs/protocol.md).
        self.records: RecordChannel | None = None
        self.closing = False
        self.handed_off = False
        # Bytes received after the hand-over to the relay was decided (by another connection's event).
        self.stash = b""
        self.eof = False
        self.linger_handle: asyncio.TimerHandle | None = None
        # Accepted beyond max_connections: it only hears server-busy (in TLS if it speaks TLS).
        self.busy = False
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._link_made(self)

    def data_received(self, data: bytes) -> None:
        self.server._link_data(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        return self.server._link_eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._link_lost(self)

    def to_streams(self, pending: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Hand the connection to a stream reader and writer: ``pending`` (bytes already taken off the
        socket) first, then what waits in the socket (reading resumes), or the EOF already seen."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_SIZE, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if pending:
            reader.feed_data(pending)
        if self.eof:
            reader.feed_eof()
        elif not self.transport.is_closing():
            self.transport.resume_reading()
        self.reader, self.writer = reader, asyncio.StreamWriter(self.transport, protocol, reader, loop)
        return self.reader, self.writer

    def write(self, data: bytes) -> None:
        """Application bytes to the client (encrypted on a TLS link)."""
        assert self.transport is not None
        if self.records is not None:  # after our close_notify everything we send is records
            self.transport.write(self.records.seal(data))
        elif self.tls is None:
            self.transport.write(data)
        elif self.tls.established:
            for piece in _slices(data):
                self.tls.write(piece)
                self.transport.write(self.tls.outgoing())
        # else: mid-handshake (a handshake timeout): nothing can be said, the close follows


class CoordinatorServer:
    """``tcppunch server``'s coordinator on one TCP address (shared with STUN when ``stun_handler`` is set),
    and on the ``also`` addresses (e.g. an IPv6 one beside the IPv4 one): one registry behind all of them.

    ``relay_bytes_per_peer``: byte budget of each peer id over the server's life, shared by all relays it
    takes part in (``None``: unlimited). Concurrency limits live in ``config.max_relays_per_peer``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        tokens: Tokens,
        *,
        config: CoordinatorConfig | None = None,
        stun_handler: StunHandler | None = None,
        relay_bytes_per_peer: int | None = None,
        max_connections: int = MAX_CONNECTIONS,
        reuse_port: bool | None = None,
        also: Sequence[Endpoint] = (),
        cluster: RedisCluster | None = None,
        identity: Identity | None = None,
        authorized_keys: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.also = tuple(also)
        # With a cluster, ids are claimed in Redis and CONNECTs reach peers of other nodes (cluster.py).
        self.cluster = cluster
        self.protocol = CoordinatorProtocol(tokens, config, node=None if cluster is None else cluster.node,
                                            authorized_keys=authorized_keys)
        if cluster is not None:  # relay budgets counted for the whole cluster (cluster.SharedBudget)
            limits = self.protocol.config.relay_limits
            self.protocol.relay_accounting = RelayAccounting(limits, now=0.0, make=cluster.budgets(limits.window))
        # The key clients pin (tcppunch server prints its fingerprint). Default: this user's server key
        # file, created on first use, so that a restarted server (in-process or CLI) keeps its key.
        self.identity = identity or Identity.load(config_dir() / "server.key")
        self.stun_handler = stun_handler
        self.max_connections = max_connections
        # STUN connect-back tests originate from the listening port itself: that needs SO_REUSEPORT.
        self.reuse_port = stun_handler is not None if reuse_port is None else reuse_port
        # the last relays' outcomes, for tests and operators; bounded, since a server runs for months
        self.relay_stats: collections.deque[RelayStats] = collections.deque(maxlen=RELAY_STATS_KEPT)
        self.relay_bytes_total = 0  # bytes carried by finished relays (the metrics endpoint reads it)
        self._relay_bytes = relay_bytes_per_peer
        self._budgets: dict[str, ByteBudget] = {}
        self._expose_budgets: dict[str, ByteBudget] = {}
        # exposed port -> its listener (visitors are accepted there and handed to the protocol)
        self._exposed: dict[int, asyncio.Server] = {}
        self._server: asyncio.Server | None = None
        self._more: list[asyncio.Server] = []  # the ``also`` listeners
        self._links: dict[int, _Link] = {}
        self._ids = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stun_active = 0
        self._busy: set[_Link] = set()  # connections beyond max_connections being told server-busy
        self._all_closed: asyncio.Future[None] | None = None  # stop(): set when the last link ended
        self._log = log.bind(component="coordinator")

    # ------------------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> CoordinatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Join the cluster if any (raises when Redis does not answer), bind and listen (raises OSError
        when the address cannot be bound).

        ``max_connections`` is lowered to what the file descriptor limit allows (after raising the soft
        limit as far as the hard one permits), so that accept() never runs out of descriptors."""
        soft = raise_fd_limit(self.max_connections + FD_RESERVE)
        if soft != resource.RLIM_INFINITY and self.max_connections > soft - FD_RESERVE:
            allowed = max(1, soft - FD_RESERVE)
            self._log.warning("coordinator.max_connections_lowered", wanted=self.max_connections,
                              allowed=allowed, fd_limit=soft)
            self.max_connections = allowed
        if self.cluster is not None:
            await self.cluster.start(self._deliver, self._claimed, self._local_peers)
        self._server = await self._listen(self.host, self.port)
        try:
            for extra in self.also:
                self._more.append(await self._listen(extra.ip, extra.port))
        except BaseException:
            for server in [self._server, *self._more]:
                server.close()
            self._server, self._more = None, []
            raise
        self._log = self._log.bind(listen=", ".join(str(a) for a in self.addresses))
        self._log.info("coordinator.listening")

    async def _listen(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(
            lambda: _Link(self), host, port, reuse_address=True, reuse_port=self.reuse_port, backlog=256
        )

    @property
    def addresses(self) -> list[Endpoint]:
        """Every bound address: the primary one first, then the ``also`` ones."""
        return [self.address] + [endpoint_of(s.sockets[0].getsockname()) for s in self._more if s.sockets]

    def stun_seen(self, address: Endpoint) -> None:
        """A STUN binding came from ``address``: a peer may name its port in OBSERVED (give this to
        :attr:`StunService.on_binding`)."""
        self.protocol.endpoint_seen(address, asyncio.get_running_loop().time())

    @property
    def address(self) -> Endpoint:
        """The bound address (useful with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the server is not started")
        return endpoint_of(self._server.sockets[0].getsockname())

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def stop(self) -> None:
        """Stop accepting, tell every client (ERROR shutting-down), end relays, wait for handlers."""
        for server in [*([self._server] if self._server is not None else []), *self._more]:
            server.close()
        for port in list(self._exposed):
            self._close_port(ClosePort(port))
        loop = asyncio.get_running_loop()
        self._apply(self.protocol.shutdown(loop.time()))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lingering():  # each lingers until its client closes, at most LINGER_TIMEOUT
            self._all_closed = loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._all_closed), LINGER_TIMEOUT + 1.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in list(self._links.values()):
            if link.transport is not None:
                link.transport.abort()
        self._links.clear()
        for link in list(self._busy):
            if link.transport is not None:
                link.transport.abort()
        for server in [*([self._server] if self._server is not None else []), *self._more]:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._server, self._more = None, []
        if self.cluster is not None:
            await self.cluster.close()  # after the releases of every id registered here

    # --------------------------------------------------------------------------------- connections

    def _link_made(self, link: _Link) -> None:
        transport = link.transport
        assert transport is not None
        now = asyncio.get_running_loop().time()
        if len(self._links) + self._stun_active >= self.max_connections:
            self._refuse_busy(link, now)
            return
        addresses = _addresses(transport)
        if addresses is None:
            transport.abort()
            return
        observed, local = addresses
        link.id = conn = next(self._ids)
        self._links[conn] = link
        if link.visitor_port is not None:
            if link.visitor_port not in self._exposed:
                del self._links[conn]
                transport.abort()
                return
            transport.pause_reading()  # its bytes wait in the socket until the owner joins
            link.prefix = None
            self._apply(self.protocol.visitor_arrived(conn, link.visitor_port, observed, local, now))
            return
        self._apply(self.protocol.connection_made(conn, observed, local, now))

    def _link_data(self, link: _Link, data: bytes) -> None:
        if link.busy:
            self._busy_data(link, data)
            return
        if link.handed_off:
            link.stash += data
            return
        if link.closing or link.id not in self._links:
            return  # lingering after an ERROR: drained and dropped until the client closes
        try:
            if link.prefix is not None:
                link.prefix += data
                if len(link.prefix) < PREAMBLE_SIZE and not link.eof:
                    return
                data, link.prefix = link.prefix, None
                if self.stun_handler is not None and looks_like_stun(data[:PREAMBLE_SIZE]):
                    self._hand_to_stun(link, data)
                    return
                if data[:1] == TLS_HANDSHAKE_RECORD:
                    link.tls = TlsEngine(context(self.identity, server_side=True), server_side=True)
            plain = self._decrypt(link, data)
            if plain:
                self._apply(self.protocol.data_received(link.id, plain, asyncio.get_running_loop().time()))
            if link.tls is not None and link.tls.peer_closed and not link.handed_off:
                self._end(link)
        except RecordError as exc:  # an altered, replayed, oversize or truncated record: this link ends
            self._record_failed(link, exc)
        except (ConnectionError, OSError, SecureError) as exc:  # ssl.SSLError is an OSError
            self._log.debug("coordinator.conn_error", conn=link.id, error=repr(exc))
            self._end(link)
        except Exception:  # a bug: this connection ends, the server and every other client go on
            self._log.exception("coordinator.conn_failed", conn=link.id)
            self._end(link)

    def _link_eof(self, link: _Link) -> bool:
        """The client half-closed: a relay end keeps its other direction (True); else the link ends."""
        if link.handed_off:
            return True
        if link.prefix and not link.busy:  # fewer than PREAMBLE_SIZE bytes, then EOF: they are all there is
            self._link_data(link, b"")
        if link.records is not None and link.tls is None and not link.closing:
            try:
                link.records.end()
            except RecordError as exc:
                self._record_failed(link, exc)
        self._end(link)
        return False

    def _record_failed(self, link: _Link, exc: RecordError) -> None:
        """A record that cannot be opened (or a stream ended inside one): said once, and the link ends."""
        self._log.info("coordinator.record_failed", conn=link.id, code=exc.code.value, error=str(exc))
        self._end(link)

    def _link_lost(self, link: _Link) -> None:
        if link.busy:
            self._busy.discard(link)
            if link.linger_handle is not None:
                link.linger_handle.cancel()
            return
        self._end(link)

    def _end(self, link: _Link) -> None:
        """Forget a connection (idempotent; a handed-off one belongs to the relay pump) and close it."""
        if self._links.get(link.id) is not link or link.handed_off:
            return
        del self._links[link.id]
        if link.linger_handle is not None:
            link.linger_handle.cancel()
        self._apply(self.protocol.connection_lost(link.id, asyncio.get_running_loop().time()))
        assert link.transport is not None
        link.transport.close()
        if self._all_closed is not None and not self._all_closed.done() and not self._lingering():
            self._all_closed.set_result(None)

    def _lingering(self) -> bool:
        """Whether a connection not handed to the relay pump is still open (stop() waits for them)."""
        return any(not link.handed_off for link in self._links.values())

    def _hand_to_stun(self, link: _Link, data: bytes) -> None:
        """A STUN connection on the shared port: the STUN service reads it from streams from now on."""
        assert self.stun_handler is not None
        self.protocol.connection_forget(link.id)
        del self._links[link.id]
        reader, writer = link.to_streams(data[PREAMBLE_SIZE:])
        self._stun_active += 1
        handler, prefix = self.stun_handler, data[:PREAMBLE_SIZE]

        async def serve() -> None:
            await handler(reader, writer, prefix)

        task = asyncio.get_running_loop().create_task(serve())
        self._tasks.add(task)
        task.add_done_callback(self._stun_done)

    def _stun_done(self, task: asyncio.Task[Any]) -> None:
        self._stun_active -= 1
        self._tasks.discard(task)

    def _refuse_busy(self, link: _Link, now: float) -> None:
        """At max_connections: the client hears server-busy in the language it speaks. A TLS client gets
        it inside TLS after the handshake (a plaintext frame would look like a broken handshake to it).
        At most BUSY_ANSWERS such connections at once, each at most BUSY_TIMEOUT; beyond, a reset."""
        assert link.transport is not None
        extra = self.protocol.log_limiter.check("coordinator.server_busy", now)
        if extra is not None:
            self._log.warning("coordinator.server_busy", limit=self.max_connections, **extra)
        if len(self._busy) >= BUSY_ANSWERS or link.visitor_port is not None:  # a visitor speaks another protocol
            link.transport.abort()
            return
        self._busy.add(link)
        link.busy = True
        link.linger_handle = asyncio.get_running_loop().call_later(BUSY_TIMEOUT, link.transport.abort)

    def _busy_data(self, link: _Link, data: bytes) -> None:
        """Answer server-busy (plain, or in TLS once the handshake is done), then half-close and drop what
        the client still sends until it closes (closing with unread bytes would send a RST, which can
        destroy the answer before the client read it); BUSY_TIMEOUT bounds it all."""
        transport = link.transport
        assert transport is not None
        if link.closing or transport.is_closing():
            return
        busy = encode_message(Error(ErrorCode.SERVER_BUSY, f"too many connections (limit {self.max_connections})"))
        if link.tls is None and not data.startswith(TLS_HANDSHAKE_RECORD):
            transport.write(busy)
        else:
            if link.tls is None:
                link.tls = TlsEngine(context(self.identity, server_side=True), server_side=True)
            tls = link.tls
            tls.feed(data)
            try:
                done = tls.handshake()
                transport.write(tls.outgoing())
                if not done:
                    return
                tls.write(busy)
                tls.read()  # what came with the handshake's end (REGISTER): close_write needs it read
                tls.close_write()
                transport.write(tls.outgoing())
            except (OSError, SecureError):  # a failed handshake: nothing can be said to this client
                transport.abort()
                return
        link.closing = True
        with contextlib.suppress(OSError):
            transport.write_eof()

    def _decrypt(self, link: _Link, raw: bytes) -> bytes:
        """The application bytes in ``raw`` (as they are on a plain link). On a TLS link this advances the
        handshake and, once it is done, tells the protocol which key the client holds."""
        tls = link.tls
        if tls is None:
            return raw if link.records is None else link.records.open(raw)
        assert link.transport is not None
        plain = []
        pieces = _slices(raw)
        for index, piece in enumerate(pieces):
            if link.records is not None:  # leaving TLS: the client's close_notify, then only records
                rest = tls.leave(piece)
                link.transport.write(tls.outgoing())
                if rest is None:
                    continue
                link.tls = None  # the SSLObject and its BIOs are freed: the records are all the link keeps
                plain.append(link.records.open(rest + b"".join(pieces[index + 1:])))
                break
            tls.feed(piece)
            if not tls.established:
                if tls.handshake():
                    self.protocol.connection_authenticated(link.id, peer_fingerprint(tls.ssl))
                link.transport.write(tls.outgoing())
                if not tls.established:
                    continue
            plain.append(tls.read())
            if out := tls.outgoing():
                link.transport.write(out)
        return b"".join(plain)

    # ------------------------------------------------------------------------------------- actions

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send(action)
            elif isinstance(action, Close):
                self._close(action)
            elif isinstance(action, OpenPort):
                self._open_port(action)
            elif isinstance(action, ClosePort):
                self._close_port(action)
            elif isinstance(action, StartRelay):
                self._start_relay(action)
            elif isinstance(action, StartRecords):
                self._start_records(action)
            elif isinstance(action, LookupPeer):
                self._lookup(action)
            elif self.cluster is not None:
                self.cluster.submit(action)
        self._arm_timer()

    # ------------------------------------------------------------------------------------- cluster

    def _lookup(self, action: LookupPeer) -> None:
        async def run() -> None:
            assert self.cluster is not None
            try:
                remote, unavailable = await self.cluster.lookup(action.request.peer), False
            except ClusterUnavailable:
                remote, unavailable = None, True
            now = asyncio.get_running_loop().time()
            self._apply(self.protocol.remote_found(action.conn, action.request, remote, now, unavailable=unavailable))

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _deliver(self, forward: Forward) -> None:
        self._apply(self.protocol.deliver(forward, asyncio.get_running_loop().time()))

    def _claimed(self, peer_id: str, conn: int | None, answer: ClaimAnswer) -> None:
        """A claim's answer (``conn`` None: a refresh, which only reports an id taken elsewhere)."""
        record = self.protocol.registry.get(peer_id)
        if record is not None and (conn is None or record.conn == conn):
            self._apply(self.protocol.claim_result(record.conn, answer, asyncio.get_running_loop().time()))

    def _local_peers(self) -> list[RemotePeer]:
        return [self.protocol.remote_view(record) for record in self.protocol.registry]

    def _send(self, action: Send) -> None:
        link = self._links.get(action.conn)
        if link is None or link.closing or link.transport is None or link.transport.is_closing():
            return
        link.write(action.data)
        if link.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self._log.info("coordinator.slow_reader_cut", conn=link.id)
            link.closing = True
            link.transport.abort()

    def _start_records(self, action: StartRecords) -> None:
        """REGISTERED (with our X25519 key) went out in TLS: derive the record keys, forget the ephemeral
        key, send close_notify. From now on we send records; the client's close_notify, then its records,
        are read in :meth:`_decrypt`."""
        link = self._links.get(action.conn)
        if link is None or link.closing or link.tls is None or not link.tls.established or link.transport is None:
            return
        try:
            keys = action.share.derive(action.client_public, is_client=False, client_key=action.client_key,
                                       server_key=self.identity.fingerprint)
        except RecordError as exc:
            self._record_failed(link, exc)
            return
        link.records = RecordChannel(keys)
        if link.tls.leave() is not None:  # the client cannot have answered a close_notify not yet sent
            self._log.info("coordinator.record_failed", conn=link.id, error="close_notify before the switch")
            self._end(link)
            return
        link.transport.write(link.tls.outgoing())

    def _close(self, action: Close) -> None:
        link = self._links.get(action.conn)
        if link is None or link.closing:
            return
        link.closing = True
        transport = link.transport
        assert transport is not None
        if action.linger and not transport.is_closing() and transport.can_write_eof():
            # Half-close: the client reads our ERROR, then EOF; its close ends our read loop.
            if link.tls is not None and link.tls.established and link.records is None:
                with contextlib.suppress(OSError):  # ssl.SSLError: the client's records may be in the way
                    link.tls.unwrap()  # close_notify: the end of our TLS stream is not a truncation
                transport.write(link.tls.outgoing())
            with contextlib.suppress(OSError):
                transport.write_eof()
            link.linger_handle = asyncio.get_running_loop().call_later(LINGER_TIMEOUT, transport.close)
        else:  # the protocol forgot it already; it no longer counts towards max_connections
            self._links.pop(link.id, None)
            transport.close()

    # ------------------------------------------------------------------------------- exposed ports

    def _open_port(self, action: OpenPort) -> None:
        """Listen on the exposed port now, on the address the owner reached (bound synchronously, so the
        answer is immediate)."""
        loop = asyncio.get_running_loop()
        try:
            family = socket.AF_INET6 if ":" in action.address else socket.AF_INET
            sock = socket.create_server((action.address, action.port), family=family, backlog=256)
        except OSError as exc:
            self._apply(self.protocol.port_failed(action.port, exc.strerror or str(exc), loop.time()))
            return
        sock.setblocking(False)
        server = loop.create_task(loop.create_server(functools.partial(_Link, self, action.port), sock=sock))
        server.add_done_callback(functools.partial(self._port_listening, action.port, sock))
        self._tasks.add(server)
        server.add_done_callback(self._tasks.discard)

    def _port_listening(self, port: int, sock: socket.socket, task: asyncio.Task[asyncio.Server]) -> None:
        if task.cancelled() or task.exception() is not None:
            sock.close()
            self._apply(self.protocol.port_failed(port, "cannot listen", asyncio.get_running_loop().time()))
            return
        self._exposed[port] = task.result()
        self._apply(self.protocol.port_opened(port, asyncio.get_running_loop().time()))

    def _close_port(self, action: ClosePort) -> None:
        server = self._exposed.pop(action.port, None)
        if server is not None:
            server.close()
            self._log.info("coordinator.port_closed", port=action.port)

    def _arm_timer(self) -> None:
        deadline = self.protocol.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer, deadline)

    def _on_timer(self, scheduled: float) -> None:
        self._timer = None
        self._timer_at = None
        now = max(asyncio.get_running_loop().time(), scheduled)
        try:
            self._apply(self.protocol.tick(now))
        except Exception:  # a bug must not stop every keepalive: log it, try again in a second
            self._log.exception("coordinator.tick_failed")
            self._timer_at = now + 1.0
            self._timer = asyncio.get_running_loop().call_at(self._timer_at, self._on_timer, self._timer_at)

    # --------------------------------------------------------------------------------------- relay

    def _start_relay(self, action: StartRelay) -> None:
        links = [self._links.get(action.initiator), self._links.get(action.responder)]
        for link in links:
            if link is not None:
                link.handed_off = True
                if link.transport is not None and not link.transport.is_closing():
                    link.transport.pause_reading()  # what follows waits in the socket for the relay
        task = asyncio.get_running_loop().create_task(self._run_relay(action, links[0], links[1]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _leave_tls(link: _Link) -> None:
        """Send close_notify after RELAY-OK and read up to the client's; what follows it goes to ``stash``."""
        tls = link.tls
        if tls is None:
            return
        assert link.reader is not None and link.writer is not None
        rest = tls.leave(link.stash)
        while rest is None:
            link.writer.write(tls.outgoing())
            raw = await link.reader.read(READ_SIZE)
            if not raw:
                raise ConnectionError("the relay client closed before leaving TLS")
            rest = tls.leave(raw)
        link.writer.write(tls.outgoing())
        link.stash = rest

    def _budget(self, peer_id: str) -> ByteBudget:
        budget = self._budgets.get(peer_id)
        if budget is None:
            if self.cluster is not None and self._relay_bytes is not None:
                budget = self.cluster.budgets(None)(f"peer:{peer_id}", self._relay_bytes)
            else:
                budget = ByteBudget(self._relay_bytes)
            self._budgets[peer_id] = budget
        return budget

    def _budgets_of(self, action: StartRelay) -> list[ByteBudget]:
        if action.expose_peer is not None:
            expose = self.protocol.config.expose
            if expose is None or expose.max_bytes_per_id is None:
                return []
            budget = self._expose_budgets.get(action.expose_peer)
            if budget is None:
                budget = self._expose_budgets[action.expose_peer] = ByteBudget(expose.max_bytes_per_id)
            return [budget]
        shared = list(action.budgets)  # per source address and per token
        if self._relay_bytes is None:
            return shared
        return shared + [self._budget(p) for p in self.protocol.relay_peers(action.session_id)]

    async def _run_relay(self, action: StartRelay, ini: _Link | None, resp: _Link | None) -> None:
        ends: list[RelayEnd] = []
        try:
            if ini is None or resp is None:
                raise ConnectionError("a relay connection vanished before the hand-over")
            pair = ((ini, action.initiator_pending), (resp, action.responder_pending))
            for lk, _ in pair:
                if lk.transport is None or lk.transport.is_closing():
                    raise ConnectionError("a relay connection closed before the hand-over")
                lk.to_streams()
            # Both joins leave TLS (close_notify both ways): the peers' own end-to-end TLS follows in the
            # clear TCP stream, and the relay forwards it without touching it.
            await asyncio.wait_for(asyncio.gather(*(self._leave_tls(lk) for lk, _ in pair)), RELAY_FLUSH_TIMEOUT)
            for lk, _ in pair:
                # RELAY-OK must be on the wire before the socket changes hands.
                assert lk.writer is not None
                lk.writer.transport.set_write_buffer_limits(0)
                await asyncio.wait_for(lk.writer.drain(), RELAY_FLUSH_TIMEOUT)
            for lk, pending in pair:
                assert lk.reader is not None and lk.writer is not None
                end = detach(lk.reader, lk.writer)
                # in arrival order: bytes the protocol held, bytes the read loop took, the reader's buffer
                ends.append(RelayEnd(end.sock, pending + lk.stash + end.pending))
            # Cancelled at max_duration: the pump then closes both sockets (TimeoutError below).
            stats = await asyncio.wait_for(relay(
                ends[0],
                ends[1],
                idle_timeout=action.idle_timeout,
                max_bytes=action.max_bytes,
                budgets=self._budgets_of(action),
            ), action.max_duration)
            self.relay_stats.append(stats)
            self.relay_bytes_total += stats.a_to_b + stats.b_to_a
            self._log.info("coordinator.relay_done", session=action.session_id, stats=str(stats))
        except (ConnectionError, OSError, TimeoutError, RuntimeError) as exc:
            self._log.info("coordinator.relay_failed", session=action.session_id, error=repr(exc))
            for sock_end in ends:
                sock_end.sock.close()
            for maybe in (ini, resp):
                if maybe is not None and maybe.transport is not None and not maybe.transport.is_closing():
                    maybe.transport.abort()
        finally:
            for maybe in (ini, resp):
                if maybe is not None:
                    self._links.pop(maybe.id, None)
            self.protocol.relay_finished(action.session_id)


def _slices(data: bytes) -> list[bytes]:
    """``data`` in pieces of at most TLS_SLICE bytes (none when empty; ``data`` itself when it fits)."""
    return [data[start:start + TLS_SLICE] for start in range(0, len(data), TLS_SLICE)]


def _addresses(transport: asyncio.BaseTransport) -> tuple[Endpoint, Endpoint] | None:
    """(the other side's endpoint, ours) of an accepted connection; None if it is already gone."""
    try:
        return (endpoint_of(transport.get_extra_info("peername")),
                endpoint_of(transport.get_extra_info("sockname")))
    except (TypeError, IndexError, ValueError):
        return None
