"""The click group itself: help, version, logging options."""

from click.testing import CliRunner

from tcppunch import __version__
from tcppunch.cli import main


def test_version_is_printed() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_help_explains_the_tool() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "hole punching" in " ".join(result.output.split())


def test_unknown_log_level_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["--log-level", "loud"])
    assert result.exit_code == 2
    assert "Invalid value for '--log-level'" in result.output


def test_server_help_documents_every_limit() -> None:
    """Issue 9: every limit is in `tcppunch server --help` (options with defaults, and the Limits list)."""
    result = CliRunner().invoke(main, ["server", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--max-connections", "--relay-source-mb", "--relay-token-mb", "--relay-max-minutes",
                   "--no-udp-change-request"):
        assert option in result.output
    for limit in ("64 unauthenticated per source", "throttled", "16 per requester", "truncated",
                  "never answers more bytes", "each message complete within 5 s"):
        assert limit in result.output
