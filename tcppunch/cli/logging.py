"""structlog set-up for the CLI: console rendering for people, JSON lines with ``--log-json``.

Library modules only call ``structlog.get_logger()`` and bind context; they never configure.
Logs go to stderr so that stdout stays free for piped data and ``--json`` output.
"""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = ("debug", "info", "warning", "error")


def configure_logging(level: str = "warning", json_output: bool = False) -> None:
    """Route structlog to stderr at ``level``; JSON lines if ``json_output``."""
    numeric = getattr(logging, level.upper())
    renderer: structlog.typing.Processor
    if json_output:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
