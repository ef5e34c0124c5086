"""detect and its parts on loopback: classification rules, the pystun3 guard, the whole run, the verdict."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from tcppunch.cli.detect_cmd import render_table
from tcppunch.nat.detect import ServerUnreachable, detect
from tcppunch.nat.local import local_network
from tcppunch.nat.tcp_tests import (
    FilteringProbe,
    MappingObservation,
    classify_filtering,
    classify_mapping,
    port_allocation_of,
    port_delta_of,
)
from tcppunch.nat.udp import classic_udp_nat_type
from tcppunch.nat.verdict import verdict
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import (
    FilteringBehaviour,
    MappingBehaviour,
    NatReport,
    PortAllocation,
    SynResponse,
    TcpBehaviour,
)
from tcppunch.wire.stun import (
    ChangedAddress,
    ChangeRequest,
    ConnectBackOutcome,
    MappedAddress,
    MessageClass,
    StunErrorCode,
    StunMessage,
    StunMethod,
    XorMappedAddress,
    encode_message,
    parse_message,
)
from tests.unit.test_stun_service import A1, ServiceThread, start_service

S1, S1P2, S2, S2P2 = (
    Endpoint("198.51.100.10", 3478),
    Endpoint("198.51.100.10", 3479),
    Endpoint("198.51.100.11", 3478),
    Endpoint("198.51.100.11", 3479),
)


def obs(*pairs: tuple[Endpoint, int]) -> list[MappingObservation]:
    return [MappingObservation(d, Endpoint("203.0.113.1", port)) for d, port in pairs]


# ------------------------------------------------------------------------------ classification


def test_mapping_classification() -> None:
    assert classify_mapping(obs((S1, 5000), (S2, 5000), (S1P2, 5000), (S2P2, 5000))) is (
        MappingBehaviour.ENDPOINT_INDEPENDENT
    )
    assert classify_mapping(obs((S1, 5000), (S2, 6000), (S1P2, 5000), (S2P2, 6000))) is (
        MappingBehaviour.ADDRESS_DEPENDENT
    )
    assert classify_mapping(obs((S1, 5000), (S2, 5001), (S1P2, 5002), (S2P2, 5003))) is (
        MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT
    )
    assert classify_mapping(obs((S1, 5000), (S1P2, 5000))) is None  # one address: cannot tell EIM from ADM
    assert classify_mapping(obs((S1, 5000), (S1P2, 5001))) is MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT
    assert classify_mapping(obs((S1, 5000))) is None


def test_port_delta() -> None:
    assert port_delta_of(obs((S1, 5000), (S2, 5000), (S1P2, 5000))) == 0
    assert port_delta_of(obs((S1, 20000), (S2, 20001), (S1P2, 20002), (S2P2, 20003))) == 1
    assert port_delta_of(obs((S1, 20000), (S2, 20002), (S1P2, 20004))) == 2
    assert port_delta_of(obs((S1, 65535), (S2, 1), (S1P2, 3))) == 2  # wraps around
    assert port_delta_of(obs((S1, 40000), (S2, 1234), (S1P2, 50321), (S2P2, 7))) is None
    # address-dependent: two new ports, one step of 1000, which any allocator could have made
    assert port_delta_of(obs((S1, 5000), (S2, 6000), (S1P2, 5000), (S2P2, 6000))) is None


# What a one-address server gives: (A1,P1) then (A1,P2), two new ports and so one step between them.
ONE_ADDRESS_SEQUENTIAL = obs((S1, 20000), (S1P2, 20001))
ONE_ADDRESS_RANDOM = obs((S1, 40321), (S1P2, 51234))  # two ports of a random allocator: "a step" of 10913
ONE_ADDRESS_RANDOM_ADJACENT = obs((S1, 33000), (S1P2, 33001))  # random ports can be neighbours too


@pytest.mark.parametrize("sample", [ONE_ADDRESS_SEQUENTIAL, ONE_ADDRESS_RANDOM, ONE_ADDRESS_RANDOM_ADJACENT])
def test_one_step_is_unknown_not_sequential(sample: list[MappingObservation]) -> None:
    """One step cannot tell a sequential allocator from a random one (the two look the same), so neither
    is claimed: no delta, allocation unknown."""
    assert port_allocation_of(sample) is PortAllocation.UNKNOWN
    assert port_delta_of(sample) is None


def test_port_allocation_from_sample_sequences() -> None:
    assert port_allocation_of(obs((S1, 5000), (S2, 5000), (S1P2, 5000), (S2P2, 5000))) is PortAllocation.REUSED
    assert port_allocation_of(obs((S1, 20000), (S2, 20001), (S1P2, 20002), (S2P2, 20003))) is (
        PortAllocation.SEQUENTIAL
    )
    assert port_allocation_of(obs((S1, 20000), (S2, 20002), (S1P2, 20004))) is PortAllocation.SEQUENTIAL
    assert port_allocation_of(obs((S1, 40321), (S2, 51234), (S1P2, 2231), (S2P2, 61000))) is PortAllocation.RANDOM
    # two steps agreeing by chance, the third not: random, not a step of 5
    assert port_allocation_of(obs((S1, 1000), (S2, 1005), (S1P2, 1010), (S2P2, 3000))) is PortAllocation.RANDOM
    assert port_delta_of(obs((S1, 1000), (S2, 1005), (S1P2, 1010), (S2P2, 3000))) is None
    assert port_allocation_of(obs((S1, 5000), (S2, 6000), (S1P2, 5000), (S2P2, 6000))) is PortAllocation.UNKNOWN
    assert port_allocation_of(obs((S1, 5000))) is None


def test_an_unknown_allocation_is_said_so_not_called_random_or_sequential() -> None:
    tcp = TcpBehaviour(MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT, FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT,
                       False, None, SynResponse.DROP, False, PortAllocation.UNKNOWN)
    text = verdict(tcp, True)
    assert "could not be measured" in text and "predicts nothing" in text
    assert "random port allocation" not in text and "sequential" not in text
    table = render_table(NatReport(tcp=tcp, verdict=text), S1)
    assert "port delta         unknown" in table
    random = TcpBehaviour(MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT, None, False, None,
                          port_allocation=PortAllocation.RANDOM)
    assert "port delta         random" in render_table(NatReport(tcp=random, verdict=""), S1)


def test_port_delta_counts_a_connection_that_got_no_answer() -> None:
    """A lost answer in the middle: its connection still took a port, so the next one is two steps on."""
    gap = [MappingObservation(S1, Endpoint("203.0.113.1", 20000), order=0),
           MappingObservation(S1P2, Endpoint("203.0.113.1", 20002), order=2),
           MappingObservation(S2P2, Endpoint("203.0.113.1", 20003), order=3)]
    assert port_delta_of(gap) == 1
    odd = [MappingObservation(S1, Endpoint("203.0.113.1", 20000), order=0),
           MappingObservation(S1P2, Endpoint("203.0.113.1", 20003), order=2)]
    assert port_delta_of(odd) is None  # 3 ports in 2 steps: no constant step


def probe(change: ChangeRequest, outcome: ConnectBackOutcome | None, accepted: bool | None = None) -> FilteringProbe:
    let_in = outcome is ConnectBackOutcome.CONNECTED if accepted is None else accepted
    return FilteringProbe(change, outcome, let_in, None, None)


STRANGER = ChangeRequest(True, True)
OTHER_PORT = ChangeRequest(False, True)


@pytest.mark.parametrize(
    ("stranger", "other_port", "filtering", "syn"),
    [
        (
            ConnectBackOutcome.CONNECTED,
            ConnectBackOutcome.CONNECTED,
            FilteringBehaviour.ENDPOINT_INDEPENDENT,
            SynResponse.ACCEPT,
        ),
        (
            ConnectBackOutcome.TIMEOUT,
            ConnectBackOutcome.CONNECTED,
            FilteringBehaviour.ADDRESS_DEPENDENT,
            SynResponse.DROP,
        ),
        (
            ConnectBackOutcome.REFUSED,
            ConnectBackOutcome.CONNECTED,
            FilteringBehaviour.ADDRESS_DEPENDENT,
            SynResponse.RST,
        ),
        (
            ConnectBackOutcome.TIMEOUT,
            ConnectBackOutcome.TIMEOUT,
            FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT,
            SynResponse.DROP,
        ),
        (
            ConnectBackOutcome.REFUSED,
            ConnectBackOutcome.REFUSED,
            FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT,
            SynResponse.RST,
        ),
        (ConnectBackOutcome.UNAVAILABLE, ConnectBackOutcome.CONNECTED, FilteringBehaviour.ADDRESS_DEPENDENT, None),
        (None, None, None, None),
    ],
)
def test_filtering_classification(
    stranger: ConnectBackOutcome | None,
    other_port: ConnectBackOutcome | None,
    filtering: FilteringBehaviour | None,
    syn: SynResponse | None,
) -> None:
    assert classify_filtering(probe(STRANGER, stranger), probe(OTHER_PORT, other_port)) == (filtering, syn)


def test_filtering_trusts_our_listener_over_the_server() -> None:
    # The server timed out but our listener did get the connection: it got in.
    got_in = probe(STRANGER, ConnectBackOutcome.TIMEOUT, accepted=True)
    assert classify_filtering(got_in, probe(OTHER_PORT, ConnectBackOutcome.CONNECTED))[0] is (
        FilteringBehaviour.ENDPOINT_INDEPENDENT
    )


# ----------------------------------------------------------------------------------- verdict


def test_verdicts_say_what_works() -> None:
    cone = TcpBehaviour(
        MappingBehaviour.ENDPOINT_INDEPENDENT,
        FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT,
        True,
        0,
        SynResponse.RST,
        False,
    )
    text = verdict(cone, True)
    assert "Port-restricted cone" in text and "hole punching" in text and "RST" in text
    seq = TcpBehaviour(
        MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT,
        FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT,
        False,
        1,
        SynResponse.DROP,
        False,
    )
    assert "predicted" in verdict(seq, True) and "+1" in verdict(seq, True)
    rnd = TcpBehaviour(
        MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT,
        FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT,
        False,
        None,
        SynResponse.DROP,
        False,
    )
    assert "only the relay" in verdict(rnd, True)
    public = TcpBehaviour(
        MappingBehaviour.ENDPOINT_INDEPENDENT,
        FilteringBehaviour.ENDPOINT_INDEPENDENT,
        True,
        0,
        SynResponse.ACCEPT,
        True,
    )
    assert verdict(public, False).startswith("No NAT")
    assert "Not measured: x" in verdict(TcpBehaviour(), None, ["x"])


def test_local_network_lists_loopback_only_on_request() -> None:
    network = local_network()
    assert "127.0.0.1" in network.addresses(include_loopback=True)
    assert "127.0.0.1" not in network.addresses()
    assert network.owns("127.0.0.1") and not network.owns("198.51.100.250") and not network.owns("junk")


# ---------------------------------------------------------------------- detect on loopback


@pytest.fixture(scope="module")
def service() -> Iterator[ServiceThread]:
    running = start_service()
    yield running
    running.__exit__()


def test_detect_on_loopback_sees_no_nat(service: ServiceThread) -> None:
    report = asyncio.run(detect(Endpoint(A1, service.config.primary_port), timeout=2.0))
    tcp = report.tcp
    assert tcp.mapping is MappingBehaviour.ENDPOINT_INDEPENDENT
    assert tcp.filtering is FilteringBehaviour.ENDPOINT_INDEPENDENT
    assert (tcp.port_preservation, tcp.port_delta, tcp.unsolicited_syn, tcp.hairpin) == (
        True,
        0,
        SynResponse.ACCEPT,
        True,
    )
    assert report.udp_nat_type == "Open Internet"
    assert report.behind_nat is False and report.public is not None and report.public.ip == A1
    assert report.untested == () and report.verdict.startswith("No NAT")


def test_detect_against_a_one_address_server_lists_what_it_could_not_test() -> None:
    single = start_service(alternate=None)
    try:
        report = asyncio.run(detect(Endpoint(A1, single.config.primary_port), timeout=2.0))
    finally:
        single.__exit__()
    assert report.tcp.mapping is None and report.udp_nat_type is None
    assert report.tcp.port_preservation is True
    assert report.tcp.filtering is FilteringBehaviour.ADDRESS_DEPENDENT  # let in from another port
    assert any("one address" in u for u in report.untested)


def test_detect_with_only_a_stun_server_leaves_filtering_untested(service: ServiceThread) -> None:
    report = asyncio.run(detect(None, [Endpoint(A1, service.config.primary_port)], timeout=2.0))
    assert report.tcp.mapping is MappingBehaviour.ENDPOINT_INDEPENDENT
    assert report.tcp.filtering is None
    assert any("filtering" in u for u in report.untested)


def test_detect_unreachable_server_raises() -> None:
    with socket.socket() as sock:  # a port with nothing listening: bound, never listening
        sock.bind((A1, 0))
        port = sock.getsockname()[1]
        with pytest.raises(ServerUnreachable, match="cannot connect"):
            asyncio.run(detect(Endpoint(A1, port), timeout=1.0))


# ------------------------------------------------------------------ the pystun3 guard


class FakeUdpServer:
    """A UDP server answering every datagram through ``reply(request_bytes) -> list of byte strings``."""

    def __init__(self, reply: Callable[[bytes], list[bytes]]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((A1, 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self._reply = reply
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received += 1
            for answer in self._reply(data):
                self.sock.sendto(answer, addr)

    def __enter__(self) -> FakeUdpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close()


def _tid(data: bytes) -> bytes:
    return data[4:20]


def test_guard_stops_the_endless_loop_on_error_replies() -> None:
    def error(data: bytes) -> list[bytes]:
        request = parse_message(data)
        return [
            encode_message(
                StunMessage(
                    StunMethod.BINDING, MessageClass.ERROR, request.transaction_id, (StunErrorCode(400, "Bad Request"),)
                )
            )
        ]

    with FakeUdpServer(error) as server:
        result = asyncio.run(classic_udp_nat_type(Endpoint(A1, server.port), per_test_timeout=0.1, deadline=1.0))
    assert result.nat_type == "Blocked"  # an error is no answer: pystun3 gives up instead of looping
    assert server.received <= 4


def test_guard_survives_unknown_message_types_and_junk() -> None:
    def junk(data: bytes) -> list[bytes]:
        return [b"\x7f\x7f" + data[2:20], os.urandom(30), b""]

    with FakeUdpServer(junk) as server:
        result = asyncio.run(classic_udp_nat_type(Endpoint(A1, server.port), per_test_timeout=0.1, deadline=1.0))
    assert result.nat_type == "Blocked" and result.error is None


def test_guard_translates_xor_only_answers() -> None:
    def xor_only(data: bytes) -> list[bytes]:
        request = parse_message(data)
        port = xor_only.client_port  # type: ignore[attr-defined]
        attrs = (
            XorMappedAddress(Endpoint("203.0.113.9", port)),
            ChangedAddress(Endpoint(A1, xor_only.self_port)),
        )  # type: ignore[attr-defined]
        change = request.find(ChangeRequest)
        if change is not None and (change.change_ip or change.change_port):
            return []  # a filtering NAT: the changed answers never arrive
        return [encode_message(StunMessage(StunMethod.BINDING, MessageClass.SUCCESS, request.transaction_id, attrs))]

    xor_only.client_port = 4242  # type: ignore[attr-defined]
    with FakeUdpServer(xor_only) as server:
        xor_only.self_port = server.port  # type: ignore[attr-defined]
        result = asyncio.run(classic_udp_nat_type(Endpoint(A1, server.port), per_test_timeout=0.1, deadline=2.0))
    # pystun3 alone would compare None with None; with the guard it sees MAPPED-ADDRESS and the same
    # mapping on Test 1 to the changed address, then no answer to change-port: port-restricted.
    assert result.nat_type == "Restric Port NAT"
    assert result.external == Endpoint("203.0.113.9", 4242)


def test_guard_deadline_bounds_a_silent_server() -> None:
    with FakeUdpServer(lambda data: []) as server:
        result = asyncio.run(classic_udp_nat_type(Endpoint(A1, server.port), per_test_timeout=5.0, deadline=0.3))
    assert result.nat_type is None and result.error is not None and "did not finish" in result.error


def test_classic_answer_has_mapped_address_first() -> None:
    tid = os.urandom(16)
    msg = StunMessage(StunMethod.BINDING, MessageClass.SUCCESS, tid, (MappedAddress(Endpoint("1.2.3.4", 5)),))
    assert parse_message(encode_message(msg)).mapped() == Endpoint("1.2.3.4", 5)
