"""Registered peers: who is online on which control connection, what they reported, how far away they are.

Sans-I/O: every method that depends on time takes ``now`` (seconds on any monotonic clock).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import NatReport

ConnId = int


@dataclass(slots=True)
class RttEstimator:
    """Smoothed round-trip time from keepalive pings (RFC 6298 section 2: alpha = 1/8).

    Kept continuously, so a connect request never waits for a fresh measurement.
    """

    srtt: float | None = None
    rttvar: float | None = None
    min_rtt: float | None = None
    samples: int = 0

    def add(self, sample: float) -> None:
        sample = max(sample, 0.0)
        if self.srtt is None or self.rttvar is None:
            self.srtt, self.rttvar = sample, sample / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
            self.srtt = 0.875 * self.srtt + 0.125 * sample
        self.min_rtt = sample if self.min_rtt is None else min(self.min_rtt, sample)
        self.samples += 1


@dataclass(slots=True)
class PeerRecord:
    """One registered peer and the bookkeeping of its control connection."""

    id: str
    conn: ConnId
    observed: Endpoint
    nat: NatReport | None
    private: tuple[Endpoint, ...]
    swarm: str | None
    registered_at: float
    last_heard: float
    next_ping_at: float
    # IPv6 endpoints: what REGISTER claimed, plus the control connection's own source if it came over IPv6.
    ipv6: tuple[Endpoint, ...] = ()
    # Multiplier of the configured keepalive times for this peer (> 1 when many peers are registered).
    keepalive_scale: float = 1.0
    rtt: RttEstimator = field(default_factory=RttEstimator)
    # seq -> send time of pings not yet answered (bounded: old ones are dropped).
    pings_in_flight: dict[int, float] = field(default_factory=dict)
    next_seq: int = 0
    sessions: set[str] = field(default_factory=set)
    # The relay budget account of the secret this peer registered with ("token:shared", "token:id:<id>").
    account: str = "token:shared"
    birthday: bool = True  # takes part in birthday punching (REGISTER)
    # Fingerprint of the key the peer authenticated its control connection with (None: no TLS).
    key: str | None = None

    def one_way_delay(self) -> float | None:
        """Estimated server -> peer delay: half the smoothed RTT, ``None`` before the first sample."""
        return None if self.rtt.srtt is None else self.rtt.srtt / 2


class Registry:
    """Peers by id and by control connection."""

    def __init__(self) -> None:
        self._by_id: dict[str, PeerRecord] = {}
        self._by_conn: dict[ConnId, PeerRecord] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[PeerRecord]:
        return iter(list(self._by_id.values()))

    def get(self, peer_id: str) -> PeerRecord | None:
        return self._by_id.get(peer_id)

    def by_conn(self, conn: ConnId) -> PeerRecord | None:
        return self._by_conn.get(conn)

    def add(self, record: PeerRecord) -> None:
        if record.id in self._by_id:
            raise KeyError(f"peer {record.id!r} is already registered")
        self._by_id[record.id] = record
        self._by_conn[record.conn] = record

    def remove(self, peer_id: str) -> PeerRecord | None:
        record = self._by_id.pop(peer_id, None)
        if record is not None:
            self._by_conn.pop(record.conn, None)
        return record

    def in_swarm(self, swarm: str | None) -> list[PeerRecord]:
        """Peers of ``swarm`` (all peers when ``swarm`` is None), in id order."""
        return sorted(
            (p for p in self._by_id.values() if swarm is None or p.swarm == swarm), key=lambda p: p.id
        )
