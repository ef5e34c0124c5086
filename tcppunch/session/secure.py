"""TLS 1.3 with pinned Ed25519 identities: between peers, to the coordinator, and on relay joins.

Every connection runs a mutually authenticated TLS 1.3 handshake (stdlib ``ssl``). Both sides present
the certificate of their identity key; OpenSSL's chain check passes for any tcppunch identity (see the
public anchor in :mod:`tcppunch.session.identity`) and proves nothing. What authenticates is:

1. the handshake's CertificateVerify, which proves the other side holds the private key of its
   certificate, and
2. :func:`verify_peer`: the fingerprint of that key is checked against what the caller expects (a pin,
   an allow list, the known-peers file) right after the handshake, before one byte is read or written.

Between peers the channel is then **bound to the punch session**: the initiator is the TLS client, and
each side's first record inside TLS is a BIND frame (session id, role, id) that the other side checks,
so a TLS connection from another session cannot be swapped in.

:class:`TlsEngine` is the sans-I/O core (``SSLObject`` over two memory BIOs): the coordinator drives it
from its asyncio streams, and relay joins use it to leave TLS after RELAY-OK (both sides send
close_notify, the rest of the TCP connection is the peers' own end-to-end TLS, which the relay only
forwards). :func:`read_record` reads one TLS record at a time so that nothing past close_notify is
taken off the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .identity import ANCHOR_DER, ANCHOR_FINGERPRINT, Identity, IdentityError, KeyMismatch, fingerprint_of_cert

BIND_MAGIC = b"TPB1"
MAX_BIND = 1024
RECORD_HEADER = 5
MAX_RECORD = 18 * 1024  # 2^14 + 2048: the largest TLS 1.3 ciphertext record
HANDSHAKE_TIMEOUT = 10.0
CLOSE_LINGER = 2.0  # how long close() waits for the other side's end of the stream

Verifier = Callable[[str], None]
"""Called with the other side's fingerprint after the handshake; raises :class:`KeyMismatch` to refuse."""


class SecureErrorCode(StrEnum):
    """Why a secure channel was not established."""

    KEY_MISMATCH = "peer-key-mismatch"  # the other side holds another key than expected
    SESSION_MISMATCH = "session-mismatch"  # its BIND names another session, role or id
    HANDSHAKE_FAILED = "handshake-failed"  # TLS failed, or the connection ended during it
    TIMEOUT = "handshake-timeout"


class SecureError(Exception):
    """No secure channel: ``code`` says why; ``expected``/``actual`` name the fingerprints on a key mismatch."""

    def __init__(self, code: SecureErrorCode, message: str, *, expected: str | None = None,
                 actual: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.expected = expected
        self.actual = actual


# ------------------------------------------------------------------------------------- contexts

_CONTEXTS: dict[tuple[str, bool], ssl.SSLContext] = {}


def context(identity: Identity, *, server_side: bool) -> ssl.SSLContext:
    """A TLS 1.3-only context presenting ``identity``, requiring a certificate from the other side.

    Built once per identity and side (``load_cert_chain`` wants a file: the PEM goes through a private
    temporary file that is deleted at once).
    """
    cache_key = (identity.fingerprint, server_side)
    ctx = _CONTEXTS.get(cache_key)
    if ctx is not None:
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ANCHOR_DER)
    with tempfile.NamedTemporaryFile(prefix="tcppunch-chain-") as chain:  # mode 0600
        chain.write(identity.pem_chain())
        chain.flush()
        ctx.load_cert_chain(chain.name)
    if server_side:
        ctx.num_tickets = 0  # no resumption: every connection authenticates its keys afresh
    _CONTEXTS[cache_key] = ctx
    return ctx


def peer_fingerprint(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str:
    """The fingerprint of the key the other side proved it holds in the handshake."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise SecureError(SecureErrorCode.HANDSHAKE_FAILED, "the other side presented no certificate")
    try:
        fingerprint = fingerprint_of_cert(der)
    except IdentityError as exc:
        raise SecureError(SecureErrorCode.HANDSHAKE_FAILED, str(exc)) from None
    if fingerprint == ANCHOR_FINGERPRINT:
        raise SecureError(SecureErrorCode.KEY_MISMATCH, "the other side presented the public anchor as its key")
    return fingerprint


def verify_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket, verify: Verifier) -> str:
    """:func:`peer_fingerprint`, checked by ``verify``; a refusal becomes :class:`SecureError`."""
    fingerprint = peer_fingerprint(ssl_object)
    try:
        verify(fingerprint)
    except KeyMismatch as exc:
        raise SecureError(SecureErrorCode.KEY_MISMATCH, str(exc), expected=exc.expected,
                          actual=exc.actual) from None
    return fingerprint


def expect_key(expected: str, what: str) -> Verifier:
    """A verifier that accepts exactly ``expected``."""

    def verify(actual: str) -> None:
        if actual != expected:
            raise KeyMismatch(f"{what} presented key {actual}, expected {expected}", expected=expected,
                              actual=actual)

    return verify


# ------------------------------------------------------------------------------------- sans-I/O engine


class TlsEngine:
    """TLS over memory buffers: feed received bytes, take bytes to send. No sockets, no clock."""

    def __init__(self, ctx: ssl.SSLContext, *, server_side: bool) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self.established = False
        self.peer_closed = False
        self.write_closed = False

    def feed(self, data: bytes) -> None:
        self._incoming.write(data)

    def handshake(self) -> bool:
        """Advance the handshake; True once it is complete. Raises ``ssl.SSLError`` if it fails."""
        if not self.established:
            try:
                self.ssl.do_handshake()
            except ssl.SSLWantReadError:
                return False
            self.established = True
        return True

    def read(self) -> bytes:
        """All application bytes decrypted so far (empty if none; ``peer_closed`` after close_notify)."""
        chunks = []
        while not self.peer_closed:
            try:
                chunk = self.ssl.read(64 * 1024)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            if not chunk:  # Python's SSLObject returns b"" at the other side's close_notify
                self.peer_closed = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def write(self, data: bytes) -> None:
        self.ssl.write(data)

    def close_write(self) -> None:
        """Half-close: queue our close_notify; reading goes on until the other side's.

        Python's ``unwrap`` calls SSL_shutdown twice; the second call reads, and OpenSSL fails on any
        complete application record it finds then. So the caller must have :meth:`read` everything fed
        so far (at most a partial record may remain, which is safe).
        """
        self.write_closed = True
        with contextlib.suppress(ssl.SSLWantReadError):
            self.ssl.unwrap()

    def outgoing(self) -> bytes:
        """Bytes to send now (handshake, records, alerts)."""
        return self._outgoing.read()

    def unwrap(self) -> bool:
        """Send close_notify and wait for the other side's; True once both passed. Bytes after the
        other side's close_notify stay in :meth:`leftover`."""
        try:
            self.ssl.unwrap()
        except ssl.SSLWantReadError:
            return False
        return True

    def leave(self, data: bytes = b"") -> bytes | None:
        """Leaving TLS, sans-I/O (close_notify both ways; relay joins, the control channel's switch to its
        record layer): feed ``data``; after the first call our close_notify waits in :meth:`outgoing`.
        None until the other side's close_notify has come, then the bytes that followed it (not TLS).
        Application records from the other side in between make OpenSSL fail (``ssl.SSLError``)."""
        self.feed(data)
        self.write_closed = True
        if not self.unwrap():
            return None
        return self.leftover()

    def leftover(self) -> bytes:
        """Received bytes TLS has not consumed (after :meth:`unwrap`: plain bytes that followed TLS)."""
        return self._incoming.read()


async def read_record(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """Exactly one TLS record from ``sock`` (header + body): never reads past it."""
    header = await _recv_exactly(loop, sock, RECORD_HEADER)
    (size,) = struct.unpack("!H", header[3:5])
    if size > MAX_RECORD:
        raise SecureError(SecureErrorCode.HANDSHAKE_FAILED, f"TLS record of {size} bytes")
    return header + await _recv_exactly(loop, sock, size)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise ConnectionResetError("the connection closed during TLS")
        data += chunk
    return data


async def engine_handshake(engine: TlsEngine, sock: socket.socket, verify: Verifier) -> str:
    """Run ``engine``'s handshake over a non-blocking ``sock`` record by record; the checked fingerprint."""
    loop = asyncio.get_running_loop()
    try:
        while not engine.handshake():
            await loop.sock_sendall(sock, engine.outgoing())
            engine.feed(await read_record(loop, sock))
        await loop.sock_sendall(sock, engine.outgoing())
    except ssl.SSLError as exc:
        raise SecureError(SecureErrorCode.HANDSHAKE_FAILED, f"TLS handshake failed: {exc}") from None
    return verify_peer(engine.ssl, verify)


async def engine_recv(engine: TlsEngine, sock: socket.socket) -> bytes:
    """The next application bytes, read record by record (``b""`` once the other side sent close_notify)."""
    loop = asyncio.get_running_loop()
    try:
        while not (data := engine.read()) and not engine.peer_closed:
            engine.feed(await read_record(loop, sock))
            await loop.sock_sendall(sock, engine.outgoing())
    except ssl.SSLError as exc:
        raise SecureError(SecureErrorCode.HANDSHAKE_FAILED, f"TLS failed: {exc}") from None
    return data


async def engine_send(engine: TlsEngine, sock: socket.socket, data: bytes) -> None:
    engine.write(data)
    await asyncio.get_running_loop().sock_sendall(sock, engine.outgoing())


async def engine_unwrap(engine: TlsEngine, sock: socket.socket) -> bytes:
    """Leave TLS (both close_notify) on ``sock``; returns plain bytes that were received after it."""
    loop = asyncio.get_running_loop()
    try:
        rest = engine.leave()
        while rest is None:
            await loop.sock_sendall(sock, engine.outgoing())
            rest = engine.leave(await read_record(loop, sock))
        await loop.sock_sendall(sock, engine.outgoing())
    except ssl.SSLError as exc:
        raise SecureError(SecureErrorCode.HANDSHAKE_FAILED, f"leaving TLS failed: {exc}") from None
    return rest


# ------------------------------------------------------------------------------------- peer to peer


@dataclass(frozen=True)
class Binding:
    """What one end of a peer-to-peer channel says about itself, inside TLS."""

    session_id: str
    role: str  # "initiator" (the TLS client) or "responder"
    peer_id: str
    purpose: str = ""  # what the connection is for (the peer API's preface), so it cannot be altered

    def encode(self) -> bytes:
        body = json.dumps({"session": self.session_id, "role": self.role, "id": self.peer_id,
                           "purpose": self.purpose}).encode()
        return BIND_MAGIC + struct.pack("!H", len(body)) + body

    @staticmethod
    def decode(body: bytes) -> Binding:
        try:
            data: Any = json.loads(body)
            binding = Binding(str(data["session"]), str(data["role"]), str(data["id"]), str(data.get("purpose", "")))
        except (ValueError, KeyError, TypeError):
            raise SecureError(SecureErrorCode.SESSION_MISMATCH, "the other side sent a malformed BIND") from None
        return binding

    @staticmethod
    def body_size(head: bytes) -> int:
        if len(head) != 6 or head[:4] != BIND_MAGIC:
            raise SecureError(SecureErrorCode.SESSION_MISMATCH, "the other side did not start with BIND")
        (size,) = struct.unpack("!H", head[4:])
        if size > MAX_BIND:
            raise SecureError(SecureErrorCode.SESSION_MISMATCH, f"BIND of {size} bytes")
        return int(size)


@dataclass(frozen=True)
class ChannelSpec:
    """Everything one side needs to secure a punched or relayed connection."""

    identity: Identity
    session_id: str
    role: str  # ours: "initiator" is the TLS client
    own_id: str
    peer_id: str
    verify: Verifier
    purpose: str = ""

    @property
    def server_side(self) -> bool:
        return self.role != "initiator"

    def own_binding(self) -> Binding:
        return Binding(self.session_id, self.role, self.own_id, self.purpose)

    def check_binding(self, theirs: Binding) -> None:
        expected = Binding(self.session_id, "responder" if self.role == "initiator" else "initiator", self.peer_id,
                           self.purpose)
        if theirs != expected:
            raise SecureError(
                SecureErrorCode.SESSION_MISMATCH,
                f"the connection belongs to session {theirs.session_id} ({theirs.role} {theirs.peer_id!r}, "
                f"{theirs.purpose!r}), expected session {expected.session_id} ({expected.role} {expected.peer_id!r}, "
                f"{expected.purpose!r})",
            )


@dataclass(frozen=True)
class SecureInfo:
    """What the handshake established (``--report`` JSON: ``peer_key``, ``cipher``)."""

    peer_key: str
    cipher: str
    version: str

    def to_json(self) -> dict[str, str]:
        return {"peer_key": self.peer_key, "cipher": self.cipher, "tls": self.version}


def _info(ssl_object: ssl.SSLObject | ssl.SSLSocket, fingerprint: str) -> SecureInfo:
    cipher = ssl_object.cipher()
    return SecureInfo(fingerprint, cipher[0] if cipher else "?", ssl_object.version() or "?")


async def secure_streams(
    sock: socket.socket, spec: ChannelSpec, *, timeout: float = HANDSHAKE_TIMEOUT, limit: int = 2**16
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, SecureInfo]:
    """TLS over a connected ``sock`` (taken over), the other side's key checked, BIND exchanged.

    Returns asyncio streams that carry only application bytes, with half-close: ``write_eof()`` sends
    close_notify (and a FIN), the other side's reader sees EOF and can still answer. On any failure the
    socket is closed and :class:`SecureError` raised; nothing was sent but the handshake and our BIND.

    The responder checks the initiator's BIND before it returns. The initiator returns as soon as its
    handshake is done and the key checked (one round trip, not two): it may write at once, since only the
    key it expects can read, and that side delivers nothing before it checked our BIND; the responder's
    BIND is checked before the first byte reaches our reader (a mismatch ends it with ConnectionResetError).
    """
    loop = asyncio.get_running_loop()
    engine = TlsEngine(context(spec.identity, server_side=spec.server_side), server_side=spec.server_side)
    sock.setblocking(False)
    # The handshake's last flight and our BIND are separate small writes: with Nagle the second waits
    # for the other side's delayed ACK (40 ms on Linux).
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    received = b""
    try:
        async with asyncio.timeout(timeout):
            fingerprint = await engine_handshake(engine, sock, spec.verify)
            await engine_send(engine, sock, spec.own_binding().encode())
            if spec.server_side:
                while (split := _split_binding(received)) is None:
                    data = await engine_recv(engine, sock)
                    if not data:
                        raise ConnectionResetError("closed")
                    received += data
                theirs, received = split
                spec.check_binding(theirs)
    except TimeoutError:
        sock.close()
        raise SecureError(SecureErrorCode.TIMEOUT, f"no secure channel within {timeout:g} s") from None
    except (ConnectionError, OSError):
        sock.close()
        raise SecureError(SecureErrorCode.SESSION_MISMATCH,
                          "the other side closed the connection before its BIND (did it refuse our key?)") from None
    except BaseException:
        sock.close()
        raise
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    app = asyncio.StreamReaderProtocol(reader, loop=loop)
    pending = None if spec.server_side else spec
    _, raw_side = await loop.connect_accepted_socket(lambda: _RawSide(engine, app, received, pending), sock)
    assert raw_side.tls is not None
    writer = asyncio.StreamWriter(raw_side.tls, app, reader, loop)
    return reader, writer, _info(engine.ssl, fingerprint)


def _split_binding(data: bytes) -> tuple[Binding, bytes] | None:
    """The BIND at the start of ``data`` and the bytes after it; None while incomplete."""
    if len(data) < 6 or len(data) < 6 + Binding.body_size(data[:6]):
        return None
    size = 6 + Binding.body_size(data[:6])
    return Binding.decode(data[6:size]), data[size:]


class _TlsTransport(asyncio.Transport):
    """The application's view of a TLS connection: writes are encrypted, ``write_eof`` half-closes."""

    def __init__(self, raw: asyncio.Transport, engine: TlsEngine) -> None:
        super().__init__()
        self._raw = raw
        self._engine = engine
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._engine.write_closed or self._raw.is_closing():
            raise ConnectionResetError("the TLS stream is closed for writing")
        self._engine.write(bytes(data))
        self._raw.write(self._engine.outgoing())

    def write_eof(self) -> None:
        if self._engine.write_closed or self._raw.is_closing():
            return
        self._engine.close_write()
        self._raw.write(self._engine.outgoing())
        with contextlib.suppress(OSError):  # the other side may have reset the connection already
            self._raw.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        """close_notify and FIN, then wait (at most :data:`CLOSE_LINGER` s) for the other side's end before
        closing the socket: closing with bytes still arriving would send a RST, and a RST can destroy
        what we wrote last before the other side read it."""
        if self.closing or self._raw.is_closing():
            return
        self.closing = True
        self.write_eof()
        if self._engine.peer_closed:
            self._raw.close()
        else:
            asyncio.get_running_loop().call_later(CLOSE_LINGER, self._raw.close)

    def linger_done(self) -> None:
        """The other side ended its stream: a lingering close can finish now."""
        if self.closing and not self._raw.is_closing():
            self._raw.close()

    def abort(self) -> None:
        self._raw.abort()

    def is_closing(self) -> bool:
        return self.closing or self._raw.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._engine.ssl
        if name == "peercert":
            return self._engine.ssl.getpeercert(binary_form=True)
        return self._raw.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise NotImplementedError("a TLS stream keeps its protocol")

    def get_protocol(self) -> asyncio.BaseProtocol:
        raise NotImplementedError


class _RawSide(asyncio.Protocol):
    """The TCP connection under :class:`_TlsTransport`: decrypts into the application's protocol."""

    def __init__(self, engine: TlsEngine, app: asyncio.Protocol, first: bytes, pending: ChannelSpec | None) -> None:
        self._engine = engine
        self._app = app
        self._first = first
        # The initiator checks the responder's BIND here, before any byte reaches the application.
        self._pending = pending
        self._head = b""
        self._eof_delivered = False
        self.tls: _TlsTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.tls = _TlsTransport(transport, self._engine)
        self._app.connection_made(self.tls)
        if self._first:  # application bytes that came with the other side's BIND
            self._app.data_received(self._first)
        self._deliver()  # and records already decrypted or buffered

    def data_received(self, data: bytes) -> None:
        self._engine.feed(data)
        self._deliver()

    def _deliver(self) -> None:
        try:
            plain = self._engine.read()
        except ssl.SSLError as exc:
            assert self.tls is not None
            self.tls.abort()
            self._app.connection_lost(ConnectionResetError(f"TLS failed: {exc}"))
            return
        if self._pending is not None and plain:
            plain = self._check_binding(plain)
        if plain:
            self._app.data_received(plain)
        if self._pending is not None and self._engine.peer_closed:
            self._refuse("the other side closed the connection before its BIND (did it refuse our key?)")
            return
        if self._engine.peer_closed and not self._eof_delivered:
            self._eof_delivered = True
            self._app.eof_received()
            assert self.tls is not None
            self.tls.linger_done()

    def _check_binding(self, plain: bytes) -> bytes:
        """Collect the responder's BIND; the application bytes after it once it checked out."""
        assert self._pending is not None
        self._head += plain
        try:
            split = _split_binding(self._head)
            if split is None:
                return b""
            self._pending.check_binding(split[0])
        except SecureError as exc:
            self._refuse(str(exc))
            return b""
        self._pending, self._head = None, b""
        return split[1]

    def _refuse(self, why: str) -> None:
        self._pending = None
        assert self.tls is not None
        self.tls.abort()
        self._app.connection_lost(ConnectionResetError(f"no secure channel: {why}"))
        self._app = asyncio.Protocol()  # the application heard the end; nothing more reaches it

    def eof_received(self) -> bool:
        if self._pending is not None:
            self._refuse("the other side closed the connection before its BIND (did it refuse our key?)")
            return False
        if not self._engine.peer_closed:  # a FIN without close_notify: the stream was cut, not ended
            assert self.tls is not None
            self.tls.abort()
            return False
        return True  # keep our direction open: the other side half-closed

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pending is not None:
            exc = ConnectionResetError("no secure channel: the other side ended the connection before its BIND "
                                       f"(did it refuse our key?): {exc!r}")
        elif exc is None and not self._engine.peer_closed:
            exc = ConnectionResetError("the TLS stream was cut before the other side's close_notify")
        self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        self._app.pause_writing()

    def resume_writing(self) -> None:
        self._app.resume_writing()
