"""``tcppunch server --metrics ADDR:PORT``: the coordinator's figures in the Prometheus text format.

A :class:`prometheus_client` collector reads the server's counters when scraped (nothing is counted
twice, and the hot path only bumps the sans-I/O core's own :class:`~.protocol.Stats`), and a small
asyncio HTTP endpoint on the server's own loop answers ``GET`` with them, so a scrape never reads the
registry from another thread.

Exported: ``tcppunch_registered_peers``, ``tcppunch_registrations_total``, ``tcppunch_rendezvous_total``
(sessions opened; ``rate()`` of it is rendezvous/s), ``tcppunch_session_outcomes_total{outcome,nat_pair}``
(direct, relay, failed; one per session), ``tcppunch_time_to_connect_seconds`` (CONNECT to the first
direct RESULT or to the relay pairing), ``tcppunch_relay_bytes_total`` (counted when a relay ends),
``tcppunch_active_relays`` and ``tcppunch_refused_total{reason}`` (every ERROR the server sent, by code).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from tcppunch.wire.endpoint import Endpoint

from .protocol import CONNECT_BUCKETS
from .server import CoordinatorServer

log = structlog.get_logger()

# A scrape request's line and headers must arrive within this, and fit in MAX_REQUEST bytes.
REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192


class CoordinatorCollector(Collector):
    """Reads one :class:`CoordinatorServer`'s counters at scrape time."""

    def __init__(self, server: CoordinatorServer) -> None:
        self.server = server

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        protocol = self.server.protocol
        stats = protocol.stats
        yield GaugeMetricFamily("tcppunch_registered_peers", "Peers registered at this coordinator.",
                                value=len(protocol.registry))
        yield CounterMetricFamily("tcppunch_registrations", "Registrations accepted.", value=stats.registrations)
        yield CounterMetricFamily("tcppunch_rendezvous", "Punch sessions opened (CONNECT answered by PUNCH).",
                                  value=stats.sessions)
        outcomes = CounterMetricFamily("tcppunch_session_outcomes", "Sessions by outcome and NAT type pair "
                                       "(initiator/responder).", labels=["outcome", "nat_pair"])
        for (outcome, pair), count in sorted(dict(stats.outcomes).items()):
            outcomes.add_metric([outcome, pair], count)
        yield outcomes
        cumulative, buckets = 0, []
        for bound, count in zip((*CONNECT_BUCKETS, float("inf")), list(stats.connect_seconds), strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily("tcppunch_time_to_connect_seconds", "From CONNECT to the first direct "
                                    "RESULT, or to the relay pairing.", buckets=buckets,
                                    sum_value=stats.connect_seconds_sum)
        yield CounterMetricFamily("tcppunch_relay_bytes", "Bytes carried by relays (counted when a relay ends).",
                                  value=self.server.relay_bytes_total)
        yield GaugeMetricFamily("tcppunch_active_relays", "Relays carrying bytes now.",
                                value=protocol.running_relays())
        refused = CounterMetricFamily("tcppunch_refused", "Requests and connections refused, by error code.",
                                      labels=["reason"])
        for reason, count in sorted(dict(stats.errors).items()):
            refused.add_metric([str(reason)], count)
        yield refused


class MetricsEndpoint:
    """HTTP on ``listen``: any ``GET`` gets the metrics; anything else 405. One request per connection."""

    def __init__(self, listen: Endpoint, server: CoordinatorServer) -> None:
        self.listen = listen
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(CoordinatorCollector(server))
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> Endpoint:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the metrics endpoint is not started")
        ip, port = self._server.sockets[0].getsockname()[:2]
        return Endpoint(str(ip), int(port))

    async def __aenter__(self) -> MetricsEndpoint:
        self._server = await asyncio.start_server(self._serve, self.listen.ip, self.listen.port, reuse_address=True,
                                                  limit=MAX_REQUEST)
        log.info("metrics.listening", address=str(self.address))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method = head.split(b" ", 1)[0]
            if method != b"GET":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
            else:
                body = generate_latest(self.registry)
                writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
                             f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
            pass  # a client that sent no complete request in time, or went away: nothing to answer
        finally:
            writer.close()
