"""Parsing and validating a chat-completions request body: untrusted input, so every way it can be bad
ends in a ``RequestError`` naming the problem (HTTP 400), never in a 500 or a blown stack.

The order matters: bytes are decoded as strict UTF-8 first, nesting depth is measured by scanning the
brackets *before* ``json.loads`` recurses (a body 20,000 levels deep must cost a scan, not a
``RecursionError``), then the JSON is parsed rejecting NaN/Infinity and duplicate keys (two ``messages``
keys would let the guard and the upstream read different conversations), then lone UTF-16 surrogates,
then the shape of the fields the gateway and the guard rely on.

Keys are compared case-folded too. Go's ``encoding/json`` (Ollama's OpenAI layer) matches a key to a field
ignoring case (and folds ``K``/``ſ`` to ``k``/``s``), the last match winning: with ``"messages"`` and
``"Messages"`` the guard would score one conversation and the upstream answer the other, and a lone ``"Content"``
in a message is content to it and nothing to the guard. So two keys of one object (at any depth) that differ only
in case are refused, and so is a case variant of a field the gateway or an upstream reads (``KNOWN_KEYS``) where
the request's own fields are: the body, each message, content part, tool call and function, ``stream_options``.
The client's bytes are still what is forwarded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from guardproxy.errors import RequestError
from guardproxy.settings import LimitSettings

# No model accepts anywhere near this many output tokens; above it the value is a mistake or an attack.
ABSURD_MAX_TOKENS = 10_000_000
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
# A JSON string, written so the regex engine does not backtrack per character (the naive form took 0.3 s on 4 MB).
_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_PAIR_RE = re.compile(rb"\[\]|\{\}")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")
_CONTAINERS = frozenset({dict, list})
# Fields of a chat request, its messages, content parts, tool calls and functions (OpenAI's, and those vLLM and
# Ollama read): a case variant of one of these is refused where they live (see the module docstring).
KNOWN_KEYS = frozenset(
    {
        "messages", "model", "stream", "stream_options", "include_usage", "n", "max_tokens", "max_completion_tokens",
        "temperature", "top_p", "top_k", "stop", "seed", "user", "store", "metadata", "tools", "tool_choice",
        "functions", "function_call", "parallel_tool_calls", "response_format", "logprobs", "top_logprobs",
        "logit_bias", "presence_penalty", "frequency_penalty", "modalities", "audio", "prediction", "reasoning_effort",
        "service_tier", "web_search_options", "verbosity", "options", "format", "keep_alive", "think",
        "chat_template", "chat_template_kwargs", "documents",
        "role", "content", "name", "tool_calls", "tool_call_id", "refusal", "reasoning", "reasoning_content",
        "thinking", "images",
        "type", "text", "input_text", "image_url", "input_audio", "file", "url", "detail", "data", "file_id",
        "file_data", "filename",
        "id", "index", "function", "custom", "arguments", "input",
    }
)  # fmt: skip


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions body. ``changed`` is True when the gateway rewrote it (clamping)."""

    body: dict[str, Any]
    stream: bool
    n: int
    changed: bool


class _KeyClash(Exception):
    """Two keys of one object are equal, or equal ignoring case: ``parse_json_body`` finds and names them."""


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its key/value pairs, duplicates kept (``_clash_error``'s second parse)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(pairs) > 1 and len({key.casefold() for key in obj}) != len(pairs):
        raise _KeyClash
    return obj


def _clash_error(text: str) -> RequestError:
    """The error naming the first two keys of one object of ``text`` that are equal, or equal ignoring case."""
    stack: list[tuple[Any, str]] = [(json.loads(text, object_pairs_hook=_Pairs), "")]
    while stack:
        cur, where = stack.pop()
        if isinstance(cur, _Pairs):
            seen: dict[str, str] = {}
            for key, _ in cur:
                at = f"{where}.{key}" if where else key
                fold = key.casefold()
                first = seen.get(fold)
                if first is None:
                    seen[fold] = key
                    continue
                if first == key:
                    return RequestError(f"duplicate key {at!r} in a JSON object", param=at, code="duplicate_key")
                return RequestError(
                    f"keys {first!r} and {key!r} of one object differ only in case (at {at!r}): a case-insensitive "
                    "decoder would read one where the guard read the other",
                    param=at,
                    code="duplicate_key",
                )
            stack.extend((v, f"{where}.{k}" if where else k) for k, v in reversed(cur))
        elif isinstance(cur, list):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(cur))))
    return RequestError("duplicate key in a JSON object", code="duplicate_key")  # not reached: the hook found one


def _reject_constant(name: str) -> Any:
    raise RequestError(f"{name} is not valid JSON", code="invalid_json")


def json_depth_exceeds(raw: bytes | str, limit: int) -> bool:
    """True when arrays/objects nest deeper than ``limit`` (strings skipped, so brackets in text don't count).

    Works on the UTF-8 bytes (no multi-byte sequence contains an ASCII byte) at C speed: strings are cut
    out, every byte but the brackets is deleted, then each pass removes the innermost ``[]``/``{}`` pairs;
    a pair still left after ``limit`` passes sits deeper than ``limit``. A body with mismatched brackets
    stops shrinking early and is left to the JSON parser to reject.
    """
    data = raw.encode() if isinstance(raw, str) else raw
    if data.count(b"[") + data.count(b"{") <= limit:
        return False  # fast path: not enough brackets to nest that deep
    if b'"' in data:
        data = _STRING_RE.sub(b"", data)
    brackets = data.translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        shorter = _PAIR_RE.sub(b"", brackets)  # one level per pass (two chained replaces could take two)
        if len(shorter) == len(brackets):
            return False
        brackets = shorter
    return b"[]" in brackets or b"{}" in brackets


def parsed_depth_exceeds(obj: Any, limit: int) -> bool:
    """``json_depth_exceeds`` on a parsed value: True when its arrays/objects nest deeper than ``limit``.

    The value comes from ``json.loads``, so its containers are plain dicts and lists (``type`` is checked, not
    ``isinstance``: this walks every value of every request, history included)."""
    level = [obj] if type(obj) in _CONTAINERS else []
    depth = 0
    containers = _CONTAINERS
    while level:  # one nesting level at a time
        depth += 1
        if depth > limit:
            return True
        deeper = []
        for cur in level:
            deeper += [child for child in (cur.values() if type(cur) is dict else cur) if type(child) in containers]
        level = deeper
    return False


def _strings(obj: Any) -> Iterator[str]:
    stack = [obj]
    while stack:
        cur = stack.pop()
        if isinstance(cur, str):
            yield cur
        elif isinstance(cur, dict):
            for k, v in cur.items():
                yield k
                stack.append(v)
        elif isinstance(cur, list):
            stack.extend(cur)


def parse_json_body(raw: bytes, max_depth: int) -> Any:
    """Decode and parse a JSON body with the strict rules above."""
    if not raw.strip():
        raise RequestError("request body is empty", code="empty_body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_utf8") from None
    if text.startswith("\ufeff"):
        raise RequestError("request body starts with a byte order mark", code="invalid_json")
    too_deep = RequestError(f"JSON nested deeper than {max_depth} levels", code="json_too_deep")
    # Parse first and measure the parsed tree: the byte scan costs ~0.4 ms on a 40 KB, 100-turn body, the tree walk
    # a tenth of that. The parser itself stops at Python's recursion limit (RecursionError) long before the stack
    # does. A body that fails to parse is scanned as before, so a too-deep body is reported as such first.
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except RecursionError:
        raise too_deep from None
    except json.JSONDecodeError as exc:
        if json_depth_exceeds(raw, max_depth):
            raise too_deep from None
        raise RequestError(
            f"invalid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})", code="invalid_json"
        ) from None
    except (RequestError, _KeyClash) as exc:  # a duplicate key or a NaN
        if json_depth_exceeds(raw, max_depth):
            raise too_deep from None
        if isinstance(exc, _KeyClash):
            raise _clash_error(text) from None
        raise
    if parsed_depth_exceeds(obj, max_depth):
        raise too_deep
    if _SURROGATE_ESCAPE_RE.search(text):
        # Only bodies with a \uD8xx-\uDFxx escape can hold a lone surrogate; check those precisely.
        for s in _strings(obj):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError("JSON string holds a lone UTF-16 surrogate", code="invalid_unicode") from None
    return obj


def _int_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer", param=name, code="invalid_type")
    return value


def _check_message(i: int, msg: Any) -> None:
    """The shape of ``messages[i]``. Runs on every message of every request: the error text is built only for an
    error, and a string content returns at once."""
    if not isinstance(msg, dict):
        raise RequestError(f"'messages[{i}]' must be an object", param=f"messages[{i}]", code="invalid_type")
    role = msg.get("role")
    if not isinstance(role, str) or not role:
        where = f"messages[{i}].role"
        raise RequestError(f"'{where}' must be a non-empty string", param=where, code="invalid_type")
    content = msg.get("content")
    if content is None or isinstance(content, str):
        return
    where = f"messages[{i}]"
    if not isinstance(content, list):
        raise RequestError(
            f"'{where}.content' must be a string, an array of content parts or null",
            param=f"{where}.content",
            code="invalid_type",
        )
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise RequestError(
                f"'{where}.content[{j}]' must be an object", param=f"{where}.content[{j}]", code="invalid_type"
            )
        if part.get("type") == "text" and not isinstance(part.get("text"), str):
            raise RequestError(
                f"'{where}.content[{j}].text' must be a string",
                param=f"{where}.content[{j}].text",
                code="invalid_type",
            )


def _case_variant(where: str, obj: dict[str, Any]) -> None:
    """Refuse a key of ``obj`` that is a case variant of a known field (``KNOWN_KEYS``): ``"Content"`` alone is
    a message's content to a case-insensitive decoder, and nothing to the guard."""
    for key in obj:
        if key in KNOWN_KEYS:
            continue
        fold = key.casefold()
        if fold != key and fold in KNOWN_KEYS:
            at = f"{where}.{key}" if where else key
            raise RequestError(
                f"key {at!r} is a case variant of {fold!r}: write it as {fold!r}", param=at, code="case_variant_key"
            )


def _case_variants(body: dict[str, Any], messages: list[Any]) -> None:
    """``_case_variant`` where the request's own fields are: the body, ``stream_options``, each message and its
    content parts, tool calls and functions. Runs on every message of every request: a message whose keys are all
    known costs a set lookup per key."""
    _case_variant("", body)
    if isinstance(body.get("stream_options"), dict):
        _case_variant("stream_options", body["stream_options"])
    for i, msg in enumerate(messages):
        _case_variant(f"messages[{i}]", msg)
        content, calls, call = msg.get("content"), msg.get("tool_calls"), msg.get("function_call")
        if isinstance(content, list):
            for j, part in enumerate(content):
                _case_variant(f"messages[{i}].content[{j}]", part)
        if isinstance(call, dict):
            _case_variant(f"messages[{i}].function_call", call)
        if isinstance(calls, list):
            for k, tc in enumerate(calls):
                if isinstance(tc, dict):
                    _case_variant(f"messages[{i}].tool_calls[{k}]", tc)
                    for sub in ("function", "custom"):
                        if isinstance(tc.get(sub), dict):
                            _case_variant(f"messages[{i}].tool_calls[{k}].{sub}", tc[sub])


def validate_chat(obj: Any, limits: LimitSettings) -> ChatRequest:
    """Check the fields the gateway and the guard rely on; everything else is the upstream's business."""
    if not isinstance(obj, dict):
        raise RequestError("request body must be a JSON object", code="invalid_type")
    body: dict[str, Any] = obj
    if "messages" not in body:
        raise RequestError("missing required parameter 'messages'", param="messages", code="missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise RequestError("'messages' must be an array", param="messages", code="invalid_type")
    if not messages:
        raise RequestError("'messages' must not be empty", param="messages", code="empty_array")
    if len(messages) > limits.max_messages:
        raise RequestError(
            f"too many messages: {len(messages)} > {limits.max_messages}", param="messages", code="too_many_messages"
        )
    for i, msg in enumerate(messages):
        _check_message(i, msg)
    users = sum(1 for m in messages if m.get("role") == "user")
    if users > limits.max_user_turns:
        raise RequestError(
            f"too many user messages: {users} > {limits.max_user_turns}, the most the guard reads in one request "
            "(limits.max_user_turns)",
            param="messages",
            code="too_many_user_messages",
        )
    _case_variants(body, messages)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", param="model", code="invalid_type")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream", code="invalid_type")
    n = _int_field(body, "n")
    if n is not None and not 1 <= n <= limits.max_n:
        raise RequestError(f"'n' must be between 1 and {limits.max_n}", param="n", code="invalid_value")
    changed = _limit_tokens(body, limits)
    return ChatRequest(body=body, stream=stream, n=n or 1, changed=changed)


def _limit_tokens(body: dict[str, Any], limits: LimitSettings) -> bool:
    """Validate max_tokens / max_completion_tokens; clamp to ``max_tokens_cap``. True if the body changed."""
    changed = False
    for name in _TOKEN_FIELDS:
        value = _int_field(body, name)
        if value is None:
            continue
        if value < 1:
            raise RequestError(f"'{name}' must be at least 1", param=name, code="invalid_value")
        if limits.max_tokens_cap is not None and value > limits.max_tokens_cap:
            body[name] = limits.max_tokens_cap
            changed = True
        elif value > ABSURD_MAX_TOKENS:
            raise RequestError(f"'{name}' is absurdly large: {value}", param=name, code="invalid_value")
    return changed


def parse_chat(raw: bytes, limits: LimitSettings) -> ChatRequest:
    return validate_chat(parse_json_body(raw, limits.max_json_depth), limits)
