"""Deadlines by key in a binary heap, with lazy cancellation: the coordinator's one clock.

Sans-I/O: nothing here reads a clock; callers pass ``now``. Each key has at most one live deadline.
Re-scheduling or cancelling a key only updates a dict; the superseded heap entry stays in the heap and
is skipped when it reaches the top (or dropped by a compaction once stale entries outnumber live ones),
so every operation costs O(log n) amortized whatever the number of keys, and :meth:`next_deadline`
is O(1) amortized.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# Stale entries tolerated beyond twice the live ones before the heap is rebuilt.
_COMPACT_SLACK = 64


class TimerHeap(Generic[K]):
    """At most one pending deadline per key; due keys come out in deadline order (ties: schedule order)."""

    __slots__ = ("_heap", "_live", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        # key -> (deadline, sequence number of its live heap entry)
        self._live: dict[K, tuple[float, int]] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def when(self, key: K) -> float | None:
        """The live deadline of ``key`` (``None``: not scheduled)."""
        entry = self._live.get(key)
        return None if entry is None else entry[0]

    def schedule(self, key: K, when: float) -> None:
        """Set the deadline of ``key`` to ``when``, replacing any earlier one."""
        live = self._live.get(key)
        if live is not None and live[0] == when:
            return
        seq = next(self._seq)
        self._live[key] = (when, seq)
        heapq.heappush(self._heap, (when, seq, key))
        if len(self._heap) > 2 * len(self._live) + _COMPACT_SLACK:
            self._compact()

    def cancel(self, key: K) -> None:
        """Forget the deadline of ``key`` (no-op when it has none)."""
        self._live.pop(key, None)

    def next_deadline(self) -> float | None:
        """The earliest live deadline, ``None`` when nothing is scheduled."""
        self._drop_stale_top()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float, limit: int | None = None) -> list[K]:
        """Remove and return the keys due at ``now`` (deadline <= now), earliest first, at most ``limit``."""
        due: list[K] = []
        while limit is None or len(due) < limit:
            self._drop_stale_top()
            if not self._heap or self._heap[0][0] > now:
                break
            _, _, key = heapq.heappop(self._heap)
            del self._live[key]
            due.append(key)
        return due

    def _drop_stale_top(self) -> None:
        heap, live = self._heap, self._live
        while heap:
            _, seq, key = heap[0]
            entry = live.get(key)
            if entry is not None and entry[1] == seq:
                return
            heapq.heappop(heap)

    def _compact(self) -> None:
        self._heap = [(when, seq, key) for key, (when, seq) in self._live.items()]
        heapq.heapify(self._heap)
