"""Streams: an incremental SSE parser for upstream streams, and the relay that forwards them while the
output checks watch (``relay`` and ``StreamGuard``).

The parser follows the WHATWG event-stream rules that matter for OpenAI-compatible streams: lines end
with CRLF, LF or CR (a CR at the end of one read may be the first half of a CRLF split across reads);
lines starting with ``:`` are comments (``: ping`` keep-alives); ``data:`` lines of one event are joined
with ``\\n``; a blank line dispatches the event; one optional space after the colon is dropped. Bytes
are decoded incrementally, so a UTF-8 sequence split across two TCP reads decodes correctly. An event
(or an unterminated line) larger than ``max_event_chars`` raises ``SSEError``: an upstream that never
sends a newline must not grow our memory without bound.

``StreamGuard`` accumulates each choice's text (content deltas, tool-call argument and custom tool input deltas;
apart from them what is read beside the reply: reasoning, refusal and audio transcript deltas, non-text parts of a
``content`` sent as a list, decoded arguments) and runs
``check_output`` every ``pipeline.output_check_chars`` new characters and once more (``final=True``)
before a choice's finishing chunk or ``[DONE]``: the streaming path runs the same checks as the plain one.
"""

from __future__ import annotations

import codecs
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from guardproxy.errors import GuardProxyError, UpstreamStreamError
from guardproxy.pipeline import Exchange, Pipeline, Verdict, combine
from guardproxy.untrusted import strings_of

DONE = "[DONE]"
_FINISHED_RE = re.compile(r'"finish_reason"\s*:\s*"')  # a finish_reason that is a string, not null
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


def choice_text(content: str, tool_args: list[str]) -> str:
    """What the output checks read for one choice: the content, then each tool call's arguments."""
    parts = [content] if content else []
    parts.extend(a for a in tool_args if a)
    return "\n".join(parts)


REASONING_FIELDS = ("reasoning_content", "reasoning")  # vLLM's reasoning parsers and DeepSeek; Ollama, OpenRouter
# Content parts whose ``text`` is the reply itself; any other part's strings (Mistral's ``thinking``, ...) are read
# beside it, as reasoning is.
_TEXT_PARTS = frozenset({None, "text", "output_text"})
_ESCAPE = re.compile(r"\\u[0-9a-fA-F]{4}(?:\\u[0-9a-fA-F]{4})?")


def content_parts(parts: list[Any]) -> tuple[str, str]:
    """(reply text, other text) of a content-part list: text parts make the reply; the strings of other parts
    (``thinking``, a refusal part, ...) are read beside it, never recorded as the reply."""
    text: list[str] = []
    other: list[str] = []
    for part in parts:
        if isinstance(part, str):
            other.append(part)
        elif isinstance(part, dict):
            if isinstance(part.get("text"), str):
                text.append(part["text"])
            if part.get("type") not in _TEXT_PARTS:
                other.extend(strings_of({k: v for k, v in part.items() if k != "text"}))
    return "".join(text), "\n".join(other)


def unescaped(arguments: str) -> str:
    """Tool-call arguments as a client decoding their JSON reads them (``\\u0070ipe`` is "pipe"), or "" when that
    reads the same as the raw string. A partial (streamed) string decodes its ``\\u`` escapes only."""
    if "\\" not in arguments:
        return ""
    try:
        decoded = json.dumps(json.loads(arguments), ensure_ascii=False)
    except ValueError:
        decoded = _ESCAPE.sub(_unescape_one, arguments)
    return decoded if decoded != arguments else ""


def _unescape_one(match: re.Match[str]) -> str:
    try:
        return str(json.loads(f'"{match.group(0)}"'))
    except ValueError:  # a lone surrogate
        return match.group(0)


def side_texts(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, text) of what a message or a delta carries beside its content and reasoning that a client shows: a
    refusal, an audio reply's transcript, OpenRouter's ``reasoning_details``, a custom tool call's input (free text:
    the history binds only content and function arguments, so it is read beside the reply as these are)."""
    out = [("refusal", r)] if isinstance(r := obj.get("refusal"), str) and r else []
    audio = obj.get("audio")
    if isinstance(audio, dict) and isinstance(t := audio.get("transcript"), str) and t:
        out.append(("audio", t))
    details = obj.get("reasoning_details")
    if isinstance(details, list):
        out.extend(("reasoning_details", t) for t in strings_of(details))
    out.extend((f"custom{idx}", text) for idx, text in tool_inputs(obj, "custom", "input"))
    return out


LEGACY_CALL = 1 << 30  # the index of a legacy ``function_call``'s arguments: after every tool call's


def tool_inputs(obj: dict[str, Any], key: str = "function", name: str = "arguments") -> list[tuple[int, str]]:
    """(tool call index, text) of the tool calls of a message or delta: function arguments (a legacy
    ``function_call``'s too, at ``LEGACY_CALL``), or with ``("custom", "input")`` custom tools' input."""
    out = []
    calls = obj.get("tool_calls")
    for pos, tc in enumerate(calls if isinstance(calls, list) else ()):
        if not isinstance(tc, dict):
            continue
        idx = tc.get("index", pos)
        idx = idx if isinstance(idx, int) else pos
        part = tc.get(key)
        value = part.get(name) if isinstance(part, dict) else None
        if isinstance(value, str) and value:
            out.append((idx, value))
    legacy = obj.get("function_call") if key == "function" else None
    if isinstance(legacy, dict) and isinstance(a := legacy.get("arguments"), str) and a:
        out.append((LEGACY_CALL, a))
    return out


def reasoning(obj: dict[str, Any]) -> str:
    """The reasoning a message or a delta carries (``REASONING_FIELDS``)."""
    return "".join(v for k in REASONING_FIELDS if isinstance(v := obj.get(k), str))


def reasoning_of(obj: dict[str, Any]) -> str:
    """What the output check reads of a message beside its reply text: the reasoning a reasoning model thinks aloud,
    a refusal, an audio transcript, the strings of non-text content parts, and tool-call arguments with their JSON
    escapes decoded. Clients show all of it; none of it is the reply text the history records. "" for a message
    with content and tool calls only (unescaped), so an ordinary reply reads as before."""
    parts = [reasoning(obj)]
    content = obj.get("content")
    if isinstance(content, list):
        parts.append(content_parts(content)[1])
    parts.extend(t for _, t in side_texts(obj))
    parts.extend(unescaped(a) for _, a in tool_inputs(obj))
    return "\n".join(p for p in parts if p)


@dataclass
class ChoiceText:
    """The assistant text of one streamed choice: content deltas and tool-call argument deltas, and apart from them
    the reasoning deltas and the other fields ``reasoning_of`` reads (refusal, audio transcript, custom tool input,
    non-text content parts): checked with the reply, never part of the reply text the history records."""

    content: list[str] = field(default_factory=list)
    args: dict[int, list[str]] = field(default_factory=dict)
    reasoning: list[str] = field(default_factory=list)
    side: dict[str, list[str]] = field(default_factory=dict)  # refusal, audio transcript, non-text parts
    size: int = 0
    content_chars: int = 0
    relayed_chars: int = 0  # of the content, what went out to the client (the events no check withheld)
    checked: int = 0
    final_checked: bool = False
    finished: bool = False  # a chunk carried this choice's finish_reason

    def add(self, delta: dict[str, Any]) -> None:
        c = delta.get("content")
        other = ""
        if isinstance(c, list):  # content as parts: text parts are content, the rest is read beside it
            c, other = content_parts(c)
        if isinstance(c, str) and c:
            self.content.append(c)
            self.size += len(c)
            self.content_chars += len(c)
        if r := reasoning(delta):
            self.reasoning.append(r)
            self.size += len(r)
        for key, text in (("parts", other), *side_texts(delta)):
            if text:
                self.side.setdefault(key, []).append(text)
                self.size += len(text)
        for idx, a in tool_inputs(delta):
            self.args.setdefault(idx, []).append(a)
            self.size += len(a)

    def text(self) -> str:
        return choice_text("".join(self.content), ["".join(a) for _, a in sorted(self.args.items())])

    def reasoning_text(self) -> str:
        """The reasoning, then what else was streamed beside the content (``reasoning_of``'s fields), then the tool
        calls' arguments with their JSON escapes decoded."""
        parts = ["".join(self.reasoning), *("".join(v) for v in self.side.values())]
        parts.extend(unescaped("".join(a)) for _, a in sorted(self.args.items()))
        return "\n".join(p for p in parts if p)


def raise_stream_error(data: str) -> None:
    """An upstream ``{"error": ...}`` event inside a 200 stream is an error, not content."""
    try:
        obj = json.loads(data)
    except ValueError:
        return
    if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
        err = obj["error"]
        msg = err.get("message") if isinstance(err, dict) else str(err)
        raise UpstreamStreamError(f"upstream error in stream: {msg}")


BodySender = Callable[[bytes, bool], Awaitable[None]]  # (data, more_body)


async def relay(
    chunks: AsyncIterator[bytes], send: BodySender, *, guard: StreamGuard | None, max_event_chars: int
) -> str:
    """Relay an upstream event stream to the client as it arrives; the exchange's outcome when it ends.

    Events of one upstream read go out in one write. With a ``guard`` every event is accounted for and
    checked when due; a block cuts the stream before the event that tripped it. Without one (a pure
    passthrough) only ``[DONE]`` and ``{"error": ...}`` events are looked at. An upstream error event,
    a malformed stream, or a stream that ends without ``[DONE]`` raises ``UpstreamStreamError`` (the
    caller ends the client's stream in-band); events that arrived intact before it are relayed first.
    """
    parser = SSEParser(max_event_chars)
    finished = False  # passthrough: some event carried a finish_reason
    async for chunk in chunks:
        out = bytearray()
        try:
            for ev in parser.feed(chunk):
                if ev.comment:
                    out += ev.encode()
                    continue
                if ev.done:
                    block = await guard.finish() if guard is not None else None
                    await send(bytes(out) + (block if block is not None else DONE_BYTES), False)
                    return "blocked_output" if block is not None else "ok"
                if guard is None:
                    if '"error"' in ev.data:
                        raise_stream_error(ev.data)
                    finished = finished or _FINISHED_RE.search(ev.data) is not None
                else:
                    block = await guard.event(ev.data)
                    if block is not None:
                        await send(bytes(out) + block, False)
                        return "blocked_output"
                out += ev.encode()
        except GuardProxyError:
            if out:
                await send(bytes(out), True)
            raise
        if out:
            await send(bytes(out), True)
    cut_inside_an_event = parser.pending
    parser.close()
    # Some servers (older llama.cpp among them) end a complete stream without the [DONE] sentinel. A
    # stream that ended cleanly after every choice finished is complete: say so. Anything else was cut.
    if not cut_inside_an_event and (guard.all_finished() if guard is not None else finished):
        block = await guard.finish() if guard is not None else None
        await send(block if block is not None else DONE_BYTES, False)
        return "blocked_output" if block is not None else "ok"
    raise UpstreamStreamError("the upstream stream ended before every choice finished, without [DONE]")


class StreamGuard:
    """Accumulates streamed choices and runs the output checks at the right moments."""

    def __init__(self, pipeline: Pipeline, ex: Exchange) -> None:
        self.pipeline = pipeline
        self.ex = ex
        self.choices: dict[int, ChoiceText] = {}
        self.meta: dict[str, Any] = {}
        self.blocked = False
        self.verdicts: list[Verdict] = []

    async def event(self, data: str) -> bytes | None:
        """Account for one event; the bytes that end the stream if a check blocks, else None."""
        try:
            obj = json.loads(data)
        except ValueError:
            raise UpstreamStreamError("upstream sent an event that is not valid JSON") from None
        if not isinstance(obj, dict):
            raise UpstreamStreamError("upstream sent an event that is not a JSON object")
        if "error" in obj and "choices" not in obj:
            raise_stream_error(data)
        for key in ("id", "created", "model"):
            if key in obj:
                self.meta[key] = obj[key]
        step = self.pipeline.output_check_chars
        touched: list[ChoiceText] = []
        for pos, ch in enumerate(obj.get("choices") or []):
            if not isinstance(ch, dict):
                continue
            idx = ch.get("index", pos)
            idx = idx if isinstance(idx, int) else pos
            st = self.choices.get(idx)
            if st is None:
                st = self.choices[idx] = ChoiceText()
            touched.append(st)
            delta = ch.get("delta")
            if isinstance(delta, dict):
                st.add(delta)
            if ch.get("finish_reason") is not None:
                st.finished = True
                block = await self._check(idx, st, final=True)
            elif st.size - st.checked >= step:
                block = await self._check(idx, st, final=False)
            else:
                block = None
            if block is not None:
                return block  # the whole event is withheld: nothing of it was relayed
        for st in touched:
            st.relayed_chars = st.content_chars
        return None

    def all_finished(self) -> bool:
        return bool(self.choices) and all(st.finished for st in self.choices.values())

    async def finish(self) -> bytes | None:
        """At ``[DONE]``: the final check of every choice that has not had one."""
        for idx, st in self.choices.items():
            if not st.final_checked and (block := await self._check(idx, st, final=True)) is not None:
                return block
        self.record()
        return None

    async def _check(self, idx: int, st: ChoiceText, *, final: bool) -> bytes | None:
        text = st.text()
        self.ex.reply_reasoning[idx] = st.reasoning_text()
        st.checked = st.size
        st.final_checked = st.final_checked or final
        with self.ex.timed("output_check"):
            verdict = await self.pipeline.check_output(self.ex, idx, text, final=final)
        self.verdicts.append(verdict)
        if not verdict.blocks:
            return None
        self.blocked = True
        self.record()
        base = {
            "id": self.meta.get("id", f"chatcmpl-guard-{self.ex.request_id}"),
            "object": "chat.completion.chunk",
            "created": self.meta.get("created", int(time.time())),
            "model": self.meta.get("model", self.ex.body.get("model") or "guardproxy"),
        }
        # every choice asked for ends here, those the upstream had not started yet too
        n = self.ex.body.get("n")
        asked = range(n if isinstance(n, int) and n > 0 else 1)
        choices = []
        for i in sorted(set(self.choices).union(asked)):
            delta = {"content": verdict.reply_text} if i == idx and verdict.reply_text else {}
            choices.append({"index": i, "delta": delta, "finish_reason": "content_filter"})
        return sse_json({**base, "choices": choices}) + DONE_BYTES

    def record(self) -> None:
        self.ex.reply_texts = {i: st.text() for i, st in self.choices.items()}
        self.ex.relayed_chars = {i: st.relayed_chars for i, st in self.choices.items()}
        self.ex.output_verdict = combine(self.verdicts)
