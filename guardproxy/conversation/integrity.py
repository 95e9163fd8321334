"""Conversation identity and history integrity: canonical messages, the keyed hash chain, position tags.

Every message of a request (system and developer messages excepted: clients rewrite them per request, e.g. with
the current date) is reduced to a canonical form: its role and its text, NFKC-normalised with every whitespace and
zero-width character removed. Clients re-serialise what they got back (a string becomes a list of content parts,
paragraphs are re-wrapped, trailing newlines dropped), so whitespace and part boundaries cannot count; the words
and their order do.

An assistant message counts as its content followed by its tool calls' argument strings (what the gateway
accumulates from a reply, streamed or not); clients that re-order the keys inside those JSON arguments read as
edited. The rest of an assistant message (a ``reasoning_content`` field, a content part's stray keys) is not bound:
a client can add it to a relayed reply and the position stays verified, so the guard reads it (``unbound_text``).

The chain starts from a secret seed for (tenant, subkey) and hashes one canonical message at a time::

    h_0 = HMAC-SHA256(secret, "scope" | tenant | subkey)
    h_i = SHA-256(h_{i-1} | role_i | len_i | canonical_i)
    tag_i = HMAC-SHA256(secret, "pos" | h_i)[:8]           the position tag stored in the state record
    root  = HMAC-SHA256(secret, "root" | h_1)[:16]         the state record of every conversation that opens so

``h_0`` is secret, so no one without the secret can compute a tag; a tag therefore commits to the whole prefix
before it. A tag of a position that ends with an assistant message is stored only when the gateway relayed that
reply (``ConversationTracker.record_reply``): the tag is the HMAC of the canonical relayed reply bound to its
prefix, and an incoming assistant turn whose position has no stored tag was never relayed by this gateway.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from guardproxy.untrusted import NOT_TEXT, content_strings, strings_of
from guardproxy.wordsplit import word_cost

__all__ = [
    "Chain",
    "History",
    "better_history",
    "build_chain",
    "canonical_text",
    "message_text",
    "secret_fingerprint",
    "tenant_key",
    "unbound_text",
    "worse_history",
]

History = Literal["verified", "unverified", "forged", "none"]
Role = Literal["user", "assistant", "tool"]

TAG_BYTES = 8
ROOT_BYTES = 16

# Ranked from least to most suspicious. A request's verdict is the worse of its prefix's and what it adds; the
# prefix's stored verdict can get better only when a write that was missing when it was reached has arrived
# (``ConversationTracker._history``).
_HISTORY_RANK: dict[str, int] = {"none": 0, "verified": 1, "unverified": 2, "forged": 3}
_ROLE_BYTE: dict[str, bytes] = {"user": b"u", "assistant": b"a", "tool": b"t", "function": b"t"}
_SKIPPED_ROLES = frozenset({"system", "developer"})
# ``_role`` of the role strings ``build_chain`` reads without calling it (any other string is a user turn there too,
# but goes the long way)
_FAST_ROLE: dict[str, Role] = {"user": "user", "assistant": "assistant", "tool": "tool", "function": "tool"}
_SPACE = re.compile(r"\s+")
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
# The ASCII characters str.split() splits on, to delete from encoded ASCII text in one C pass: the same canonical
# bytes as "".join(text.split()), about 6x faster on a 500-character turn (0.74 against 0.11 ms for the 201
# messages of a 100-turn conversation on a Zen 3 EPYC), and every request hashes its whole history.
_ASCII_SPACE = bytes(c for c in range(128) if chr(c).isspace())


def worse_history(a: History, b: History) -> History:
    return a if _HISTORY_RANK[a] >= _HISTORY_RANK[b] else b


def better_history(a: History, b: History) -> History:
    return a if _HISTORY_RANK[a] <= _HISTORY_RANK[b] else b


def _part_text(part: Any) -> tuple[str, str]:
    """(model text, canonical extra) of one content part. Non-text parts enter the chain as a digest."""
    if isinstance(part, str):
        return part, ""
    if not isinstance(part, Mapping):
        return "", ""
    kind = part.get("type")
    for key in ("text", "refusal"):
        value = part.get(key)
        if isinstance(value, str) and kind in (None, "text", "input_text", "output_text", "refusal"):
            return value, ""
    # images, audio, files: the model sees a placeholder, the chain a digest of the part
    try:
        blob = json.dumps(part, sort_keys=True, default=str)
    except (TypeError, ValueError, RecursionError):
        blob = repr(part)
    digest = hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"[{kind}]", f"[{kind}:{digest}]"


def _tool_arguments(message: Mapping[str, Any]) -> list[str]:
    """The argument strings of a message's tool calls, as sent. The gateway accumulates a relayed reply as its
    content followed by its tool calls' arguments (``guardproxy.chat.choice_text``), so that is what is bound."""
    calls = message.get("tool_calls")
    fns = [c.get("function") for c in calls if isinstance(c, Mapping)] if isinstance(calls, list) else []
    fns.append(message.get("function_call"))
    return [fn["arguments"] for fn in fns if isinstance(fn, Mapping) and isinstance(fn.get("arguments"), str)]


def _raw_text(message: Mapping[str, Any]) -> tuple[str, str]:
    """(text, canonical extras) of a message: content parts joined, tool calls appended, whitespace as sent."""
    content = message.get("content")
    extras = ""
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = [_part_text(p) for p in content]
        text = "\n".join(t for t, _ in parts if t)
        extras = "".join(e for _, e in parts if e)
    else:
        text = ""
    if "tool_calls" in message or "function_call" in message:
        text = "\n".join([text, *_tool_arguments(message)] if text else _tool_arguments(message))
    return text, extras


def message_text(message: Mapping[str, Any]) -> str:
    """The text of one message as the guard model sees it: content parts joined, whitespace collapsed, zero-width
    characters read as ``_unzero`` reads them."""
    text = _raw_text(message)[0]
    if _ZERO_WIDTH_RUN.search(text):
        text = _ZERO_WIDTH_RUN.sub("", _ZERO_WIDTH_WORD.sub(_unzero, text))
    return _SPACE.sub(" ", text).strip()


# Zero-width characters between letters: in place of a space ("How\u200bdo\u200bI"), or inside a word
# ("pi\u200bpe bo\u200bmb"). Read as spaces, the second made "pi pe bo mb" (0.016, allowed: a red-team walkthrough);
# deleted, the first runs its words together. So each is decided by the English word list, as a word splitter
# would: the pieces joined where the joined word costs no more than the two apart, or where it is no word and
# neither piece is a word (``_strong``); else a space, and always before a capital that follows a small letter.
# Elsewhere (between emoji, beside punctuation) they are deleted, as the normaliser deletes them.
_ZERO_WIDTH_CHARS = "\u200b\u200c\u200d\u2060\ufeff"
_ZERO_WIDTH_RUN = re.compile(f"[{_ZERO_WIDTH_CHARS}]+")
_ZERO_WIDTH_WORD = re.compile(f"[^\\W\\d_]+(?:[{_ZERO_WIDTH_CHARS}]+[^\\W\\d_]+)+")


def _strong(piece: str) -> bool:
    """A word of the list, of 4+ letters or among its 5,000 commonest: not "ri" or "cin", which it holds as
    abbreviations."""
    cost = word_cost(piece.lower())
    return cost < math.inf and (len(piece) >= 4 or cost <= word_cost("the") + math.log(5_000))


def _unzero(match: re.Match[str]) -> str:
    pieces = _ZERO_WIDTH_RUN.split(match.group())
    out = word = pieces[0]  # ``word``: the letters since the last space put in
    for piece in pieces[1:]:
        joined = word_cost((word + piece).lower())
        if joined == math.inf:  # no word joined: apart, where either piece is a word ("Write" + "ransomware")
            space = _strong(word) or _strong(piece)
        else:  # a capital after a small letter starts a word ("do" + "I"), else the cheaper reading
            space = (piece[0].isupper() and word[-1].islower()) or (
                word_cost(word.lower()) + word_cost(piece.lower()) < joined
            )
        out, word = (f"{out} {piece}", piece) if space else (out + piece, word + piece)
    return out


# Keys of a message whose text the chain binds (``_raw_text``), or that the guard reads elsewhere (``name``: with the
# request's other names, ``untrusted.request_field_texts``)
_BOUND_KEYS = frozenset({"role", "content", "tool_calls", "function_call", "name"})
# What ``unbound_text`` leaves out of a tool call: its arguments are bound; its function's name, an identifier the
# request's tools declare, is not text a client writes into a reply (and reading it would put every relayed tool
# call back in front of the classifier on every request)
_CALL_SKIP = NOT_TEXT | {"arguments", "name"}


def unbound_text(message: Mapping[str, Any]) -> str:
    """The text of a message that the chain does not bind, as one string ("" when there is none): what a client can
    add to a relayed assistant turn while its position stays verified. Every string ``untrusted.strings_of`` reads
    outside what ``canonical_text`` hashes: other fields (``reasoning_content``, ``reasoning``, ``refusal``, an audio
    transcript), the strings of content parts the chain does not read as text, a custom tool call's input. A
    message of role and string content, the common case, costs one pass over its keys."""
    content = message.get("content")
    extra = [k for k in message if k not in _BOUND_KEYS]
    calls = message.get("tool_calls")
    legacy = message.get("function_call")
    if not extra and (content is None or isinstance(content, str)) and not calls and not legacy:
        return ""
    texts = content_strings(content)[1] if isinstance(content, list) else []
    if content is not None and not isinstance(content, str | list):
        texts += strings_of(content)  # no text the chain reads (``_raw_text``)
    texts += strings_of({k: message[k] for k in extra})
    for call in [*(calls if isinstance(calls, list) else ()), legacy]:
        texts += strings_of(call, _CALL_SKIP)
    return "\n".join(texts)


def canonical_text(message: Mapping[str, Any]) -> bytes:
    """The canonical form hashed into the chain: NFKC text without any whitespace, plus non-text part digests."""
    text, extras = _raw_text(message)
    text += extras
    # The chain hashes every message of every request: keep the common case (plain, normalised text) in C.
    if text.isascii():
        return text.encode("ascii").translate(None, _ASCII_SPACE)
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    text = text.translate(_ZERO_WIDTH)
    return "".join(text.split()).encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class Chain:
    """The chain over one request's conversation messages (system and developer messages left out).

    ``indices[i]`` is the position of message i in the request's ``messages``; ``hashes[i]`` is ``h_{i+1}``.
    """

    roles: tuple[Role, ...]
    indices: tuple[int, ...]
    messages: tuple[Mapping[str, Any], ...]
    hashes: tuple[bytes, ...]
    secret: bytes
    seed: bytes

    def __len__(self) -> int:
        return len(self.roles)

    def text(self, i: int) -> str:
        """The model text of message i (computed on demand: only new turns and the window need it)."""
        return message_text(self.messages[i])

    def tag(self, i: int) -> bytes:
        """Position tag after message i (0-based)."""
        return position_tag(self.secret, self.hashes[i])

    def extend(self, message: Mapping[str, Any]) -> Chain:
        """This chain with ``message`` appended (the reply being relayed)."""
        role = _role(message)
        h = _step(self.hashes[-1] if self.hashes else self.seed, role, canonical_text(message))
        return Chain(
            (*self.roles, role),
            (*self.indices, self.indices[-1] + 1 if self.indices else 0),
            (*self.messages, message),
            (*self.hashes, h),
            self.secret,
            self.seed,
        )

    @property
    def root(self) -> bytes:
        """Key of the state record; derived from the first message (with the scope), the same for every turn."""
        return hmac.digest(self.secret, b"root" + self.hashes[0], "sha256")[:ROOT_BYTES]


def _skipped(role: Any) -> bool:
    return isinstance(role, str) and role in _SKIPPED_ROLES


def _role(message: Mapping[str, Any]) -> Role:
    role = message.get("role")
    if role == "assistant":
        return "assistant"
    if role in ("tool", "function"):
        return "tool"
    return "user"  # unknown roles are the client's words: treat them as user turns


def position_tag(secret: bytes, chain_hash: bytes) -> bytes:
    return hmac.digest(secret, b"pos" + chain_hash, "sha256")[:TAG_BYTES]


def reply_hash(prev: bytes, reply: Mapping[str, Any]) -> bytes:
    """The chain hash after ``prev`` extended by a relayed assistant message."""
    return _step(prev, "assistant", canonical_text(reply))


def _step(prev: bytes, role: Role, canonical: bytes) -> bytes:
    return hashlib.sha256(prev + _ROLE_BYTE[role] + len(canonical).to_bytes(8, "big") + canonical).digest()


def build_chain(secret: bytes, tenant: str, subkey: str | None, messages: Sequence[Any]) -> Chain:
    """The chain of a request. Messages that are not JSON objects are skipped (the gateway rejects them first).

    Every request hashes its whole history here, so the loop keeps the common message (a dict with a role string
    and plain ASCII string content, no tool calls) to a few C calls; anything else goes through ``_role`` and
    ``canonical_text``. Both paths give the same hashes (``tests/test_conversation.py`` pins them to ``_step``)."""
    seed = hmac.digest(secret, b"scope\0" + tenant.encode() + b"\0" + (subkey or "").encode(), "sha256")
    roles: list[Role] = []
    indices: list[int] = []
    kept: list[Mapping[str, Any]] = []
    hashes: list[bytes] = []
    h = seed
    sha256 = hashlib.sha256
    space = _ASCII_SPACE
    fast_role = _FAST_ROLE
    for idx, message in enumerate(messages):
        if type(message) is dict:
            role_value = message.get("role")
            role = fast_role.get(role_value) if type(role_value) is str else None
            content = message.get("content")
            if (
                role is not None
                and type(content) is str
                and content.isascii()
                and "tool_calls" not in message
                and "function_call" not in message
            ):
                canonical = content.encode("ascii").translate(None, space)
            elif _skipped(role_value):
                continue
            else:
                role = _role(message)
                canonical = canonical_text(message)
        elif isinstance(message, Mapping) and not _skipped(message.get("role")):
            role = _role(message)
            canonical = canonical_text(message)
        else:
            continue
        h = sha256(b"".join((h, _ROLE_BYTE[role], len(canonical).to_bytes(8, "big"), canonical))).digest()  # = _step
        roles.append(role)
        indices.append(idx)
        kept.append(message)
        hashes.append(h)
    return Chain(tuple(roles), tuple(indices), tuple(kept), tuple(hashes), secret, seed)


def secret_fingerprint(secret: bytes) -> str:
    """A keyed fingerprint of the HMAC secret (hex), stored beside shared state so replicas whose secrets differ
    notice: an HMAC of a fixed label, never the secret or anything a tag is made of."""
    return hmac.digest(secret, b"guardproxy state secret fingerprint", "sha256")[:16].hex()


def tenant_key(secret: bytes, tenant: str) -> bytes:
    """Key of a tenant's refusal memory: never the tenant name itself, and not subdivided by client-chosen keys."""
    return hmac.digest(secret, b"tenant\0" + tenant.encode(), "sha256")[:ROOT_BYTES]
