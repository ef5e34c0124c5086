"""Several coordinators sharing one registry in Redis (``tcppunch server --redis redis://HOST:PORT/N``).

The driver-side adapter between :class:`~.server.CoordinatorServer` and Redis; the sans-I/O core only
emits :mod:`.directory` actions and takes their answers. In Redis:

* ``tcppunch:peer:<id>`` = ``<node>|<RemotePeer JSON>`` with a TTL of ``keepalive_timeout``: the node
  holding the id's control connection. Claims and refreshes go through one Lua script that writes only
  when the key is free or already this node's, so an id is registered at one node of the cluster at a
  time. Every node refreshes its own keys each ``refresh_interval``; a node that dies stops refreshing
  and its peers' ids become free within ``keepalive_timeout``.
* ``tcppunch:relay:<account>[:<window>]``: bytes the cluster's relays reserved from the relay budget of
  an account (``source:<address>``, ``token:<holder>`` per window of ``RelayLimits.window``, numbered
  from the epoch; ``peer:<id>`` for ``--relay-max-mb``), with a TTL. See :class:`SharedBudget`.
* channel ``tcppunch:node:<node>``: frames for that node (:meth:`.Forward.encode`): for a peer registered
  there (the PUNCH of a session opened at another node, a CANCEL), or from a peer registered at the
  sender for the session that node holds (its RESULT).

Writes (claims, releases, forwards) go out in order through one queue, in pipelines of up to
``BATCH`` commands. When Redis fails, the node keeps serving the peers registered at it, but grants no new
id (a claim that cannot be made is answered :attr:`.ClaimAnswer.UNAVAILABLE`, so ids stay unique across
the cluster) and cannot look up another node's peers (:class:`ClusterUnavailable`); the next refresh
claims every local id again once Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from tcppunch.relay.limits import BudgetFactory, ByteBudget

from .directory import Claim, ClaimAnswer, Forward, Release, RemotePeer

log = structlog.get_logger()

BATCH = 500
PREFIX = "tcppunch"
# Seconds to reach Redis and for one command or pipeline: a registration waiting on its claim is answered
# (cluster-unavailable at worst) well within a client's 10 s request timeout.
CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 4.0

# KEYS[1] peer key; ARGV: node, record JSON, TTL ms. Writes if the key is free or this node's; 1 if written.
_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[1] + 1) ~= ARGV[1] .. '|' then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
return 1
"""
# KEYS[1] relay budget counter; ARGV: bytes wanted, limit, TTL ms. Reserves up to the wanted bytes below
# the limit and returns how many it reserved (0: the budget is used up).
_LEASE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local grant = math.min(tonumber(ARGV[1]), tonumber(ARGV[2]) - used)
if grant <= 0 then return 0 end
redis.call('INCRBY', KEYS[1], grant)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return grant
"""
# KEYS[1] relay budget counter; ARGV[1] bytes reserved but not spent: given back (never below 0).
_UNLEASE = """
local back = math.min(tonumber(ARGV[1]), tonumber(redis.call('GET', KEYS[1]) or '0'))
if back > 0 then redis.call('DECRBY', KEYS[1], back) end
return back
"""
# A relay budget's first lease (smaller for small budgets: a sixteenth of the limit, at least 64 KiB). A
# lease used up within LEASE_FAST seconds makes the next twice as big, up to a sixteenth of the limit and
# MAX_LEASE: a fast relay then costs a few Redis round trips per second, not hundreds (each costs the
# node ~0.17 ms of CPU; scripts/bench_cluster_budget.py); one idle for LEASE_SLOW halves it again.
LEASE = 4 << 20
MIN_LEASE = 64 << 10
MAX_LEASE = 64 << 20
LEASE_FAST = 1.0
LEASE_SLOW = 4.0
# A peer id's budget (--relay-max-mb) has no window: its counter lives this long after its last lease.
PEER_BUDGET_TTL = 30 * 86400.0
# KEYS[1] peer key; ARGV[1] node. Deletes the key only if this node holds it.
_RELEASE = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then return redis.call('DEL', KEYS[1]) end
return 0
"""

Op = Claim | Release | Forward
# (peer id, the registration's connection or None for a refresh, the answer)
Claimed = Callable[[str, int | None, ClaimAnswer], None]


class ClusterUnavailable(Exception):
    """Redis could not be asked (down, unreachable, timed out)."""


def peer_key(peer_id: str) -> str:
    return f"{PREFIX}:peer:{peer_id}"


def node_channel(node: str) -> str:
    return f"{PREFIX}:node:{node}"


class RedisCluster:
    """One node's link to the cluster. ``ttl``: keepalive timeout (s); ``refresh_interval``: how often
    this node re-writes its peers' keys (must be well below ``ttl``)."""

    def __init__(self, url: str, *, ttl: float = 15.0, refresh_interval: float = 5.0, node: str | None = None) -> None:
        if not 0 < refresh_interval < ttl:
            raise ValueError("refresh_interval must be > 0 and below ttl")
        self.url = url
        self.node = node or os.urandom(6).hex()
        self.ttl = ttl
        self.refresh_interval = refresh_interval
        self.errors = 0
        self._redis: aioredis.Redis | None = None
        self._queue: asyncio.Queue[Op] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._log = log.bind(component="cluster", node=self.node)

    async def start(
        self,
        deliver: Callable[[Forward], None],
        claimed: Claimed,
        local_peers: Callable[[], Iterable[RemotePeer]],
    ) -> None:
        """Connect (raises OSError/RedisError if Redis does not answer), subscribe, start the workers.

        ``deliver(forward)``: a frame another node forwarded to this one. ``claimed(peer_id, conn, ok)``: the
        answer to a registration's :class:`Claim` (``conn``), or ``conn`` None and ``TAKEN`` when a
        refresh finds an id of this node taken by another. While Redis fails, a registration's claim is
        answered ``UNAVAILABLE`` and a refresh not at all (the ids this node holds stay registered).
        ``local_peers()``: this node's peers, for the refresh.
        """
        self._redis = aioredis.from_url(self.url, socket_connect_timeout=CONNECT_TIMEOUT,
                                         socket_timeout=COMMAND_TIMEOUT)
        await self._redis.ping()
        self._claim = self._redis.register_script(_CLAIM)
        self._release = self._redis.register_script(_RELEASE)
        self._lease = self._redis.register_script(_LEASE)
        self._unlease = self._redis.register_script(_UNLEASE)
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(node_channel(self.node))
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(pubsub, deliver)),
            loop.create_task(self._write(claimed)),
            loop.create_task(self._refresh(local_peers, claimed)),
        ]
        self._log.info("cluster.joined", url=_redacted(self.url))

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Send what is queued (releases of this node's ids at shutdown), then disconnect."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), flush_timeout)
        if self._background:  # leases being given back
            await asyncio.wait(self._background, timeout=flush_timeout)
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    # ----------------------------------------------------------------------------------- operations

    def submit(self, op: Op) -> None:
        """Queue a claim, release or forward (carried out in order)."""
        self._queue.put_nowait(op)

    async def lookup(self, peer_id: str) -> RemotePeer | None:
        """The cluster's record of ``peer_id`` (None: not registered anywhere); raises
        :class:`ClusterUnavailable` when Redis cannot be asked."""
        if self._redis is None:
            raise ClusterUnavailable("not connected")
        try:
            raw = await self._redis.get(peer_key(peer_id))
        except (RedisError, OSError) as exc:
            self._failed("lookup", exc)
            raise ClusterUnavailable(repr(exc)) from exc
        if raw is None:
            return None
        _, _, record = (raw if isinstance(raw, bytes) else str(raw).encode()).partition(b"|")
        try:
            return RemotePeer.from_json(record)
        except ValueError as exc:
            self._log.warning("cluster.bad_record", peer=peer_id, error=str(exc))
            return None

    def budgets(self, window: float | None) -> BudgetFactory:
        """Relay budgets the cluster shares: accounts counted per ``window`` (s; None: no window)."""
        return lambda account, limit: SharedBudget(self, account, limit, window)

    async def lease(self, key: str, want: int, limit: int, ttl: float) -> int:
        """Reserve up to ``want`` bytes of the budget counted at ``key``; raises ClusterUnavailable."""
        if self._redis is None:
            raise ClusterUnavailable("not connected")
        try:
            return int(await self._lease(keys=[key], args=[want, limit, round(ttl * 1000)]))
        except (RedisError, OSError) as exc:
            self._failed("lease", exc, key=key)
            raise ClusterUnavailable(repr(exc)) from exc

    async def unlease(self, key: str, unspent: int) -> None:
        """Give back bytes reserved at ``key`` and not spent (best effort: logged when it fails)."""
        if self._redis is None:
            return
        try:
            await self._unlease(keys=[key], args=[unspent])
        except (RedisError, OSError) as exc:
            self._failed("unlease", exc, key=key)

    def spawn(self, coro: Any) -> None:
        """Run a short cluster operation in the background (kept until done, cancelled at close)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -------------------------------------------------------------------------------------- workers

    async def _listen(self, pubsub: Any, deliver: Callable[[Forward], None]) -> None:
        while True:
            try:
                async for message in pubsub.listen():
                    try:
                        forward = Forward.decode(self.node, bytes(message["data"]))
                    except ValueError as exc:
                        self._log.warning("cluster.bad_message", error=str(exc))
                        continue
                    deliver(forward)
            except (RedisError, OSError) as exc:
                self._failed("subscribe", exc)
                await asyncio.sleep(1.0)  # back-off before re-subscribing, not a synchronisation
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.subscribe(node_channel(self.node))

    async def _write(self, claimed: Claimed) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._execute(batch, claimed)
            except (RedisError, OSError) as exc:
                self._failed("write", exc, ops=len(batch))
                for op in batch:
                    if isinstance(op, Claim) and op.conn:
                        claimed(op.peer.id, op.conn, ClaimAnswer.UNAVAILABLE)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _execute(self, batch: list[Op], claimed: Claimed) -> None:
        assert self._redis is not None
        ttl_ms = str(round(self.ttl * 1000))
        async with self._redis.pipeline(transaction=False) as pipe:
            for op in batch:
                if isinstance(op, Claim):
                    await self._claim(keys=[peer_key(op.peer.id)], args=[self.node, op.peer.to_json(), ttl_ms],
                                      client=pipe)
                elif isinstance(op, Release):
                    await self._release(keys=[peer_key(op.peer_id)], args=[self.node], client=pipe)
                else:
                    pipe.publish(node_channel(op.node), op.encode())
            results = await pipe.execute(raise_on_error=False)
        for op, result in zip(batch, results, strict=True):
            failed = isinstance(result, Exception)
            if failed:
                self._failed("write", result)
            if not isinstance(op, Claim):
                continue
            answer = ClaimAnswer.UNAVAILABLE if failed else ClaimAnswer.GRANTED if result == 1 else ClaimAnswer.TAKEN
            if answer is ClaimAnswer.TAKEN:
                self._log.info("cluster.id_taken_elsewhere", peer=op.peer.id)
            if op.conn:
                claimed(op.peer.id, op.conn, answer)
            elif answer is ClaimAnswer.TAKEN:
                claimed(op.peer.id, None, answer)

    async def _refresh(self, local_peers: Callable[[], Iterable[RemotePeer]], claimed: Claimed) -> None:
        """Every refresh_interval: re-claim every local id (a periodic sweep, in batches)."""
        while True:
            await asyncio.sleep(self.refresh_interval)  # the refresh period itself
            peers = list(local_peers())
            for start in range(0, len(peers), BATCH):
                try:
                    await self._execute([Claim(0, p) for p in peers[start : start + BATCH]], claimed)
                except (RedisError, OSError) as exc:
                    self._failed("refresh", exc, peers=len(peers))
                    break

    def _failed(self, what: str, exc: BaseException, **kw: Any) -> None:
        self.errors += 1
        self._log.warning("cluster.redis_failed", what=what, error=repr(exc), **kw)


class SharedBudget(ByteBudget):
    """A relay byte budget the whole cluster shares: one counter in Redis per account (and window).

    The relay pump never waits on Redis while a lease lasts: the budget reserves bytes in Redis ahead of
    use, ``lease_size`` at a time (4 MiB, or a sixteenth of a small limit, growing while leases go fast:
    see ``LEASE``), asking for the next lease when half of one is left, and the pump spends from that
    local lease. What the granularity costs: a node holds at most 1.5 leases of an account reserved and
    not yet spent, and gives back what is
    unspent when its last relay on the account ends; so other nodes may be refused up to that much before
    the limit is really spent, and a node that dies holding a lease takes it with it until the counter
    expires. While Redis answers, the cluster never carries more than the limit. While it does not, the
    node leases locally (one lease at a time, logged), bounded by its own count of the same limit, as a
    single server is.
    """

    def __init__(self, cluster: RedisCluster, account: str, limit: int, window: float | None) -> None:
        super().__init__(limit)  # this node's own count: the bound while Redis is unreachable
        self._cluster = cluster
        self.account = account
        self.limit = limit
        self._window = window
        self._base_lease = max(1, min(LEASE, max(MIN_LEASE, limit // 16), limit))
        self._max_lease = max(self._base_lease, min(MAX_LEASE, limit // 16))
        self.lease_size = self._base_lease
        self._asked_at: float | None = None  # time.monotonic() of the last lease asked for
        self._lease = 0  # reserved and not spent
        self._lease_key: str | None = None  # where it was reserved (None: leased locally)
        self._spent_key: str | None = None  # the counter that said no more
        self._asking: asyncio.Future[None] | None = None  # done when the lease being asked for arrived
        self._holders = 0
        self.leases = 0  # leases reserved in Redis so far (round trips the relays' budget cost)

    def key(self) -> str:
        base = f"{PREFIX}:relay:{self.account}"
        return base if self._window is None else f"{base}:{int(time.time() // self._window)}"

    @property
    def remaining(self) -> int | None:
        if self._lease == 0 and self._spent_key == self.key():
            return 0
        return super().remaining

    def allowance(self, want: int) -> int:  # the relay's hot path: plain arithmetic while the lease lasts
        if self._lease <= self.lease_size // 2:
            self._ask()
        return max(0, min(want, self._lease, self.limit - self.used))

    def charge(self, n: int) -> None:
        super().charge(n)
        self._lease -= n

    def refill(self) -> Awaitable[object] | None:
        if super().allowance(1) == 0 or self.remaining == 0:
            return None
        asking = self._ask()
        return None if asking is None else asyncio.shield(asking)  # a waiter that gives up cancels only itself

    def hold(self) -> None:
        self._holders += 1

    def release(self) -> None:
        self._holders = max(0, self._holders - 1)
        if self._holders == 0:
            self._give_back()

    def _ask(self) -> asyncio.Future[None] | None:
        """Ask for the next lease unless one is on its way or the counter said no more."""
        if self._asking is None and self._spent_key != self.key():
            self._adapt(time.monotonic())
            self._asking = asyncio.get_running_loop().create_future()
            self._cluster.spawn(self._lease_more(self._asking))
        return self._asking

    def _adapt(self, now: float) -> None:
        """Leases spent fast grow (fewer round trips), slow ones shrink (less held unspent)."""
        if self._asked_at is not None:
            gap = now - self._asked_at
            if gap < LEASE_FAST:
                self.lease_size = min(self._max_lease, self.lease_size * 2)
            elif gap > LEASE_SLOW:
                self.lease_size = max(self._base_lease, self.lease_size // 2)
        self._asked_at = now

    async def _lease_more(self, done: asyncio.Future[None]) -> None:
        key: str | None = self.key()
        try:
            try:
                got = await self._cluster.lease(key or "", self.lease_size, self.limit,
                                                PEER_BUDGET_TTL if self._window is None else 2 * self._window)
            except ClusterUnavailable:
                key, got = None, self.lease_size  # bounded by this node's own count (super())
            if got == 0:
                self._spent_key = key
            elif key is not None:
                self.leases += 1
            if key != self._lease_key:
                self._give_back()
                self._lease_key = key
            self._lease += got
        finally:  # waiters always wake (and ask again, or see the limit)
            self._asking = None
            if not done.done():
                done.set_result(None)
        if self._holders == 0:  # the last relay ended while the lease was on its way
            self._give_back()

    def _give_back(self) -> None:
        unspent, key = self._lease, self._lease_key
        self._lease = 0
        if unspent > 0 and key is not None:
            self._cluster.spawn(self._cluster.unlease(key, unspent))


def _redacted(url: str) -> str:
    """The URL without a password (never logged)."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
