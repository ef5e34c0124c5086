"""The control channel's record layer and its key agreement (tcppunch/session/records.py)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcppunch.session.records import (
    HEADER,
    MAX_RECORD,
    TAG_SIZE,
    ChannelKeys,
    KeyShare,
    RecordChannel,
    RecordError,
    RecordErrorCode,
)

CLIENT_FP, SERVER_FP = "AAAA-BBBB-CCCC", "DDDD-EEEE-FFFF"


def agreed(client_fp: str = CLIENT_FP, server_fp: str = SERVER_FP) -> tuple[ChannelKeys, ChannelKeys]:
    """Both sides' keys after a share exchange (the fingerprints as each side saw them)."""
    client, server = KeyShare(), KeyShare()
    server_keys = server.derive(client.public, is_client=False, client_key=CLIENT_FP, server_key=SERVER_FP)
    client_keys = client.derive(server.public, is_client=True, client_key=client_fp, server_key=server_fp)
    return client_keys, server_keys


def pair(limit: int | None = None) -> tuple[RecordChannel, RecordChannel]:
    client_keys, server_keys = agreed()
    if limit is None:
        return RecordChannel(client_keys), RecordChannel(server_keys)
    return RecordChannel(client_keys, limit=limit), RecordChannel(server_keys, limit=limit)


# ------------------------------------------------------------------------------------- key agreement


def test_both_sides_agree_and_directions_differ() -> None:
    client, server = agreed()
    assert client.send == server.receive and client.receive == server.send
    assert client.send != client.receive
    assert len(client.send) == 32


@pytest.mark.parametrize("client_fp, server_fp", [("XXXX-BBBB-CCCC", SERVER_FP), (CLIENT_FP, "XXXX-EEEE-FFFF"),
                                                  (SERVER_FP, CLIENT_FP)])
def test_a_different_fingerprint_gives_different_keys(client_fp: str, server_fp: str) -> None:
    client, server = agreed(client_fp, server_fp)
    assert client.send != server.receive and client.receive != server.send


def test_a_substituted_public_key_gives_different_keys() -> None:
    client, server, mallory = KeyShare(), KeyShare(), KeyShare()
    server_keys = server.derive(client.public, is_client=False, client_key=CLIENT_FP, server_key=SERVER_FP)
    client_keys = client.derive(mallory.public, is_client=True, client_key=CLIENT_FP, server_key=SERVER_FP)
    assert client_keys.send != server_keys.receive


def test_each_connection_gets_fresh_keys() -> None:
    assert agreed()[0].send != agreed()[0].send


def test_a_share_derives_once_then_its_private_key_is_gone() -> None:
    share, other = KeyShare(), KeyShare()
    share.derive(other.public, is_client=True, client_key=CLIENT_FP, server_key=SERVER_FP)
    assert share._private is None
    with pytest.raises(RuntimeError):
        share.derive(other.public, is_client=True, client_key=CLIENT_FP, server_key=SERVER_FP)


@pytest.mark.parametrize("public", [b"\x00" * 32, b"\x01" + b"\x00" * 31, b"\x05" * 31, b""])
def test_low_order_or_malformed_public_keys_are_refused(public: bytes) -> None:
    with pytest.raises(RecordError) as caught:
        KeyShare().derive(public, is_client=False, client_key=CLIENT_FP, server_key=SERVER_FP)
    assert caught.value.code is RecordErrorCode.BAD_KEY


# ------------------------------------------------------------------------------------- records


@given(st.lists(st.binary(min_size=0, max_size=3 * MAX_RECORD), max_size=4), st.integers(1, 9000))
def test_round_trip_in_any_slicing(payloads: list[bytes], step: int) -> None:
    client, server = pair()
    wire = b"".join(client.seal(p) for p in payloads)
    got = b"".join(server.open(wire[i:i + step]) for i in range(0, len(wire), step))
    assert got == b"".join(payloads)
    server.end()  # nothing left over


def test_both_directions_use_different_keys() -> None:
    client, server = pair()
    record = client.seal(b"pong")
    assert server.open(record) == b"pong"
    assert server.seal(b"pong") != record  # same counter, same payload, other key
    with pytest.raises(RecordError) as caught:
        client.open(record)  # a client's own record reflected back to it
    assert caught.value.code is RecordErrorCode.AUTH_FAILED


def test_large_payload_is_split_at_the_maximum() -> None:
    client, server = pair()
    wire = client.seal(os.urandom(MAX_RECORD + 1))
    (first,) = HEADER.unpack_from(wire)
    assert first == MAX_RECORD + TAG_SIZE
    assert len(wire) == 2 * HEADER.size + MAX_RECORD + 1 + 2 * TAG_SIZE
    assert len(server.open(wire)) == MAX_RECORD + 1


@pytest.mark.parametrize("position", [0, 1, 2, 10, -1])
def test_a_flipped_bit_anywhere_fails(position: int) -> None:
    client, server = pair()
    record = bytearray(client.seal(b"register me please"))
    record[position] ^= 0x01
    # a record follows, so a flipped length bit cannot just wait for bytes that never come
    with pytest.raises(RecordError) as caught:
        server.open(bytes(record) + client.seal(b"x" * 400))
    assert caught.value.code is RecordErrorCode.AUTH_FAILED


def test_a_replayed_record_fails() -> None:
    client, server = pair()
    record = client.seal(b"connect bob")
    assert server.open(record) == b"connect bob"
    with pytest.raises(RecordError) as caught:
        server.open(record)
    assert caught.value.code is RecordErrorCode.AUTH_FAILED


def test_reordered_records_fail() -> None:
    client, server = pair()
    first, second = client.seal(b"one"), client.seal(b"two")
    with pytest.raises(RecordError) as caught:
        server.open(second + first)
    assert caught.value.code is RecordErrorCode.AUTH_FAILED


def test_a_dropped_record_fails_the_next() -> None:
    client, server = pair()
    client.seal(b"lost")
    with pytest.raises(RecordError):
        server.open(client.seal(b"after"))


def test_a_truncated_record_waits_then_the_end_is_an_error() -> None:
    client, server = pair()
    record = client.seal(b"half of this")
    assert server.open(record[:-3]) == b""
    with pytest.raises(RecordError) as caught:
        server.end()
    assert caught.value.code is RecordErrorCode.TRUNCATED


def test_a_cut_record_completed_by_other_bytes_fails() -> None:
    client, server = pair()
    record = client.seal(b"half of this")
    with pytest.raises(RecordError) as caught:
        server.open(record[:-3] + b"xyz")
    assert caught.value.code is RecordErrorCode.AUTH_FAILED


@pytest.mark.parametrize("length", [0, 1, TAG_SIZE, MAX_RECORD + TAG_SIZE + 1, 65535])
def test_an_out_of_bounds_length_fails_from_its_header_alone(length: int) -> None:
    _, server = pair()
    with pytest.raises(RecordError) as caught:
        server.open(HEADER.pack(length))  # no body needed: refused before it is buffered
    assert caught.value.code is RecordErrorCode.BAD_LENGTH


def test_a_bad_header_trickled_a_byte_at_a_time_fails_at_its_second_byte() -> None:
    _, server = pair()
    header = HEADER.pack(MAX_RECORD + TAG_SIZE + 1)
    assert server.open(header[:1]) == b""  # half a header: nothing to judge yet
    with pytest.raises(RecordError) as caught:
        server.open(header[1:])
    assert caught.value.code is RecordErrorCode.BAD_LENGTH


def test_a_record_trickled_a_byte_at_a_time_comes_out_whole_at_its_last_byte() -> None:
    client, server = pair()
    one, two = client.seal(b"slowly"), client.seal(b"then the next")
    wire = one + two
    got = [server.open(wire[i:i + 1]) for i in range(len(wire))]
    assert [i for i, out in enumerate(got) if out] == [len(one) - 1, len(wire) - 1]
    assert b"".join(got) == b"slowlythen the next"
    server.end()  # nothing left over


def test_the_counter_limit_ends_both_directions() -> None:
    client, server = pair(limit=3)
    wire = b"".join(client.seal(bytes([i])) for i in range(3))
    with pytest.raises(RecordError) as caught:
        client.seal(b"one too many")
    assert caught.value.code is RecordErrorCode.EXHAUSTED
    assert server.open(wire) == b"\x00\x01\x02"
    # a sender that ignored its limit: the receiver ends the connection too, it never reuses a nonce
    keys_client, keys_server = agreed()
    sender, receiver = RecordChannel(keys_client, limit=4), RecordChannel(keys_server, limit=3)
    wire = b"".join(sender.seal(bytes([i])) for i in range(4))
    with pytest.raises(RecordError) as caught:
        receiver.open(wire)
    assert caught.value.code is RecordErrorCode.EXHAUSTED


def test_one_key_for_both_directions_is_refused() -> None:
    with pytest.raises(ValueError):
        RecordChannel(ChannelKeys(b"k" * 32, b"k" * 32))
