"""The swarm peer: one :class:`tcppunch.peer.Peer` registered under the swarm name, many connections.

* Tracker: ``peer.list_peers()`` every ``poll_interval`` lists who is in the swarm.
* Dialing: of two peers only the one with the smaller id dials (so a pair has one connection); dials run
  one at a time by default (``serial_dials``), a failed one is retried with backoff a bounded number of times.
* Each connection (direct or relayed, it does not matter here) runs the :mod:`.wire` protocol: handshake
  (info hash + id, checked against the id the coordinator vouches for), bitfield, then HAVE / REQUEST /
  PIECE / CANCEL. Requests are pipelined (``pipeline`` per connection), rarest first (:mod:`.picker`).
* A connection that dies returns its outstanding requests to the pool; a request that waits longer than
  ``request_timeout`` is cancelled and asked of someone else.

Only ``tcppunch.peer`` is used. Progress goes to ``emit`` as plain dicts (the CLI prints JSON lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from examples.swarm.metainfo import Metainfo
from examples.swarm.picker import PiecePicker
from examples.swarm.storage import PieceStore
from examples.swarm.wire import (
    Bitfield,
    Cancel,
    Decoder,
    Handshake,
    Have,
    Message,
    Piece,
    Request,
    WireError,
    encode,
    max_frame_for,
    pack_bits,
    unpack_bits,
)
from tcppunch.peer import ConnectFailed, ConnectionInfo, CoordinatorError, Method, Peer, RelayMode
from tcppunch.session.driver import MuxStream

log = structlog.get_logger("examples.swarm")

HANDSHAKE_TIMEOUT = 15.0
MAX_REMOTE_REQUESTS = 64  # a peer asking for more at once is broken or hostile
READ_SIZE = 256 * 1024

Emit = Callable[[dict[str, Any]], None]


@dataclass
class ClientConfig:
    coordinator: str
    peer_id: str
    token: str
    relay: RelayMode = RelayMode.AUTO
    pipeline: int = 4
    max_peers: int = 32
    poll_interval: float = 1.0
    connect_timeout: float = 60.0
    connect_attempts: int = 4
    request_timeout: float = 30.0
    serial_dials: bool = True
    upload_rate: float | None = None  # bytes per second for the whole process; None: unlimited
    seed_for: float | None = None  # once complete, keep seeding this long (None: until stopped)
    run_timeout: float = 3600.0
    progress_interval: float = 0.5


@dataclass
class PairStats:
    """Everything about our connection(s) with one other peer."""

    peer: str
    method: str = ""
    dialed: bool = False
    connect_seconds: float | None = None
    relay_reason: str | None = None
    connections: int = 0
    downloaded: int = 0
    uploaded: int = 0
    pieces_in: int = 0
    pieces_out: int = 0
    bad_pieces: int = 0
    dial_failures: int = 0
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class StreamConn:
    """A link's byte stream: one stream of the pair's session (see README: why sessions)."""

    stream: MuxStream
    info: ConnectionInfo
    session_path: str

    @property
    def reader(self) -> MuxStream:
        return self.stream

    @property
    def writer(self) -> MuxStream:
        return self.stream

    @property
    def peer(self) -> str:
        return self.stream.peer

    @property
    def method(self) -> Method:
        return Method(self.session_path)

    def close(self) -> None:
        self.stream.close()

    @classmethod
    def of(cls, peer: Peer, stream: MuxStream) -> StreamConn:
        entry = next(e for e in peer.sessions() if e.peer == stream.peer)
        return cls(stream, entry.info, entry.session.path)


@dataclass
class Link:
    """One live connection (a stream of the pair's session)."""

    remote: str
    conn: StreamConn
    dialed: bool
    inflight: set[int] = field(default_factory=set)
    control: deque[bytes] = field(default_factory=deque)
    uploads: deque[int] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    got_bitfield: bool = False
    closed: bool = False

    def send(self, msg: Message) -> None:
        self.control.append(encode(msg))
        self.wake.set()


class RateLimiter:
    """A token bucket for the upload side (pacing, not synchronisation); bursts of at most ``burst`` bytes."""

    def __init__(self, rate: float | None, burst: int = 64 * 1024) -> None:
        self.rate = rate
        self.burst = burst
        self._allowance = 0.0
        self._stamp = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        self._allowance = min(float(self.burst), self._allowance + (now - self._stamp) * self.rate)
        self._stamp = now
        self._allowance -= n
        if self._allowance < 0:
            await asyncio.sleep(-self._allowance / self.rate)


class SwarmClient:
    def __init__(self, meta: Metainfo, store: PieceStore, config: ClientConfig, emit: Emit | None = None) -> None:
        self.meta = meta
        self.store = store
        self.config = config
        self.emit: Emit = emit or (lambda event: None)
        self.picker = PiecePicker(meta.piece_count, set(store.have), random.Random())
        self.links: dict[str, Link] = {}
        self.pairs: dict[str, PairStats] = {}
        self.max_frame = max_frame_for(meta.piece_size, meta.piece_count)
        self.limiter = RateLimiter(config.upload_rate)
        self.started = time.monotonic()
        self.completed_at: float | None = time.monotonic() if store.complete else None
        self.done = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = log.bind(peer=config.peer_id)
        self._peer: Peer | None = None

    # ------------------------------------------------------------------ life cycle
    async def run(self, stop: asyncio.Event) -> dict[str, Any]:
        """Join the swarm and trade pieces until ``stop`` is set, ``seed_for`` ran out after completion,
        or ``run_timeout`` passed. Returns the final statistics."""
        cfg = self.config
        self.started = time.monotonic()
        async with Peer(cfg.coordinator, cfg.peer_id, cfg.token, swarm=self.meta.swarm, relay=cfg.relay) as peer:
            self._peer = peer
            self.emit({"event": "ready", "observed": str(peer.observed),
                       "nat": peer.nat.verdict if peer.nat else None, "have": len(self.store.have),
                       "seconds": round(time.monotonic() - self.started, 3)})
            if self.store.complete:
                self.done.set()
            workers = [self._spawn(self._accept_loop(peer)), self._spawn(self._discover_loop(peer)),
                       self._spawn(self._progress_loop()), self._spawn(self._expiry_loop())]
            until = self._spawn(self._until_finished(stop))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until, cfg.run_timeout)
            for task in [*workers, *self._tasks]:
                task.cancel()
            await asyncio.gather(*workers, *self._tasks, return_exceptions=True)
            for link in list(self.links.values()):
                link.conn.close()
        self.store.close()
        return self.stats()

    async def _until_finished(self, stop: asyncio.Event) -> None:
        stopper = asyncio.ensure_future(stop.wait())
        try:
            if self.config.seed_for is None:
                await stopper
                return
            done = asyncio.ensure_future(self.done.wait())
            await asyncio.wait([stopper, done], return_when=asyncio.FIRST_COMPLETED)
            done.cancel()
            if not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stopper), self.config.seed_for)
        finally:
            stopper.cancel()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def stats(self) -> dict[str, Any]:
        return {
            "id": self.config.peer_id,
            "complete": self.store.complete,
            "have": len(self.store.have),
            "pieces": self.meta.piece_count,
            "downloaded": sum(p.downloaded for p in self.pairs.values()),
            "uploaded": sum(p.uploaded for p in self.pairs.values()),
            "requeued": self.picker.requeued,
            "complete_seconds": None if self.completed_at is None or self.completed_at < self.started
            else round(self.completed_at - self.started, 3),
            "pairs": {k: v.to_json() for k, v in sorted(self.pairs.items())},
        }

    def _pair(self, remote: str) -> PairStats:
        return self.pairs.setdefault(remote, PairStats(remote))

    # ------------------------------------------------------------------ finding and opening connections
    async def _accept_loop(self, peer: Peer) -> None:
        while True:
            try:
                stream = await peer.accept_stream()
            except ConnectionError:
                return
            self._spawn(self._serve(StreamConn.of(peer, stream), dialed=False))

    async def _discover_loop(self, peer: Peer) -> None:
        cfg = self.config
        failures: dict[str, int] = {}
        retry_at: dict[str, float] = {}
        dialing: set[str] = set()
        while True:  # bounded by run(): cancelled at stop or run_timeout
            try:
                listed = await asyncio.wait_for(peer.list_peers(), 10.0)
            except (CoordinatorError, ConnectionError, TimeoutError) as exc:
                self._log.warning("swarm.list_failed", error=str(exc))
                listed = []
            now = time.monotonic()
            for info in sorted(listed, key=lambda p: p.id):
                remote = info.id
                if remote <= cfg.peer_id or remote in self.links or remote in dialing:
                    continue  # the smaller id dials; one connection per pair
                if failures.get(remote, 0) >= cfg.connect_attempts or now < retry_at.get(remote, 0.0):
                    continue
                if len(self.links) + len(dialing) >= cfg.max_peers:
                    break
                dialing.add(remote)
                attempt = self._dial(peer, remote, failures, retry_at)
                if cfg.serial_dials:
                    await attempt
                    dialing.discard(remote)
                else:
                    task = self._spawn(attempt)
                    task.add_done_callback(functools.partial(_discard_when_done, dialing, remote))
            await asyncio.sleep(cfg.poll_interval)

    async def _dial(self, peer: Peer, remote: str, failures: dict[str, int], retry_at: dict[str, float]) -> None:
        pair = self._pair(remote)
        try:
            stream = await asyncio.wait_for(peer.open_stream(remote), self.config.connect_timeout)
            conn = StreamConn.of(peer, stream)
        except (ConnectFailed, TimeoutError, OSError) as exc:
            n = failures[remote] = failures.get(remote, 0) + 1
            retry_at[remote] = time.monotonic() + min(30.0, 2.0 ** n)
            pair.dial_failures += 1
            pair.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.emit({"event": "dial_failed", "remote": remote, "attempt": n, "error": pair.last_error})
            return
        failures.pop(remote, None)
        self._spawn(self._serve(conn, dialed=True))

    # ------------------------------------------------------------------ one connection
    async def _serve(self, conn: StreamConn, *, dialed: bool) -> None:
        remote = conn.peer
        reason = "closed"
        link: Link | None = None
        decoder = Decoder(self.max_frame)
        try:
            conn.writer.write(encode(Handshake(self.meta.info_hash, self.config.peer_id)))
            pending = await asyncio.wait_for(self._read_handshake(conn, decoder), HANDSHAKE_TIMEOUT)
            link = self._register(conn, dialed)
            for msg in pending:
                self._handle(link, msg)
            writer = asyncio.ensure_future(self._write_loop(link))
            reader = asyncio.ensure_future(self._read_loop(link, decoder))
            try:
                done, _ = await asyncio.wait([reader, writer], return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            finally:
                reader.cancel()
                writer.cancel()
                await asyncio.gather(reader, writer, return_exceptions=True)
        except WireError as exc:
            reason = f"protocol error: {exc}"
        except TimeoutError:
            reason = "no handshake in time"
        except (ConnectionError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
            if link is not None:
                self._unregister(link, reason)
            else:
                self._log.info("swarm.rejected", remote=remote, reason=reason)
                self.emit({"event": "rejected", "remote": remote, "reason": reason})

    async def _read_handshake(self, conn: StreamConn, decoder: Decoder) -> list[Message]:
        """The remote's handshake (checked) and any messages that came in the same read."""
        for _ in range(64):  # a handshake is < 128 bytes; 64 reads without one is a broken peer
            data = await conn.reader.read(READ_SIZE)
            if not data:
                raise ConnectionError("closed before the handshake")
            messages = decoder.feed(data)
            if not messages:
                continue
            first, rest = messages[0], messages[1:]
            if not isinstance(first, Handshake):
                raise WireError(f"expected a handshake, got {type(first).__name__}")
            if first.info_hash != self.meta.info_hash:
                raise WireError("handshake for different content (info hash differs)")
            if first.peer_id != conn.peer:
                raise WireError(f"handshake says {first.peer_id!r}, the coordinator says {conn.peer!r}")
            return rest
        raise WireError("no handshake in the first 64 reads")

    def _register(self, conn: StreamConn, dialed: bool) -> Link:
        """Make the link live. No await here: the bitfield snapshot and joining the HAVE broadcast are one
        step, so no piece completed in between is missed."""
        remote = conn.peer
        old = self.links.pop(remote, None)
        if old is not None:  # the remote dialed again: its old connection is dead to it
            self._log.info("swarm.replaced", remote=remote)
            old.closed = True
            old.conn.close()
            self._requeue(remote, old)
        link = Link(remote, conn, dialed)
        self.links[remote] = link
        self.picker.add_peer(remote, ())
        link.send(Bitfield(pack_bits(self.store.have, self.meta.piece_count)))
        pair = self._pair(remote)
        pair.connections += 1
        pair.method = conn.method.value
        pair.dialed = dialed
        pair.connect_seconds = conn.info.timings.get("total")
        pair.relay_reason = conn.info.relay_reason
        self.emit({"event": "connected", "remote": remote, "method": pair.method, "dialed": dialed,
                   "seconds": None if pair.connect_seconds is None else round(pair.connect_seconds, 3),
                   "relay_reason": pair.relay_reason})
        return link

    def _unregister(self, link: Link, reason: str) -> None:
        if self.links.get(link.remote) is link:
            del self.links[link.remote]
            requeued = self._requeue(link.remote, link)
            self.emit({"event": "disconnected", "remote": link.remote, "reason": reason, "requeued": requeued})

    def _requeue(self, remote: str, link: Link) -> int:
        owed = self.picker.remove_peer(remote)
        link.inflight.clear()
        if owed:
            self._fill_all()
        return len(owed)

    async def _read_loop(self, link: Link, decoder: Decoder) -> None:
        while True:  # ends at EOF, on a protocol error, or when the link is cancelled
            data = await link.conn.reader.read(READ_SIZE)
            if not data:
                return
            for msg in decoder.feed(data):
                self._handle(link, msg)

    async def _write_loop(self, link: Link) -> None:
        writer = link.conn.writer
        while True:  # ends when the connection fails or the link is cancelled
            if link.control:
                writer.write(b"".join(link.control))
                link.control.clear()
            elif link.uploads:
                index = link.uploads.popleft()
                data = self.store.read(index)
                await self.limiter.take(len(data))
                writer.write(encode(Piece(index, data)))
                pair = self._pair(link.remote)
                pair.uploaded += len(data)
                pair.pieces_out += 1
            else:
                link.wake.clear()
                await link.wake.wait()
                continue
            await writer.drain()

    # ------------------------------------------------------------------ messages
    def _handle(self, link: Link, msg: Message) -> None:
        if link.closed:
            return  # replaced by a newer connection from the same peer
        count = self.meta.piece_count
        match msg:
            case Handshake():
                raise WireError("a second handshake")
            case Bitfield(bits):
                if link.got_bitfield:
                    raise WireError("a second bitfield")
                link.got_bitfield = True
                for i in unpack_bits(bits, count):
                    self.picker.peer_has(link.remote, i)
                self._fill(link)
            case Have(index) | Request(index) | Cancel(index) | Piece(index) if not 0 <= index < count:
                raise WireError(f"{type(msg).__name__.lower()} for piece {index}; there are {count}")
            case Have(index):
                self.picker.peer_has(link.remote, index)
                self._fill(link)
            case Request(index):
                if index not in self.store.have:
                    raise WireError(f"request for piece {index}, which we never announced")
                if len(link.uploads) >= MAX_REMOTE_REQUESTS:
                    raise WireError(f"more than {MAX_REMOTE_REQUESTS} requests outstanding")
                link.uploads.append(index)
                link.wake.set()
                self.emit({"event": "request", "remote": link.remote, "piece": index,
                           "uploaded_pieces": sum(p.pieces_out for p in self.pairs.values())})
            case Cancel(index):
                with contextlib.suppress(ValueError):
                    link.uploads.remove(index)
            case Piece(index, data):
                self._on_piece(link, index, data)

    def _on_piece(self, link: Link, index: int, data: bytes) -> None:
        pair = self._pair(link.remote)
        pair.downloaded += len(data)
        link.inflight.discard(index)
        if index in self.store.have:  # we cancelled it (timeout) and it crossed the CANCEL
            self._fill(link)
            return
        if not self.store.write(index, data):
            pair.bad_pieces += 1
            self.picker.failed(link.remote, index)
            self._log.warning("swarm.bad_piece", remote=link.remote, piece=index)
            if pair.bad_pieces >= 3:
                raise WireError("three pieces failed their hash check")
            self._fill_all()
            return
        pair.pieces_in += 1
        self.picker.received(link.remote, index)
        for other in self.links.values():
            other.send(Have(index))
        if self.store.complete and self.completed_at is None:
            self.completed_at = time.monotonic()
            self.done.set()
            self.emit({"event": "complete", "seconds": round(self.completed_at - self.started, 3),
                       "downloaded": sum(p.downloaded for p in self.pairs.values())})
        self._fill(link)

    def _fill(self, link: Link) -> None:
        """Keep ``pipeline`` requests outstanding on ``link``."""
        while not link.closed and len(link.inflight) < self.config.pipeline:
            index = self.picker.next_request(link.remote)
            if index is None:
                return
            self.picker.requested(link.remote, index, time.monotonic())
            link.inflight.add(index)
            link.send(Request(index))

    def _fill_all(self) -> None:
        for link in list(self.links.values()):
            self._fill(link)

    # ------------------------------------------------------------------ timers
    async def _expiry_loop(self) -> None:
        while True:  # bounded by run()
            await asyncio.sleep(1.0)
            for remote, index in self.picker.expired(time.monotonic(), self.config.request_timeout):
                self.picker.failed(remote, index)
                link = self.links.get(remote)
                if link is not None:
                    link.inflight.discard(index)
                    link.send(Cancel(index))
                self._log.info("swarm.request_expired", remote=remote, piece=index)
            self._fill_all()

    async def _progress_loop(self) -> None:
        while True:  # bounded by run()
            self.emit({"event": "progress", "have": len(self.store.have), "pieces": self.meta.piece_count,
                       "downloaded": sum(p.downloaded for p in self.pairs.values()),
                       "uploaded": sum(p.uploaded for p in self.pairs.values()),
                       "queued": sum(len(v.uploads) for v in self.links.values()),
                       "links": sorted(self.links), "inflight": {k: len(v.inflight) for k, v in self.links.items()
                                                                 if v.inflight}})
            await asyncio.sleep(self.config.progress_interval)


def _discard_when_done(items: set[str], item: str, _task: asyncio.Task[Any]) -> None:
    items.discard(item)
