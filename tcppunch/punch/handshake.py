"""The verification handshake run on every candidate connection, and winner selection (sans-I/O).

Why: a TCP connection that opens during a punch may lead anywhere — a stale mapping, another host
behind the predicted port, a port scanner. Only a connection on which the peer proves knowledge of the
session key is used. Both ends send, at once (no round trip is added)::

    HELLO  = "TPH1" | role (b"I" / b"R") | tag (16) | nonce (16) | HMAC-SHA256(key, hello-input)  (69 bytes)
    hello-input = b"tcppunch-hello" | len(session_id) (2, big-endian) | session_id (UTF-8) | role | nonce
    tag   = SHA-256(session_id)[:16]    (tells "other session" apart from "wrong key" in errors)

Each side checks the peer's HELLO: magic, the *opposite* role (roles come from the session; after a
simultaneous open both ends are "clients", so ``connect()`` says nothing), same session tag, valid MAC
(``hmac.compare_digest``). Then the INITIATOR picks the first verified connection and sends on it::

    SELECT = "TPS1" | HMAC-SHA256(key, b"tcppunch-select" | len | session_id | nonce_I | nonce_R)  (36 bytes)

The responder takes the connection on which a valid SELECT arrives as the winner. The nonces bind the
SELECT to this one connection. Messages have fixed sizes; :attr:`Handshake.bytes_needed` tells the driver
how much to read so that it never reads application data; anything that does arrive after the last
handshake message is kept in :attr:`Handshake.leftover`.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import StrEnum

from tcppunch.punch.plan import Role

MAGIC_HELLO = b"TPH1"
MAGIC_SELECT = b"TPS1"
TAG_SIZE = 16
NONCE_SIZE = 16
MAC_SIZE = 32
HELLO_SIZE = len(MAGIC_HELLO) + 1 + TAG_SIZE + NONCE_SIZE + MAC_SIZE
SELECT_SIZE = len(MAGIC_SELECT) + MAC_SIZE

_ROLE_BYTE = {Role.INITIATOR: b"I", Role.RESPONDER: b"R"}
_BYTE_ROLE = {v: k for k, v in _ROLE_BYTE.items()}


class HandshakeState(StrEnum):
    AWAIT_HELLO = "await-hello"
    VERIFIED = "verified"  # initiator: may select; responder: waiting for SELECT
    SELECTED = "selected"
    REJECTED = "rejected"


@dataclass(frozen=True)
class PeerVerified:
    """The peer's HELLO is valid: it knows the session key and has the opposite role."""


@dataclass(frozen=True)
class SelectReceived:
    """(Responder) the initiator chose this connection."""


@dataclass(frozen=True)
class Rejected:
    """This connection is not our peer's (or it broke the protocol); close it."""

    reason: str


HandshakeEvent = PeerVerified | SelectReceived | Rejected


def session_tag(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()[:TAG_SIZE]


def _sid_field(session_id: str) -> bytes:
    raw = session_id.encode()
    return len(raw).to_bytes(2, "big") + raw


def hello_mac(key: bytes, session_id: str, role: Role, nonce: bytes) -> bytes:
    data = b"tcppunch-hello" + _sid_field(session_id) + _ROLE_BYTE[role] + nonce
    return hmac.new(key, data, hashlib.sha256).digest()


def select_mac(key: bytes, session_id: str, initiator_nonce: bytes, responder_nonce: bytes) -> bytes:
    data = b"tcppunch-select" + _sid_field(session_id) + initiator_nonce + responder_nonce
    return hmac.new(key, data, hashlib.sha256).digest()


class Handshake:
    """One side of the handshake on one connection. Feed it bytes; it returns events.

    ``nonce`` must be fresh random bytes per connection (the caller draws it: no randomness inside).
    """

    def __init__(self, *, role: Role, session_id: str, key: bytes, nonce: bytes) -> None:
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        self.role = role
        self.session_id = session_id
        self._key = key
        self._nonce = nonce
        self._tag = session_tag(session_id)
        self._peer_nonce = b""
        self._buf = bytearray()
        self.state = HandshakeState.AWAIT_HELLO
        self.leftover = b""
        self.reject_reason = ""

    def hello(self) -> bytes:
        """Our HELLO, to send as soon as the connection opens."""
        mac = hello_mac(self._key, self.session_id, self.role, self._nonce)
        return MAGIC_HELLO + _ROLE_BYTE[self.role] + self._tag + self._nonce + mac

    @property
    def bytes_needed(self) -> int:
        """How many bytes the next handshake message still lacks (0: none expected from the peer)."""
        if self.state is HandshakeState.AWAIT_HELLO:
            return HELLO_SIZE - len(self._buf)
        if self.state is HandshakeState.VERIFIED and self.role is Role.RESPONDER:
            return SELECT_SIZE - len(self._buf)
        return 0

    def select(self) -> bytes:
        """(Initiator) choose this verified connection: the SELECT bytes to send on it."""
        if self.role is not Role.INITIATOR:
            raise RuntimeError("only the initiator selects")
        if self.state is not HandshakeState.VERIFIED:
            raise RuntimeError(f"cannot select in state {self.state.value}")
        self.state = HandshakeState.SELECTED
        return MAGIC_SELECT + select_mac(self._key, self.session_id, self._nonce, self._peer_nonce)

    def receive_data(self, data: bytes) -> list[HandshakeEvent]:
        """Consume bytes from the peer; return what they meant (possibly nothing yet)."""
        events: list[HandshakeEvent] = []
        if self.state is HandshakeState.REJECTED:
            return events
        if not self._expecting():
            self.leftover += bytes(data)
            return events
        self._buf += data
        while self._buf and self._expecting():
            event = self._step()
            if event is None:
                break
            events.append(event)
            if isinstance(event, Rejected):
                self._buf.clear()
                return events
        if not self._expecting() and self._buf:
            self.leftover += bytes(self._buf)
            self._buf.clear()
        return events

    def _expecting(self) -> bool:
        """Whether a handshake message from the peer is still due."""
        return self.state is HandshakeState.AWAIT_HELLO or (
            self.state is HandshakeState.VERIFIED and self.role is Role.RESPONDER
        )

    def _reject(self, reason: str) -> Rejected:
        self.state = HandshakeState.REJECTED
        self.reject_reason = reason
        return Rejected(reason)

    def _step(self) -> HandshakeEvent | None:
        if self.state is HandshakeState.AWAIT_HELLO:
            return self._parse_hello()
        if self.state is HandshakeState.VERIFIED and self.role is Role.RESPONDER:
            return self._parse_select()
        return None

    def _parse_hello(self) -> HandshakeEvent | None:
        head = bytes(self._buf[: len(MAGIC_HELLO)])
        if not MAGIC_HELLO.startswith(head):
            return self._reject("not a tcppunch peer (bad HELLO magic)")
        if len(self._buf) < HELLO_SIZE:
            return None
        msg = bytes(self._buf[:HELLO_SIZE])
        del self._buf[:HELLO_SIZE]
        pos = len(MAGIC_HELLO)
        peer_role = _BYTE_ROLE.get(msg[pos : pos + 1])
        pos += 1
        tag = msg[pos : pos + TAG_SIZE]
        pos += TAG_SIZE
        nonce = msg[pos : pos + NONCE_SIZE]
        pos += NONCE_SIZE
        mac = msg[pos:]
        if peer_role is None:
            return self._reject("unknown role in HELLO")
        if peer_role is self.role:
            return self._reject(f"peer claims our own role ({self.role.value}); roles come from the session")
        if not hmac.compare_digest(tag, self._tag):
            return self._reject("HELLO is for a different session")
        if not hmac.compare_digest(mac, hello_mac(self._key, self.session_id, peer_role, nonce)):
            return self._reject("bad HELLO MAC: the peer does not know the session key")
        if hmac.compare_digest(nonce, self._nonce):
            return self._reject("HELLO echoes our own nonce (reflected)")
        self._peer_nonce = nonce
        self.state = HandshakeState.VERIFIED
        return PeerVerified()

    def _parse_select(self) -> HandshakeEvent | None:
        head = bytes(self._buf[: len(MAGIC_SELECT)])
        if not MAGIC_SELECT.startswith(head):
            return self._reject("bad SELECT magic")
        if len(self._buf) < SELECT_SIZE:
            return None
        msg = bytes(self._buf[:SELECT_SIZE])
        del self._buf[:SELECT_SIZE]
        expected = select_mac(self._key, self.session_id, self._peer_nonce, self._nonce)
        if not hmac.compare_digest(msg[len(MAGIC_SELECT) :], expected):
            return self._reject("bad SELECT MAC")
        self.state = HandshakeState.SELECTED
        return SelectReceived()
