"""click parameter types shared by the commands."""

from __future__ import annotations

import click

from tcppunch.peer.coordinators import CoordinatorName
from tcppunch.wire.endpoint import Endpoint

DEFAULT_PORT = 3478


class EndpointType(click.ParamType[Endpoint]):
    """HOST:PORT on the command line (:meth:`Endpoint.parse`; host names only where ``resolve``)."""

    name = "HOST:PORT"

    def __init__(self, default_port: int | None = DEFAULT_PORT, resolve: bool = True) -> None:
        self.default_port = default_port
        self.resolve = resolve

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Endpoint:
        if isinstance(value, Endpoint):
            return value
        try:
            return Endpoint.parse(str(value), self.default_port, resolve=self.resolve)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class CoordinatorType(click.ParamType[CoordinatorName]):
    """--coordinator: an IP address or a host name (resolved by the peer to all its addresses), and a port."""

    name = "HOST:PORT"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> CoordinatorName:
        try:
            return CoordinatorName.parse(value if isinstance(value, (Endpoint, CoordinatorName)) else str(value),
                                         DEFAULT_PORT)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


COORDINATOR_HELP = ("A host name stands for all its addresses (A and AAAA), tried in turn and looked up again "
                    "whenever we must register again, so a DNS change is followed; the --coordinator-key pin, or "
                    "else the key first seen for the name, holds for every address of it.")
