"""Incremental Server-Sent Events parsing that keeps every byte (pure, no I/O).

The proxy must hand the client exactly the bytes the upstream sent, minus the events it
chose to drop. So the parser does not rebuild events from fields: each ``Event`` carries
the raw bytes it was parsed from (its lines and the blank line that ends it), and
concatenating the ``raw`` of every event, then ``close()``'s tail, gives back the input.

Line endings are CRLF, LF or CR, as the SSE spec allows. A CR at the very end of the
buffered input may be the first half of a CRLF split across two reads, so it waits for
the next read (or ``close()``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n|\n|\r")

# An upstream that never sends a blank line (not SSE at all, or a huge event) must not
# grow the buffer without bound: past this size what is buffered goes out as one
# ``overflow`` event, unparsed.
DEFAULT_MAX_EVENT_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Event:
    raw: bytes
    data: str | None = None  # data lines joined by "\n"; None when the event has no data field
    event: str | None = None  # the ``event:`` field, if any
    malformed: bool = False  # not UTF-8, or cut by ``overflow`` / ``close()``


class SSEParser:
    """Feed bytes as they arrive; get back the events they complete, raw bytes included."""

    __slots__ = ("_buf", "_data", "_event", "_has_data", "_max", "_scan")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buf = b""
        self._scan = 0  # where the next unparsed line starts in _buf
        self._data: list[bytes] = []
        self._has_data = False
        self._event: bytes | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        buf = self._buf + chunk if self._buf else chunk
        events: list[Event] = []
        pos = self._scan
        start = 0
        size = len(buf)
        while True:
            match = _LINE_END.search(buf, pos)
            if match is None:
                break
            end = match.end()
            if end == size and match.group() == b"\r":
                break
            line = buf[pos : match.start()]
            pos = end
            if line:
                self._field(line)
            else:
                events.append(self._dispatch(buf[start:pos]))
                start = pos
        self._buf = buf[start:]
        self._scan = pos - start
        if len(self._buf) > self._max:
            events.append(self._dispatch(self._buf, malformed=True))
            self._buf = b""
            self._scan = 0
        return events

    def close(self) -> Event | None:
        """The bytes of an event the stream ended in the middle of, if any."""
        if not self._buf:
            return None
        tail = self._buf
        self._buf = b""
        self._scan = 0
        return self._dispatch(tail, malformed=True)

    def _field(self, line: bytes) -> None:
        if line[:5] == b"data:":
            value = line[5:]
            self._data.append(value[1:] if value[:1] == b" " else value)
            self._has_data = True
        elif line[:1] == b":":
            return  # a comment (keep-alive ping)
        elif line[:6] == b"event:":
            value = line[6:]
            self._event = value[1:] if value[:1] == b" " else value
        elif line == b"data":
            self._data.append(b"")
            self._has_data = True
        # id, retry and unknown fields do not matter for counting.

    def _dispatch(self, raw: bytes, *, malformed: bool = False) -> Event:
        data: str | None = None
        event: str | None = None
        bad = malformed
        try:
            if self._has_data:
                data = b"\n".join(self._data).decode()
            if self._event is not None:
                event = self._event.decode()
        except UnicodeDecodeError:
            bad = True
            data = None
        self._data = []
        self._has_data = False
        self._event = None
        return Event(raw, data, event, bad)
