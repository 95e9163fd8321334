"""Streams: an incremental SSE parser for upstream streams, and the relay that forwards them while the
output checks watch (``relay`` and ``StreamGuard``).

The parser follows the WHATWG event-stream rules that matter for OpenAI-compatible streams: lines end
with CRLF, LF or CR (a CR at the end of one read may be the first half of a CRLF split across reads);
lines starting with ``:`` are comments (``: ping`` keep-alives); ``data:`` lines of one event are joined
with ``\\n``; a blank line dispatches the event; one optional space after the colon is dropped. Bytes
are decoded incrementally, so a UTF-8 sequence split across two TCP reads decodes correctly. An event
(or an unterminated line) larger than ``max_event_chars`` raises ``SSEError``: an upstream that never
sends a newline must not grow our memory without bound.

``StreamGuard`` accumulates each choice's text (content deltas and tool-call argument deltas; apart from them what is
read beside the reply: reasoning deltas, every other string a delta carries, field by field (``side_fields``: a
refusal, an audio transcript, a custom tool's input, ``thinking``, a vendor's own field...), non-text parts of a
``content`` sent as a list, decoded arguments) and runs ``check_output`` every ``pipeline.output_check_chars`` new
characters and once more (``final=True``) before a choice's finishing chunk or ``[DONE]``: the streaming path runs
the same checks as the plain one. Beside the delta it reads, as the plain path does beside the message, every other
string of a choice (``choice_fields``: a legacy ``text``, a vendor's field, a ``message`` sent in a chunk) and the
text its logprobs spell (``Logprobs``) where either does not repeat the content, and with choice 0 every string of a
chunk outside its choices (``top_fields``), less ids and tokens (``Beside.texts``); an upstream's ``{"error": ...}``
event is read so too before its message is relayed, and its text is never logged (``error_summary``).

What a client gets is what the check read, or an end: ``read_choices`` refuses a reply or chunk whose shape leaves in
doubt what a client shows (``choices`` not a list, a choice not an object, an index that is not a non-negative
integer or that two choices of one reply or chunk share, a field the check reads that is not text, a key that is a
case variant of one the check reads, as ``Choices`` or ``Content``), and a stream that turns malformed ends as a block
ends. Text for a choice after its ``finish_reason`` (its last check has run) is
dropped, and nothing after ``[DONE]`` is read.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from guardproxy.errors import GuardProxyError, UpstreamStreamError
from guardproxy.pipeline import Exchange, Pipeline, Verdict, combine

logger = logging.getLogger(__name__)

DONE = "[DONE]"
_FINISHED_RE = re.compile(r'"finish_reason"\s*:\s*"')  # a finish_reason that is a string, not null
DONE_BYTES = b"data: [DONE]\n\n"
KEEPALIVE_BYTES = b": keep-alive\n\n"


class SSEError(UpstreamStreamError):
    """The upstream's event stream is malformed (invalid UTF-8 or an oversized event)."""


class MalformedReply(UpstreamStreamError):
    """The upstream's reply or chunk has a shape the output check cannot read with certainty (``read_choices``).
    ``problem`` names the kind for the metrics (``metrics.MALFORMED_PROBLEMS``); the message is the gateway's own,
    never the upstream's text."""

    def __init__(self, problem: str, detail: str) -> None:
        super().__init__(f"upstream reply malformed: {detail}")
        self.problem = problem


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
_ESCAPE = re.compile(r"\\u[0-9a-fA-F]{4}(?:\\u[0-9a-fA-F]{4})?")


def content_parts(parts: list[Any]) -> tuple[str, str]:
    """(reply text, other text) of a content-part list: each part's ``text`` makes the reply; every other string of
    every part, text parts too (``{"type": "text", "content": ...}``, a part without ``text``, an annotation's title),
    and the strings of other parts (``thinking``, a refusal part, ...) are read beside it, never recorded as the
    reply; less what is under a ``REPLY_NOT_TEXT`` key (a text part's ``type``)."""
    text: list[str] = []
    other: list[str] = []
    for part in parts:
        if isinstance(part, str):
            other.append(part)
        elif isinstance(part, dict):
            if isinstance(part.get("text"), str):
                text.append(part["text"])
            other.extend(t for _, t in _leaves({k: v for k, v in part.items() if k != "text"}, ""))
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


# Keys under which a reply carries no text a client shows, wherever they sit; every other string is read. A tool
# call's ``name`` is skipped too where the request declared that name (``tool_names``, ``ChoiceText.reasoning_text``).
# Strings elsewhere are read as written, data URIs too: a stream splits any string across deltas, so no test of one
# piece could tell a payload from text.
REPLY_NOT_TEXT = frozenset(
    {
        "id", "tool_call_id", "call_id",  # ids
        "role", "type", "format", "mime_type",  # enums: the speaker, a part's or tool call's kind, a media type
        "index", "expires_at",  # numbers, strings only in a malformed reply
        "signature", "encrypted_content",  # opaque provider tokens (a thinking block's, encrypted reasoning)
        "data", "url", "image_url",  # payloads and addresses: an audio reply's audio, an image, a citation's link
    }
)  # fmt: skip
_READ_APART = frozenset({"content", *REASONING_FIELDS})  # the reply text, or read first (``reasoning``)


def side_fields(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, text) of every string a message or a delta carries beside its content, its reasoning and its function
    arguments, at any depth, less what is under a ``REPLY_NOT_TEXT`` key: a refusal, an audio transcript, a custom
    tool call's input, a tool call's name (``is_tool_name`` tells which paths hold one), and any field an upstream
    adds (``thinking``, ``reasoning_text``, ``analysis``, a vendor's own, a list of thinking blocks). The path
    (``thinking/0/thinking``) names where the text sits, so a stream's pieces of one field are joined
    (``ChoiceText``)."""
    out: list[tuple[str, str]] = []
    for key, value in obj.items():
        if key in _READ_APART or key in REPLY_NOT_TEXT:
            continue
        if key == "tool_calls" and isinstance(value, list):
            for pos, tc in enumerate(value):
                if isinstance(tc, dict):
                    out.extend(_leaves(_tool_call_rest(tc), f"tool_calls/{_call_index(tc, pos)}"))
        elif key == "function_call" and isinstance(value, dict):
            out.extend(_leaves({k: v for k, v in value.items() if k != "arguments"}, key))
        else:
            out.extend(_leaves(value, key))
    return out


def _tool_call_rest(tc: dict[str, Any]) -> dict[str, Any]:
    """A tool call less its function's arguments (the reply text reads them). The function's or custom tool's
    ``name`` stays: an upstream's tool parser (vLLM's, Ollama's) copies whatever name the model wrote."""
    part = tc.get("function")
    if isinstance(part, dict) and "arguments" in part:
        return {**tc, "function": {k: v for k, v in part.items() if k != "arguments"}}
    return tc


_NAME_PATH = re.compile(r"(?:tool_calls/\d+/(?:function|custom)|function_call)/name")


def is_tool_name(path: str) -> bool:
    """Whether a ``side_fields`` path is where a tool call's (or a legacy ``function_call``'s) name sits."""
    return _NAME_PATH.fullmatch(path) is not None


def tool_names(body: dict[str, Any]) -> frozenset[str]:
    """The names of the tools a request declares (``tools``: function and custom tools; legacy ``functions``). A
    reply's tool call to one of them names nothing the client did not write, so the check does not read that name:
    an ordinary tool-call reply reads as it did, and a tool named for risky work (``exploit_scan``) does not make
    every call to it read as harm. Any other name is what the model wrote, and is read."""
    names: set[str] = set()
    tools, functions = body.get("tools"), body.get("functions")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict):
            for kind in ("function", "custom"):
                part = tool.get(kind)
                if isinstance(part, dict) and isinstance(name := part.get("name"), str):
                    names.add(name)
    for fn in functions if isinstance(functions, list) else ():
        if isinstance(fn, dict) and isinstance(name := fn.get("name"), str):
            names.add(name)
    return frozenset(names)


def _call_index(tc: dict[str, Any], pos: int) -> int:
    idx = tc.get("index", pos)
    return idx if isinstance(idx, int) else pos


def _leaves(value: Any, path: str) -> list[tuple[str, str]]:
    """(path, string) of each non-empty string leaf of ``value``, in order, less what is under a ``REPLY_NOT_TEXT``
    key. Walked without recursion: no nesting depth hides a string (the reply's size bounds the walk)."""
    out: list[tuple[str, str]] = []
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        here, v = stack.pop()
        if isinstance(v, str):
            if v:
                out.append((here, v))
        elif isinstance(v, dict):
            stack.extend((f"{here}/{k}", x) for k, x in reversed(v.items()) if k not in REPLY_NOT_TEXT)
        elif isinstance(v, list):
            stack.extend((f"{here}/{i}", x) for i, x in reversed(list(enumerate(v))))
    return out


def string_leaves(value: Any) -> list[tuple[str, str]]:
    """(path, string) of each non-empty string of a JSON value, less what is under a ``REPLY_NOT_TEXT`` key."""
    return _leaves(value, "")


LEGACY_CALL = 1 << 30  # the index of a legacy ``function_call``'s arguments: after every tool call's


def tool_inputs(obj: dict[str, Any]) -> list[tuple[int, str]]:
    """(tool call index, arguments) of the function calls of a message or delta, a legacy ``function_call``'s too
    (at ``LEGACY_CALL``)."""
    out = []
    calls = obj.get("tool_calls")
    for pos, tc in enumerate(calls if isinstance(calls, list) else ()):
        if not isinstance(tc, dict):
            continue
        part = tc.get("function")
        value = part.get("arguments") if isinstance(part, dict) else None
        if isinstance(value, str) and value:
            out.append((_call_index(tc, pos), value))
    legacy = obj.get("function_call")
    if isinstance(legacy, dict) and isinstance(a := legacy.get("arguments"), str) and a:
        out.append((LEGACY_CALL, a))
    return out


# Text beside a choice's message or delta (``choice_fields``), in its logprobs (``Logprobs``) and beside the choices
# (``top_fields``) is read as the choice's side text (``Beside``), less what is an id or a token (``Beside.texts``).
OPAQUE_CHARS = 64  # a string this short with no whitespace is an id, an enum or a token (``fp_44709d6fcb``, ``stop``)
OPAQUE_BUDGET = 128  # past this many characters of such strings in one choice's fields, they are read too (words)
LONG_TOKEN = 32  # an alternative token (``top_logprobs``) longer than this is read: no vocabulary's token is text
_SPACE = re.compile(r"\s")
# top-level keys of a reply or chunk that hold an id, a name or an enum: skipped when one token, at any length (a
# model's path), counted in no budget (one string each); read when they hold whitespace
_TOKEN_KEYS = frozenset({"object", "model", "system_fingerprint", "service_tier", "obfuscation"})
_STOP_KEYS = frozenset({"stop_reason", "matched_stop"})  # vLLM's, SGLang's: the stop string that matched


def stop_strings(body: dict[str, Any]) -> frozenset[str]:
    """The stop sequences a request sets: a choice's ``stop_reason`` that is one of them echoes the client's text."""
    stop = body.get("stop")
    if isinstance(stop, str):
        return frozenset({stop})
    return frozenset(s for s in stop if isinstance(s, str)) if isinstance(stop, list) else frozenset()


def top_fields(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, text) of every string of a reply or chunk outside its choices, less what is under a ``REPLY_NOT_TEXT``
    key and a ``_TOKEN_KEYS`` value with no whitespace (``system_fingerprint: "fp_..."``). A client may show any of
    it (an ``output_text``, a vendor's note); an upstream's ``system_fingerprint`` with a sentence in it is read."""
    out: list[tuple[str, str]] = []
    for key, value in obj.items():
        if key == "choices" or key in REPLY_NOT_TEXT:
            continue
        if key in _TOKEN_KEYS and isinstance(value, str) and not _SPACE.search(value):
            continue
        out.extend(_leaves(value, key))
    return out


def choice_fields(choice: dict[str, Any], part: str, stops: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """(path, text) of every string of a choice beside its ``part`` (message or delta, read apart) and its logprobs
    (``Logprobs``): a legacy ``text``, a vendor's field, a ``finish_reason``, and in a stream chunk a ``message``
    (Perplexity sends the message so far beside the delta: the same text, which ``Beside.texts`` skips). A
    ``stop_reason`` that is one of the request's ``stops`` is the client's own text and is skipped."""
    out: list[tuple[str, str]] = []
    for key, value in choice.items():
        if key in ("index", part, "logprobs") or key in REPLY_NOT_TEXT:
            continue
        if key in _STOP_KEYS and value in stops:
            continue
        out.extend(_leaves(value, key))
    return out


@dataclass
class Beside:
    """The side fields of one choice (or of a reply's top level), each path's text joined across a stream's chunks.
    A piece that starts with the text so far replaces it (a field sent whole again, or the message so far), any
    other is appended (a field sent in pieces)."""

    paths: dict[str, str] = field(default_factory=dict)

    def add(self, pairs: list[tuple[str, str]]) -> int:
        """Add the pieces; how many characters the text grew by."""
        grown = 0
        for path, text in pairs:
            old = self.paths.get(path, "")
            if text == old:
                continue
            new = text if text.startswith(old) else old + text
            grown += max(0, len(new) - len(old))
            self.paths[path] = new
        return grown

    def texts(self, known: Known | None = None) -> list[str]:
        """What the check reads: each path's text, less one that is ``known`` (the choice's content, its reasoning:
        read already) and one that is an id or a token (no whitespace, at most ``OPAQUE_CHARS``), unless such strings
        together pass ``OPAQUE_BUDGET`` (a reply spread one word a field): then they are read, joined by spaces."""
        read: list[str] = []
        tokens: list[str] = []
        size = 0
        for text in self.paths.values():
            bare = text.strip()
            if not bare:
                continue
            if len(bare) <= OPAQUE_CHARS and not _SPACE.search(bare):
                tokens.append(bare)
                size += len(bare)
            elif known is None or bare not in known:
                read.append(text)
        if size > OPAQUE_BUDGET:
            read.append(" ".join(tokens))
        return read


def _byte_list(value: Any) -> bytes | None:
    """A token's ``bytes`` (a list of integers 0-255), or None."""
    if not isinstance(value, list):
        return None
    try:
        return bytes(value)
    except (TypeError, ValueError):
        return None


@dataclass
class Logprobs:
    """A choice's logprobs, as text: the tokens of its content (and of its refusal, or a legacy ``tokens`` list)
    joined, their ``bytes`` decoded, an alternative token longer than ``LONG_TOKEN`` and any other string (``other``,
    read as side fields). The joined tokens are the content for any ordinary upstream: ``texts`` skips what is
    ``known``, so a reply with logprobs reads as one without."""

    tokens: dict[str, list[str]] = field(default_factory=dict)
    raw: dict[str, bytearray] = field(default_factory=dict)
    other: list[tuple[str, str]] = field(default_factory=list)

    def add(self, lp: Any) -> int:
        """Add a choice's (or a chunk's) logprobs; how many characters of token text it brought."""
        if lp is None:
            return 0
        if not isinstance(lp, dict):
            self.other.extend(_leaves(lp, "logprobs"))
            return 0
        size = 0
        for key, value in lp.items():
            path = f"logprobs/{key}"
            if key in ("content", "refusal") and isinstance(value, list):
                for entry in value:
                    size += self._entry(key, entry, path)
            elif key == "tokens" and isinstance(value, list):  # the legacy completions shape
                for tok in value:
                    if isinstance(tok, str):
                        self.tokens.setdefault(key, []).append(tok)
                        size += len(tok)
                    else:
                        self.other.extend(_leaves(tok, path))
            elif key == "top_logprobs" and isinstance(value, list):  # legacy: {token: logprob} per position
                for alts in value:
                    keys = alts.keys() if isinstance(alts, dict) else ()
                    self.other.extend((path, k) for k in keys if isinstance(k, str) and len(k) > LONG_TOKEN)
            elif key not in ("token_logprobs", "text_offset"):
                self.other.extend(_leaves(value, path))
        return size

    def _entry(self, key: str, entry: Any, path: str) -> int:
        if not isinstance(entry, dict):
            self.other.extend(_leaves(entry, path))
            return 0
        size = 0
        for name, value in entry.items():
            if name == "logprob":
                continue
            if name == "token" and isinstance(value, str):
                self.tokens.setdefault(key, []).append(value)
                size += len(value)
            elif name == "bytes" and (raw := _byte_list(value)) is not None:
                self.raw.setdefault(key, bytearray()).extend(raw)
            elif name == "top_logprobs" and isinstance(value, list):
                self._alternatives(value, f"{path}/top_logprobs")
            else:
                self.other.extend(_leaves(value, f"{path}/{name}"))
        return size

    def _alternatives(self, alts: list[Any], path: str) -> None:
        """The alternatives at one position: a token (or its bytes) longer than ``LONG_TOKEN`` is read, and any
        string beside them; short tokens are not (a client shows one position's alternatives, not a text)."""
        for alt in alts:
            if not isinstance(alt, dict):
                self.other.extend(_leaves(alt, path))
                continue
            for name, value in alt.items():
                if name == "logprob":
                    continue
                if name == "token" and isinstance(value, str):
                    if len(value) > LONG_TOKEN:
                        self.other.append((path, value))
                elif name == "bytes" and (raw := _byte_list(value)) is not None:
                    if len(raw) > LONG_TOKEN:
                        self.other.append((path, raw.decode("utf-8", "replace")))
                else:
                    self.other.extend(_leaves(value, f"{path}/{name}"))

    def take_other(self) -> list[tuple[str, str]]:
        other, self.other = self.other, []
        return other

    def texts(self, known: Known) -> list[str]:
        """The joined tokens and decoded bytes of each kind that are not ``known`` text of the choice."""
        out: list[str] = []
        for key in sorted({*self.tokens, *self.raw}):
            joined = "".join(self.tokens.get(key, ()))
            decoded = self.raw[key].decode("utf-8", "replace") if key in self.raw else ""
            for text in (joined, decoded) if decoded != joined else (joined,):
                if (bare := text.strip()) and bare not in known:
                    out.append(text)
        return out


_LAYOUT = re.compile(r"\s+|</?think>")  # what a token list may add to or drop from its text: spacing, think tags


class Known:
    """What a choice's side text may repeat without being read again: its content, its reasoning, both. Equal as
    written (stripped), or else once whitespace and ``<think>`` tags are taken out (a reasoning model's logprobs
    spell its reasoning and content as one, tags and all); the second form is made only when the first fails."""

    def __init__(self, *texts: str) -> None:
        self.texts = [t for t in texts if t.strip()]
        self.exact = frozenset(t.strip() for t in self.texts)
        self._compact: frozenset[str] | None = None

    def __contains__(self, text: object) -> bool:
        if not isinstance(text, str) or not self.texts:
            return False
        if text.strip() in self.exact:
            return True
        if self._compact is None:
            self._compact = frozenset(_LAYOUT.sub("", t) for t in self.texts)
        return _LAYOUT.sub("", text) in self._compact


def known_texts(*texts: str) -> Known:
    """``Known`` of a choice's texts."""
    return Known(*texts)


def _text_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _holds_text(part: Any, key: str) -> bool:
    return part is None or (isinstance(part, dict) and _text_or_none(part.get(key)))


# The keys the output check reads by name, where they sit: a reply or chunk, a choice, a message or delta, a tool call,
# its function or custom tool (a legacy ``function_call`` too), an audio reply. Go's ``encoding/json`` (Ollama's
# clients, any Go client) matches a key to a field ignoring case (and folds ``K``/``ſ`` to ``k``/``s``): ``Choices``
# or ``Content`` is the field to it, and to the check nothing, or a string read apart from what it is.
_REPLY_KEYS = frozenset({"choices"})
_CHOICE_KEYS = frozenset({"index", "message", "delta", "finish_reason", "logprobs"})
_BODY_KEYS = frozenset({"content", "refusal", "audio", "tool_calls", "function_call", *REASONING_FIELDS})
_CALL_KEYS = frozenset({"index", "function", "custom"})
_FUNCTION_KEYS = frozenset({"name", "arguments", "input"})
_AUDIO_KEYS = frozenset({"transcript"})


def case_variant(obj: dict[str, Any], known: frozenset[str]) -> str | None:
    """The known key that a key of ``obj`` equals ignoring case but not exactly (``Choices``, ``CONTENT``), or None.
    The key itself is not returned: it is the upstream's text."""
    for key in obj:
        if key not in known and (fold := key.casefold()) in known:
            return fold
    return None


def _variant_problem(obj: dict[str, Any], known: frozenset[str], where: str) -> str | None:
    fold = case_variant(obj, known)
    return None if fold is None else f"a case variant of {fold!r} in {where}"


def field_problem(obj: dict[str, Any]) -> str | None:
    """What keeps the output check from reading a message or a delta as a client may show it: a field the check reads
    (``choice_text``, ``reasoning_of``) in another shape than text, which the check would pass over, or a key that is
    a case variant of one (``case_variant``). None if none."""
    if (problem := _variant_problem(obj, _BODY_KEYS, "a message")) is not None:
        return problem
    content = obj.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, str) or (isinstance(p, dict) and _text_or_none(p.get("text"))) for p in content):
            return "a content part that is not text"
    elif not _text_or_none(content):
        return "content that is neither text nor a list of parts"
    for key in ("refusal", *REASONING_FIELDS):
        if not _text_or_none(obj.get(key)):
            return f"{key} that is not text"
    audio = obj.get("audio")
    if not _holds_text(audio, "transcript"):
        return "audio without a text transcript"
    if isinstance(audio, dict) and (problem := _variant_problem(audio, _AUDIO_KEYS, "audio")) is not None:
        return problem
    calls = obj.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        return "tool_calls that is not a list"
    for tc in calls or ():
        if (problem := _call_problem(tc)) is not None:
            return problem
    call = obj.get("function_call")
    if not _holds_text(call, "arguments"):
        return "a function_call whose arguments are not text"
    if isinstance(call, dict) and (problem := _variant_problem(call, _FUNCTION_KEYS, "function_call")) is not None:
        return problem
    return None


def _call_problem(tc: Any) -> str | None:
    """``field_problem`` of one tool call."""
    if not (isinstance(tc, dict) and _holds_text(tc.get("function"), "arguments")):
        return "a tool call whose arguments are not text"
    if not _holds_text(tc.get("custom"), "input"):
        return "a custom tool call whose input is not text"
    if (problem := _variant_problem(tc, _CALL_KEYS, "a tool call")) is not None:
        return problem
    for kind in ("function", "custom"):
        part = tc.get(kind)
        if isinstance(part, dict) and (problem := _variant_problem(part, _FUNCTION_KEYS, kind)) is not None:
            return problem
    return None


def read_choices(obj: dict[str, Any], part: str) -> list[tuple[int, dict[str, Any]]]:
    """(index, choice) of each choice of a reply (``part="message"``) or a chunk (``part="delta"``); a choice without
    an index is at its position. Raises ``MalformedReply`` where the shape leaves in doubt what a client shows: the
    gateway would check one thing and relay another. Two choices with one index (a client shows both, or the last, or
    joins them) fail closed rather than merge: no one merged text is what every client shows, or what the client sends
    back as its history. A key of the reply, a choice or its message that is a case variant of one the check reads
    (``Choices``, ``Message``, ``Delta``, ``Content``: ``case_variant``) is malformed too."""
    if (fold := case_variant(obj, _REPLY_KEYS)) is not None:
        raise MalformedReply("choices", f"the reply has a case variant of {fold!r}")
    choices = obj.get("choices")
    if choices is None:
        return []
    if not isinstance(choices, list):
        raise MalformedReply("choices", "choices is not a list")
    out: list[tuple[int, dict[str, Any]]] = []
    seen: set[int] = set()
    for pos, ch in enumerate(choices):
        if not isinstance(ch, dict):
            raise MalformedReply("choices", f"choice {pos} is not an object")
        idx = ch.get("index", pos)
        if type(idx) is not int or idx < 0:  # not bool, "0" or 0.0: clients read those as 1 or 0, we would not
            raise MalformedReply("index", f"choice {pos} has an index that is not a non-negative integer")
        if idx in seen:
            raise MalformedReply("index", f"two choices with index {idx}")
        seen.add(idx)
        if (problem := _variant_problem(ch, _CHOICE_KEYS, "a choice")) is not None:
            raise MalformedReply("field", f"choice {idx} has {problem}")
        body = ch.get(part)
        if body is not None and not isinstance(body, dict):
            raise MalformedReply("field", f"choice {idx} has a {part} that is not an object")
        if body is not None and (problem := field_problem(body)) is not None:
            raise MalformedReply("field", f"choice {idx} has {problem}")
        out.append((idx, ch))
    return out


def reasoning(obj: dict[str, Any]) -> str:
    """The reasoning a message or a delta carries (``REASONING_FIELDS``)."""
    return "".join(v for k in REASONING_FIELDS if isinstance(v := obj.get(k), str))


def reasoning_of(obj: dict[str, Any], declared: frozenset[str] = frozenset()) -> str:
    """What the output check reads of a message beside its reply text: the reasoning a reasoning model thinks aloud
    (``REASONING_FIELDS``, first), the strings of content parts other than their ``text``, every other string of the
    message (``side_fields``: a refusal, an audio transcript, ``thinking``, a vendor's field, a tool call's name
    unless the request ``declared`` it...), and tool-call arguments with their JSON escapes decoded. A client may show
    any of it; none of it is the reply text the history records. "" for a message with content and calls to declared
    tools only (unescaped), so an ordinary reply reads as before."""
    parts = [reasoning(obj)]
    content = obj.get("content")
    if isinstance(content, list):
        parts.append(content_parts(content)[1])
    parts.extend(t for path, t in side_fields(obj) if not (t in declared and is_tool_name(path)))
    parts.extend(unescaped(a) for _, a in tool_inputs(obj))
    return "\n".join(p for p in parts if p.strip())


@dataclass
class ChoiceText:
    """The assistant text of one streamed choice: content deltas and tool-call argument deltas, and apart from them
    the reasoning deltas and every other string ``reasoning_of`` reads (non-text content parts, ``side_fields``), each
    field's pieces joined: checked with the reply, never part of the reply text the history records."""

    content: list[str] = field(default_factory=list)
    args: dict[int, list[str]] = field(default_factory=dict)
    reasoning: list[str] = field(default_factory=list)
    side: dict[str, list[str]] = field(default_factory=dict)  # by path (``side_fields``); non-text parts: "content"
    beside: Beside = field(default_factory=Beside)  # the choice's fields beside its delta (``choice_fields``)
    logprobs: Logprobs = field(default_factory=Logprobs)
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
        for key, text in (("content", other), *side_fields(delta)):
            if text:
                self.side.setdefault(key, []).append(text)
                self.size += len(text)
        for idx, a in tool_inputs(delta):
            self.args.setdefault(idx, []).append(a)
            self.size += len(a)

    def add_choice(self, choice: dict[str, Any], stops: frozenset[str] = frozenset()) -> int:
        """Add what a chunk's choice carries beside its delta (``choice_fields``, ``Logprobs``); how much it grew."""
        grown = self.logprobs.add(choice.get("logprobs"))
        grown += self.beside.add([*choice_fields(choice, "delta", stops), *self.logprobs.take_other()])
        self.size += grown
        return grown

    def text(self) -> str:
        return choice_text("".join(self.content), ["".join(a) for _, a in sorted(self.args.items())])

    def reasoning_text(self, declared: frozenset[str] = frozenset(), top: list[str] | None = None) -> str:
        """The reasoning, then what else was streamed beside the content (``reasoning_of``'s fields: a tool call's
        name, its pieces joined, unless the request ``declared`` it), then the tool calls' arguments with their JSON
        escapes decoded, then the choice's fields beside its delta and its logprobs' text that do not repeat its
        content (``Beside``, ``Logprobs``), then ``top``: the text beside the choices (``top_fields``)."""
        side = (("".join(v), path) for path, v in self.side.items())
        reasoning = "".join(self.reasoning)
        parts = [reasoning, *(t for t, path in side if not (t in declared and is_tool_name(path)))]
        parts.extend(unescaped("".join(a)) for _, a in sorted(self.args.items()))
        if self.beside.paths or self.logprobs.tokens or self.logprobs.raw:
            content = "".join(self.content)
            known = known_texts(
                content, reasoning, reasoning + content, self.text(), "".join(self.side.get("refusal", ()))
            )
            parts.extend(self.beside.texts(known))
            parts.extend(self.logprobs.texts(known))
        parts.extend(top or ())
        return "\n".join(p for p in parts if p)


def raise_stream_error(data: str) -> None:
    """An upstream ``{"error": ...}`` event inside a 200 stream is an error, not content (a pure passthrough: the
    guarded relay checks its message first, ``StreamGuard``)."""
    try:
        obj = json.loads(data)
    except ValueError:
        return
    if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
        err = obj["error"]
        msg = err.get("message") if isinstance(err, dict) else str(err)
        raise UpstreamStreamError(f"upstream error in stream: {msg}")


class UpstreamErrorEvent(UpstreamStreamError):
    """An upstream's in-stream error event whose message the output check read and passed: the client gets the
    message (``str``), the gateway's log only ``log_message`` (``error_summary``): no upstream text."""

    def __init__(self, message: str, log_message: str) -> None:
        super().__init__(message)
        self.log_message = log_message


def error_summary(err: Any) -> str:
    """An upstream error object told without its text: its ``code`` and ``type`` where each is a token (no
    whitespace, at most ``OPAQUE_CHARS``), and the length of its message."""
    parts = []
    fields = err if isinstance(err, dict) else {}
    for key in ("code", "type"):
        value = fields.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value and len(value) <= OPAQUE_CHARS and not _SPACE.search(value):
            parts.append(f"{key} {value}")
    msg = fields.get("message") if isinstance(err, dict) else err
    parts.append(f"a message of {len(msg) if isinstance(msg, str) else 0} characters, not shown")
    return ", ".join(parts)


BodySender = Callable[[bytes, bool], Awaitable[None]]  # (data, more_body)


async def relay(
    chunks: AsyncIterator[bytes], send: BodySender, *, guard: StreamGuard | None, max_event_chars: int
) -> str:
    """Relay an upstream event stream to the client as it arrives; the exchange's outcome when it ends.

    Events of one upstream read go out in one write. With a ``guard`` every event is accounted for, checked when
    due and relayed as the guard read it (``Step``); a block, or a malformed chunk, cuts the stream before the event
    that tripped it. Without one (a pure passthrough) only ``[DONE]`` and ``{"error": ...}`` events are looked at.
    An upstream error event, a stream that is not SSE or whose events are not JSON objects, or a stream that ends
    without ``[DONE]`` raises ``UpstreamStreamError`` (the caller ends the client's stream in-band); events that
    arrived intact before it are relayed first.
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
                if ev.done:  # nothing after it is read, so nothing after it is relayed
                    block = await guard.finish() if guard is not None else None
                    await send(bytes(out) + (block if block is not None else DONE_BYTES), False)
                    return guard.outcome if guard is not None else "ok"
                if guard is None:
                    if '"error"' in ev.data:
                        raise_stream_error(ev.data)
                    finished = finished or _FINISHED_RE.search(ev.data) is not None
                    out += ev.encode()
                    continue
                step = await guard.event(ev)
                if step.end is not None:
                    await send(bytes(out) + step.end, False)
                    return guard.outcome
                if step.relay is not None:
                    out += step.relay.encode()
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
        return guard.outcome if guard is not None else "ok"
    raise UpstreamStreamError("the upstream stream ended before every choice finished, without [DONE]")


def _chunk(data: str) -> dict[str, Any]:
    """An event's JSON object; an event that is not a JSON object raises."""
    try:
        obj = json.loads(data)
    except ValueError:
        raise UpstreamStreamError("upstream sent an event that is not valid JSON") from None
    if not isinstance(obj, dict):
        raise UpstreamStreamError("upstream sent an event that is not a JSON object")
    return obj


@dataclass(frozen=True, slots=True)
class Step:
    """What the relay does with one upstream event: relay ``relay`` (the event, or what of it may go out; None: drop
    it), unless ``end`` is set: then the event is withheld and ``end`` ends the stream."""

    relay: SSEEvent | None
    end: bytes | None = None


class StreamGuard:
    """Accumulates streamed choices and runs the output checks at the right moments.

    ``malformed``: the ``MalformedReply.problem`` that ended the stream, if one did; ``late``: the upstream sent text
    for a choice after its ``finish_reason``, which was dropped. Each is logged once per request."""

    def __init__(self, pipeline: Pipeline, ex: Exchange) -> None:
        self.pipeline = pipeline
        self.ex = ex
        self.choices: dict[int, ChoiceText] = {}
        self.meta: dict[str, Any] = {}
        self.blocked = False
        self.malformed: str | None = None
        self.late = False
        self.verdicts: list[Verdict] = []
        self.declared = tool_names(ex.body)  # ``tool_names``: the tool-call names the check does not read
        self.stops = stop_strings(ex.body)  # ``choice_fields``: a stop_reason among them is not read
        self.top = Beside()  # the chunks' text beside their choices (``top_fields``): read with choice 0
        self.top_read: list[str] = []  # what of it the check read last

    @property
    def outcome(self) -> str:
        """The exchange's outcome once the stream ended."""
        if self.malformed is not None:
            return "upstream_error"
        return "blocked_output" if self.blocked else "ok"

    async def event(self, ev: SSEEvent) -> Step:
        """Account for one event: what of it to relay, or the bytes that end the stream (a check blocks, or the
        event is malformed)."""
        obj = _chunk(ev.data)
        if "error" in obj and "choices" not in obj:
            return await self._error_event(obj["error"])
        try:
            choices = read_choices(obj, "delta")
        except MalformedReply as exc:
            self.malformed = exc.problem
            logger.warning("request %s: %s; the stream was ended", self.ex.request_id, exc)
            return Step(None, self._end(None, None))
        for key in ("id", "created", "model"):
            if key in obj:
                self.meta[key] = obj[key]
        top_grew = self.top.add(top_fields(obj)) > 0
        kept = [(idx, ch) for idx, ch in choices if not self._late(idx, ch)]
        if len(kept) < len(choices):
            if not kept:
                return Step(None)
            obj["choices"] = [ch for _, ch in kept]
            ev = SSEEvent(json.dumps(obj, separators=(",", ":"), ensure_ascii=False), ev.event, ev.id)
        touched: list[ChoiceText] = []
        if (block := await self._account(kept, touched)) is not None:
            return Step(None, block)  # the whole event is withheld: nothing of it was relayed
        if top_grew and self.top.texts() != self.top_read and (block := await self._check_top()) is not None:
            return Step(None, block)
        # The unchecked text of all choices together stays under output_check_chars: with n > 1 each choice had its
        # own allowance, so n choices relayed up to n times as much of a reply the check then blocked (a red team).
        unchecked = [(i, st) for i, st in self.choices.items() if not st.final_checked and st.size > st.checked]
        if sum(st.size - st.checked for _, st in unchecked) >= self.pipeline.output_check_chars:
            for idx, st in unchecked:
                if (block := await self._check(idx, st, final=False)) is not None:
                    return Step(None, block)
        for st in touched:
            st.relayed_chars = st.content_chars
        return Step(ev)

    async def _account(self, kept: list[tuple[int, dict[str, Any]]], touched: list[ChoiceText]) -> bytes | None:
        """Add each choice of a chunk to its text (``touched``: theirs); a choice that finishes has its last check,
        and one that brings text beside its delta after its last check (a chunk after its ``finish_reason`` without
        a delta, which ``_late`` keeps) one more: the text goes out with this event. What ends the stream, if one
        blocks."""
        for idx, ch in kept:
            st = self.choices.get(idx)
            if st is None:
                st = self.choices[idx] = ChoiceText()
            touched.append(st)
            delta = ch.get("delta")
            if delta is not None:
                st.add(delta)
            grew = st.add_choice(ch, self.stops) > 0
            if ch.get("finish_reason") is not None or (grew and st.final_checked):
                st.finished = True
                if (block := await self._check(idx, st, final=True)) is not None:
                    return block
        return None

    def _late(self, idx: int, ch: dict[str, Any]) -> bool:
        """Whether ``ch`` carries text for a choice that already finished: its last check has run, so it is dropped."""
        st = self.choices.get(idx)
        if st is None or not st.finished or not (ch.get("delta") or ch.get("logprobs")):
            return False
        if not self.late:
            self.late = True
            logger.warning("request %s: upstream sent text for choice %d after its finish_reason: dropped",
                           self.ex.request_id, idx)  # fmt: skip
        return True

    def all_finished(self) -> bool:
        return bool(self.choices) and all(st.finished for st in self.choices.values())

    async def finish(self) -> bytes | None:
        """At ``[DONE]``: the final check of every choice that has not had one."""
        for idx, st in self.choices.items():
            if not st.final_checked and (block := await self._check(idx, st, final=True)) is not None:
                return block
        self.record()
        return None

    async def _error_event(self, err: Any) -> Step:
        """An upstream's ``{"error": ...}`` event: its text is read as text beside the choices (``_check_top``); a
        block ends the stream as any block does, else ``UpstreamErrorEvent`` carries the message to the client. The
        log gets the error's code, type and length only (``error_summary``), never its text."""
        summary = error_summary(err)
        msg = err.get("message") if isinstance(err, dict) else err
        self.top.add(_leaves(err, "error"))
        if self.top.texts() != self.top_read and (block := await self._check_top()) is not None:
            logger.warning("request %s: upstream error in stream (%s): blocked by the output check",
                           self.ex.request_id, summary)  # fmt: skip
            return Step(None, block)
        text = msg if isinstance(msg, str) else json.dumps(msg, ensure_ascii=False)
        raise UpstreamErrorEvent(f"upstream error in stream: {text}", f"upstream error in stream ({summary})")

    async def _check_top(self) -> bytes | None:
        """Text beside the choices grew in this chunk (an ordinary upstream sends none: ids and tokens are not read):
        check it now, before the chunk goes out, with choice 0 (read beside its text), or alone."""
        st = self.choices.get(0)
        if st is not None:
            return await self._check(0, st, final=st.final_checked)
        self.top_read = self.top.texts()
        self.ex.reply_reasoning[0] = "\n".join(self.top_read)
        return await self._verdict(0, "", final=False)

    async def _check(self, idx: int, st: ChoiceText, *, final: bool) -> bytes | None:
        text = st.text()
        top = None
        if idx == 0:
            top = self.top_read = self.top.texts()
        self.ex.reply_reasoning[idx] = st.reasoning_text(self.declared, top)
        st.checked = st.size
        st.final_checked = st.final_checked or final
        return await self._verdict(idx, text, final=final)

    async def _verdict(self, idx: int, text: str, *, final: bool) -> bytes | None:
        with self.ex.timed("output_check"):
            verdict = await self.pipeline.check_output(self.ex, idx, text, final=final)
        self.verdicts.append(verdict)
        if not verdict.blocks:
            return None
        self.blocked = True
        return self._end(idx, verdict.reply_text)

    def _end(self, idx: int | None, reply_text: str | None) -> bytes:
        """What ends the stream now: every choice asked for ends with ``content_filter`` (those the upstream had not
        started yet too), choice ``idx`` with the policy's ``reply_text``; then ``[DONE]``."""
        self.record()
        base = {
            "id": self.meta.get("id", f"chatcmpl-guard-{self.ex.request_id}"),
            "object": "chat.completion.chunk",
            "created": self.meta.get("created", int(time.time())),
            "model": self.meta.get("model", self.ex.body.get("model") or "guardproxy"),
        }
        n = self.ex.body.get("n")
        asked = range(n if isinstance(n, int) and n > 0 else 1)
        choices = []
        for i in sorted(set(self.choices).union(asked)):
            delta = {"content": reply_text} if i == idx and reply_text else {}
            choices.append({"index": i, "delta": delta, "finish_reason": "content_filter"})
        return sse_json({**base, "choices": choices}) + DONE_BYTES

    def record(self) -> None:
        self.ex.reply_texts = {i: st.text() for i, st in self.choices.items()}
        self.ex.relayed_chars = {i: st.relayed_chars for i, st in self.choices.items()}
        self.ex.output_verdict = combine(self.verdicts)
