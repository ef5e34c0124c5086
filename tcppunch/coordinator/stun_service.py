"""The STUN server of ``tcppunch server``: Binding over TCP (RFC 8489 + RFC 5780) and classic UDP (RFC 3489).

Addresses: a primary address A1 and an optional alternate A2, ports P1 and P2 (default P1 + 1). Every
(address, port) combination gets a TCP listener and a UDP socket, so a client can compare the mapping
its NAT gives towards (A1,P1), (A2,P1) and (A1,P2) (RFC 5780 section 4.3).

TCP filtering test (ours; RFC 5780 defines filtering tests for UDP only). A TCP Binding request carrying
CHANGE-REQUEST makes the server, before answering, open a TCP connection FROM the changed source (the
other address and/or the other port, relative to where the request arrived) TO the requester's mapped
endpoint (the peer address of the request's connection), with a short timeout (the configured one, or
three smoothed RTTs of the request's connection if longer). The client listens on
the same local port meanwhile (SO_REUSEPORT), so a connection that gets through is ground truth that the
NAT's filter lets such a SYN in. The outcome (connected / refused = RST / timeout = dropped) goes back in
the private comprehension-optional attribute CONNECT-BACK-RESULT (0x8055). A connected back-connection
carries one Binding Indication and is then closed by the server once the client has closed its side
(so the TIME_WAIT state stays with the client, whose port changes every run).

UDP: classic RFC 3489 for pystun3 and friends. A request without the magic cookie gets MAPPED-ADDRESS,
SOURCE-ADDRESS and CHANGED-ADDRESS only, every attribute a multiple of 4 bytes long (pystun3 2.0.0 walks
attributes without padding), and CHANGE-REQUEST is honoured by answering from the changed socket. A
request with the cookie additionally gets XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN, OTHER-ADDRESS, SOFTWARE
and FINGERPRINT. RESPONSE-ADDRESS is ignored on purpose: honouring it would make us a reflector.

Bad input never stops the service: malformed datagrams are dropped, a malformed TCP stream is closed
(after a 400 when the transaction can still be named), and every connection handler is guarded.

The response logic is the pure function :func:`answer_binding`; the asyncio classes only move bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from tcppunch.nat.sockets import reuse_port_socket as _reuse_port_socket
from tcppunch.nat.sockets import smoothed_rtt
from tcppunch.ratelimit import KeyedBuckets, LogLimiter, source_key
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.stun import (
    AlternatePort,
    Attribute,
    ChangedAddress,
    ChangeRequest,
    ConnectBackOutcome,
    ConnectBackResult,
    MappedAddress,
    MessageClass,
    OtherAddress,
    ResponseOrigin,
    Software,
    SourceAddress,
    StunErrorCode,
    StunMessage,
    StunMethod,
    StunParseError,
    StunStreamDecoder,
    UnknownAttributes,
    XorMappedAddress,
    encode_message,
    parse_message,
)

log = structlog.get_logger(__name__)

SOFTWARE = "tcppunch"
# The connect-back waits at least this many smoothed round trips of the request's connection (TCP_INFO),
# and never longer than MAX_CONNECT_BACK_TIMEOUT.
CONNECT_BACK_RTTS = 3
MAX_CONNECT_BACK_TIMEOUT = 5.0
# How long a connected back-connection waits for the client to close before the server closes it.
BACK_CONNECTION_LINGER = 2.0


@dataclass(frozen=True)
class StunServiceConfig:
    """Where the STUN service listens and how it runs the connect-back filtering test."""

    primary_address: str
    primary_port: int = 3478
    alternate_address: str | None = None
    alternate_port: int | None = None  # default: primary_port + 1
    connect_back_timeout: float = 0.4
    software: str = SOFTWARE
    tcp: bool = True
    udp: bool = True
    # TCP endpoints whose listener belongs to someone else (the coordinator sharing its port), who
    # hands STUN connections over through StunService.serve_tcp_connection(). That listener must set
    # SO_REUSEADDR + SO_REUSEPORT so connect-backs can originate from its address and port.
    external_tcp: frozenset[Endpoint] = frozenset()
    # TCP: a connection that sends nothing for tcp_idle_timeout is closed, and a message whose first
    # byte arrived must be complete within tcp_message_timeout (a total deadline, not one per read).
    tcp_idle_timeout: float = 10.0
    tcp_message_timeout: float = 5.0
    # TCP connections one source (IPv4 address or IPv6 /64) may hold open at once; more are closed at once.
    tcp_max_per_source: int = 64
    # UDP, per source (IPv4 address or IPv6 /64): datagrams answered, a bucket of udp_burst refilled at
    # udp_rate per second; the rest are dropped. Answers are never larger than their request.
    udp_rate: float = 20.0
    udp_burst: int = 100
    # RFC 5780 / classic RFC 3489 CHANGE-REQUEST over UDP (answer from the other address or port). Off:
    # such requests get 420 (classic ones: silence) and answers carry no OTHER-/CHANGED-ADDRESS.
    udp_change_request: bool = True

    @property
    def port2(self) -> int:
        return self.primary_port + 1 if self.alternate_port is None else self.alternate_port

    def endpoints(self) -> list[Endpoint]:
        """Every (address, port) combination served: (A1,P1), (A1,P2), then (A2,P1), (A2,P2) if any."""
        addresses = [self.primary_address]
        if self.alternate_address is not None:
            addresses.append(self.alternate_address)
        return [Endpoint(a, p) for a in addresses for p in (self.primary_port, self.port2)]


# ------------------------------------------------------------------------------- pure logic


def changed_source(
    config: StunServiceConfig, local: Endpoint, change: ChangeRequest
) -> Endpoint | None:
    """The server endpoint a CHANGE-REQUEST asks to answer from, relative to ``local``; None if we lack it."""
    ip = local.ip
    if change.change_ip:
        if config.alternate_address is None:
            return None
        ip = config.alternate_address if _same_ip(local.ip, config.primary_address) else config.primary_address
    port = local.port
    if change.change_port:
        port = config.port2 if local.port == config.primary_port else config.primary_port
    return Endpoint(ip, port)


def other_endpoint(config: StunServiceConfig, local: Endpoint) -> Endpoint | None:
    """RFC 5780 OTHER-ADDRESS as seen from ``local``: the combination differing in both address and port."""
    return changed_source(config, local, ChangeRequest(change_ip=True, change_port=True))


def answer_binding(
    request: StunMessage,
    config: StunServiceConfig,
    observed: Endpoint,
    received_on: Endpoint,
    sent_from: Endpoint,
    connect_back: ConnectBackResult | None = None,
) -> StunMessage | None:
    """The response to ``request`` (None: send nothing).

    ``observed`` is the requester's address as seen by the server, ``received_on`` the server endpoint
    the request arrived at, ``sent_from`` the one the response leaves from (differs after a UDP
    CHANGE-REQUEST). A classic (RFC 3489) request gets the classic dialect pystun3 parses correctly.
    """
    if request.message_class is not MessageClass.REQUEST:
        return None  # indications and stray responses get no answer (RFC 8489 section 6.3)
    if request.method != StunMethod.BINDING:
        return _error(request, 400, "Bad Request: only Binding is served")
    unknown = request.unknown_required()
    if unknown:
        return _error(request, 420, "Unknown Attribute", (UnknownAttributes(unknown),))
    other = other_endpoint(config, received_on)
    if request.classic:
        attributes: list[Attribute] = [MappedAddress(observed), SourceAddress(sent_from)]
        if other is not None:
            attributes.append(ChangedAddress(other))
        return StunMessage(StunMethod.BINDING, MessageClass.SUCCESS, request.transaction_id, tuple(attributes))
    attributes = [XorMappedAddress(observed), MappedAddress(observed), ResponseOrigin(sent_from)]
    if other is not None:
        attributes.append(OtherAddress(other))
    else:
        alt_port = changed_source(config, received_on, ChangeRequest(change_port=True))
        if alt_port is not None:
            attributes.append(AlternatePort(alt_port.port))
    if connect_back is not None:
        attributes.append(connect_back)
    attributes.append(Software(config.software))
    return StunMessage(
        StunMethod.BINDING, MessageClass.SUCCESS, request.transaction_id, tuple(attributes), fingerprint=True
    )


# Attributes a UDP answer can do without, the first given up first when it must shrink to the size of
# its request (the mapped address itself is never dropped).
_EXPENDABLE: tuple[type[Any], ...] = (Software, MappedAddress, ResponseOrigin, SourceAddress, AlternatePort,
                                      OtherAddress, ChangedAddress, UnknownAttributes)


def fit_response(response: StunMessage, limit: int) -> StunMessage | None:
    """``response`` shrunk to at most ``limit`` encoded bytes by leaving out expendable attributes (and
    FINGERPRINT), or None when even the reflexive address alone does not fit: a UDP server must not
    amplify. A client that wants the whole answer pads its request (RFC 5780 PADDING)."""
    if len(encode_message(response)) <= limit:
        return response
    message = dataclasses.replace(response, fingerprint=False)
    essential = XorMappedAddress if message.find(XorMappedAddress) is not None else MappedAddress
    for kind in (None, *_EXPENDABLE):
        if kind is not None and kind is not essential:
            message = dataclasses.replace(message, attributes=tuple(
                a for a in message.attributes if type(a) is not kind))
        if len(encode_message(message)) <= limit:
            return message
    return None


def _error(request: StunMessage, code: int, reason: str, extra: tuple[Attribute, ...] = ()) -> StunMessage:
    return StunMessage(
        request.method & 0xFFF,
        MessageClass.ERROR,
        request.transaction_id,
        (StunErrorCode(code, reason), *extra, Software(SOFTWARE)),
        fingerprint=not request.classic,
    )


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def _endpoint(sockaddr: Any) -> Endpoint:
    ip = str(sockaddr[0])
    if ip.startswith("::ffff:"):
        ip = ip[len("::ffff:") :]
    return Endpoint(ip, int(sockaddr[1]))


def reuse_port_socket(kind: socket.SocketKind, local: Endpoint) -> socket.socket:
    """A non-blocking socket bound to ``local`` with SO_REUSEADDR + SO_REUSEPORT."""
    return _reuse_port_socket(kind, Endpoint(local.ip, local.port))


# ------------------------------------------------------------------------------------- the service


class StunService:
    """Serves STUN on TCP and UDP on every configured (address, port) combination.

    ``async with StunService(config) as service:`` binds everything (raising OSError if a socket cannot
    be bound) and closes it all on exit. ``serve_tcp_connection`` lets another listener (the
    coordinator, sharing its port) hand over a connection it recognised as STUN.
    """

    def __init__(self, config: StunServiceConfig) -> None:
        self.config = config
        self._servers: list[asyncio.Server] = []
        self._udp: dict[Endpoint, asyncio.DatagramTransport] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._log = log.bind(primary=f"{config.primary_address}:{config.primary_port}")
        self._udp_buckets = KeyedBuckets(config.udp_rate, config.udp_burst)
        self._log_limiter = LogLimiter()
        # Called with the requester's address for every TCP Binding answered (the coordinator lets a
        # peer name such a port in OBSERVED).
        self.on_binding: Callable[[Endpoint], None] | None = None
        self._tcp_per_source: dict[str, int] = {}
        self.udp_dropped = 0

    async def __aenter__(self) -> StunService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def tcp_endpoints(self) -> list[Endpoint]:
        """TCP endpoints this service listens on itself."""
        return [_endpoint(s.getsockname()) for server in self._servers for s in server.sockets]

    @property
    def udp_endpoints(self) -> list[Endpoint]:
        return list(self._udp)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for endpoint in self.config.endpoints():
                if self.config.tcp and endpoint not in self.config.external_tcp:
                    sock = reuse_port_socket(socket.SOCK_STREAM, endpoint)
                    server = await asyncio.start_server(self._accepted, sock=sock, backlog=128)
                    self._servers.append(server)
                if self.config.udp:
                    udp_sock = reuse_port_socket(socket.SOCK_DGRAM, endpoint)
                    transport, _ = await loop.create_datagram_endpoint(
                        functools.partial(_UdpProtocol, self, endpoint), sock=udp_sock
                    )
                    self._udp[endpoint] = transport
        except BaseException:
            await self.close()
            raise
        self._log.info("stun_listening", tcp=[str(e) for e in self.tcp_endpoints], udp=[str(e) for e in self._udp])

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for transport in self._udp.values():
            transport.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._servers.clear()
        self._udp.clear()

    # ------------------------------------------------------------------------------------------ TCP

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.serve_tcp_connection(reader, writer, b"")

    async def serve_tcp_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, prefix: bytes
    ) -> None:
        """Serve Binding requests on one TCP connection until it closes; ``prefix``: bytes already read.

        Never raises (except cancellation): any failure closes this connection only.
        """
        self._writers.add(writer)
        try:
            peer = _endpoint(writer.get_extra_info("peername"))
            local = _endpoint(writer.get_extra_info("sockname"))
        except (TypeError, IndexError, ValueError):
            writer.close()
            self._writers.discard(writer)
            return
        source = source_key(peer.ip)
        if self._tcp_per_source.get(source, 0) >= self.config.tcp_max_per_source:
            self._writers.discard(writer)
            writer.transport.abort()
            extra = self._log_limiter.check("stun_tcp_source_limit", asyncio.get_running_loop().time())
            if extra is not None:
                self._log.warning("stun_tcp_source_limit", source=source, **extra)
            return
        self._tcp_per_source[source] = self._tcp_per_source.get(source, 0) + 1
        try:
            await self._serve_tcp(reader, writer, prefix, peer, local)
        finally:
            left = self._tcp_per_source.pop(source, 1) - 1
            if left > 0:
                self._tcp_per_source[source] = left

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, prefix: bytes,
                         peer: Endpoint, local: Endpoint) -> None:
        conn_log = self._log.bind(peer=str(peer), local=str(local))
        decoder = StunStreamDecoder()
        decoder.receive_data(prefix)
        loop = asyncio.get_running_loop()
        cfg = self.config
        # The connection's one deadline: for the message under way, or for the next one to start.
        deadline = loop.time() + (cfg.tcp_message_timeout if prefix else cfg.tcp_idle_timeout)
        try:
            while True:
                try:
                    while (request := decoder.next_message()) is not None:
                        await self._answer_tcp(request, writer, peer, local)
                        wait = cfg.tcp_message_timeout if decoder.buffered else cfg.tcp_idle_timeout
                        deadline = loop.time() + wait
                except StunParseError as exc:
                    conn_log.info("stun_tcp_bad_message", error=str(exc))
                    header = exc.header
                    if header is not None and header.message_class is MessageClass.REQUEST:
                        bad = StunMessage(header.method, MessageClass.REQUEST, header.transaction_id)
                        writer.write(encode_message(_error(bad, 400, f"Bad Request: {exc}"[:120])))
                        await writer.drain()
                    if decoder.failed:
                        return
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError("message deadline passed")
                chunk = await asyncio.wait_for(reader.read(4096), remaining)
                if not chunk:
                    return
                if not decoder.buffered:  # a new message starts: it has tcp_message_timeout to complete
                    deadline = loop.time() + cfg.tcp_message_timeout
                decoder.receive_data(chunk)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            conn_log.debug("stun_tcp_closed", reason=type(exc).__name__)
        except Exception:  # a bug must not take the service down
            conn_log.exception("stun_tcp_handler_failed")
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer_tcp(
        self,
        request: StunMessage,
        writer: asyncio.StreamWriter,
        peer: Endpoint,
        local: Endpoint,
    ) -> None:
        connect_back: ConnectBackResult | None = None
        change = request.find(ChangeRequest)
        if (
            request.message_class is MessageClass.REQUEST
            and request.method == StunMethod.BINDING
            and change is not None
            and (change.change_ip or change.change_port)
            and not request.unknown_required()
        ):
            source = changed_source(self.config, local, change)
            if source is None:
                # No alternate address: report the test as impossible, from the unchanged source.
                connect_back = ConnectBackResult(ConnectBackOutcome.UNAVAILABLE, local)
            else:
                # A slow path must not pass for a dropped SYN: wait at least a few round trips.
                rtt = smoothed_rtt(writer.get_extra_info("socket"))
                timeout = self.config.connect_back_timeout
                if rtt is not None:
                    timeout = min(max(timeout, CONNECT_BACK_RTTS * rtt), MAX_CONNECT_BACK_TIMEOUT)
                outcome = await self._connect_back(source, peer, request.transaction_id, timeout)
                connect_back = ConnectBackResult(outcome, source)
        response = answer_binding(request, self.config, peer, local, local, connect_back)
        if response is not None:
            if response.message_class is MessageClass.SUCCESS and self.on_binding is not None:
                self.on_binding(peer)  # before the answer: the client's next OBSERVED may name this port
            writer.write(encode_message(response))
            await writer.drain()

    async def _connect_back(
        self, source: Endpoint, target: Endpoint, transaction_id: bytes, timeout: float
    ) -> ConnectBackOutcome:
        """Open a TCP connection from ``source`` to ``target``; report what happened."""
        loop = asyncio.get_running_loop()
        try:
            sock = reuse_port_socket(socket.SOCK_STREAM, source)
        except OSError as exc:
            self._log.warning("connect_back_bind_failed", source=str(source), error=str(exc))
            return ConnectBackOutcome.UNAVAILABLE
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (target.ip, target.port)), timeout)
        except TimeoutError:
            sock.close()
            return ConnectBackOutcome.TIMEOUT
        except ConnectionRefusedError:
            sock.close()
            return ConnectBackOutcome.REFUSED
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNRESET):
                return ConnectBackOutcome.REFUSED  # an active rejection (ICMP or RST), not silence
            self._log.warning("connect_back_failed", source=str(source), target=str(target), error=str(exc))
            return ConnectBackOutcome.UNAVAILABLE
        indication = StunMessage(StunMethod.BINDING, MessageClass.INDICATION, transaction_id, fingerprint=True)
        self._spawn(self._finish_back_connection(sock, encode_message(indication)))
        return ConnectBackOutcome.CONNECTED

    async def _finish_back_connection(self, sock: socket.socket, indication: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_sendall(sock, indication), BACK_CONNECTION_LINGER)
            # Let the client close first, so TIME_WAIT stays on its side.
            async with asyncio.timeout(BACK_CONNECTION_LINGER):
                while await loop.sock_recv(sock, 1024):
                    pass
        except (OSError, TimeoutError):
            pass
        finally:
            sock.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------------------ UDP

    def handle_datagram(self, data: bytes, addr: Any, received_on: Endpoint) -> None:
        """Answer one UDP datagram that arrived on ``received_on`` (drop it if it is not a request).

        Anti-amplification: at most ``udp_burst`` datagrams per source, refilled at ``udp_rate`` per
        second, and no answer larger than its request (see :func:`fit_response`)."""
        try:
            observed = _endpoint(addr)
        except (TypeError, IndexError, ValueError):
            return
        now = asyncio.get_running_loop().time()
        if not self._udp_buckets.take(source_key(observed.ip), now):
            self.udp_dropped += 1
            extra = self._log_limiter.check("stun_udp_rate_limited", now)
            if extra is not None:
                self._log.warning("stun_udp_rate_limited", source=observed.ip, **extra)
            return
        try:
            request = parse_message(data)
        except StunParseError as exc:
            self._log.debug("stun_udp_dropped", error=str(exc))
            return
        try:
            self._answer_udp(request, len(data), addr, observed, received_on)
        except Exception:  # a bug must not take the service down
            self._log.exception("stun_udp_handler_failed")

    def _answer_udp(self, request: StunMessage, size: int, addr: Any, observed: Endpoint,
                    received_on: Endpoint) -> None:
        sent_from = received_on
        change = request.find(ChangeRequest)
        if change is not None and (change.change_ip or change.change_port):
            changed = changed_source(self.config, received_on, change)
            if changed is None or changed not in self._udp or not self.config.udp_change_request:
                if not request.classic and request.message_class is MessageClass.REQUEST:
                    # RFC 5780 section 6.1: no alternate address -> 420 (classic clients get silence:
                    # pystun3 loops forever on an error reply).
                    reply = _error(request, 420, "Unknown Attribute", (UnknownAttributes((0x0003,)),))
                    self._send_udp(reply, size, received_on, addr)
                return
            sent_from = changed
        response = answer_binding(request, self.config, observed, received_on, sent_from)
        if response is not None and not self.config.udp_change_request:
            response = dataclasses.replace(response, attributes=tuple(
                a for a in response.attributes if not isinstance(a, OtherAddress | ChangedAddress | AlternatePort)))
        if response is not None:
            self._send_udp(response, size, sent_from, addr)

    def _send_udp(self, response: StunMessage, request_size: int, sent_from: Endpoint, addr: Any) -> None:
        fitted = fit_response(response, request_size)
        if fitted is None:
            self.udp_dropped += 1
            return
        self._udp[sent_from].sendto(encode_message(fitted), addr)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, service: StunService, endpoint: Endpoint) -> None:
        self._service = service
        self._endpoint = endpoint

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._service.handle_datagram(data, addr, self._endpoint)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from earlier sends; nothing to do but carry on.
        log.debug("stun_udp_icmp_error", error=str(exc))
