"""The VPN between two peers: one TUN interface each, IP packets in one stream of the pair's session.

Both sides run the same :class:`Tunnel`. The side whose id sorts first opens the stream (with a short
magic, so that the other side knows it is a VPN stream and not someone's netcat), the other accepts it;
there is exactly one VPN stream per pair at a time. While a stream carries packets, the interface is up;
when the stream or its session dies, the interface goes down (its routes with it, so traffic fails fast
instead of queueing) and the opener sets up a new session with back-off. When the new stream arrives, the
interface comes back up and the routes are restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from tcppunch.peer import ConnectFailed, Peer
from tcppunch.session.driver import MuxStream
from tcppunch.vpn import iface
from tcppunch.vpn.link import LinkStats, carry
from tcppunch.vpn.packets import DropQueue
from tcppunch.vpn.tun import Tun

log = structlog.get_logger()

# Version 2: vnet-header packets (offloads on, see tcppunch.vpn.tun) in uint32-length frames.
MAGIC = b"TPVPN2\n"
MAGIC_TIMEOUT = 10.0
RETRY_FIRST = 0.5
RETRY_MAX = 10.0
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass
class TunnelState:
    """What the tunnel is doing now, for progress lines and tests."""

    up: bool = False
    links: int = 0  # streams that carried packets so far
    last_reason: str = ""
    path: str = ""  # direct | relay of the session carrying the stream
    stats: LinkStats = field(default_factory=LinkStats)


class Tunnel:
    """Packets between ``tun`` (configured with ``address``, ``routes``) and ``other`` over ``peer``."""

    def __init__(
        self,
        peer: Peer,
        other: str,
        tun: Tun,
        address: Address,
        *,
        routes: Sequence[Network] = (),
        mtu: int = 1400,
        queue_packets: int = 256,
        queue_bytes: int = 256 * 1024,
        on_change: Callable[[TunnelState], None] | None = None,
    ) -> None:
        if other == peer.peer_id:
            raise ValueError("the VPN peer must be another id")
        self.peer = peer
        self.other = other
        self.tun = tun
        self.address = address
        self.routes = tuple(routes)
        self.mtu = mtu
        self.state = TunnelState()
        self.opener = peer.peer_id < other
        # A few TSO segments or a few hundred small packets: milliseconds of traffic, never seconds.
        self._queue = DropQueue(max_packets=queue_packets, max_bytes=queue_bytes)
        self._on_change = on_change
        self._up_event = asyncio.Event()
        self._log = log.bind(peer=peer.peer_id, remote_peer=other, interface=tun.name)

    async def wait_up(self, timeout: float | None = None) -> None:
        """Until a stream carries packets (for tests and scripts)."""
        await asyncio.wait_for(self._up_event.wait(), timeout)

    async def run(self) -> None:
        """Configure the interface (down until the first stream), then carry streams one after the other
        until cancelled."""
        iface.configure(self.tun.name, self.address, self.mtu, self.routes)
        iface.set_up(self.tun.name, False)
        retry = RETRY_FIRST
        while True:
            stream = await (self._open() if self.opener else self._accept())
            if stream is None:
                await asyncio.sleep(retry)  # back-off between failed attempts to reach the other side
                retry = min(retry * 2, RETRY_MAX)
                continue
            retry = RETRY_FIRST
            await self._carry(stream)

    async def _carry(self, stream: MuxStream) -> None:
        self._set(True, f"stream to {self.other} open")
        try:
            reason = await carry(self.tun, stream, stream, queue=self._queue, stats=self.state.stats)
        finally:
            with contextlib.suppress(ConnectionError):
                stream.close()
        self._set(False, reason)

    def _set(self, up: bool, reason: str) -> None:
        iface.set_up(self.tun.name, up)
        if up:
            iface.restore_routes(self.tun.name, self.routes)
            self.state.links += 1
            self._up_event.set()
        else:
            self._up_event.clear()
        self.state.up, self.state.last_reason = up, reason
        session = self.peer.sessions()
        self.state.path = next((s.session.path for s in session if s.peer == self.other), "")
        self._log.info("vpn.up" if up else "vpn.down", reason=reason, path=self.state.path)
        if self._on_change is not None:
            self._on_change(self.state)

    async def _open(self) -> MuxStream | None:
        try:
            return await self.peer.open_stream(self.other, MAGIC)
        except (ConnectFailed, ConnectionError, TimeoutError) as exc:
            self._note_failure(f"cannot reach {self.other}: {exc}")
            return None

    async def _accept(self) -> MuxStream | None:
        while True:
            stream = await self.peer.accept_stream()
            if stream.peer != self.other:
                self._log.info("vpn.stream_refused", stream_peer=stream.peer)
                stream.reset()
                continue
            try:
                magic = await asyncio.wait_for(stream.readexactly(len(MAGIC)), MAGIC_TIMEOUT)
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                stream.reset()
                continue
            if magic != MAGIC:
                self._log.info("vpn.not_a_vpn_stream")
                stream.reset()
                continue
            return stream

    def _note_failure(self, reason: str) -> None:
        self.state.last_reason = reason
        self._log.info("vpn.unreachable", reason=reason)
        if self._on_change is not None:
            self._on_change(self.state)
