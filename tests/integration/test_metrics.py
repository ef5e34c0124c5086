"""server --metrics: scraped over HTTP on loopback, parsed with prometheus_client's own parser, after real
rendezvous (one direct, one relayed with bytes) and a refused registration."""

from __future__ import annotations

import asyncio
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcppunch.coordinator.auth import Tokens
from tcppunch.coordinator.control import ControlChannel, CoordinatorError
from tcppunch.coordinator.metrics import MetricsEndpoint
from tcppunch.coordinator.server import CoordinatorServer
from tcppunch.wire.coord import Outcome
from tcppunch.wire.endpoint import Endpoint

TOKEN = "metrics-test-token"


async def scrape(where: Endpoint) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reader, writer = await asyncio.open_connection(where.ip, where.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 10.0)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_after_a_direct_and_a_relayed_rendezvous() -> None:
    async def main() -> None:
        async with CoordinatorServer("127.0.0.1", 0, Tokens(shared=TOKEN)) as server, \
                MetricsEndpoint(Endpoint("127.0.0.1", 0), server) as metrics, \
                ControlChannel(server.address, "alice", TOKEN) as alice, \
                ControlChannel(server.address, "bob", TOKEN) as bob:
            with pytest.raises(CoordinatorError):
                await ControlChannel(server.address, "mallory", "wrong").register()
            # 1: both report direct.
            order = await alice.connect("bob")
            theirs = await bob.next_order(timeout=5.0)
            await alice.report_result(order.session_id, Outcome.DIRECT)
            await bob.report_result(theirs.session_id, Outcome.DIRECT)
            # 2: relayed, 300 kB each way.
            order2 = await alice.connect("bob", relay_only=True)
            theirs2 = await bob.next_order(timeout=5.0)
            (ra, wa), (rb, wb) = await asyncio.gather(alice.open_relay(order2, timeout=10.0),
                                                      bob.open_relay(theirs2, timeout=10.0))
            during = await scrape(metrics.address)
            data = os.urandom(300_000)
            wa.write(data)
            wa.write_eof()
            wb.write(data)
            wb.write_eof()
            got = await asyncio.wait_for(asyncio.gather(rb.read(), ra.read()), 10.0)
            assert got == [data, data]
            wa.close()
            wb.close()
            await alice.ping()  # the server handled alice's frames so far
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10.0
            while server.relay_bytes_total == 0 and loop.time() < deadline:
                await asyncio.sleep(0.02)  # the relay pump ends on its own task after both EOFs
            after = await scrape(metrics.address)

        assert during[("tcppunch_active_relays", ())] == 1
        assert after[("tcppunch_active_relays", ())] == 0
        assert after[("tcppunch_registered_peers", ())] == 2
        assert after[("tcppunch_rendezvous_total", ())] == 2
        assert after[("tcppunch_registrations_total", ())] == 2
        pair = ("nat_pair", "unknown/unknown")
        assert after[("tcppunch_session_outcomes_total", (pair, ("outcome", "direct")))] == 1
        assert after[("tcppunch_session_outcomes_total", (pair, ("outcome", "relay")))] == 1
        assert after[("tcppunch_time_to_connect_seconds_count", ())] == 2
        assert after[("tcppunch_time_to_connect_seconds_bucket", (("le", "+Inf"),))] == 2
        assert 0 < after[("tcppunch_time_to_connect_seconds_sum", ())] < 10
        assert after[("tcppunch_relay_bytes_total", ())] == 600_000
        assert after[("tcppunch_refused_total", (("reason", "bad-token"),))] == 1

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_endpoint_refuses_other_methods_and_survives_garbage() -> None:
    async def main() -> None:
        async with CoordinatorServer("127.0.0.1", 0, Tokens(shared=TOKEN)) as server, \
                MetricsEndpoint(Endpoint("127.0.0.1", 0), server) as metrics:
            reader, writer = await asyncio.open_connection(metrics.address.ip, metrics.address.port)
            writer.write(b"POST / HTTP/1.1\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 10.0)).startswith(b"HTTP/1.1 405")
            writer.close()
            reader, writer = await asyncio.open_connection(metrics.address.ip, metrics.address.port)
            writer.write(b"x" * 10_000)  # no end of headers within the limit
            assert await asyncio.wait_for(reader.read(), 10.0) == b""
            writer.close()
            assert (await scrape(metrics.address))[("tcppunch_registered_peers", ())] == 0

    asyncio.run(asyncio.wait_for(main(), 60))
