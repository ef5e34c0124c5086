"""Command-line interface. The only place that configures structlog rendering."""

from tcppunch.cli.main import main

__all__ = ["main"]
