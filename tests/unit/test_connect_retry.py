"""Connects to our server survive lost SYNs: the schedule, and a real SYN drop on loopback."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tcppunch.nat.retry import ConnectAttempt, ConnectBudget, ConnectRetryError, connect_retrying
from tcppunch.wire.endpoint import Endpoint


def test_attempt_timeouts_double_up_to_the_cap_within_the_budget() -> None:
    budget = ConnectBudget(budget=10.0, first_timeout=1.0, max_timeout=4.0)
    elapsed, timeouts = 0.0, []
    while (timeout := budget.attempt_timeout(len(timeouts), elapsed)) is not None:
        timeouts.append(timeout)
        elapsed += timeout  # every attempt times out
    assert timeouts == [1.0, 2.0, 4.0, 3.0]
    assert budget.attempt_timeout(0, 10.0) is None
    with pytest.raises(ValueError):
        ConnectBudget(budget=1.0, first_timeout=2.0, max_timeout=1.0)


def _new_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


def test_a_dropped_syn_is_retried_and_the_connect_succeeds() -> None:
    """A listener whose accept queue is full drops SYNs (no SYN-ACK); freeing it lets a later attempt in."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    server = Endpoint("127.0.0.1", listener.getsockname()[1])
    filler = socket.create_connection(("127.0.0.1", server.port), timeout=5.0)  # fills the accept queue
    seen: list[ConnectAttempt] = []
    accepted: list[socket.socket] = []

    def on_attempt(attempt: ConnectAttempt) -> None:
        seen.append(attempt)
        if attempt.error is not None and not accepted:
            accepted.append(listener.accept()[0])  # room in the queue for the next attempt

    try:
        budget = ConnectBudget(budget=10.0, first_timeout=0.3, max_timeout=2.0)
        sock, attempts = asyncio.run(connect_retrying(_new_socket, server, budget, on_attempt=on_attempt))
        sock.close()
    finally:
        for s in (filler, listener, *accepted):
            s.close()
    assert attempts == tuple(seen)
    assert attempts[0].error == "timeout" and attempts[-1].error is None
    assert len(attempts) >= 2
    assert [a.number for a in attempts] == list(range(1, len(attempts) + 1))


def test_the_budget_ends_the_attempts_with_a_clear_error() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    try:
        with pytest.raises(ConnectRetryError) as caught:
            asyncio.run(connect_retrying(_new_socket, Endpoint("127.0.0.1", port),
                                         ConnectBudget(budget=0.7, first_timeout=0.2, max_timeout=0.4)))
    finally:
        filler.close()
        listener.close()
    attempts = caught.value.attempts
    assert [a.error for a in attempts] == ["timeout"] * len(attempts) and len(attempts) >= 2
    assert f"in {len(attempts)} attempts within 0.7 s" in str(caught.value)
    assert isinstance(caught.value, TimeoutError)


def test_a_refusal_is_an_answer_not_retried() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there: RST
    seen: list[ConnectAttempt] = []
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(asyncio.wait_for(
            connect_retrying(_new_socket, Endpoint("127.0.0.1", port), on_attempt=seen.append), 5.0
        ))
    assert seen == []


def test_detect_connects_in_order_report_a_dropped_syn_as_no_answer() -> None:
    """The mapping test's ordered connects (not retried: their order is the measurement) time out cleanly
    when a SYN gets no answer (it used to raise ValueError: a closed socket's fileno() is -1)."""
    from tcppunch.nat.tcp_tests import StunTcpError, TcpStunConnection

    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    filler = socket.create_connection(full.getsockname(), timeout=5.0)
    fine = socket.socket()
    fine.bind(("127.0.0.1", 0))
    fine.listen(4)
    try:
        results = asyncio.run(TcpStunConnection.open_in_order(
            Endpoint("127.0.0.1", 0), [Endpoint("127.0.0.1", full.getsockname()[1]),
                                       Endpoint("127.0.0.1", fine.getsockname()[1])], 0.3))
    finally:
        for s in (filler, full, fine):
            s.close()
    assert isinstance(results[0], StunTcpError) and "no TCP answer" in str(results[0])
    assert isinstance(results[1], TcpStunConnection)
    results[1].close()
