"""The swarm example's metainfo (examples/swarm/metainfo.py) and piece store: round trip, identity,
and every malformed field refused with a message naming it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from examples.swarm.metainfo import Metainfo, MetainfoError, create_metainfo
from examples.swarm.storage import PieceStore

PIECE = 16 * 1024


def _meta(data: bytes, piece_size: int = PIECE, name: str = "f.bin") -> Metainfo:
    hashes = tuple(hashlib.sha256(data[i:i + piece_size]).digest() for i in range(0, len(data), piece_size))
    return Metainfo(name, len(data), piece_size, hashes, "swarm-1")


def test_create_hashes_each_piece_and_the_last_is_short(tmp_path: Path) -> None:
    data = bytes(range(256)) * 200  # 51200 bytes: 3 full pieces + 2048
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    meta = create_metainfo(path, swarm="swarm-1", piece_size=PIECE)
    assert meta.piece_count == 4
    assert meta.piece_length(3) == len(data) - 3 * PIECE
    assert meta.pieces[1] == hashlib.sha256(data[PIECE:2 * PIECE]).digest()
    assert meta.piece_ok(3, data[3 * PIECE:])
    assert not meta.piece_ok(3, data[3 * PIECE:] + b"x")
    with pytest.raises(IndexError):
        meta.piece_length(4)


def test_json_round_trip_and_info_hash_is_stable(tmp_path: Path) -> None:
    meta = _meta(b"a" * 40000)
    meta.save(tmp_path / "m.json")
    again = Metainfo.load(tmp_path / "m.json")
    assert again == meta
    assert again.info_hash == meta.info_hash
    assert _meta(b"a" * 40001).info_hash != meta.info_hash


def _doc(**changes: object) -> str:
    obj = _meta(b"b" * 40000).to_json()
    obj.update(changes)
    return json.dumps({k: v for k, v in obj.items() if v is not ...})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ("[1]", "must be a JSON object"),
        (_doc(format="bittorrent"), "format"),
        (_doc(extra=1), "unknown fields: extra"),
        (_doc(name=...), "name: missing"),
        (_doc(name="../etc/passwd"), "name"),
        (_doc(name=".hidden"), "name"),
        (_doc(length="40000"), "length: expected int"),
        (_doc(length=True), "length: expected int"),
        (_doc(length=0), "length"),
        (_doc(piece_size=1000), "piece_size"),
        (_doc(piece_size=8 * 1024 * 1024), "piece_size"),
        (_doc(pieces=["00" * 32]), "pieces: 1 hashes for 3 pieces"),
        (_doc(pieces=["zz" * 32] * 3), "pieces[0]"),
        (_doc(swarm="has space"), "swarm"),
    ],
)
def test_malformed_metainfo_is_refused_with_the_field_named(text: str, message: str) -> None:
    with pytest.raises(MetainfoError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Metainfo.loads(text)


def test_store_keeps_only_verified_pieces_and_renames_when_complete(tmp_path: Path) -> None:
    data = bytes(range(256)) * 150  # 38400 bytes, 3 pieces
    meta = _meta(data)
    store = PieceStore(meta, tmp_path / "leech")
    assert store.have == set() and store.path.name == "f.bin.part"
    assert not store.write(0, b"x" * PIECE)  # wrong bytes are never written
    assert store.write(0, data[:PIECE])
    with pytest.raises(KeyError):
        store.read(1)
    assert store.write(2, data[2 * PIECE:])
    assert store.write(1, data[PIECE:2 * PIECE])
    assert store.complete and store.path == tmp_path / "leech" / "f.bin"
    store.close()
    assert (tmp_path / "leech" / "f.bin").read_bytes() == data


def test_store_resumes_from_what_the_file_already_holds(tmp_path: Path) -> None:
    data = bytes(range(256)) * 150
    meta = _meta(data)
    part = tmp_path / "f.bin.part"
    part.write_bytes(data[:PIECE] + b"\0" * (len(data) - PIECE))  # piece 0 good, the rest not
    store = PieceStore(meta, tmp_path)
    assert store.have == {0}
    store.close()
    (tmp_path / "f.bin").write_bytes(data)
    seeder = PieceStore(meta, tmp_path)
    assert seeder.complete and seeder.read(2) == data[2 * PIECE:]
    seeder.close()
