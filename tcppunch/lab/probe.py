"""The lab measures itself: mapping, filtering, port allocation, unsolicited SYNs and hairpin, per host.

This is deliberately independent of ``tcppunch detect`` (plain blocking sockets, a tiny observer that
writes back the source address it sees), so that the lab's ground truth is checked by something other
than the code under test. A NAT type is done when its probe result equals its promise.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from tcppunch.lab.lab import Lab, LabHost
from tcppunch.lab.topology import SERVER_ADDRESSES
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import FilteringBehaviour, MappingBehaviour, SynResponse

OBSERVER_PORTS = (7000, 7001, 7002, 7003, 7004, 7005)
_IO_TIMEOUT = 2.0


@dataclass(frozen=True)
class ProbeResult:
    """What the probe measured for one host."""

    host: str
    local_port: int
    mapped: tuple[Endpoint, ...]
    mapping: MappingBehaviour
    filtering: FilteringBehaviour
    port_preservation: bool
    port_delta: int | None
    unsolicited_syn: SynResponse
    hairpin: bool


def reuse_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return s


class Observer:
    """TCP listeners on the server that write back ``ip port`` of each client, and connect back on demand."""

    def __init__(self, server: LabHost) -> None:
        self.server = server
        self._listeners: list[socket.socket] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        def make() -> list[socket.socket]:
            out = []
            for addr in SERVER_ADDRESSES:
                for port in OBSERVER_PORTS:
                    s = reuse_socket()
                    s.bind((addr, port))
                    s.listen(128)
                    s.settimeout(0.2)
                    out.append(s)
            return out

        self._listeners = self.server.call(make)
        for s in self._listeners:
            t = threading.Thread(target=self._serve, args=(s,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, (ip, port) = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn, ip, port), daemon=True).start()

    def _answer(self, conn: socket.socket, ip: str, port: int) -> None:
        with conn:
            conn.settimeout(30.0)
            with contextlib.suppress(OSError):
                conn.sendall(f"{ip} {port}\n".encode())
                while conn.recv(1024):  # hold until the client closes (bounded by the timeout)
                    pass

    def connect_back(self, src_ip: str, target: Endpoint, timeout: float = 0.5) -> SynResponse:
        """Open a connection from ``src_ip`` (any port) to ``target``: accept / rst / drop."""

        def attempt() -> SynResponse:
            s = socket.socket()
            s.settimeout(timeout)
            s.bind((src_ip, 0))
            try:
                s.connect((target.ip, target.port))
                return SynResponse.ACCEPT
            except ConnectionRefusedError:
                return SynResponse.RST
            except (TimeoutError, OSError):
                return SynResponse.DROP
            finally:
                s.close()

        return self.server.call(attempt)

    def stop(self) -> None:
        self._stop.set()
        for s in self._listeners:
            s.close()
        for t in self._threads:
            t.join(1.0)


@contextlib.contextmanager
def observer(lab: Lab) -> Iterator[Observer]:
    obs = Observer(lab.server)
    obs.start()
    try:
        yield obs
    finally:
        obs.stop()


def probe_host(host: LabHost, obs: Observer, local_port: int = 0) -> ProbeResult:
    """Measure one host's NAT from ``local_port`` (0: pick a free one)."""
    return host.call(_probe_in_netns, host.name, obs, local_port)


def probe_all(lab: Lab) -> dict[str, ProbeResult]:
    """Probe every host of the lab (in parallel: the drop tests wait for time-outs)."""
    results: dict[str, ProbeResult] = {}
    errors: list[BaseException] = []
    with observer(lab) as obs:

        def one(host: LabHost) -> None:
            try:
                results[host.name] = probe_host(host, obs)
            except BaseException as exc:  # re-raised below, in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(h,)) for h in lab.hosts.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60.0)
    if errors:
        raise errors[0]
    return results


def _probe_in_netns(name: str, obs: Observer, local_port: int) -> ProbeResult:
    a1, a2 = SERVER_ADDRESSES
    local_port = local_port or _free_port()
    # Mapping, RFC 5780 section 4.3: one local endpoint to (A1,P1), (A2,P1), (A1,P2), then more destinations.
    targets = [(a1, OBSERVER_PORTS[0]), (a2, OBSERVER_PORTS[0]), (a1, OBSERVER_PORTS[1]),
               (a2, OBSERVER_PORTS[1]), (a1, OBSERVER_PORTS[2])]
    mapped = [_observe(local_port, t) for t in targets]
    mapping = _classify_mapping(mapped)
    delta = 0 if mapping is MappingBehaviour.ENDPOINT_INDEPENDENT else _port_delta(mapped)
    # Filtering, RFC 5780 section 4.4: a fresh local port that has talked to (A1,P1) only; inbound SYNs
    # then come from A2 (a stranger) and from A1 on another port, while we listen on that port.
    fresh = _free_port()
    listener = reuse_socket()
    listener.bind(("0.0.0.0", fresh))
    listener.listen(8)
    accepter = _Accepter(listener)
    hold: socket.socket | None = None
    try:
        hold, held = _open_held(fresh, (a1, OBSERVER_PORTS[3]))
        from_stranger = _connect_back(obs, accepter, a2, held)
        if from_stranger is SynResponse.ACCEPT:
            filtering = FilteringBehaviour.ENDPOINT_INDEPENDENT
        elif _connect_back(obs, accepter, a1, held) is SynResponse.ACCEPT:
            filtering = FilteringBehaviour.ADDRESS_DEPENDENT
        else:
            filtering = FilteringBehaviour.ADDRESS_AND_PORT_DEPENDENT
        hairpin = _try_hairpin(accepter, held)
    finally:
        if hold is not None:
            hold.close()
        accepter.stop()
    return ProbeResult(name, local_port, tuple(mapped), mapping, filtering, mapped[0].port == local_port,
                       delta, from_stranger, hairpin)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port: int = s.getsockname()[1]
        return port


class _Accepter:
    """Accepts (and counts) connections on the probe's listener in the background."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.listener.settimeout(0.1)
        self.accepted = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()
            with self._changed:
                self.accepted += 1
                self._changed.notify_all()

    def wait_beyond(self, count: int, timeout: float = 2.0) -> bool:
        """True once more than ``count`` connections were accepted (bounded wait)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.accepted > count, timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self.listener.close()


def _connect_back(obs: Observer, accepter: _Accepter, src_ip: str, target: Endpoint) -> SynResponse:
    """A connect-back counts as let in only if it reached our own listener (not some other box)."""
    before = accepter.accepted
    outcome = obs.connect_back(src_ip, target)
    if outcome is SynResponse.ACCEPT and not accepter.wait_beyond(before):
        raise RuntimeError(f"a connection to {target} completed but never reached the probed host")
    return outcome


def _observe(local_port: int, target: tuple[str, int]) -> Endpoint:
    s, mapped = _open_held(local_port, target)
    s.close()
    return mapped


def _open_held(local_port: int, target: tuple[str, int]) -> tuple[socket.socket, Endpoint]:
    s = reuse_socket()
    s.settimeout(_IO_TIMEOUT)
    s.bind(("0.0.0.0", local_port))
    s.connect(target)
    line = b""
    while not line.endswith(b"\n") and len(line) < 64:
        chunk = s.recv(64)
        if not chunk:
            break
        line += chunk
    ip, port = line.decode().split()
    return s, Endpoint(ip, int(port))


def _classify_mapping(mapped: list[Endpoint]) -> MappingBehaviour:
    first, other_addr, other_port = mapped[0], mapped[1], mapped[2]
    if first == other_addr == other_port:
        return MappingBehaviour.ENDPOINT_INDEPENDENT
    if first == other_port:
        return MappingBehaviour.ADDRESS_DEPENDENT
    return MappingBehaviour.ADDRESS_AND_PORT_DEPENDENT


def _port_delta(mapped: list[Endpoint]) -> int | None:
    deltas = {b.port - a.port for a, b in itertools.pairwise(mapped)}
    return deltas.pop() if len(deltas) == 1 else None


def _try_hairpin(accepter: _Accepter, own: Endpoint) -> bool:
    """Can this host reach its own public endpoint (and is it really itself that answers)?"""
    before = accepter.accepted
    s = socket.socket()
    s.settimeout(0.5)
    try:
        s.connect((own.ip, own.port))
    except OSError:
        return False
    finally:
        s.close()
    return accepter.wait_beyond(before)
