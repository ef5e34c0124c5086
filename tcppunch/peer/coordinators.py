"""The coordinators a peer is given (``--coordinator``, repeated), as the addresses it tries in turn.

The one place that turns what the user wrote into candidates. An IP literal is one candidate, as given.
A host name stands for every address the system resolver has for it (A and AAAA: ``getaddrinfo`` on the
event loop's executor, so /etc/hosts and DNS as every other program sees them), the two families
interleaved as RFC 8305 section 4 suggests, so one name can list the nodes of a cluster. Names are
resolved at start (one that does not resolve is an error that names it) and again whenever the peer must
register again, so a DNS change is followed; a name that fails then keeps its last addresses.

The coordinator's key is held per name, not per address: a pin (``--coordinator-key``) binds every
address, and without one the known-peers file records the key under the name as given
(:meth:`Coordinators.trust_scope`), so an address that DNS adds later must present the key the name had.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from typing import TypeVar

import structlog

from tcppunch.coordinator.control import CoordinatorError
from tcppunch.wire.endpoint import Endpoint, split_host_port

T = TypeVar("T")
log = structlog.get_logger("tcppunch.peer")

DEFAULT_PORT = 3478
# The longest one resolution may take before the name counts as unresolved this time. glibc's own
# timeouts (5 s per query, 2 attempts) usually end it sooner.
RESOLVE_TIMEOUT = 12.0
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


@dataclass(frozen=True)
class CoordinatorName:
    """One ``--coordinator`` argument: an IP literal (canonical) or a host name (lower case), and a port."""

    host: str
    port: int

    @classmethod
    def parse(cls, given: str | Endpoint | CoordinatorName, default_port: int = DEFAULT_PORT) -> CoordinatorName:
        """``HOST:PORT``, ``[V6]:PORT`` or ``HOST``; ValueError (saying why) if it is neither an IP
        address nor a well-formed host name."""
        if isinstance(given, CoordinatorName):
            return given
        if isinstance(given, Endpoint):
            return cls(given.ip, given.port)
        host, port = split_host_port(given, default_port)
        try:
            return cls(str(ipaddress.ip_address(host)), port)
        except ValueError:
            pass
        name = host[:-1] if host.endswith(".") else host
        if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
            raise ValueError(f"{given.strip()!r}: {host!r} is neither an IP address nor a host name")
        return cls(name.lower(), port)

    @property
    def literal(self) -> Endpoint | None:
        """The endpoint itself when the host is an IP address; None for a name."""
        try:
            return Endpoint(str(ipaddress.ip_address(self.host)), self.port)
        except ValueError:
            return None

    def __str__(self) -> str:
        literal = self.literal
        return str(literal) if literal is not None else f"{self.host}:{self.port}"


class CoordinatorUnresolved(OSError):
    """A coordinator's host name gave no address this time (the resolver's reason)."""

    def __init__(self, name: CoordinatorName, reason: str) -> None:
        super().__init__(f"cannot resolve the coordinator {name}: {reason}")
        self.name = name


Resolver = Callable[[str, int], Awaitable[Sequence[Endpoint]]]


async def system_resolver(host: str, port: int) -> list[Endpoint]:
    """Every TCP address of ``host``, in getaddrinfo's order (RFC 6724's preference); socket.gaierror if none."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [Endpoint(str(ipaddress.ip_address(info[4][0])), port) for info in infos
            if info[0] in (socket.AF_INET, socket.AF_INET6)]


def interleave(addresses: Iterable[Endpoint]) -> list[Endpoint]:
    """RFC 8305 section 4: duplicates dropped, the first address's family first, then the families take
    turns (each in the resolver's order) until one runs out, and the rest of the other follows."""
    unique = list(dict.fromkeys(addresses))
    if not unique:
        return []
    first_v6 = ":" in unique[0].ip
    same = [e for e in unique if (":" in e.ip) == first_v6]
    other = [e for e in unique if (":" in e.ip) != first_v6]
    return [e for pair in zip_longest(same, other) for e in pair if e is not None]


class Coordinators:
    """The coordinators as given and the candidates they stand for: in the order given, each name's
    addresses interleaved, every address once. ``ipv6=False`` leaves names' IPv6 addresses out (literals
    stay as given). ``resolver``: host name and port -> addresses (tests give their own)."""

    def __init__(self, given: Sequence[str | Endpoint | CoordinatorName], *, ipv6: bool = True,
                 resolver: Resolver = system_resolver) -> None:
        self.names = tuple(CoordinatorName.parse(g) for g in given)
        if not self.names:
            raise ValueError("give at least one coordinator")
        self._ipv6 = ipv6
        self._resolver = resolver
        self._addresses: dict[CoordinatorName, tuple[Endpoint, ...]] = {
            name: (literal,) for name in self.names if (literal := name.literal) is not None}
        self._scopes: dict[Endpoint, str] = {}
        self.candidates: tuple[Endpoint, ...] = self._order()

    def addresses(self, name: CoordinatorName) -> tuple[Endpoint, ...]:
        """What ``name`` stands for now (empty before a host name's first resolution)."""
        return self._addresses.get(name, ())

    async def resolve(self, *, strict: bool) -> list[CoordinatorUnresolved]:
        """Resolve every host name again, all at once. ``strict`` (at start): a name without an address
        raises :class:`CoordinatorUnresolved`, naming it. Otherwise such a name keeps its last addresses
        and its error is returned."""
        names = [name for name in self.names if name.literal is None]
        found = await asyncio.gather(*(self._lookup(name) for name in names), return_exceptions=True)
        errors: list[CoordinatorUnresolved] = []
        for name, result in zip(names, found, strict=True):
            if isinstance(result, CoordinatorUnresolved):
                if strict:
                    raise result
                errors.append(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                self._addresses[name] = result
        self.candidates = self._order()
        return errors

    def trust_scope(self, endpoint: Endpoint) -> str:
        """Under what the coordinator at ``endpoint`` has its key known: the coordinator as given that
        listed it (a name for all of its addresses, a literal for itself)."""
        return self._scopes.get(endpoint, str(endpoint))

    @property
    def scope(self) -> str:
        """Where peer ids are names: the first coordinator as given (stable across DNS changes)."""
        return str(self.names[0])

    async def _lookup(self, name: CoordinatorName) -> tuple[Endpoint, ...]:
        try:
            found = await asyncio.wait_for(self._resolver(name.host, name.port), RESOLVE_TIMEOUT)
        except socket.gaierror as exc:
            raise CoordinatorUnresolved(name, exc.strerror or str(exc)) from None
        except TimeoutError:
            raise CoordinatorUnresolved(name, f"no answer within {RESOLVE_TIMEOUT:g} s") from None
        usable = [e for e in found if self._ipv6 or ":" not in e.ip]
        if not usable:
            raise CoordinatorUnresolved(name, "no address" if self._ipv6 else "no IPv4 address (IPv6 is off)")
        return tuple(interleave(usable))

    def _order(self) -> tuple[Endpoint, ...]:
        scopes: dict[Endpoint, str] = {}
        for name in self.names:
            for endpoint in self._addresses.get(name, ()):
                scopes.setdefault(endpoint, str(name))
        self._scopes = scopes
        return tuple(scopes)


async def first_answer(candidates: Sequence[Endpoint], attempt: Callable[[Endpoint], Awaitable[T]], *,
                       start: int = 0) -> T:
    """``attempt`` (register, expose...) at each candidate in turn, from index ``start`` round the list:
    the first success. Else raises the last error, a coordinator's answer (id-taken, bad-token) before
    another one's silence or refusal, which says less. A wrong key (SecureError) ends it at once."""
    if not candidates:
        raise ValueError("no coordinator address to try")
    errors: list[Exception] = []
    for turn in range(len(candidates)):
        where = candidates[(start + turn) % len(candidates)]
        try:
            return await attempt(where)
        except (CoordinatorError, OSError, TimeoutError) as exc:
            errors.append(exc)
            if len(candidates) > 1:
                log.info("peer.coordinator_failed", coordinator=str(where), error=str(exc))
    answers = [e for e in errors if isinstance(e, CoordinatorError)]
    raise (answers or errors)[-1]
