"""Input normalization before scoring: the evasion variants of a text must reach the model as the plain text.

``normalize(text)`` is applied by ``guardproxy.encoding`` to every text, in training and at runtime alike, so the
model never sees the difference between ``bomb``, ``ｂｏｍｂ``, ``b\u200bomb``, ``Вomb`` (Cyrillic В), ``b0mb`` and
the base64 of any of them. Each step is cheap (translate tables and linear regexes) because it runs on the request
path; the whole function is a fixpoint iteration so that ``normalize(normalize(x)) == normalize(x)``.

Steps, in order, repeated until nothing changes (at most ``_MAX_PASSES`` times):

1. Unicode tag characters (U+E0020..U+E007E, "ASCII smuggling") become the ASCII they encode.
2. Format characters (category Cf: zero-width space/joiners, bidi embeddings/overrides/isolates, BOM, soft
   hyphen, word joiner) and variation selectors are removed.
3. NFKC: fullwidth forms, mathematical alphanumerics, ligatures, circled letters fold to their plain forms.
4. Combining marks stacked on an ASCII letter ("Zalgo" text) are removed.
5. Homoglyphs: Cyrillic/Greek/Armenian letters that look Latin are folded in words that mix them with Latin
   letters, or that consist of look-alikes only (real Russian or Greek words nearly always contain a letter
   with no Latin look-alike, so they are left alone).
6. Obvious base64 spans (12+ characters that decode to printable UTF-8 text) are replaced by their decoding, which
   the next pass normalizes in turn. Replacing (not appending) keeps the verdict of a base64-wrapped request equal
   to the plain one and keeps the function idempotent.
7. Leetspeak is folded only inside letter runs that hold a leet character between two letters (``b0mb``,
   ``h4ck3r``, ``k1ll``), never in e-mail addresses, URLs or hex strings, so ``mp3``, ``4k``, ``covid19`` and
   ``$100`` stay as written.
8. Whitespace runs collapse to one space (newlines kept, at most one blank line), ends stripped.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata

__all__ = ["normalize"]

_MAX_PASSES = 4

# Tag characters map one to one onto printable ASCII; U+E0001 (language tag) and U+E007F (cancel tag) just go.
_TAGS: dict[int, str | None] = {cp: chr(cp - 0xE0000) for cp in range(0xE0020, 0xE007F)}
_TAGS[0xE0001] = None
_TAGS[0xE007F] = None

_VARIATION_SELECTORS = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]")

# Combining diacritical marks (the main block and its supplements/extensions) right after an ASCII letter.
_ZALGO = re.compile("(?<=[A-Za-z])[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]+")

# Letters of other scripts that render like Latin ones in common fonts. Upper and lower case kept apart so a
# folded text reads exactly like the plain one (the model's tokenizer lowercases anyway).
_HOMOGLYPHS: dict[str, str] = {
    # Cyrillic
    "А": "A",
    "В": "B",
    "Е": "E",
    "К": "K",
    "М": "M",
    "Н": "H",
    "О": "O",
    "Р": "P",
    "С": "C",
    "Т": "T",
    "Х": "X",
    "У": "Y",
    "І": "I",
    "Ј": "J",
    "Ѕ": "S",
    "Ԛ": "Q",
    "Ԝ": "W",
    "а": "a",
    "е": "e",
    "о": "o",
    "р": "p",
    "с": "c",
    "у": "y",
    "х": "x",
    "і": "i",
    "ј": "j",
    "ѕ": "s",
    "һ": "h",
    "ԁ": "d",
    "ԛ": "q",
    "ԝ": "w",
    "ӏ": "l",
    "ү": "y",
    # Greek
    "Α": "A",
    "Β": "B",
    "Ε": "E",
    "Ζ": "Z",
    "Η": "H",
    "Ι": "I",
    "Κ": "K",
    "Μ": "M",
    "Ν": "N",
    "Ο": "O",
    "Ρ": "P",
    "Τ": "T",
    "Υ": "Y",
    "Χ": "X",
    "α": "a",
    "ι": "i",
    "κ": "k",
    "ν": "v",
    "ο": "o",
    "ρ": "p",
    "υ": "u",
    "ς": "c",  # final sigma: NFKC turns the lunate sigma (U+03F2) into it
    "ϳ": "j",
    # Armenian
    "օ": "o",
    "ս": "u",
    "հ": "h",
    "ո": "n",
}
_HOMOGLYPH_TABLE = str.maketrans(_HOMOGLYPHS)
_LETTER_RUN = re.compile(r"[^\W\d_]+")
_ASCII_LETTER = re.compile("[A-Za-z]")

_B64_SPAN = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{10,}={0,2}(?![A-Za-z0-9+/=_-])")

_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
_LEET_RUN = re.compile(r"[A-Za-z0-9@$]+")
_LEET_INSIDE = re.compile(r"[A-Za-z][013457@$]+[A-Za-z]")
_HEX = re.compile(r"(?:0x)?[0-9A-Fa-f]{8,}")
_WORD = re.compile(r"\S+")
_ADDRESS = re.compile(r"://|^www\.|@[A-Za-z0-9-]+\.[A-Za-z]")

_SPACES = re.compile(r"[^\S\n]+")
_SPACE_AROUND_NEWLINE = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """Return the canonical form of ``text`` that the guard model scores. Never raises on any ``str``."""
    for _ in range(_MAX_PASSES):
        result = _pass(text)
        if result == text:
            break
        text = result
    return text


def _pass(text: str) -> str:
    if not text.isascii():
        text = text.translate(_TAGS)
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
        text = _VARIATION_SELECTORS.sub("", text)
        text = unicodedata.normalize("NFKC", text)
        text = _ZALGO.sub("", text)
        text = _LETTER_RUN.sub(_fold_homoglyphs, text)
    text = _B64_SPAN.sub(_decode_base64, text)
    text = _WORD.sub(_fold_leet_word, text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_AROUND_NEWLINE.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _fold_homoglyphs(match: re.Match[str]) -> str:
    word = match.group(0)
    if word.isascii():
        return word
    folded = word.translate(_HOMOGLYPH_TABLE)
    if folded == word:
        return word
    # Mixed with Latin letters, or made of look-alikes only: an evasion, not a word of another script.
    if _ASCII_LETTER.search(word) or folded.isascii():
        return folded
    return word


def _decode_base64(match: re.Match[str]) -> str:
    span = match.group(0)
    body = span.rstrip("=")
    if len(span) < 12 or len(body) % 4 == 1:  # too short to be obvious; never valid base64
        return span
    padded = body + "=" * (-len(body) % 4)
    try:
        if "-" in body or "_" in body:
            raw = base64.urlsafe_b64decode(padded)
        else:
            raw = base64.b64decode(padded, validate=True)
        decoded = raw.decode("utf-8")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return span
    return decoded if _looks_like_text(decoded) else span


def _looks_like_text(decoded: str) -> bool:
    if len(decoded) < 8:
        return False
    if any(not (ch.isprintable() or ch in "\n\t") for ch in decoded):
        return False
    wordish = sum(1 for ch in decoded if ch.isalpha() or ch == " ")
    # Random bytes that happen to be valid UTF-8 are rarely mostly letters and spaces; prose is.
    return wordish >= 0.7 * len(decoded) and " " in decoded.strip()


def _fold_leet_word(match: re.Match[str]) -> str:
    word = match.group(0)
    if not _LEET_INSIDE.search(word) or _ADDRESS.search(word):
        return word
    return _LEET_RUN.sub(_fold_leet_run, word)


def _fold_leet_run(match: re.Match[str]) -> str:
    run = match.group(0)
    if not _LEET_INSIDE.search(run) or _HEX.fullmatch(run):
        return run
    return run.translate(_LEET)
