"""Port mapping against a real miniupnpd on a lab router: a host behind symmetric-random gets an inbound
TCP mapping over each of PCP, NAT-PMP and UPnP-IGD; a host behind a port-restricted router connects to
the mapped endpoint and bytes arrive intact (SHA-256); closing the mapper removes miniupnpd's rule.
Behind cgnat the home router's miniupnpd refuses (its carrier layer filters), and the client says so."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tcppunch.lab import Lab, LabHost, LabSpec, RouterSpec
from tcppunch.lab import netns as ns
from tcppunch.lab.topology import lan_gateway
from tcppunch.labrun import LabRunner
from tcppunch.peer import Method
from tcppunch.portmap import Gateway, PortMapErrorCode, PortMapper, ProbeResult, probe
from tcppunch.punch.plan import CandidateKind
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import PortMapping, PortMappingProtocol

PAYLOAD = os.urandom(200_000)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    spec = LabSpec([RouterSpec.parse("rnd=symmetric-random+upnp"), RouterSpec.parse("pr=port-restricted"),
                    RouterSpec.parse("cgn=cgnat+upnp")])
    with Lab(spec) as running:
        yield running


def _miniupnpd_rules(lab: Lab, router: str) -> str:
    netns = lab.routers[router].netns
    assert netns is not None
    return ns.run(ns.in_netns(netns, ["nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd"]))


async def _serve_once(port: int, ready: asyncio.Event) -> bytes:
    """Accept one connection on ``port``, echo the SHA-256 of what arrives, return what arrived."""
    got = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(hashlib.sha256(data).digest())
        await writer.drain()
        writer.close()
        if not got.done():
            got.set_result(data)

    server = await asyncio.start_server(handle, "0.0.0.0", port, reuse_port=True)
    ready.set()
    async with server:
        return await asyncio.wait_for(got, 20)


def _send_to(endpoint: Endpoint) -> bytes:
    with socket.create_connection((endpoint.ip, endpoint.port), timeout=10) as sock:
        sock.sendall(PAYLOAD)
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(64)


def _map_and_connect(lab: Lab, protocol: PortMappingProtocol, port: int) -> PortMapping:
    mapped_host, client = lab.host("rnd"), lab.host("pr")
    with mapped_host.event_loop() as loop:
        mapper = PortMapper(port, protocols=(protocol,), lifetime=600)
        mapping = loop.run(mapper.start())
        assert mapping is not None, mapper.error
        try:
            assert mapping.protocol is protocol
            assert mapping.external.ip == lab.routers["rnd"].wan_address
            assert f"dnat ip to {mapped_host.address}:{port}" in _miniupnpd_rules(lab, "rnd")
            ready = asyncio.Event()
            served = loop.submit(_serve_once(port, ready))
            loop.run(asyncio.wait_for(ready.wait(), 5))
            digest = client.call(_send_to, mapping.external)
            assert served.result(20) == PAYLOAD
            assert digest == hashlib.sha256(PAYLOAD).digest()
        finally:
            loop.run(mapper.close())
    assert f"{mapped_host.address}:{port}" not in _miniupnpd_rules(lab, "rnd"), "mapping left behind"
    return mapping


@pytest.mark.parametrize("protocol, port", [(PortMappingProtocol.PCP, 41001), (PortMappingProtocol.NAT_PMP, 41002),
                                            (PortMappingProtocol.UPNP_IGD, 41003)])
def test_mapping_reaches_host_behind_symmetric_random(lab: Lab, protocol: PortMappingProtocol, port: int) -> None:
    mapping = _map_and_connect(lab, protocol, port)
    assert mapping.internal_port == port and mapping.lifetime > 0


def test_probe_hears_all_three_and_mapper_takes_the_first(lab: Lab) -> None:
    with lab.host("rnd").event_loop() as loop:
        async def probe_in_netns() -> ProbeResult:
            gw = Gateway.default()  # on the loop's thread, inside the host's namespace
            assert gw is not None and gw.local_ip == lab.host("rnd").address
            return await probe(gw)

        full = loop.run(probe_in_netns())
        assert set(full.protocols) == set(PortMappingProtocol)
        assert full.upnp_location == f"http://{lan_gateway(lab.routers['rnd'].index)}:5000/rootDesc.xml"
        mapper = PortMapper(41010)
        mapping = loop.run(mapper.start())
        try:
            assert mapper.probed is not None and mapping is not None
            # the first round stops at the first answer; answers that came in together are taken in
            # order of preference (PCP, NAT-PMP, UPnP-IGD), so arrival order alone does not decide
            assert mapping.protocol is mapper.probed.preferred()[0]
        finally:
            loop.run(mapper.close())


def test_mapping_renewed_at_half_lifetime_and_after_a_router_reboot(lab: Lab) -> None:
    """Ask for 4 s (the lab's miniupnpd minimum): the mapper renews at ~2 s with a consistent epoch; then
    the router "reboots" (miniupnpd restarted, its rules gone): the next renewal sees the epoch start
    again (RFC 6887 section 8.5), counts a gateway restart, and its request has put the rule back."""
    rule = f"{lab.host('rnd').address}:41013"
    with lab.host("rnd").event_loop() as loop:
        mapper = PortMapper(41013, protocols=(PortMappingProtocol.PCP,), lifetime=4)

        async def renewal() -> None:
            mapper.renewed.clear()
            await asyncio.wait_for(mapper.renewed.wait(), 10)

        try:
            mapping = loop.run(mapper.start())
            assert mapping is not None and mapping.lifetime == 4
            loop.run(renewal())
            assert mapper.renewals == 1 and mapper.gateway_restarts == 0 and mapper.mapping == mapping
            # the reboot in two steps, so that the rule is seen gone before a renewal (every ~2 s) can
            # reach the new miniupnpd and put it back
            lab.stop_miniupnpd("rnd")
            assert rule not in _miniupnpd_rules(lab, "rnd")
            lab.start_miniupnpd("rnd")
            loop.run(renewal())
            assert mapper.gateway_restarts == 1 and mapper.mapping is not None
            assert rule in _miniupnpd_rules(lab, "rnd")
        finally:
            loop.run(mapper.close())


def test_no_gateway_answer_without_miniupnpd(lab: Lab) -> None:
    with lab.host("pr").event_loop() as loop:
        mapper = PortMapper(41011)
        assert loop.run(mapper.start()) is None
        assert mapper.error is not None and mapper.error.code is PortMapErrorCode.NO_ANSWER


def test_cgnat_home_router_refuses(lab: Lab) -> None:
    """The home router's miniupnpd answers, but its STUN check found the carrier's filter: no mapping."""
    host: LabHost = lab.host("cgn")
    assert "Port forwarding is now disabled" in lab.miniupnpd_log("cgn")
    with host.event_loop() as loop:
        mapper = PortMapper(41012)
        assert loop.run(mapper.start()) is None
        assert mapper.probed is not None and mapper.probed.protocols
        assert mapper.error is not None and mapper.error.code is PortMapErrorCode.REFUSED, mapper.error


# ------------------------------------------------------------------ through the peer API
@pytest.fixture(scope="module")
def runner(lab: Lab) -> Iterator[LabRunner]:
    with LabRunner(lab) as running:
        yield running


@pytest.mark.parametrize("protocol", list(PortMappingProtocol))
def test_peer_behind_port_restricted_connects_direct_through_the_mapping(
        lab: Lab, runner: LabRunner, protocol: PortMappingProtocol) -> None:
    """symmetric-random vs port-restricted is relay-only without a mapping; with one it is direct, the
    winning candidate is the mapping, and the mapping is gone once the peers closed."""
    result = runner.pair(lab.host("pr"), lab.host("rnd"), size=1_000_000, port_mapping=(protocol,))
    assert result.ok, result
    assert result.method is Method.DIRECT and result.candidate is CandidateKind.MAPPED, result
    assert lab.host("rnd").address not in _miniupnpd_rules(lab, "rnd"), "mapping left behind"


def test_mapped_side_connecting_is_direct_too(lab: Lab, runner: LabRunner) -> None:
    result = runner.pair(lab.host("rnd"), lab.host("pr"), size=1_000_000, port_mapping=True)
    assert result.ok and result.method is Method.DIRECT and result.candidate is CandidateKind.MAPPED, result


# ------------------------------------------------------------------ tcppunch detect --port-mapping
def _detect_json(lab: Lab, host: str) -> dict[str, Any]:
    done = lab.host(host).run([sys.executable, "-m", "tcppunch", "detect", "--server", "198.51.100.10:3478",
                               "--json", "--no-udp", "--port-mapping"], timeout=60)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_detect_reports_port_mapping(lab: Lab, runner: LabRunner) -> None:
    report = _detect_json(lab, "rnd")
    assert {"udp", "tcp", "public", "local", "behind_nat", "verdict", "untested"} <= set(report)  # still there
    support = report["port_mapping"]
    assert set(support["protocols"]) == {"pcp", "nat-pmp", "upnp-igd"}
    assert support["mapping"]["external"]["ip"] == lab.routers["rnd"].wan_address and support["error"] is None
    assert lab.host("rnd").address not in _miniupnpd_rules(lab, "rnd"), "test mapping left behind"
    cgnat = _detect_json(lab, "cgn")["port_mapping"]
    assert cgnat["protocols"] and cgnat["mapping"] is None and "refused" in cgnat["error"]
    none = _detect_json(lab, "pr")["port_mapping"]
    assert none["protocols"] == [] and "no-answer" in none["error"]
