"""Peers registered at other coordinators of a cluster, as the sans-I/O core sees them.

The cluster driver (``cluster.py``) keeps one record per registered id in Redis; this module is the
I/O-free part: :class:`RemotePeer` (what a PUNCH needs of the other side) and its JSON form. The core asks
the driver for a peer it does not have (:class:`LookupPeer`), gets a :class:`RemotePeer` (or ``None``) back
through ``CoordinatorProtocol.remote_found``, and sends the remote side's PUNCH as :class:`Forward`; that
peer's RESULT comes back the same way (``Way.FROM_PEER``) to the node that holds the session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tcppunch.wire.coord import Connect
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import NatReport


@dataclass(frozen=True)
class RemotePeer:
    """A registered peer as the whole cluster sees it: which node holds its control connection, and the
    fields the other side's PUNCH carries."""

    id: str
    node: str
    observed: Endpoint
    private: tuple[Endpoint, ...] = ()
    nat: NatReport | None = None
    ipv6: tuple[Endpoint, ...] = ()
    owd: float | None = None  # estimated server -> peer one-way delay (s), from its node's keepalives
    birthday: bool = False  # it can take part in birthday-paradox punching
    key: str | None = None  # fingerprint of the key its control connection holds (relay joins must hold it)

    def one_way_delay(self) -> float | None:
        return self.owd

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "id": self.id,
            "node": self.node,
            "observed": self.observed.to_json(),
            "private": [e.to_json() for e in self.private],
            "nat": None if self.nat is None else self.nat.to_json(),
            "ipv6": [e.to_json() for e in self.ipv6],
            "owd": self.owd,
            "birthday": self.birthday,
            "key": self.key,
        }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> RemotePeer:
        """Raises ValueError (or KeyError/TypeError, wrapped) on a record that is not ours."""
        try:
            data = json.loads(text)
            owd = data.get("owd")
            return cls(
                id=str(data["id"]),
                node=str(data["node"]),
                observed=Endpoint.from_json(data["observed"]),
                private=tuple(Endpoint.from_json(e) for e in data.get("private", [])),
                nat=None if data.get("nat") is None else NatReport.from_json(data["nat"]),
                ipv6=tuple(Endpoint.from_json(e) for e in data.get("ipv6", [])),
                owd=None if owd is None else float(owd),
                birthday=bool(data.get("birthday", False)),
                key=None if data.get("key") is None else str(data["key"]),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a peer record: {exc!r}") from exc


class ClaimAnswer(StrEnum):
    """The cluster's answer to a :class:`Claim` (``CoordinatorProtocol.claim_result``)."""

    GRANTED = "granted"
    TAKEN = "taken"  # another node holds the id
    UNAVAILABLE = "unavailable"  # the registry could not be asked (Redis unreachable): not granted


@dataclass(frozen=True)
class Claim:
    """Claim ``peer`` cluster-wide (the id is registered here now); the answer comes back as
    ``CoordinatorProtocol.claim_result``."""

    conn: int
    peer: RemotePeer


@dataclass(frozen=True)
class Release:
    """``peer_id`` is no longer registered here: free it cluster-wide (if this node still holds it)."""

    peer_id: str


@dataclass(frozen=True)
class LookupPeer:
    """CONNECT to an id this node does not have: find it in the cluster, answer with ``remote_found``
    (``unavailable=True`` when the registry could not be asked)."""

    conn: int
    request: Connect


class Way(StrEnum):
    """Which way a forwarded frame goes: ``to`` a peer registered at the receiving node (a PUNCH, a
    CANCEL), or ``from`` a peer of the sending node to the node that holds its session (its RESULT)."""

    TO_PEER = "to"
    FROM_PEER = "from"


@dataclass(frozen=True)
class Forward:
    """Frame bytes between cluster node ``origin`` (the sender) and node ``node``, about ``peer_id`` and
    session ``session_id``. ``expires_in`` (s, a PUNCH only): how long the session lives at its node, so the
    receiving node routes the peer's RESULT back that long."""

    node: str
    peer_id: str
    data: bytes
    way: Way = Way.TO_PEER
    origin: str = ""
    session_id: str = ""
    expires_in: float = 0.0

    def encode(self) -> bytes:
        """The pub/sub message: one header line (no field contains a space or a newline), then the frame."""
        header = f"{self.way.value} {self.origin or '-'} {self.session_id or '-'} {self.peer_id} " \
                 f"{round(self.expires_in * 1000)}\n"
        return header.encode() + self.data

    @classmethod
    def decode(cls, node: str, message: bytes) -> Forward:
        """The message :meth:`encode` made, received at ``node``; ValueError if it is not one."""
        header, newline, data = message.partition(b"\n")
        fields = header.decode("ascii", "replace").split(" ")
        if not newline or len(fields) != 5 or not fields[4].isdigit():
            raise ValueError(f"not a forwarded frame: {header[:80]!r}")
        way, origin, session_id, peer_id, ms = fields
        return cls(node, peer_id, data, Way(way), "" if origin == "-" else origin,
                   "" if session_id == "-" else session_id, int(ms) / 1000)


ClusterAction = Claim | Release | LookupPeer | Forward
