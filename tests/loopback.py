"""A real coordinator with STUN on loopback, for tests of everything built on it."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator

from tcppunch.coordinator.auth import Tokens
from tcppunch.coordinator.server import CoordinatorServer
from tcppunch.coordinator.stun_service import StunService, StunServiceConfig
from tcppunch.session.identity import Identity
from tcppunch.wire.endpoint import Endpoint

# One server key for every loopback coordinator of a test run: peers remember a coordinator's key by its
# address (known-peers file), and two tests may get the same free port.
SERVER_IDENTITY = Identity.generate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def loopback_coordinator(token: str) -> AsyncIterator[Endpoint]:
    """Coordinator + STUN on a free port P (and P+1, which STUN needs too: retry if it is taken)."""
    for _ in range(20):
        port = free_port()
        config = StunServiceConfig("127.0.0.1", port, "127.0.0.2", port + 1,
                                   external_tcp=frozenset({Endpoint("127.0.0.1", port)}))
        stack = contextlib.AsyncExitStack()
        try:
            stun = await stack.enter_async_context(StunService(config))
            await stack.enter_async_context(CoordinatorServer("127.0.0.1", port, Tokens(shared=token),
                                                              stun_handler=stun.serve_tcp_connection,
                                                              identity=SERVER_IDENTITY))
        except OSError:
            await stack.aclose()
            continue
        async with stack:
            yield Endpoint("127.0.0.1", port)
        return
    raise RuntimeError("no free pair of ports for the coordinator")
