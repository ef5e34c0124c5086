"""The control channel's record layer after TLS: X25519 key agreement inside TLS, then AES-256-GCM records.

Why: a TLS connection costs the coordinator ~23 KiB of OpenSSL state for its whole life (docs/benchmarks.md),
and a registered peer keeps its control connection for hours. So TLS 1.3 only authenticates (certificates,
pins, ids owned by keys: :mod:`tcppunch.session.secure`); inside it each side sends a fresh X25519 public
key (REGISTER / REGISTERED, docs/protocol.md), both leave TLS (close_notify both ways) and the rest of the
connection is records of this module, which cost two AESGCM objects and a few integers.

Keys: HKDF-SHA256 over the X25519 shared secret, the salt a hash of a version label, both public keys and
both sides' identity fingerprints, one ``info`` label per direction. The public keys travelled inside the
mutually authenticated TLS, so nobody else chose them; the ephemerals give forward secrecy; the private
key is dropped as soon as the keys are derived.

Records (sans-I/O: bytes in, payloads out)::

    record = length:uint16be ciphertext[length]      17 <= length <= MAX_RECORD + 16
    ciphertext = AES-256-GCM(key of the direction, nonce = 0x00000000 || counter:uint64be,
                             plaintext (1..MAX_RECORD bytes), aad = the 2-byte header)

The counter starts at 0 in each direction and goes up by one per record; the receiver expects exactly
the next one, so a replayed, reordered, dropped or altered record fails authentication. A direction ends
its connection after :data:`RECORD_LIMIT` records (the AES-GCM usage bound TLS 1.3 uses too); there is
no rekeying. No close record: the end of the TCP stream is the end (the network can cut it anyway); an
end in the middle of a record is :attr:`RecordErrorCode.TRUNCATED`.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION_LABEL = b"tcppunch control records v1"
PUBLIC_KEY_SIZE = 32
KEY_SIZE = 32  # AES-256
TAG_SIZE = 16
HEADER = struct.Struct("!H")
MAX_RECORD = 16 * 1024  # plaintext bytes per record; a larger payload is split into several records
# Records per direction and key. RFC 8446 5.5 bounds AES-GCM at 2^24.5 full-size records per key for a
# 2^-57 safety margin; without rekeying the connection ends there (a peer then registers again).
RECORD_LIMIT = 2**24
_NONCE_PREFIX = b"\x00\x00\x00\x00"


class RecordErrorCode(StrEnum):
    """Why the record layer ended a connection."""

    BAD_LENGTH = "record-bad-length"  # a header announcing an empty or oversize record
    AUTH_FAILED = "record-auth-failed"  # altered, replayed, reordered or foreign record
    TRUNCATED = "record-truncated"  # the stream ended inside a record
    EXHAUSTED = "record-counter-exhausted"  # RECORD_LIMIT records in one direction
    BAD_KEY = "record-bad-key"  # a public key of the wrong size or a low-order point


class RecordError(Exception):
    """The record stream cannot go on: ``code`` says why."""

    def __init__(self, code: RecordErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


# ------------------------------------------------------------------------------------- key agreement


@dataclass(frozen=True)
class ChannelKeys:
    """The two directional AES-256 keys of one connection, from one side's point of view."""

    send: bytes
    receive: bytes


class KeyShare:
    """One side's ephemeral X25519 key: :attr:`public` goes to the other side inside TLS, :meth:`derive`
    turns its answer into :class:`ChannelKeys` and drops the private key (a share is used once)."""

    __slots__ = ("_private", "public")

    def __init__(self) -> None:
        self._private: X25519PrivateKey | None = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(serialization.Encoding.Raw,
                                                              serialization.PublicFormat.Raw)

    def derive(self, peer_public: bytes, *, is_client: bool, client_key: str, server_key: str) -> ChannelKeys:
        """Both directions' keys. ``client_key``/``server_key``: the identity fingerprints TLS authenticated
        (the same two strings on both sides)."""
        private, self._private = self._private, None
        if private is None:
            raise RuntimeError("this key share was used already")
        if len(peer_public) != PUBLIC_KEY_SIZE:
            raise RecordError(RecordErrorCode.BAD_KEY, f"an X25519 public key has {PUBLIC_KEY_SIZE} bytes, "
                                                       f"not {len(peer_public)}")
        try:
            shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:  # cryptography refuses an all-zero result (a low-order point)
            raise RecordError(RecordErrorCode.BAD_KEY, "the other side's X25519 key is a low-order point") from None
        del private
        client_public, server_public = (self.public, peer_public) if is_client else (peer_public, self.public)
        keys = derive_keys(shared, client_public=client_public, server_public=server_public,
                           client_key=client_key, server_key=server_key)
        c2s, s2c = keys
        return ChannelKeys(send=c2s, receive=s2c) if is_client else ChannelKeys(send=s2c, receive=c2s)


def derive_keys(shared: bytes, *, client_public: bytes, server_public: bytes, client_key: str,
                server_key: str) -> tuple[bytes, bytes]:
    """(client->server key, server->client key) from an X25519 shared secret and everything it is bound to."""
    transcript = hashlib.sha256()
    for part in (VERSION_LABEL, client_public, server_public, client_key.encode(), server_key.encode()):
        transcript.update(HEADER.pack(len(part)) + part)  # length-prefixed: no two inputs read alike
    salt = transcript.digest()
    return (_expand(shared, salt, b"client to server"), _expand(shared, salt, b"server to client"))


def _expand(shared: bytes, salt: bytes, direction: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt,
                info=VERSION_LABEL + b" " + direction).derive(shared)


# ------------------------------------------------------------------------------------- records


def _nonce(counter: int) -> bytes:
    return _NONCE_PREFIX + counter.to_bytes(8, "big")


class RecordChannel:
    """One connection's record layer: :meth:`seal` payloads to send, :meth:`open` received bytes.

    Keeps the two keys, not two ``AESGCM`` objects: with cryptography 50 an ``AESGCM`` holds ~2.4 KB of
    OpenSSL context from its construction (measured), a third of the budget per idle peer, while making
    one per call costs ~1 µs. ``limit``: records per direction before the connection must end (tests
    lower it)."""

    __slots__ = ("_limit", "_need", "_pending", "_pending_size", "_receive_key", "_received", "_send_key",
                 "_sent")

    def __init__(self, keys: ChannelKeys, *, limit: int = RECORD_LIMIT) -> None:
        if keys.send == keys.receive:
            raise ValueError("both directions would share one key")
        if len(keys.send) != KEY_SIZE or len(keys.receive) != KEY_SIZE:
            raise ValueError(f"record keys have {KEY_SIZE} bytes")
        self._send_key = keys.send
        self._receive_key = keys.receive
        self._sent = 0
        self._received = 0
        self._limit = limit
        # An incomplete record, as the pieces it arrived in: joined only once ``_need`` bytes are there, so a
        # sender trickling bytes costs one copy per record, not one copy of the whole buffer per read.
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._need = HEADER.size  # bytes the next record needs before it can be looked at

    def seal(self, payload: bytes) -> bytes:
        """``payload`` as records (none for an empty payload); raises EXHAUSTED at the limit."""
        if not payload:
            return b""
        out = []
        aead = AESGCM(self._send_key)
        for start in range(0, len(payload), MAX_RECORD):
            if self._sent >= self._limit:
                raise RecordError(RecordErrorCode.EXHAUSTED, f"{self._limit} records sent with one key")
            piece = payload[start:start + MAX_RECORD]
            header = HEADER.pack(len(piece) + TAG_SIZE)
            out.append(header + aead.encrypt(_nonce(self._sent), piece, header))
            self._sent += 1
        return b"".join(out)

    def open(self, data: bytes) -> bytes:
        """The payload bytes of every complete record in what was buffered plus ``data``; an incomplete
        record waits. Raises :class:`RecordError` on any record that does not authenticate or whose
        header is out of bounds (checked from the header alone, before its body is buffered)."""
        if not data:
            return b""
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size < self._need:
            return b""
        buffer = b"".join(self._pending) if len(self._pending) > 1 else data
        plain = []
        offset = 0
        aead: AESGCM | None = None
        while len(buffer) - offset >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer, offset)
            if not TAG_SIZE < length <= MAX_RECORD + TAG_SIZE:
                raise RecordError(RecordErrorCode.BAD_LENGTH, f"a record of {length} bytes "
                                                              f"(allowed {TAG_SIZE + 1}..{MAX_RECORD + TAG_SIZE})")
            end = offset + HEADER.size + length
            if len(buffer) < end:
                break
            if self._received >= self._limit:
                raise RecordError(RecordErrorCode.EXHAUSTED, f"{self._limit} records received with one key")
            header = buffer[offset:offset + HEADER.size]
            aead = aead or AESGCM(self._receive_key)
            try:
                plain.append(aead.decrypt(_nonce(self._received), buffer[offset + HEADER.size:end], header))
            except InvalidTag:
                raise RecordError(RecordErrorCode.AUTH_FAILED,
                                  f"record {self._received} does not authenticate (altered, replayed or "
                                  "out of order)") from None
            self._received += 1
            offset = end
        rest = buffer[offset:]
        self._pending = [rest] if rest else []
        self._pending_size = len(rest)
        self._need = HEADER.size if len(rest) < HEADER.size else HEADER.size + HEADER.unpack_from(rest)[0]
        return b"".join(plain)

    def end(self) -> None:
        """The stream ended: raises TRUNCATED if it ended inside a record."""
        if self._pending_size:
            raise RecordError(RecordErrorCode.TRUNCATED, f"the stream ended inside a record "
                                                         f"({self._pending_size} bytes of it)")
