"""Secrets and keys on the command line: tokens from the environment or a 0600 file, `tcppunch id`,
and the usage rules of --forward."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from tcppunch.cli.main import main
from tcppunch.session.identity import Identity


def test_id_prints_the_key_id_and_creates_the_key_0600(tmp_path: Path) -> None:
    key = tmp_path / "me.key"
    result = CliRunner().invoke(main, ["id", "--identity", str(key)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == Identity.load(key).fingerprint
    assert (key.stat().st_mode & 0o777) == 0o600


def test_id_refuses_a_key_readable_by_others(tmp_path: Path) -> None:
    key = tmp_path / "me.key"
    Identity.load(key)
    os.chmod(key, 0o644)
    result = CliRunner().invoke(main, ["id", "--identity", str(key)])
    assert result.exit_code == 1 and "chmod 600" in result.output


def test_server_refuses_a_token_file_readable_by_others(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    os.chmod(token, 0o644)
    result = CliRunner().invoke(main, ["server", "--listen", "127.0.0.1:9", "--token-file", str(token)])
    assert result.exit_code == 2 and "chmod 600" in result.output


def test_peer_commands_need_a_token_from_env_or_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TCPPUNCH_TOKEN", raising=False)
    result = CliRunner().invoke(main, ["connect", "bob", "--coordinator", "127.0.0.1:9", "--id", "alice"])
    assert result.exit_code == 2 and "TCPPUNCH_TOKEN" in result.output


def test_forward_needs_allowed_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCPPUNCH_TOKEN", "t")
    base = ["listen", "--coordinator", "127.0.0.1:9", "--id", "bob", "--forward", "127.0.0.1:80"]
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 2 and "--allow" in result.output
    result = CliRunner().invoke(main, [*base, "--allow", "not-a-key"])
    assert result.exit_code == 2 and "key id" in result.output


def test_a_malformed_peer_key_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCPPUNCH_TOKEN", "t")
    result = CliRunner().invoke(main, ["connect", "bob", "--coordinator", "127.0.0.1:9", "--id", "a",
                                       "--peer-key", "XYZ"])
    assert result.exit_code == 2 and "--peer-key" in result.output
