"""The sans-I/O multiplexer, two instances wired by a fake network (h11's ConnectionPair idea): opening
(0-RTT), window exhaustion and updates, half-close, reset, many interleaved streams, keepalive, go-away,
path switch, and garbage that ends one session with a clear reason."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcppunch.session.frames import Flag, Frame, FrameType, MuxErrorCode, encode_frame
from tcppunch.session.mux import (
    INITIAL_WINDOW,
    MAX_STREAM_WINDOW,
    DataReceived,
    Event,
    GoAwayReceived,
    Multiplexer,
    PathSwitched,
    PingAcknowledged,
    SessionClosedError,
    SessionTerminated,
    StreamClosedError,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from tcppunch.wire.coord import Role


class ConnectionPair:
    """Two multiplexers and a lossless in-order network between them; ``chunk`` splits every delivery."""

    def __init__(self, *, chunk: int | None = None, **options: int) -> None:
        self.now = 0.0
        self.a = Multiplexer(Role.INITIATOR, self.now, **options)  # type: ignore[arg-type]
        self.b = Multiplexer(Role.RESPONDER, self.now, **options)  # type: ignore[arg-type]
        self.chunk = chunk
        self.consume = True  # applications read (and acknowledge) everything they receive

    def other(self, side: Multiplexer) -> Multiplexer:
        return self.b if side is self.a else self.a

    def deliver(self, side: Multiplexer, limit: int | None = None) -> bool:
        data = side.data_to_send(limit)
        step = self.chunk or max(len(data), 1)
        for i in range(0, len(data), step):
            self.other(side).receive_data(data[i : i + step], self.now)
        return bool(data)

    def exchange(self) -> tuple[list[Event], list[Event]]:
        """Move bytes both ways until both sides are quiet; the events each side saw."""
        got: tuple[list[Event], list[Event]] = ([], [])
        for _ in range(10_000):
            moved = self.deliver(self.a) | self.deliver(self.b)
            for side, bucket in ((self.a, got[0]), (self.b, got[1])):
                events = side.events()
                bucket += events
                if self.consume:
                    for ev in events:
                        if isinstance(ev, DataReceived):
                            side.acknowledge_received_data(ev.stream_id, len(ev.data))
            if not moved:
                return got
        raise AssertionError("exchange did not settle")


def data_of(events: list[Event], stream_id: int) -> bytes:
    return b"".join(ev.data for ev in events if isinstance(ev, DataReceived) and ev.stream_id == stream_id)


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_zero_rtt_open_carries_data_in_the_first_frame(chunk: int | None) -> None:
    pair = ConnectionPair(chunk=chunk)
    sid = pair.a.open_stream(b"GET /", end_stream=True)
    first = pair.a.data_to_send()
    assert first[1] == FrameType.DATA and first[2] == Flag.SYN | Flag.FIN and first[12:17] == b"GET /"
    assert first[17 + 1] == FrameType.WINDOW_UPDATE  # then our receive window beyond the initial one
    step = chunk or len(first)
    for i in range(0, len(first), step):
        pair.b.receive_data(first[i : i + step], 0.0)
    assert pair.b.events() == [StreamOpened(sid), DataReceived(sid, b"GET /"), StreamEnded(sid)]


def test_stream_ids_by_role_never_collide() -> None:
    pair = ConnectionPair()
    ids_a = [pair.a.open_stream() for _ in range(5)]
    ids_b = [pair.b.open_stream() for _ in range(5)]
    assert ids_a == [1, 3, 5, 7, 9] and ids_b == [2, 4, 6, 8, 10]
    _, events_b = pair.exchange()
    assert [ev.stream_id for ev in events_b if isinstance(ev, StreamOpened)] == ids_a


def test_window_exhaustion_stops_the_sender_until_the_reader_consumes() -> None:
    pair = ConnectionPair()
    pair.consume = False
    sid = pair.a.open_stream()
    pair.a.send_data(sid, b"z" * (3 * (1 << 20)))
    _, events_b = pair.exchange()
    window = pair.a.window
    assert len(data_of(events_b, sid)) == window  # the full window and not a byte more
    assert pair.a.send_window(sid) == 0
    assert pair.a.send_buffered(sid) == 3 * (1 << 20) - window
    assert pair.a.data_to_send() == b""  # nothing may leave
    pair.b.acknowledge_received_data(sid, window)
    pair.consume = True
    _, events_b = pair.exchange()
    assert len(data_of(events_b, sid)) == 2 * (1 << 20)
    assert pair.a.send_buffered(sid) == 0


def test_sending_beyond_the_window_is_a_flow_control_error() -> None:
    pair = ConnectionPair(window=INITIAL_WINDOW)
    raw = encode_frame(Frame(FrameType.DATA, Flag.SYN, 1, b"x" * (INITIAL_WINDOW + 1)))
    pair.b.receive_data(raw, 0.0)
    events = pair.b.events()
    assert isinstance(events[-1], SessionTerminated)
    assert events[-1].code is MuxErrorCode.FLOW_CONTROL_ERROR
    assert "into a window of" in events[-1].message


def test_half_close_each_direction_independently() -> None:
    pair = ConnectionPair()
    sid = pair.a.open_stream(b"request")
    pair.a.end_stream(sid)
    _, events_b = pair.exchange()
    assert StreamEnded(sid) in events_b
    with pytest.raises(StreamClosedError):
        pair.a.send_data(sid, b"more")
    pair.b.send_data(sid, b"response part 1 ")  # b may still answer on the half-closed stream
    pair.b.send_data(sid, b"part 2", end_stream=True)
    events_a, _ = pair.exchange()
    assert data_of(events_a, sid) == b"response part 1 part 2"
    assert events_a[-1] == StreamEnded(sid)
    assert pair.a.open_streams == 0 and pair.b.open_streams == 0  # closed both ways: forgotten


def test_reset_drops_queued_data_and_tells_the_peer() -> None:
    pair = ConnectionPair()
    pair.consume = False
    sid = pair.a.open_stream(b"x" * 2_000_000)
    pair.exchange()
    pair.b.reset_stream(sid, MuxErrorCode.CANCEL)
    events_a, _ = pair.exchange()
    assert StreamReset(sid, MuxErrorCode.CANCEL, remote=True) in events_a
    assert pair.a.send_buffered(sid) == 0
    with pytest.raises(StreamClosedError):
        pair.a.send_data(sid, b"late")
    other = pair.a.open_stream(b"still fine")  # the session lives on
    _, events_b = pair.exchange()
    assert data_of(events_b, other) == b"still fine"


def test_many_streams_interleave_round_robin_and_arrive_intact() -> None:
    pair = ConnectionPair(chunk=50_000)
    payloads = {}
    for i in range(40):
        body = hashlib.sha256(str(i).encode()).digest() * (3000 + 97 * i)
        sid = pair.a.open_stream(body[:10], end_stream=False)
        pair.a.send_data(sid, body[10:], end_stream=True)
        payloads[sid] = body
    # one bounded take serves every stream one frame before any stream gets a second
    first = pair.a.data_to_send(limit=40 * pair.a.frame_size)
    pair.b.receive_data(first, 0.0)
    events_b = pair.b.events()
    opened = [ev.stream_id for ev in events_b if isinstance(ev, StreamOpened)]
    assert opened == sorted(payloads)
    assert [ev.stream_id for ev in events_b if isinstance(ev, DataReceived)] == sorted(payloads)
    events_b += pair.exchange()[1]
    for sid, body in payloads.items():
        assert hashlib.sha256(data_of(events_b, sid)).digest() == hashlib.sha256(body).digest()


def test_stream_limit_refuses_with_reset_and_keeps_the_session() -> None:
    pair = ConnectionPair(max_streams=2)
    sids = [pair.a.open_stream(b"hi") for _ in range(3)]
    events_a, events_b = pair.exchange()
    assert [ev.stream_id for ev in events_b if isinstance(ev, StreamOpened)] == sids[:2]
    assert StreamReset(sids[2], MuxErrorCode.REFUSED_STREAM, remote=True) in events_a
    assert not pair.a.closed and not pair.b.closed


def test_keepalive_ping_measures_rtt_and_silence_ends_the_session() -> None:
    pair = ConnectionPair()
    assert pair.a.get_timer() == pair.a.keepalive_interval
    pair.now = 15.0
    pair.a.handle_timer(pair.now)
    ping = pair.a.data_to_send()
    pair.now = 15.25
    pair.b.receive_data(ping, pair.now)
    pong = pair.b.data_to_send()
    pair.now = 15.5
    pair.a.receive_data(pong, pair.now)
    assert pair.a.events() == [PingAcknowledged(0.5, 1)]
    assert pair.a.rtt == 0.5
    # now b falls silent: a pings after the interval, then gives up after the timeout
    pair.now = 30.5
    pair.a.handle_timer(pair.now)
    assert pair.a.data_to_send()
    deadline = pair.a.get_timer()
    assert deadline == 40.5
    pair.a.handle_timer(deadline - 0.1)
    assert not pair.a.closed
    pair.a.handle_timer(deadline)
    (event,) = pair.a.events()
    assert isinstance(event, SessionTerminated) and event.code is MuxErrorCode.KEEPALIVE_TIMEOUT
    assert "keepalive ping unanswered" in event.message
    assert pair.a.get_timer() is None
    with pytest.raises(SessionClosedError, match="keepalive"):
        pair.a.open_stream()


def test_go_away_refuses_new_streams_and_lets_open_ones_finish() -> None:
    pair = ConnectionPair()
    sid = pair.a.open_stream(b"before")
    pair.exchange()
    pair.b.go_away()
    events_a, _ = pair.exchange()
    assert GoAwayReceived(sid, MuxErrorCode.NO_ERROR) in events_a
    with pytest.raises(SessionClosedError, match="going away"):
        pair.a.open_stream()
    pair.a.send_data(sid, b" and after", end_stream=True)
    _, events_b = pair.exchange()
    assert data_of(events_b, sid) == b" and after"


def test_stream_opened_while_go_away_in_flight_is_reset_as_refused() -> None:
    pair = ConnectionPair()
    pair.b.go_away()
    goaway = pair.b.data_to_send()
    sid = pair.a.open_stream(b"crossing")
    pair.b.receive_data(pair.a.data_to_send(), 0.0)
    pair.a.receive_data(goaway + pair.b.data_to_send(), 0.0)
    assert StreamReset(sid, MuxErrorCode.REFUSED_STREAM, remote=True) in pair.a.events()


@pytest.mark.parametrize(
    ("garbage", "words"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xaa", "bad version byte 0x16"),
        (encode_frame(Frame(FrameType.DATA, Flag.NONE, 99, b"x")), "stream 99, which was never opened"),
        (encode_frame(Frame(FrameType.DATA, Flag.SYN, 4, b"x")), "wrong parity"),
    ],
)
def test_garbage_ends_that_session_only_with_a_clear_reason(garbage: bytes, words: str) -> None:
    pair = ConnectionPair()
    bystander = ConnectionPair()
    bystander_sid = bystander.a.open_stream(b"unaffected")
    sid = pair.b.open_stream(b"in progress")
    pair.exchange()
    pair.b.receive_data(garbage, 0.0)
    (event,) = pair.b.events()
    assert isinstance(event, SessionTerminated) and words in event.message
    events_a, _ = pair.exchange()  # the GO_AWAY tells the sender why
    assert any(isinstance(ev, GoAwayReceived) and ev.code is event.code for ev in events_a)
    assert isinstance(events_a[-1], SessionTerminated) and pair.a.closed
    with pytest.raises(SessionClosedError):
        pair.b.send_data(sid, b"x")
    _, events = bystander.exchange()
    assert data_of(events, bystander_sid) == b"unaffected"


def test_switch_marks_the_end_of_the_old_path() -> None:
    pair = ConnectionPair()
    sid = pair.a.open_stream(b"old path ")
    old = pair.a.data_to_send()
    old += pair.a.switch_path()
    pair.a.send_data(sid, b"new path")
    new = pair.a.data_to_send()
    pair.b.receive_data(old, 0.0)
    assert pair.b.events() == [StreamOpened(sid), DataReceived(sid, b"old path "), PathSwitched()]
    pair.b.path_switched()
    pair.b.receive_data(new, 0.0)
    assert pair.b.events() == [DataReceived(sid, b"new path")]


def test_bytes_after_switch_on_the_old_path_are_an_error() -> None:
    pair = ConnectionPair()
    pair.a.open_stream(b"x")
    wire = pair.a.data_to_send() + pair.a.switch_path() + encode_frame(Frame(FrameType.PING, Flag.NONE, 0, bytes(8)))
    pair.b.receive_data(wire, 0.0)
    event = pair.b.events()[-1]
    assert isinstance(event, SessionTerminated) and "bytes after SWITCH" in event.message


def _largest_grant(per_frame: float) -> int:
    """a fills its window each round; b's reader takes ``per_frame`` seconds per 64 KiB frame (b's RTT
    is 0.1 s); the largest send window a was given."""
    a = Multiplexer(Role.INITIATOR, 0.0)
    b = Multiplexer(Role.RESPONDER, 0.0, measure_rtt=True)
    a.receive_data(b.data_to_send(), 0.05)
    b.receive_data(a.data_to_send(), 0.1)  # the PING's answer
    assert b.rtt == 0.1
    sid = a.open_stream()
    now, largest = 0.1, 0
    for _ in range(10):
        a.send_data(sid, b"x" * a.send_window(sid))
        b.receive_data(a.data_to_send(), now)
        for ev in b.events():
            if isinstance(ev, DataReceived):
                now += per_frame
                b.acknowledge_received_data(sid, len(ev.data), now)
        a.receive_data(b.data_to_send(), now)
        largest = max(largest, a.send_window(sid))
    return largest


def test_window_grows_only_for_a_stream_limited_by_its_window() -> None:
    assert _largest_grant(0.001) == MAX_STREAM_WINDOW  # a fast reader: the window doubles up to the cap
    assert _largest_grant(0.05) <= 1 << 20  # 8 frames (half a window) take 0.4 s = 4 RTT: stays

_any_frame = st.builds(
    Frame,
    st.sampled_from(list(FrameType)),
    st.sampled_from([Flag.NONE, Flag.SYN, Flag.FIN, Flag.ACK, Flag.SYN | Flag.FIN]),
    st.integers(min_value=0, max_value=12),
    st.binary(max_size=16),
)


@given(st.lists(_any_frame | st.binary(max_size=20), max_size=12), st.integers(min_value=1, max_value=40))
def test_fuzz_any_input_ends_in_events_never_in_an_exception(inputs: list[Frame | bytes], chunk: int) -> None:
    """Whatever arrives (well-formed frames in any order, broken ones, raw bytes), the multiplexer turns
    it into events; at worst one SessionTerminated with a reason, after which it takes nothing more."""
    mux = Multiplexer(Role.RESPONDER, 0.0, window=INITIAL_WINDOW)
    mux.open_stream(b"ours")
    wire = b"".join(encode_frame(x) if isinstance(x, Frame) else x for x in inputs)
    for i in range(0, len(wire), chunk):
        mux.receive_data(wire[i : i + chunk], 0.0)
        mux.data_to_send()
    events = mux.events()
    ended = [ev for ev in events if isinstance(ev, SessionTerminated)]
    assert len(ended) <= 1 and all(ev.message for ev in ended)
    if ended:
        assert events[-1] is ended[0] and mux.closed
