"""The data path's HTTP/1.1 reading: request and response heads, chunked bodies (pure)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.http1 import (
    MAX_HEAD_BYTES,
    ChunkedReader,
    HttpError,
    parse_request_head,
    parse_response_head,
    without_chunked,
)


def head(*lines: str) -> bytes:
    return "\r\n".join(lines).encode("latin-1")


def test_a_request_head_keeps_its_end_to_end_headers_only() -> None:
    parsed = parse_request_head(
        head(
            "POST /v1/chat/completions?x=1 HTTP/1.1",
            "Host: gateway:8080",
            "Content-Length: 12",
            "Authorization: Bearer k",
            "Connection: keep-alive, X-Private",
            "X-Private: for this hop",
            "Keep-Alive: timeout=5",
            "TE: trailers",
            "X-Tenant-ID:  acme ",
        )
    )
    assert (parsed.method, parsed.target, parsed.minor) == ("POST", "/v1/chat/completions?x=1", 1)
    assert parsed.content_length == 12 and not parsed.chunked and parsed.keep_alive
    # Host and the length are the gateway's to set; hop-by-hop and Connection-named ones stay here.
    assert parsed.forward == b"Authorization: Bearer k\r\nX-Tenant-ID:  acme \r\n"


def test_keep_alive_follows_the_version_and_connection() -> None:
    assert parse_request_head(head("GET / HTTP/1.1", "Connection: close")).keep_alive is False
    assert parse_request_head(head("GET / HTTP/1.0")).keep_alive is False
    assert parse_request_head(head("GET / HTTP/1.0", "Connection: Keep-Alive")).keep_alive is True


@pytest.mark.parametrize(
    ("raw", "status", "says"),
    [
        (head("POST /v1/completions"), 400, "malformed request line"),
        (head("POST  /v1/completions HTTP/1.1"), 400, "malformed request line"),
        (head("POST /v1/completions HTTP/2.0"), 505, "HTTP/1.1 or 1.0 only"),
        (head("POST /v1/completions HTTP/1.1", "Content-Type : application/json"), 400, "malformed header"),
        (head("POST /v1/completions HTTP/1.1", "X-A: 1", " folded"), 400, "folded header line"),
        (head("POST /v1/completions HTTP/1.1", "X-A: a\x00b"), 400, "control character in header 'X-A'"),
        (head("POST / HTTP/1.1", "Content-Length: 5", "Transfer-Encoding: chunked"), 400, "both"),
        (head("POST / HTTP/1.1", "Content-Length: 5", "Content-Length: 6"), 400, "'5, 6'"),
        (head("POST / HTTP/1.1", "Content-Length: +5"), 400, "'+5'"),
        (head("POST / HTTP/1.1", "Transfer-Encoding: gzip, chunked"), 501, "'gzip, chunked'"),
        (head("POST / HTTP/1.0", "Transfer-Encoding: chunked"), 400, "HTTP/1.0"),
        (head("POST / HTTP/1.1", "Expect: 200-ok"), 417, "'200-ok'"),
        (b"GET /" + b"a" * MAX_HEAD_BYTES + b" HTTP/1.1", 431, f"limit of {MAX_HEAD_BYTES} bytes"),
    ],
)
def test_a_malformed_request_head_is_refused_saying_why(raw: bytes, status: int, says: str) -> None:
    with pytest.raises(HttpError) as info:
        parse_request_head(raw)
    assert info.value.status == status
    assert says in str(info.value)


def test_equal_repeated_lengths_are_one_length() -> None:
    assert parse_request_head(head("POST / HTTP/1.1", "Content-Length: 5, 5")).content_length == 5


def test_a_response_head_keeps_its_framing_and_drops_the_replicas_connection() -> None:
    parsed = parse_response_head(
        head(
            "HTTP/1.1 200 OK",
            "Content-Type: text/event-stream",
            "Transfer-Encoding: chunked",
            "Connection: close",
            "Keep-Alive: timeout=4",
        )
    )
    assert parsed.status == 200 and parsed.chunked and parsed.close and parsed.content_length is None
    assert (
        parsed.head == b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    )
    assert without_chunked(parsed.head) == b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    plain = parse_response_head(head("HTTP/1.1 404 Not Found", "Content-Length: 7"))
    assert (plain.status, plain.content_length, plain.chunked, plain.close) == (404, 7, False, False)
    with pytest.raises(HttpError, match="malformed status line") as info:
        parse_response_head(head("HTTP/1.1 twohundred"))
    assert info.value.status == 502


CHUNKED = b"5;ext=1\r\nhello\r\n1\r\n \r\nC\r\nworld, bytes\r\n0\r\nX-Trailer: t\r\n\r\n"


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, len(CHUNKED)), max_size=8))
def test_a_chunked_body_reads_the_same_however_it_is_cut(cuts: list[int]) -> None:
    reader = ChunkedReader(keep=True)
    bounds = [0, *sorted(cuts), len(CHUNKED)]
    used = 0
    for start, end in itertools.pairwise(bounds):
        used += reader.feed(CHUNKED[start:end] + (b"NEXT" if end == len(CHUNKED) else b""))
    assert reader.done and used == len(CHUNKED)
    assert reader.body() == b"hello world, bytes"


@pytest.mark.parametrize(
    ("raw", "status", "says"),
    [
        (b"zz\r\n", 400, "malformed chunk size"),
        (b"0x5\r\nhello\r\n", 400, "malformed chunk size"),
        (b"5\r\nhello!\r\n", 400, "longer than its size"),
        (b"5\nhello\r\n", 400, "bare line feed"),
        (b"1" * 2000, 400, "chunk-size line longer"),
        (b"8\r\n12345678\r\n8\r\n12345678\r\n", 413, "limit of 10 bytes"),
    ],
)
def test_a_broken_chunked_body_is_refused(raw: bytes, status: int, says: str) -> None:
    reader = ChunkedReader(keep=True, limit=10)
    with pytest.raises(HttpError) as info:
        reader.feed(raw)
    assert info.value.status == status
    assert says in str(info.value)
