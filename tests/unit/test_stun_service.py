"""The STUN service on loopback: 127.0.0.1 / 127.0.0.2 as the two server addresses."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
import stun as pystun
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcppunch.coordinator.stun_service import StunService, StunServiceConfig
from tcppunch.nat.udp import REQUEST_SIZE, GuardedUdpSocket
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.stun import (
    AlternatePort,
    ChangedAddress,
    ChangeRequest,
    ConnectBackOutcome,
    ConnectBackResult,
    MappedAddress,
    MessageClass,
    OtherAddress,
    ResponseOrigin,
    SourceAddress,
    StunErrorCode,
    StunMessage,
    StunStreamDecoder,
    UnknownAttributes,
    XorMappedAddress,
    binding_request,
    encode_message,
    looks_like_stun,
    padded,
    parse_message,
)

A1, A2 = "127.0.0.1", "127.0.0.2"
WAIT = 5.0


class ServiceThread:
    """A StunService on its own event loop in a thread, so tests can use plain blocking sockets."""

    def __init__(self, config: StunServiceConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.service = StunService(config)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ServiceThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.service.start(), self.loop).result(WAIT)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.service.close(), self.loop).result(WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT)
        self.loop.close()

    def run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(WAIT)


def start_service(alternate: str | None = A2, **kwargs: Any) -> ServiceThread:
    """Bind P1/P1+1 on a free random pair of ports (bounded retries)."""
    last: OSError | None = None
    for _ in range(20):
        port = random.randrange(20000, 30000, 2)
        config = StunServiceConfig(A1, port, alternate_address=alternate, **kwargs)
        service = ServiceThread(config)
        try:
            return service.__enter__()
        except OSError as exc:
            last = exc
            service.__exit__()
    raise RuntimeError(f"no free port pair: {last}")


@pytest.fixture(scope="module")
def two_address() -> Iterator[ServiceThread]:
    # the fuzz tests below send hundreds of datagrams from one address: no rate limit in their way
    service = start_service(udp_rate=1e6, udp_burst=1_000_000)
    yield service
    service.__exit__()


@pytest.fixture(scope="module")
def one_address() -> Iterator[ServiceThread]:
    service = start_service(alternate=None)
    yield service
    service.__exit__()


def reuse_socket(kind: socket.SocketKind, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.settimeout(WAIT)
    sock.bind((A1, port))
    return sock


def tcp_exchange(sock: socket.socket, *requests: StunMessage) -> list[StunMessage]:
    sock.sendall(b"".join(encode_message(r) for r in requests))
    decoder = StunStreamDecoder()
    out: list[StunMessage] = []
    while len(out) < len(requests):
        chunk = sock.recv(4096)
        assert chunk, "server closed the connection"
        decoder.receive_data(chunk)
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    return out


def udp_exchange(server: tuple[str, int], request: StunMessage) -> tuple[StunMessage, tuple[str, int], int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(WAIT)
        sock.bind((A1, 0))
        sock.sendto(padded(encode_message(request), REQUEST_SIZE), server)
        data, source = sock.recvfrom(2048)
        return parse_message(data), source, sock.getsockname()[1]


# --------------------------------------------------------------------------------------- TCP


def test_tcp_binding_response_has_rfc5780_attributes(two_address: ServiceThread) -> None:
    p1, p2 = two_address.config.primary_port, two_address.config.port2
    for server in [(A1, p1), (A2, p1), (A1, p2), (A2, p2)]:
        with socket.create_connection(server, WAIT) as sock:
            local = Endpoint(*sock.getsockname())
            request = binding_request(os.urandom(12))
            (response,) = tcp_exchange(sock, request)
        assert response.message_class is MessageClass.SUCCESS and response.fingerprint
        assert response.transaction_id == request.transaction_id
        assert response.find(XorMappedAddress) == XorMappedAddress(local)
        assert response.find(MappedAddress) == MappedAddress(local)
        assert response.find(ResponseOrigin) == ResponseOrigin(Endpoint(*server))
        other = (A2 if server[0] == A1 else A1, p2 if server[1] == p1 else p1)
        assert response.find(OtherAddress) == OtherAddress(Endpoint(*other))


def test_tcp_many_requests_on_one_connection_pipelined(two_address: ServiceThread) -> None:
    requests = [binding_request(os.urandom(12)) for _ in range(5)]
    with socket.create_connection((A1, two_address.config.primary_port), WAIT) as sock:
        responses = tcp_exchange(sock, *requests)
        responses += tcp_exchange(sock, binding_request(os.urandom(12)))
    assert [r.transaction_id for r in responses[:5]] == [r.transaction_id for r in requests]
    assert len(responses) == 6


@pytest.mark.parametrize(
    ("change", "expected_source"),
    [(ChangeRequest(change_ip=True, change_port=True), "A2P2"), (ChangeRequest(change_port=True), "A1P2")],
)
def test_tcp_connect_back_reaches_a_listener_on_the_same_port(
    two_address: ServiceThread, change: ChangeRequest, expected_source: str
) -> None:
    p1, p2 = two_address.config.primary_port, two_address.config.port2
    source = {"A2P2": Endpoint(A2, p2), "A1P2": Endpoint(A1, p2)}[expected_source]
    with reuse_socket(socket.SOCK_STREAM) as listener, reuse_socket(socket.SOCK_STREAM) as conn:
        # the listener and the requesting connection share one local port (SO_REUSEPORT)
        conn.close()
        conn = reuse_socket(socket.SOCK_STREAM, listener.getsockname()[1])
        listener.listen(4)
        conn.connect((A1, p1))
        request = binding_request(os.urandom(12), [change])
        (response,) = tcp_exchange(conn, request)
        assert response.find(ConnectBackResult) == ConnectBackResult(ConnectBackOutcome.CONNECTED, source)
        back, addr = listener.accept()
        with back:
            assert Endpoint(*addr) == source
            back.settimeout(WAIT)
            decoder = StunStreamDecoder()
            while (indication := decoder.next_message()) is None:
                decoder.receive_data(back.recv(1024))
            assert indication.message_class is MessageClass.INDICATION
            assert indication.transaction_id == request.transaction_id


def test_tcp_connect_back_refused_when_nothing_listens(two_address: ServiceThread) -> None:
    with socket.create_connection((A1, two_address.config.primary_port), WAIT) as sock:
        (response,) = tcp_exchange(sock, binding_request(os.urandom(12), [ChangeRequest(True, True)]))
    result = response.find(ConnectBackResult)
    assert result is not None and result.outcome is ConnectBackOutcome.REFUSED


def test_one_address_server_omits_other_address_and_reports_unavailable(one_address: ServiceThread) -> None:
    p1, p2 = one_address.config.primary_port, one_address.config.port2
    with socket.create_connection((A1, p1), WAIT) as sock:
        plain, change_ip, change_port = tcp_exchange(
            sock,
            binding_request(os.urandom(12)),
            binding_request(os.urandom(12), [ChangeRequest(change_ip=True)]),
            binding_request(os.urandom(12), [ChangeRequest(change_port=True)]),
        )
    assert plain.find(OtherAddress) is None and plain.find(AlternatePort) == AlternatePort(p2)
    assert change_ip.find(ConnectBackResult) is not None
    assert change_ip.find(ConnectBackResult).outcome is ConnectBackOutcome.UNAVAILABLE  # type: ignore[union-attr]
    assert change_port.find(ConnectBackResult) == ConnectBackResult(
        ConnectBackOutcome.REFUSED, Endpoint(A1, p2)
    )


def test_tcp_unknown_required_attribute_gets_420(two_address: ServiceThread) -> None:
    from tcppunch.wire.stun import OpaqueAttribute

    request = binding_request(os.urandom(12), [OpaqueAttribute(0x0031, b"abcd")])
    with socket.create_connection((A1, two_address.config.primary_port), WAIT) as sock:
        (response,) = tcp_exchange(sock, request)
    assert response.message_class is MessageClass.ERROR
    assert response.find(StunErrorCode) == StunErrorCode(420, "Unknown Attribute")
    assert response.find(UnknownAttributes) == UnknownAttributes((0x0031,))


def test_tcp_bad_attribute_gets_400_and_connection_keeps_serving(two_address: ServiceThread) -> None:
    tid = os.urandom(12)
    bad_attr = struct.pack("!HH", 0x0001, 8) + b"\x00\x09\x00\x01\x7f\x00\x00\x01"
    bad = struct.pack("!HH", 0x0001, len(bad_attr)) + b"\x21\x12\xa4\x42" + tid + bad_attr
    with socket.create_connection((A1, two_address.config.primary_port), WAIT) as sock:
        sock.sendall(bad)
        good = binding_request(os.urandom(12))
        error, ok = _two(sock, good)
    assert error.transaction_id == tid and error.find(StunErrorCode) is not None
    assert error.find(StunErrorCode).code == 400  # type: ignore[union-attr]
    assert ok.transaction_id == good.transaction_id and ok.message_class is MessageClass.SUCCESS


def _two(sock: socket.socket, good: StunMessage) -> tuple[StunMessage, StunMessage]:
    sock.sendall(encode_message(good))
    decoder = StunStreamDecoder()
    out: list[StunMessage] = []
    while len(out) < 2:
        decoder.receive_data(sock.recv(4096))
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    return out[0], out[1]


def test_tcp_non_stun_stream_is_closed(two_address: ServiceThread) -> None:
    with socket.create_connection((A1, two_address.config.primary_port), WAIT) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert sock.recv(100) == b""


def test_serve_tcp_connection_accepts_a_handed_over_prefix(two_address: ServiceThread) -> None:
    """The coordinator's path: it read the first bytes, recognised STUN, hands the rest over."""
    received: list[bytes] = []

    async def coordinator_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first8 = await reader.readexactly(8)
        received.append(first8)
        assert looks_like_stun(first8)
        await two_address.service.serve_tcp_connection(reader, writer, first8)

    async def start() -> asyncio.Server:
        return await asyncio.start_server(coordinator_like, A1, 0)

    server: asyncio.Server = two_address.run(start())
    try:
        port = server.sockets[0].getsockname()[1]
        with socket.create_connection((A1, port), WAIT) as sock:
            request = binding_request(os.urandom(12))
            (response,) = tcp_exchange(sock, request)
            assert response.transaction_id == request.transaction_id
            assert response.find(XorMappedAddress) == XorMappedAddress(Endpoint(*sock.getsockname()))
    finally:

        async def stop() -> None:  # on the service's own loop: asyncio servers are not thread-safe
            server.close()

        two_address.run(stop())
    assert received


# --------------------------------------------------------------------------------------- UDP


def test_udp_classic_request_gets_classic_dialect(two_address: ServiceThread) -> None:
    p1, p2 = two_address.config.primary_port, two_address.config.port2
    request = binding_request(os.urandom(16))
    response, source, port = udp_exchange((A1, p1), request)
    assert source == (A1, p1)
    assert response.classic and response.transaction_id == request.transaction_id
    assert response.find(MappedAddress) == MappedAddress(Endpoint(A1, port))
    assert response.find(SourceAddress) == SourceAddress(Endpoint(A1, p1))
    assert response.find(ChangedAddress) == ChangedAddress(Endpoint(A2, p2))
    assert response.find(XorMappedAddress) is None and not response.fingerprint


@pytest.mark.parametrize(
    ("change", "expected"),
    [(ChangeRequest(True, True), "A2P2"), (ChangeRequest(False, True), "A1P2"), (ChangeRequest(True, False), "A2P1")],
)
def test_udp_change_request_answers_from_the_changed_socket(
    two_address: ServiceThread, change: ChangeRequest, expected: str
) -> None:
    p1, p2 = two_address.config.primary_port, two_address.config.port2
    want = {"A2P2": (A2, p2), "A1P2": (A1, p2), "A2P1": (A2, p1)}[expected]
    response, source, _ = udp_exchange((A1, p1), binding_request(os.urandom(16), [change]))
    assert source == want
    assert response.find(SourceAddress) == SourceAddress(Endpoint(*want))


def test_udp_cookie_request_gets_xor_and_fingerprint(two_address: ServiceThread) -> None:
    response, _, port = udp_exchange((A1, two_address.config.primary_port), binding_request(os.urandom(12)))
    assert response.find(XorMappedAddress) == XorMappedAddress(Endpoint(A1, port))
    assert response.fingerprint and response.find(OtherAddress) is not None


def test_pystun3_classifies_loopback_as_open_internet(two_address: ServiceThread) -> None:
    """pystun3 through detect's guarded socket (which pads its requests: the server does not amplify)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((A1, 0))
        port = sock.getsockname()[1]
        guard = GuardedUdpSocket(sock, 1.0, time.monotonic() + 10.0)
        nat_type, result = pystun.get_nat_type(guard, A1, port, stun_host=A1, stun_port=two_address.config.primary_port)
    assert nat_type == pystun.OpenInternet
    assert result["Resp"] is True
    assert (result["ExternalIP"], result["ExternalPort"]) == (A1, port)
    assert (result["ChangedIP"], result["ChangedPort"]) == (A2, two_address.config.port2)


# ------------------------------------------------------------------------------------ fuzzing


def _still_answers(service: ServiceThread) -> None:
    p1 = service.config.primary_port
    response, _, _ = udp_exchange((A1, p1), binding_request(os.urandom(16)))
    assert response.message_class is MessageClass.SUCCESS
    with socket.create_connection((A1, p1), WAIT) as sock:
        (tcp_response,) = tcp_exchange(sock, binding_request(os.urandom(12)))
    assert tcp_response.message_class is MessageClass.SUCCESS


stun_like = st.one_of(
    st.binary(max_size=120),
    st.builds(
        lambda t, body, tid: struct.pack("!HH", t, len(body)) + b"\x21\x12\xa4\x42" + tid + body,
        st.sampled_from([0x0001, 0x0011, 0x0101, 0x0002, 0x3FFF]),
        st.binary(max_size=64),
        st.binary(min_size=12, max_size=12),
    ),
)


@given(packets=st.lists(stun_like, min_size=1, max_size=8))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_udp_sockets_then_still_answering(two_address: ServiceThread, packets: list[bytes]) -> None:
    p1, p2 = two_address.config.primary_port, two_address.config.port2
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i, packet in enumerate(packets):
            sock.sendto(packet, [(A1, p1), (A2, p1), (A1, p2), (A2, p2)][i % 4])
    _still_answers(two_address)


@given(chunks=st.lists(stun_like, min_size=1, max_size=4))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_tcp_socket_then_still_answering(two_address: ServiceThread, chunks: list[bytes]) -> None:
    with socket.create_connection((A1, two_address.config.primary_port), WAIT) as sock:
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server closed on us: fine
    _still_answers(two_address)
