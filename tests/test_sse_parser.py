"""The incremental SSE parser: unit cases and properties over arbitrary splits and line endings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.streaming import SSEError, SSEEvent, SSEParser


def parse_all(chunks: list[bytes], **kw: int) -> list[SSEEvent]:
    parser = SSEParser(**kw)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.close())
    return events


def data_of(events: list[SSEEvent]) -> list[str]:
    return [e.data for e in events if not e.comment]


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"data: a\n\n", ["a"]),
        (b"data: a\r\n\r\n", ["a"]),
        (b"data: a\r\rdata: b\r\r", ["a", "b"]),
        (b"data:a\n\n", ["a"]),  # the space after the colon is optional
        (b"data:  a\n\n", [" a"]),  # only one space is dropped
        (b"data: a\ndata: b\n\n", ["a\nb"]),  # multi-line data
        (b": ping\n\ndata: a\n\n", ["a"]),
        (b"event: x\nid: 7\ndata: a\n\n", ["a"]),
        (b"data: [DONE]\n\n", ["[DONE]"]),
        (b"data: a\n\ndata: b", ["a"]),  # an event without its blank line at EOF is dropped
        (b"retry: 10\nfoo: bar\n\n", []),  # no data: nothing dispatched
        (b"data\n\n", [""]),  # a field with no colon has an empty value
    ],
)
def test_parses(stream: bytes, expected: list[str]) -> None:
    assert data_of(parse_all([stream])) == expected


def test_crlf_split_across_reads() -> None:
    # The CR ends one read and the LF starts the next: still one line ending, not two.
    assert data_of(parse_all([b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"])) == ["a", "b"]


def test_utf8_split_across_reads() -> None:
    raw = "data: héllo 🙂\n\n".encode()
    cut = raw.index("🙂".encode()) + 2  # inside the 4-byte sequence
    assert data_of(parse_all([raw[:cut], raw[cut:]])) == ["héllo 🙂"]


def test_comment_only_block_is_reported_as_keepalive() -> None:
    events = parse_all([b": ping\n\n"])
    assert [e.comment for e in events] == [True]
    assert events[0].encode() == b": keep-alive\n\n"


def test_event_fields_are_kept_and_encoded() -> None:
    (ev,) = parse_all([b"event: delta\nid: 3\ndata: x\ndata: y\n\n"])
    assert (ev.event, ev.id, ev.data) == ("delta", "3", "x\ny")
    assert ev.encode() == b"event: delta\nid: 3\ndata: x\ndata: y\n\n"


def test_oversized_event_raises() -> None:
    parser = SSEParser(max_event_chars=100)
    with pytest.raises(SSEError):
        for _ in range(10):
            parser.feed(b"data: " + b"x" * 30 + b"\n")


def test_unterminated_line_over_limit_raises() -> None:
    parser = SSEParser(max_event_chars=100)
    with pytest.raises(SSEError):
        parser.feed(b"data: " + b"x" * 200)


def test_invalid_utf8_raises() -> None:
    with pytest.raises(SSEError):
        SSEParser().feed(b"data: \xff\xfe\n\n")


def test_stream_ending_inside_utf8_sequence_raises() -> None:
    parser = SSEParser()
    parser.feed("data: 🙂".encode()[:-1])
    with pytest.raises(SSEError):
        parser.close()


def test_pending_reports_a_cut_event() -> None:
    parser = SSEParser()
    parser.feed(b"data: half")
    assert parser.pending


# -- properties ---------------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=40)
_events = st.lists(st.lists(_text, min_size=1, max_size=3), min_size=0, max_size=8)
_newline = st.sampled_from(["\n", "\r\n", "\r"])


@settings(max_examples=300, deadline=None)
@given(events=_events, newline=_newline, comments=st.booleans(), data=st.data())
def test_any_split_and_line_ending_gives_the_same_events(
    events: list[list[str]], newline: str, comments: bool, data: st.DataObject
) -> None:
    text = ""
    for lines in events:
        if comments:
            text += ": ping" + newline
        text += "".join(f"data: {line}{newline}" for line in lines) + newline
    raw = text.encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert data_of(parse_all(chunks)) == ["\n".join(lines) for lines in events]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bytes_only_raise_sse_error(chunks: list[bytes]) -> None:
    try:
        events = parse_all(chunks, max_event_chars=256)
    except SSEError:
        return
    for ev in events:
        assert ev.encode().endswith(b"\n\n")
