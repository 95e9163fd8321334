"""Server-sent events: an incremental parser for upstream streams and the encoders for what we relay.

The parser follows the WHATWG event-stream rules that matter for OpenAI-compatible streams: lines end
with CRLF, LF or CR (a CR at the end of one read may be the first half of a CRLF split across reads);
lines starting with ``:`` are comments (``: ping`` keep-alives); ``data:`` lines of one event are joined
with ``\\n``; a blank line dispatches the event; one optional space after the colon is dropped. Bytes
are decoded incrementally, so a UTF-8 sequence split across two TCP reads decodes correctly. An event
(or an unterminated line) larger than ``max_event_chars`` raises ``SSEError``: an upstream that never
sends a newline must not grow our memory without bound.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Any

from guardproxy.errors import UpstreamStreamError

DONE = "[DONE]"
DONE_BYTES = b"data: [DONE]\n\n"
KEEPALIVE_BYTES = b": keep-alive\n\n"


class SSEError(UpstreamStreamError):
    """The upstream's event stream is malformed (invalid UTF-8 or an oversized event)."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event. ``comment`` is True for a block that held only comment lines."""

    data: str = ""
    event: str = ""
    id: str | None = None
    comment: bool = False

    @property
    def done(self) -> bool:
        return self.data == DONE and not self.comment

    def encode(self) -> bytes:
        """The event as we relay it (LF line endings, one ``data:`` line per data line)."""
        if self.comment:
            return KEEPALIVE_BYTES
        head = ""
        if self.event:
            head += f"event: {self.event}\n"
        if self.id is not None:
            head += f"id: {self.id}\n"
        if "\n" in self.data:
            body = "".join(f"data: {line}\n" for line in self.data.split("\n"))
        else:
            body = f"data: {self.data}\n"
        return (head + body + "\n").encode()


class SSEParser:
    """Feed it bytes as they arrive; it returns the events completed so far."""

    def __init__(self, max_event_chars: int = 1 << 20) -> None:
        self.max_event_chars = max_event_chars
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._tail = ""  # the incomplete last line
        self._data: list[str] = []
        self._data_chars = 0
        self._event = ""
        self._id: str | None = None
        self._comment = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        try:
            text = self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise SSEError(f"upstream stream is not valid UTF-8: {exc.reason}") from exc
        return self._lines(text, final=False)

    def close(self) -> list[SSEEvent]:
        """End of stream: flush the decoder and any last line. An event without its blank line is dropped."""
        try:
            text = self._decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise SSEError("upstream stream ended inside a UTF-8 sequence") from exc
        return self._lines(text, final=True)

    @property
    def pending(self) -> bool:
        """True when a partial event is buffered (the stream was cut inside an event)."""
        return bool(self._tail or self._data)

    def _lines(self, text: str, *, final: bool) -> list[SSEEvent]:
        text = self._tail + text
        hold = ""
        if "\r" in text:
            if text.endswith("\r") and not final:
                # Possibly the first half of a CRLF split across reads: decide on the next read.
                text, hold = text[:-1], "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        self._tail = lines.pop() + hold
        if final and self._tail:
            lines.append(self._tail.rstrip("\r"))
            self._tail = ""
        if len(self._tail) > self.max_event_chars:
            raise SSEError(f"upstream sent a line over {self.max_event_chars} characters")
        events: list[SSEEvent] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(SSEEvent("\n".join(self._data), self._event, self._id))
                elif self._comment:
                    events.append(SSEEvent(comment=True))
                self._data, self._data_chars, self._event, self._comment = [], 0, "", False
                continue
            if line[0] == ":":
                self._comment = True
                continue
            self._field(line)
        return events

    def _field(self, line: str) -> None:
        name, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_chars += len(value) + 1
            if self._data_chars > self.max_event_chars:
                raise SSEError(f"upstream sent an event over {self.max_event_chars} characters")
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        # "retry" and unknown fields are ignored, as the spec says.


def sse_json(obj: Any) -> bytes:
    """One ``data:`` event carrying ``obj`` as compact JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def error_tail(payload: dict[str, Any]) -> bytes:
    """What ends a stream that failed after its headers were sent: an error event, then ``[DONE]``."""
    return sse_json(payload) + DONE_BYTES
