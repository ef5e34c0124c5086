"""TCP behaviour tests against STUN over TCP: mapping, port allocation, filtering, hairpinning.

What matters for TCP hole punching has to be measured over TCP: a NAT may treat UDP and TCP
differently, and TCP brings its own question (what happens to an unsolicited SYN).

* Mapping (RFC 5780 section 4.3, over TCP): from ONE local port (SO_REUSEADDR + SO_REUSEPORT), Binding
  requests to (A1,P1), then (A2,P1), (A1,P2), (A2,P2), their SYNs sent in that order. Same public
  endpoint everywhere: endpoint-independent. Same per server address but different across addresses:
  address-dependent. Different for another port of the same address: address-and-port-dependent.
* Port preservation: the public port equals the local port.
* Port delta: the step between the public ports of consecutive new mappings; 0 when the mapping is
  reused, k for a sequential allocator (two or more steps agree), None when the steps disagree (random)
  or when only one step was seen (unknown: any two ports are "a step" apart).
* Filtering (ours, see tcppunch.coordinator.stun_service): from a fresh local port that talks only to
  (A1,P1), listen on that port and ask the server to connect back from (A2,P2) (a stranger address) and,
  from another fresh port, from (A1,P2) (a known address, another port). What gets in tells the filter:
  both -> endpoint-independent, only the known address -> address-dependent, neither ->
  address-and-port-dependent. A refused connect-back means the NAT answers unsolicited SYNs with RST, a
  timed-out one that it drops them.
* Hairpin: connect to our own public endpoint and see whether our listener gets the connection.

The classification functions are pure; the probes are thin asyncio code around reuse-port sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from tcppunch.nat.retry import ConnectBudget, ConnectRetryError, connect_retrying
from tcppunch.nat.sockets import endpoint_of, reuse_port_socket, smoothed_rtt
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import FilteringBehaviour, MappingBehaviour, PortAllocation, SynResponse
from tcppunch.wire.stun import (
    Attribute,
    ChangeRequest,
    ConnectBackOutcome,
    ConnectBackResult,
    MessageClass,
    StunErrorCode,
    StunMessage,
    StunParseError,
    StunStreamDecoder,
    binding_request,
    encode_message,
)


class StunTcpError(Exception):
    """A STUN-over-TCP exchange failed (connect, timeout, closed, malformed or error response)."""


# ------------------------------------------------------------------------------------- the client


class TcpStunConnection:
    """One TCP connection to a STUN server from a chosen local endpoint, carrying Binding requests."""

    def __init__(self, sock: socket.socket, destination: Endpoint) -> None:
        self._sock = sock
        self.destination = destination
        self.local = endpoint_of(sock.getsockname())
        self._decoder = StunStreamDecoder()

    @classmethod
    async def open(
        cls, local: Endpoint, destination: Endpoint, retry: ConnectBudget | None = None
    ) -> TcpStunConnection:
        """Connect from ``local`` (port 0: a fresh port) to ``destination``, retrying lost SYNs per ``retry``."""
        try:
            sock, _ = await connect_retrying(
                lambda: reuse_port_socket(socket.SOCK_STREAM, local), destination, retry, what="stun-tcp"
            )
        except ConnectRetryError as exc:
            raise StunTcpError(str(exc)) from None
        except ConnectionRefusedError:
            raise StunTcpError(f"cannot connect to {destination}: connection refused") from None
        except OSError as exc:
            raise StunTcpError(f"cannot connect to {destination} from {local}: {exc.strerror or exc}") from exc
        return cls(sock, destination)

    async def request(self, attributes: Sequence[Attribute] = (), timeout: float = 2.0) -> StunMessage:
        """Send one Binding request, return its success response (StunTcpError otherwise)."""
        loop = asyncio.get_running_loop()
        request = binding_request(os.urandom(12), attributes, fingerprint=True)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_sendall(self._sock, encode_message(request))
                while True:
                    message = self._decoder.next_message()
                    if message is None:
                        chunk = await loop.sock_recv(self._sock, 4096)
                        if not chunk:
                            raise StunTcpError(f"{self.destination} closed the connection")
                        self._decoder.receive_data(chunk)
                        continue
                    if message.transaction_id != request.transaction_id:
                        continue  # indications, stale answers
                    if message.message_class is MessageClass.ERROR:
                        error = message.find(StunErrorCode)
                        text = "" if error is None else f" {error.code} {error.reason}"
                        raise StunTcpError(f"{self.destination} answered with an error{text}")
                    if message.message_class is MessageClass.SUCCESS:
                        return message
        except TimeoutError:
            raise StunTcpError(f"no STUN answer from {self.destination} within {timeout:.1f} s") from None
        except StunParseError as exc:
            raise StunTcpError(f"malformed answer from {self.destination}: {exc}") from exc
        except OSError as exc:
            raise StunTcpError(f"connection to {self.destination} failed: {exc.strerror or exc}") from exc

    @property
    def rtt(self) -> float | None:
        """The kernel's smoothed RTT of this connection, in seconds (None if unavailable)."""
        return smoothed_rtt(self._sock)

    def close(self) -> None:
        self._sock.close()

    @classmethod
    async def open_in_order(
        cls, local: Endpoint, destinations: Sequence[Endpoint], timeout: float
    ) -> list[TcpStunConnection | StunTcpError]:
        """Connect from ``local`` to every destination, SYNs leaving in the given order, handshakes overlapping.

        A non-blocking connect() has sent its SYN when it returns, so the NAT sees (and allocates ports
        for) the connections in list order, as a sequential test would, at the cost of one round trip.
        """
        loop = asyncio.get_running_loop()
        started: list[socket.socket | StunTcpError] = []
        for destination in destinations:
            try:
                sock = reuse_port_socket(socket.SOCK_STREAM, local)
            except OSError as exc:
                started.append(StunTcpError(f"cannot bind {local}: {exc.strerror or exc}"))
                continue
            error = sock.connect_ex((destination.ip, destination.port))
            if error not in (0, errno.EINPROGRESS):
                sock.close()
                started.append(StunTcpError(f"cannot connect to {destination}: {os.strerror(error)}"))
            else:
                started.append(sock)

        async def finish(item: socket.socket | StunTcpError, destination: Endpoint) -> TcpStunConnection | StunTcpError:
            if isinstance(item, StunTcpError):
                return item
            writable: asyncio.Future[None] = loop.create_future()
            fd = item.fileno()
            loop.add_writer(fd, lambda: None if writable.done() else writable.set_result(None))
            try:
                await asyncio.wait_for(writable, timeout)
            except TimeoutError:
                # (unregistered before the close: a closed socket's fileno() is -1, which the selector refuses)
                loop.remove_writer(fd)
                item.close()
                return StunTcpError(f"no TCP answer from {destination} within {timeout:.1f} s")
            except BaseException:
                loop.remove_writer(fd)
                item.close()
                raise
            loop.remove_writer(fd)
            error = item.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                item.close()
                return StunTcpError(f"cannot connect to {destination}: {os.strerror(error)}")
            return cls(item, destination)

        return list(await asyncio.gather(*(finish(i, d) for i, d in zip(started, destinations, strict=True))))


def mapped_endpoint(response: StunMessage) -> Endpoint:
    """The reflexive endpoint in a Binding success response (StunTcpError if it has none)."""
    mapped = response.mapped()
    if mapped is None:
        raise StunTcpError("the Binding response carries no (XOR-)MAPPED-ADDRESS")
    return Endpoint(mapped.ip, mapped.port)


# --------------------------------------------------------------------------------------- mapping


@dataclass(frozen=True)
class MappingObservation:
    """The public endpoint a NAT gave one local port towards one destination, in test order."""

    destination: Endpoint
    mapped: Endpoint
    # Position among the connections made from the port (None: right after the previous observation). A
    # connection that got no answer still took a port at the NAT when its SYN was lost beyond it, so the
    # next observation is two allocations on, not one.
    order: int | None = None


def classify_mapping(observations: Sequence[MappingObservation]) -> MappingBehaviour | None:
    """RFC 5780 section 4.3 from observations made from one local port; None if they cannot tell.

    Needs two destinations with different addresses to tell endpoint-independent from
    address-dependent, and two ports of one address to tell address-dependent from port-dependent.
    """
    if len(observations) < 2:
        return None
    same_ip_pairs = [
        (a, b)
        for i, a in enumerate(observations)
        for b in observations[i + 1 :]
        if a.destination.ip == b.destination.ip
    ]
    other_ip_pairs = [
        (a, b)
        for i, a in enumerate(observations)
        for b in observations[i + 1 :]
        if a.destination.ip != b.destination.ip
    ]
    if any(a.mapped != b.mapped for a, b in same_ip_pairs):
        return MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT
    if any(a.mapped != b.mapped for a, b in other_ip_pairs):
        # Different per address; port dependence is ruled out only if a same-address pair was tried.
        return MappingBehaviour.ADDRESS_DEPENDENT if same_ip_pairs else MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT
    if other_ip_pairs:
        return MappingBehaviour.ENDPOINT_INDEPENDENT
    return None  # only one address tried and its ports agreed: EIM or address-dependent, cannot tell


# Steps between new public ports that must agree before a fixed step is claimed. One step is what any
# allocator produces, a random one included (two random ports are always "a step" apart).
MIN_AGREEING_STEPS = 2


def _steps(observations: Sequence[MappingObservation]) -> list[int | None]:
    """The step per allocation between each two consecutive new public ports (None: no whole step fits).

    A public port seen before is a mapping reused; the new ones are taken in the order they were made.
    """
    new: list[tuple[int, int]] = []  # (order, port) of each public port's first observation
    for observation in observations:
        if all(observation.mapped.port != port for _, port in new):
            order = len(new) if observation.order is None else observation.order
            new.append((order, observation.mapped.port))
    steps: list[int | None] = []
    for (order_a, a), (order_b, b) in itertools.pairwise(new):
        step, gap = (b - a) % 65536, order_b - order_a
        step = step - 65536 if step > 32768 else step
        steps.append(step // gap if gap > 0 and step % gap == 0 else None)
    return steps


def port_allocation_of(observations: Sequence[MappingObservation]) -> PortAllocation | None:
    """How new public ports are allocated, from observations made from one local port (None: fewer than two).

    No new port beyond the first: reused. At least :data:`MIN_AGREEING_STEPS` steps, all the same:
    sequential. Steps that disagree: random. Anything less (one step, as a one-address server gives): unknown.
    """
    if len(observations) < 2:
        return None
    steps = _steps(observations)
    if not steps:
        return PortAllocation.REUSED
    if len(steps) >= 2 and (None in steps or len(set(steps)) > 1):
        return PortAllocation.RANDOM
    return PortAllocation.SEQUENTIAL if len(steps) >= MIN_AGREEING_STEPS else PortAllocation.UNKNOWN


def port_delta_of(observations: Sequence[MappingObservation]) -> int | None:
    """The allocation step between consecutive new mappings: 0 when the mapping is reused, the step when
    :func:`port_allocation_of` says sequential, None otherwise (random, unknown, too few observations)."""
    allocation = port_allocation_of(observations)
    if allocation is PortAllocation.REUSED:
        return 0
    if allocation is PortAllocation.SEQUENTIAL:
        return _steps(observations)[0]
    return None


# ------------------------------------------------------------------------------------- filtering


@dataclass(frozen=True)
class FilteringProbe:
    """One connect-back: what the server saw and whether our listener really accepted it."""

    change: ChangeRequest
    outcome: ConnectBackOutcome | None  # None: the server does not run the test
    accepted: bool
    mapped: Endpoint | None
    local: Endpoint | None
    error: str | None = None

    @property
    def let_in(self) -> bool:
        return self.accepted or self.outcome is ConnectBackOutcome.CONNECTED


async def filtering_probe(local_ip: str, server: Endpoint, change: ChangeRequest, timeout: float) -> FilteringProbe:
    """Listen on a fresh port, ask ``server`` (from that port) to connect back per ``change``."""
    loop = asyncio.get_running_loop()
    connection: TcpStunConnection | None = None
    listener: socket.socket | None = None
    try:
        connection = await TcpStunConnection.open(Endpoint(local_ip, 0), server)
        listener = reuse_port_socket(socket.SOCK_STREAM, connection.local)
        listener.listen(4)
        response = await connection.request([change], timeout)
        result = response.find(ConnectBackResult)
        outcome = None if result is None else result.outcome
        accepted = False
        if outcome is ConnectBackOutcome.CONNECTED:
            # The server's handshake completed, so the connection waits in our accept queue already.
            with contextlib.suppress(TimeoutError, OSError):
                back, _ = await asyncio.wait_for(loop.sock_accept(listener), timeout)
                back.close()
                accepted = True
        return FilteringProbe(change, outcome, accepted, mapped_endpoint(response), connection.local)
    except StunTcpError as exc:
        return FilteringProbe(change, None, False, None, None, str(exc))
    finally:
        if listener is not None:
            listener.close()
        if connection is not None:
            connection.close()


def classify_filtering(
    stranger: FilteringProbe | None, other_port: FilteringProbe | None
) -> tuple[FilteringBehaviour | None, SynResponse | None]:
    """Filtering and the unsolicited-SYN response from the two connect-backs.

    ``stranger``: back from the other address (A2,P2); ``other_port``: back from (A1,P2). Either may be
    None (not run). With only ``other_port``, "let in" cannot tell endpoint-independent from
    address-dependent, so it reports the weaker claim (address-dependent).
    """
    stranger_known = stranger is not None and stranger.outcome not in (None, ConnectBackOutcome.UNAVAILABLE)
    port_known = other_port is not None and other_port.outcome not in (None, ConnectBackOutcome.UNAVAILABLE)
    filtering: FilteringBehaviour | None = None
    if stranger_known and stranger is not None and stranger.let_in:
        return FilteringBehaviour.ENDPOINT_INDEPENDENT, SynResponse.ACCEPT
    if port_known and other_port is not None and other_port.let_in:
        filtering = FilteringBehaviour.ADDRESS_DEPENDENT
    elif port_known:
        filtering = FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT
    elif stranger_known:
        filtering = None  # the stranger was kept out, but port dependence is unknown
    syn: SynResponse | None = None
    for probe in (stranger if stranger_known else None, other_port if port_known else None):
        if probe is None or probe.let_in:
            continue
        syn = SynResponse.RST if probe.outcome is ConnectBackOutcome.REFUSED else SynResponse.DROP
        break
    return filtering, syn


# --------------------------------------------------------------------------------------- hairpin


async def hairpin_test(listener: socket.socket, public: Endpoint, local_ip: str, timeout: float) -> bool:
    """Connect to our own public endpoint; True if ``listener`` (on the mapped local port) gets it.

    A nonce sent over the connection proves that what the listener accepted is this very connection.
    """
    loop = asyncio.get_running_loop()
    nonce = os.urandom(16)
    try:
        connector = reuse_port_socket(socket.SOCK_STREAM, Endpoint(local_ip, 0))
    except OSError:
        return False
    accepted: socket.socket | None = None
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(connector, (public.ip, public.port))
            await loop.sock_sendall(connector, nonce)
            accepted, _ = await loop.sock_accept(listener)
            received = b""
            while len(received) < len(nonce):
                chunk = await loop.sock_recv(accepted, len(nonce) - len(received))
                if not chunk:
                    break
                received += chunk
            return received == nonce
    except (TimeoutError, OSError):
        return False
    finally:
        connector.close()
        if accepted is not None:
            accepted.close()
