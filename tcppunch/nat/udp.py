"""The classic RFC 3489 UDP NAT label, from pystun3, made fast and safe.

pystun3 2.0.0 is used for its decision tree only; its I/O goes through :class:`GuardedUdpSocket`, a
socket look-alike of ours, because the library has defects that would otherwise stall or fool us:

* blocking 2 s timeouts with up to 4 sends per unanswered test -> every test gets one short budget
  (``per_test_timeout``); retransmissions of the same transaction after the budget cost nothing;
* an endless loop when it receives a STUN error response (it just sends again), and a KeyError on a
  message type it does not know -> only Binding success responses to the current transaction reach it;
  anything else (errors, junk, stray packets) is swallowed as if nothing had arrived;
* a wrong type against servers that send only XOR-MAPPED-ADDRESS, and misparsing of attributes whose
  length is not a multiple of 4 -> every accepted response is re-encoded in the classic dialect
  (MAPPED-ADDRESS, SOURCE-ADDRESS, CHANGED-ADDRESS, all 8 bytes) before pystun3 sees it;
* the external address taken from the last (possibly failed) test -> we record the first test's mapped
  address ourselves;
* its 20-byte requests -> padded (RFC 5780 PADDING) to :data:`REQUEST_SIZE`, because a server that
  refuses to amplify (``tcppunch server``) answers no more bytes than a request carried.

The library runs in a thread of its own (it is blocking), off the event loop, behind a hard deadline
(after which the guarded socket refuses every call, so the thread ends promptly) and an exception guard.
Its result is the classic UDP label; it is not the source of truth for TCP.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog

from tcppunch.nat.sockets import endpoint_of, family_of, route_source_ip
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.stun import (
    ChangedAddress,
    MappedAddress,
    MessageClass,
    SourceAddress,
    StunMessage,
    StunMethod,
    StunParseError,
    encode_message,
    padded,
    parse_message,
)

log = structlog.get_logger(__name__)

# pystun3's label when its Test 1 to the changed address gets no answer (the server's alternate is dead).
_CHANGED_ADDRESS_ERROR = "Meet an error, when do Test1 on Changed IP and Port"
MAX_SENDS = 40  # pystun3 sends at most 4 tests x 4 tries; anything beyond is a loop
# Requests are padded to this size (RFC 5780 PADDING): servers that refuse to amplify (ours) answer a
# request with at most as many bytes as it carried, and a full answer with IPv6 addresses is ~140 bytes.
REQUEST_SIZE = 160


class UdpTestAborted(Exception):
    """Raised inside pystun3's thread once the deadline has passed (ends its loops)."""


@dataclass(frozen=True)
class UdpResult:
    """The classic UDP label and what it was based on. ``nat_type`` is None when the test failed."""

    nat_type: str | None
    external: Endpoint | None = None
    changed: Endpoint | None = None
    error: str | None = None
    seconds: float = 0.0


class GuardedUdpSocket:
    """What pystun3 is given instead of a socket: ``sendto`` and ``recvfrom`` with our rules.

    Each new transaction id starts a test with ``per_test_timeout`` to get an answer; ``recvfrom``
    returns only a Binding success for the current transaction, re-encoded in the classic dialect.
    """

    def __init__(self, sock: socket.socket, per_test_timeout: float, deadline: float) -> None:
        self._sock = sock
        self._per_test = per_test_timeout
        self._deadline = deadline  # time.monotonic() value
        self._tid = b""
        self._test_ends = 0.0
        self._sends = 0
        self.aborted = threading.Event()
        self.first_mapped: Endpoint | None = None
        self.first_changed: Endpoint | None = None

    def abort(self) -> None:
        self.aborted.set()

    def _check(self) -> None:
        if self.aborted.is_set() or time.monotonic() >= self._deadline:
            raise UdpTestAborted("UDP test deadline passed")

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        self._check()
        self._sends += 1
        if self._sends > MAX_SENDS:
            raise UdpTestAborted("pystun3 kept sending: aborted")
        tid = bytes(data[4:20])
        if tid != self._tid:
            self._tid = tid
            self._test_ends = min(time.monotonic() + self._per_test, self._deadline)
        elif time.monotonic() >= self._test_ends:
            return len(data)  # a retransmission after the test's budget: pointless, skip it
        self._sock.sendto(padded(bytes(data), REQUEST_SIZE), address)
        return len(data)

    def recvfrom(self, bufsize: int) -> tuple[bytes, Any]:
        while True:
            self._check()
            remaining = self._test_ends - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer within the test's budget")
            self._sock.settimeout(remaining)
            data, address = self._sock.recvfrom(max(bufsize, 2048))  # raises TimeoutError on time-out
            answer = self._classic_answer(data)
            if answer is not None:
                return answer, address

    def _classic_answer(self, data: bytes) -> bytes | None:
        try:
            message = parse_message(data)
        except StunParseError:
            return None
        if (
            message.message_class is not MessageClass.SUCCESS
            or message.method != StunMethod.BINDING
            or data[4:20] != self._tid
        ):
            return None
        mapped = message.mapped()
        if mapped is None:
            return None
        if self.first_mapped is None:
            self.first_mapped = Endpoint(mapped.ip, mapped.port)
            other = message.other()
            self.first_changed = None if other is None else Endpoint(other.ip, other.port)
        attributes: list[Any] = [MappedAddress(mapped)]
        source = message.find(SourceAddress)
        if source is not None:
            attributes.append(source)
        other = message.other()
        if other is not None:
            attributes.append(ChangedAddress(other))
        classic = StunMessage(StunMethod.BINDING, MessageClass.SUCCESS, self._tid, tuple(attributes))
        return encode_message(classic)


def _run_pystun3(guard: GuardedUdpSocket, local_ip: str, local_port: int, server: Endpoint) -> str:
    import stun  # pystun3; imported here so that its module-level state is touched only in this thread

    nat_type, _ = stun.get_nat_type(guard, local_ip, local_port, stun_host=server.ip, stun_port=server.port)
    return str(nat_type)


async def classic_udp_nat_type(
    server: Endpoint,
    *,
    per_test_timeout: float = 0.25,
    deadline: float = 2.0,
    local_ip: str | None = None,
) -> UdpResult:
    """Run pystun3's classic test against ``server`` (a host that speaks RFC 3489 on UDP).

    Never raises (except cancellation): failures come back as ``nat_type=None`` with ``error`` set.
    ``deadline`` bounds the whole test in seconds.
    """
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    try:
        ip = local_ip or route_source_ip(server.ip)
        sock = socket.socket(family_of(ip), socket.SOCK_DGRAM)
        sock.bind((ip, 0))
    except OSError as exc:
        return UdpResult(None, error=f"cannot open a UDP socket towards {server}: {exc}")
    local = endpoint_of(sock.getsockname())
    guard = GuardedUdpSocket(sock, per_test_timeout, started + deadline)
    future: asyncio.Future[str] = loop.create_future()

    def deliver(result: str | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result or "")

    def worker() -> None:
        try:
            result = _run_pystun3(guard, local.ip, local.port, server)
        except BaseException as exc:  # KeyError, IndexError, our abort: all reported, none lost
            loop.call_soon_threadsafe(deliver, None, exc)
        else:
            loop.call_soon_threadsafe(deliver, result, None)
        finally:
            sock.close()

    thread = threading.Thread(target=worker, name="pystun3", daemon=True)
    thread.start()
    try:
        label = await asyncio.wait_for(future, deadline + 0.5)
    except (TimeoutError, UdpTestAborted) as exc:
        guard.abort()
        return _result(None, guard, started, f"UDP test did not finish in {deadline:.1f} s ({exc})")
    except asyncio.CancelledError:
        guard.abort()
        raise
    except Exception as exc:
        log.debug("pystun3_failed", error=repr(exc))
        return _result(None, guard, started, f"pystun3 failed: {exc!r}")
    if label == _CHANGED_ADDRESS_ERROR:
        return _result(None, guard, started, "the server's changed address did not answer")
    return _result(label, guard, started, None)


def _result(label: str | None, guard: GuardedUdpSocket, started: float, error: str | None) -> UdpResult:
    return UdpResult(
        nat_type=label,
        external=guard.first_mapped,
        changed=guard.first_changed,
        error=error,
        seconds=round(time.monotonic() - started, 4),
    )
