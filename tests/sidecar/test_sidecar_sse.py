"""The SSE parser keeps every byte and finds every event, however the input is cut."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from sidecar.sse import Event, SSEParser


def feed_all(chunks: list[bytes], max_event_bytes: int = 1 << 20) -> list[Event]:
    parser = SSEParser(max_event_bytes)
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    tail = parser.close()
    return events + ([tail] if tail is not None else [])


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


STREAM = (
    b'data: {"a":1}\n\n'
    b": keep-alive\n\n"
    b"event: response.output_text.delta\ndata: x\n\n"
    b"data: line1\r\ndata: line2\r\n\r\n"
    b"data:nospace\r\rdata\n\n"
    b"id: 7\nretry: 10\n\n"
    b"data: [DONE]\n\n"
)


def test_events_and_fields() -> None:
    events = feed_all([STREAM])
    assert [e.data for e in events] == ['{"a":1}', None, "x", "line1\nline2", "nospace", "", None, "[DONE]"]
    assert events[2].event == "response.output_text.delta"
    assert b"".join(e.raw for e in events) == STREAM
    assert not any(e.malformed for e in events)


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_any_cut_gives_the_same_events(points: list[int]) -> None:
    whole = feed_all([STREAM])
    pieces = feed_all(cut(STREAM, points))
    assert pieces == whole


def test_crlf_split_across_reads() -> None:
    events = feed_all([b"data: a\r", b"\n\r", b"\n"])
    assert [e.data for e in events] == ["a"]
    assert events[0].raw == b"data: a\r\n\r\n"


def test_unterminated_tail_comes_back_from_close() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: 1\n\ndata: 2") == [Event(b"data: 1\n\n", "1")]
    tail = parser.close()
    assert tail is not None and tail.raw == b"data: 2" and tail.malformed
    assert parser.close() is None


def test_overflow_is_passed_on_unparsed() -> None:
    events = feed_all([b"x" * 100, b"y" * 100], max_event_bytes=150)
    assert b"".join(e.raw for e in events) == b"x" * 100 + b"y" * 100
    assert events[0].malformed


def test_invalid_utf8_is_malformed_but_kept() -> None:
    events = feed_all([b"data: \xff\xfe\n\n"])
    assert events[0].malformed and events[0].data is None and events[0].raw == b"data: \xff\xfe\n\n"


@given(st.binary(max_size=400), st.lists(st.integers(min_value=0, max_value=500), max_size=10))
def test_fuzz_bytes_round_trip(data: bytes, points: list[int]) -> None:
    events = feed_all(cut(data, points), max_event_bytes=64)
    assert b"".join(e.raw for e in events) == data
