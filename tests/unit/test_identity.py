"""Identity keys, fingerprints, the known-peers file, trust decisions and secret-file rules."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tcppunch.session.identity import (
    Identity,
    IdentityError,
    InsecureFileError,
    KeyChanged,
    KeyMismatch,
    KnownPeers,
    TrustPolicy,
    parse_fingerprint,
    read_authorized_keys,
    read_token,
)


def test_identity_created_on_first_use_with_mode_0600_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "identity.key"
    first = Identity.load(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Identity.load(path)
    assert again.fingerprint == first.fingerprint
    assert Identity.generate().fingerprint != first.fingerprint
    groups = first.fingerprint.split("-")
    assert len(groups) == 8 and all(len(g) == 4 for g in groups)


def test_default_location_follows_xdg_config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    ident = Identity.load()
    assert ident.path == tmp_path / "tcppunch" / "identity.key"


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    Identity.load(path)
    os.chmod(path, 0o644)
    with pytest.raises(InsecureFileError, match="chmod 600"):
        Identity.load(path)


def test_garbage_key_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.write_text("not a key")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="not an unencrypted PEM private key"):
        Identity.load(path)


def test_fingerprint_parsing_is_forgiving_but_strict_about_content() -> None:
    fp = Identity.generate().fingerprint
    assert parse_fingerprint(fp.lower().replace("-", "")) == fp
    assert parse_fingerprint(f"  {fp} ") == fp
    for bad in ("", "ABCD", fp + "A", fp.replace(fp[0], "1")):
        with pytest.raises(ValueError):
            parse_fingerprint(bad)


def test_known_peers_trusts_first_use_and_refuses_a_changed_key(tmp_path: Path) -> None:
    path = tmp_path / "known_peers"
    one, two = Identity.generate().fingerprint, Identity.generate().fingerprint
    known = KnownPeers(path)
    assert known.check("bob@h:1", one, what="peer 'bob'") is False  # first use: recorded
    assert known.check("bob@h:1", one, what="peer 'bob'") is True
    assert KnownPeers(path).get("bob@h:1") == one  # persisted
    with pytest.raises(KeyChanged) as info:
        KnownPeers(path).check("bob@h:1", two, what="peer 'bob'")
    assert one in str(info.value) and two in str(info.value) and str(path) in str(info.value)


def test_trust_policy_pins_allow_lists_and_coordinator_word() -> None:
    bob, eve = Identity.generate().fingerprint, Identity.generate().fingerprint
    pinned = TrustPolicy(pins={"bob": bob})
    pinned.check_peer("bob", bob, scope="s")
    with pytest.raises(KeyMismatch) as info:
        pinned.check_peer("bob", eve, scope="s")
    assert bob in str(info.value) and eve in str(info.value)

    allow = TrustPolicy(allowed=frozenset({bob}), allow_unknown=False)
    allow.check_peer("anyname", bob, scope="s")
    with pytest.raises(KeyMismatch, match="not in the allowed keys"):
        allow.check_peer("bob", eve, scope="s")

    coordinator_word = TrustPolicy(trust_coordinator=True)
    with pytest.raises(KeyMismatch, match="coordinator says"):
        coordinator_word.check_peer("bob", eve, scope="s", claimed=bob)
    coordinator_word.check_peer("bob", bob, scope="s", claimed=bob)

    tofu = TrustPolicy()
    tofu.check_peer("bob", bob, scope="s")
    with pytest.raises(KeyChanged):
        tofu.check_peer("bob", eve, scope="s")
    tofu.check_peer("bob", eve, scope="other-coordinator")  # ids are per coordinator


def test_coordinator_pin_and_tofu() -> None:
    key, other = Identity.generate().fingerprint, Identity.generate().fingerprint
    policy = TrustPolicy()
    with pytest.raises(KeyMismatch, match="--coordinator-key"):
        policy.check_coordinator("h:1", other, key)
    policy.check_coordinator("h:1", key, None)
    with pytest.raises(KeyChanged):
        policy.check_coordinator("h:1", other, None)


def test_secret_files_follow_the_mode_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    os.chmod(token, 0o640)
    with pytest.raises(InsecureFileError):
        read_token(file=token)
    os.chmod(token, 0o600)
    assert read_token(file=token) == "s3cret"
    monkeypatch.setenv("TCPPUNCH_TOKEN", "from-env")
    assert read_token() == "from-env"
    monkeypatch.delenv("TCPPUNCH_TOKEN")
    assert read_token() is None


def test_authorized_keys_file(tmp_path: Path) -> None:
    a, b = Identity.generate().fingerprint, Identity.generate().fingerprint
    path = tmp_path / "authorized_keys"
    path.write_text(f"# who may be whom\nbob {a}\nbob {b.lower()}\nalice {a}\n")
    os.chmod(path, 0o600)
    assert read_authorized_keys(path) == {"bob": frozenset({a, b}), "alice": frozenset({a})}
    path.write_text("bob\n")
    with pytest.raises(IdentityError, match=":1:"):
        read_authorized_keys(path)
