"""Two coordinators sharing one registry in a real redis-server, on loopback.

alice registers at A, bob at B: a relayed connect through the cluster carries bytes intact (SHA-256);
a direct one ends its session at A at once, with its outcome in A's metrics, once both RESULTs (bob's
through B) arrived; ids are unique across the cluster, also while Redis is down (new claims fail closed) and after it
comes back; a node that dies (no clean shutdown) frees its ids within the keepalive timeout, and its peer
registers at the other node.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tcppunch.coordinator.auth import Tokens
from tcppunch.coordinator.cluster import RedisCluster, peer_key
from tcppunch.coordinator.control import ControlChannel, CoordinatorError
from tcppunch.coordinator.metrics import MetricsEndpoint
from tcppunch.coordinator.protocol import CoordinatorConfig
from tcppunch.coordinator.server import CoordinatorServer
from tcppunch.peer import Method, Peer
from tcppunch.relay import EndReason
from tcppunch.wire.coord import ErrorCode, RelayAdvice
from tcppunch.wire.endpoint import Endpoint

from ..redis_server import redis_process, redis_server
from .test_metrics import scrape

TOKEN = "cluster-test-token"
KEEPALIVE = 0.5  # interval; timeout 1.5 s, the TTL of an id in Redis
CONFIG = CoordinatorConfig(keepalive_interval=KEEPALIVE, stale_after=1.5 * KEEPALIVE,
                           keepalive_timeout=3 * KEEPALIVE)


def new_node(url: str, relay_bytes_per_peer: int | None = None) -> CoordinatorServer:
    cluster = RedisCluster(url, ttl=CONFIG.keepalive_timeout, refresh_interval=CONFIG.keepalive_interval)
    return CoordinatorServer("127.0.0.1", 0, Tokens(shared=TOKEN), config=CONFIG, cluster=cluster,
                             relay_bytes_per_peer=relay_bytes_per_peer)


@contextlib.asynccontextmanager
async def node(url: str, relay_bytes_per_peer: int | None = None) -> AsyncIterator[CoordinatorServer]:
    async with new_node(url, relay_bytes_per_peer) as server:
        yield server


async def die(server: CoordinatorServer) -> None:
    """The node dies without a word to Redis: its refresh stops and nothing is released."""
    assert server.cluster is not None
    for task in server.cluster._tasks:
        task.cancel()
    await server.stop()


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Seconds until ``check()`` held (bounded polling: the condition lives in another process)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await check():
        if loop.time() - start > timeout:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)
    return loop.time() - start


def test_a_relayed_connect_between_peers_of_two_nodes() -> None:
    async def main() -> None:
        with redis_server() as url:
            async with node(url) as a, node(url) as b, ControlChannel(a.address, "alice", TOKEN) as alice, \
                        ControlChannel(b.address, "bob", TOKEN) as bob:
                order_a = await alice.connect("bob", relay_only=True)
                order_b = await bob.next_order(timeout=5.0)
                assert order_b.session_id == order_a.session_id and order_b.peer_id == "alice"
                assert order_a.relay_advice is order_b.relay_advice is RelayAdvice.RELAY_NOW
                # Both PUNCH orders name the relay of the session's node, A.
                assert order_a.relay == order_b.relay == a.address
                payload = os.urandom(1 << 20)
                (ra, wa), (rb, wb) = await asyncio.gather(alice.open_relay(order_a, timeout=10.0),
                                                          bob.open_relay(order_b, timeout=10.0))
                back = os.urandom(1 << 16)
                wa.write(payload)
                wa.write_eof()
                wb.write(back)
                wb.write_eof()
                got, got_back = await asyncio.wait_for(asyncio.gather(rb.read(), ra.read()), 20.0)
                assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
                assert hashlib.sha256(got_back).digest() == hashlib.sha256(back).digest()
                wb.close()
                wa.close()

    asyncio.run(main())


def test_a_direct_connect_across_nodes_ends_at_the_session_node_with_both_results() -> None:
    """bob's RESULT reaches B; B forwards it to A, which holds the session: A frees the slots at once (long
    before the session would expire) and counts the outcome and the time to connect; B counts none."""
    async def main() -> None:
        with redis_server() as url:
            async with node(url) as a, node(url) as b, \
                    MetricsEndpoint(Endpoint("127.0.0.1", 0), a) as metrics_a, \
                    MetricsEndpoint(Endpoint("127.0.0.1", 0), b) as metrics_b, \
                    Peer(b.address, "bob", TOKEN, detect_nat=False) as bob, \
                    Peer(a.address, "alice", TOKEN, detect_nat=False) as alice:
                loop = asyncio.get_running_loop()
                opened = loop.time()
                mine, theirs = await asyncio.gather(alice.connect("bob"), bob.accept(timeout=15))
                assert mine.method is Method.DIRECT
                connected = loop.time()
                assert (a.protocol.stats.sessions, b.protocol.stats.sessions) == (1, 0)  # held at A, alice's node
                payload = os.urandom(200_000)
                mine.writer.write(payload)
                mine.writer.write_eof()
                got = await asyncio.wait_for(theirs.reader.read(), 10.0)
                assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()

                async def ended_at_a() -> bool:
                    return not a.protocol.sessions and a.protocol.stats.results.get("direct") == 1

                await wait_until(ended_at_a, 10.0)
                # freed by the RESULTs (alice's at A, bob's through B), long before the session's expiry
                assert loop.time() - opened < CONFIG.punch_window + CONFIG.relay_window
                assert b.protocol.stats.results == {"direct": 1}
                for peer_id, server in (("alice", a), ("bob", b)):
                    record = server.protocol.registry.get(peer_id)
                    assert record is not None and record.sessions == set()  # no slot left anywhere
                seen_a, seen_b = await scrape(metrics_a.address), await scrape(metrics_b.address)
                pair = (("nat_pair", "unknown/unknown"), ("outcome", "direct"))
                assert seen_a[("tcppunch_session_outcomes_total", pair)] == 1
                assert seen_a[("tcppunch_time_to_connect_seconds_count", ())] == 1
                assert 0 < seen_a[("tcppunch_time_to_connect_seconds_sum", ())] < connected - opened + 1
                assert ("tcppunch_session_outcomes_total", pair) not in seen_b  # B only passed bob's on
                mine.close()
                theirs.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_peers_relay_budget_holds_across_the_nodes_it_relays_through() -> None:
    """--relay-max-mb (1 MiB per peer id) in a cluster: alice (at A) and bob (at B) relay once through A
    (alice asks) and once through B (bob asks). The two relays share one budget per peer: the second
    carries exactly what the first left and ends at the limit (two nodes used to give two budgets). The
    counters in Redis show every byte once, unspent leases given back; the per-token budget (per hour)
    is counted for the cluster the same way."""
    budget = 1 << 20
    first_size, second_size = 600_000, 600_000

    async def relayed(sender: ControlChannel, receiver: ControlChannel, target: str, data: bytes) -> bytes:
        order = await sender.connect(target, relay_only=True)
        theirs = await receiver.next_order(timeout=5.0)
        (_, ws), (rr, wr) = await asyncio.gather(sender.open_relay(order, timeout=10.0),
                                                  receiver.open_relay(theirs, timeout=10.0))
        with contextlib.suppress(ConnectionError):  # the relay may cut the sender off at the limit
            ws.write(data)
            ws.write_eof()
            await ws.drain()
        wr.write_eof()
        got = await asyncio.wait_for(rr.read(), 20.0)
        for w in (ws, wr):
            w.close()
        return got

    async def main() -> None:
        with redis_server() as url:
            client = aioredis.from_url(url)
            async with node(url, budget) as a, node(url, budget) as b, \
                    ControlChannel(a.address, "alice", TOKEN) as alice, ControlChannel(b.address, "bob", TOKEN) as bob:

                async def counted(account: str, expected: int) -> None:
                    async def check() -> bool:
                        keys = [k async for k in client.scan_iter(f"tcppunch:relay:{account}*")]
                        return len(keys) == 1 and int(await client.get(keys[0]) or 0) == expected

                    await wait_until(check, 10.0)

                first = os.urandom(first_size)
                got = await relayed(alice, bob, "bob", first)  # through A
                assert hashlib.sha256(got).digest() == hashlib.sha256(first).digest()
                for account in ("peer:alice", "peer:bob", "token:shared"):
                    await counted(account, first_size)  # A gave its unspent leases back
                second = os.urandom(second_size)
                got = await relayed(bob, alice, "alice", second)  # through B
                left = budget - first_size
                assert len(got) == left and hashlib.sha256(got).digest() == hashlib.sha256(second[:left]).digest()
                for account in ("peer:alice", "peer:bob"):
                    await counted(account, budget)
                await counted("token:shared", budget)
                await wait_until(lambda: asyncio.sleep(0, bool(b.relay_stats)), 10.0)
                assert b.relay_stats[-1].reason is EndReason.LIMIT
                assert [s.a_to_b + s.b_to_a for s in (*a.relay_stats, *b.relay_stats)] == [first_size, left]
            await client.aclose()

    asyncio.run(asyncio.wait_for(main(), 90))


def test_ids_are_unique_across_the_cluster() -> None:
    async def main() -> None:
        with redis_server() as url:
            async with node(url) as a, node(url) as b, ControlChannel(a.address, "alice", TOKEN):
                with pytest.raises(CoordinatorError) as caught:
                    async with ControlChannel(b.address, "alice", TOKEN):
                        pass
                assert caught.value.code is ErrorCode.ID_TAKEN
                async with ControlChannel(b.address, "bob", TOKEN) as bob:
                    with pytest.raises(CoordinatorError) as unknown:
                        await bob.connect("nobody")
                    assert unknown.value.code is ErrorCode.UNKNOWN_PEER

    asyncio.run(main())


def test_a_dead_node_frees_its_ids_within_the_keepalive_timeout() -> None:
    async def main() -> None:
        with redis_server() as url:
            async with node(url) as b:
                a = new_node(url)
                await a.start()
                alice = ControlChannel(a.address, "alice", TOKEN)
                await alice.register()
                await die(a)
                await alice.wait_closed()
                died = asyncio.get_running_loop().time()

                async def registered_at_b() -> bool:
                    channel = ControlChannel(b.address, "alice", TOKEN)
                    try:
                        await channel.register()
                    except CoordinatorError as exc:
                        assert exc.code is ErrorCode.ID_TAKEN
                        return False
                    await channel.close()
                    return True

                await wait_until(registered_at_b, CONFIG.keepalive_timeout + 1.0)
                assert asyncio.get_running_loop().time() - died <= CONFIG.keepalive_timeout + 1.0

    asyncio.run(main())


def test_a_node_fails_fast_when_redis_does_not_answer() -> None:
    async def main() -> None:
        nobody = Endpoint("127.0.0.1", 1)  # a privileged port nothing listens on: refused at once
        cluster = RedisCluster(f"redis://{nobody}/0", ttl=3.0, refresh_interval=1.0)
        server = CoordinatorServer("127.0.0.1", 0, Tokens(shared=TOKEN), config=CONFIG, cluster=cluster)
        with pytest.raises(RedisError):
            await server.start()
        with pytest.raises(RuntimeError):
            _ = server.address  # it never listened

    asyncio.run(main())


def test_a_peer_fails_over_to_the_next_coordinator_and_connects_again() -> None:
    """alice (given A then B) at A, bob at B: a direct connect; A dies; the punched connection carries on,
    alice registers at B within the keepalive timeout + 1 s and connects to bob again."""
    async def main() -> None:
        with redis_server() as url:
            async with node(url) as b:
                a = new_node(url)
                await a.start()
                stages: list[tuple[str, dict[str, object]]] = []
                registered_again = asyncio.Event()

                def on_stage(stage: str, data: dict[str, object]) -> None:
                    stages.append((stage, data))
                    if stage == "registered" and data.get("coordinator") == str(b.address):
                        registered_again.set()

                async with Peer(b.address, "bob", TOKEN, detect_nat=False) as bob, \
                        Peer([a.address, b.address], "alice", TOKEN, detect_nat=False, on_stage=on_stage) as alice:
                    assert alice.coordinator == a.address
                    first, incoming = await asyncio.gather(alice.connect("bob"), bob.accept(timeout=15))
                    assert first.method is Method.DIRECT
                    died = asyncio.get_running_loop().time()
                    await die(a)
                    await asyncio.wait_for(registered_again.wait(), CONFIG.keepalive_timeout + 1.0)
                    assert asyncio.get_running_loop().time() - died <= CONFIG.keepalive_timeout + 1.0
                    assert alice.coordinator == b.address
                    # The punched connection never depended on A.
                    payload = os.urandom(100_000)
                    first.writer.write(payload)
                    await first.writer.drain()
                    assert await asyncio.wait_for(incoming.reader.readexactly(len(payload)), 10.0) == payload
                    second, incoming2 = await asyncio.gather(alice.connect("bob"), bob.accept(timeout=15))
                    second.writer.write(b"again")
                    second.writer.write_eof()
                    assert await asyncio.wait_for(incoming2.reader.read(), 10.0) == b"again"
                    for conn in (first, incoming, second, incoming2):
                        conn.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_while_redis_is_down_new_claims_fail_closed_and_held_ones_keep_working() -> None:
    """Redis is stopped (by PID) and restarted empty on the same port. Meanwhile: a new registration gets
    ``cluster-unavailable`` (also for an id live at another node, which a local grant would duplicate),
    registrations already held keep working, a connect within one node works (and its relay carries
    bytes) and one to another node's peer gets ``cluster-unavailable`` (not fatal). erin's node dies
    meanwhile: she is refused at B and retries with her back-off until Redis is back. Then every node
    claims its ids again, and new registrations and cross-node connects work."""
    async def main() -> None:
        with redis_process() as redis:
            url = redis.url
            async with node(url) as a, node(url) as b, ControlChannel(a.address, "alice", TOKEN) as alice, \
                    ControlChannel(a.address, "dan", TOKEN) as dan, ControlChannel(b.address, "bob", TOKEN) as bob:
                c = new_node(url)
                await c.start()
                registered_at_b = asyncio.Event()

                def on_stage(stage: str, data: dict[str, object]) -> None:
                    if stage == "registered" and data.get("coordinator") == str(b.address):
                        registered_at_b.set()

                async with Peer([c.address, b.address], "erin", TOKEN, detect_nat=False, on_stage=on_stage) as erin:
                    assert erin.coordinator == c.address
                    redis.stop()
                    for where, peer_id in ((a.address, "carol"), (a.address, "bob")):
                        with pytest.raises(CoordinatorError) as refused:
                            await ControlChannel(where, peer_id, TOKEN).register()
                        assert refused.value.code is ErrorCode.CLUSTER_UNAVAILABLE and refused.value.fatal
                    assert a.protocol.registry.get("bob") is None
                    # held registrations keep working; a connect within node A works
                    assert await alice.ping() >= 0 and await bob.ping() >= 0
                    order = await alice.connect("dan", relay_only=True)
                    theirs = await dan.next_order(timeout=5.0)
                    assert theirs.session_id == order.session_id
                    # ... and its relay carries bytes: budgets are leased locally while Redis is down
                    (_, wa), (rd, wd) = await asyncio.gather(alice.open_relay(order, timeout=10.0),
                                                             dan.open_relay(theirs, timeout=10.0))
                    payload = os.urandom(300_000)
                    wa.write(payload)
                    wa.write_eof()
                    wd.write_eof()
                    got = await asyncio.wait_for(rd.read(), 20.0)
                    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
                    wa.close()
                    wd.close()
                    with pytest.raises(CoordinatorError) as unreachable:
                        await alice.connect("bob")
                    assert unreachable.value.code is ErrorCode.CLUSTER_UNAVAILABLE and not unreachable.value.fatal
                    # erin's node dies: B refuses her while Redis is down, she backs off and tries again
                    await die(c)
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + 10.0
                    while b.protocol.stats.errors.get(ErrorCode.CLUSTER_UNAVAILABLE, 0) < 1 and loop.time() < deadline:
                        await asyncio.sleep(0.05)  # bounded polling: erin's retry runs in her own task
                    assert b.protocol.stats.errors.get(ErrorCode.CLUSTER_UNAVAILABLE, 0) >= 1
                    assert not registered_at_b.is_set()
                    redis.start()  # empty: every key is gone
                    await asyncio.wait_for(registered_at_b.wait(), 15.0)
                    assert erin.coordinator == b.address

                    client = aioredis.from_url(url)
                    try:
                        assert a.cluster is not None and b.cluster is not None
                        holders = {"alice": a.cluster.node, "dan": a.cluster.node, "bob": b.cluster.node,
                                   "erin": b.cluster.node}

                        async def reclaimed() -> bool:
                            owners = {p: await client.get(peer_key(p)) for p in holders}
                            return all(o is not None and o.startswith(holders[p].encode() + b"|")
                                       for p, o in owners.items())

                        await wait_until(reclaimed, 3 * CONFIG.keepalive_interval + 2.0)
                    finally:
                        await client.aclose()
                    async with ControlChannel(a.address, "carol", TOKEN):
                        pass
                    with pytest.raises(CoordinatorError) as taken:  # unique again
                        await ControlChannel(a.address, "bob", TOKEN).register()
                    assert taken.value.code is ErrorCode.ID_TAKEN
                    order = await alice.connect("bob", relay_only=True)  # B's subscription is back too
                    assert (await bob.next_order(timeout=5.0)).session_id == order.session_id

    asyncio.run(asyncio.wait_for(main(), 90))
