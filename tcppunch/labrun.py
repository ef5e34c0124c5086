"""Run tcppunch itself across a NAT lab: a coordinator on the lab server, peers on lab hosts, real bytes.

This is how the test suite and ``scripts/matrix.py`` prove connectivity claims on kernel NAT: every peer
runs the public :class:`tcppunch.peer.Peer` API in an event loop that lives in its host's namespace, the
coordinator (with STUN) runs the same way on the server, and each exchange checks SHA-256 both ways.
It sits above both the lab and the peer API; neither imports it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import hashlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from tcppunch.coordinator.auth import Tokens
from tcppunch.coordinator.server import CoordinatorServer
from tcppunch.coordinator.stun_service import StunService, StunServiceConfig
from tcppunch.lab import Lab, LabHost, NetnsLoop
from tcppunch.lab.topology import SERVER_ADDRESSES
from tcppunch.nat.detect import detect
from tcppunch.peer import ConnectFailed, Connection, ConnectionInfo, Method, Peer, RelayMode
from tcppunch.punch.plan import CandidateKind
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import NatReport, PortMappingProtocol

TOKEN = "lab-token"
COORDINATOR = Endpoint(SERVER_ADDRESSES[0], 3478)
_CHUNK = 256 * 1024


@dataclass
class PairResult:
    """One connect -> listen run between two lab hosts."""

    initiator: str
    responder: str
    method: Method | None
    ok: bool
    connect_seconds: float | None = None
    error: str | None = None
    attempts: list[str] = field(default_factory=list)
    relay_reason: str | None = None
    candidate: CandidateKind | None = None  # the kind of candidate a direct connection won through


class LabRunner:
    """A running coordinator on ``lab.server`` and one event loop per lab host, ready to pair peers."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.loops: dict[str, NetnsLoop] = {}
        self.nat: dict[str, NatReport] = {}
        self._server_loop: NetnsLoop | None = None
        self._stop: asyncio.Event | None = None
        self._serving: concurrent.futures.Future[None] | None = None
        self._ids = itertools.count(1)

    def __enter__(self) -> LabRunner:
        self._server_loop = NetnsLoop(self.lab.server.netns)
        started: asyncio.Future[None] = self._server_loop.loop.create_future()
        self._serving = self._server_loop.submit(self._serve(started))
        self._server_loop.run(_wait(started), timeout=15)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server_loop is not None and self._stop is not None:
            self._server_loop.loop.call_soon_threadsafe(self._stop.set)
            if self._serving is not None:
                with contextlib.suppress(Exception):
                    self._serving.result(15)
        for loop in [*self.loops.values(), *([self._server_loop] if self._server_loop else [])]:
            loop.close()

    async def _serve(self, started: asyncio.Future[None]) -> None:
        self._stop = asyncio.Event()
        a1, a2 = SERVER_ADDRESSES
        port = COORDINATOR.port
        config = StunServiceConfig(a1, port, a2, port + 1, external_tcp=frozenset({Endpoint(a1, port)}))
        async with StunService(config) as stun, CoordinatorServer(a1, port, Tokens(shared=TOKEN),
                                                                  stun_handler=stun.serve_tcp_connection) as coord:
            stun.on_binding = coord.stun_seen  # OBSERVED may name ports STUN saw (sequential NATs)
            started.set_result(None)
            await self._stop.wait()

    def loop(self, host: LabHost) -> NetnsLoop:
        if host.name not in self.loops:
            self.loops[host.name] = NetnsLoop(host.netns)
        return self.loops[host.name]

    def detect(self, host: LabHost) -> NatReport:
        """Measure (once) and remember the NAT of ``host`` as ``tcppunch detect`` would."""
        if host.name not in self.nat:
            self.nat[host.name] = self.loop(host).run(detect(server=COORDINATOR, timeout=2.0), timeout=30)
        return self.nat[host.name]

    def pair(self, a: LabHost, b: LabHost, *, size: int = 10_000_000, relay: RelayMode = RelayMode.AUTO,
             timeout: float = 60.0, port_mapping: bool | tuple[PortMappingProtocol, ...] = False) -> PairResult:
        """Fresh peers on ``a`` (connects) and ``b`` (listens); move ``size`` random bytes each way.
        ``port_mapping``: both peers ask their router for a mapping of their punch port first."""
        nat_a, nat_b = self.detect(a), self.detect(b)
        # Every peer of the run shares this one process: a garbage collection of the last pair's
        # buffers in the middle of this pair's fire time would make one side fire late (seen: 70 ms,
        # more than the lab's crossing window under the rst policy). Collect now, between pairs.
        gc.collect()
        n = next(self._ids)
        id_a, id_b = f"{a.name}-{n}-c", f"{b.name}-{n}-l"  # distinct even when a is b
        up, down = os.urandom(size), os.urandom(size)
        registered: concurrent.futures.Future[None] = concurrent.futures.Future()
        listener = self.loop(b).submit(_listen_once(id_b, nat_b, down, timeout, registered, port_mapping))
        try:
            outcome = self.loop(a).run(_connect_once(id_a, id_b, nat_a, up, relay, timeout, registered,
                                                     port_mapping),
                                       timeout=timeout + 10)
        except ConnectFailed as exc:
            listener.cancel()
            return PairResult(a.name, b.name, None, False, error=str(exc).splitlines()[0],
                              attempts=[str(x) for x in exc.attempts])
        got_up, info = outcome
        try:
            got_down = listener.result(timeout + 10)
        except Exception as exc:  # the listening side's failure, reported like the connecting side's
            return PairResult(a.name, b.name, info.method, False, error=f"listener: {exc}")
        ok = got_up == hashlib.sha256(down).digest() and got_down == hashlib.sha256(up).digest()
        return PairResult(a.name, b.name, info.method, ok, info.timings.get("total"),
                          attempts=[str(x) for x in info.attempts], relay_reason=info.relay_reason,
                          candidate=info.candidate)


async def _wait(future: asyncio.Future[None]) -> None:
    await future


async def _listen_once(peer_id: str, nat: NatReport, payload: bytes, timeout: float,
                       registered: concurrent.futures.Future[None],
                       port_mapping: bool | tuple[PortMappingProtocol, ...] = False) -> bytes:
    try:
        async with Peer(COORDINATOR, peer_id, TOKEN, nat=nat, port_mapping=port_mapping) as peer:
            registered.set_result(None)
            conn = await peer.accept(timeout=timeout)
            received, _ = await asyncio.gather(_read_digest(conn), _send(conn, payload))
            conn.close()
            await conn.wait_closed()
            return received
    except BaseException as exc:
        if not registered.done():
            registered.set_exception(exc)
        raise


async def _connect_once(peer_id: str, target: str, nat: NatReport, payload: bytes, relay: RelayMode,
                        timeout: float, target_registered: concurrent.futures.Future[None],
                        port_mapping: bool | tuple[PortMappingProtocol, ...] = False) -> tuple[bytes, ConnectionInfo]:
    await asyncio.wait_for(asyncio.wrap_future(target_registered), timeout)
    async with Peer(COORDINATOR, peer_id, TOKEN, nat=nat, relay=relay, port_mapping=port_mapping) as peer:
        conn = await peer.connect(target, timeout=timeout)
        received, _ = await asyncio.gather(_read_digest(conn), _send(conn, payload))
        conn.close()
        await conn.wait_closed()
        return received, conn.info


async def _send(conn: Connection, payload: bytes) -> None:
    view = memoryview(payload)
    for start in range(0, len(view), _CHUNK):
        conn.writer.write(view[start:start + _CHUNK])
        await conn.writer.drain()
    conn.writer.write_eof()


async def _read_digest(conn: Connection) -> bytes:
    digest = hashlib.sha256()
    while chunk := await conn.reader.read(_CHUNK):
        digest.update(chunk)
    return digest.digest()


@contextlib.contextmanager
def running(lab: Lab) -> Iterator[LabRunner]:
    with LabRunner(lab) as runner:
        yield runner
