"""``detect``: measure the NAT in front of this host and return a :class:`NatReport`.

Order matters, because a symmetric NAT with a sequential allocator hands out ports to every new flow of
the host (TCP and UDP alike): the mapping test, which also measures the allocation step, runs first and
alone from one local port: one exchange with the primary server (which names the other destinations),
then the other connections with their SYNs sent in a fixed order and their handshakes and requests
overlapping. Then everything else runs concurrently: the two filtering connect-backs (each from a fresh
local port), hairpinning, and pystun3's classic UDP test in its thread. With no network delay the whole
run takes about one connect-back timeout (the longer of two UDP test budgets) at most, well under a
second; on slow paths the UDP budget and the server's connect-back wait grow with the measured RTT.

``server`` is a ``tcppunch server`` (full test set). ``stun`` are plain STUN servers (coturn and the
like): they give the mapping test its destinations (their RFC 5780 OTHER-ADDRESS too, when they send
one) but cannot run our TCP filtering test, which is then listed in ``NatReport.untested``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from tcppunch.nat.ipv6 import probe_ipv6
from tcppunch.nat.local import LocalNetwork, local_network
from tcppunch.nat.sockets import family_of, reuse_port_socket, route_source_ip
from tcppunch.nat.tcp_tests import (
    MIN_AGREEING_STEPS,
    FilteringProbe,
    MappingObservation,
    StunTcpError,
    TcpStunConnection,
    classify_filtering,
    classify_mapping,
    filtering_probe,
    hairpin_test,
    mapped_endpoint,
    port_allocation_of,
    port_delta_of,
)
from tcppunch.nat.udp import UdpResult, classic_udp_nat_type
from tcppunch.nat.verdict import verdict
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import MappingBehaviour, NatReport, PortAllocation, TcpBehaviour
from tcppunch.wire.stun import AlternatePort, ChangeRequest, StunMessage

log = structlog.get_logger(__name__)


UDP_BUDGET_RTTS = 3


class ServerUnreachable(Exception):
    """The STUN server did not answer a Binding request over TCP (the message says why)."""


@dataclass
class DetectTimings:
    """Where the time went (seconds), for benchmarks and ``--log-level debug``."""

    mapping: float = 0.0
    concurrent: float = 0.0
    total: float = 0.0
    udp: float = 0.0


@dataclass
class _Run:
    primary: Endpoint
    local_ip: str
    timeout: float
    untested: list[str] = field(default_factory=list)


async def detect(
    server: Endpoint | None = None,
    stun: Sequence[Endpoint] = (),
    *,
    timeout: float = 3.0,
    udp: bool = True,
    udp_test_timeout: float = 0.2,
    timings: DetectTimings | None = None,
    ipv6_server: Endpoint | None = None,
) -> NatReport:
    """Measure this host's NAT against ``server`` (ours) and/or ``stun`` servers; return the report.

    Whether IPv6 works is checked at the same time against ``ipv6_server`` (the server's IPv6 endpoint;
    the primary server itself when that is an IPv6 one): see :func:`tcppunch.nat.ipv6.probe_ipv6`.

    ``timeout`` bounds each network step (connect, one STUN exchange, a connect-back); the UDP label
    gets ``udp_test_timeout`` per pystun3 test and ``timeout`` overall. Raises ServerUnreachable when
    the first server does not answer over TCP, ValueError when no server is given.
    """
    started = time.monotonic()
    primary = server if server is not None else (stun[0] if stun else None)
    if primary is None:
        raise ValueError("detect needs a --server or at least one --stun server")
    try:
        local_ip = route_source_ip(primary.ip)
    except OSError as exc:
        raise ServerUnreachable(f"no route to {primary}: {exc.strerror or exc}") from exc
    run = _Run(primary, local_ip, timeout)
    network = local_network()
    bound = log.bind(server=str(primary))
    if ipv6_server is None and family_of(primary.ip) == socket.AF_INET6:
        ipv6_server = primary
    ipv6_task = asyncio.ensure_future(probe_ipv6(network, ipv6_server, timeout))

    # 1. Mapping, alone and in a fixed order, from one local port.
    try:
        first = await TcpStunConnection.open(Endpoint(local_ip, 0), primary)
    except StunTcpError as exc:
        ipv6_task.cancel()
        raise ServerUnreachable(str(exc)) from exc
    connections = [first]
    tasks: list[asyncio.Future[Any]] = [ipv6_task]
    try:
        try:
            first_response = await first.request((), timeout)
            first_mapped = mapped_endpoint(first_response)
        except StunTcpError as exc:
            raise ServerUnreachable(str(exc)) from exc
        local_port = first.local.port
        observations = [MappingObservation(primary, first_mapped, order=0)]
        destinations = _mapping_destinations(run, server is not None, first_response, stun)
        opened = await TcpStunConnection.open_in_order(Endpoint(local_ip, local_port), destinations, timeout)
        connections += [c for c in opened if isinstance(c, TcpStunConnection)]
        answers = await asyncio.gather(*(_ask(c, timeout) for c in opened))
        for order, (destination, answer) in enumerate(zip(destinations, answers, strict=True), start=1):
            if isinstance(answer, StunTcpError):
                run.untested.append(f"mapping towards {destination} ({answer})")
            else:
                observations.append(MappingObservation(destination, answer, order=order))
        mapping_done = time.monotonic()
        public = observations[0].mapped
        mapping = classify_mapping(observations)
        allocation, delta = _allocation(run, mapping, observations)
        bound.debug("mapping_measured", observations=[(str(o.destination), str(o.mapped)) for o in observations])

        # 2. Everything else at once.
        other = first_response.other()
        alt_port = first_response.find(AlternatePort)
        stranger_task = other_port_task = None
        if server is not None and other is not None:
            stranger_task = asyncio.ensure_future(
                filtering_probe(local_ip, primary, ChangeRequest(change_ip=True, change_port=True), timeout)
            )
        if server is not None and (other is not None or alt_port is not None):
            other_port_task = asyncio.ensure_future(
                filtering_probe(local_ip, primary, ChangeRequest(change_port=True), timeout)
            )
        udp_task = None
        if udp and other is not None:  # the classic test needs CHANGED-ADDRESS: two server addresses
            # Each unanswered UDP test waits its budget: enough for a few round trips on slow paths.
            rtt = first.rtt or 0.0
            budget = min(max(udp_test_timeout, UDP_BUDGET_RTTS * rtt), timeout / 2)
            udp_task = asyncio.ensure_future(
                classic_udp_nat_type(
                    primary, per_test_timeout=budget, deadline=max(timeout, 4 * budget + 0.5), local_ip=local_ip
                )
            )
        tasks += [t for t in (stranger_task, other_port_task, udp_task) if t is not None]
        hairpin = await _hairpin(local_ip, local_port, public, min(timeout, 1.0))
        stranger = await stranger_task if stranger_task is not None else None
        other_port = await other_port_task if other_port_task is not None else None
        udp_result = await udp_task if udp_task is not None else None
        ipv6 = await ipv6_task
    finally:
        for task in tasks:
            task.cancel()  # no-op for finished ones; on error or cancellation nothing is left running
        for connection in connections:
            connection.close()

    filtering, syn = classify_filtering(stranger, other_port)
    _note_filtering(run, server is not None, stranger, other_port, other is not None)
    behind_nat = not network.owns(public.ip)
    udp_label = _udp_label(run, udp_result, other is not None, udp)
    tcp = TcpBehaviour(
        mapping=mapping,
        filtering=filtering,
        port_preservation=public.port == local_port,
        port_delta=delta,
        unsolicited_syn=syn,
        hairpin=hairpin,
        port_allocation=allocation,
    )
    untested = tuple(run.untested)
    report = NatReport(
        tcp=tcp,
        public=public,
        local=_local_addresses(network, local_ip),
        udp_nat_type=udp_label,
        behind_nat=behind_nat,
        verdict=verdict(tcp, behind_nat, untested),
        untested=untested,
        ipv6=ipv6,
    )
    finished = time.monotonic()
    if timings is not None:
        timings.mapping = mapping_done - started
        timings.concurrent = finished - mapping_done
        timings.total = finished - started
        timings.udp = udp_result.seconds if udp_result is not None else 0.0
    bound.debug("detect_done", seconds=round(finished - started, 3), report=report.to_json())
    return report


def _mapping_destinations(run: _Run, ours: bool, first: StunMessage, stun: Sequence[Endpoint]) -> list[Endpoint]:
    """Where the mapping test sends its further requests, in order: (A2,P1), (A1,P2), (A2,P2), extras."""
    primary = run.primary
    out: list[Endpoint] = []
    other = first.other()
    alt_port = first.find(AlternatePort)
    if other is not None:
        out += [Endpoint(other.ip, primary.port), Endpoint(primary.ip, other.port), Endpoint(other.ip, other.port)]
    elif alt_port is not None:
        out.append(Endpoint(primary.ip, alt_port.port))
    for extra in stun:
        if extra != primary and extra not in out:
            out.append(extra)
    if other is None and not ours and len(out) == 0:
        run.untested.append("mapping: the STUN server sent no OTHER-ADDRESS; give more --stun servers")
    return [d for d in out if d != primary]


def _allocation(
    run: _Run, mapping: MappingBehaviour | None, observations: Sequence[MappingObservation]
) -> tuple[PortAllocation | None, int | None]:
    """Port allocation and delta as far as the mapping lets them mean something; notes what it could not tell."""
    if mapping is None:
        run.untested.append(
            "mapping: needs answers from two server addresses (the server has one), so endpoint-independent "
            "and address-dependent mapping cannot be told apart"
        )
        return None, None
    if mapping is MappingBehaviour.ENDPOINT_INDEPENDENT:
        return PortAllocation.REUSED, 0
    allocation = port_allocation_of(observations)
    if allocation is PortAllocation.UNKNOWN:
        run.untested.append(
            f"port allocation: only one step between new public ports was seen, and a fixed step needs "
            f"{MIN_AGREEING_STEPS} agreeing steps to be told from random ports (a server with --alt-address "
            "gives three), so none is predicted"
        )
    return allocation, port_delta_of(observations)


async def _ask(connection: TcpStunConnection | StunTcpError, timeout: float) -> Endpoint | StunTcpError:
    if isinstance(connection, StunTcpError):
        return connection
    try:
        return mapped_endpoint(await connection.request((), timeout))
    except StunTcpError as exc:
        return exc


async def _hairpin(local_ip: str, local_port: int, public: Endpoint, timeout: float) -> bool | None:
    try:
        listener = reuse_port_socket(socket.SOCK_STREAM, Endpoint(local_ip, local_port))
        listener.listen(4)
    except OSError:
        return None
    try:
        return await hairpin_test(listener, public, local_ip, timeout)
    finally:
        with contextlib.suppress(OSError):
            listener.close()


def _note_filtering(
    run: _Run, ours: bool, stranger: FilteringProbe | None, other_port: FilteringProbe | None, two_addresses: bool
) -> None:
    if not ours:
        run.untested.append("filtering and unsolicited SYN: need a tcppunch server (--server) for the connect-back")
        return
    if not two_addresses:
        run.untested.append(
            "filtering: the server has one address, so endpoint-independent and address-dependent filtering "
            "cannot be told apart"
        )
    for probe in (stranger, other_port):
        if probe is not None and probe.error is not None:
            run.untested.append(f"filtering probe failed ({probe.error})")
        elif probe is not None and probe.outcome is None:
            run.untested.append("filtering: the server did not run the connect-back test")


def _udp_label(run: _Run, result: UdpResult | None, two_addresses: bool, asked: bool) -> str | None:
    if not asked:
        return None
    if not two_addresses:
        run.untested.append("UDP NAT type: the classic test needs a server with two addresses")
        return None
    if result is None or result.nat_type is None:
        run.untested.append(f"UDP NAT type ({result.error if result else 'not run'})")
        return None
    return result.nat_type


def _local_addresses(network: LocalNetwork, local_ip: str) -> tuple[str, ...]:
    addresses = list(network.addresses())
    if local_ip in addresses:  # the address detect used goes first: it is the one peers should try
        addresses.remove(local_ip)
        addresses.insert(0, local_ip)
    return tuple(addresses)
