"""Which piece to ask which peer for, sans-I/O: rarest first (random among equally rare), each missing
piece requested from one peer at a time, and everything a lost peer owed goes back to the pool.

The picker never sees sockets or clocks: the caller says what peers have, what it requested (with the
time it did) and what arrived or failed; :meth:`expired` takes ``now`` to find requests that waited too long.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class _Outstanding:
    peer: str
    since: float


@dataclass
class PiecePicker:
    piece_count: int
    have: set[int] = field(default_factory=set)
    rng: random.Random = field(default_factory=random.Random)
    # piece -> how many connected peers have it
    availability: list[int] = field(init=False)
    peers: dict[str, set[int]] = field(init=False, default_factory=dict)
    outstanding: dict[int, _Outstanding] = field(init=False, default_factory=dict)
    requeued: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.availability = [0] * self.piece_count

    # -------------------------------------------------------------- what peers have
    def add_peer(self, peer: str, pieces: Iterable[int]) -> None:
        if peer in self.peers:
            raise ValueError(f"peer {peer!r} already known")
        self.peers[peer] = set()
        for i in pieces:
            self.peer_has(peer, i)

    def peer_has(self, peer: str, index: int) -> None:
        pieces = self.peers[peer]
        if index not in pieces:
            pieces.add(index)
            self.availability[index] += 1

    def remove_peer(self, peer: str) -> list[int]:
        """Forget ``peer``; returns the pieces it owed us (now requestable from others)."""
        for i in self.peers.pop(peer, set()):
            self.availability[i] -= 1
        owed = [i for i, o in self.outstanding.items() if o.peer == peer]
        for i in owed:
            del self.outstanding[i]
        self.requeued += len(owed)
        return owed

    def interesting(self, peer: str) -> bool:
        """Does ``peer`` have anything we miss?"""
        return any(i not in self.have for i in self.peers.get(peer, ()))

    # -------------------------------------------------------------- requests
    def next_request(self, peer: str) -> int | None:
        """The rarest piece ``peer`` has that we miss and nobody is sending us; None if there is none."""
        candidates = [i for i in self.peers.get(peer, ()) if i not in self.have and i not in self.outstanding]
        if not candidates:
            return None
        rarest = min(self.availability[i] for i in candidates)
        return self.rng.choice([i for i in candidates if self.availability[i] == rarest])

    def requested(self, peer: str, index: int, now: float) -> None:
        if index in self.outstanding:
            raise ValueError(f"piece {index} is already requested from {self.outstanding[index].peer!r}")
        self.outstanding[index] = _Outstanding(peer, now)

    def received(self, peer: str, index: int) -> bool:
        """A verified piece arrived; False if we did not ask ``peer`` for it (it is kept anyway)."""
        asked = self.outstanding.get(index)
        expected = asked is not None and asked.peer == peer
        if asked is not None:
            del self.outstanding[index]
        self.have.add(index)
        return expected

    def failed(self, peer: str, index: int) -> None:
        """The piece from ``peer`` was bad (or cancelled): it may be requested again."""
        asked = self.outstanding.get(index)
        if asked is not None and asked.peer == peer:
            del self.outstanding[index]
            self.requeued += 1

    def outstanding_from(self, peer: str) -> list[int]:
        return [i for i, o in self.outstanding.items() if o.peer == peer]

    def expired(self, now: float, timeout: float) -> list[tuple[str, int]]:
        """Requests older than ``timeout``: (peer, piece); the caller cancels them and calls failed()."""
        return [(o.peer, i) for i, o in self.outstanding.items() if now - o.since > timeout]

    @property
    def complete(self) -> bool:
        return len(self.have) == self.piece_count
