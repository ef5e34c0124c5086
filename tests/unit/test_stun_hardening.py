"""Issue 9 findings 5 and 6 against the STUN service on loopback: slow TCP clients, UDP amplification.

A1 and A2 are the service's two addresses; a third loopback address (127.0.0.3) is a different source.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

import pytest

from tcppunch.coordinator.stun_service import fit_response
from tcppunch.nat.udp import REQUEST_SIZE
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.stun import (
    ChangeRequest,
    MappedAddress,
    MessageClass,
    OtherAddress,
    Software,
    StunErrorCode,
    StunMessage,
    XorMappedAddress,
    binding_request,
    encode_message,
    padded,
    parse_message,
)

from .test_stun_service import A1, WAIT, ServiceThread, start_service

OTHER_SOURCE = "127.0.0.3"


def udp_answers(port: int, payload: bytes, count: int = 1, source: str = A1) -> list[bytes]:
    """Send ``payload`` ``count`` times from one socket; every datagram that comes back (0.3 s quiet
    after the last one ends the wait)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        for _ in range(count):
            sock.sendto(payload, (A1, port))
        sock.settimeout(0.3)
        answers = []
        while True:
            try:
                answers.append(sock.recv(2048))
            except TimeoutError:
                return answers


@pytest.fixture(scope="module")
def service() -> ServiceThread:
    svc = start_service(udp_burst=20, udp_rate=0.0, tcp_message_timeout=0.5, tcp_idle_timeout=3.0)
    yield svc  # type: ignore[misc]
    svc.__exit__()


# ---------------------------------------------------------------------------- 6: UDP amplification


@pytest.mark.parametrize("tid_size", [16, 12], ids=["classic", "rfc5389"])
def test_udp_answers_are_never_larger_than_their_request(service: ServiceThread, tid_size: int) -> None:
    """A 20-byte request got 56-88 bytes back (2.8-4.4x). Now: at most what the request carried."""
    port = service.config.primary_port
    bare = encode_message(binding_request(os.urandom(tid_size)))
    assert len(bare) == 20
    assert udp_answers(port, bare, source=OTHER_SOURCE) == []  # no answer fits in 20 bytes
    for size in (40, 64, REQUEST_SIZE):
        request = padded(encode_message(binding_request(os.urandom(tid_size))), size)
        (answer,) = udp_answers(port, request, source=OTHER_SOURCE)
        assert len(answer) <= len(request)
        assert parse_message(answer).mapped() is not None
    # padded to the full size: the whole answer (RFC 5780 attributes included)
    full = parse_message(udp_answers(port, padded(encode_message(binding_request(os.urandom(12))), REQUEST_SIZE),
                                     source=OTHER_SOURCE)[0])
    assert full.find(OtherAddress) is not None and full.find(Software) is not None and full.fingerprint


def test_udp_is_rate_limited_per_source(service: ServiceThread) -> None:
    port = service.config.primary_port
    request = padded(encode_message(binding_request(os.urandom(12))), REQUEST_SIZE)
    answers = udp_answers(port, request, count=60, source="127.0.0.4")
    assert len(answers) == 20  # the burst; the rate is 0 in this service
    # another source is still answered
    assert len(udp_answers(port, request, source="127.0.0.5")) == 1


def test_fit_response_keeps_the_mapped_address_and_gives_up_below_it() -> None:
    tid = os.urandom(12)
    mapped = Endpoint("203.0.113.9", 4000)
    full = StunMessage(1, MessageClass.SUCCESS, tid, (XorMappedAddress(mapped), MappedAddress(mapped),
                                                      OtherAddress(Endpoint("198.51.100.2", 3479)),
                                                      Software("tcppunch")), fingerprint=True)
    assert fit_response(full, 1000) == full
    small = fit_response(full, 32)
    assert small is not None and small.attributes == (XorMappedAddress(mapped),) and not small.fingerprint
    assert fit_response(full, 31) is None
    error = StunMessage(1, MessageClass.ERROR, tid, (StunErrorCode(400, "Bad Request"),))
    assert fit_response(error, 20) is None


def test_change_request_can_be_switched_off() -> None:
    svc = start_service(udp_change_request=False)
    try:
        port = svc.config.primary_port
        change = binding_request(os.urandom(12), [ChangeRequest(True, True)])
        (answer,) = udp_answers(port, padded(encode_message(change), REQUEST_SIZE))
        reply = parse_message(answer)
        assert reply.message_class is MessageClass.ERROR
        assert reply.find(StunErrorCode) == StunErrorCode(420, "Unknown Attribute")
        (plain,) = udp_answers(port, padded(encode_message(binding_request(os.urandom(12))), REQUEST_SIZE))
        assert parse_message(plain).find(OtherAddress) is None
    finally:
        svc.__exit__()


# ------------------------------------------------------------------------------ 5: slow TCP clients


def test_tcp_message_has_a_total_deadline(service: ServiceThread) -> None:
    """STUN over TCP at 1 byte/s was still open after 12 s (30 s per read, no total deadline). Here a
    message must complete within 0.5 s; a trickle of one byte per 0.1 s is cut before it finishes."""
    request = encode_message(binding_request(os.urandom(12)))
    with socket.create_connection((A1, service.config.primary_port), WAIT) as sock:
        sock.settimeout(0.1)
        cut_at = None
        started = time.monotonic()
        for i, byte in enumerate(request):
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(4096) == b"":
                    cut_at = i
                    break
            except TimeoutError:
                continue
            except OSError:
                cut_at = i
                break
        assert cut_at is not None and cut_at < len(request) - 1, "the trickle was served to the end"
        assert time.monotonic() - started < WAIT


def test_a_prompt_tcp_client_is_answered_repeatedly(service: ServiceThread) -> None:
    with socket.create_connection((A1, service.config.primary_port), WAIT) as sock:
        sock.settimeout(WAIT)
        for _ in range(3):
            sock.sendall(encode_message(binding_request(os.urandom(12))))
            assert parse_message(sock.recv(4096)).message_class is MessageClass.SUCCESS


def test_tcp_connections_are_limited_per_source() -> None:
    svc = start_service(tcp_max_per_source=8)
    port2 = svc.config.port2  # a listener of the STUN service itself
    socks = []
    try:
        for _ in range(12):
            sock = socket.socket()
            sock.bind(("127.0.0.6", 0))
            sock.settimeout(WAIT)
            sock.connect((A1, port2))
            socks.append(sock)
        # the connections beyond 8 are closed by the server at once (EOF or reset)
        for sock in socks[8:]:
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""
        # another source is served
        with socket.create_connection((A1, port2), WAIT, source_address=("127.0.0.7", 0)) as other:
            other.sendall(encode_message(binding_request(os.urandom(12))))
            assert parse_message(other.recv(4096)).message_class is MessageClass.SUCCESS
    finally:
        for sock in socks:
            sock.close()
        svc.__exit__()
