"""``tcppunch server`` with --listen given twice (IPv4 and IPv6, here 127.0.0.1 and ::1): STUN answers on
both families (TCP and UDP) and one coordinator registry serves peers of both: a peer on IPv4 connects to one that
registered over IPv6."""

from __future__ import annotations

import asyncio
import os
import socket

from tcppunch.coordinator.control import ControlChannel
from tcppunch.wire.coord import Role
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.stun import (
    MessageClass,
    StunStreamDecoder,
    binding_request,
    encode_message,
    padded,
    parse_message,
)
from tests.unit.test_stun_server_cli import start_server

TOKEN = "dual-stack-token"


def _stun_mapped_ip(address: str, port: int) -> str:
    with socket.create_connection((address, port), 5) as sock:
        sock.settimeout(5)
        sock.sendall(encode_message(binding_request(os.urandom(12))))
        decoder = StunStreamDecoder()
        while (response := decoder.next_message()) is None:
            decoder.receive_data(sock.recv(2048))
    assert response.message_class is MessageClass.SUCCESS
    mapped = response.mapped()
    assert mapped is not None
    return str(mapped.ip)


def _udp_mapped_ip(address: str, port: int) -> str:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        # padded (RFC 5780 PADDING): the server never answers with more bytes than it was sent
        sock.sendto(padded(encode_message(binding_request(os.urandom(12))), 512), (address, port))
        response = parse_message(sock.recv(2048))
    assert response.message_class is MessageClass.SUCCESS
    mapped = response.mapped()
    assert mapped is not None
    return str(mapped.ip)


async def _meet(port: int) -> tuple[Role, str]:
    async with ControlChannel(Endpoint("::1", port), "six", TOKEN) as six, \
            ControlChannel(Endpoint("127.0.0.1", port), "four", TOKEN) as four:
        assert six.observed.ip == "::1" and four.observed.ip == "127.0.0.1"
        order = await four.connect("six")
        incoming = await six.next_order(timeout=5)
        assert incoming.session_id == order.session_id
        return incoming.role, incoming.peer_id


def test_two_listen_addresses_one_registry() -> None:
    proc, port, line = start_server(
        lambda port: ["--listen", f"127.0.0.1:{port}", "--listen", f"[::1]:{port}", "--token", TOKEN],
        range(40000, 50000, 2))
    try:
        assert f"127.0.0.1:{port}" in line and f"[::1]:{port}" in line
        assert _stun_mapped_ip("127.0.0.1", port) == "127.0.0.1"
        assert _stun_mapped_ip("::1", port) == "::1"
        assert _udp_mapped_ip("127.0.0.1", port) == "127.0.0.1"
        assert _udp_mapped_ip("::1", port) == "::1"
        assert asyncio.run(asyncio.wait_for(_meet(port), 20)) == (Role.RESPONDER, "four")
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
