"""Exposed ports (``tcppunch expose``): what the server allows, who owns which port, which visitors wait.

Sans-I/O bookkeeping for :class:`~tcppunch.coordinator.protocol.CoordinatorProtocol`, which turns its
answers into actions. A peer asks (EXPOSE) for a port of the server's public address; the table decides
(allowed range, one owner per port, per-id limits), the driver binds the port (:class:`OpenPort`) and says
whether that worked. Each visitor accepted on an exposed port waits here, under a join deadline, until the
owner joins it with a relay connection; from then on it counts as carried until the pump finishes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

from tcppunch.wire.coord import ErrorCode

from .registry import ConnId

_RANGE = re.compile(r"^\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?$")


@dataclass(frozen=True)
class PortRange:
    """The ports peers may expose (``--expose-ports LOW-HIGH``, or a single port), both ends included."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high <= 65535:
            raise ValueError(f"port range {self.low}-{self.high}: need 1 <= LOW <= HIGH <= 65535")

    @classmethod
    def parse(cls, text: str) -> PortRange:
        match = _RANGE.match(text)
        if match is None:
            raise ValueError(f"{text!r} is not a port range like 8000-9000")
        low = int(match.group(1))
        return cls(low, int(match.group(2) or low))

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class ExposeConfig:
    """What ``tcppunch server --expose-ports`` allows. Limits are per peer id (docs/expose.md)."""

    ports: PortRange
    # Ports one id may hold at once.
    max_ports_per_id: int = 4
    # Visitor connections of one id at once, waiting for the join or carried.
    max_connections_per_id: int = 64
    # Bytes (both directions, every port) one id may carry over the server's life; None: no limit.
    max_bytes_per_id: int | None = None
    # The exposing peer must join a visitor within this; the visitor is closed otherwise.
    join_timeout: float = 10.0
    # A carried connection ends after this long without a byte.
    idle_timeout: float = 300.0


@dataclass(frozen=True)
class OpenPort:
    """Driver: listen on ``address``:``port`` (the server address the owner's control connection reached),
    then call ``port_opened`` or ``port_failed``."""

    port: int
    address: str


@dataclass(frozen=True)
class ClosePort:
    """Driver: stop listening on ``port`` (connections already carried go on)."""

    port: int


class Refusal(NamedTuple):
    """Why an EXPOSE request or a visitor is turned away."""

    code: ErrorCode
    message: str


@dataclass
class ExposedPort:
    port: int
    peer_id: str
    request_id: str
    listening: bool = False


@dataclass
class PendingVisitor:
    """A visitor accepted on ``port``, waiting for the owner's join connection."""

    visitor_id: str
    key: bytes
    port: int
    peer_id: str
    conn: ConnId
    deadline: float


@dataclass
class ExposeTable:
    """Every exposed port and visitor of one coordinator. ``config`` None: exposing is disabled.

    Indexed by owner as well, so that no event scans every port or visitor of the server.
    """

    config: ExposeConfig | None
    ports: dict[int, ExposedPort] = field(default_factory=dict)
    pending: dict[str, PendingVisitor] = field(default_factory=dict)
    # visitor id -> owner id, for joined visitors whose bytes are being carried
    carried: dict[str, str] = field(default_factory=dict)
    _ports_of: dict[str, set[int]] = field(default_factory=dict)
    _waiting_of: dict[str, set[str]] = field(default_factory=dict)
    _connections: dict[str, int] = field(default_factory=dict)  # waiting + carried, per owner

    # ------------------------------------------------------------------------------------ ports

    def refuse(self, peer_id: str, port: int) -> Refusal | None:
        """Whether ``peer_id`` may not have ``port``, and why (the message a user reads)."""
        cfg = self.config
        if cfg is None:
            return Refusal(ErrorCode.EXPOSE_DISABLED,
                           "this server does not expose ports (start it with --expose-ports LOW-HIGH)")
        if port not in cfg.ports:
            return Refusal(ErrorCode.EXPOSE_PORT_REFUSED, f"port {port} is not in --expose-ports {cfg.ports}")
        held = self.ports.get(port)
        if held is not None:
            who = "you" if held.peer_id == peer_id else "another peer"
            return Refusal(ErrorCode.EXPOSE_PORT_TAKEN, f"port {port} is already exposed by {who}")
        if len(self._ports_of.get(peer_id, ())) >= cfg.max_ports_per_id:
            return Refusal(ErrorCode.EXPOSE_LIMIT,
                           f"{peer_id!r} already exposes {cfg.max_ports_per_id} ports (the limit per id)")
        return None

    def reserve(self, peer_id: str, port: int, request_id: str) -> None:
        """Hold ``port`` for ``peer_id`` while the driver binds it (after :meth:`refuse` said yes)."""
        if self.refuse(peer_id, port) is not None:
            raise ValueError(f"port {port} cannot be reserved for {peer_id!r}")
        self.ports[port] = ExposedPort(port, peer_id, request_id)
        self._ports_of.setdefault(peer_id, set()).add(port)

    def opened(self, port: int) -> ExposedPort | None:
        """The driver listens on ``port`` now; None if nobody holds it any more (its peer left)."""
        held = self.ports.get(port)
        if held is not None:
            held.listening = True
        return held

    def failed(self, port: int) -> ExposedPort | None:
        """The driver could not bind ``port``: forget it."""
        held = self.ports.get(port)
        if held is None or held.listening:
            return None
        self._drop_port(held)
        return held

    def ports_of(self, peer_id: str) -> list[int]:
        return sorted(self._ports_of.get(peer_id, ()))

    def _drop_port(self, held: ExposedPort) -> None:
        del self.ports[held.port]
        owned = self._ports_of.get(held.peer_id)
        if owned is not None:
            owned.discard(held.port)
            if not owned:
                del self._ports_of[held.peer_id]

    # --------------------------------------------------------------------------------- visitors

    def connections_of(self, peer_id: str) -> int:
        """Visitors of ``peer_id`` waiting for a join or being carried."""
        return self._connections.get(peer_id, 0)

    def admit(self, port: int, conn: ConnId, visitor_id: str, key: bytes, now: float) -> PendingVisitor | Refusal:
        """A visitor connected to ``port``: wait for its owner, or be turned away."""
        held = self.ports.get(port)
        if self.config is None or held is None or not held.listening:
            return Refusal(ErrorCode.UNKNOWN_SESSION, f"port {port} is not exposed")
        limit = self.config.max_connections_per_id
        if self.connections_of(held.peer_id) >= limit:
            return Refusal(ErrorCode.EXPOSE_LIMIT, f"{held.peer_id!r} has {limit} visitor connections")
        visitor = PendingVisitor(visitor_id, key, port, held.peer_id, conn, now + self.config.join_timeout)
        self.pending[visitor_id] = visitor
        self._waiting_of.setdefault(held.peer_id, set()).add(visitor_id)
        self._count(held.peer_id, +1)
        return visitor

    def join(self, visitor_id: str) -> PendingVisitor | None:
        """The owner joined: the visitor is carried from now on (until :meth:`carried_ended`)."""
        visitor = self._unwait(visitor_id)
        if visitor is not None:
            self.carried[visitor_id] = visitor.peer_id
            self._count(visitor.peer_id, +1)
        return visitor

    def visitor_lost(self, visitor_id: str) -> None:
        """A waiting visitor's connection ended (or was closed) before the join."""
        self._unwait(visitor_id)

    def carried_ended(self, visitor_id: str) -> bool:
        """The pump finished a carried visitor; True if it was one of ours."""
        owner = self.carried.pop(visitor_id, None)
        if owner is None:
            return False
        self._count(owner, -1)
        return True

    def expire(self, visitor_id: str, now: float) -> PendingVisitor | None:
        """The visitor, removed, if its owner did not join it by its deadline."""
        visitor = self.pending.get(visitor_id)
        if visitor is None or now < visitor.deadline:
            return None
        return self._unwait(visitor_id)

    def _unwait(self, visitor_id: str) -> PendingVisitor | None:
        visitor = self.pending.pop(visitor_id, None)
        if visitor is not None:
            waiting = self._waiting_of.get(visitor.peer_id)
            if waiting is not None:
                waiting.discard(visitor_id)
                if not waiting:
                    del self._waiting_of[visitor.peer_id]
            self._count(visitor.peer_id, -1)
        return visitor

    def _count(self, peer_id: str, change: int) -> None:
        left = self._connections.get(peer_id, 0) + change
        if left > 0:
            self._connections[peer_id] = left
        else:
            self._connections.pop(peer_id, None)

    # ------------------------------------------------------------------------------------ peers

    def release(self, peer_id: str) -> tuple[list[int], list[PendingVisitor]]:
        """``peer_id`` left: its ports (to close) and its waiting visitors (to close). Carried visitors go on."""
        ports = self.ports_of(peer_id)
        for port in ports:
            self._drop_port(self.ports[port])
        visitors = [v for v in map(self._unwait, sorted(self._waiting_of.get(peer_id, ()))) if v is not None]
        return ports, visitors
