"""``tcppunch connect`` and ``tcppunch listen``: two hosts meet by name through a coordinator.

Without ``--forward`` / ``--local`` they behave like netcat: stdin goes to the peer, the peer's bytes go
to stdout, and the end of stdin is passed on as a half-close. Progress goes to stderr, one line per
stage, so that stdout carries nothing but the peer's data.

Both run on the pair's one session (docs/sessions.md): netcat mode is one stream, and ``--local``
carries each local TCP client as one more stream of that session, so a second client costs no punch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import click

from tcppunch.cli.params import EndpointType
from tcppunch.cli.peer_options import peer_from_options, peer_options, write_report
from tcppunch.cli.pipes import ByteReader, ByteWriter, StreamCutError, join_streams, pipe_stdio
from tcppunch.cli.running import run_command, until_signal
from tcppunch.cli.secrets import key_id
from tcppunch.peer import ConnectFailed, Peer
from tcppunch.session.driver import MuxStream
from tcppunch.wire.endpoint import Endpoint


@click.command("connect")
@click.argument("peer_name", metavar="PEER")
@peer_options
@click.option("--local", "local_listen", type=EndpointType(default_port=None, resolve=False),
              help="Instead of stdin/stdout: accept local TCP clients on ADDR:PORT and carry each to PEER "
                   "over its own connection (e.g. --local 127.0.0.1:8080 to reach PEER's forwarded service).")
@click.option("--timeout", type=click.FloatRange(1, 600), default=60, show_default=True,
              help="Give up connecting after this many seconds.")
@click.option("--peer-key", metavar="KEY-ID",
              help="PEER's key (`tcppunch id` on its host). Without it, PEER's key is trusted on first use.")
def connect_command(peer_name: str, local_listen: Endpoint | None, timeout: float, peer_key: str | None,
                    report_path: str | None, **common: Any) -> None:
    """Connect to PEER through the coordinator: directly if a hole can be punched, else relayed. Either
    way the connection is TLS 1.3 to PEER's key, checked before a byte of yours is sent.

    \b
    export TCPPUNCH_TOKEN=S
    tcppunch connect bob --coordinator 198.51.100.10:3478 --id alice --peer-key KEY-ID < file
    tcppunch connect bob --coordinator ... --id alice --local 127.0.0.1:8080
    """
    pin = key_id(peer_key, "--peer-key")
    peer_keys = {} if pin is None else {peer_name: pin}
    quiet = common["quiet"]

    async def main() -> None:
        async with peer_from_options(**common, peer_keys=peer_keys) as peer:
            if local_listen is None:
                stream = await _open_stream(peer, peer_name, timeout)
                _session_report(report_path, peer, peer_name)
                try:
                    await pipe_stdio(stream, stream)
                    await _close_confirmed(stream)
                finally:
                    _session_report(report_path, peer, peer_name)
                return
            try:
                await until_signal(asyncio.ensure_future(_serve_local(peer, peer_name, local_listen, timeout,
                                                                       report_path, quiet)))
            finally:
                _session_report(report_path, peer, peer_name)

    run_command(main)


async def _open_stream(peer: Peer, peer_name: str, timeout: float) -> MuxStream:
    try:
        return await asyncio.wait_for(peer.open_stream(peer_name), timeout)
    except TimeoutError:
        raise ConnectFailed(f"no session with {peer_name} within {timeout:g} s", peer=peer_name) from None


async def _close_confirmed(stream: MuxStream) -> None:
    """netcat mode is done with its one stream: close the session, and fail unless the other side
    confirmed the end (only then did every byte we sent arrive; see docs/sessions.md)."""
    session = stream.session
    await session.close()
    if session.close_error is not None:
        raise StreamCutError(f"the peer did not confirm the end of what we sent: {session.close_error}")


def _session_report(path: str | None, peer: Peer, peer_name: str) -> None:
    entry = next((s for s in peer.sessions() if s.peer == peer_name), None)
    if entry is not None:
        write_report(path, peer, entry)


async def _serve_local(peer: Peer, peer_name: str, where: Endpoint, timeout: float, report_path: str | None,
                       quiet: bool) -> None:
    """Each local client becomes one stream of the session with ``peer_name``.

    Every client's task is held here until it ends, and ended here on exit: asyncio keeps only a weak
    reference to a task, and a pending task that nothing else refers to is garbage-collected mid-await,
    which is what prints ``RuntimeError: coroutine ignored GeneratorExit``.
    """
    clients: set[asyncio.Task[Any]] = set()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        clients.add(task)
        task.add_done_callback(clients.discard)
        try:
            stream = await _open_stream(peer, peer_name, timeout)
        except (ConnectFailed, ConnectionError) as exc:
            click.echo(f"tcppunch: local client dropped: {exc}", err=True)
            writer.close()
            return
        _session_report(report_path, peer, peer_name)
        await join_streams((reader, writer), (stream, stream))

    server = await asyncio.start_server(client, where.ip, where.port)
    if not quiet:
        click.echo(f"tcppunch: accepting local clients on {where} for {peer_name}", err=True)
    async with server:
        try:
            await server.serve_forever()
        finally:
            for task in list(clients):  # end every client here, before the peer and the loop go away
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)


@click.command("listen")
@peer_options
@click.option("--forward", type=EndpointType(default_port=None, resolve=False),
              help="Carry each incoming connection to this local TCP service (e.g. 127.0.0.1:80) instead of "
                   "stdin/stdout: expose a service behind NAT to peers.")
@click.option("--once", is_flag=True, help="Exit after the first connection ends.")
@click.option("--allow", "allowed", metavar="KEY-ID", multiple=True,
              help="Accept only peers holding this key (repeatable).")
@click.option("--allow-any", is_flag=True,
              help="Accept any peer's key (each id's first key is remembered; a changed one is refused).")
def listen_command(forward: Endpoint | None, once: bool, allowed: tuple[str, ...], allow_any: bool,
                   report_path: str | None, **common: Any) -> None:
    """Register as --id and take connections from peers: pipe them to stdin/stdout, or --forward them.
    Every connection is TLS 1.3 to the other peer's key. With --forward, say whose: --allow or --allow-any.

    \b
    export TCPPUNCH_TOKEN=S
    tcppunch listen --coordinator 198.51.100.10:3478 --id bob > received
    tcppunch listen --coordinator ... --id bob --forward 127.0.0.1:80 --allow KEY-ID
    """
    if forward is not None and not allowed and not allow_any:
        raise click.UsageError("--forward exposes a service: give --allow KEY-ID (repeatable) for the peers "
                               "that may reach it, or --allow-any")
    if allowed and allow_any:
        raise click.UsageError("--allow and --allow-any exclude each other")
    keys = [key_id(k, "--allow") for k in allowed]
    trust: dict[str, Any] = {"allow": keys} if keys else {}
    peer_id, quiet = common["peer_id"], common["quiet"]

    async def main() -> None:
        async with peer_from_options(**common, **trust) as peer:
            if not quiet:
                click.echo(f"tcppunch: listening as {peer_id} (public {peer.observed}, local {peer.local})",
                           err=True)
            await until_signal(asyncio.ensure_future(_accept_all(peer, forward, once, report_path)))

    run_command(main)


async def _accept_all(peer: Peer, forward: Endpoint | None, once: bool, report_path: str | None) -> None:
    """Serve streams of sessions and dedicated connections alike, until ``once`` is satisfied."""
    loops = [asyncio.ensure_future(_serve_incoming(_streams(peer, report_path), forward, once)),
             asyncio.ensure_future(_serve_incoming(_connections(peer, report_path), forward, once))]
    try:
        done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            # netcat mode lost bytes: not a clean exit
            if not task.cancelled() and isinstance(task.exception(), StreamCutError):
                task.result()
    finally:
        for task in loops:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task


@dataclass(frozen=True)
class _Incoming:
    """What another peer opened to us, a stream of our session or a dedicated connection, as listen uses it."""

    peer: str
    reader: ByteReader
    writer: ByteWriter
    refuse: Callable[[], None]  # ends it when the --forward service cannot be reached
    finish: Callable[[], Awaitable[None]]  # netcat --once: raises StreamCutError unless our end was confirmed


async def _nothing_to_confirm() -> None:
    """A dedicated connection has no end-of-stream confirmation beyond TCP's own."""


async def _streams(peer: Peer, report_path: str | None) -> AsyncIterator[_Incoming]:
    while True:
        try:
            stream = await peer.accept_stream()
        except ConnectionError:
            return
        _session_report(report_path, peer, stream.peer)
        yield _Incoming(stream.peer, stream, stream, stream.reset, functools.partial(_close_confirmed, stream))


async def _connections(peer: Peer, report_path: str | None) -> AsyncIterator[_Incoming]:
    async for conn in peer.incoming():
        write_report(report_path, peer, conn)
        yield _Incoming(conn.peer, conn.reader, conn.writer, conn.close, _nothing_to_confirm)


async def _serve_incoming(incoming: AsyncIterator[_Incoming], forward: Endpoint | None, once: bool) -> None:
    """Pipe each arrival to stdin/stdout, one after the other, or --forward each (all at once)."""
    tasks: set[asyncio.Task[None]] = set()
    async for item in incoming:
        if forward is None:
            try:
                await pipe_stdio(item.reader, item.writer)  # stdin/stdout is one stream: one after the other
                if once:
                    await item.finish()
            except StreamCutError as exc:
                if once:
                    raise
                click.echo(f"tcppunch: {exc}", err=True)  # the next peer may still come
        else:
            task = asyncio.ensure_future(_forward((item.reader, item.writer), item.peer, forward, item.refuse))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if once:
                await task
        if once:
            return
    await asyncio.gather(*tasks, return_exceptions=True)


async def _forward(remote: tuple[ByteReader, ByteWriter], peer: str, target: Endpoint,
                   refuse: Callable[[], None]) -> None:
    """Carry one stream or connection from ``peer`` to the local service at ``target``; ``refuse`` ends it
    (a stream is reset, a connection closed) when the service cannot be reached."""
    try:
        local = await asyncio.wait_for(asyncio.open_connection(target.ip, target.port), 10)
    except (OSError, TimeoutError) as exc:
        click.echo(f"tcppunch: cannot reach {target} for {peer}: {exc}", err=True)
        refuse()
        return
    await join_streams(remote, local)
