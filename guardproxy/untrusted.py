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

That holds under the keys left out too: a text file sent as ``image_url.url``, ``file.file_data`` or
``input_audio.data`` is text a model reads (red team 4: such parts once went unread). So is the payload of a part
that declares it text: an Anthropic-style ``document`` whose ``source`` is ``{"type": "text", "data": ...}``, or
whose ``media_type`` (``mime_type``, a file's ``format``) is a text type, its ``data`` plain or base64. A raw base64
payload (``input_audio.data``, an image ``source.data``) is read when its bytes are text. Binary media cost only the
decoding of their head (``_HEAD_CHARS``): a payload not declared text whose head is binary is left out unread.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, Literal

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
# Keys left out (``NOT_TEXT``) whose string value is a payload: raw base64 or, where its part declares so, text.
_PAYLOAD_KEYS = frozenset({"data", "file_data"})
# Keys that declare a payload's media type (a file part's ``format`` is one where it holds a slash).
_MEDIA_KEYS = ("media_type", "mime_type", "mimeType", "format")
# Media types that are text besides ``text/*`` and the ``+json`` / ``+xml`` suffixes.
_TEXT_MEDIA = frozenset(
    {"application/json", "application/xml", "application/javascript", "application/ecmascript", "application/yaml",
     "application/x-yaml", "application/toml", "application/sql", "application/csv", "application/x-sh",
     "application/x-python", "application/x-tex", "application/rtf", "application/x-ndjson", "application/jsonl",
     "application/graphql", "application/x-www-form-urlencoded"}
)  # fmt: skip
# How much of a payload not declared text is decoded first: a binary head (an image's, an audio clip's) leaves it
# out without decoding the megabytes after it.
_HEAD_CHARS = 4096
_BASE64_HEAD = re.compile(r"[A-Za-z0-9+/=_\-\s]+")

# How a value under a left-out key is read (``_payload_strings``): "skip", no payload key (``url``, ``image_url``,
# ``id``...): only a data URI whose payload is text; "bytes", a payload key whose part declares no text: that too,
# and raw base64 whose bytes are text; "text", the data of a ``type: text`` source: as written; "text-media", a
# payload of a text media type: base64 of text decoded, anything else as written; "base64-text", declared base64 of
# a text media type: decoded, as written where it is no base64, left out where it decodes to binary.
Reading = Literal["skip", "bytes", "text", "text-media", "base64-text"]


def strings_of(obj: Any, skip: frozenset[str] = NOT_TEXT, depth: int = 0) -> list[str]:
    """Every non-empty string leaf of ``obj``, in order; values under ``skip`` keys left out but for the text those
    of them that are ``NOT_TEXT`` keys carry (``_payload_strings``: a text file sent as an image or a document's
    text), data URIs read as the text their payload decodes to or, where it is binary, left out."""
    if isinstance(obj, str):
        if not obj.strip():
            return []
        uri = _DATA_URI.match(obj)
        if uri is None:
            return [obj]
        text = _data_uri_text(obj[uri.end() :], uri.group(1), base64_payload=uri.group(2) is not None)
        if text is None:  # not decodable as a data URI: read as written
            return [obj]
        return [text] if _is_text(text) else []
    if depth > MAX_DEPTH:
        return []
    if isinstance(obj, Mapping):
        out: list[str] = []
        for k, v in obj.items():
            if k not in skip:
                out += strings_of(v, skip, depth + 1)
            elif k in NOT_TEXT:  # not the callers' own additions (schema keywords, a tool call's bound arguments)
                out += _payload_strings(v, _reading(obj) if k in _PAYLOAD_KEYS else "skip", depth + 1)
        return out
    if isinstance(obj, list | tuple):
        return [s for v in obj for s in strings_of(v, skip, depth + 1)]
    return []


def _payload_strings(value: Any, reading: Reading, depth: int) -> list[str]:
    """The text that ``value``, under a left-out key, carries as a payload, read as ``reading`` says (``Reading``)."""
    if isinstance(value, str):
        return _payload_string(value, reading) if value.strip() else []
    if depth > MAX_DEPTH:
        return []
    if isinstance(value, Mapping):
        return [
            s
            for k, v in value.items()
            for s in _payload_strings(v, _reading(value) if k in _PAYLOAD_KEYS else "skip", depth + 1)
        ]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _payload_strings(v, reading, depth + 1)]
    return []


def _payload_string(value: str, reading: Reading) -> list[str]:
    uri = _DATA_URI.match(value)
    if uri is not None:
        media = value[5 : uri.start(1)]  # "" where the URI names no type
        text = _payload_text(
            value,
            uri.end(),
            uri.group(1),
            base64_payload=uri.group(2) is not None,
            head_first=not _is_text_media(media),
        )
        if text is None:  # no data URI after all: what the part declares decides
            return [value] if reading in ("text", "text-media", "base64-text") else []
        return [text] if _is_text(text) else []
    if reading == "skip":
        return []
    if reading == "text":
        return [value]
    if reading == "bytes":  # raw base64 (``input_audio.data``, an image source's data): read only where it is text
        if _BASE64_HEAD.fullmatch(value, 0, _HEAD_CHARS) is None:
            return []
        text = _payload_text(value, 0, "", base64_payload=True, head_first=True)
        return [text] if text is not None and _is_text(text) else []
    text = _payload_text(value, 0, "", base64_payload=True, head_first=False)
    if text is None:
        return [value]
    if _is_text(text):
        return [text]
    return [value] if reading == "text-media" else []


def _reading(part: Mapping[str, Any]) -> Reading:
    """How the payload keys of ``part`` are read (``Reading``): a ``type: text`` source's data is text; a text media
    type (``media_type``, ``mime_type``, a file's ``format``) makes its data text, base64 under ``type: base64``."""
    kind = part.get("type")
    if kind == "text":
        return "text"
    media = next((m for m in (part.get(k) for k in _MEDIA_KEYS) if isinstance(m, str) and "/" in m), "")
    if not _is_text_media(media):
        return "bytes"
    return "base64-text" if kind == "base64" else "text-media"


def _is_text_media(media: str) -> bool:
    kind = media.split(";", 1)[0].strip().lower()
    return kind.startswith("text/") or kind in _TEXT_MEDIA or kind.endswith(("+json", "+xml"))


# File formats whose signature is printable: a PDF's head is ASCII object syntax, and its text lies in compressed
# streams that a model's provider extracts; read as written it is no text a model reads.
_FILE_SIGNATURES = ("%PDF-", "GIF87a", "GIF89a", "RIFF", "ID3", "OggS", "fLaC")


def _is_text(text: str) -> bool:
    """Whether decoded bytes are text: not blank, at most ``_BINARY_SHARE`` of their characters ``_NOT_TEXT_CHAR``,
    and no file format's signature (``_FILE_SIGNATURES``) at their start."""
    return (
        bool(text.strip())
        and not text.startswith(_FILE_SIGNATURES)
        and _NOT_TEXT_CHAR.subn("", text)[1] <= _BINARY_SHARE * len(text)
    )


def _payload_text(value: str, start: int, params: str, *, base64_payload: bool, head_first: bool) -> str | None:
    """``_data_uri_text`` of the payload ``value[start:]`` under a left-out key. ``head_first`` (a payload not
    declared text): a payload longer than ``_HEAD_CHARS`` whose head is no text is binary (None), and the rest of it
    is never decoded (nor copied)."""
    if head_first and len(value) - start > _HEAD_CHARS:
        head = value[start : start + _HEAD_CHARS]
        if base64_payload:  # whole base64 quanta: a cut one would make the head undecodable
            head = "".join(head.split())
            head = head[: len(head) - len(head) % 4]
        text = _data_uri_text(head, params, base64_payload=base64_payload)
        if text is None or not _is_text(text):
            return None
    return _data_uri_text(value[start:] if start else value, params, base64_payload=base64_payload)


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
