"""Peers registered at other coordinators of a cluster, as the sans-I/O core sees them.

The cluster driver (``cluster.py``) keeps one record per registered id in Redis; this module is the
I/O-free part: :class:`RemotePeer` (what a PUNCH needs of the other side) and its JSON form. The core asks
the driver for a peer it does not have (:class:`LookupPeer`), gets a :class:`RemotePeer` (or ``None``) back
through ``CoordinatorProtocol.remote_found``, and sends the remote side's PUNCH as :class:`Forward`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Claim:
    """Claim ``peer`` cluster-wide (the id is registered here now); a refusal comes back as
    ``CoordinatorProtocol.claim_refused``."""

    conn: int
    peer: RemotePeer


@dataclass(frozen=True)
class Release:
    """``peer_id`` is no longer registered here: free it cluster-wide (if this node still holds it)."""

    peer_id: str


@dataclass(frozen=True)
class LookupPeer:
    """CONNECT to an id this node does not have: find it in the cluster, answer with ``remote_found``."""

    conn: int
    request: Connect


@dataclass(frozen=True)
class Forward:
    """Frame bytes for ``peer_id``, whose control connection is on cluster node ``node``."""

    node: str
    peer_id: str
    data: bytes


ClusterAction = Claim | Release | LookupPeer | Forward
