"""Long-term identities: an Ed25519 key per peer (and per server), its fingerprint, and who we trust.

A peer's public identity is its **fingerprint**: SHA-256 of the raw 32-byte Ed25519 public key, the
first 160 bits in base32, in eight groups of four (``ABCD-EFGH-...``), short enough to copy by hand.
Ids at the coordinator are names; fingerprints are what the secure channel checks.

Files (all under ``$XDG_CONFIG_HOME/tcppunch/``, default ``~/.config/tcppunch/``):

- ``identity.key``: the private key, PKCS#8 PEM, mode 0600; created on first use. A key file that group
  or others may read is refused (:class:`InsecureFileError`).
- ``known_peers``: ``NAME FINGERPRINT`` lines, like SSH's known_hosts. Names are
  ``coordinator:HOST:PORT`` and ``PEER-ID@HOST:PORT``. Trust on first use; a changed key is refused
  (:class:`KeyChanged`) until the user removes the line.

Secret files (tokens, authorized keys) go through :func:`read_private_file`, which applies the same
mode rule.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

FINGERPRINT_CHARS = 32  # 160 bits of SHA-256 in base32
_GROUP = 4
_FINGERPRINT_RE = re.compile(r"^[A-Z2-7]{32}$")


class IdentityError(Exception):
    """An identity, key or trust file cannot be used (the message says which and why)."""


class InsecureFileError(IdentityError):
    """A secret file is readable or writable by group or others."""


class KeyMismatch(IdentityError):
    """The other side holds a different key than the one it must hold (names both fingerprints)."""

    def __init__(self, message: str, *, expected: str | None, actual: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class KeyChanged(KeyMismatch):
    """A known peer or coordinator came back with another key (known-peers file)."""


# ------------------------------------------------------------------------------------- fingerprints


def fingerprint_of_key(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    text = base64.b32encode(hashlib.sha256(raw).digest()).decode("ascii")[:FINGERPRINT_CHARS]
    return "-".join(text[i : i + _GROUP] for i in range(0, FINGERPRINT_CHARS, _GROUP))


def fingerprint_of_cert(der: bytes) -> str:
    """The fingerprint of the Ed25519 key in a DER certificate; :class:`IdentityError` for other keys."""
    try:
        public = x509.load_der_x509_certificate(der).public_key()
    except ValueError as exc:
        raise IdentityError(f"unreadable certificate: {exc}") from None
    if not isinstance(public, Ed25519PublicKey):
        raise IdentityError("the certificate's key is not Ed25519")
    return fingerprint_of_key(public)


def parse_fingerprint(text: str) -> str:
    """A fingerprint as the user typed it (any case, with or without dashes) in canonical form."""
    compact = text.strip().upper().replace("-", "").replace(" ", "")
    if not _FINGERPRINT_RE.match(compact):
        raise ValueError(f"{text!r} is not a tcppunch key id (32 base32 characters, e.g. from 'tcppunch id')")
    return "-".join(compact[i : i + _GROUP] for i in range(0, FINGERPRINT_CHARS, _GROUP))


# ------------------------------------------------------------------------------------- files


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tcppunch"


def default_identity_path() -> Path:
    return config_dir() / "identity.key"


def default_known_peers_path() -> Path:
    return config_dir() / "known_peers"


def check_private(path: Path) -> None:
    """Refuse a file that group or others may read or write (it holds a secret)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecureFileError(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"it holds a secret: run 'chmod 600 {path}'"
        )


def read_private_file(path: str | Path) -> str:
    """The text of a secret file (token, key list) after :func:`check_private`."""
    path = Path(path)
    check_private(path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"cannot read {path}: {exc}") from None


def _write_new_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 atomically; if another process created it first, keep theirs."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".identity-")
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if the file exists: never overwrite a key
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


# ------------------------------------------------------------------------------------- identity

# OpenSSL checks a certificate chain before the handshake can finish, and Python's ssl has no callback
# to replace that check. So every identity certificate is issued by one *public* anchor whose private key
# anyone can derive from this constant: the chain check then passes for every well-formed identity, and
# proves nothing. Authentication is the handshake's CertificateVerify (possession of the leaf key) plus
# our own check of the leaf key's fingerprint right after the handshake, before any byte is used.
_ANCHOR_SEED = hashlib.sha256(b"tcppunch public certificate anchor v1 (not a secret)").digest()
_FOREVER = (datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC), datetime.datetime(9999, 12, 31, tzinfo=datetime.UTC))


def _anchor() -> tuple[Ed25519PrivateKey, x509.Certificate]:
    key = Ed25519PrivateKey.from_private_bytes(_ANCHOR_SEED)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tcppunch public anchor")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(_FOREVER[0])
        .not_valid_after(_FOREVER[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, None)
    )
    return key, cert


_ANCHOR_KEY, _ANCHOR_CERT = _anchor()
ANCHOR_DER = _ANCHOR_CERT.public_bytes(serialization.Encoding.DER)
ANCHOR_FINGERPRINT = fingerprint_of_key(_ANCHOR_KEY.public_key())


@dataclass(frozen=True)
class Identity:
    """A private key, its certificate (for TLS) and its fingerprint."""

    key: Ed25519PrivateKey
    path: Path | None = None
    fingerprint: str = field(init=False)
    cert: x509.Certificate = field(init=False, repr=False)

    def __post_init__(self) -> None:
        public = self.key.public_key()
        fp = fingerprint_of_key(public)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fp)]))
            .issuer_name(_ANCHOR_CERT.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_FOREVER[0])
            .not_valid_after(_FOREVER[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(_ANCHOR_KEY, None)
        )
        object.__setattr__(self, "fingerprint", fp)
        object.__setattr__(self, "cert", cert)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path | None = None, *, create: bool = True) -> Identity:
        """The identity in ``path`` (default: the config directory's), created on first use (0600)."""
        path = Path(path) if path is not None else default_identity_path()
        if not path.exists():
            if not create:
                raise IdentityError(f"no identity file {path}")
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            _write_new_private(path, pem)
        text = read_private_file(path)
        try:
            key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
        except (ValueError, TypeError, UnicodeEncodeError) as exc:
            raise IdentityError(f"{path} is not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path} holds a {type(key).__name__}; tcppunch identities are Ed25519")
        return cls(key, path)

    def pem_chain(self) -> bytes:
        """Private key and certificate, PEM, for ``SSLContext.load_cert_chain`` (a secret)."""
        key = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return key + self.cert.public_bytes(serialization.Encoding.PEM)


# ------------------------------------------------------------------------------------- trust


class KnownPeers:
    """The known-peers file: trust on first use, refuse a changed key.

    ``path=None`` keeps the entries in memory only (tests, throw-away peers).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, str] = {}
        if self.path is not None and self.path.exists():
            self._entries = dict(self._parse(self.path))

    @classmethod
    def default(cls) -> KnownPeers:
        return cls(default_known_peers_path())

    @staticmethod
    def _parse(path: Path) -> Iterable[tuple[str, str]]:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise IdentityError(f"cannot read known-peers file {path}: {exc}") from None
        return _key_lines(text, path)

    def get(self, name: str) -> str | None:
        return self._entries.get(name)

    def check(self, name: str, fingerprint: str, *, what: str) -> bool:
        """True if ``name`` was known with this key; records it if unknown (returns False: first use).
        Raises :class:`KeyChanged` if it was known with another key."""
        if self.path is not None and self.path.exists():
            self._entries.update(self._parse(self.path))  # another process may have added it
        known = self._entries.get(name)
        if known == fingerprint:
            return True
        if known is not None:
            where = f" (line '{name} {known}' in {self.path})" if self.path else ""
            raise KeyChanged(
                f"{what} presented key {fingerprint}, but it is known with key {known}{where}. "
                "Someone may be impersonating it; if the key really changed, remove that line.",
                expected=known,
                actual=fingerprint,
            )
        self._entries[name] = fingerprint
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(self.path, "a", encoding="utf-8") as out:  # one short append: atomic on POSIX
                out.write(f"{name} {fingerprint}\n")
        return False


def read_authorized_keys(path: str | Path) -> dict[str, frozenset[str]]:
    """``ID FINGERPRINT`` lines (an id may appear on several lines, one key each) -> id -> keys."""
    owners: dict[str, set[str]] = {}
    for peer_id, fingerprint in _key_lines(read_private_file(path), path):
        owners.setdefault(peer_id, set()).add(fingerprint)
    return {peer: frozenset(keys) for peer, keys in owners.items()}


def _key_lines(text: str, path: str | Path) -> list[tuple[str, str]]:
    """``NAME FINGERPRINT`` lines; blank lines and ``#`` comments skipped; errors name file and line."""
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            if len(parts) != 2:
                raise ValueError("expected NAME FINGERPRINT")
            pairs.append((parts[0], parse_fingerprint(parts[1])))
        except ValueError as exc:
            raise IdentityError(f"{path}:{number}: {exc}") from None
    return pairs


def read_token(*, env: str = "TCPPUNCH_TOKEN", file: str | Path | None = None) -> str | None:
    """The token from ``file`` (mode rules apply; surrounding whitespace stripped) or the environment."""
    if file is not None:
        token = read_private_file(file).strip()
        if not token:
            raise IdentityError(f"token file {file} is empty")
        return token
    with contextlib.suppress(KeyError):
        return os.environ[env] or None
    return None


@dataclass
class TrustPolicy:
    """Decides whether the key another peer presented is the key of the id it claims.

    In order: a pin for that id (``connect --peer-key``) must match exactly; a key in ``allowed``
    (``listen --allow``) is accepted; with ``allowed`` given and ``allow_unknown`` false nobody else is;
    otherwise the known-peers file decides (trust on first use, refuse a changed key), and with
    ``trust_coordinator`` an unknown peer must hold the key the coordinator bound to its id.
    """

    known: KnownPeers = field(default_factory=KnownPeers)
    pins: dict[str, str] = field(default_factory=dict)
    allowed: frozenset[str] = frozenset()
    allow_unknown: bool = True
    trust_coordinator: bool = False

    def check_peer(self, peer_id: str, fingerprint: str, *, scope: str, claimed: str | None = None) -> None:
        """Raise :class:`KeyMismatch` unless ``fingerprint`` may speak as ``peer_id`` (``scope``: the
        coordinator HOST:PORT ids belong to; ``claimed``: the key the coordinator says owns the id)."""
        pin = self.pins.get(peer_id)
        if pin is not None:
            if fingerprint != pin:
                raise KeyMismatch(f"peer {peer_id!r} presented key {fingerprint}, but --peer-key expects {pin}",
                                  expected=pin, actual=fingerprint)
            return
        if fingerprint in self.allowed:
            return
        if self.allowed and not self.allow_unknown:
            raise KeyMismatch(f"peer {peer_id!r} presented key {fingerprint}, which is not in the allowed keys "
                              f"({', '.join(sorted(self.allowed))})", expected=None, actual=fingerprint)
        name = f"{peer_id}@{scope}"
        known = self.known.get(name)
        if known is None and self.trust_coordinator and claimed is not None and claimed != fingerprint:
            raise KeyMismatch(f"peer {peer_id!r} presented key {fingerprint}, but the coordinator says its key "
                              f"is {claimed}", expected=claimed, actual=fingerprint)
        if known is None and not self.allow_unknown:
            raise KeyMismatch(f"peer {peer_id!r} (key {fingerprint}) is not known and not allowed",
                              expected=None, actual=fingerprint)
        self.known.check(name, fingerprint, what=f"peer {peer_id!r}")

    def check_coordinator(self, scope: str, fingerprint: str, pin: str | None) -> None:
        """The coordinator at ``scope`` must hold ``pin`` (``--coordinator-key``), or its known key."""
        if pin is not None:
            if fingerprint != pin:
                raise KeyMismatch(f"the coordinator {scope} presented key {fingerprint}, but --coordinator-key "
                                  f"expects {pin}", expected=pin, actual=fingerprint)
            return
        self.known.check(f"coordinator:{scope}", fingerprint, what=f"the coordinator {scope}")
