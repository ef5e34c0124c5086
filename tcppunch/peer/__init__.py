"""The embedding API: a :class:`Peer` registers with a coordinator, connects to other peers by id and
accepts their connections — direct by TCP simultaneous open when it can, through the coordinator's
relay when it cannot — and says which one each :class:`Connection` is.

>>> async with Peer("198.51.100.10:3478", "alice", token="s3cret") as peer:
...     conn = await peer.connect("bob")
...     conn.writer.write(b"hello")
...     print(conn.method, conn.remote)

Everything here is a thin driver: the coordinator protocol lives in ``tcppunch.coordinator.control``,
the punch in ``tcppunch.punch``, NAT measurement in ``tcppunch.nat``. :class:`BlockingPeer` gives the
same thing as plain connected ``socket.socket`` objects, for programs with their own event loop.
"""

from tcppunch.coordinator.control import CoordinatorError, PeerList
from tcppunch.peer.blocking import BlockingPeer
from tcppunch.peer.peer import Peer
from tcppunch.peer.types import ConnectFailed, Connection, ConnectionInfo, FailureCode, Method, RelayMode
from tcppunch.punch.plan import PunchAttempt
from tcppunch.wire.coord import PeerInfo
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import NatReport

__all__ = [
    "BlockingPeer",
    "ConnectFailed",
    "Connection",
    "ConnectionInfo",
    "CoordinatorError",
    "Endpoint",
    "FailureCode",
    "Method",
    "NatReport",
    "Peer",
    "PeerInfo",
    "PeerList",
    "PunchAttempt",
    "RelayMode",
]
