"""Registered peers: who is online on which control connection, what they reported, how far away they are.

Sans-I/O: every method that depends on time takes ``now`` (seconds on any monotonic clock).
"""

from __future__ import annotations

import bisect
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
    """Peers by id and by control connection, and each swarm's ids in order (LIST's answer).

    The sorted id lists make a LIST cost what it answers (at most ``limit`` entries), not a sort of every
    registered peer: inserting or removing an id moves pointers in one list (a memmove), which stays far
    below a sort however many peers register.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, PeerRecord] = {}
        self._by_conn: dict[ConnId, PeerRecord] = {}
        # None: every peer; otherwise one swarm. Sorted ids; an empty swarm's list is dropped.
        self._ordered: dict[str | None, list[str]] = {None: []}

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
        bisect.insort(self._ordered[None], record.id)
        if record.swarm is not None:
            bisect.insort(self._ordered.setdefault(record.swarm, []), record.id)

    def remove(self, peer_id: str) -> PeerRecord | None:
        record = self._by_id.pop(peer_id, None)
        if record is not None:
            self._by_conn.pop(record.conn, None)
            _discard_sorted(self._ordered[None], peer_id)
            if record.swarm is not None:
                members = self._ordered[record.swarm]
                _discard_sorted(members, peer_id)
                if not members:
                    del self._ordered[record.swarm]
        return record

    def swarm_size(self, swarm: str | None) -> int:
        """How many peers ``swarm`` has (every registered peer when ``swarm`` is None)."""
        return len(self._ordered.get(swarm, ()))

    def in_swarm(self, swarm: str | None, limit: int | None = None) -> list[PeerRecord]:
        """The first ``limit`` peers of ``swarm`` (all peers when ``swarm`` is None) in id order; every one
        when ``limit`` is None."""
        ids = self._ordered.get(swarm, [])
        return [self._by_id[peer_id] for peer_id in (ids if limit is None else ids[:limit])]


def _discard_sorted(ids: list[str], peer_id: str) -> None:
    at = bisect.bisect_left(ids, peer_id)
    if at < len(ids) and ids[at] == peer_id:
        del ids[at]
