"""Messages of the coordinator protocol (docs/protocol.md): typed dataclasses <-> JSON frame objects.

Every message type is a frozen dataclass with a ``TYPE`` string; :func:`decode_message` validates a JSON
object field by field (wrong or missing field -> :class:`ProtocolError` ``bad-field``, unknown type ->
``unknown-type``) and :func:`encode_message` turns a message into frame bytes. Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from tcppunch.wire.endpoint import Endpoint, routable_ipv6
from tcppunch.wire.framing import ProtocolError, encode_frame
from tcppunch.wire.natreport import (
    FilteringBehaviour,
    MappingBehaviour,
    NatReport,
    PortAllocation,
    PortMappingProtocol,
    SynResponse,
)


class ErrorCode(StrEnum):
    """Every error code an ERROR frame can carry (docs/protocol.md lists when each is sent)."""

    # framing and message shape (always fatal)
    BAD_PREAMBLE = "bad-preamble"
    UNSUPPORTED_VERSION = "unsupported-version"
    FRAME_TOO_LARGE = "frame-too-large"
    BAD_FRAME = "bad-frame"
    UNKNOWN_TYPE = "unknown-type"
    BAD_FIELD = "bad-field"
    UNEXPECTED_MESSAGE = "unexpected-message"
    TIMEOUT = "timeout"
    # registration (fatal)
    BAD_TOKEN = "bad-token"
    TLS_REQUIRED = "tls-required"  # REGISTER or RELAY outside TLS (no authenticated key)
    ID_OWNED = "id-owned"  # the id belongs to another key
    ID_TAKEN = "id-taken"
    REPLACED = "replaced"
    KEEPALIVE_TIMEOUT = "keepalive-timeout"
    # requests (not fatal: carry the request_id)
    UNKNOWN_PEER = "unknown-peer"
    SELF_CONNECT = "self-connect"
    BUSY = "busy"
    # relay connections (fatal)
    UNKNOWN_SESSION = "unknown-session"
    BAD_PROOF = "bad-proof"
    RELAY_USED = "relay-used"  # this role already joined the session's relay once (joins are single-use)
    RELAY_WRONG_KEY = "relay-wrong-key"  # the joiner's key is not the key of the peer in that role
    RELAY_LIMIT = "relay-limit"
    RELAY_TIMEOUT = "relay-timeout"
    RELAY_OVERFLOW = "relay-overflow"
    SESSION_CANCELLED = "session-cancelled"
    # expose requests (not fatal: carry the request_id)
    EXPOSE_DISABLED = "expose-disabled"
    EXPOSE_PORT_REFUSED = "expose-port-refused"
    EXPOSE_PORT_TAKEN = "expose-port-taken"
    EXPOSE_LIMIT = "expose-limit"
    # server side
    SHUTTING_DOWN = "shutting-down"
    # a cluster node cannot reach the shared registry (Redis): a registration is refused (fatal), a connect
    # to a peer of another node too (not fatal); retry later or at another coordinator
    CLUSTER_UNAVAILABLE = "cluster-unavailable"
    # client side only, never in an ERROR frame: the connection ended without one
    CLOSED = "closed"

    @classmethod
    def of(cls, code: str) -> ErrorCode | str:
        """The member for a known code; an unknown one (a newer server's) stays text."""
        try:
            return cls(code)
        except ValueError:
            return code
    SERVER_BUSY = "server-busy"
    # too many recent failures (wrong tokens, bad relay proofs) from this source address: fatal
    THROTTLED = "throttled"


class Role(StrEnum):
    """The role of a peer in a punch session: the one that asked (CONNECT) or the one asked for."""

    INITIATOR = "initiator"
    RESPONDER = "responder"

    @property
    def other(self) -> Role:
        return Role.RESPONDER if self is Role.INITIATOR else Role.INITIATOR


class RelayAdvice(StrEnum):
    """``relay-now`` when both NAT reports together say a direct connection cannot be made; ``birthday``
    when only a birthday punch can make it (one NAT maps randomly, the other filters by port)."""

    PUNCH = "punch"
    RELAY_NOW = "relay-now"
    BIRTHDAY = "birthday"


class Outcome(StrEnum):
    """What a peer reports at the end of a session."""

    DIRECT = "direct"
    RELAY = "relay"
    FAILED = "failed"
    # The peer gave up on the session (its connect() timed out or was cancelled): the server ends the
    # session and tells the other peer (CANCEL), which stops punching and does not wait in the relay.
    ABANDONED = "abandoned"


# Peer ids: what people type on a command line; no spaces, no control characters, bounded.
PEER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,63}")
MAX_STRING = 256
MAX_TOKEN = 1024
MAX_ENDPOINTS = 16
MAX_PEERS_LISTED = 100
SESSION_KEY_SIZE = 32
RECORDS_KEY_SIZE = 32  # an X25519 public key (REGISTER/REGISTERED "records")
# Encoded size limit of a NAT report inside REGISTER (PUNCH forwards it to the other peer).
MAX_NAT_REPORT = 16 * 1024
# Shape limits of a NAT report's parts, so that no report can expand when it is re-encoded into a PUNCH.
MAX_VERDICT = 2048
MAX_UNTESTED = 16
MAX_NAT_LABEL = 64
# Text fields never carry control characters or lone surrogates (the latter cannot even be encoded).
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def safe_text(text: str, limit: int = MAX_STRING) -> str:
    """``text`` cut to ``limit`` characters with control characters and lone surrogates replaced by
    '?': for server-made strings that quote client input (they must always encode and decode)."""
    return _FORBIDDEN_CHARS.sub("?", text[:limit])


def relay_proof(key: bytes, session_id: str, role: Role) -> bytes:
    """HMAC-SHA256(key, "relay|<session_id>|<role>"): proves knowledge of the session key for one role."""
    return hmac.new(key, f"relay|{session_id}|{role.value}".encode(), hashlib.sha256).digest()


# ---------------------------------------------------------------------------------------------- fields


def _bad(name: str, why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_FIELD, f"field '{name}' {why}")


def _str(obj: dict[str, Any], name: str, *, max_len: int = MAX_STRING) -> str:
    return _text(name, obj.get(name), max_len)


def _text(name: str, value: Any, max_len: int = MAX_STRING) -> str:
    if not isinstance(value, str):
        raise _bad(name, "must be a string")
    if len(value) > max_len:
        raise _bad(name, f"is longer than {max_len} characters")
    if _FORBIDDEN_CHARS.search(value):
        raise _bad(name, "contains control characters")
    return value


def _opt_str(obj: dict[str, Any], name: str, *, max_len: int = MAX_STRING) -> str | None:
    return None if obj.get(name) is None else _str(obj, name, max_len=max_len)


def _opt_bool(obj: dict[str, Any], name: str, *, default: bool) -> bool:
    value = obj.get(name, default)
    if not isinstance(value, bool):
        raise _bad(name, "must be true or false")
    return value


def _peer_id(obj: dict[str, Any], name: str) -> str:
    value = _str(obj, name)
    if not PEER_ID_PATTERN.fullmatch(value):
        raise _bad(name, f"must match {PEER_ID_PATTERN.pattern}")
    return value


def _int(obj: dict[str, Any], name: str, *, low: int = 0, high: int = 2**53) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(name, "must be an integer")
    if not low <= value <= high:
        raise _bad(name, f"must be between {low} and {high}")
    return value


def _float(obj: dict[str, Any], name: str) -> float:
    value = obj.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise _bad(name, "must be a non-negative number")
    return float(value)


def _bool(obj: dict[str, Any], name: str) -> bool:
    value = obj.get(name)
    if not isinstance(value, bool):
        raise _bad(name, "must be true or false")
    return value


def _hex(obj: dict[str, Any], name: str, size: int) -> bytes:
    text = _str(obj, name, max_len=2 * size)
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise _bad(name, "must be hex") from None
    if len(raw) != size:
        raise _bad(name, f"must be {size} bytes")
    return raw


def _opt_hex(obj: dict[str, Any], name: str, size: int) -> bytes | None:
    """An optional field of ``size`` bytes in hex: absent or null is None."""
    return None if obj.get(name) is None else _hex(obj, name, size)


def _enum(obj: dict[str, Any], name: str, kind: type[Any]) -> Any:
    value = obj.get(name)
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise _bad(name, f"must be one of: {allowed}") from None


def _endpoint_value(name: str, value: Any) -> Endpoint:
    if not isinstance(value, dict):
        raise _bad(name, "must be an object {ip, port}")
    ip, port = value.get("ip"), value.get("port")
    if not isinstance(ip, str) or not 0 < len(ip) <= 64:
        raise _bad(name, "needs a string 'ip'")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise _bad(name, "needs an integer 'port' in 0..65535")
    return Endpoint(_ip_literal(name, ip), port)


def _ip_literal(name: str, value: Any) -> str:
    """An IP address in canonical text: never a host name, which the receiver would have to resolve."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _bad(name, f"needs an IP address, not {str(value)[:64]!r}") from None


def _endpoint(obj: dict[str, Any], name: str) -> Endpoint:
    return _endpoint_value(name, obj.get(name))


def _endpoints(obj: dict[str, Any], name: str) -> tuple[Endpoint, ...]:
    value = obj.get(name, [])
    if not isinstance(value, list):
        raise _bad(name, "must be a list")
    if len(value) > MAX_ENDPOINTS:
        raise _bad(name, f"has more than {MAX_ENDPOINTS} entries")
    return tuple(_endpoint_value(name, item) for item in value)


def _ipv6_endpoints(obj: dict[str, Any], name: str) -> tuple[Endpoint, ...]:
    """Optional list (absent = empty) of routable IPv6 endpoints with a real port, in canonical form."""
    out = []
    for e in _endpoints(obj, name):
        if not routable_ipv6(e.ip) or e.port == 0:
            raise _bad(name, "entries must be routable IPv6 unicast addresses with a port 1..65535")
        out.append(Endpoint(str(ipaddress.ip_address(e.ip)), e.port))
    return tuple(dict.fromkeys(out))


def _nat(obj: dict[str, Any], name: str) -> NatReport | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(name, "must be a NAT report object")
    # Bounded so that a PUNCH carrying it (plus everything else) always fits in one frame.
    encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_NAT_REPORT:
        raise _bad(name, f"is larger than {MAX_NAT_REPORT} bytes")
    _check_nat_shape(name, value)
    try:
        return NatReport.from_json(value)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise _bad(name, f"is not a valid NAT report: {exc}") from None


def _check_nat_shape(name: str, value: dict[str, Any]) -> None:
    """Types, counts, lengths and characters of every part :meth:`NatReport.from_json` reads: a string
    where a list belongs would otherwise expand into one list entry per character."""
    udp = _sub_object(name, value, "udp")
    _nullable_str(f"{name}.udp", udp, "nat_type", MAX_NAT_LABEL)
    tcp = _sub_object(name, value, "tcp")
    for key, kind in (("mapping", MappingBehaviour), ("filtering", FilteringBehaviour),
                      ("unsolicited_syn", SynResponse), ("port_allocation", PortAllocation)):
        if tcp.get(key) is not None:
            _enum(tcp, key, kind)
    for key in ("port_preservation", "hairpin"):
        if tcp.get(key) is not None:
            _bool(tcp, key)
    if tcp.get("port_delta") is not None:
        _int(tcp, "port_delta", low=-65535, high=65535)
    if value.get("public") is not None:
        _endpoint(value, "public")
    for ip in _list(name, value, "local", MAX_ENDPOINTS):
        _ip_literal(f"{name}.local", ip)
    if value.get("behind_nat") is not None:
        _bool(value, "behind_nat")
    _nullable_str(name, value, "verdict", MAX_VERDICT)
    for item in _list(name, value, "untested", MAX_UNTESTED):
        _text(f"{name}.untested", item)
    _check_port_mapping_shape(f"{name}.port_mapping", _sub_object(name, value, "port_mapping"))
    ipv6 = _sub_object(name, value, "ipv6")
    if ipv6.get("address") is not None:
        _ip_literal(f"{name}.ipv6.address", ipv6["address"])
    if ipv6.get("works") is not None:
        _bool(ipv6, "works")
    _nullable_str(f"{name}.ipv6", ipv6, "detail", MAX_VERDICT)


def _check_port_mapping_shape(name: str, value: dict[str, Any]) -> None:
    for item in _list(name, value, "protocols", len(PortMappingProtocol)):
        _enum({"protocols": item}, "protocols", PortMappingProtocol)
    mapping = _sub_object(name, value, "mapping")
    if mapping:
        _enum(mapping, "protocol", PortMappingProtocol)
        _endpoint(mapping, "external")
        _int(mapping, "internal_port", low=1, high=65535)
        _int(mapping, "lifetime", high=2**32 - 1)
    _nullable_str(name, value, "error", MAX_VERDICT)


def _sub_object(name: str, value: dict[str, Any], key: str) -> dict[str, Any]:
    part = value.get(key)
    if part is None:
        return {}
    if not isinstance(part, dict):
        raise _bad(f"{name}.{key}", "must be an object")
    return part


def _nullable_str(name: str, value: dict[str, Any], key: str, max_len: int) -> None:
    if value.get(key) is not None:
        _text(f"{name}.{key}", value[key], max_len)


def _list(name: str, value: dict[str, Any], key: str, max_items: int) -> list[Any]:
    items = value.get(key)
    if items is None:
        return []
    if not isinstance(items, list):
        raise _bad(f"{name}.{key}", "must be a list")
    if len(items) > max_items:
        raise _bad(f"{name}.{key}", f"has more than {max_items} entries")
    return items


def _object(obj: dict[str, Any], name: str) -> dict[str, Any]:
    value = obj.get(name, {})
    if not isinstance(value, dict):
        raise _bad(name, "must be an object")
    try:  # free-form, but it must survive being encoded again (JSON may carry lone surrogates)
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise _bad(name, "contains a lone surrogate") from None
    return value


# -------------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Register:
    """Client -> server, first frame of a control connection: who I am and what my NAT looks like."""

    TYPE: ClassVar[str] = "register"
    id: str
    token: str
    nat: NatReport | None = None
    private: tuple[Endpoint, ...] = ()
    swarm: str | None = None
    # The peer's own global IPv6 endpoints (no NAT66: also its public ones); optional on the wire.
    ipv6: tuple[Endpoint, ...] = ()
    # False: this peer opted out of birthday punching (its sessions that need one go to the relay).
    # Optional on the wire (absent = true).
    birthday: bool = True
    # The client's X25519 public key: "leave TLS for the record layer after REGISTERED" (docs/protocol.md).
    # Optional on the wire (absent: the connection stays in TLS).
    records: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        obj = {
            "id": self.id,
            "token": self.token,
            "nat": None if self.nat is None else self.nat.to_json(),
            "private": [e.to_json() for e in self.private],
            "swarm": self.swarm,
            "ipv6": [e.to_json() for e in self.ipv6],
            "birthday": self.birthday,
        }
        if self.records is not None:
            obj["records"] = self.records.hex()
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Register:
        return cls(
            id=_peer_id(obj, "id"),
            token=_str(obj, "token", max_len=MAX_TOKEN),
            nat=_nat(obj, "nat"),
            private=_endpoints(obj, "private"),
            swarm=_opt_str(obj, "swarm"),
            ipv6=_ipv6_endpoints(obj, "ipv6"),
            birthday=_opt_bool(obj, "birthday", default=True),
            records=_opt_hex(obj, "records", RECORDS_KEY_SIZE),
        )


@dataclass(frozen=True)
class Registered:
    """Server -> client: registration accepted; ``observed`` is the public endpoint the server sees."""

    TYPE: ClassVar[str] = "registered"
    id: str
    observed: Endpoint
    keepalive_interval: float
    keepalive_timeout: float
    version: int = 1
    # The server's X25519 public key when REGISTER asked for the record layer: TLS ends right after this.
    records: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": self.id,
            "observed": self.observed.to_json(),
            "keepalive_interval": self.keepalive_interval,
            "keepalive_timeout": self.keepalive_timeout,
            "version": self.version,
        }
        if self.records is not None:
            obj["records"] = self.records.hex()
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Registered:
        return cls(
            id=_peer_id(obj, "id"),
            observed=_endpoint(obj, "observed"),
            keepalive_interval=_float(obj, "keepalive_interval"),
            keepalive_timeout=_float(obj, "keepalive_timeout"),
            version=_int(obj, "version", high=65535),
            records=_opt_hex(obj, "records", RECORDS_KEY_SIZE),
        )


@dataclass(frozen=True)
class Ping:
    """Either direction; the receiver answers PONG with the same ``seq``. The server times its own."""

    TYPE: ClassVar[str] = "ping"
    seq: int

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Ping:
        return cls(seq=_int(obj, "seq"))


@dataclass(frozen=True)
class Pong:
    TYPE: ClassVar[str] = "pong"
    seq: int

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Pong:
        return cls(seq=_int(obj, "seq"))


@dataclass(frozen=True)
class ListPeers:
    """Client -> server: which peers are registered (in ``swarm``, or all when it is null)."""

    TYPE: ClassVar[str] = "list"
    request_id: str
    swarm: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "swarm": self.swarm}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ListPeers:
        return cls(request_id=_str(obj, "request_id", max_len=64), swarm=_opt_str(obj, "swarm"))


@dataclass(frozen=True)
class PeerInfo:
    """One entry of PEERS: enough to choose whom to connect to, not their addresses."""

    id: str
    swarm: str | None
    nat: dict[str, Any]
    verdict: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "swarm": self.swarm, "nat": self.nat, "verdict": self.verdict}

    @classmethod
    def from_json(cls, obj: Any) -> PeerInfo:
        if not isinstance(obj, dict):
            raise _bad("peers", "entries must be objects")
        return cls(
            id=_peer_id(obj, "id"),
            swarm=_opt_str(obj, "swarm"),
            nat=_object(obj, "nat"),
            verdict=_str(obj, "verdict", max_len=4096),
        )


@dataclass(frozen=True)
class Peers:
    """Server -> client: the answer to LIST; ``truncated`` if more peers exist than fit."""

    TYPE: ClassVar[str] = "peers"
    request_id: str
    peers: tuple[PeerInfo, ...]
    truncated: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "peers": [p.to_json() for p in self.peers],
            "truncated": self.truncated,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Peers:
        raw = obj.get("peers")
        if not isinstance(raw, list):
            raise _bad("peers", "must be a list")
        return cls(
            request_id=_str(obj, "request_id", max_len=64),
            peers=tuple(PeerInfo.from_json(p) for p in raw),
            truncated=_bool(obj, "truncated"),
        )


@dataclass(frozen=True)
class Observed:
    """Client -> server: "my next connections leave from around this public endpoint".

    Sent by a peer behind an endpoint-dependent sequential NAT after a fresh STUN binding from its punch
    port, because the mapping the server saw on the control connection goes stale with every new
    connection the NAT allocates. The server accepts a new port on the same address only. Not answered.
    """

    TYPE: ClassVar[str] = "observed"
    observed: Endpoint

    def to_json(self) -> dict[str, Any]:
        return {"observed": self.observed.to_json()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Observed:
        return cls(observed=_endpoint(obj, "observed"))


@dataclass(frozen=True)
class Connect:
    """Client -> server: start a punch session with ``peer``; answered by PUNCH or ERROR (same request_id)."""

    TYPE: ClassVar[str] = "connect"
    request_id: str
    peer: str
    # The caller wants the relay only: both PUNCH copies then say relay-now, so the other side does not
    # spend the punch deadline. Optional on the wire (absent = false).
    relay_only: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "peer": self.peer, "relay_only": self.relay_only}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Connect:
        return cls(request_id=_str(obj, "request_id", max_len=64), peer=_peer_id(obj, "peer"),
                   relay_only=_opt_bool(obj, "relay_only", default=False))


@dataclass(frozen=True)
class Punch:
    """Server -> both peers of a new session: whom to punch to, when to fire, until when, where to relay.

    ``fire_in_ms`` and ``deadline_ms`` count from the moment the frame is received. ``request_id`` is the
    initiator's CONNECT request id, null in the responder's copy.
    """

    TYPE: ClassVar[str] = "punch"
    session_id: str
    key: bytes
    role: Role
    peer_id: str
    peer_observed: Endpoint
    peer_private: tuple[Endpoint, ...]
    peer_nat: NatReport | None
    fire_in_ms: int
    deadline_ms: int
    relay: Endpoint
    relay_advice: RelayAdvice
    request_id: str | None = None
    advice_reason: str = ""
    peer_ipv6: tuple[Endpoint, ...] = ()  # the other peer's IPv6 endpoints (REGISTER's ipv6)
    # The fingerprint of the key that owns peer_id at the coordinator (used only when the user trusts
    # the coordinator's word: see docs/security.md).
    peer_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "key": self.key.hex(),
            "role": self.role.value,
            "peer_id": self.peer_id,
            "peer_observed": self.peer_observed.to_json(),
            "peer_private": [e.to_json() for e in self.peer_private],
            "peer_nat": None if self.peer_nat is None else self.peer_nat.to_json(),
            "fire_in_ms": self.fire_in_ms,
            "deadline_ms": self.deadline_ms,
            "relay": self.relay.to_json(),
            "relay_advice": self.relay_advice.value,
            "request_id": self.request_id,
            "advice_reason": self.advice_reason,
            "peer_ipv6": [e.to_json() for e in self.peer_ipv6],
            "peer_key": self.peer_key,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Punch:
        return cls(
            session_id=_str(obj, "session_id", max_len=64),
            key=_hex(obj, "key", SESSION_KEY_SIZE),
            role=_enum(obj, "role", Role),
            peer_id=_peer_id(obj, "peer_id"),
            peer_observed=_endpoint(obj, "peer_observed"),
            peer_private=_endpoints(obj, "peer_private"),
            peer_nat=_nat(obj, "peer_nat"),
            fire_in_ms=_int(obj, "fire_in_ms", high=600_000),
            deadline_ms=_int(obj, "deadline_ms", high=3_600_000),
            relay=_endpoint(obj, "relay"),
            relay_advice=_enum(obj, "relay_advice", RelayAdvice),
            request_id=_opt_str(obj, "request_id", max_len=64),
            advice_reason=_opt_str(obj, "advice_reason", max_len=1024) or "",
            peer_ipv6=_ipv6_endpoints(obj, "peer_ipv6"),
            peer_key=_opt_str(obj, "peer_key", max_len=64),
        )


@dataclass(frozen=True)
class Result:
    """Client -> server at the end of a session: how it went (logged and counted, never answered)."""

    TYPE: ClassVar[str] = "result"
    session_id: str
    outcome: Outcome
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "outcome": self.outcome.value, "details": self.details}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Result:
        return cls(
            session_id=_str(obj, "session_id", max_len=64),
            outcome=_enum(obj, "outcome", Outcome),
            details=_object(obj, "details"),
        )


@dataclass(frozen=True)
class Cancel:
    """Server -> peer: a session ended early (its other peer left); stop punching, do not relay."""

    TYPE: ClassVar[str] = "cancel"
    session_id: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "reason": self.reason}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Cancel:
        return cls(session_id=_str(obj, "session_id", max_len=64), reason=_str(obj, "reason"))


@dataclass(frozen=True)
class Relay:
    """Client -> server, first frame of a NEW connection: join the relay of a session as ``role``."""

    TYPE: ClassVar[str] = "relay"
    session_id: str
    role: Role
    proof: bytes

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "role": self.role.value, "proof": self.proof.hex()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Relay:
        return cls(
            session_id=_str(obj, "session_id", max_len=64),
            role=_enum(obj, "role", Role),
            proof=_hex(obj, "proof", 32),
        )


@dataclass(frozen=True)
class RelayOk:
    """Server -> both relay connections once paired: from the next byte on, the connection is a pipe."""

    TYPE: ClassVar[str] = "relay-ok"
    session_id: str

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RelayOk:
        return cls(session_id=_str(obj, "session_id", max_len=64))


@dataclass(frozen=True)
class Expose:
    """Client -> server: listen on ``remote_port`` of the server's public address for me; answered by
    EXPOSED or a non-fatal ERROR (``expose-*``) with this request_id."""

    TYPE: ClassVar[str] = "expose"
    request_id: str
    remote_port: int

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "remote_port": self.remote_port}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Expose:
        return cls(request_id=_str(obj, "request_id", max_len=64), remote_port=_int(obj, "remote_port", low=1,
                                                                                    high=65535))


@dataclass(frozen=True)
class Exposed:
    """Server -> client: the server listens at ``address`` for this peer until its control connection ends."""

    TYPE: ClassVar[str] = "exposed"
    request_id: str
    remote_port: int
    address: Endpoint

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "remote_port": self.remote_port, "address": self.address.to_json()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Exposed:
        return cls(
            request_id=_str(obj, "request_id", max_len=64),
            remote_port=_int(obj, "remote_port", low=1, high=65535),
            address=_endpoint(obj, "address"),
        )


@dataclass(frozen=True)
class Visitor:
    """Server -> the exposing peer: a visitor connected from ``visitor`` to ``address`` (an exposed port).

    The peer joins it like a relay: a new connection with RELAY ``{session_id: visitor_id, role:
    responder, proof: relay_proof(key, visitor_id, responder)}`` to ``relay``; after RELAY-OK the
    connection carries the visitor's bytes.
    """

    TYPE: ClassVar[str] = "visitor"
    visitor_id: str
    key: bytes
    remote_port: int
    visitor: Endpoint
    address: Endpoint
    relay: Endpoint

    def to_json(self) -> dict[str, Any]:
        return {
            "visitor_id": self.visitor_id,
            "key": self.key.hex(),
            "remote_port": self.remote_port,
            "visitor": self.visitor.to_json(),
            "address": self.address.to_json(),
            "relay": self.relay.to_json(),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Visitor:
        return cls(
            visitor_id=_str(obj, "visitor_id", max_len=64),
            key=_hex(obj, "key", SESSION_KEY_SIZE),
            remote_port=_int(obj, "remote_port", low=1, high=65535),
            visitor=_endpoint(obj, "visitor"),
            address=_endpoint(obj, "address"),
            relay=_endpoint(obj, "relay"),
        )


@dataclass(frozen=True)
class Error:
    """Server -> client. ``fatal`` errors are followed by the close of the connection."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    fatal: bool = True
    request_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "fatal": self.fatal,
            "request_id": self.request_id,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Error:
        return cls(
            code=_str(obj, "code", max_len=64),
            message=_str(obj, "message", max_len=4096),
            fatal=_bool(obj, "fatal"),
            request_id=_opt_str(obj, "request_id", max_len=64),
        )


Message = (
    Register
    | Registered
    | Ping
    | Pong
    | ListPeers
    | Peers
    | Observed
    | Connect
    | Punch
    | Result
    | Cancel
    | Relay
    | RelayOk
    | Expose
    | Exposed
    | Visitor
    | Error
)

_DECODERS: dict[str, Callable[[dict[str, Any]], Message]] = {
    kind.TYPE: kind.from_json
    for kind in (
        Register,
        Registered,
        Ping,
        Pong,
        ListPeers,
        Peers,
        Observed,
        Connect,
        Punch,
        Result,
        Cancel,
        Relay,
        RelayOk,
        Expose,
        Exposed,
        Visitor,
        Error,
    )
}


def decode_message(obj: dict[str, Any]) -> Message:
    """Validate a frame object (from :class:`~tcppunch.wire.framing.FrameDecoder`) into a message."""
    kind = obj.get("type")
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {str(kind)[:64]!r}")
    return decoder(obj)


def message_to_json(message: Message) -> dict[str, Any]:
    return {"type": message.TYPE, **message.to_json()}


def encode_message(message: Message) -> bytes:
    """Frame bytes for ``message`` (length prefix + JSON)."""
    return encode_frame(message_to_json(message))
