"""The metainfo file (what a .torrent is to BitTorrent): name, length, piece size, one SHA-256 per piece,
and the swarm name peers register under. Its own SHA-256 (``info_hash``) identifies the content in the
handshake, so two peers never trade pieces of different files.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_PIECE_SIZE = 16 * 1024
MAX_PIECE_SIZE = 4 * 1024 * 1024
MAX_LENGTH = 1 << 40  # 1 TiB: far beyond the example, small enough that piece counts stay sane
MAX_METAINFO_BYTES = 8 * 1024 * 1024
SWARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,63}")
FORMAT = "tcppunch-swarm/1"


class MetainfoError(ValueError):
    """A metainfo file that is not one: says which field is wrong and why."""


@dataclass(frozen=True)
class Metainfo:
    name: str
    length: int
    piece_size: int
    pieces: tuple[bytes, ...]  # SHA-256 digest of each piece, in order
    swarm: str

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not SWARM_NAME.fullmatch(self.swarm):
            raise MetainfoError(f"swarm: {self.swarm!r} is not 1-64 characters of [A-Za-z0-9._:@+-]")
        if not 0 < self.length <= MAX_LENGTH:
            raise MetainfoError(f"length: {self.length} is not between 1 and {MAX_LENGTH}")
        ps = self.piece_size
        if not MIN_PIECE_SIZE <= ps <= MAX_PIECE_SIZE or ps & (ps - 1):
            raise MetainfoError(f"piece_size: {ps} is not a power of two between {MIN_PIECE_SIZE} and "
                                f"{MAX_PIECE_SIZE}")
        expected = -(-self.length // ps)
        if len(self.pieces) != expected:
            raise MetainfoError(f"pieces: {len(self.pieces)} hashes for {expected} pieces "
                                f"({self.length} bytes / {ps})")
        if any(len(p) != 32 for p in self.pieces):
            raise MetainfoError("pieces: every hash must be 32 bytes (SHA-256)")

    @property
    def piece_count(self) -> int:
        return len(self.pieces)

    def piece_length(self, index: int) -> int:
        """Bytes in piece ``index`` (the last one may be short)."""
        if not 0 <= index < self.piece_count:
            raise IndexError(f"piece {index} out of range 0..{self.piece_count - 1}")
        return min(self.piece_size, self.length - index * self.piece_size)

    def piece_ok(self, index: int, data: bytes) -> bool:
        return len(data) == self.piece_length(index) and hashlib.sha256(data).digest() == self.pieces[index]

    @property
    def info_hash(self) -> bytes:
        """SHA-256 of the canonical JSON: the content's identity on the wire."""
        return hashlib.sha256(self.dumps().encode()).digest()

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "length": self.length, "piece_size": self.piece_size,
                "pieces": [p.hex() for p in self.pieces], "swarm": self.swarm}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, obj: Any) -> Metainfo:
        if not isinstance(obj, dict):
            raise MetainfoError("metainfo must be a JSON object")
        if obj.get("format") != FORMAT:
            raise MetainfoError(f"format: expected {FORMAT!r}, got {obj.get('format')!r}")
        unknown = set(obj) - {"format", "name", "length", "piece_size", "pieces", "swarm"}
        if unknown:
            raise MetainfoError(f"unknown fields: {', '.join(sorted(unknown))}")
        name, swarm = _field(obj, "name", str), _field(obj, "swarm", str)
        length, piece_size = _field(obj, "length", int), _field(obj, "piece_size", int)
        hashes = _field(obj, "pieces", list)
        pieces = []
        for i, h in enumerate(hashes):
            if not isinstance(h, str) or not re.fullmatch(r"[0-9a-f]{64}", h):
                raise MetainfoError(f"pieces[{i}]: not 64 lowercase hex digits")
            pieces.append(bytes.fromhex(h))
        return cls(name, length, piece_size, tuple(pieces), swarm)

    @classmethod
    def loads(cls, text: str | bytes) -> Metainfo:
        if len(text) > MAX_METAINFO_BYTES:
            raise MetainfoError(f"metainfo larger than {MAX_METAINFO_BYTES} bytes")
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MetainfoError(f"not JSON: {exc}") from None
        return cls.from_json(obj)

    @classmethod
    def load(cls, path: str | Path) -> Metainfo:
        with open(path, "rb") as f:
            return cls.loads(f.read(MAX_METAINFO_BYTES + 1))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def create_metainfo(path: str | Path, *, swarm: str, piece_size: int = 256 * 1024, name: str | None = None
                    ) -> Metainfo:
    """Hash the file at ``path`` piece by piece."""
    path = Path(path)
    hashes = []
    length = 0
    with path.open("rb") as f:
        while chunk := f.read(piece_size):
            hashes.append(hashlib.sha256(chunk).digest())
            length += len(chunk)
    return Metainfo(name or path.name, length, piece_size, tuple(hashes), swarm)


def _field(obj: dict[str, Any], key: str, kind: type) -> Any:
    if key not in obj:
        raise MetainfoError(f"{key}: missing")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MetainfoError(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _check_name(name: str) -> None:
    """A plain file name: the leecher writes ``<dir>/<name>``, so no path may escape ``dir``."""
    if not name or len(name.encode()) > 255 or name in (".", "..") or "/" in name or "\\" in name \
            or "\0" in name or name.startswith("."):
        raise MetainfoError(f"name: {name!r} is not a plain file name")
