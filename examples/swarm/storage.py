"""Pieces on disk: ``<dir>/<name>.part`` while incomplete, renamed to ``<dir>/<name>`` once every piece
checked out. A file already there (the seeder's, or an interrupted download) is verified piece by piece
at open, so a peer starts with exactly the pieces whose hashes match.
"""

from __future__ import annotations

import os
from pathlib import Path

from examples.swarm.metainfo import Metainfo


class PieceStore:
    def __init__(self, meta: Metainfo, directory: str | Path) -> None:
        self.meta = meta
        self.directory = Path(directory)
        self.final = self.directory / meta.name
        self.partial = self.directory / (meta.name + ".part")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.final if self.final.exists() else self.partial
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self._fd).st_size != meta.length:
            os.ftruncate(self._fd, meta.length)
        self.have = {i for i in range(meta.piece_count) if meta.piece_ok(i, self._read(i))}
        if self.complete:
            self._finish()

    @property
    def complete(self) -> bool:
        return len(self.have) == self.meta.piece_count

    def read(self, index: int) -> bytes:
        """A piece we have (KeyError otherwise: never serve unverified bytes)."""
        if index not in self.have:
            raise KeyError(f"piece {index} not here")
        return self._read(index)

    def write(self, index: int, data: bytes) -> bool:
        """Store a piece if its hash matches; False (nothing written) otherwise."""
        if not self.meta.piece_ok(index, data):
            return False
        if index not in self.have:
            os.pwrite(self._fd, data, index * self.meta.piece_size)
            self.have.add(index)
            if self.complete:
                self._finish()
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _read(self, index: int) -> bytes:
        return os.pread(self._fd, self.meta.piece_length(index), index * self.meta.piece_size)

    def _finish(self) -> None:
        if self.path != self.final:
            os.fsync(self._fd)
            os.replace(self.path, self.final)
            self.path = self.final
