"""What the peer API hands out and raises: connections, what is known about them, why one failed."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tcppunch.punch.plan import CandidateKind, PunchAttempt
from tcppunch.wire.coord import ErrorCode, Role
from tcppunch.wire.endpoint import Endpoint


class RelayMode(StrEnum):
    """When to use the coordinator's relay."""

    AUTO = "auto"  # punch; relay if punching fails or cannot work
    NEVER = "never"  # punch only; fail if it fails
    ALWAYS = "always"  # skip punching


class Method(StrEnum):
    """How a connection reached the peer."""

    DIRECT = "direct"
    RELAY = "relay"


class FailureCode(StrEnum):
    """Why a connection could not be made, when the coordinator did not say it (then ``ErrorCode``)."""

    FAILED = "failed"
    PUNCH_FAILED = "punch-failed"  # punching failed and the relay was not allowed
    DIRECT_IMPOSSIBLE = "direct-impossible"  # the NATs rule direct out and the relay was not allowed
    RELAY_FAILED = "relay-failed"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"  # the coordinator does not answer
    CANCELLED = "cancelled"  # the other peer gave up, left or refused
    PEER_KEY_MISMATCH = "peer-key-mismatch"  # the other end does not hold the key we expect for its id
    INSECURE = "insecure"  # the secure channel failed (TLS, session binding, timeout)


class ConnectFailed(Exception):
    """No connection to the peer: why, what each punch candidate got, and what to try.

    ``code`` tells the cases apart without parsing the message: a :class:`FailureCode`, or the
    coordinator's :class:`~tcppunch.wire.coord.ErrorCode` when it refused (``unknown-peer``, ``busy``,
    ``self-connect``, ... see docs/protocol.md). Both are ``StrEnum``: they compare equal to their text.
    """

    def __init__(self, message: str, *, peer: str, code: FailureCode | ErrorCode | str = FailureCode.FAILED,
                 attempts: tuple[PunchAttempt, ...] = (), timings: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.peer = peer
        self.code = code
        self.attempts = attempts
        self.timings = timings or {}


@dataclass
class ConnectionInfo:
    """What is known about one established connection (also the ``--report`` JSON)."""

    peer: str
    method: Method
    local: Endpoint
    remote: Endpoint
    session_id: str
    role: Role
    attempts: tuple[PunchAttempt, ...] = ()
    # Seconds: schedule (request -> PUNCH), wait (PUNCH -> fire), punch (fire -> verified and selected),
    # relay (joining the relay), total (connect() call or PUNCH receipt -> usable connection).
    timings: dict[str, float] = field(default_factory=dict)
    relay_reason: str | None = None
    # Which kind of candidate the direct connection won through (port mapping, ipv6, observed, predicted,
    # ...); None for a relay, or an incoming IPv4 connection from an endpoint we had not targeted.
    candidate: CandidateKind | None = None
    # The other peer's key (its fingerprint, checked in the TLS handshake) and the cipher; None unencrypted.
    peer_key: str | None = None
    cipher: str | None = None
    # The key the coordinator says owns ``peer`` (checked only with trust_coordinator; not reported).
    claimed_key: str | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method.value,
            "candidate": None if self.candidate is None else self.candidate.value,
            "peer": self.peer,
            "local": str(self.local),
            "remote": str(self.remote),
            "session": self.session_id,
            "role": self.role.value,
            "attempts": [str(a) for a in self.attempts],
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
            "relay_reason": self.relay_reason,
            "peer_key": self.peer_key,
            "cipher": self.cipher,
        }


@dataclass
class Connection:
    """An established connection to a peer: asyncio streams plus what :class:`ConnectionInfo` says."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    info: ConnectionInfo

    @property
    def peer(self) -> str:
        return self.info.peer

    @property
    def method(self) -> Method:
        return self.info.method

    @property
    def local(self) -> Endpoint:
        return self.info.local

    @property
    def remote(self) -> Endpoint:
        return self.info.remote

    def close(self) -> None:
        self.writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


