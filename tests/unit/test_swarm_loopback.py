"""The swarm client (examples/swarm/client.py) end to end on loopback, without the lab: a real coordinator,
a seeder and three leechers in one event loop; and a peer that breaks the piece protocol is cut off with
a clear reason while the seeder keeps serving the others."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from examples.swarm.client import ClientConfig, SwarmClient
from examples.swarm.metainfo import Metainfo, create_metainfo
from examples.swarm.storage import PieceStore
from examples.swarm.wire import Bitfield, Decoder, Handshake, Message, Request, encode
from tcppunch.peer import Peer
from tests.loopback import loopback_coordinator

TOKEN = "swarm-loopback"


@contextlib.asynccontextmanager
async def coordinator() -> AsyncIterator[str]:
    async with loopback_coordinator(TOKEN) as where:
        yield str(where)


def _content(tmp_path: Path, size: int) -> tuple[Metainfo, bytes]:
    data = os.urandom(size)
    (tmp_path / "seed").mkdir()
    (tmp_path / "seed" / "f.bin").write_bytes(data)
    return create_metainfo(tmp_path / "seed" / "f.bin", swarm="loop", piece_size=16 * 1024), data


def _client(meta: Metainfo, where: str, peer_id: str, directory: Path, events: list[dict[str, Any]]
            ) -> SwarmClient:
    config = ClientConfig(where, peer_id, TOKEN, poll_interval=0.2, progress_interval=5.0, run_timeout=60)
    return SwarmClient(meta, PieceStore(meta, directory), config, lambda e: events.append({"peer": peer_id, **e}))


async def _all_pairs_connected(clients: list[SwarmClient]) -> None:
    while not all(sum(p.connections > 0 for p in c.pairs.values()) == len(clients) - 1 for c in clients):
        await asyncio.sleep(0.05)  # polling a condition, bounded by the caller's wait_for


def test_seeder_and_three_leechers_on_loopback(tmp_path: Path) -> None:
    meta, data = _content(tmp_path, 700_000)  # 43 pieces, the last one short
    events: list[dict[str, Any]] = []

    async def scenario() -> list[dict[str, Any]]:
        async with coordinator() as where:
            stop = asyncio.Event()
            clients = [_client(meta, where, "seed", tmp_path / "seed", events)]
            clients += [_client(meta, where, f"leech{i}", tmp_path / f"leech{i}", events) for i in range(3)]
            runs = [asyncio.create_task(c.run(stop)) for c in clients]
            await asyncio.wait_for(asyncio.gather(*(c.done.wait() for c in clients)), 30)
            # Pieces may all arrive before the last pair finished its (TLS) handshake: the pair checks
            # below need every pair connected, so wait for that too (bounded) before stopping.
            await asyncio.wait_for(_all_pairs_connected(clients), 15)
            stop.set()
            return list(await asyncio.wait_for(asyncio.gather(*runs), 15))

    stats = asyncio.run(asyncio.wait_for(scenario(), 60))
    digest = hashlib.sha256(data).digest()
    for i in range(3):
        assert hashlib.sha256((tmp_path / f"leech{i}" / "f.bin").read_bytes()).digest() == digest
        assert not (tmp_path / f"leech{i}" / "f.bin.part").exists()
    by_id = {s["id"]: s for s in stats}
    assert all(s["complete"] for s in stats)
    assert by_id["seed"]["downloaded"] == 0
    assert sum(s["downloaded"] for s in stats) == 3 * len(data) == sum(s["uploaded"] for s in stats)
    for s in stats:  # every pair connected exactly once, directly (loopback has no NAT)
        assert sorted(s["pairs"]) == sorted(set(by_id) - {s["id"]})
        assert all(p["connections"] == 1 and p["method"] == "direct" for p in s["pairs"].values())
        assert all(p["dialed"] == (s["id"] < other) for other, p in s["pairs"].items())  # the smaller id dials
    assert [e for e in events if e["event"] == "complete"] and not [e for e in events if e["event"] == "dial_failed"]


def test_a_peer_breaking_the_protocol_is_cut_off_and_the_seeder_keeps_serving(tmp_path: Path) -> None:
    meta, data = _content(tmp_path, 100_000)
    events: list[dict[str, Any]] = []

    async def scenario() -> None:
        async with coordinator() as where:
            stop = asyncio.Event()
            seeder = _client(meta, where, "seed", tmp_path / "seed", events)
            seeding = asyncio.create_task(seeder.run(stop))
            async with Peer(where, "rogue", TOKEN, swarm="loop") as rogue:
                for _ in range(100):  # bounded: the seeder registers within a few ms
                    if [p for p in await rogue.list_peers() if p.id == "seed"]:
                        break
                    await asyncio.sleep(0.05)
                conn = await asyncio.wait_for(rogue.open_stream("seed"), 15)
                conn.write(encode(Handshake(meta.info_hash, "rogue")) + b"\x00\x00\x00\x02\x09x")
                await conn.drain()
                # the seeder's handshake (sent first), no bitfield, then the end: it closed on us
                assert await asyncio.wait_for(conn.read(), 10) == encode(Handshake(meta.info_hash, "seed"))
                conn.close()
                # again, now breaking the rules once the link is live: a request for a piece that does not exist
                conn = await asyncio.wait_for(rogue.open_stream("seed"), 15)
                conn.write(encode(Handshake(meta.info_hash, "rogue")))
                decoder = Decoder(1 << 20)
                got: list[Message] = []
                for _ in range(100):  # bounded: the handshake and the bitfield come at once
                    got += decoder.feed(await asyncio.wait_for(conn.read(4096), 10))
                    if len(got) >= 2:
                        break
                assert isinstance(got[0], Handshake) and isinstance(got[1], Bitfield)
                conn.write(encode(Request(1_000_000)))
                assert await asyncio.wait_for(conn.read(), 10) == b""
                conn.close()
            leecher = _client(meta, where, "leech", tmp_path / "leech", events)
            leeching = asyncio.create_task(leecher.run(stop))
            await asyncio.wait_for(leecher.done.wait(), 20)
            stop.set()
            await asyncio.wait_for(asyncio.gather(seeding, leeching), 15)

    asyncio.run(asyncio.wait_for(scenario(), 60))
    # the garbage came in the same read as the handshake: refused before the link went live; then cut off
    cut = [e for e in events if e["event"] in ("rejected", "disconnected") and e["remote"] == "rogue"]
    assert [(e["peer"], e["event"], e["reason"]) for e in cut] == [
        ("seed", "rejected", "protocol error: unknown message type 9"),
        ("seed", "disconnected", "protocol error: request for piece 1000000; there are 7"),
    ]
    assert (tmp_path / "leech" / "f.bin").read_bytes() == data
