"""Ask the default gateway for an inbound TCP mapping: PCP, NAT-PMP and UPnP-IGD, probed in parallel.

The asyncio driver around the sans-I/O codecs in this package. :func:`probe` sends the three cheapest
questions at once (PCP ANNOUNCE, NAT-PMP external address, SSDP M-SEARCH to the gateway and the SSDP
group) and waits at most ``budget`` seconds (0.25 s by default, as Tailscale's portmapper does): a
home router answers in a few milliseconds or not at all. :class:`PortMapper` then maps with the first
protocol that answered (PCP before NAT-PMP before UPnP when they answer together), falling back to the
next on refusal, so the gateway ends up with one mapping, never two rules for one port. It renews the
mapping at half its lifetime and deletes it on close.

Nothing here raises on a silent or broken gateway: a probe that gets no answer just lists fewer
protocols, and a failed mapping is reported as :class:`PortMapError` with a :class:`PortMapErrorCode`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar
from urllib.parse import urlsplit

import structlog

from tcppunch.nat.local import local_network
from tcppunch.portmap import natpmp, pcp, upnp
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import PortMapping, PortMappingProtocol, PortMappingSupport

log = structlog.get_logger("tcppunch.portmap")
T = TypeVar("T")

PROBE_BUDGET = 0.25  # seconds to wait for the gateway's first answers
MAP_TIMEOUT = 2.0  # seconds for one mapping request (with retransmissions), per protocol
DEFAULT_LIFETIME = 7200  # seconds asked for; the gateway may grant less (PCP, NAT-PMP) or more
DESCRIPTION = "tcppunch"
TEST_LIFETIME = 60  # seconds: detect's test mapping, in case its delete is lost
_RETRANSMIT = 0.25  # first retransmission after 250 ms, then doubling (RFC 6886 section 3.1)
_PREFERENCE = (PortMappingProtocol.PCP, PortMappingProtocol.NAT_PMP, PortMappingProtocol.UPNP_IGD)


class PortMapErrorCode(StrEnum):
    """Why no mapping was granted."""

    NO_GATEWAY = "no-gateway"  # no default IPv4 gateway
    NO_ANSWER = "no-answer"  # no protocol answered within the budget
    REFUSED = "refused"  # every protocol that answered refused the mapping (the text says how)
    TIMEOUT = "timeout"  # a protocol answered the probe but not the mapping request


class PortMapError(Exception):
    def __init__(self, code: PortMapErrorCode, detail: str) -> None:
        self.code = code
        super().__init__(f"{code.value}: {detail}")


@dataclass(frozen=True)
class Gateway:
    """The gateway to ask, and our own address towards it (PCP and UPnP name the client by it)."""

    ip: str
    local_ip: str

    @classmethod
    def default(cls) -> Gateway | None:
        """The default IPv4 gateway (netifaces) and our address towards it; None without one."""
        gateway = local_network().default_gateway
        if gateway is None:
            return None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((gateway, pcp.SERVER_PORT))  # no packet leaves: this only picks the source address
            return cls(gateway, sock.getsockname()[0])


@dataclass(frozen=True)
class ProbeResult:
    """Which protocols answered, in the order their answers arrived; ``upnp_location`` is the SSDP
    LOCATION (the device description) when UPnP answered."""

    protocols: tuple[PortMappingProtocol, ...]
    upnp_location: str | None = None

    def preferred(self) -> list[PortMappingProtocol]:
        return sorted(self.protocols, key=_PREFERENCE.index)


# ----------------------------------------------------------------------------------------- UDP exchange
class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue(maxsize=64)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait((data, addr))


async def _exchange(targets: list[tuple[str, int]], request: bytes, parse: Callable[[bytes], T | None],
                    timeout: float, *, accept_from: str | None) -> T | None:
    """Send ``request`` to ``targets`` and retransmit (250 ms, doubling) until ``parse`` accepts an answer
    from ``accept_from`` (any source if None) or ``timeout`` passes. ``parse`` returns None or raises
    ValueError for datagrams to skip."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Datagrams, family=socket.AF_INET,
                                                           local_addr=("0.0.0.0", 0))
    deadline = loop.time() + timeout
    interval, next_send = _RETRANSMIT, loop.time()
    try:
        while (now := loop.time()) < deadline:
            if now >= next_send:
                for target in targets:
                    with contextlib.suppress(OSError):
                        transport.sendto(request, target)
                next_send, interval = now + interval, interval * 2
            try:
                data, addr = await asyncio.wait_for(proto.queue.get(), min(next_send, deadline) - now)
            except TimeoutError:
                continue
            if accept_from is not None and addr[0] != accept_from:
                continue
            with contextlib.suppress(ValueError):
                if (answer := parse(data)) is not None:
                    return answer
        return None
    finally:
        transport.close()


# ----------------------------------------------------------------------------------------- probing
async def probe(gateway: Gateway, budget: float = PROBE_BUDGET, *,
                protocols: tuple[PortMappingProtocol, ...] = _PREFERENCE, first_only: bool = False) -> ProbeResult:
    """Ask ``protocols`` at once; return who answered within ``budget`` seconds (``first_only``: return at
    the first answer, as a mapper that will use one protocol anyway does)."""
    order: list[PortMappingProtocol] = []
    location: list[str] = []

    async def pcp_probe() -> bool:
        def parse(data: bytes) -> bool | None:
            return pcp.parse_response(data).opcode is pcp.Opcode.ANNOUNCE or None
        return bool(await _exchange([(gateway.ip, pcp.SERVER_PORT)], pcp.announce_request(gateway.local_ip),
                                    parse, budget, accept_from=gateway.ip))

    async def natpmp_probe() -> bool:
        def parse(data: bytes) -> bool | None:
            return isinstance(natpmp.parse_response(data), natpmp.AddressResponse) or None
        return bool(await _exchange([(gateway.ip, natpmp.SERVER_PORT)], natpmp.external_address_request(),
                                    parse, budget, accept_from=gateway.ip))

    def gateway_location(data: bytes) -> str | None:
        # Only the gateway itself: another LAN device answering the search could point us anywhere.
        location = upnp.parse_search_response(data)
        return location if urlsplit(location).hostname == gateway.ip else None

    async def upnp_probe() -> bool:
        answer = await _exchange([(gateway.ip, upnp.SSDP_PORT), (upnp.SSDP_GROUP, upnp.SSDP_PORT)],
                                 upnp.search_request(), gateway_location, budget, accept_from=gateway.ip)
        if answer is not None:
            location.append(answer)
        return answer is not None

    asks = {PortMappingProtocol.PCP: pcp_probe, PortMappingProtocol.NAT_PMP: natpmp_probe,
            PortMappingProtocol.UPNP_IGD: upnp_probe}
    tasks = {asyncio.ensure_future(asks[p]()): p for p in protocols}
    pending = set(tasks)
    try:
        while pending and not (first_only and order):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            order += [tasks[t] for t in done if t.result()]
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return ProbeResult(tuple(order), location[0] if location else None)


# ----------------------------------------------------------------------------------------- one mapping
@dataclass
class _Held:
    """What it takes to renew or delete a mapping: the protocol's own handle on it."""

    mapping: PortMapping
    nonce: bytes = b""
    service: upnp.Service | None = None
    epoch: int | None = None  # the gateway's epoch time in its answer (PCP, NAT-PMP), and our clock then
    at: float = 0.0

    def gateway_lost_state(self, previous: _Held) -> bool:
        """RFC 6887 section 8.5 (and RFC 6886 section 3.6): an epoch that went back or fell behind our
        clock means the gateway restarted and forgot its mappings (our renewal has just re-created ours)."""
        if self.epoch is None or previous.epoch is None:
            return False
        return not pcp.epoch_consistent(previous.epoch, previous.at, self.epoch, self.at)


async def _pcp_map(gw: Gateway, internal_port: int, lifetime: int, nonce: bytes, suggested: int
                   ) -> tuple[_Held | None, str]:
    request = pcp.MapRequest(nonce, gw.local_ip, internal_port, lifetime, suggested_port=suggested)

    def parse(data: bytes) -> pcp.Response | None:
        response = pcp.parse_response(data)
        if response.opcode is not pcp.Opcode.MAP or (response.mapping is not None and response.mapping.nonce != nonce):
            return None
        return response

    response = await _exchange([(gw.ip, pcp.SERVER_PORT)], request.encode(), parse, MAP_TIMEOUT,
                               accept_from=gw.ip)
    if response is None:
        return None, "PCP: no answer to MAP"
    if not response.ok or response.mapping is None:
        return None, f"PCP: {response.result.name}"
    if lifetime == 0:
        return None, "deleted"
    m = response.mapping
    mapping = PortMapping(PortMappingProtocol.PCP, Endpoint(m.external_ip, m.external_port), internal_port,
                          response.lifetime)
    return _Held(mapping, nonce=nonce, epoch=response.epoch, at=time.monotonic()), ""


async def _natpmp_map(gw: Gateway, internal_port: int, lifetime: int, suggested: int
                      ) -> tuple[_Held | None, str]:
    def parse_map(data: bytes) -> natpmp.MapResponse | None:
        response = natpmp.parse_response(data)
        if isinstance(response, natpmp.MapResponse) and response.opcode is natpmp.Opcode.MAP_TCP:
            return response
        return None

    def parse_address(data: bytes) -> natpmp.AddressResponse | None:
        response = natpmp.parse_response(data)
        return response if isinstance(response, natpmp.AddressResponse) else None

    target = [(gw.ip, natpmp.SERVER_PORT)]
    mapped = await _exchange(target, natpmp.map_request(internal_port, lifetime, suggested), parse_map,
                             MAP_TIMEOUT, accept_from=gw.ip)
    if mapped is None:
        return None, "NAT-PMP: no answer to the mapping request"
    if mapped.result is not natpmp.ResultCode.SUCCESS:
        return None, f"NAT-PMP: {mapped.result.name}"
    if lifetime == 0:
        return None, "deleted"
    address = await _exchange(target, natpmp.external_address_request(), parse_address, MAP_TIMEOUT,
                              accept_from=gw.ip)
    if address is None or address.result is not natpmp.ResultCode.SUCCESS:
        return None, "NAT-PMP: mapped, but the gateway did not tell its external address"
    mapping = PortMapping(PortMappingProtocol.NAT_PMP, Endpoint(address.external_ip, mapped.external_port),
                          internal_port, mapped.lifetime)
    return _Held(mapping, epoch=mapped.epoch, at=time.monotonic()), ""


async def _http(url: str, request: bytes, timeout: float) -> bytes:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(request)
        await writer.drain()
        data = b""
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(16384):
                data += chunk
                if len(data) > upnp.MAX_HTTP:
                    raise upnp.UpnpParseError(f"answer from {host} exceeds {upnp.MAX_HTTP} bytes")
        return data
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _soap(service: upnp.Service, action: str, args: list[tuple[str, str]]) -> dict[str, str]:
    data = await _http(service.control_url, upnp.soap_request(service, action, args), MAP_TIMEOUT)
    return upnp.parse_soap_response(data, action)


async def upnp_service(location: str) -> upnp.Service:
    code, body = upnp.parse_http_body(await _http(location, upnp.http_get(location), MAP_TIMEOUT))
    if code != 200:
        raise upnp.UpnpParseError(f"device description: HTTP {code}")
    service = upnp.parse_description(body, location)
    if urlsplit(service.control_url).hostname != urlsplit(location).hostname:
        raise upnp.UpnpParseError(f"control URL {service.control_url[:100]} is not on the gateway")
    return service


async def _upnp_map(gw: Gateway, service: upnp.Service, internal_port: int, lifetime: int, suggested: int
                    ) -> tuple[PortMapping | None, str]:
    external_port = suggested or internal_port
    args = upnp.add_port_mapping_args(external_port, internal_port, gw.local_ip, lifetime, DESCRIPTION)
    try:
        await _soap(service, "AddPortMapping", args)
    except upnp.UpnpActionError as exc:
        if exc.code is upnp.UpnpErrorCode.ONLY_PERMANENT_LEASES_SUPPORTED:
            lifetime = 0  # permanent: we still delete it on close
            await _soap(service, "AddPortMapping", upnp.add_port_mapping_args(
                external_port, internal_port, gw.local_ip, 0, DESCRIPTION))
        elif exc.code is upnp.UpnpErrorCode.CONFLICT_IN_MAPPING_ENTRY and service.version >= 2:
            out = await _soap(service, "AddAnyPortMapping", args)
            external_port = int(out.get("NewReservedPort", "0") or 0)
        else:
            raise
    address = (await _soap(service, "GetExternalIPAddress", [])).get("NewExternalIPAddress", "")
    if not address or not 1 <= external_port <= 0xFFFF:
        return None, "UPnP: mapped, but no external address or port"
    return PortMapping(PortMappingProtocol.UPNP_IGD, Endpoint(address, external_port), internal_port,
                       lifetime), ""


# ----------------------------------------------------------------------------------------- the holder
class PortMapper:
    """Holds one TCP mapping of ``internal_port`` on the default gateway: get, renew, delete.

    >>> async with PortMapper(5000) as mapper:
    ...     mapping = await mapper.start()   # None if the gateway maps nothing (see mapper.error)

    ``on_change`` is called with the new mapping when a renewal brings a different external endpoint
    (or None when renewal failed and the mapping is gone).
    """

    def __init__(self, internal_port: int, *, gateway: Gateway | None = None, lifetime: int = DEFAULT_LIFETIME,
                 budget: float = PROBE_BUDGET, protocols: tuple[PortMappingProtocol, ...] = _PREFERENCE,
                 on_change: Callable[[PortMapping | None], None] | None = None) -> None:
        if not 1 <= internal_port <= 0xFFFF:
            raise ValueError("internal_port must be 1..65535")
        if lifetime < 1:
            raise ValueError("lifetime must be at least 1 s")
        self.internal_port = internal_port
        self.lifetime = lifetime
        self.budget = budget
        self.allowed = protocols
        self.gateway = gateway
        self.on_change = on_change
        self.probed: ProbeResult | None = None
        self.renewals = 0
        self.gateway_restarts = 0  # renewals whose epoch said the gateway had lost its state
        self.renewed = asyncio.Event()  # set after each successful renewal
        self.error: PortMapError | None = None
        self._held: _Held | None = None
        self._renewer: asyncio.Task[None] | None = None

    @property
    def mapping(self) -> PortMapping | None:
        return None if self._held is None else self._held.mapping

    async def __aenter__(self) -> PortMapper:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> PortMapping | None:
        """Probe, map with the best protocol that answered, start renewing; None (and ``error``) if none
        could map."""
        self.gateway = self.gateway or await asyncio.to_thread(Gateway.default)
        if self.gateway is None:
            self.error = PortMapError(PortMapErrorCode.NO_GATEWAY, "no default IPv4 gateway")
            return None
        started = time.monotonic()
        remaining, heard, reasons = list(self.allowed), list[PortMappingProtocol](), list[str]()
        location: str | None = None
        while remaining:
            # first round: stop at the first answer; later rounds (after a refusal): whoever else answers
            probed = await probe(self.gateway, self.budget, protocols=tuple(remaining), first_only=not heard)
            location = location or probed.upnp_location
            self.probed = ProbeResult(tuple(heard) + probed.protocols, location)
            if not probed.protocols:
                break
            for protocol in probed.preferred():
                heard.append(protocol)
                remaining.remove(protocol)
                held, why = await self._request(protocol, suggested=0)
                if held is not None:
                    return self._hold(held, started)
                reasons.append(why)
        if not heard:
            self.error = PortMapError(PortMapErrorCode.NO_ANSWER,
                                      f"no PCP, NAT-PMP or UPnP-IGD answer from {self.gateway.ip} "
                                      f"within {self.budget * 1000:.0f} ms")
        else:
            timeout_only = all("no answer" in r for r in reasons)
            self.error = PortMapError(PortMapErrorCode.TIMEOUT if timeout_only else PortMapErrorCode.REFUSED,
                                      "; ".join(reasons))
        return None

    def _hold(self, held: _Held, started: float) -> PortMapping:
        self._held = held
        self._renewer = asyncio.create_task(self._renew_loop(), name="portmap-renew")
        log.info("portmap.mapped", protocol=held.mapping.protocol.value, external=str(held.mapping.external),
                 internal_port=self.internal_port, lifetime=held.mapping.lifetime,
                 ms=round((time.monotonic() - started) * 1000))
        return held.mapping

    async def _request(self, protocol: PortMappingProtocol, suggested: int, lifetime: int | None = None,
                       held: _Held | None = None) -> tuple[_Held | None, str]:
        gw = self.gateway
        assert gw is not None
        life = self.lifetime if lifetime is None else lifetime
        try:
            if protocol is PortMappingProtocol.PCP:
                nonce = held.nonce if held is not None else os.urandom(pcp.NONCE_LENGTH)
                return await _pcp_map(gw, self.internal_port, life, nonce, suggested)
            if protocol is PortMappingProtocol.NAT_PMP:
                return await _natpmp_map(gw, self.internal_port, life, suggested)
            service = held.service if held is not None else None
            if service is None:
                assert self.probed is not None and self.probed.upnp_location is not None
                service = await upnp_service(self.probed.upnp_location)
            if life == 0:
                await _soap(service, "DeletePortMapping", upnp.delete_port_mapping_args(suggested))
                return None, "deleted"
            mapping, why = await _upnp_map(gw, service, self.internal_port, life, suggested)
            return (None if mapping is None else _Held(mapping, service=service)), why
        except (upnp.UpnpParseError, upnp.UpnpActionError, OSError, TimeoutError) as exc:
            return None, f"{protocol.value}: {exc}"

    async def _renew_loop(self) -> None:
        while self._held is not None:
            granted = self._held.mapping.lifetime
            await asyncio.sleep(max(1.0, granted / 2) if granted else 3600.0)
            old = self._held
            held, why = await self._request(old.mapping.protocol, old.mapping.external.port, held=old)
            if held is None:
                log.warning("portmap.renew_failed", protocol=old.mapping.protocol.value, reason=why)
                self._held = None
            else:
                if held.gateway_lost_state(old):
                    self.gateway_restarts += 1
                    log.warning("portmap.gateway_restarted", protocol=old.mapping.protocol.value,
                                epoch_before=old.epoch, epoch_now=held.epoch)
                self._held = held
                self.renewals += 1
                self.renewed.set()
            if self._held is None or self._held.mapping != old.mapping:
                log.info("portmap.changed", mapping=None if self._held is None else str(self._held.mapping.external))
                if self.on_change is not None and (self._held is None or
                                                   self._held.mapping.external != old.mapping.external):
                    self.on_change(self.mapping)

    async def close(self) -> None:
        """Stop renewing and delete the mapping (bounded: a gateway that went silent costs MAP_TIMEOUT)."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        held, self._held = self._held, None
        if held is None:
            return
        suggested = 0 if held.mapping.protocol is not PortMappingProtocol.UPNP_IGD else held.mapping.external.port
        _, why = await self._request(held.mapping.protocol, suggested, lifetime=0, held=held)
        log.info("portmap.deleted", protocol=held.mapping.protocol.value, external=str(held.mapping.external),
                 result=why)


async def start_checked(mapper: PortMapper, public_ip: str | None) -> PortMappingSupport:
    """Start ``mapper`` and describe the outcome for a NAT report. A mapping whose external address is not
    our public address (``public_ip``, when known) is useless, since another NAT (a carrier's) lies beyond the
    router: it is deleted again and the report says why."""
    mapping = await mapper.start()
    error = None if mapper.error is None else str(mapper.error)
    if mapping is not None and public_ip is not None and mapping.external.ip != public_ip:
        error = (f"the router mapped {mapping.external}, but our public address is {public_ip}: another NAT "
                 "beyond the router (a carrier's) does not forward it")
        await mapper.close()
        mapping = None
    protocols = () if mapper.probed is None else mapper.probed.protocols
    return PortMappingSupport(protocols, mapping, error)


async def check_gateway(public_ip: str | None, *, budget: float = PROBE_BUDGET) -> PortMappingSupport:
    """What ``tcppunch detect --port-mapping`` reports: which protocols the gateway answers (all three
    asked, ``budget`` seconds), and whether it grants a test mapping of a free local port (deleted again)."""
    gateway = await asyncio.to_thread(Gateway.default)
    if gateway is None:
        return PortMappingSupport(error=str(PortMapError(PortMapErrorCode.NO_GATEWAY, "no default IPv4 gateway")))
    heard = await probe(gateway, budget)
    if not heard.protocols:
        return PortMappingSupport(error=str(PortMapError(
            PortMapErrorCode.NO_ANSWER, f"no PCP, NAT-PMP or UPnP-IGD answer from {gateway.ip} "
                                        f"within {budget * 1000:.0f} ms")))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((gateway.local_ip, 0))  # holds the port while it is mapped, so nobody else gets it
        mapper = PortMapper(sock.getsockname()[1], gateway=gateway, budget=budget, lifetime=TEST_LIFETIME,
                            protocols=tuple(heard.preferred()))
        try:
            support = await start_checked(mapper, public_ip)
        finally:
            await mapper.close()
    return PortMappingSupport(heard.protocols, support.mapping, support.error)
