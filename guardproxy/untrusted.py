"""The untrusted text of a request or a reply: every string a model reads or a client shows, wherever it sits.

A guard that reads only the fields it knows is a guard with side doors: an upstream reads ``thinking`` and
``tool_reference`` content parts, a message's ``name``, tool and schema descriptions, vLLM's ``documents`` and
``chat_template``; a client shows a reply's refusal and audio transcript. So what these helpers return is every string
leaf, less what is known not to be text: ids, enum-like keys (``type``, ``format``, ``detail``) and binary payloads
(``image_url`` / ``url``, ``input_audio`` and file ``data``, data URIs of binary data). Base64 elsewhere is scored like
any text: the guard's normaliser decodes it.

A data URI (RFC 2397, ``data:[<mediatype>][;base64],<data>``) is read by what its payload is, not by the type it
declares: a payload that decodes to text (``data:text/plain,...``, or an "image" whose bytes are prose) is the text
a model reads, returned decoded; binary data (an image, a PDF) is left out. A string that merely starts with
``data:`` ("data: ..." as in a log line or an SSE event) is no data URI and is read as written.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

# Keys whose values are no text a model reads as such, or that a client does not show: ids, enums, binary payloads.
NOT_TEXT = frozenset(
    {"type", "id", "index", "data", "url", "image_url", "file_data", "file_id", "format", "detail", "signature",
     "encrypted_content", "expires_at", "mime_type", "tool_call_id", "cache_control"}
)  # fmt: skip
# Content parts the conversation tracker reads as text (``conversation.integrity``), by type, and the keys it reads.
_TRACKED_TYPES = frozenset({None, "text", "input_text", "output_text", "refusal"})
_TRACKED_KEYS = frozenset({"text", "refusal"})
MAX_DEPTH = 16

# RFC 2397: ``data:[<mediatype>][;base64],<data>``, a media type being ``type/subtype`` with ``;name=value``
# parameters; the scheme is case-insensitive.
_DATA_URI = re.compile(
    r"data:(?:[!#$&^\w.+-]+/[!#$&^\w.+-]+)?((?:;[!#$&^\w.+-]+=[^;,\s]*)*)(;base64)?,", re.IGNORECASE | re.ASCII
)
_CHARSET = re.compile(r";charset=([^;,]+)", re.IGNORECASE)
# What decoded bytes hold that text does not: control characters other than whitespace, and U+FFFD where the bytes
# were no valid text in the URI's charset.
_NOT_TEXT_CHAR = re.compile("[\x00-\x08\x0e-\x1f\x7f\ufffd]")
# A payload with more of those than this share of its characters is binary.
_BINARY_SHARE = 0.1


def strings_of(obj: Any, skip: frozenset[str] = NOT_TEXT, depth: int = 0) -> list[str]:
    """Every non-empty string leaf of ``obj``, in order; values under ``skip`` keys left out, data URIs read as the
    text their payload decodes to or, where it is binary, left out."""
    if isinstance(obj, str):
        if not obj.strip():
            return []
        uri = _DATA_URI.match(obj)
        if uri is None:
            return [obj]
        text = _data_uri_text(obj[uri.end() :], uri.group(1), base64_payload=uri.group(2) is not None)
        if text is None:  # not decodable as a data URI: read as written
            return [obj]
        return [text] if text.strip() and _NOT_TEXT_CHAR.subn("", text)[1] <= _BINARY_SHARE * len(text) else []
    if depth > MAX_DEPTH:
        return []
    if isinstance(obj, Mapping):
        return [s for k, v in obj.items() if k not in skip for s in strings_of(v, skip, depth + 1)]
    if isinstance(obj, list | tuple):
        return [s for v in obj for s in strings_of(v, skip, depth + 1)]
    return []


def _data_uri_text(payload: str, params: str, *, base64_payload: bool) -> str | None:
    """The payload of a data URI as text, in its charset (UTF-8 by default), undecodable bytes as U+FFFD; None
    where the payload is not the base64 or percent-encoding the URI says it is."""
    try:
        if base64_payload:
            body = "".join(payload.split()).rstrip("=")
            raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
        else:
            raw = urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        return None
    charset = _CHARSET.search(params)
    try:
        return raw.decode(charset.group(1).strip('"') if charset else "utf-8", errors="replace")
    except (LookupError, ValueError):  # a charset Python does not know, no text encoding, or one without "replace"
        return raw.decode("utf-8", errors="replace")


def content_strings(content: Any) -> tuple[list[str], list[str]]:
    """(what the tracker reads, what it does not) of a message's content: a string, or every string its parts carry
    (a ``thinking`` part's thinking, a ``tool_reference``'s name, an image part's stray ``text``)."""
    if isinstance(content, str):
        return ([content] if content.strip() else []), []
    if not isinstance(content, list):
        return [], []
    tracked: list[str] = []
    other: list[str] = []
    for part in content:
        if isinstance(part, str):
            tracked.extend(strings_of(part))
            continue
        if not isinstance(part, Mapping):
            continue
        # the tracker reads one of text / refusal of a part of a text type (``integrity._part_text``)
        read = None
        if part.get("type") in _TRACKED_TYPES:
            read = next((k for k in ("text", "refusal") if isinstance(part.get(k), str)), None)
        if read is not None:
            tracked.extend(strings_of(part[read]))
        other.extend(strings_of({k: v for k, v in part.items() if k != read}))
    return tracked, other


_SCHEMA_SKIP = NOT_TEXT | {"$ref", "$schema", "$id", "required", "pattern", "additionalProperties", "strict"}


def request_field_texts(
    body: Mapping[str, Any], messages: Sequence[Any], *, with_system: bool, with_schemas: bool = True
) -> list[str]:
    """The text a request hands the model outside its messages' content, one text per source: the messages' ``name``
    fields (system and developer messages' only ``with_system``), each tool's name, description and parameter
    schema and ``response_format``'s JSON schema (only ``with_schemas``), vLLM's ``documents`` (one text each),
    ``chat_template`` and ``chat_template_kwargs``, and ``prediction.content``."""
    out: list[str] = []
    names = [
        m["name"]
        for m in messages
        if isinstance(m, Mapping)
        and isinstance(m.get("name"), str)
        and m["name"].strip()
        and (with_system or m.get("role") not in ("system", "developer"))
    ]
    if names:
        out.append("\n".join(names))
    tools = body.get("tools") if with_schemas else None
    for tool in tools if isinstance(tools, list) else ():
        out.append("\n".join(strings_of(tool, _SCHEMA_SKIP)))
    functions = body.get("functions") if with_schemas else None  # the legacy form
    for fn in functions if isinstance(functions, list) else ():
        out.append("\n".join(strings_of(fn, _SCHEMA_SKIP)))
    fmt = body.get("response_format") if with_schemas else None
    if isinstance(fmt, Mapping):
        out.append("\n".join(strings_of(fmt, _SCHEMA_SKIP)))
    documents = body.get("documents")
    for doc in documents if isinstance(documents, list) else ():
        out.append("\n".join(strings_of(doc)))
    for key in ("chat_template", "chat_template_kwargs"):
        out.append("\n".join(strings_of(body.get(key))))
    prediction = body.get("prediction")
    if isinstance(prediction, Mapping):
        out.append("\n".join(strings_of(prediction.get("content"))))
    return [t for t in out if t.strip()]
