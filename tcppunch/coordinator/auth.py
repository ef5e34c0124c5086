"""Who may register: one shared token, or a file that gives every peer id its own secret.

Comparisons go through :func:`hmac.compare_digest` so a wrong token takes as long as a right one.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class TokensFileError(ValueError):
    """The tokens file is unreadable or not a JSON object of string -> string."""


@dataclass(frozen=True)
class Tokens:
    """A shared secret for every id, and/or per-id secrets (a per-id secret wins over the shared one)."""

    shared: str | None = None
    per_id: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.shared is None and not self.per_id:
            raise ValueError("no token configured: give a shared token or per-id tokens")
        if self.shared == "":
            raise ValueError("the shared token must not be empty")

    @classmethod
    def from_file(cls, path: str | Path, *, shared: str | None = None) -> Tokens:
        """Read ``{"id": "secret", ...}`` from ``path``."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise TokensFileError(f"cannot read tokens file {path}: {exc}") from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()
        ):
            raise TokensFileError(f"tokens file {path} must be a JSON object of id -> non-empty secret")
        if not data and shared is None:
            raise TokensFileError(f"tokens file {path} is empty")
        return cls(shared=shared, per_id=dict(data))

    def check(self, peer_id: str, token: str) -> bool:
        """True if ``token`` is the secret for ``peer_id``."""
        expected = self.per_id.get(peer_id, self.shared)
        if expected is None:
            # Same work as a real comparison, so unknown ids are not told apart by timing.
            hmac.compare_digest(token.encode(), token.encode())
            return False
        return hmac.compare_digest(token.encode(), expected.encode())
