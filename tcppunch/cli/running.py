"""Running a command's coroutine: until it ends or a signal comes, with expected failures as one line on
stderr and an exit code (1 failed, 3 unreachable, 130 interrupted) instead of a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from tcppunch.cli.pipes import StreamCutError
from tcppunch.coordinator.control import CoordinatorError
from tcppunch.peer import ConnectFailed
from tcppunch.peer.coordinators import CoordinatorUnresolved
from tcppunch.session.identity import IdentityError
from tcppunch.session.secure import SecureError

EXIT_FAILED = 1
EXIT_UNREACHABLE = 3


def run_command(main: Callable[[], Any]) -> None:
    """Run a command's coroutine; turn expected failures into one line and an exit code."""
    try:
        asyncio.run(main())
    except ConnectFailed as exc:
        click.echo(f"tcppunch: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE if "unreachable" in str(exc) else EXIT_FAILED)
    except CoordinatorError as exc:
        click.echo(f"tcppunch: coordinator: {exc.message} ({exc.code})", err=True)
        sys.exit(EXIT_FAILED)
    except (SecureError, IdentityError) as exc:  # the coordinator's key is not the expected one, or ours
        click.echo(f"tcppunch: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except StreamCutError as exc:  # netcat mode: bytes may be missing on one side
        click.echo(f"tcppunch: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except CoordinatorUnresolved as exc:  # its message names the name and the resolver's reason
        click.echo(f"tcppunch: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    except (ConnectionError, OSError, TimeoutError) as exc:
        click.echo(f"tcppunch: {exc.__class__.__name__}: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        sys.exit(130)


async def until_signal(work: asyncio.Future[Any]) -> None:
    """Wait for ``work`` or SIGINT/SIGTERM, whichever comes first."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for task in (work, stopper):
        if task not in done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if work in done:
        work.result()
